"""Traffic management through the whole config pipeline: Istio YAML -> translate -> compile -> model,
and the compiler's refusals (InvalidResource with the field path) for what it does not implement."""

from __future__ import annotations

import re

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo

from control.translate import NodeInfo, Resources, load_text, translate
from proxy import model
from proxy.compile import XdsResources, compile_route_config, compile_snapshot
from proxy.compile_traffic import python_substitution
from proxy.errors import InvalidResource
from tests.control.traffic_fixtures import (
    EVERYTHING,
    GRPC,
    HTTPBIN,
    PRODUCTPAGE,
    RATINGS,
    REVIEWS,
    TCP_ECHO,
    task_resources,
)


def snapshot(resources: Resources) -> model.Snapshot:
    return compile_snapshot(XdsResources(list(resources.listeners), list(resources.routes),
                                         list(resources.clusters), list(resources.endpoints)))


def routes(snap: model.Snapshot, table: str, vhost: str) -> dict[str, model.Route]:
    (found,) = [v for v in snap.routes[table].virtual_hosts if v.name == vhost]
    return {r.name: r for r in found.routes}


def everything(intercept: bool = False) -> model.Snapshot:
    node = NodeInfo(PRODUCTPAGE.namespace, PRODUCTPAGE.labels, PRODUCTPAGE.name, intercept)
    return snapshot(translate(load_text(EVERYTHING), node))


DEFAULT_RETRY = (model.RETRY_CONNECT | model.RETRY_REFUSED | model.RETRY_GRPC_UNAVAILABLE
                 | model.RETRY_GRPC_CANCELLED | model.RETRY_STATUS)


# --- round trips of Istio's tasks ----------------------------------------------------------


@pytest.mark.parametrize("intercept", [False, True])
def test_fault_delay_round_trip(intercept: bool) -> None:
    snap = snapshot(task_resources("tasks-fault-delay.yaml", intercept=intercept))
    jason = routes(snap, "9080", f"{RATINGS}:9080")["ratings.0"]
    assert jason.fault == model.Fault(delay=7.0, delay_percent=100.0)
    assert routes(snap, "9080", f"{RATINGS}:9080")["ratings.1"].fault is None


def test_fault_abort_round_trip() -> None:
    snap = snapshot(task_resources("tasks-fault-abort.yaml"))
    fault = routes(snap, "9080", f"{RATINGS}:9080")["ratings.0"].fault
    assert fault is not None and (fault.abort_status, fault.abort_percent, fault.delay) == (500, 100.0, 0.0)


def test_default_retry_policy_round_trip() -> None:
    snap = snapshot(task_resources("tasks-request-routing.yaml"))
    route = routes(snap, "9080", f"{REVIEWS}:9080")["reviews.0"]
    assert route.retry == model.RetryPolicy(
        retry_on=DEFAULT_RETRY, num_retries=2, retriable_status=frozenset({503}), other_host=True,
        host_selection_attempts=5)
    assert not route.grpc_timeout  # an HTTP/1.1 port: grpc-timeout is a gRPC (HTTP/2) matter
    assert route.timeout == 0.0


def test_request_timeout_round_trip() -> None:
    snap = snapshot(task_resources("tasks-request-timeouts.yaml"))
    route = routes(snap, "9080", f"{REVIEWS}:9080")["reviews.0"]
    assert route.timeout == 0.5 and not route.grpc_timeout


def test_circuit_breaking_round_trip() -> None:
    snap = snapshot(task_resources("tasks-circuit-breaking.yaml"))
    c = snap.clusters[f"outbound|8000||{HTTPBIN}"]
    assert c.limits == model.CircuitBreakers(max_connections=1, max_pending_requests=1, max_requests=4294967295,
                                             max_retries=3, budget_percent=20.0, min_retry_concurrency=3)
    assert c.max_requests_per_connection == 1
    assert c.outlier == model.OutlierDetection(consecutive_5xx=1, enforcing_5xx=100, interval=1.0,
                                               base_ejection_time=180.0, max_ejection_percent=100)
    assert not c.http2 and not c.use_downstream_protocol


def test_mirroring_round_trip() -> None:
    snap = snapshot(task_resources("tasks-mirroring.yaml"))
    route = routes(snap, "8000", f"{HTTPBIN}:8000")["httpbin.0"]
    assert route.mirrors == (model.Mirror(f"outbound|8000|v2|{HTTPBIN}", 100.0),)
    assert route.mirrors[0].cluster in snap.clusters


@pytest.mark.parametrize("intercept", [False, True])
def test_tcp_weighted_round_trip(intercept: bool) -> None:
    snap = snapshot(task_resources("tasks-tcp-traffic-shifting.yaml", intercept=intercept))
    name = "0.0.0.0_9000" if intercept else "127.0.0.1_9000"
    (listener,) = [ln for ln in snap.listeners if ln.name == name]
    assert listener.tcp is not None
    v1, v2 = f"outbound|9000|v1|{TCP_ECHO}", f"outbound|9000|v2|{TCP_ECHO}"
    assert listener.tcp.weighted == (model.WeightedCluster(v1, 80), model.WeightedCluster(v2, 20))
    assert (listener.tcp.cluster, listener.tcp.total_weight) == (v1, 100)
    assert listener.tcp.idle_timeout == 3600.0  # keywords, not positions: nothing shifted


def test_default_limits_are_istios_unlimited_with_a_retry_budget() -> None:
    snap = snapshot(task_resources("tasks-request-routing.yaml", intercept=True))
    for name in (f"outbound|9080|v1|{REVIEWS}", "PassthroughCluster", "InboundPassthroughCluster"):
        limits = snap.clusters[name].limits
        assert (limits.max_connections, limits.max_requests, limits.budget_percent) == (4294967295, 4294967295, 20.0)


# --- round trips of every field -----------------------------------------------------------


@pytest.mark.parametrize("intercept", [False, True])
def test_everything_compiles(intercept: bool) -> None:
    everything(intercept)


def test_redirect_direct_response_and_header_mutation() -> None:
    r = routes(everything(), "9080", f"{REVIEWS}:9080")
    assert r["reviews.moved"].redirect == model.Redirect(status=302, host=b"reviews.example", path=b"/new")
    assert r["reviews.moved"].headers[0] == model.HeaderMatch(b":method", model.StringKind.EXACT, b"GET")
    teapot = r["reviews.teapot"]
    assert teapot.direct == model.DirectResponse(418, b"short and stout")
    assert teapot.mutation == model.HeaderMutation(response_add=(model.HeaderOp(b"x-teapot", b"yes"),))


def test_matches_rewrite_and_retries() -> None:
    api = routes(everything(), "9080", f"{REVIEWS}:9080")["reviews.api"]
    assert not api.case_sensitive
    assert api.path_regex is not None and api.path_regex.fullmatch(b"/API/V2/items")
    assert [(h.name, h.invert) for h in api.headers] == [(b":authority", False), (b":scheme", False),
                                                         (b"x-skip", True)]
    assert api.query == (model.QueryMatch(b"debug", model.StringKind.PRESENT),
                         model.QueryMatch(b"user", model.StringKind.PREFIX, b"a"))
    assert api.rewrite is not None and api.rewrite.host == b"reviews.internal"
    assert api.rewrite.regex is not None
    assert api.rewrite.regex.sub(api.rewrite.substitution, b"/api/v2/items") == b"/items?version=v2"
    assert api.mutation == model.HeaderMutation(
        request_add=(model.HeaderOp(b"x-a", b"1"), model.HeaderOp(b"x-b", b"2", append=True)),
        request_remove=(b"x-c",), response_add=(model.HeaderOp(b"x-d", b"4"),), response_remove=(b"x-powered-by",))
    assert api.retry is not None
    assert api.retry.retry_on == model.RETRY_5XX | model.RETRY_RESET | model.RETRY_STATUS
    assert (api.retry.num_retries, api.retry.per_try_timeout, api.retry.retriable_status) == (3, 1.0, {409})
    assert api.timeout == 5.0


def test_mirrors_grpc_abort_prefix_rewrite_and_no_retries() -> None:
    snap = everything()
    shadow = routes(snap, "9080", f"{REVIEWS}:9080")["reviews.shadow"]
    assert shadow.retry is None
    assert shadow.rewrite == model.Rewrite(prefix=b"/")
    assert shadow.mirrors == (model.Mirror(f"outbound|9080|v2|{REVIEWS}", 25.0),)
    assert shadow.fault == model.Fault(abort_grpc=14, abort_percent=10.0)
    grpc = routes(snap, "7070", f"{GRPC}:7070")["grpc.0"]
    assert grpc.fault == model.Fault(delay=0.1, delay_percent=5.0)
    assert grpc.retry is not None and grpc.retry.retry_on == (
        model.RETRY_GRPC_UNAVAILABLE | model.RETRY_GRPC_CANCELLED | model.RETRY_GRPC_DEADLINE)


def test_clusters_limits_outlier_http2_and_alpn() -> None:
    snap = everything()
    v1 = snap.clusters[f"outbound|9080|v1|{REVIEWS}"]
    assert v1.limits == model.CircuitBreakers(max_connections=100, max_pending_requests=4294967295,
                                              max_requests=50, max_retries=4)
    assert v1.connect_timeout == 2.0 and v1.idle_timeout == 30.0
    assert v1.http2 and v1.h2_max_concurrent_streams == 10
    assert v1.outlier == model.OutlierDetection(consecutive_5xx=0, enforcing_5xx=0, consecutive_gateway=3,
                                                enforcing_gateway=100, interval=5.0)
    assert all(ep.tls is not None and ep.tls.alpn == ("h2",) for ep in v1.endpoints)
    v2 = snap.clusters[f"outbound|9080|v2|{REVIEWS}"]
    assert v2.use_downstream_protocol and not v2.http2 and v2.max_requests_per_connection == 10
    assert all(ep.tls is not None and ep.tls.alpn == ("h2", "http/1.1") for ep in v2.endpoints)
    grpc = snap.clusters[f"outbound|7070||{GRPC}"]
    assert grpc.http2 and all(ep.tls is not None and ep.tls.alpn == ("h2",) for ep in grpc.endpoints)
    assert snap.clusters["inbound|7071||"].http2 and not snap.clusters["inbound|9090||"].http2


def test_inbound_tls_alpn_and_fault_filter_on_outbound_http_listeners() -> None:
    snap = everything()
    for listener in snap.listeners:
        if listener.direction is model.Direction.INBOUND and listener.tls is not None:
            assert listener.tls.alpn == ("h2", "http/1.1")
        if listener.http is not None:
            assert listener.http.codec == "AUTO"


# --- the compiler's own checks ------------------------------------------------------------


def _table(**route: object) -> route_pb2.RouteConfiguration:
    table = route_pb2.RouteConfiguration(name="t")
    vh = table.virtual_hosts.add(name="vh", domains=["a"])
    vh.routes.add(name="r", match=rc.RouteMatch(prefix="/"), route=rc.RouteAction(cluster="c"), **route)
    return table


def _refused(table: route_pb2.RouteConfiguration, field: str, message: str = "") -> None:
    with pytest.raises(InvalidResource) as e:
        compile_route_config(table)
    assert e.value.field == field, e.value
    assert re.search(message, str(e.value)), e.value


def test_unknown_retry_on_name_is_refused() -> None:
    table = _table()
    table.virtual_hosts[0].routes[0].route.retry_policy.retry_on = "5xx,envoy-ratelimited"
    _refused(table, "virtual_hosts[0].routes[0].route.retry_policy.retry_on", "'envoy-ratelimited' is not supported")


def test_retry_defaults_when_the_policy_is_bare() -> None:
    table = _table()
    table.virtual_hosts[0].routes[0].route.retry_policy.retry_on = "gateway-error"
    table.virtual_hosts[0].routes[0].route.retry_policy.retry_back_off.base_interval.FromMilliseconds(100)
    (route,) = compile_route_config(table).virtual_hosts[0].routes
    assert route.retry == model.RetryPolicy(model.RETRY_GATEWAY, num_retries=1, backoff_base=0.1, backoff_max=1.0)


def test_pseudo_headers_other_than_method_authority_scheme_are_refused() -> None:
    table = _table()
    table.virtual_hosts[0].routes[0].match.headers.add(name=":path", string_match={"exact": "/"})
    _refused(table, "virtual_hosts[0].routes[0].match.headers[0].name")


def test_header_append_actions_the_model_cannot_hold_are_refused() -> None:
    table = _table()
    table.virtual_hosts[0].request_headers_to_add.add(
        header=base_pb2.HeaderValue(key="x", value="1"), append_action=base_pb2.HeaderValueOption.ADD_IF_ABSENT)
    _refused(table, "virtual_hosts[0].request_headers_to_add[0].append_action", "ADD_IF_ABSENT is not supported")


def test_virtual_host_header_mutation_is_merged_after_the_routes() -> None:
    table = _table()
    vh = table.virtual_hosts[0]
    vh.request_headers_to_add.add(header=base_pb2.HeaderValue(key="X-Vh", value="v"))
    vh.routes[0].request_headers_to_add.add(header=base_pb2.HeaderValue(key="x-r", value="r"),
                                            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
    vh.response_headers_to_remove.append("server")
    (route,) = compile_route_config(table).virtual_hosts[0].routes
    assert route.mutation == model.HeaderMutation(
        request_add=(model.HeaderOp(b"x-r", b"r"), model.HeaderOp(b"x-vh", b"v", append=True)),
        response_remove=(b"server",))


def test_prefix_rewrite_on_a_regex_route_is_refused() -> None:
    table = _table()
    route = table.virtual_hosts[0].routes[0]
    route.match.safe_regex.regex = "/a.*"
    route.route.prefix_rewrite = "/b"
    _refused(table, "virtual_hosts[0].routes[0].route.prefix_rewrite", "regex_rewrite")


def test_bad_regex_rewrite_substitution_is_refused() -> None:
    table = _table()
    rr = table.virtual_hosts[0].routes[0].route.regex_rewrite
    rr.pattern.regex = "^/(a)$"
    rr.substitution = "/\\3"
    _refused(table, "virtual_hosts[0].routes[0].route.regex_rewrite.substitution", "group")


def test_re2_substitution_becomes_a_python_template() -> None:
    assert python_substitution(b"/\\2/x\\10\\\\y\\0") == b"/\\g<2>/x\\g<1>0\\\\y\\g<0>"
    assert re.sub(b"(a)(b)", python_substitution(b"\\2\\1\\\\"), b"ab") == b"ba\\"


def test_fault_config_for_another_filter_is_refused() -> None:
    table = _table()
    table.virtual_hosts[0].routes[0].typed_per_filter_config["envoy.filters.http.cors"].Pack(fault_pb2.HTTPFault())
    _refused(table, 'virtual_hosts[0].routes[0].typed_per_filter_config["envoy.filters.http.cors"]')


def test_header_delay_is_refused() -> None:
    table = _table()
    config = fault_pb2.HTTPFault()
    config.delay.header_delay.SetInParent()
    table.virtual_hosts[0].routes[0].typed_per_filter_config["envoy.filters.http.fault"].Pack(config)
    _refused(table, 'virtual_hosts[0].routes[0].typed_per_filter_config["envoy.filters.http.fault"].delay.header_delay')


def test_routes_with_faults_need_the_fault_filter() -> None:
    resources = task_resources("tasks-fault-delay.yaml")
    listeners = list(resources.listeners)
    for listener in listeners:
        for chain in listener.filter_chains:
            manager = hcm.HttpConnectionManager()
            if chain.filters[-1].typed_config.Unpack(manager) and manager.HasField("rds"):
                del manager.http_filters[0]  # the fault filter
                chain.filters[-1].typed_config.Pack(manager)
    with pytest.raises(InvalidResource, match=r"envoy\.filters\.http\.fault") as e:
        compile_snapshot(XdsResources(listeners, list(resources.routes), list(resources.clusters),
                                      list(resources.endpoints)))
    assert e.value.field.endswith("typed_config.http_filters")


def _cluster(**fields: object) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name="c", type=cluster_pb2.Cluster.STATIC, **fields)
    return c


def _cluster_refused(c: cluster_pb2.Cluster, field: str, message: str = "") -> None:
    with pytest.raises(InvalidResource) as e:
        compile_snapshot(XdsResources(clusters=[c]))
    assert (e.value.type_name, e.value.field) == ("Cluster", field), e.value
    assert re.search(message, str(e.value)), e.value


def test_outlier_detection_needs_success_rate_off() -> None:
    c = _cluster()
    c.outlier_detection.consecutive_5xx.value = 3
    _cluster_refused(c, "outlier_detection.enforcing_success_rate", "must be 0")
    c.outlier_detection.enforcing_success_rate.value = 0
    c.outlier_detection.success_rate_minimum_hosts.value = 3
    _cluster_refused(c, "outlier_detection.success_rate_minimum_hosts")


def test_panic_threshold_other_than_zero_is_refused() -> None:
    c = _cluster()
    c.common_lb_config.healthy_panic_threshold.value = 50
    _cluster_refused(c, "common_lb_config.healthy_panic_threshold")


def test_protocol_options_compile_and_unknown_ones_are_refused() -> None:
    options = hpo.HttpProtocolOptions()
    options.explicit_http_config.http2_protocol_options.max_concurrent_streams.value = 7
    options.common_http_protocol_options.idle_timeout.seconds = 9
    c = _cluster()
    c.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Pack(options)
    compiled = compile_snapshot(XdsResources(clusters=[c])).clusters["c"]
    assert (compiled.http2, compiled.h2_max_concurrent_streams, compiled.idle_timeout) == (True, 7, 9.0)
    options.explicit_http_config.http2_protocol_options.allow_connect = True
    c.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Pack(options)
    _cluster_refused(c, 'typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]'
                        ".explicit_http_config.http2_protocol_options.allow_connect")
    auto = hpo.HttpProtocolOptions()
    auto.auto_config.SetInParent()
    c.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Pack(auto)
    _cluster_refused(c, 'typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]'
                        ".auto_config")


def test_hcm_http2_codec_and_options() -> None:
    resources = task_resources("tasks-request-routing.yaml")
    listeners = list(resources.listeners)
    (listener,) = [ln for ln in listeners if ln.name == "127.0.0.1_9080"]
    manager = hcm.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    manager.codec_type = hcm.HttpConnectionManager.HTTP2
    manager.http2_protocol_options.max_concurrent_streams.value = 50
    manager.http2_protocol_options.initial_stream_window_size.value = 1 << 16
    listener.filter_chains[0].filters[0].typed_config.Pack(manager)
    snap = compile_snapshot(XdsResources(listeners, list(resources.routes), list(resources.clusters),
                                         list(resources.endpoints)))
    (compiled,) = [ln for ln in snap.listeners if ln.name == "127.0.0.1_9080"]
    assert compiled.http is not None
    assert (compiled.http.codec, compiled.http.h2_max_concurrent_streams) == ("HTTP2", 50)
    assert compiled.http.h2_initial_stream_window == 1 << 16
    manager.http2_protocol_options.initial_stream_window_size.value = 10
    listener.filter_chains[0].filters[0].typed_config.Pack(manager)
    with pytest.raises(InvalidResource, match="initial_stream_window_size"):
        compile_snapshot(XdsResources(listeners, list(resources.routes), list(resources.clusters),
                                      list(resources.endpoints)))
