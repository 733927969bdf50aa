"""compile.py: xDS resources -> snapshot, and the precise refusal of what we do not implement."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from google.protobuf import duration_pb2, wrappers_pb2

from proxy import model
from proxy.compile import XdsResources, compile_route_config, compile_snapshot
from proxy.errors import InvalidResource
from proxy.router import find_virtual_host, match_route, pick_cluster


def _route_config() -> route_pb2.RouteConfiguration:
    rc = route_pb2.RouteConfiguration(name="9080")
    vh = rc.virtual_hosts.add(name="reviews:9080", domains=["reviews.default.svc.cluster.local", "reviews:9080", "*.wild.example"])
    r = vh.routes.add(name="jason")
    r.match.prefix = "/"
    h = r.match.headers.add(name="End-User")
    h.string_match.exact = "jason"
    r.route.cluster = "outbound|9080|v2|reviews"
    r2 = vh.routes.add(name="api")
    r2.match.safe_regex.regex = "/api/v[0-9]+/.*"
    r2.route.timeout.CopyFrom(duration_pb2.Duration(seconds=2, nanos=500_000_000))
    wc = r2.route.weighted_clusters
    wc.clusters.add(name="a", weight=wrappers_pb2.UInt32Value(value=30))
    wc.clusters.add(name="b", weight=wrappers_pb2.UInt32Value(value=70))
    r3 = vh.routes.add(name="exact")
    r3.match.path = "/exact"
    r3.route.cluster = "exact"
    return rc


def test_route_table_lookup_and_matching():
    table = compile_route_config(_route_config())
    vh = find_virtual_host(table, b"reviews:9080")
    assert vh is not None and vh.name == "reviews:9080"
    assert find_virtual_host(table, b"x.wild.example") is vh
    assert find_virtual_host(table, b"other") is None
    assert match_route(vh, b"/anything", {b"end-user": b"jason"}).name == "jason"
    assert match_route(vh, b"/exact?q=1", {}).name == "exact"  # exact ignores the query string
    assert match_route(vh, b"/exact/more", {}) is None
    api = match_route(vh, b"/api/v2/items?x=1", {})
    assert api.name == "api" and api.timeout == 2.5
    assert [pick_cluster(api, x) for x in (0.0, 0.29, 0.3, 0.99)] == ["a", "a", "b", "b"]


def test_route_defaults_follow_envoy():
    rc = route_pb2.RouteConfiguration(name="r")
    r = rc.virtual_hosts.add(name="v", domains=["*"]).routes.add()
    r.match.prefix = "/"
    r.route.cluster = "c"
    table = compile_route_config(rc)
    assert table.wildcard is not None
    assert table.wildcard.routes[0].timeout == 15.0  # RouteAction.timeout unset: Envoy's 15 s


def test_unsupported_route_fields_are_refused_with_their_path():
    rc = _route_config()
    rc.virtual_hosts[0].routes[0].route.retry_policy.retry_on = "5xx"
    rc.virtual_hosts[0].routes[0].route.retry_policy.retry_priority.name = "p"
    with pytest.raises(InvalidResource) as e:
        compile_route_config(rc)
    assert e.value.type_name == "RouteConfiguration" and e.value.name == "9080"
    assert e.value.field == "virtual_hosts[0].routes[0].route.retry_policy.retry_priority"

    rc = _route_config()
    rc.virtual_hosts[0].routes[1].redirect.regex_rewrite.substitution = "x"
    with pytest.raises(InvalidResource, match=r"virtual_hosts\[0\].routes\[1\].redirect.regex_rewrite"):
        compile_route_config(rc)

    rc = _route_config()
    rc.virtual_hosts[0].routes[1].match.safe_regex.regex = "(unclosed"
    with pytest.raises(InvalidResource, match="invalid regex"):
        compile_route_config(rc)


def _cluster(name: str, **kw) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, **kw)
    c.connect_timeout.seconds = 1
    return c


def test_clusters_static_and_eds():
    static = _cluster("inbound|9080||", type=cluster_pb2.Cluster.STATIC)
    static.load_assignment.cluster_name = "inbound|9080||"
    lbe = static.load_assignment.endpoints.add().lb_endpoints.add()
    lbe.endpoint.address.socket_address.address = "127.0.0.1"
    lbe.endpoint.address.socket_address.port_value = 8080
    eds = _cluster("outbound|9080||reviews.default.svc.cluster.local", type=cluster_pb2.Cluster.EDS)
    eds.eds_cluster_config.eds_config.ads.SetInParent()
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=eds.name)
    loc = cla.endpoints.add()
    for port, weight, health in ((9001, 1, 0), (9002, 3, 0), (9003, 1, 3)):
        e = loc.lb_endpoints.add(health_status=health)
        e.endpoint.address.socket_address.address = "127.0.0.1"
        e.endpoint.address.socket_address.port_value = port
        e.load_balancing_weight.value = weight
    snap = compile_snapshot(XdsResources(clusters=[static, eds], endpoints=[cla]))
    assert snap.clusters["inbound|9080||"].endpoints == (model.Endpoint("127.0.0.1", 8080),)
    assert snap.clusters["inbound|9080||"].direction is model.Direction.INBOUND
    c = snap.clusters[eds.name]
    assert [(e.port, e.weight) for e in c.endpoints] == [(9001, 1), (9002, 3)]  # unhealthy dropped
    assert c.service == "reviews.default.svc.cluster.local" and c.connect_timeout == 1.0


def test_unsupported_cluster_settings_are_refused():
    c = _cluster("x", type=cluster_pb2.Cluster.STATIC, lb_policy=cluster_pb2.Cluster.MAGLEV)
    with pytest.raises(InvalidResource, match="MAGLEV is not supported yet"):
        compile_snapshot(XdsResources(clusters=[c]))
    c = _cluster("x", type=cluster_pb2.Cluster.STRICT_DNS)
    with pytest.raises(InvalidResource, match="STRICT_DNS"):
        compile_snapshot(XdsResources(clusters=[c]))
    c = _cluster("x", type=cluster_pb2.Cluster.STATIC)
    c.circuit_breakers.thresholds.add(priority=1).max_connections.value = 1  # HIGH
    with pytest.raises(InvalidResource) as e:
        compile_snapshot(XdsResources(clusters=[c]))
    assert e.value.field == "circuit_breakers.thresholds[0].priority"
    c = _cluster("x", type=cluster_pb2.Cluster.STATIC)
    c.circuit_breakers.per_host_thresholds.add().max_connections.value = 1
    with pytest.raises(InvalidResource) as e:
        compile_snapshot(XdsResources(clusters=[c]))
    assert e.value.field == "circuit_breakers.per_host_thresholds"


def test_listener_needs_its_route_config_and_unique_address():
    from envoy.config.listener.v3 import listener_pb2
    from envoy.extensions.filters.http.router.v3 import router_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )

    def listener(name: str, port: int) -> listener_pb2.Listener:
        ln = listener_pb2.Listener(name=name)
        ln.address.CopyFrom(address_pb2.Address(socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)))
        hcm = hcm_pb2.HttpConnectionManager(stat_prefix="s")
        hcm.rds.route_config_name = "missing"
        hcm.rds.config_source.ads.SetInParent()
        hcm.http_filters.add(name="envoy.filters.http.router").typed_config.Pack(router_pb2.Router())
        ln.filter_chains.add().filters.add(name="envoy.filters.network.http_connection_manager").typed_config.Pack(hcm)
        return ln

    with pytest.raises(InvalidResource, match="route configuration 'missing' was not provided"):
        compile_snapshot(XdsResources(listeners=[listener("a", 1)]))
    rc = route_pb2.RouteConfiguration(name="missing")
    with pytest.raises(InvalidResource, match="same address and port"):
        compile_snapshot(XdsResources(listeners=[listener("a", 1), listener("b", 1)], routes=[rc]))
    snap = compile_snapshot(XdsResources(listeners=[listener("a", 1)], routes=[rc]))
    assert snap.listeners[0].protocol is model.Protocol.HTTP
    assert snap.listeners[0].http.max_request_headers_bytes == 60 * 1024
    # Same resources, same version: the version is a content hash.
    assert compile_snapshot(XdsResources(listeners=[listener("a", 1)], routes=[rc])).version == snap.version


def test_header_matcher_forms():
    rc = route_pb2.RouteConfiguration(name="r")
    vh = rc.virtual_hosts.add(name="v", domains=["*"])
    for i, setup in enumerate([
        lambda h: setattr(h, "present_match", True),
        lambda h: (h.string_match.__setattr__("prefix", "ab"), setattr(h, "invert_match", True)),
        lambda h: h.string_match.safe_regex.__setattr__("regex", "a+b"),
    ]):
        r = vh.routes.add(name=str(i))
        r.match.prefix = "/"
        h = route_components_pb2.HeaderMatcher(name="x")
        setup(h)
        r.match.headers.append(h)
        r.route.cluster = "c"
    table = compile_route_config(rc)
    present, not_prefix, regex = (r.headers[0] for r in table.wildcard.routes)
    assert present.matches(b"") and not present.matches(None)
    assert not not_prefix.matches(b"abc") and not_prefix.matches(b"xyz") and not_prefix.matches(None)
    assert regex.matches(b"aaab") and not regex.matches(b"aaabc")
