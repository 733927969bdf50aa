"""Typed, validated Istio traffic-management settings (the leaves of `model.py`'s traffic kinds).

Owns: the frozen values `traffic_http.py` and `traffic_policy.py` build from a
VirtualService's http[] extras (rewrite, redirect, direct response, header
operations, fault, retries) and a DestinationRule's connectionPool and
outlierDetection. Plain values only: no parsing, no xDS. `model.py` composes
them into HttpRoute and TrafficPolicy; Mirror lives there (it holds a
Destination).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HeaderOps:
    """One side (request or response) of an HTTPRoute's `headers`."""

    set: tuple[tuple[str, str], ...] = ()  # replace any value the message has
    add: tuple[tuple[str, str], ...] = ()  # append another value
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)


NO_HEADERS = HeaderOps()


@dataclass(frozen=True, slots=True)
class Rewrite:
    """HTTPRewrite: `uri` (prefix rewrite) or `uriRegexRewrite`, and `authority`."""

    uri: str = ""
    authority: str = ""
    regex: str = ""  # uriRegexRewrite.match (RE2)
    substitution: str = ""  # uriRegexRewrite.rewrite, RE2 style (\1 for group 1)


@dataclass(frozen=True, slots=True)
class Redirect:
    """HTTPRedirect; empty strings and port None keep the request's value."""

    uri: str = ""
    authority: str = ""
    port: int | None = None
    scheme: str = ""
    code: int = 301


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: str | None = None  # body.string
    body_bytes: bytes | None = None  # body.bytes (base64 in YAML)


@dataclass(frozen=True, slots=True)
class Fault:
    """HTTPFaultInjection: a fixed delay and/or an abort, each for a percentage of requests."""

    delay: float | None = None  # seconds
    delay_percent: float = 100.0
    abort_http: int = 0  # httpStatus; 0: none
    abort_grpc: int | None = None  # grpcStatus as its numeric code
    abort_percent: float = 100.0

    @property
    def aborts(self) -> bool:
        return bool(self.abort_http) or self.abort_grpc is not None


@dataclass(frozen=True, slots=True)
class Retries:
    """HTTPRetry. `attempts` 0 disables retries; no Retries at all means Istio's default policy."""

    attempts: int
    per_try_timeout: float | None = None
    retry_on: tuple[str, ...] = ()  # () keeps the default conditions
    status_codes: tuple[int, ...] = ()  # the numeric entries of retryOn


@dataclass(frozen=True, slots=True)
class ConnectionPool:
    """ConnectionPoolSettings (tcp and http); None: not set, the default applies."""

    max_connections: int | None = None
    connect_timeout: float | None = None
    max_pending_requests: int | None = None  # http.http1MaxPendingRequests
    max_requests: int | None = None  # http.http2MaxRequests
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    idle_timeout: float | None = None  # http.idleTimeout
    h2_upgrade: bool = False  # http.h2UpgradePolicy UPGRADE
    use_client_protocol: bool = False
    max_concurrent_streams: int | None = None


@dataclass(frozen=True, slots=True)
class Outlier:
    """OutlierDetection (the consecutive-errors detectors)."""

    consecutive_5xx: int = 5  # Istio's (and Envoy's) default; 0 disables
    consecutive_gateway: int | None = None
    interval: float | None = None
    base_ejection_time: float | None = None
    max_ejection_percent: int | None = None
