"""Builders for a DestinationRule TrafficPolicy's `connectionPool` and `outlierDetection`.

Owns: their meaning beyond shape (which values Istio treats as unset, which
combinations make sense) for `traffic.py`, which calls it for the policy,
each subset's and each portLevelSettings entry. Reports through `Build`;
returns `model_traffic` values. No xDS (`cluster_traffic.py` does that).

Decisions where Istio leaves room:
- Integers 0 mean "not set" (Istio's proto3 ints): the default applies.
- outlierDetection minHealthPercent: 0 (panic mode off, what Istio configures
  by default) is accepted; other values are "not supported yet" (Pillion has
  no panic mode). splitExternalLocalOriginErrors: false is accepted, true is
  not supported yet (Pillion has no local-origin detector), nor are
  consecutiveLocalOriginFailures and the deprecated consecutiveErrors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from control.translate.model_traffic import ConnectionPool, Outlier
from control.translate.schema import parse_duration

if TYPE_CHECKING:
    from control.translate.istio import Build


def _positive_duration(raw: dict[str, Any], name: str, path: str, b: Build) -> float | None:
    if name not in raw:
        return None
    value = parse_duration(raw[name])
    if not value:
        b(f"{path}.{name}", "must be positive")
    return value


def _count(raw: dict[str, Any], name: str) -> int | None:
    value = raw.get(name, 0)
    return int(value) if value else None


def connection_pool(raw: dict[str, Any], path: str, b: Build) -> ConnectionPool:
    tcp = raw.get("tcp", {})
    http = raw.get("http", {})
    if not raw or not (tcp or http):
        b(path, "set tcp or http settings")
    return ConnectionPool(
        max_connections=_count(tcp, "maxConnections"),
        connect_timeout=_positive_duration(tcp, "connectTimeout", f"{path}.tcp", b),
        max_pending_requests=_count(http, "http1MaxPendingRequests"),
        max_requests=_count(http, "http2MaxRequests"),
        max_requests_per_connection=_count(http, "maxRequestsPerConnection"),
        max_retries=_count(http, "maxRetries"),
        idle_timeout=_positive_duration(http, "idleTimeout", f"{path}.http", b),
        h2_upgrade=http.get("h2UpgradePolicy") == "UPGRADE",
        use_client_protocol=bool(http.get("useClientProtocol", False)),
        max_concurrent_streams=_count(http, "maxConcurrentStreams"),
    )


def outlier_detection(raw: dict[str, Any], path: str, b: Build) -> Outlier:
    if raw.get("minHealthPercent", 0):
        b(f"{path}.minHealthPercent", "only 0 is supported yet (no panic mode)")
    if raw.get("splitExternalLocalOriginErrors", False):
        b(f"{path}.splitExternalLocalOriginErrors", "true is not supported yet (no local-origin detector)")
    gateway = raw.get("consecutiveGatewayErrors")
    return Outlier(
        consecutive_5xx=raw.get("consecutive5xxErrors", 5),
        consecutive_gateway=gateway,
        interval=_positive_duration(raw, "interval", path, b),
        base_ejection_time=_positive_duration(raw, "baseEjectionTime", path, b),
        max_ejection_percent=_count(raw, "maxEjectionPercent"),
    )
