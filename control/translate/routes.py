"""VirtualService (and the default route) -> RouteConfiguration, one per HTTP egress port.

Owns: virtual host naming and domains, the translation of HTTP matches,
destinations, weights and timeouts into Envoy routes, and the inbound
route table used inline by ingress listeners. It must not decide which
hosts a node sees (`scope.py`) or build clusters (`clusters.py`); it reports
which (host, port) pairs its routes reference so clusters can cover them.

Rules:
- RouteConfiguration name is the port ("9080"); the egress listeners on that
  port share it, and their visible hosts are merged.
- One VirtualHost per visible host with that port, named "host:port". Its
  domains are the host and "host:port", plus the Kubernetes short forms of a
  "a.b.svc.<domain>" host ("a.b", "a.b.svc", and "a" when the node is in
  namespace b) and the ServiceEntry's single IPv4 `addresses` (as Istio adds
  a service's VIPs), each with and without ":port". A domain already used by
  another virtual host of the table is not repeated (Envoy rejects that);
  full host names are claimed before short forms.
- With a VirtualService: one route per http[] entry and match[] entry, in
  order; nothing after them (as in Istio, a request no rule matches gets 404).
  Without one (or if it has only tcp routes): a single "/" prefix route to
  outbound|port||host. A route with no VirtualService timeout gets timeout 0s
  (disabled), as Istio sets it: Envoy's own default would be 15 s.
- Traffic management (`routes_traffic.py`): a match with sourceLabels,
  sourceNamespace or port is left out of the tables of proxies (and ports)
  it does not apply to; an http[] entry all of whose matches are left out is
  left out. Redirect and directResponse entries get Route.redirect /
  direct_response instead of a route action. Every route action (the default
  route too, not the inbound one) carries Istio's retry policy unless the
  VirtualService sets `retries`, and max_stream_duration for gRPC. Mirror
  destinations are referenced like route destinations, so their clusters
  exist.
- A route whose destination cluster has a DestinationRule consistentHash
  (for its subset and port) carries the matching RouteAction.hash_policy: Envoy
  keeps the hash key on the route. A weighted route whose clusters have
  different hash keys takes the first destination's one (Envoy has one list
  of hash policies per route).
"""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from google.protobuf import wrappers_pb2

from control.translate.errors import Problem
from control.translate.model import (
    HashSource,
    HttpMatch,
    HttpRoute,
    LoadBalancer,
    MatchKind,
    Protocol,
    StringMatch,
    VirtualService,
)
from control.translate.protos import duration
from control.translate.routes_traffic import (
    add_match_extras,
    apply_action_extras,
    apply_route_extras,
    default_retry_policy,
    direct_response_action,
    grpc_timeout,
    mirror_policy,
    redirect_action,
)
from control.translate.scope import Scope, cluster_name

Reference = tuple[str, int]  # (host, port) a route or listener sends traffic to


def http_egress_ports(scope: Scope) -> list[int]:
    if scope.sidecar is None:
        return []
    return sorted(
        {
            egress.port.number
            for egress in scope.sidecar.egress
            if egress.port is not None and egress.port.protocol is Protocol.HTTP
        }
    )


def build_routes(
    scope: Scope, problems: list[Problem]
) -> tuple[list[route_pb2.RouteConfiguration], set[Reference]]:
    """The outbound route tables of the node, and the (host, port) pairs they reference."""
    tables: list[route_pb2.RouteConfiguration] = []
    referenced: set[Reference] = set()
    sidecar = scope.sidecar
    for port in http_egress_ports(scope):
        hosts: set[str] = set()
        for egress in sidecar.egress if sidecar is not None else ():
            if egress.port is not None and egress.port.number == port:
                hosts.update(scope.visible(egress))
        with_port = [h for h in sorted(hosts) if scope.services[h].port(port) is not None]
        tables.append(route_table(scope, port, with_port, referenced, problems))
    return tables, referenced


def route_table(
    scope: Scope, port: int, hosts: list[str], referenced: set[Reference], problems: list[Problem]
) -> route_pb2.RouteConfiguration:
    """The table named `port` with one virtual host per host (each of which has `port`)."""
    claimed: set[str] = set()
    for host in hosts:
        claimed.update((host, f"{host}:{port}"))
    virtual_hosts = []
    for host in hosts:
        domains = [host, f"{host}:{port}"]
        for short in [*short_names(host, scope.node.namespace), *_ips(scope.registry[host].addresses)]:
            for domain in (short, f"{short}:{port}"):
                if domain not in claimed:
                    claimed.add(domain)
                    domains.append(domain)
        vs = scope.routes.get(host)
        service_port = scope.registry[host].port(port)
        grpc = service_port is not None and service_port.h2
        if vs is None or not vs.http:  # a VirtualService with only tcp routes leaves HTTP alone
            cluster = cluster_name("outbound", port, "", host)
            referenced.add((host, port))
            action = rc.RouteAction(cluster=cluster, timeout=duration(0))
            if grpc:
                grpc_timeout(action, 0)
            action.retry_policy.CopyFrom(default_retry_policy())
            _hash(action, [_lb(scope, host, "", port)])
            routes = [rc.Route(name="default", match=rc.RouteMatch(prefix="/"), route=action)]
        else:
            routes = list(_vs_routes(scope, vs, port, referenced, problems, grpc))
        virtual_hosts.append(rc.VirtualHost(name=f"{host}:{port}", domains=domains, routes=routes))
    return route_pb2.RouteConfiguration(name=str(port), virtual_hosts=virtual_hosts)


def _ips(addresses: Iterable[str]) -> list[str]:
    """The single addresses among a ServiceEntry's `addresses` (a client may use one as Host)."""
    return [a.removesuffix("/32") for a in addresses if "/" not in a.removesuffix("/32") and ":" not in a]


def short_names(host: str, namespace: str) -> list[str]:
    """Kubernetes-style short forms of "a.b.svc.<domain>" as seen from `namespace`."""
    parts = host.split(".")
    if len(parts) < 4 or parts[2] != "svc" or not all(parts):
        return []
    name, owner = parts[0], parts[1]
    forms = [f"{name}.{owner}", f"{name}.{owner}.svc"]
    return [name, *forms] if owner == namespace else forms


def _vs_routes(
    scope: Scope, vs: VirtualService, port: int, referenced: set[Reference], problems: list[Problem],
    grpc: bool,
) -> Iterable[rc.Route]:
    node = scope.node
    for index, http in enumerate(vs.http):
        matches = [m for m in http.matches if m.applies(node.namespace, node.labels, port)]
        if http.matches and not matches:
            continue  # every match is for other proxies or another port
        action: rc.RouteAction | None = None
        if http.destinations:
            action = _action(scope, vs, http, port, referenced, problems)
            if action is None:
                continue
        name = f"{vs.meta.name}.{http.name or index}"
        for match in matches or (HttpMatch(),):
            route = rc.Route(name=name, match=route_match(match))
            if action is not None:
                route.route.CopyFrom(action)
                apply_action_extras(route.route, http, match, grpc)
            elif http.redirect is not None:
                route.redirect.CopyFrom(redirect_action(http.redirect))
            elif http.direct_response is not None:
                route.direct_response.CopyFrom(direct_response_action(http.direct_response))
            apply_route_extras(route, http)
            yield route


def _action(
    scope: Scope,
    vs: VirtualService,
    http: HttpRoute,
    port: int,
    referenced: set[Reference],
    problems: list[Problem],
) -> rc.RouteAction | None:
    # Istio drops zero-weight destinations when others remain.
    chosen = [d for d in http.destinations if d.weight > 0] or list(http.destinations[:1])
    targets: list[tuple[str, int]] = []
    balancers: list[LoadBalancer | None] = []
    for dest in chosen:
        found = scope.destination(vs, dest, port, problems)
        if found is None:
            return None
        name, reference = found
        referenced.add(reference)
        targets.append((name, dest.weight))
        balancers.append(_lb(scope, dest.host, dest.subset, reference[1]))
    action = rc.RouteAction()
    if len(targets) == 1:
        action.cluster = targets[0][0]
    else:
        action.weighted_clusters.CopyFrom(
            rc.WeightedCluster(
                clusters=[
                    rc.WeightedCluster.ClusterWeight(
                        name=name, weight=wrappers_pb2.UInt32Value(value=weight)
                    )
                    for name, weight in targets
                ]
            )
        )
    action.timeout.CopyFrom(duration(http.timeout if http.timeout is not None else 0))
    _hash(action, balancers)
    for mirror in http.mirrors:
        found = scope.destination(vs, mirror.destination, port, problems)
        if found is None:
            return None
        referenced.add(found[1])
        action.request_mirror_policies.append(mirror_policy(found[0], mirror.percent))
    return action


def _lb(scope: Scope, host: str, subset: str, port: int) -> LoadBalancer | None:
    rule = scope.rules.get(host)
    return rule.lb_for(subset, port) if rule is not None else None


def _hash(action: rc.RouteAction, balancers: list[LoadBalancer | None]) -> None:
    """The first consistentHash among the route's destinations, as the route's hash_policy."""
    lb = next((b for b in balancers if b is not None and b.hash_source is not None), None)
    if lb is None:
        return
    policy = rc.RouteAction.HashPolicy()
    if lb.hash_source is HashSource.HEADER:
        policy.header.header_name = lb.name
    elif lb.hash_source is HashSource.COOKIE:
        policy.cookie.name = lb.name
        if lb.cookie_path:
            policy.cookie.path = lb.cookie_path
        if lb.cookie_ttl is not None:
            policy.cookie.ttl.CopyFrom(duration(lb.cookie_ttl))
    elif lb.hash_source is HashSource.SOURCE_IP:
        policy.connection_properties.source_ip = True
    else:
        policy.query_parameter.name = lb.name
    action.hash_policy.append(policy)


def string_matcher(match: StringMatch) -> string_pb2.StringMatcher:
    if match.kind is MatchKind.EXACT:
        return string_pb2.StringMatcher(exact=match.value)
    if match.kind is MatchKind.PREFIX:
        return string_pb2.StringMatcher(prefix=match.value)
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=match.value))


def route_match(match: HttpMatch) -> rc.RouteMatch:
    result = rc.RouteMatch()
    uri = match.uri
    if uri is None or uri.kind is MatchKind.PREFIX:
        result.prefix = "/" if uri is None else uri.value
    elif uri.kind is MatchKind.EXACT:
        result.path = uri.value
    else:
        result.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex=uri.value))
    for name, header in match.headers:
        result.headers.append(rc.HeaderMatcher(name=name, string_match=string_matcher(header)))
    add_match_extras(result, match)
    return result


def inbound_route_table(port: int) -> route_pb2.RouteConfiguration:
    """The inline table of an HTTP ingress listener: everything to the app, no timeout (as Istio)."""
    cluster = cluster_name("inbound", port, "", "")
    action = rc.RouteAction(cluster=cluster, timeout=duration(0))
    route = rc.Route(name="default", match=rc.RouteMatch(prefix="/"), route=action)
    return route_pb2.RouteConfiguration(
        name=cluster,
        virtual_hosts=[rc.VirtualHost(name=f"inbound|http|{port}", domains=["*"], routes=[route])],
    )
