"""DestinationRule connectionPool and outlierDetection, and the port's protocol -> Cluster settings.

Owns: a cluster's circuit_breakers, connect_timeout override,
outlier_detection (with common_lb_config), and its upstream HTTP protocol
options (typed_extension_protocol_options
"envoy.extensions.upstreams.http.v3.HttpProtocolOptions"). `clusters.py`
decides which policy applies to which cluster (subset port level > subset >
rule port level > rule) and calls `apply_traffic`.

Rules:
- Circuit breakers (every outbound and inbound cluster): one DEFAULT
  threshold; max_connections, max_pending_requests and max_requests are
  Istio's "unlimited" 4294967295 unless connectionPool sets
  tcp.maxConnections, http.http1MaxPendingRequests, http.http2MaxRequests.
- Retries: PILLION'S OWN DEFAULT, deliberately not Istio's (which allows
  4294967295 concurrent retries): without http.maxRetries the threshold
  carries a retry_budget of 20% of the cluster's active requests (at least 3
  concurrent retries), so retries cannot multiply the load on a service that
  is already failing. With http.maxRetries the threshold has max_retries =
  that value and no budget (the operator's number wins).
- HTTP/2 upstream: GRPC, HTTP2 and GRPC-WEB ports, and HTTP ports with
  http.h2UpgradePolicy UPGRADE, get explicit_http_config
  http2_protocol_options (with http.maxConcurrentStreams). useClientProtocol
  takes precedence: use_downstream_protocol_config (HTTP/1.1 and HTTP/2).
  http.idleTimeout and http.maxRequestsPerConnection go to
  common_http_protocol_options. Plain HTTP/1.1 clusters without those get no
  protocol options; TCP ports never do.
- outlierDetection: consecutive_5xx (default 5; enforcing 100, or 0 when
  consecutive5xxErrors is 0), consecutive_gateway_failure with enforcing 100
  when set (> 0), interval, base_ejection_time, max_ejection_percent;
  enforcing_success_rate 0 (success-rate ejection off, as Istio); and
  common_lb_config.healthy_panic_threshold 0 (panic mode off, as Istio).
"""

from __future__ import annotations

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import base_pb2, protocol_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo
from envoy.type.v3 import percent_pb2
from google.protobuf import wrappers_pb2

from control.translate.model import Protocol
from control.translate.model_traffic import ConnectionPool, Outlier
from control.translate.protos import duration, packed

HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
UNLIMITED = 4294967295
RETRY_BUDGET_PERCENT = 20.0
RETRY_BUDGET_MIN_CONCURRENCY = 3


def _u32(value: int) -> wrappers_pb2.UInt32Value:
    return wrappers_pb2.UInt32Value(value=value)


def speaks_h2(h2_port: bool, pool: ConnectionPool | None) -> bool:
    """Whether the cluster sends HTTP/2 upstream (its port's protocol, or h2UpgradePolicy UPGRADE)."""
    return h2_port or (pool is not None and pool.h2_upgrade)


def uses_downstream(pool: ConnectionPool | None) -> bool:
    return pool is not None and pool.use_client_protocol


def circuit_breakers(pool: ConnectionPool | None) -> circuit_breaker_pb2.CircuitBreakers:
    pool = pool or ConnectionPool()
    threshold = circuit_breaker_pb2.CircuitBreakers.Thresholds(
        priority=base_pb2.DEFAULT,
        max_connections=_u32(pool.max_connections or UNLIMITED),
        max_pending_requests=_u32(pool.max_pending_requests or UNLIMITED),
        max_requests=_u32(pool.max_requests or UNLIMITED),
    )
    if pool.max_retries is not None:
        threshold.max_retries.CopyFrom(_u32(pool.max_retries))
    else:
        threshold.retry_budget.CopyFrom(
            circuit_breaker_pb2.CircuitBreakers.Thresholds.RetryBudget(
                budget_percent=percent_pb2.Percent(value=RETRY_BUDGET_PERCENT),
                min_retry_concurrency=_u32(RETRY_BUDGET_MIN_CONCURRENCY),
            )
        )
    return circuit_breaker_pb2.CircuitBreakers(thresholds=[threshold])


def http_protocol_options(
    protocol: Protocol, h2_port: bool, pool: ConnectionPool | None
) -> hpo.HttpProtocolOptions | None:
    """The cluster's upstream HTTP protocol options, or None when the defaults apply."""
    if protocol is not Protocol.HTTP:
        return None
    pool = pool or ConnectionPool()
    common = protocol_pb2.HttpProtocolOptions()
    if pool.idle_timeout is not None:
        common.idle_timeout.CopyFrom(duration(pool.idle_timeout))
    if pool.max_requests_per_connection is not None:
        common.max_requests_per_connection.CopyFrom(_u32(pool.max_requests_per_connection))
    h2 = protocol_pb2.Http2ProtocolOptions()
    if pool.max_concurrent_streams is not None:
        h2.max_concurrent_streams.CopyFrom(_u32(pool.max_concurrent_streams))
    options = hpo.HttpProtocolOptions()
    if common.ListFields():
        options.common_http_protocol_options.CopyFrom(common)
    if uses_downstream(pool):
        options.use_downstream_protocol_config.http_protocol_options.SetInParent()
        options.use_downstream_protocol_config.http2_protocol_options.CopyFrom(h2)
    elif speaks_h2(h2_port, pool):
        options.explicit_http_config.http2_protocol_options.CopyFrom(h2)
    elif common.ListFields():
        options.explicit_http_config.http_protocol_options.SetInParent()
    else:
        return None
    return options


def outlier_detection(outlier: Outlier) -> outlier_detection_pb2.OutlierDetection:
    out = outlier_detection_pb2.OutlierDetection(
        consecutive_5xx=_u32(outlier.consecutive_5xx),
        enforcing_consecutive_5xx=_u32(100 if outlier.consecutive_5xx > 0 else 0),
        enforcing_success_rate=_u32(0),
    )
    if outlier.consecutive_gateway is not None:
        out.consecutive_gateway_failure.CopyFrom(_u32(outlier.consecutive_gateway))
        out.enforcing_consecutive_gateway_failure.CopyFrom(
            _u32(100 if outlier.consecutive_gateway > 0 else 0)
        )
    if outlier.interval is not None:
        out.interval.CopyFrom(duration(outlier.interval))
    if outlier.base_ejection_time is not None:
        out.base_ejection_time.CopyFrom(duration(outlier.base_ejection_time))
    if outlier.max_ejection_percent is not None:
        out.max_ejection_percent.CopyFrom(_u32(outlier.max_ejection_percent))
    return out


def apply_traffic(
    cluster: cluster_pb2.Cluster,
    protocol: Protocol,
    h2_port: bool,
    pool: ConnectionPool | None,
    outlier: Outlier | None,
) -> None:
    """Circuit breakers, connect timeout, protocol options and outlier detection on `cluster`."""
    cluster.circuit_breakers.CopyFrom(circuit_breakers(pool))
    if pool is not None and pool.connect_timeout is not None:
        cluster.connect_timeout.CopyFrom(duration(pool.connect_timeout))
    options = http_protocol_options(protocol, h2_port, pool)
    if options is not None:
        cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(packed(options))
    if outlier is not None:
        cluster.outlier_detection.CopyFrom(outlier_detection(outlier))
        cluster.common_lb_config.healthy_panic_threshold.CopyFrom(percent_pb2.Percent(value=0.0))
