"""Builders for the traffic kinds: DestinationRule, Sidecar, VirtualService.

Owns: the meaning of their fields beyond shape: host and subset references
(resolved against the ServiceEntries already built), subset uniqueness,
DestinationRule client TLS settings (whole, per subset, per port),
Sidecar listener conflicts, default endpoints and egress host patterns, HTTP
matches, route weights and timeouts, TCP routes (one destination or
several weighted ones). The http[] traffic-management fields are in
`traffic_http.py`, connectionPool and outlierDetection in
`traffic_policy.py`. Reports through `Build`; returns None for a document
with any problem. No files, no xDS.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from control.translate.fields import WILDCARD_BINDS, ip, keep, protocol, regex, speaks_h2
from control.translate.model import (
    NO_POLICY,
    ClientTls,
    ConnectionPool,
    Destination,
    DestinationRule,
    EgressListener,
    HashSource,
    HttpMatch,
    HttpRoute,
    IngressListener,
    LoadBalancer,
    MatchKind,
    Outlier,
    Sidecar,
    SidecarPort,
    StringMatch,
    Subset,
    TcpRoute,
    TlsMode,
    TrafficPolicy,
    VirtualService,
    frozen_map,
)
from control.translate.schema import child, parse_duration
from control.translate.traffic_http import match_extras, route_extras
from control.translate.traffic_policy import connection_pool, outlier_detection

if TYPE_CHECKING:
    from control.translate.istio import Build, Entry, Session


def destination_rule(s: Session, e: Entry, b: Build) -> DestinationRule | None:
    host = s.resolve(e.spec["host"], e.namespace, "spec.host", b)
    subsets: list[Subset] = []
    for i, raw in enumerate(e.spec.get("subsets", [])):
        path = f"spec.subsets[{i}]"
        if any(subset.name == raw["name"] for subset in subsets):
            b(f"{path}.name", f"subset {raw['name']!r} is defined twice")
        policy = _traffic_policy(s, host, raw.get("trafficPolicy", {}), f"{path}.trafficPolicy", b)
        subsets.append(Subset(raw["name"], frozen_map(raw.get("labels")), policy))
    policy = _traffic_policy(s, host, e.spec.get("trafficPolicy", {}), "spec.trafficPolicy", b)
    if host is not None and host in s.rules:
        other = s.rules[host].meta
        b(
            "spec.host",
            f"host {host} is already configured by {other.resource} in {other.file}; "
            "merging DestinationRules is not supported yet",
        )
    if host is None or b.failed:
        if host is not None:
            s.broken_rule_hosts.add(host)
        return None
    rule = DestinationRule(
        e.meta(), host, tuple(subsets), tuple(e.spec.get("exportTo", [])), policy
    )
    s.rules[host] = rule
    return rule


def _traffic_policy(
    s: Session, host: str | None, raw: dict[str, Any], path: str, b: Build
) -> TrafficPolicy:
    """The tls, loadBalancer, connectionPool and outlierDetection of a TrafficPolicy, whole and per port."""
    tls = _client_tls(raw["tls"], f"{path}.tls", b) if "tls" in raw else None
    lb = _load_balancer(raw["loadBalancer"], f"{path}.loadBalancer", b) if "loadBalancer" in raw else None
    pool = connection_pool(raw["connectionPool"], f"{path}.connectionPool", b) if "connectionPool" in raw else None
    outlier = (
        outlier_detection(raw["outlierDetection"], f"{path}.outlierDetection", b)
        if "outlierDetection" in raw
        else None
    )
    ports: dict[int, ClientTls] = {}
    port_lb: dict[int, LoadBalancer] = {}
    port_pool: dict[int, ConnectionPool] = {}
    port_outlier: dict[int, Outlier] = {}
    seen: set[int] = set()
    for i, setting in enumerate(raw.get("portLevelSettings", [])):
        here = f"{path}.portLevelSettings[{i}]"
        number = setting["port"]["number"]
        if number in seen:
            b(f"{here}.port.number", f"port {number} is listed twice")
        elif host is not None and s.services[host].port(number) is None:
            b(f"{here}.port.number", f"host {host} has no port {number}")
        seen.add(number)
        if "tls" in setting:
            ports[number] = _client_tls(setting["tls"], f"{here}.tls", b)
        if "loadBalancer" in setting:
            port_lb[number] = _load_balancer(setting["loadBalancer"], f"{here}.loadBalancer", b)
        if "connectionPool" in setting:
            port_pool[number] = connection_pool(setting["connectionPool"], f"{here}.connectionPool", b)
        if "outlierDetection" in setting:
            port_outlier[number] = outlier_detection(
                setting["outlierDetection"], f"{here}.outlierDetection", b
            )
    policy = TrafficPolicy(
        tls, frozen_map(ports), lb, frozen_map(port_lb),
        pool, frozen_map(port_pool), outlier, frozen_map(port_outlier),
    )  # fmt: skip
    return NO_POLICY if policy == NO_POLICY else policy


def _load_balancer(raw: dict[str, Any], path: str, b: Build) -> LoadBalancer:
    """LoadBalancerSettings (shape already checked: `simple` or `consistentHash`)."""
    if "consistentHash" not in raw:
        simple = raw.get("simple", "ROUND_ROBIN")
        # Istio: UNSPECIFIED is its default (round robin here), LEAST_CONN the old name of LEAST_REQUEST.
        return LoadBalancer({"UNSPECIFIED": "ROUND_ROBIN", "LEAST_CONN": "LEAST_REQUEST"}.get(simple, simple))
    ch = raw["consistentHash"]
    ring = ch.get("ringHash", {}).get("minimumRingSize", ch.get("minimumRingSize"))
    source = next(s for s in HashSource if s.value in ch)
    cookie = ch.get("httpCookie", {})
    ttl = parse_duration(cookie["ttl"]) if "ttl" in cookie else None
    name = cookie.get("name", "") if source is HashSource.COOKIE else str(ch.get(source.value, ""))
    if source is HashSource.SOURCE_IP:
        name = ""
        if ch["useSourceIp"] is not True:
            b(f"{path}.consistentHash.useSourceIp", "must be true (or use another hash key)")
    elif not name:
        b(f"{path}.consistentHash.{source.value}", "a name is required")
    if ring is not None and ring < 1:
        b(f"{path}.consistentHash.minimumRingSize", "must be positive")
    return LoadBalancer("RING_HASH", source, name, cookie.get("path", ""), ttl, ring)


_FILES = ("clientCertificate", "privateKey", "caCertificates")


def _client_tls(raw: dict[str, Any], path: str, b: Build) -> ClientTls:
    """ClientTLSSettings, refusing settings the mode would ignore or cannot work without."""
    mode = TlsMode(raw.get("mode", "DISABLE"))
    skip = bool(raw.get("insecureSkipVerify", False))
    if mode is TlsMode.DISABLE:
        for name in sorted(set(raw) - {"mode"}):
            b(f"{path}.{name}", "only used with mode SIMPLE, MUTUAL or ISTIO_MUTUAL")
    elif mode is TlsMode.ISTIO_MUTUAL:
        for name in (n for n in _FILES if n in raw):
            b(
                f"{path}.{name}",
                "ISTIO_MUTUAL uses the mesh's certificates; use mode MUTUAL for certificate files",
            )
        if skip:
            b(f"{path}.insecureSkipVerify", "not allowed with ISTIO_MUTUAL")
    else:
        if mode is TlsMode.SIMPLE:
            for name in ("clientCertificate", "privateKey"):
                if name in raw:
                    b(f"{path}.{name}", "only used with mode MUTUAL")
        else:
            for name in ("clientCertificate", "privateKey"):
                if not raw.get(name):
                    b(f"{path}.{name}", "MUTUAL TLS needs clientCertificate and privateKey")
        if skip:
            for name in ("caCertificates", "subjectAltNames"):
                if name in raw:
                    b(
                        f"{path}.{name}",
                        "insecureSkipVerify turns this check off; set one or the other",
                    )
        elif not raw.get("caCertificates"):
            b(
                f"{path}.caCertificates",
                f"{mode.value} TLS needs caCertificates (no system trust store is used)",
            )
    for j, name in enumerate(raw.get("subjectAltNames", [])):
        if not name:
            b(f"{path}.subjectAltNames[{j}]", "must not be empty")
    return ClientTls(
        mode=mode,
        path=path,
        sni=raw.get("sni", ""),
        subject_alt_names=tuple(raw.get("subjectAltNames", [])),
        ca_certificates=raw.get("caCertificates", ""),
        client_certificate=raw.get("clientCertificate", ""),
        private_key=raw.get("privateKey", ""),
        insecure_skip_verify=skip,
    )


# --- Sidecar ----------------------------------------------------------------------


def _sidecar_port(raw: dict[str, Any], path: str, b: Build) -> SidecarPort | None:
    found = protocol(raw, path, b)
    if found is None:
        return None
    return SidecarPort(
        raw["number"], found, raw.get("name", ""), raw.get("targetPort"), speaks_h2(raw)
    )


def _default_endpoint(raw: dict[str, Any], path: str, b: Build) -> int:
    """The app's port on 127.0.0.1 from `defaultEndpoint` (default: the port's targetPort or number)."""
    value = raw.get("defaultEndpoint")
    if value is None:
        return int(raw["port"].get("targetPort") or raw["port"]["number"])
    if value.startswith("unix://"):
        b(path, "unix domain socket endpoints are not supported yet")
        return 0
    host, _, port = value.rpartition(":")
    if host not in ("127.0.0.1", "0.0.0.0") or not port.isdigit() or not 1 <= int(port) <= 65535:
        b(path, f"{value!r} must be 127.0.0.1:PORT or 0.0.0.0:PORT")
        return 0
    return int(port)


def _egress_host(value: str, path: str, b: Build) -> tuple[str, str] | None:
    namespace, slash, host = value.partition("/")
    if not slash or not namespace or not host:
        b(path, f"{value!r} must be namespace/host, such as ./* or */*")
        return None
    if "*" in host and not (host == "*" or (host.startswith("*.") and "*" not in host[2:])):
        b(path, f"{value!r}: a host pattern is *, *.suffix or a host name")
        return None
    return namespace, host


def sidecar(s: Session, e: Entry, b: Build) -> Sidecar | None:
    labels = e.spec.get("workloadSelector", {}).get("labels")
    selector = frozen_map(labels) if labels else None
    taken: list[tuple[str, int, str]] = []  # (address, port, field path) of each listener

    def claim(address: str, port: SidecarPort | None, path: str) -> None:
        if port is None:
            return
        for other_address, other_port, other_path in taken:
            overlap = address == other_address or {address, other_address} & WILDCARD_BINDS
            if other_port == port.number and overlap:
                b(
                    f"{path}.port.number",
                    f"{address}:{port.number} conflicts with {other_path} ({other_address}:{other_port})",
                )
                return
        taken.append((address, port.number, path))

    ingress: list[IngressListener] = []
    for i, raw in enumerate(e.spec.get("ingress", [])):
        path = f"spec.ingress[{i}]"
        port = _sidecar_port(raw["port"], f"{path}.port", b)
        bind = raw.get("bind", "")
        if bind:
            ip(bind, f"{path}.bind", b)
        if any(other.port.number == raw["port"]["number"] for other in ingress):
            b(f"{path}.port.number", f"ingress port {raw['port']['number']} is listed twice")
        endpoint = _default_endpoint(raw, f"{path}.defaultEndpoint", b)
        claim(bind or "0.0.0.0", port, path)
        if port is not None:
            ingress.append(IngressListener(port, bind, endpoint, path))
    egress: list[EgressListener] = []
    for i, raw in enumerate(e.spec.get("egress", [])):
        path = f"spec.egress[{i}]"
        port = _sidecar_port(raw["port"], f"{path}.port", b) if "port" in raw else None
        bind = raw.get("bind", "")
        if bind:
            ip(bind, f"{path}.bind", b)
            if "port" not in raw:
                b(f"{path}.bind", "bind needs a port")
        if not raw["hosts"]:
            b(f"{path}.hosts", "must list at least one namespace/host")
        hosts = [_egress_host(h, f"{path}.hosts[{j}]", b) for j, h in enumerate(raw["hosts"])]
        claim(bind or "127.0.0.1", port, path)
        egress.append(EgressListener(port, bind, tuple(h for h in hosts if h is not None), path))
    if selector is None:
        other = s.fallback_sidecars.get(e.namespace)
        if other is not None:
            b(
                "spec.workloadSelector",
                f"{other.meta.resource} already applies to every workload in namespace "
                f"{e.namespace}; only one Sidecar without workloadSelector is allowed per namespace",
            )
    if b.failed:
        return None
    mode = e.spec.get("outboundTrafficPolicy", {}).get("mode", "")
    result = Sidecar(e.meta(), selector, tuple(ingress), tuple(egress), mode)
    if selector is None:
        s.fallback_sidecars[e.namespace] = result
    return result


# --- VirtualService -------------------------------------------------------------


def _string_match(raw: dict[str, Any], path: str, b: Build) -> StringMatch:
    kind = next(kind for kind in MatchKind if kind.value in raw)
    if kind is MatchKind.REGEX:
        regex(raw["regex"], f"{path}.regex", b)
    return StringMatch(kind, raw[kind.value])


def _http_match(raw: dict[str, Any], path: str, b: Build) -> HttpMatch:
    uri = _string_match(raw["uri"], f"{path}.uri", b) if "uri" in raw else None
    headers: list[tuple[str, StringMatch]] = []
    for name, match in raw.get("headers", {}).items():
        here = child(f"{path}.headers", name)
        if name != name.lower():
            b(here, "header names must be lower case")
        headers.append((name, _string_match(match, here, b)))
    extras = match_extras(raw, path, b, _string_match)
    return HttpMatch(raw.get("name", ""), uri, tuple(headers), **extras)


def _destination(
    s: Session, e: Entry, b: Build, raw: dict[str, Any], path: str, weight: int
) -> Destination | None:
    host = s.resolve(raw["host"], e.namespace, f"{path}.host", b)
    if host is None:
        return None
    subset: str = raw.get("subset", "")
    port: int | None = raw.get("port", {}).get("number")
    if port is not None and s.services[host].port(port) is None:
        b(f"{path}.port.number", f"host {host} has no port {port}")
    rule = s.rules.get(host)
    if subset and (rule is None or all(known.name != subset for known in rule.subsets)):
        if not s.complete or host in s.broken_rule_hosts or raw["host"] in s.broken_rule_hosts:
            b.fail_quietly()
        else:
            b(f"{path}.subset", f"no DestinationRule for host {host} defines subset {subset!r}")
    return Destination(host, subset, port, weight, path)


def _destinations(
    s: Session, e: Entry, b: Build, routes: list[dict[str, Any]], path: str
) -> list[Destination]:
    """route[] of an http or tcp entry: at least one destination; several need weights."""
    destinations: list[Destination] = []
    for j, dest in enumerate(routes):
        here = f"{path}[{j}].destination"
        keep(destinations, _destination(s, e, b, dest["destination"], here, dest.get("weight", 0)))
    if not routes:
        b(path, "must list at least one destination")
    elif len(routes) > 1 and sum(dest.get("weight", 0) for dest in routes) == 0:
        b(path, "several destinations need weights (relative shares, usually summing to 100)")
    return destinations


def _http_route(s: Session, e: Entry, b: Build, raw: dict[str, Any], path: str) -> HttpRoute:
    matches = [_http_match(m, f"{path}.match[{j}]", b) for j, m in enumerate(raw.get("match", []))]
    destinations = _destinations(s, e, b, raw["route"], f"{path}.route") if "route" in raw else []
    timeout = parse_duration(raw["timeout"]) if "timeout" in raw else None

    def mirror(dest: dict[str, Any], here: str) -> Destination | None:
        return _destination(s, e, b, dest, here, 0)

    extras = route_extras(raw, path, b, mirror)
    return HttpRoute(raw.get("name", ""), tuple(matches), tuple(destinations), timeout, **extras)


def _tcp_route(s: Session, e: Entry, b: Build, raw: dict[str, Any], path: str) -> TcpRoute | None:
    match = raw.get("match", [])
    every_port = not match or any("port" not in m for m in match)
    ports = () if every_port else tuple(m["port"] for m in match)
    destinations = _destinations(s, e, b, raw["route"], f"{path}.route")
    return TcpRoute(ports, tuple(destinations), path) if destinations else None


def virtual_service(s: Session, e: Entry, b: Build) -> VirtualService | None:
    spec = e.spec
    for i, gateway in enumerate(spec.get("gateways", [])):
        if gateway != "mesh":
            b(
                f"spec.gateways[{i}]",
                f"gateway {gateway!r} is not supported yet; only mesh (the sidecars) is",
            )
    hosts: list[str] = []
    for i, raw in enumerate(spec["hosts"]):
        path = f"spec.hosts[{i}]"
        if "*" in raw:
            b(path, "wildcard hosts are not supported yet")
            continue
        host = s.resolve(raw, e.namespace, path, b)
        if host is None:
            continue
        if host in hosts:
            b(path, f"host {host} is listed twice")
        elif host in s.routed:
            other = s.routed[host].meta
            b(
                path,
                f"host {host} is already routed by {other.resource} in {other.file}; "
                "merging VirtualServices is not supported yet",
            )
        else:
            hosts.append(host)
    if not spec["hosts"]:
        b("spec.hosts", "must list at least one host")
    http = [
        _http_route(s, e, b, raw, f"spec.http[{i}]") for i, raw in enumerate(spec.get("http", []))
    ]
    tcp = [_tcp_route(s, e, b, raw, f"spec.tcp[{i}]") for i, raw in enumerate(spec.get("tcp", []))]
    if not http and not tcp:
        b("spec", "a VirtualService needs http or tcp routes")
    if b.failed:
        return None
    result = VirtualService(
        e.meta(),
        tuple(hosts),
        tuple(http),
        tuple(r for r in tcp if r is not None),
        tuple(spec.get("exportTo", [])),
    )
    for host in hosts:
        s.routed[host] = result
    return result
