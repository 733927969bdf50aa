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


@dataclass(frozen=True, slots=True)
class Route:
    """A compiled route: match conditions and the one action this issue supports."""

    name: str
    path_kind: PathKind
    path: bytes
    path_regex: re.Pattern[bytes] | None
    headers: tuple[HeaderMatch, ...]
    # Action: either a single cluster or a weighted set (cumulative weights).
    cluster: str
    weighted: tuple[WeightedCluster, ...] = ()
    total_weight: int = 0
    timeout: float = 15.0  # seconds; 0 disables (Envoy's RouteAction.timeout semantics)
    hash_policy: tuple[HashPolicy, ...] = ()  # [lb] empty: the request carries no hash key


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


@dataclass(frozen=True, slots=True)
class TcpSettings:
    stat_prefix: str
    cluster: str
    idle_timeout: float = 3600.0  # Envoy's tcp_proxy default: 1h; 0 disables
    # Network RBAC filters before tcp_proxy, evaluated once when a connection is accepted.
    rbac: tuple[RbacFilter, ...] = ()
    access_log: AccessLog | None = None  # [accesslog]


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
