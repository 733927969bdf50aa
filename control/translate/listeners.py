"""The selected Sidecar's ingress and egress entries -> Listeners (explicit mode).

Owns: listener names and addresses, the HTTP connection manager and TCP
proxy filter configs, and which upstream a TCP egress port forwards to. It
must not build route tables (`routes.py`) or clusters (`clusters.py`); like
`routes.py` it reports the (host, port) pairs it references.

Rules:
- Egress "bind_port" (bind default 127.0.0.1), OUTBOUND. HTTP ports use RDS
  with route_config_name = the port, and carry the fault filter (empty; the
  routes carry the faults) before the router, as Istio's outbound HCMs do.
  TCP ports forward to (tcp_proxy weighted_clusters for several weighted
  destinations): the one visible
  VirtualService tcp route that applies to the port (its match lists the
  port, or it has no port match and one of its hosts has the port); else the
  one visible ServiceEntry host with that port. None or several is a
  problem on the Sidecar's egress entry.
- Ingress "bind_port" (bind default 0.0.0.0), INBOUND, to inbound|port||.
  HTTP ports carry their (one-route) table inline and the node's
  jwt_authn/RBAC filters before the router; TCP ports a network RBAC filter
  before tcp_proxy (`authz.py`, when policies apply). The filter chains follow
  the node's PeerAuthentication mode for the port (`security.py`): one
  plaintext chain (DISABLE), a "tls" chain (STRICT), or both (PERMISSIVE).
- An egress entry without a port makes no listener; it only scopes which
  hosts the node sees.
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import wrappers_pb2

from control.translate.authz import NodeAuthz
from control.translate.errors import Problem
from control.translate.model import (
    EgressListener,
    IngressListener,
    Protocol,
    Sidecar,
    TcpRoute,
    VirtualService,
)
from control.translate.protos import ads, network_filter, packed, socket_address
from control.translate.routes import Reference, inbound_route_table
from control.translate.routes_traffic import fault_filter
from control.translate.scope import Scope, cluster_name
from control.translate.security import inbound_chains

HCM_FILTER = "envoy.filters.network.http_connection_manager"
TCP_PROXY_FILTER = "envoy.filters.network.tcp_proxy"
ROUTER_FILTER = "envoy.filters.http.router"


def build_listeners(
    scope: Scope, problems: list[Problem], *, ingress: bool = True
) -> tuple[list[listener_pb2.Listener], set[Reference]]:
    """The node's listeners (none without a Sidecar) and the (host, port) pairs TCP ones forward to.

    `ingress=False`: only the egress ones (with interception, `capture.py` serves the ingress ports).
    """
    sidecar = scope.sidecar
    listeners: list[listener_pb2.Listener] = []
    referenced: set[Reference] = set()
    if sidecar is None:
        return listeners, referenced
    for entry in sidecar.ingress if ingress else ():
        listeners.append(_ingress(scope, entry))
    for egress in sidecar.egress:
        if egress.port is None:
            continue
        port = egress.port.number
        bind = egress.bind or "127.0.0.1"
        if egress.port.protocol is Protocol.HTTP:
            config = outbound_http_connection_manager(f"outbound_{bind}_{port}", str(port))
            chain = network_filter(HCM_FILTER, config)
        else:
            proxy = _tcp_target(scope, sidecar, egress, port, problems, referenced)
            if proxy is None:
                continue
            chain = network_filter(TCP_PROXY_FILTER, proxy)
        listeners.append(_listener(f"{bind}_{port}", bind, port, base_pb2.OUTBOUND, chain))
    return listeners, referenced


def http_connection_manager(
    stat_prefix: str,
    *,
    rds: str = "",
    route_config: route_pb2.RouteConfiguration | None = None,
    filters: Sequence[hcm.HttpFilter] = (),
) -> hcm.HttpConnectionManager:
    """Pillion's HCM: AUTO codec, `filters` then the router, request ids, normalized paths;
    routes by RDS or inline."""
    manager = hcm.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm.HttpConnectionManager.AUTO,
        http_filters=[
            *filters,
            hcm.HttpFilter(name=ROUTER_FILTER, typed_config=packed(router_pb2.Router())),
        ],
        use_remote_address=wrappers_pb2.BoolValue(value=False),
        generate_request_id=wrappers_pb2.BoolValue(value=True),
        normalize_path=wrappers_pb2.BoolValue(value=True),
    )
    if route_config is not None:
        manager.route_config.CopyFrom(route_config)
    else:
        manager.rds.CopyFrom(hcm.Rds(config_source=ads(), route_config_name=rds))
    return manager


def outbound_http_connection_manager(stat_prefix: str, rds: str) -> hcm.HttpConnectionManager:
    """An outbound HTTP port's HCM: RDS, and the fault filter before the router."""
    return http_connection_manager(stat_prefix, rds=rds, filters=[fault_filter()])


def tcp_proxy(cluster: str) -> tcp_proxy_pb2.TcpProxy:
    return tcp_proxy_pb2.TcpProxy(stat_prefix=cluster, cluster=cluster)


def tcp_route_proxy(
    scope: Scope,
    vs: VirtualService,
    route: TcpRoute,
    port: int,
    problems: list[Problem],
    referenced: set[Reference],
) -> tcp_proxy_pb2.TcpProxy | None:
    """The tcp_proxy of a VirtualService tcp route on `port`: one cluster, or weighted ones
    (zero-weight destinations dropped when others remain, as for HTTP)."""
    chosen = [d for d in route.destinations if d.weight > 0] or list(route.destinations[:1])
    targets: list[tuple[str, int]] = []
    for dest in chosen:
        found = scope.destination(vs, dest, port, problems)
        if found is None:
            return None
        referenced.add(found[1])
        targets.append((found[0], dest.weight))
    if len(targets) == 1:
        return tcp_proxy(targets[0][0])
    weighted = tcp_proxy_pb2.TcpProxy.WeightedCluster(
        clusters=[
            tcp_proxy_pb2.TcpProxy.WeightedCluster.ClusterWeight(name=name, weight=weight)
            for name, weight in targets
        ]
    )
    return tcp_proxy_pb2.TcpProxy(stat_prefix=targets[0][0], weighted_clusters=weighted)


def _listener(
    name: str, address: str, port: int, direction: int, chain: listener_components_pb2.Filter
) -> listener_pb2.Listener:
    return listener_pb2.Listener(
        name=name,
        address=socket_address(address, port),
        traffic_direction=direction,  # type: ignore[arg-type]
        filter_chains=[listener_components_pb2.FilterChain(filters=[chain])],
    )


def _ingress(scope: Scope, ingress: IngressListener) -> listener_pb2.Listener:
    port = ingress.port.number
    bind = ingress.bind or "0.0.0.0"
    protocol = ingress.port.protocol
    authz = NodeAuthz(scope.config, scope.node)  # AuthorizationPolicy, RequestAuthentication
    chain: list[listener_components_pb2.Filter]
    if protocol is Protocol.HTTP:
        config = http_connection_manager(
            f"inbound_0.0.0.0_{port}",
            route_config=inbound_route_table(port),
            filters=authz.http_filters(),
        )
        chain = [network_filter(HCM_FILTER, config)]
    else:
        proxy = network_filter(TCP_PROXY_FILTER, tcp_proxy(cluster_name("inbound", port, "", "")))
        chain = [*authz.network_filters(), proxy]
    mode = scope.inbound_mode(port)
    filters, chains = inbound_chains(mode, chain, protocol, scope.config.mesh.trust_domain)
    return listener_pb2.Listener(
        name=f"{bind}_{port}",
        address=socket_address(bind, port),
        traffic_direction=base_pb2.INBOUND,
        listener_filters=filters,
        filter_chains=chains,
    )


def _tcp_target(
    scope: Scope,
    sidecar: Sidecar,
    egress: EgressListener,
    port: int,
    problems: list[Problem],
    referenced: set[Reference],
) -> tcp_proxy_pb2.TcpProxy | None:
    visible = scope.visible(egress)
    candidates: list[tuple[VirtualService, TcpRoute]] = []
    services = {(vs.meta.namespace, vs.meta.name): vs for vs in scope.routes.values()}
    for _, vs in sorted(services.items()):
        seen_hosts = [h for h in vs.hosts if h in visible]
        for route in vs.tcp:
            if route.ports:
                applies = port in route.ports and bool(seen_hosts)
            else:
                applies = any(scope.registry[h].port(port) is not None for h in seen_hosts)
            if applies:
                candidates.append((vs, route))
                break
    where = f"{egress.path}.hosts"
    if len(candidates) == 1:
        vs, route = candidates[0]
        return tcp_route_proxy(scope, vs, route, port, problems, referenced)
    if candidates:
        names = ", ".join(f"{vs.meta.resource} {route.path}" for vs, route in candidates)
        message = f"several VirtualService tcp routes apply to port {port}: {names}"
    else:
        hosts = [h for h in visible if scope.services[h].port(port) is not None]
        if len(hosts) == 1:
            referenced.add((hosts[0], port))
            return tcp_proxy(cluster_name("outbound", port, "", hosts[0]))
        if hosts:
            message = (
                f"port {port} is ambiguous: visible hosts {', '.join(hosts)} all have it; "
                "narrow hosts or add a VirtualService tcp route"
            )
        else:
            message = f"no visible ServiceEntry host has port {port}"
    problems.append(Problem(sidecar.meta.file, sidecar.meta.resource, where, message))
    return None
