"""The compiled runtime snapshot: plain, immutable Python objects.

Everything the hot path reads comes from here. ``compile.py`` builds it from
xDS resources; tests build it by hand. Rules (STYLE.md 2.3): frozen slotted
dataclasses, tuples, and dicts built once for exact lookups; header names are
pre-lowercased ``bytes``; regexes are compiled; every default is resolved, so
no consumer ever has to ask "is this set?". Nothing here does I/O, and the
whole snapshot pickles (it is how workers receive it).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # compiled policies live with their evaluator (tier 1); no runtime import
    from proxy.authz import HttpPolicy, RbacFilter


class Protocol(enum.Enum):
    HTTP = "http"
    TCP = "tcp"


class Direction(enum.Enum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


class PathKind(enum.Enum):
    PREFIX = 1  # matches the start of :path (query string included, as Envoy)
    EXACT = 2  # equals :path with the query string removed
    REGEX = 3  # full match of :path with the query string removed


class StringKind(enum.Enum):
    EXACT = 1
    PREFIX = 2
    SUFFIX = 3
    CONTAINS = 4
    REGEX = 5
    PRESENT = 6


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """One request-header condition; ``name`` is lowercased bytes."""

    name: bytes
    kind: StringKind
    value: bytes = b""
    regex: re.Pattern[bytes] | None = None
    invert: bool = False

    def matches(self, value: bytes | None) -> bool:
        if value is None:  # an absent header fails every match kind
            return self.invert
        kind = self.kind
        if kind is StringKind.EXACT:
            ok = value == self.value
        elif kind is StringKind.PREFIX:
            ok = value.startswith(self.value)
        elif kind is StringKind.SUFFIX:
            ok = value.endswith(self.value)
        elif kind is StringKind.CONTAINS:
            ok = self.value in value
        elif kind is StringKind.REGEX:
            assert self.regex is not None
            ok = self.regex.fullmatch(value) is not None
        else:
            ok = True
        return ok != self.invert


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    name: str
    weight: int


# [lb] RouteAction.hash_policy: where a consistent-hash key comes from (RING_HASH clusters).
class HashKind(enum.Enum):
    HEADER = 1  # ``name``: a lowercased request header
    COOKIE = 2  # ``name``: a cookie of the Cookie header (absent: no key; no cookie is generated)
    SOURCE_IP = 3  # the downstream client address
    QUERY_PARAMETER = 4  # ``name``: a query parameter of :path


@dataclass(frozen=True, slots=True)
class HashPolicy:
    kind: HashKind
    name: bytes = b""
# [lb] end


# ---- [traffic] route extras: RouteMatch.query_parameters, header mutation, rewrite, redirect,
# direct response, mirror, fault (envoy.filters.http.fault per route), retry policy.
# RouteMatch.query_parameters[]: the same string match, on a query parameter's value (``name`` is
# the parameter; absent fails, PRESENT accepts any value).
QueryMatch = HeaderMatch


@dataclass(frozen=True, slots=True)
class HeaderOp:
    """One request/response header to add: ``append`` False overwrites an existing value
    (Envoy's OVERWRITE_IF_EXISTS_OR_ADD), True adds another (APPEND_IF_EXISTS_OR_ADD)."""

    name: bytes  # lowercased
    value: bytes
    append: bool = False


@dataclass(frozen=True, slots=True)
class HeaderMutation:
    """Route-level request_headers_to_add/remove and response_headers_to_add/remove
    (the virtual host's are merged in by the compiler: route first, as Envoy orders them)."""

    request_add: tuple[HeaderOp, ...] = ()
    request_remove: tuple[bytes, ...] = ()
    response_add: tuple[HeaderOp, ...] = ()
    response_remove: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Rewrite:
    """RouteAction prefix_rewrite / regex_rewrite / host_rewrite_literal."""

    prefix: bytes | None = None  # replaces the matched route prefix (PathKind.PREFIX routes)
    regex: re.Pattern[bytes] | None = None  # regex_rewrite.pattern, applied to the path without query
    substitution: bytes = b""  # regex_rewrite.substitution (\1-style groups already converted)
    host: bytes | None = None  # host_rewrite_literal: the new Host / :authority


@dataclass(frozen=True, slots=True)
class Redirect:
    """Route.redirect: answered locally, never sent upstream."""

    status: int = 301  # MOVED_PERMANENTLY 301, FOUND 302, SEE_OTHER 303, TEMPORARY 307, PERMANENT 308
    scheme: bytes | None = None  # scheme_redirect / https_redirect
    host: bytes | None = None  # host_redirect
    port: int = 0  # port_redirect; 0 keeps the request's
    path: bytes | None = None  # path_redirect (replaces the whole path; the query is kept unless strip_query)
    prefix: bytes | None = None  # prefix_rewrite
    strip_query: bool = False


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Mirror:
    """RouteAction.request_mirror_policies[]: a copy of the request goes to ``cluster`` for
    ``percent`` of requests; its response is discarded; the Host gets a "-shadow" suffix."""

    cluster: str
    percent: float = 100.0  # 0-100


@dataclass(frozen=True, slots=True)
class Fault:
    """envoy.filters.http.fault's per-route HTTPFault: a fixed delay and/or an abort."""

    delay: float = 0.0  # seconds; 0: none
    delay_percent: float = 0.0  # 0-100
    abort_status: int = 0  # HTTP status of the abort; 0: none (or gRPC below)
    abort_grpc: int | None = None  # abort.grpc_status: trailers-only gRPC reply with this code
    abort_percent: float = 0.0


# RetryPolicy.retry_on, as bits (Envoy's names); the compiler maps the comma-separated string.
RETRY_5XX = 1 << 0  # "5xx": any 5xx response, and reset / connect-failure
RETRY_GATEWAY = 1 << 1  # "gateway-error": 502, 503, 504, and reset / connect-failure
RETRY_RESET = 1 << 2  # "reset": no response (disconnect, reset, read timeout)
RETRY_CONNECT = 1 << 3  # "connect-failure"
RETRY_REFUSED = 1 << 4  # "refused-stream": the upstream refused the stream (HTTP/2 REFUSED_STREAM)
RETRY_4XX = 1 << 5  # "retriable-4xx": 409
RETRY_STATUS = 1 << 6  # "retriable-status-codes": RetryPolicy.retriable_status_codes
RETRY_GRPC_CANCELLED = 1 << 7  # gRPC status 1
RETRY_GRPC_DEADLINE = 1 << 8  # "deadline-exceeded": 4
RETRY_GRPC_RESOURCE = 1 << 9  # "resource-exhausted": 8
RETRY_GRPC_UNAVAILABLE = 1 << 10  # "unavailable": 14
RETRY_GRPC_INTERNAL = 1 << 11  # "internal": 13
RETRY_ON_NAMES = {
    "5xx": RETRY_5XX, "gateway-error": RETRY_GATEWAY, "reset": RETRY_RESET, "connect-failure": RETRY_CONNECT,
    "refused-stream": RETRY_REFUSED, "retriable-4xx": RETRY_4XX, "retriable-status-codes": RETRY_STATUS,
    "cancelled": RETRY_GRPC_CANCELLED, "deadline-exceeded": RETRY_GRPC_DEADLINE,
    "resource-exhausted": RETRY_GRPC_RESOURCE, "unavailable": RETRY_GRPC_UNAVAILABLE, "internal": RETRY_GRPC_INTERNAL,
}


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """RouteAction.retry_policy. Envoy's defaults: backoff 25 ms base, 10x max; jittered."""

    retry_on: int  # RETRY_* bits
    num_retries: int = 1  # Envoy's default when retry_policy is present
    per_try_timeout: float = 0.0  # seconds; 0: the route timeout bounds all tries together
    retriable_status: frozenset[int] = frozenset()
    backoff_base: float = 0.025
    backoff_max: float = 0.25
    other_host: bool = False  # retry_host_predicate previous_hosts: prefer a host not tried yet
    host_selection_attempts: int = 1  # host_selection_retry_max_attempts
# ---- [traffic] end


@dataclass(frozen=True, slots=True)
class Route:
    """A compiled route: match conditions and one action (route, redirect or direct response)."""

    name: str
    path_kind: PathKind
    path: bytes
    path_regex: re.Pattern[bytes] | None
    headers: tuple[HeaderMatch, ...]  # may name ":method", ":authority", ":scheme" (Envoy's pseudo-headers)
    # Action: either a single cluster or a weighted set (cumulative weights).
    cluster: str
    weighted: tuple[WeightedCluster, ...] = ()
    total_weight: int = 0
    timeout: float = 15.0  # seconds; 0 disables (Envoy's RouteAction.timeout semantics)
    hash_policy: tuple[HashPolicy, ...] = ()  # [lb] empty: the request carries no hash key
    # [traffic] everything below is off by default and costs one attribute check when off
    query: tuple[QueryMatch, ...] = ()
    case_sensitive: bool = True  # RouteMatch.case_sensitive (prefix/path only, as Envoy)
    redirect: Redirect | None = None  # set: this route answers locally with a redirect
    direct: DirectResponse | None = None  # set: this route answers locally with this response
    rewrite: Rewrite | None = None
    mutation: HeaderMutation | None = None
    mirrors: tuple[Mirror, ...] = ()
    fault: Fault | None = None
    retry: RetryPolicy | None = None
    grpc_timeout: bool = False  # max_stream_duration.grpc_timeout_header_max set: grpc-timeout bounds the route
    grpc_timeout_max: float = 0.0  # its value; 0: no cap


@dataclass(frozen=True, slots=True)
class VirtualHost:
    name: str
    domains: tuple[str, ...]
    routes: tuple[Route, ...]


@dataclass(frozen=True, slots=True)
class RouteTable:
    """A RouteConfiguration compiled for O(1) host lookup.

    ``exact`` maps a lowercased Host value (``name`` or ``name:port``) to its
    virtual host; ``suffixes``/``prefixes`` hold ``*.x`` / ``x.*`` domains,
    longest first; ``wildcard`` is the ``*`` host if one exists.
    """

    name: str
    exact: dict[bytes, VirtualHost]
    suffixes: tuple[tuple[bytes, VirtualHost], ...] = ()
    prefixes: tuple[tuple[bytes, VirtualHost], ...] = ()
    wildcard: VirtualHost | None = None
    virtual_hosts: tuple[VirtualHost, ...] = ()


@dataclass(frozen=True, slots=True)
class SanMatch:
    """One accepted peer subject alt name: ``kind`` is "URI" or "DNS"; exact or prefix."""

    kind: str
    value: str
    prefix: bool = False

    def matches(self, kind: str, value: str) -> bool:
        if kind != self.kind:
            return False
        return value.startswith(self.value) if self.prefix else value == self.value


@dataclass(frozen=True, slots=True)
class TlsServer:
    """How a listener terminates TLS (a compiled DownstreamTlsContext)."""

    cert_secret: str  # secret holding our certificate chain and key ("default")
    roots_secret: str  # secret holding the roots client certificates must chain to ("ROOTCA"); "" = none
    require_client_cert: bool = True
    peer_sans: tuple[SanMatch, ...] = ()  # empty: any certificate that chains to the roots
    alpn: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TlsClient:
    """How connections to an endpoint originate TLS (a compiled UpstreamTlsContext)."""

    cert_secret: str = ""  # our client certificate (mTLS); "" = none
    roots_secret: str = ""  # roots the server must chain to
    sni: str = ""
    peer_sans: tuple[SanMatch, ...] = ()
    alpn: tuple[str, ...] = ()
    # SIMPLE/MUTUAL from files (DestinationRule caCertificates / clientCertificate / privateKey).
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    verify: bool = True


@dataclass(frozen=True, slots=True)
class Secret:
    """An SDS secret: a certificate chain and key, or a set of trusted roots (PEM)."""

    name: str
    cert_chain: bytes = b""
    key: bytes = b""
    roots: bytes = b""


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    weight: int = 1
    labels: tuple[tuple[str, str], ...] = ()
    tls: TlsClient | None = None  # per endpoint: auto mTLS picks it by the endpoint's tlsMode

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


# [traffic] Cluster.circuit_breakers.thresholds[DEFAULT] and outlier_detection.
@dataclass(frozen=True, slots=True)
class CircuitBreakers:
    """Envoy's defaults: 1024 connections, pending requests and requests, 3 retries."""

    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3
    budget_percent: float | None = None  # retry_budget: retries allowed as % of active requests
    min_retry_concurrency: int = 3  # retry_budget.min_retry_concurrency


DEFAULT_LIMITS = CircuitBreakers()


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """The consecutive-errors detectors of Envoy's outlier detection (success rate is not implemented)."""

    consecutive_5xx: int = 5
    enforcing_5xx: int = 100  # percent
    consecutive_gateway: int = 5
    enforcing_gateway: int = 0  # Envoy's default: gateway errors are counted, not enforced
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: int = 10
    split_local_origin: bool = False  # False: connect failures and resets count as 5xx (as 503s)
# [traffic] end


@dataclass(frozen=True, slots=True)
class Cluster:
    name: str
    endpoints: tuple[Endpoint, ...]
    connect_timeout: float = 10.0
    lb_policy: str = "ROUND_ROBIN"  # [lb] ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH (CLUSTER_PROVIDED: ORIGINAL_DST)
    # Istio-style identity of the destination, for metrics labels.
    service: str = ""
    direction: Direction = Direction.OUTBOUND
    # ORIGINAL_DST: no endpoints of its own; traffic goes where the app sent it, the
    # original destination of the intercepted connection (an explicit listener has
    # none: 503 UH / connection closed). ``original_dst_tls``: how to dial it.
    original_dst: bool = False
    original_dst_tls: TlsClient | None = None
    ring_size: int = 1024  # [lb] RING_HASH: ring_hash_lb_config.minimum_ring_size (Envoy's default 1024)
    # [traffic] circuit_breakers (default priority), max_requests_per_connection, outlier_detection
    limits: CircuitBreakers = field(default_factory=lambda: DEFAULT_LIMITS)
    max_requests_per_connection: int = 0  # 0: unlimited
    idle_timeout: float = 3600.0  # upstream connections idle this long are closed (0: never)
    outlier: OutlierDetection | None = None
    # [http2] how requests are sent upstream: HTTP/1.1, or HTTP/2 (prior knowledge over plaintext,
    # ALPN "h2" over TLS): typed_extension_protocol_options envoy.extensions.upstreams.http.v3.
    # "use_downstream": the protocol the client spoke (Istio's useClientProtocol).
    http2: bool = False
    use_downstream_protocol: bool = False
    h2_max_concurrent_streams: int = 1024  # our own cap per upstream connection (the peer's SETTINGS may lower it)


# [accesslog] where and how a listener logs each request / connection (HCM and tcp_proxy
# access_log: envoy.access_loggers.file). Records are queued on the path and written by
# a background task (proxy/accesslog.py); None = off, and then costs one attribute check.
@dataclass(frozen=True, slots=True)
class AccessLog:
    path: str  # a file, or "/dev/stdout"
    encoding: str = "TEXT"  # "TEXT" (Envoy's default format line) or "JSON" (Envoy's default fields)
# [accesslog] end


# [tracing] HCM ``tracing`` (OpenTelemetry provider), compiled by compile.py.
@dataclass(frozen=True, slots=True)
class TraceSettings:
    """Where and how often this listener's requests are traced."""

    sample_percent: float  # random_sampling, 0-100 (Envoy's default: 100)
    collector_cluster: str  # the OTLP/gRPC collector's cluster (grpc_service.envoy_grpc)
    service_name: str  # the resource's service.name
    server: bool  # True: server spans (INBOUND listeners); False: client spans (OUTBOUND)
    # A new trace is sampled when its ``traceparent`` header line, as tracing.begin writes it
    # (b"traceparent: 00-" and the trace id in lowercase hex), sorts below this one. Equal-length
    # lowercase hex compares as its number, so a trace id below ``sample_percent`` % of 2**128 is
    # sampled: OpenTelemetry's trace-id ratio rule, one bytes comparison a request.
    sample_below: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        below = int(self.sample_percent / 100.0 * 2**128)
        line = b"" if below <= 0 else b"\xff" if below >= 2**128 else b"traceparent: 00-%032x" % below
        object.__setattr__(self, "sample_below", line)
# [tracing] end


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """What the HTTP connection manager of one listener needs."""

    stat_prefix: str
    route_config_name: str  # key into Snapshot.routes (inline configs are stored there too)
    max_request_headers_bytes: int = 60 * 1024  # Envoy's max_request_headers_kb default
    max_request_headers_count: int = 100  # Envoy's common_http_protocol_options.max_headers_count default
    idle_timeout: float = 3600.0  # downstream keep-alive idle timeout; 0 disables
    generate_request_id: bool = True
    forward_client_address: bool = True
    # jwt_authn and RBAC filters before the router (AuthorizationPolicy, RequestAuthentication);
    # None when the HCM has no filter besides the router: requests then pay nothing for it.
    policy: HttpPolicy | None = None
    access_log: AccessLog | None = None  # [accesslog]
    tracing: TraceSettings | None = None  # [tracing] None: requests pay one attribute check
    # [http2] codec_type: "AUTO" (HTTP/1.1, or HTTP/2 by ALPN h2 / the h2c preface), "HTTP1", "HTTP2"
    codec: str = "AUTO"
    h2_max_concurrent_streams: int = 100  # http2_protocol_options.max_concurrent_streams (ours: 100)
    h2_initial_stream_window: int = 1 << 20  # initial_stream_window_size
    h2_initial_connection_window: int = 1 << 20  # initial_connection_window_size
    h2_max_resets_per_interval: int = 200  # rapid-reset protection: RST_STREAMs tolerated per interval
    h2_reset_interval: float = 1.0  # seconds


@dataclass(frozen=True, slots=True)
class TcpSettings:
    stat_prefix: str
    cluster: str
    idle_timeout: float = 3600.0  # Envoy's tcp_proxy default: 1h; 0 disables
    # Network RBAC filters before tcp_proxy, evaluated once when a connection is accepted.
    rbac: tuple[RbacFilter, ...] = ()
    access_log: AccessLog | None = None  # [accesslog]
    weighted: tuple[WeightedCluster, ...] = ()  # [traffic] tcp_proxy weighted_clusters (cluster: the first)
    total_weight: int = 0


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    address: str
    port: int
    direction: Direction
    protocol: Protocol
    http: HttpSettings | None = None
    tcp: TcpSettings | None = None
    # TLS termination: None = plaintext only; with ``plaintext`` also true the listener
    # sniffs each connection's first bytes and accepts both (Istio's PERMISSIVE).
    tls: TlsServer | None = None
    plaintext: bool = True
    # Interception. ``bind_to_port`` false: never bound; a capture listener hands it the
    # connections whose original destination is its address (Envoy's bind_to_port).
    # ``capture``: this listener receives redirected connections (15001/15006) and
    # routes each by its original destination.
    bind_to_port: bool = True
    capture: Capture | None = None

    @property
    def bind_key(self) -> tuple[str, int]:
        return (self.address, self.port)


@dataclass(frozen=True, slots=True)
class Capture:
    """How a capture listener routes a redirected connection by its original destination.

    In order: with ``use_original_dst``, the listener whose address is the original
    destination (exact ip:port, then the wildcard address with that port); then the
    chain for the destination port (``by_port``, filter_chain_match.destination_port);
    then ``default`` (a chain without destination_port: passthrough or blackhole).
    Each chain is compiled as a listener of its own (never bound), so the rest of the
    path (TLS sniffing, HTTP or TCP) is the same as for any listener.
    """

    use_original_dst: bool = False
    by_port: dict[int, Listener] = field(default_factory=dict)
    default: Listener | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One complete, consistent configuration. Swapped as a whole, never edited."""

    version: str
    listeners: tuple[Listener, ...] = ()
    routes: dict[str, RouteTable] = field(default_factory=dict)
    clusters: dict[str, Cluster] = field(default_factory=dict)
    secrets: dict[str, Secret] = field(default_factory=dict)


EMPTY = Snapshot(version="")
