"""Interception mode: the listeners of a node whose TCP traffic iptables redirects to it.

Used instead of the Sidecar's explicit ingress listeners when the node says
it is intercepted (`NodeInfo.intercept`: `pillion proxy --intercept`, or
Istio's node metadata INTERCEPTION_MODE=REDIRECT). Owns the capture
listeners, the route tables of the ports they serve, and the catch-all
clusters; `clusters.py` still builds the outbound clusters, `security.py` the
inbound TLS chains, `routes.py` the virtual hosts.

Shapes (Envoy xDS, named as Istio names them):

- "virtualOutbound", 0.0.0.0:15001, `use_original_dst: true`: hands each
  connection to the listener of its original destination; its own chain
  (no match) is the fallback: tcp_proxy to "PassthroughCluster" (ORIGINAL_DST,
  CLUSTER_PROVIDED) when outboundTrafficPolicy is ALLOW_ANY (the default),
  to "BlackHoleCluster" (STATIC, no endpoints) for REGISTRY_ONLY; the node's
  Sidecar's policy wins over MeshConfig's, as in Istio.
- One outbound listener per service port the node sees, `bind_to_port:
  false`, OUTBOUND: HTTP ports "0.0.0.0_<port>" (HCM, RDS "<port>", the
  fault filter before the router); TCP
  ports "<address>_<port>" for each ServiceEntry address (exact ip:port wins
  in the hand-off), or "0.0.0.0_<port>" for the one TCP service without
  addresses that uses the port; tcp_proxy to its cluster (a VirtualService tcp
  route's destination or weighted destinations, else "outbound|port||host"). A port that one listener
  cannot serve unambiguously is a problem naming the ServiceEntry.
- Route table "<port>" of every HTTP port: the visible hosts with that port
  (as for explicit listeners), plus a last virtual host "allow_any" (domains
  "*") to PassthroughCluster (ALLOW_ANY) or "block_all" to BlackHoleCluster
  (REGISTRY_ONLY: 503 here; Istio answers 502).
- "virtualInbound", 0.0.0.0:15006, INBOUND, listener filters original_dst
  (+ tls_inspector): per inbound port P, the chains of the port's
  PeerAuthentication mode (`security.inbound_chains`) with
  filter_chain_match.destination_port P, to "inbound|P||" (STATIC
  127.0.0.1:<app port>: the app listens on localhost; Istio's own shape is an
  ORIGINAL_DST cluster to the pod IP); then the same chains without a port
  for everything else, to "InboundPassthroughCluster" (ORIGINAL_DST), in the
  workload's mode. Each chain carries the node's AuthorizationPolicy /
  RequestAuthentication filters exactly as an explicit ingress listener does
  (`authz.NodeAuthz`; network RBAC on the passthrough too). Not
  `use_original_dst`: that would hand inbound connections to the outbound
  "0.0.0.0_<port>" listener of the same port.
- Inbound ports: the Sidecar's ingress entries (port -> defaultEndpoint's
  port), else every port of the ServiceEntries in the node's namespace whose
  workloadSelector selects the node (the port's targetPort, else its number;
  the app on that port).

Explicit egress listeners of the Sidecar (bound, e.g. 127.0.0.1) are kept
beside them; a capture listener is left out where one of those already sits
on the same address and port (the hand-off then reaches the explicit one).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import wrappers_pb2

from control.translate.authz import NodeAuthz
from control.translate.clusters import inbound_cluster, original_dst_cluster
from control.translate.errors import Problem
from control.translate.listeners import (
    HCM_FILTER,
    TCP_PROXY_FILTER,
    build_listeners,
    http_connection_manager,
    outbound_http_connection_manager,
    tcp_proxy,
    tcp_route_proxy,
)
from control.translate.model import Protocol, ServiceEntry
from control.translate.protos import (
    CONNECT_TIMEOUT_SECONDS,
    duration,
    network_filter,
    packed,
    socket_address,
)
from control.translate.routes import Reference, http_egress_ports, inbound_route_table, route_table
from control.translate.scope import Scope, cluster_name
from control.translate.security import inbound_chains, tls_inspector

VIRTUAL_OUTBOUND = "virtualOutbound"
VIRTUAL_INBOUND = "virtualInbound"
OUTBOUND_CAPTURE_PORT = 15001
INBOUND_CAPTURE_PORT = 15006
PASSTHROUGH_CLUSTER = "PassthroughCluster"
BLACKHOLE_CLUSTER = "BlackHoleCluster"
INBOUND_PASSTHROUGH_CLUSTER = "InboundPassthroughCluster"
ORIGINAL_DST_FILTER = "envoy.filters.listener.original_dst"
WILDCARD = "0.0.0.0"


@dataclass
class Captured:
    """What interception adds to a node's resources (beside `clusters.py`'s outbound clusters)."""

    listeners: list[listener_pb2.Listener] = field(default_factory=list)
    routes: list[route_pb2.RouteConfiguration] = field(default_factory=list)
    clusters: list[cluster_pb2.Cluster] = field(default_factory=list)
    referenced: set[Reference] = field(default_factory=set)  # (host, port) pairs to build clusters for


def build_capture(scope: Scope, problems: list[Problem]) -> Captured:
    out = Captured()
    explicit, out.referenced = build_listeners(scope, problems, ingress=False)
    out.listeners.extend(explicit)
    taken = {(ln.address.socket_address.address, ln.address.socket_address.port_value) for ln in explicit}
    fallback = _fallback_cluster(scope)
    http_ports = _outbound(scope, problems, taken, out)
    out.routes.extend(_route_tables(scope, problems, http_ports, fallback, out.referenced))
    out.listeners.append(_virtual_outbound(fallback))
    out.listeners.append(_virtual_inbound(scope, problems, out))
    out.clusters.append(original_dst_cluster(PASSTHROUGH_CLUSTER))
    out.clusters.append(original_dst_cluster(INBOUND_PASSTHROUGH_CLUSTER))
    out.clusters.append(
        cluster_pb2.Cluster(
            name=BLACKHOLE_CLUSTER,
            type=cluster_pb2.Cluster.STATIC,
            connect_timeout=duration(CONNECT_TIMEOUT_SECONDS),
        )
    )
    return out


def _fallback_cluster(scope: Scope) -> str:
    """Where traffic to a destination the mesh does not know goes: outboundTrafficPolicy of the
    node's Sidecar, else of the MeshConfig (ALLOW_ANY by default)."""
    mode = (scope.sidecar.outbound_mode if scope.sidecar is not None else "") or scope.config.mesh.outbound_mode
    return BLACKHOLE_CLUSTER if mode == "REGISTRY_ONLY" else PASSTHROUGH_CLUSTER


def _unbound(name: str, address: str, port: int, direction: int, chain: lc.Filter) -> listener_pb2.Listener:
    return listener_pb2.Listener(
        name=name,
        address=socket_address(address, port),
        traffic_direction=direction,  # type: ignore[arg-type]
        bind_to_port=wrappers_pb2.BoolValue(value=False),
        filter_chains=[lc.FilterChain(filters=[chain])],
    )


# --- outbound -------------------------------------------------------------------


def _single_ips(se: ServiceEntry) -> list[str] | None:
    """The ServiceEntry's addresses as single IPv4s; None if one is a range (not supported here)."""
    ips = []
    for address in se.addresses:
        net = ipaddress.ip_network(address, strict=False)
        if net.num_addresses != 1 or net.version != 4:
            return None
        ips.append(str(net.network_address))
    return ips


def _outbound(scope: Scope, problems: list[Problem], taken: set[tuple[str, int]], out: Captured) -> list[int]:
    """The per-port outbound listeners; returns the HTTP ports (which need route tables)."""
    http: dict[int, str] = {}  # port -> first host that makes it HTTP
    tcp_wild: dict[int, list[str]] = {}  # port -> TCP hosts without addresses
    for host in scope.cluster_hosts():
        se = scope.registry[host]
        ips = _single_ips(se)
        if ips is None and any(port.protocol is not Protocol.HTTP for port in se.ports):
            problems.append(Problem(se.meta.file, se.meta.resource, "spec.addresses",
                                    "with interception, TCP services support only single IPv4 addresses "
                                    "(no ranges or IPv6 yet)"))
        for port in se.ports:
            if port.protocol is Protocol.HTTP:
                http.setdefault(port.number, host)
                continue
            if ips is None:
                continue
            if not ips:
                tcp_wild.setdefault(port.number, []).append(host)
                continue
            target = _tcp_cluster(scope, host, port.number, problems, out.referenced)
            for ip in ips:
                if (ip, port.number) not in taken:
                    taken.add((ip, port.number))
                    out.listeners.append(_unbound(f"{ip}_{port.number}", ip, port.number, base_pb2.OUTBOUND,
                                                  network_filter(TCP_PROXY_FILTER, target)))
    for number in sorted(http):
        if (WILDCARD, number) in taken:
            continue
        taken.add((WILDCARD, number))
        config = outbound_http_connection_manager(f"outbound_0.0.0.0_{number}", str(number))
        out.listeners.append(_unbound(f"{WILDCARD}_{number}", WILDCARD, number, base_pb2.OUTBOUND,
                                      network_filter(HCM_FILTER, config)))
    for number, hosts in sorted(tcp_wild.items()):
        clash = [*([http[number]] if number in http else []), *hosts]
        if len(clash) > 1:
            se = scope.registry[hosts[0]]
            problems.append(Problem(
                se.meta.file, se.meta.resource, "spec.addresses",
                f"with interception, port {number} is used by several services the node sees "
                f"({', '.join(clash)}) and TCP traffic to it cannot be told apart: give the TCP "
                "service addresses"))
            continue
        if (WILDCARD, number) in taken:
            continue
        taken.add((WILDCARD, number))
        target = _tcp_cluster(scope, hosts[0], number, problems, out.referenced)
        out.listeners.append(_unbound(f"{WILDCARD}_{number}", WILDCARD, number, base_pb2.OUTBOUND,
                                      network_filter(TCP_PROXY_FILTER, target)))
    return sorted(http)


def _tcp_cluster(scope: Scope, host: str, port: int, problems: list[Problem],
                 referenced: set[Reference]) -> tcp_proxy_pb2.TcpProxy:
    """A VirtualService tcp route's tcp_proxy for (host, port), else one to the host's own cluster."""
    vs = scope.routes.get(host)
    for route in vs.tcp if vs is not None else ():
        if not route.ports or port in route.ports:
            assert vs is not None
            found = tcp_route_proxy(scope, vs, route, port, problems, referenced)
            if found is None:
                break
            return found
    referenced.add((host, port))
    return tcp_proxy(cluster_name("outbound", port, "", host))


def _route_tables(scope: Scope, problems: list[Problem], ports: Iterable[int], fallback: str,
                  referenced: set[Reference]) -> list[route_pb2.RouteConfiguration]:
    """One table per HTTP port (captured or explicit egress), each ending in the catch-all host."""
    hosts: dict[int, set[str]] = {port: set() for port in ports}
    for port in hosts:
        hosts[port].update(h for h in scope.cluster_hosts() if _has_http(scope.registry[h], port))
    sidecar = scope.sidecar
    for port in http_egress_ports(scope):
        seen = hosts.setdefault(port, set())
        for egress in sidecar.egress if sidecar is not None else ():
            if egress.port is not None and egress.port.number == port:
                seen.update(h for h in scope.visible(egress) if scope.services[h].port(port) is not None)
    tables = []
    for port, names in sorted(hosts.items()):
        table = route_table(scope, port, sorted(names), referenced, problems)
        catch_all = "allow_any" if fallback == PASSTHROUGH_CLUSTER else "block_all"
        table.virtual_hosts.append(
            rc.VirtualHost(
                name=catch_all,
                domains=["*"],
                routes=[rc.Route(name=catch_all, match=rc.RouteMatch(prefix="/"),
                                 route=rc.RouteAction(cluster=fallback, timeout=duration(0)))],
            )
        )
        tables.append(table)
    return tables


def _has_http(se: ServiceEntry, number: int) -> bool:
    port = se.port(number)
    return port is not None and port.protocol is Protocol.HTTP


def _virtual_outbound(fallback: str) -> listener_pb2.Listener:
    return listener_pb2.Listener(
        name=VIRTUAL_OUTBOUND,
        address=socket_address(WILDCARD, OUTBOUND_CAPTURE_PORT),
        traffic_direction=base_pb2.OUTBOUND,
        use_original_dst=wrappers_pb2.BoolValue(value=True),
        filter_chains=[
            lc.FilterChain(name=fallback, filters=[network_filter(TCP_PROXY_FILTER, tcp_proxy(fallback))])
        ],
    )


# --- inbound --------------------------------------------------------------------


def inbound_ports(scope: Scope, problems: list[Problem]) -> dict[int, tuple[Protocol, int, bool]]:
    """Inbound port -> (protocol, the app's port on 127.0.0.1, whether the app speaks HTTP/2)."""
    sidecar = scope.sidecar
    if sidecar is not None and sidecar.ingress:
        return {i.port.number: (i.port.protocol, i.endpoint_port, i.port.h2) for i in sidecar.ingress}
    node = scope.node
    found: dict[int, tuple[Protocol, int, bool]] = {}
    owners: dict[int, ServiceEntry] = {}
    for se in scope.config.service_entries:
        selector = se.workload_selector
        if se.meta.namespace != node.namespace or selector is None:
            continue
        if not all(node.labels.get(k) == v for k, v in selector.items()):
            continue
        for port in se.ports:
            number = port.target_port or port.number
            known = found.get(number)
            if known is not None and known[0] is not port.protocol:
                problems.append(Problem(
                    se.meta.file, se.meta.resource, "spec.ports",
                    f"port {number} of this workload is {port.protocol.value} here and "
                    f"{known[0].value} in {owners[number].meta.resource}"))
                continue
            found[number] = (port.protocol, number, port.h2)
            owners.setdefault(number, se)
    return found


def _virtual_inbound(scope: Scope, problems: list[Problem], out: Captured) -> listener_pb2.Listener:
    trust_domain = scope.config.mesh.trust_domain
    authz = NodeAuthz(scope.config, scope.node)  # the same filters as an explicit ingress listener's
    network_authz = authz.network_filters()
    chains: list[lc.FilterChain] = []
    from_sidecar = scope.sidecar is not None and bool(scope.sidecar.ingress)
    for port, (protocol, app_port, h2) in sorted(inbound_ports(scope, problems).items()):
        cluster = cluster_name("inbound", port, "", "")
        terminal: list[lc.Filter]
        if protocol is Protocol.HTTP:
            config = http_connection_manager(f"inbound_0.0.0.0_{port}", route_config=inbound_route_table(port),
                                             filters=authz.http_filters())
            terminal = [network_filter(HCM_FILTER, config)]
        else:
            terminal = [*network_authz, network_filter(TCP_PROXY_FILTER, tcp_proxy(cluster))]
        _, port_chains = inbound_chains(scope.inbound_mode(port), terminal, protocol, trust_domain)
        for chain in port_chains:
            chain.name = f"{cluster}{chain.name or 'plaintext'}"
            chain.filter_chain_match.destination_port.CopyFrom(wrappers_pb2.UInt32Value(value=port))
        chains.extend(port_chains)
        if not from_sidecar:  # the Sidecar's ingress clusters come from clusters.py
            out.clusters.append(inbound_cluster(port, app_port, protocol, h2))
    passthrough = [*network_authz, network_filter(TCP_PROXY_FILTER, tcp_proxy(INBOUND_PASSTHROUGH_CLUSTER))]
    # Port 0: no port-level PeerAuthentication applies, the workload's (or namespace's, mesh's) mode does.
    _, rest = inbound_chains(scope.inbound_mode(0), passthrough, Protocol.TCP, trust_domain)
    for chain in rest:
        chain.name = f"{INBOUND_PASSTHROUGH_CLUSTER}|{chain.name or 'plaintext'}"
    chains.extend(rest)
    filters = [lc.ListenerFilter(name=ORIGINAL_DST_FILTER, typed_config=packed(original_dst_pb2.OriginalDst()))]
    if any(chain.filter_chain_match.transport_protocol for chain in chains):
        filters.append(tls_inspector())
    return listener_pb2.Listener(
        name=VIRTUAL_INBOUND,
        address=socket_address(WILDCARD, INBOUND_CAPTURE_PORT),
        traffic_direction=base_pb2.INBOUND,
        listener_filters=filters,
        filter_chains=chains,
    )
