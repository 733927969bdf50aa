"""Typed, validated Istio objects: what the loader produces and the builders consume.

Owns: the frozen dataclasses for each kind (ServiceEntry, WorkloadEntry,
Sidecar, VirtualService, DestinationRule, ...), `MeshConfig`, `NodeInfo` and
the `ConfigSet` that holds them. No parsing and no xDS here: these are plain
values, built once by `istio.py` and never mutated.

Every object keeps its `Meta` (kind, namespace, name, file) and sub-objects
that later stages may complain about keep their field path, so a problem found
while translating for one node still names the file, resource and field.
Host names in destinations are already resolved to the ServiceEntry host.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any, TypeVar

from control.translate.model_telemetry import MeshTelemetry, Telemetry
from control.translate.model_traffic import (
    NO_HEADERS,
    ConnectionPool,
    DirectResponse,
    Fault,
    HeaderOps,
    Outlier,
    Redirect,
    Retries,
    Rewrite,
)

K = TypeVar("K", str, int)
V = TypeVar("V")

# The DNS suffix of Kubernetes-style service names: "reviews" in namespace "default"
# may name the ServiceEntry host "reviews.default.svc.cluster.local".
DNS_SUFFIX = "cluster.local"
EMPTY: Mapping[Any, Any] = MappingProxyType({})


def frozen_map(values: Mapping[K, V] | None) -> Mapping[K, V]:
    """A read-only copy with sorted keys (so iteration order is deterministic)."""
    if not values:
        return EMPTY
    return MappingProxyType({key: values[key] for key in sorted(values)})


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """True when every selector label is present with the same value."""
    return all(labels.get(key) == value for key, value in selector.items())


class Protocol(Enum):
    HTTP = "HTTP"
    TCP = "TCP"


class Resolution(Enum):
    STATIC = "STATIC"
    NONE = "NONE"


class MatchKind(Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    REGEX = "regex"


class MtlsMode(Enum):
    """PeerAuthentication's mutual TLS mode for a workload's inbound traffic."""

    UNSET = "UNSET"  # inherit from the next level (workload -> namespace -> mesh)
    DISABLE = "DISABLE"  # plaintext only
    PERMISSIVE = "PERMISSIVE"  # mutual TLS or plaintext, told apart by the TLS inspector
    STRICT = "STRICT"  # mutual TLS only


class TlsMode(Enum):
    """DestinationRule's client TLS mode for an outbound cluster."""

    DISABLE = "DISABLE"
    SIMPLE = "SIMPLE"  # TLS, the server verified against caCertificates
    MUTUAL = "MUTUAL"  # SIMPLE plus a client certificate from files
    ISTIO_MUTUAL = "ISTIO_MUTUAL"  # mutual TLS with the mesh's certificates (SDS)


@dataclass(frozen=True, slots=True)
class Meta:
    kind: str
    namespace: str
    name: str
    file: str
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY)

    @property
    def resource(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


# [tracing] MeshConfig defaultProviders.tracing -> extensionProviders[].opentelemetry
@dataclass(frozen=True, slots=True)
class MeshTracing:
    provider: str  # the extension provider's name
    service: str  # the collector's host (a ServiceEntry host)
    port: int
    sampling: float = 1.0  # defaultConfig.tracing.sampling, percent (Istio's default: 1)
# [tracing] end


@dataclass(frozen=True, slots=True)
class MeshConfig:
    trust_domain: str = "cluster.local"
    root_namespace: str = "istio-system"
    outbound_mode: str = "ALLOW_ANY"
    enable_auto_mtls: bool = True
    # [accesslog] accessLogFile ("" = off, Istio's default; a path or /dev/stdout), accessLogEncoding
    access_log_file: str = ""
    access_log_encoding: str = "TEXT"
    # [accesslog] end
    tracing: MeshTracing | None = None  # [tracing] None: no tracing provider selected
    telemetry: MeshTelemetry = field(default_factory=MeshTelemetry)  # providers Telemetry may name
    meta: Meta | None = None


@dataclass(frozen=True)
class NodeInfo:
    """Who the sidecar is: its namespace, its workload labels and (informational) name.

    `intercept`: the node's traffic is redirected to it by iptables (`pillion
    init-iptables`; Istio's INTERCEPTION_MODE REDIRECT), so it gets the capture
    listeners of `capture.py` instead of the Sidecar's explicit ones.
    """

    namespace: str = "default"
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY)
    name: str = ""
    intercept: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", frozen_map(self.labels))

    def __hash__(self) -> int:
        return hash((self.namespace, tuple(self.labels.items()), self.name, self.intercept))


# --- registry ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServicePort:
    number: int
    name: str
    protocol: Protocol
    target_port: int | None = None
    h2: bool = False  # GRPC, HTTP2, GRPC-WEB: HTTP routing, HTTP/2 to the upstream


@dataclass(frozen=True, slots=True)
class Workload:
    """A WorkloadEntry spec, standalone or inline in a ServiceEntry's `endpoints`."""

    address: str
    ports: Mapping[str, int] = field(default_factory=lambda: EMPTY)
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY)
    weight: int = 0
    service_account: str = ""
    network: str = ""
    locality: str = ""
    name: str = ""  # the WorkloadEntry's name; "" for inline endpoints


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    meta: Meta
    hosts: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    resolution: Resolution
    addresses: tuple[str, ...] = ()
    location: str = "MESH_EXTERNAL"
    endpoints: tuple[Workload, ...] = ()
    workload_selector: Mapping[str, str] | None = None
    export_to: tuple[str, ...] = ()

    def port(self, number: int) -> ServicePort | None:
        for port in self.ports:
            if port.number == number:
                return port
        return None


@dataclass(frozen=True, slots=True)
class WorkloadEntry:
    meta: Meta
    workload: Workload


@dataclass(frozen=True, slots=True)
class WorkloadGroup:
    meta: Meta
    labels: Mapping[str, str]
    template: Workload


# --- traffic ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SidecarPort:
    number: int
    protocol: Protocol
    name: str = ""
    target_port: int | None = None
    h2: bool = False  # GRPC, HTTP2, GRPC-WEB


@dataclass(frozen=True, slots=True)
class IngressListener:
    port: SidecarPort
    bind: str  # "" means 0.0.0.0
    endpoint_port: int  # the app's port on 127.0.0.1
    path: str  # "spec.ingress[i]"


@dataclass(frozen=True, slots=True)
class EgressListener:
    port: SidecarPort | None  # None: scopes visibility only, no listener
    bind: str  # "" means 127.0.0.1
    hosts: tuple[tuple[str, str], ...]  # (namespace pattern, host pattern)
    path: str  # "spec.egress[i]"


@dataclass(frozen=True, slots=True)
class Sidecar:
    meta: Meta
    selector: Mapping[str, str] | None
    ingress: tuple[IngressListener, ...]
    egress: tuple[EgressListener, ...]
    outbound_mode: str = ""  # outboundTrafficPolicy.mode (overrides MeshConfig's); "" = the mesh's


@dataclass(frozen=True, slots=True)
class StringMatch:
    kind: MatchKind
    value: str


@dataclass(frozen=True, slots=True)
class HttpMatch:
    name: str = ""
    uri: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()
    method: StringMatch | None = None
    authority: StringMatch | None = None
    scheme: StringMatch | None = None
    query: tuple[tuple[str, StringMatch], ...] = ()
    without_headers: tuple[tuple[str, StringMatch], ...] = ()
    ignore_uri_case: bool = False
    # Control-side conditions: which proxies and which route table get the match.
    source_labels: Mapping[str, str] = field(default_factory=lambda: EMPTY)
    source_namespace: str = ""
    port: int | None = None

    def applies(self, namespace: str, labels: Mapping[str, str], port: int) -> bool:
        """Whether a proxy in `namespace` with `labels` gets this match in its table for `port`."""
        if self.port is not None and self.port != port:
            return False
        if self.source_namespace and self.source_namespace != namespace:
            return False
        return labels_match(self.source_labels, labels)


@dataclass(frozen=True, slots=True)
class Destination:
    host: str  # resolved to a ServiceEntry host
    subset: str = ""
    port: int | None = None
    weight: int = 0
    path: str = ""  # "spec.http[i].route[j].destination"


@dataclass(frozen=True, slots=True)
class Mirror:
    """mirror + mirrorPercentage, or one entry of `mirrors`."""

    destination: Destination
    percent: float = 100.0


@dataclass(frozen=True, slots=True)
class HttpRoute:
    """One http[] entry. Exactly one of: destinations, redirect, direct_response."""

    name: str
    matches: tuple[HttpMatch, ...]
    destinations: tuple[Destination, ...]
    timeout: float | None = None  # seconds
    rewrite: Rewrite | None = None
    redirect: Redirect | None = None
    direct_response: DirectResponse | None = None
    request_headers: HeaderOps = NO_HEADERS
    response_headers: HeaderOps = NO_HEADERS
    mirrors: tuple[Mirror, ...] = ()
    fault: Fault | None = None
    retries: Retries | None = None  # None: Istio's default retry policy


@dataclass(frozen=True, slots=True)
class TcpRoute:
    ports: tuple[int, ...]  # () matches every port
    destinations: tuple[Destination, ...]  # one, or several weighted ones
    path: str  # "spec.tcp[i]"


@dataclass(frozen=True, slots=True)
class VirtualService:
    meta: Meta
    hosts: tuple[str, ...]  # resolved to ServiceEntry hosts
    http: tuple[HttpRoute, ...]
    tcp: tuple[TcpRoute, ...]
    export_to: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ClientTls:
    """A DestinationRule's `tls` (ClientTLSSettings), already checked for consistency."""

    mode: TlsMode
    path: str  # "spec.trafficPolicy.tls", "spec.subsets[0].trafficPolicy.portLevelSettings[1].tls"
    sni: str = ""
    subject_alt_names: tuple[str, ...] = ()
    ca_certificates: str = ""
    client_certificate: str = ""
    private_key: str = ""
    insecure_skip_verify: bool = False


class HashSource(Enum):
    """Where consistentHash takes a request's key from."""

    HEADER = "httpHeaderName"
    COOKIE = "httpCookie"
    SOURCE_IP = "useSourceIp"
    QUERY_PARAMETER = "httpQueryParameterName"


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    """A DestinationRule's `loadBalancer`: `simple`, or consistent hashing (ring hash)."""

    simple: str = "ROUND_ROBIN"  # ROUND_ROBIN, LEAST_REQUEST, RANDOM; "RING_HASH" for consistentHash
    hash_source: HashSource | None = None
    name: str = ""  # header, cookie or query parameter name
    cookie_path: str = ""
    cookie_ttl: float | None = None
    ring_size: int | None = None  # minimumRingSize; None: Envoy's default


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """The parts of a TrafficPolicy that change the xDS output, whole and per port:
    `tls`, `loadBalancer`, `connectionPool`, `outlierDetection`."""

    tls: ClientTls | None = None
    port_tls: Mapping[int, ClientTls] = field(default_factory=lambda: EMPTY)
    lb: LoadBalancer | None = None
    port_lb: Mapping[int, LoadBalancer] = field(default_factory=lambda: EMPTY)
    pool: ConnectionPool | None = None
    port_pool: Mapping[int, ConnectionPool] = field(default_factory=lambda: EMPTY)
    outlier: Outlier | None = None
    port_outlier: Mapping[int, Outlier] = field(default_factory=lambda: EMPTY)

    def tls_for(self, port: int) -> ClientTls | None:
        """The port-level `tls` for `port` if there is one, else the policy's own."""
        return self.port_tls.get(port) or self.tls

    def lb_for(self, port: int) -> LoadBalancer | None:
        return self.port_lb.get(port) or self.lb

    def pool_for(self, port: int) -> ConnectionPool | None:
        return self.port_pool.get(port) or self.pool

    def outlier_for(self, port: int) -> Outlier | None:
        return self.port_outlier.get(port) or self.outlier


NO_POLICY = TrafficPolicy()


@dataclass(frozen=True, slots=True)
class Subset:
    name: str
    labels: Mapping[str, str]
    traffic_policy: TrafficPolicy = NO_POLICY


@dataclass(frozen=True, slots=True)
class DestinationRule:
    meta: Meta
    host: str  # resolved to a ServiceEntry host
    subsets: tuple[Subset, ...]
    export_to: tuple[str, ...] = ()
    traffic_policy: TrafficPolicy = NO_POLICY

    def tls_for(self, subset: str, port: int) -> ClientTls | None:
        """Istio's precedence: the subset's port level, the subset's, the rule's port level, the rule's."""
        for candidate in self.subsets:
            if candidate.name == subset:
                found = candidate.traffic_policy.tls_for(port)
                if found is not None:
                    return found
        return self.traffic_policy.tls_for(port)

    def lb_for(self, subset: str, port: int) -> LoadBalancer | None:
        """The same precedence as `tls_for`, for `loadBalancer`."""
        for candidate in self.subsets:
            if candidate.name == subset:
                found = candidate.traffic_policy.lb_for(port)
                if found is not None:
                    return found
        return self.traffic_policy.lb_for(port)

    def pool_for(self, subset: str, port: int) -> ConnectionPool | None:
        """The same precedence as `tls_for`, for `connectionPool` (replaced whole, not merged, as Istio)."""
        for candidate in self.subsets:
            if candidate.name == subset:
                found = candidate.traffic_policy.pool_for(port)
                if found is not None:
                    return found
        return self.traffic_policy.pool_for(port)

    def outlier_for(self, subset: str, port: int) -> Outlier | None:
        """The same precedence as `tls_for`, for `outlierDetection`."""
        for candidate in self.subsets:
            if candidate.name == subset:
                found = candidate.traffic_policy.outlier_for(port)
                if found is not None:
                    return found
        return self.traffic_policy.outlier_for(port)


# --- security ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    meta: Meta
    selector: Mapping[str, str] | None  # None: every workload of the namespace (or mesh)
    mode: MtlsMode
    port_modes: Mapping[int, MtlsMode] = field(default_factory=lambda: EMPTY)


class AuthzAction(Enum):
    """AuthorizationPolicy's action (CUSTOM is refused by the loader: there is no ext_authz)."""

    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"  # matched requests are counted (logged), never denied


@dataclass(frozen=True, slots=True)
class AuthzSource:
    """One `rules[i].from[j].source`: every set field must match (values within a field: any)."""

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()  # normalized CIDRs ("10.0.0.0/8", "10.1.2.3/32")
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthzOperation:
    """One `rules[i].to[j].operation`: every set field must match."""

    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthzCondition:
    """One `rules[i].when[k]`; `key` is checked ("request.headers[x-user]", "source.ip", ...)."""

    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthzRule:
    """A rule matches when any source, any operation and every condition match (empty: any)."""

    sources: tuple[AuthzSource, ...] = ()
    operations: tuple[AuthzOperation, ...] = ()
    conditions: tuple[AuthzCondition, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    meta: Meta
    selector: Mapping[str, str] | None  # None: every workload of the namespace (or the mesh)
    action: AuthzAction
    rules: tuple[AuthzRule, ...]  # () matches nothing


@dataclass(frozen=True, slots=True)
class JwtRule:
    """One RequestAuthentication `jwtRules[i]`, checked (exactly one of jwks and jwks_uri is set)."""

    issuer: str
    path: str  # "spec.jwtRules[0]"
    audiences: tuple[str, ...] = ()
    jwks: str = ""  # inline JWKS JSON, validated structurally
    jwks_uri: str = ""
    timeout: float = 5.0  # seconds, for fetching jwks_uri
    from_headers: tuple[tuple[str, str], ...] = ()  # (header name, value prefix)
    from_params: tuple[str, ...] = ()
    from_cookies: tuple[str, ...] = ()
    output_payload_to_header: str = ""
    forward_original_token: bool = False
    output_claim_to_headers: tuple[tuple[str, str], ...] = ()  # (header, claim)


@dataclass(frozen=True, slots=True)
class RequestAuthentication:
    meta: Meta
    selector: Mapping[str, str] | None
    jwt_rules: tuple[JwtRule, ...]


@dataclass(frozen=True, slots=True)
class UnenforcedPolicy:
    """A security or telemetry resource whose shape was checked but which is not enforced yet."""

    meta: Meta
    spec: Mapping[str, object]


@dataclass(frozen=True)
class ConfigSet:
    """Every parsed, validated object, sorted by (namespace, name) within each kind."""

    mesh: MeshConfig = field(default_factory=MeshConfig)
    service_entries: tuple[ServiceEntry, ...] = ()
    workload_entries: tuple[WorkloadEntry, ...] = ()
    workload_groups: tuple[WorkloadGroup, ...] = ()
    sidecars: tuple[Sidecar, ...] = ()
    virtual_services: tuple[VirtualService, ...] = ()
    destination_rules: tuple[DestinationRule, ...] = ()
    peer_authentications: tuple[PeerAuthentication, ...] = ()
    unenforced: tuple[UnenforcedPolicy, ...] = ()
    authorization_policies: tuple[AuthorizationPolicy, ...] = ()
    request_authentications: tuple[RequestAuthentication, ...] = ()
    telemetries: tuple[Telemetry, ...] = ()
    files: tuple[str, ...] = ()
