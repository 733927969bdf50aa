"""xDS v3 resources (protobuf) -> the immutable runtime ``model.Snapshot``.

The one place the data plane reads protobuf (with ``xds_client`` and
``standalone`` that deliver it). Everything the hot path needs is resolved
here: defaults filled in, regexes compiled, header names lowercased, host
lookups turned into dicts.

Strategy: accept exactly the subset of each message this proxy implements and
refuse the rest. Every message is checked with ``_only(msg, allowed)``, which
lists the fields actually set; a set field we do not implement raises
``InvalidResource(type, name, field, ...)``, which the xDS client sends back
as the NACK's error_detail. Silently ignoring a field a control plane set
(a retry policy, an RBAC filter) would make the proxy behave differently from
what the operator sees in the config, so it is never done.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf.message import Message

from proxy import model
from proxy.compile_accesslog import access_log  # [accesslog]
from proxy.compile_base import _Ctx, _only, _regex, _seconds, _socket_address  # noqa: F401 (re-exported for tests)
from proxy.compile_capture import (
    CAPTURE_MATCH_FIELDS,
    capture_listener,
    is_capture,
    listener_filters,
    served,
)
from proxy.compile_cluster import CLUSTER_FIELDS, cluster_extras
from proxy.compile_rbac import NETWORK_RBAC_TYPE, http_policy, network_rbac
from proxy.compile_routes import _hash_policy, _route, compile_route_config  # noqa: F401 (re-exported for tests)
from proxy.compile_tls import (
    TLS_INSPECTOR,
    downstream_tls,
    endpoint_match_labels,
    pick_socket,
    secret,
    socket_matches,
    upstream_tls,
)
from proxy.compile_tracing import with_tracing  # [tracing]
from proxy.compile_traffic import FAULT_TYPE, has_fault
from proxy.errors import InvalidResource

HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
TCP_PROXY_TYPE = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"

ENVOY_DEFAULT_CONNECT_TIMEOUT = 5.0
ENVOY_DEFAULT_IDLE_TIMEOUT = 3600.0


@dataclass
class XdsResources:
    """The four resource types a snapshot is built from (any order inside each)."""

    listeners: Sequence[listener_pb2.Listener] = ()
    routes: Sequence[route_pb2.RouteConfiguration] = ()
    clusters: Sequence[cluster_pb2.Cluster] = ()
    endpoints: Sequence[endpoint_pb2.ClusterLoadAssignment] = ()
    secrets: Sequence[secret_pb2.Secret] = ()
    extra: dict[str, object] = field(default_factory=dict)

    def version(self) -> str:
        """A content hash: equal resources give equal versions."""
        h = hashlib.sha256()
        for group in (self.listeners, self.routes, self.clusters, self.endpoints, self.secrets):
            for msg in sorted(group, key=_name_of):
                h.update(msg.SerializeToString(deterministic=True))
            h.update(b"|")
        return h.hexdigest()[:16]


def _name_of(msg: Message) -> str:
    return getattr(msg, "name", "") or getattr(msg, "cluster_name", "")



# ---------------------------------------------------------------- listeners

def _ads_source(ctx: _Ctx, cs: config_source_pb2.ConfigSource, path: str) -> None:
    if cs.WhichOneof("config_source_specifier") != "ads":
        raise ctx.fail(path, "only ads config sources are supported")


class _ChainCtx(_Ctx):
    """One filter chain of a capture listener, compiled as a listener of its own: ``name`` is
    the chain's (so inline route tables get distinct names), errors name the real listener."""

    __slots__ = ("resource",)

    def __init__(self, resource: str, name: str) -> None:
        super().__init__("Listener", name)
        self.resource = resource

    def fail(self, path: str, message: str) -> InvalidResource:
        return InvalidResource(self.type_name, self.resource, path, message)


def _listener(ln: listener_pb2.Listener, routes: dict[str, model.RouteTable]) -> model.Listener:
    ctx = _Ctx("Listener", ln.name)
    _only(ctx, ln, {"name", "address", "filter_chains", "traffic_direction", "stat_prefix", "listener_filters",
                    "use_original_dst", "bind_to_port"}, "")
    if not ln.name:
        raise ctx.fail("name", "required")
    address, port = _socket_address(ctx, ln.address, "address")
    direction = model.Direction.INBOUND if ln.traffic_direction == 1 else model.Direction.OUTBOUND
    bind = ln.bind_to_port.value if ln.HasField("bind_to_port") else True
    if is_capture(ln):
        def chain_listener(name: str, chain_port: int, chains: list[tuple[int, Any]], inspector: bool) -> model.Listener:
            return _chain_listener(_ChainCtx(ln.name, name), address, chain_port, direction, chains, inspector,
                                   routes, bind=False, match_fields=CAPTURE_MATCH_FIELDS)

        return capture_listener(ctx, ln, address, port, direction, bind, chain_listener)
    inspector = listener_filters(ctx, ln, (TLS_INSPECTOR,)) == {TLS_INSPECTOR}
    return _chain_listener(ctx, address, port, direction, list(enumerate(ln.filter_chains)), inspector, routes,
                           bind=bind, match_fields=("transport_protocol",))


def _chain_listener(ctx: _Ctx, address: str, port: int, direction: model.Direction,
                    chains: list[tuple[int, Any]], inspector: bool, routes: dict[str, model.RouteTable], *,
                    bind: bool, match_fields: tuple[str, ...]) -> model.Listener:
    """A listener from its filter chains (all of a listener's, or one destination port's of a capture one)."""
    tls, plaintext = _chains(ctx, chains, inspector, match_fields)
    first, fc = chains[0]
    f = fc.filters[-1]  # [authz] the terminal filter; network RBAC filters may precede it (_chains)
    fpath = f"filter_chains[{first}].filters[{len(fc.filters) - 1}]"
    _only(ctx, f, {"name", "typed_config"}, fpath)
    type_url = f.typed_config.type_url
    if len(fc.filters) > 1 and type_url != TCP_PROXY_TYPE:
        raise ctx.fail(f"filter_chains[{first}].filters", "network RBAC is supported before tcp_proxy only")
    if type_url == HCM_TYPE:
        hcm = hcm_pb2.HttpConnectionManager()
        f.typed_config.Unpack(hcm)
        http = _hcm(ctx, hcm, routes, f"{fpath}.typed_config")
        http = with_tracing(ctx, hcm, http, direction, f"{fpath}.typed_config")  # [tracing]
        return model.Listener(ctx.name, address, port, direction, model.Protocol.HTTP, http=http,
                              tls=tls, plaintext=plaintext, bind_to_port=bind)
    if type_url == TCP_PROXY_TYPE:
        tp = tcp_proxy_pb2.TcpProxy()
        f.typed_config.Unpack(tp)
        p = f"{fpath}.typed_config"
        _only(ctx, tp, {"stat_prefix", "cluster", "weighted_clusters", "idle_timeout", "access_log"}, p)
        cluster, weighted, total = _tcp_clusters(ctx, tp, p)  # [traffic] weighted_clusters
        idle = _seconds(tp.idle_timeout) if tp.HasField("idle_timeout") else ENVOY_DEFAULT_IDLE_TIMEOUT
        rbac = network_rbac(ctx, fc.filters[:-1], f"filter_chains[{first}].filters")  # [authz]
        tcp = model.TcpSettings(tp.stat_prefix, cluster, weighted=weighted, total_weight=total, idle_timeout=idle,
                                rbac=rbac, access_log=access_log(ctx, tp.access_log, f"{p}.access_log"))
        return model.Listener(ctx.name, address, port, direction, model.Protocol.TCP, tcp=tcp, tls=tls,
                              plaintext=plaintext, bind_to_port=bind)
    raise ctx.fail(f"{fpath}.typed_config", f"unsupported network filter type {type_url!r}")


def _tcp_clusters(ctx: _Ctx, tp: tcp_proxy_pb2.TcpProxy,
                  path: str) -> tuple[str, tuple[model.WeightedCluster, ...], int]:
    """tcp_proxy's cluster, or its weighted_clusters (zero weights dropped; the first one also as cluster)."""
    if tp.WhichOneof("cluster_specifier") != "weighted_clusters":
        if not tp.cluster:
            raise ctx.fail(f"{path}.cluster", "required (or weighted_clusters)")
        return tp.cluster, (), 0
    wc = tp.weighted_clusters
    _only(ctx, wc, {"clusters"}, f"{path}.weighted_clusters")
    out = []
    for i, c in enumerate(wc.clusters):
        here = f"{path}.weighted_clusters.clusters[{i}]"
        _only(ctx, c, {"name", "weight"}, here)
        if not c.name:
            raise ctx.fail(f"{here}.name", "required")
        if c.weight > 0:
            out.append(model.WeightedCluster(c.name, c.weight))
    if not out:
        raise ctx.fail(f"{path}.weighted_clusters", "at least one cluster needs a positive weight")
    return out[0].name, tuple(out), sum(w.weight for w in out)


def _chains(ctx: _Ctx, chains: list[tuple[int, Any]], inspector: bool,
            match_fields: tuple[str, ...]) -> tuple[model.TlsServer | None, bool]:
    """The filter chains Pillion understands: one plaintext chain; or a TLS chain (STRICT);
    or a TLS chain and a plaintext one told apart by the TLS inspector (PERMISSIVE).
    Every chain must carry the same network filter. ``chains``: (index in the listener, chain)."""
    if not 1 <= len(chains) <= 2:
        raise ctx.fail("filter_chains", "one filter chain, or a TLS and a plaintext one, are supported")
    tls: model.TlsServer | None = None
    plaintext = False
    matched = False
    first = [f.SerializeToString(deterministic=True) for f in chains[0][1].filters]
    for i, fc in chains:
        p = f"filter_chains[{i}]"
        _only(ctx, fc, {"filters", "name", "filter_chain_match", "transport_socket"}, p)
        _only(ctx, fc.filter_chain_match, match_fields, f"{p}.filter_chain_match")
        proto = fc.filter_chain_match.transport_protocol
        matched = matched or bool(proto)
        if not fc.filters or any(f.typed_config.type_url != NETWORK_RBAC_TYPE for f in fc.filters[:-1]):
            raise ctx.fail(f"{p}.filters", "one terminal network filter, after network RBAC filters, is supported")
        if [f.SerializeToString(deterministic=True) for f in fc.filters] != first:
            raise ctx.fail(f"{p}.filters", "every filter chain must carry the same network filter")
        if fc.HasField("transport_socket"):
            if proto not in ("tls", "") or tls is not None:
                raise ctx.fail(f"{p}.filter_chain_match.transport_protocol", "one TLS chain, matching 'tls'")
            tls = downstream_tls(ctx, fc.transport_socket, f"{p}.transport_socket")
        else:
            if proto not in ("raw_buffer", "") or plaintext:
                raise ctx.fail(f"{p}.filter_chain_match.transport_protocol", "one plaintext chain, matching 'raw_buffer'")
            plaintext = True
    if matched and not inspector:
        raise ctx.fail("listener_filters", "matching on transport_protocol needs the TLS inspector listener filter")
    return tls, plaintext


def _hcm(ctx: _Ctx, hcm: hcm_pb2.HttpConnectionManager, routes: dict[str, model.RouteTable], path: str) -> model.HttpSettings:
    _only(ctx, hcm, {
        "stat_prefix", "codec_type", "rds", "route_config", "http_filters", "use_remote_address",
        "generate_request_id", "normalize_path", "max_request_headers_kb", "common_http_protocol_options",
        "upgrade_configs", "xff_num_trusted_hops", "stream_idle_timeout",
        "access_log",  # [accesslog]
        "tracing",  # [tracing] compile_tracing.py
        "http2_protocol_options",  # [http2]
    }, path)
    codec = _CODECS.get(hcm.codec_type)
    if codec is None:
        raise ctx.fail(f"{path}.codec_type", "only AUTO, HTTP1 and HTTP2 are supported")
    for i, uc in enumerate(hcm.upgrade_configs):
        if uc.upgrade_type.lower() != "websocket":
            raise ctx.fail(f"{path}.upgrade_configs[{i}].upgrade_type", "only websocket upgrades are supported")
    # [authz] jwt_authn and RBAC filters before the router (compile_rbac.py); the router has no
    # settings we honour, its presence (last) is what matters.
    policy = http_policy(ctx, hcm.http_filters, f"{path}.http_filters")
    which = hcm.WhichOneof("route_specifier")
    if which == "rds":
        _ads_source(ctx, hcm.rds.config_source, f"{path}.rds.config_source")
        rc_name = hcm.rds.route_config_name
        if not rc_name:
            raise ctx.fail(f"{path}.rds.route_config_name", "required")
    elif which == "route_config":
        rc_name = f"{ctx.name}#inline"
        routes[rc_name] = compile_route_config(hcm.route_config, rc_name)
    else:
        raise ctx.fail(path, "rds or route_config is required")
    # [traffic] routes' faults act only through the HCM's fault filter (Envoy); without it they would be
    # ignored, so refuse. RDS tables are compiled before listeners (a lone listener cannot be checked).
    table = routes.get(rc_name)
    if table is not None and has_fault(table) and all(f.typed_config.type_url != FAULT_TYPE for f in hcm.http_filters):
        raise ctx.fail(f"{path}.http_filters", f"routes of {rc_name!r} inject faults: the HCM needs the "
                                               "envoy.filters.http.fault filter")
    max_kb = hcm.max_request_headers_kb.value if hcm.HasField("max_request_headers_kb") else 60
    idle = ENVOY_DEFAULT_IDLE_TIMEOUT
    max_count = 100
    if hcm.HasField("common_http_protocol_options"):
        cho = hcm.common_http_protocol_options
        _only(ctx, cho, {"idle_timeout", "max_headers_count"}, f"{path}.common_http_protocol_options")
        if cho.HasField("idle_timeout"):
            idle = _seconds(cho.idle_timeout)
        if cho.HasField("max_headers_count"):
            max_count = cho.max_headers_count.value
    gen = hcm.generate_request_id.value if hcm.HasField("generate_request_id") else True
    log = access_log(ctx, hcm.access_log, f"{path}.access_log")  # [accesslog]
    return model.HttpSettings(hcm.stat_prefix, rc_name, max_kb * 1024, max_count, idle, gen, True, policy=policy,
                              access_log=log, codec=codec, **_h2_settings(ctx, hcm, path))  # [accesslog] [http2]


# [http2] HCM codec_type and http2_protocol_options.
_CODECS = {hcm_pb2.HttpConnectionManager.AUTO: "AUTO", hcm_pb2.HttpConnectionManager.HTTP1: "HTTP1",
           hcm_pb2.HttpConnectionManager.HTTP2: "HTTP2"}


def _h2_settings(ctx: _Ctx, hcm: hcm_pb2.HttpConnectionManager, path: str) -> dict[str, Any]:
    if not hcm.HasField("http2_protocol_options"):
        return {}
    h2 = hcm.http2_protocol_options
    p = f"{path}.http2_protocol_options"
    _only(ctx, h2, {"max_concurrent_streams", "initial_stream_window_size", "initial_connection_window_size"}, p)
    out = {}
    for name, field_name, low, high in (
        ("max_concurrent_streams", "h2_max_concurrent_streams", 1, 2**31 - 1),
        ("initial_stream_window_size", "h2_initial_stream_window", 65535, 2**31 - 1),  # Envoy's bounds
        ("initial_connection_window_size", "h2_initial_connection_window", 65535, 2**31 - 1),
    ):
        if h2.HasField(name):
            value = getattr(h2, name).value
            if not low <= value <= high:
                raise ctx.fail(f"{p}.{name}", f"must be in [{low}, {high}]")
            out[field_name] = value
    return out


# ---------------------------------------------------------------- clusters

def _endpoints(ctx: _Ctx, cla: endpoint_pb2.ClusterLoadAssignment, path: str,
               tls: Any = None) -> tuple[model.Endpoint, ...]:
    """``tls``: None, a TlsClient for every endpoint, or a socket-match list chosen per endpoint."""
    _only(ctx, cla, {"cluster_name", "endpoints"}, path)
    out = []
    for i, loc in enumerate(cla.endpoints):
        lp = f"{path}.endpoints[{i}]"
        _only(ctx, loc, {"lb_endpoints", "locality", "load_balancing_weight"}, lp)
        for j, lbe in enumerate(loc.lb_endpoints):
            ep_path = f"{lp}.lb_endpoints[{j}]"
            _only(ctx, lbe, {"endpoint", "load_balancing_weight", "metadata", "health_status"}, ep_path)
            _only(ctx, lbe.endpoint, {"address"}, f"{ep_path}.endpoint")
            if lbe.health_status in (3, 4, 5):  # UNHEALTHY, DRAINING, TIMEOUT
                continue
            host, port = _socket_address(ctx, lbe.endpoint.address, f"{ep_path}.endpoint.address")
            if port == 0:
                raise ctx.fail(f"{ep_path}.endpoint.address.socket_address.port_value", "must be set")
            weight = lbe.load_balancing_weight.value if lbe.HasField("load_balancing_weight") else 1
            labels: tuple[tuple[str, str], ...] = ()
            istio = lbe.metadata.filter_metadata.get("istio") if lbe.HasField("metadata") else None
            if istio is not None and "labels" in istio.fields:
                lab = istio.fields["labels"].struct_value.fields
                labels = tuple(sorted((k, v.string_value) for k, v in lab.items()))
            ep_tls = pick_socket(tls, endpoint_match_labels(lbe)) if isinstance(tls, list) else tls
            out.append(model.Endpoint(host, port, max(1, weight), labels, ep_tls))
    return tuple(out)


def _service_of(name: str) -> tuple[str, model.Direction]:
    parts = name.split("|")
    if len(parts) == 4 and parts[0] == "outbound":
        return parts[3], model.Direction.OUTBOUND
    if len(parts) == 4 and parts[0] == "inbound":
        return parts[3], model.Direction.INBOUND
    return name, model.Direction.OUTBOUND


def _cluster(c: cluster_pb2.Cluster, cla_by_name: dict[str, endpoint_pb2.ClusterLoadAssignment]) -> model.Cluster:
    ctx = _Ctx("Cluster", c.name)
    _only(ctx, c, {"name", "type", "connect_timeout", "lb_policy", "eds_cluster_config", "load_assignment",
                   "least_request_lb_config", "ring_hash_lb_config", "metadata", "alt_stat_name", "transport_socket",
                   "transport_socket_matches", *CLUSTER_FIELDS}, "")
    extras = cluster_extras(ctx, c)  # [traffic] circuit breakers, outlier detection, upstream HTTP protocol
    tls: Any = None
    if c.HasField("transport_socket"):
        if c.transport_socket_matches:
            raise ctx.fail("transport_socket_matches", "use either transport_socket or transport_socket_matches")
        tls = upstream_tls(ctx, c.transport_socket, "transport_socket")
    elif c.transport_socket_matches:
        tls = socket_matches(ctx, c.transport_socket_matches, "transport_socket_matches")
    if not c.name:
        raise ctx.fail("name", "required")
    if c.type == cluster_pb2.Cluster.ORIGINAL_DST:
        if c.lb_policy != cluster_pb2.Cluster.CLUSTER_PROVIDED:
            raise ctx.fail("lb_policy", "ORIGINAL_DST clusters need CLUSTER_PROVIDED")
        timeout = _seconds(c.connect_timeout) if c.HasField("connect_timeout") else ENVOY_DEFAULT_CONNECT_TIMEOUT
        service_name, direction = _service_of(c.name)
        # The original destination has no endpoint metadata: a socket match list gives its catch-all entry.
        dst_tls = pick_socket(tls, {}) if isinstance(tls, list) else tls
        return model.Cluster(c.name, (), timeout, "CLUSTER_PROVIDED", service_name, direction, original_dst=True,
                             original_dst_tls=dst_tls, **extras)
    policy, ring_size = _lb_policy(ctx, c)  # [lb]
    timeout = _seconds(c.connect_timeout) if c.HasField("connect_timeout") else ENVOY_DEFAULT_CONNECT_TIMEOUT
    kind = c.type
    if kind == cluster_pb2.Cluster.STATIC:
        endpoints = _endpoints(ctx, c.load_assignment, "load_assignment", tls)
    elif kind == cluster_pb2.Cluster.EDS:
        if c.HasField("eds_cluster_config"):
            _ads_source(ctx, c.eds_cluster_config.eds_config, "eds_cluster_config.eds_config")
        service = c.eds_cluster_config.service_name or c.name
        cla = cla_by_name.get(service)
        if cla is None:
            endpoints = ()
        else:
            ectx = _Ctx("ClusterLoadAssignment", service)
            endpoints = _endpoints(ectx, cla, "", tls)
    else:
        raise ctx.fail("type", f"{cluster_pb2.Cluster.DiscoveryType.Name(kind)} is not supported (STATIC and EDS are)")
    service_name, direction = _service_of(c.name)
    return model.Cluster(c.name, endpoints, timeout, policy, service_name, direction, ring_size=ring_size, **extras)


# [lb] Cluster.lb_policy and its config; RouteAction.hash_policy.
_LB_POLICIES = ("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "RING_HASH")
ENVOY_DEFAULT_MIN_RING_SIZE = 1024


def _lb_policy(ctx: _Ctx, c: cluster_pb2.Cluster) -> tuple[str, int]:
    name = cluster_pb2.Cluster.LbPolicy.Name(c.lb_policy)
    if name not in _LB_POLICIES:
        raise ctx.fail("lb_policy", f"{name} is not supported yet (ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH are)")
    if c.HasField("least_request_lb_config"):
        if name != "LEAST_REQUEST":
            raise ctx.fail("least_request_lb_config", "only used with lb_policy LEAST_REQUEST")
        lr = c.least_request_lb_config
        _only(ctx, lr, {"choice_count"}, "least_request_lb_config")
        if lr.HasField("choice_count") and lr.choice_count.value != 2:
            raise ctx.fail("least_request_lb_config.choice_count", "only 2 (the default) is supported")
    ring_size = ENVOY_DEFAULT_MIN_RING_SIZE
    if c.HasField("ring_hash_lb_config"):
        if name != "RING_HASH":
            raise ctx.fail("ring_hash_lb_config", "only used with lb_policy RING_HASH")
        rh = c.ring_hash_lb_config
        _only(ctx, rh, {"minimum_ring_size", "maximum_ring_size"}, "ring_hash_lb_config")
        if rh.HasField("minimum_ring_size"):
            ring_size = rh.minimum_ring_size.value
        if rh.HasField("maximum_ring_size"):
            ring_size = min(ring_size, rh.maximum_ring_size.value)
        if ring_size < 1:
            raise ctx.fail("ring_hash_lb_config.minimum_ring_size", "must be positive")
    return name, ring_size


# ---------------------------------------------------------------- snapshot

def validate_resource(msg: Message) -> None:
    """Check one resource on its own (the checks that do not need the others). Raises InvalidResource."""
    if isinstance(msg, listener_pb2.Listener):
        _listener(msg, {})
    elif isinstance(msg, route_pb2.RouteConfiguration):
        if not msg.name:
            raise InvalidResource("RouteConfiguration", "", "name", "required")
        compile_route_config(msg)
    elif isinstance(msg, cluster_pb2.Cluster):
        _cluster(msg, {})
    elif isinstance(msg, secret_pb2.Secret):
        secret(msg)
    elif isinstance(msg, endpoint_pb2.ClusterLoadAssignment):
        if not msg.cluster_name:
            raise InvalidResource("ClusterLoadAssignment", "", "cluster_name", "required")
        _endpoints(_Ctx("ClusterLoadAssignment", msg.cluster_name), msg, "")
    else:
        raise InvalidResource(type(msg).__name__, "", "", "unsupported resource type")


def compile_snapshot(res: XdsResources, version: str | None = None) -> model.Snapshot:
    """Compile a complete set of resources. Raises InvalidResource for the first problem."""
    routes: dict[str, model.RouteTable] = {}
    for rc in res.routes:
        if not rc.name:
            raise InvalidResource("RouteConfiguration", "", "name", "required")
        if rc.name in routes:
            raise InvalidResource("RouteConfiguration", rc.name, "name", "duplicate resource name")
        routes[rc.name] = compile_route_config(rc)
    listeners = []
    seen: set[str] = set()
    binds: dict[tuple[str, int], str] = {}
    for ln in res.listeners:
        if ln.name in seen:
            raise InvalidResource("Listener", ln.name, "name", "duplicate resource name")
        seen.add(ln.name)
        compiled = _listener(ln, routes)
        other = binds.get(compiled.bind_key)
        if other is not None:
            raise InvalidResource("Listener", ln.name, "address", f"same address and port as listener {other!r}")
        binds[compiled.bind_key] = ln.name
        listeners.append(compiled)
    cla_by_name = {cla.cluster_name: cla for cla in res.endpoints}
    clusters: dict[str, model.Cluster] = {}
    for c in res.clusters:
        if c.name in clusters:
            raise InvalidResource("Cluster", c.name, "name", "duplicate resource name")
        clusters[c.name] = _cluster(c, cla_by_name)
    for top in listeners:
        for fpath, ls in served(top):  # a capture listener: each of its chains
            if ls.http is not None and ls.http.route_config_name not in routes:
                raise InvalidResource("Listener", top.name, f"{fpath}.typed_config.rds.route_config_name",
                                      f"route configuration {ls.http.route_config_name!r} was not provided")
            for name in [ls.tcp.cluster, *(w.name for w in ls.tcp.weighted)] if ls.tcp is not None else ():
                if name not in clusters:
                    raise InvalidResource("Listener", top.name, f"{fpath}.typed_config.cluster",
                                          f"cluster {name!r} was not provided")
    secrets: dict[str, model.Secret] = {}
    for sec in res.secrets:
        if sec.name in secrets:
            raise InvalidResource("Secret", sec.name, "name", "duplicate resource name")
        secrets[sec.name] = secret(sec)
    return model.Snapshot(version or res.version(), tuple(listeners), routes, clusters, secrets)


def dump_resources(res: XdsResources, version: str) -> dict[str, object]:
    """An Envoy-shaped /config_dump of the resources a snapshot was built from."""
    from google.protobuf.json_format import MessageToDict

    def d(msg: Message) -> dict[str, object]:
        return MessageToDict(msg, preserving_proto_field_name=True)

    base = "type.googleapis.com/envoy.admin.v3."
    return {"configs": [
        {"@type": base + "ListenersConfigDump", "version_info": version, "dynamic_listeners": [
            {"name": ln.name, "active_state": {"version_info": version, "listener": d(ln)}} for ln in res.listeners]},
        {"@type": base + "ClustersConfigDump", "version_info": version, "dynamic_active_clusters": [
            {"version_info": version, "cluster": d(c)} for c in res.clusters]},
        {"@type": base + "RoutesConfigDump", "dynamic_route_configs": [
            {"version_info": version, "route_config": d(r)} for r in res.routes]},
        {"@type": base + "EndpointsConfigDump", "dynamic_endpoint_configs": [
            {"version_info": version, "endpoint_config": d(e)} for e in res.endpoints]},
        {"@type": base + "SecretsConfigDump", "dynamic_active_secrets": [
            {"name": sec.name, "version_info": version, "secret": _redacted(d(sec))} for sec in res.secrets]},
    ]}


def _redacted(secret_dict: dict[str, Any]) -> dict[str, Any]:
    """Never show a private key (Envoy redacts it the same way)."""
    tc = secret_dict.get("tls_certificate")
    if isinstance(tc, dict) and "private_key" in tc:
        tc["private_key"] = {"inline_bytes": "W3JlZGFjdGVkXQ=="}  # base64 of "[redacted]"
    return secret_dict
