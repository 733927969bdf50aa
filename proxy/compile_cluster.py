"""A Cluster's resilience and upstream-protocol settings in xDS -> ``model.Cluster`` fields.

A helper of ``compile.py`` (same rules: accept exactly what is implemented,
refuse any other set field with its path). Owns: circuit_breakers (the
DEFAULT priority's thresholds, max_retries or a retry_budget), outlier
detection (the consecutive-5xx and consecutive-gateway-failure detectors;
success-rate and local-origin detection must be off), common_lb_config
(panic mode off only), and the upstream HTTP protocol options
(typed_extension_protocol_options
"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": HTTP/1.1, HTTP/2
or the downstream's protocol; idle timeout, requests per connection,
HTTP/2 concurrent streams).
"""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import base_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo

from proxy import model
from proxy.compile_base import _Ctx, _only, _seconds

HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HTTP_PROTOCOL_OPTIONS_TYPE = "type.googleapis.com/" + HTTP_PROTOCOL_OPTIONS
CLUSTER_FIELDS = ("circuit_breakers", "outlier_detection", "typed_extension_protocol_options", "common_lb_config")
# Envoy's retry_budget defaults when the message is present.
ENVOY_BUDGET_PERCENT = 20.0
ENVOY_MIN_RETRY_CONCURRENCY = 3


def _u32(msg: Any, name: str, default: int) -> int:
    return int(getattr(msg, name).value) if msg.HasField(name) else default


def limits(ctx: _Ctx, cb: circuit_breaker_pb2.CircuitBreakers, path: str) -> model.CircuitBreakers:
    _only(ctx, cb, {"thresholds"}, path)
    found = model.DEFAULT_LIMITS
    for i, t in enumerate(cb.thresholds):
        here = f"{path}.thresholds[{i}]"
        _only(ctx, t, {"priority", "max_connections", "max_pending_requests", "max_requests", "max_retries",
                       "retry_budget"}, here)
        if t.priority != base_pb2.DEFAULT:
            raise ctx.fail(f"{here}.priority", "only the DEFAULT priority is supported (no priority routing)")
        if i:
            raise ctx.fail(here, "one threshold per priority")
        d = model.DEFAULT_LIMITS
        budget: float | None = None
        concurrency = d.min_retry_concurrency
        if t.HasField("retry_budget"):
            rb = t.retry_budget
            _only(ctx, rb, {"budget_percent", "min_retry_concurrency"}, f"{here}.retry_budget")
            budget = rb.budget_percent.value if rb.HasField("budget_percent") else ENVOY_BUDGET_PERCENT
            if not 0.0 <= budget <= 100.0:
                raise ctx.fail(f"{here}.retry_budget.budget_percent", "must be 0-100")
            concurrency = _u32(rb, "min_retry_concurrency", ENVOY_MIN_RETRY_CONCURRENCY)
        found = model.CircuitBreakers(
            max_connections=_u32(t, "max_connections", d.max_connections),
            max_pending_requests=_u32(t, "max_pending_requests", d.max_pending_requests),
            max_requests=_u32(t, "max_requests", d.max_requests),
            max_retries=_u32(t, "max_retries", d.max_retries),
            budget_percent=budget,
            min_retry_concurrency=concurrency,
        )
    return found


def outlier(ctx: _Ctx, od: outlier_detection_pb2.OutlierDetection, path: str) -> model.OutlierDetection:
    _only(ctx, od, {"consecutive_5xx", "enforcing_consecutive_5xx", "consecutive_gateway_failure",
                    "enforcing_consecutive_gateway_failure", "interval", "base_ejection_time", "max_ejection_time",
                    "max_ejection_percent", "enforcing_success_rate", "split_external_local_origin_errors"}, path)
    # Envoy enforces success-rate ejection by default; this proxy has no such detector, so it must be off.
    if _u32(od, "enforcing_success_rate", 100) != 0:
        raise ctx.fail(f"{path}.enforcing_success_rate", "must be 0 (success-rate outlier detection is not supported)")
    if od.split_external_local_origin_errors:
        raise ctx.fail(f"{path}.split_external_local_origin_errors", "true is not supported (no local-origin detector)")
    d = model.OutlierDetection()
    for name in ("enforcing_consecutive_5xx", "enforcing_consecutive_gateway_failure", "max_ejection_percent"):
        if _u32(od, name, 0) > 100:
            raise ctx.fail(f"{path}.{name}", "a percentage, 0-100")
    interval = _seconds(od.interval) if od.HasField("interval") else d.interval
    if interval <= 0:
        raise ctx.fail(f"{path}.interval", "must be positive")
    return model.OutlierDetection(
        consecutive_5xx=_u32(od, "consecutive_5xx", d.consecutive_5xx),
        enforcing_5xx=_u32(od, "enforcing_consecutive_5xx", d.enforcing_5xx),
        consecutive_gateway=_u32(od, "consecutive_gateway_failure", d.consecutive_gateway),
        enforcing_gateway=_u32(od, "enforcing_consecutive_gateway_failure", d.enforcing_gateway),
        interval=interval,
        base_ejection_time=_seconds(od.base_ejection_time) if od.HasField("base_ejection_time")
        else d.base_ejection_time,
        max_ejection_time=_seconds(od.max_ejection_time) if od.HasField("max_ejection_time") else d.max_ejection_time,
        max_ejection_percent=_u32(od, "max_ejection_percent", d.max_ejection_percent),
    )


def _protocol_options(ctx: _Ctx, c: cluster_pb2.Cluster, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in sorted(c.typed_extension_protocol_options):
        here = f'{path}["{name}"]'
        packed = c.typed_extension_protocol_options[name]
        if name != HTTP_PROTOCOL_OPTIONS or packed.type_url != HTTP_PROTOCOL_OPTIONS_TYPE:
            raise ctx.fail(here, f"only {HTTP_PROTOCOL_OPTIONS} is supported")
        options = hpo.HttpProtocolOptions()
        packed.Unpack(options)
        _only(ctx, options, {"common_http_protocol_options", "explicit_http_config", "use_downstream_protocol_config"},
              here)
        if options.HasField("common_http_protocol_options"):
            common = options.common_http_protocol_options
            _only(ctx, common, {"idle_timeout", "max_requests_per_connection"}, f"{here}.common_http_protocol_options")
            if common.HasField("idle_timeout"):
                out["idle_timeout"] = _seconds(common.idle_timeout)
            if common.HasField("max_requests_per_connection"):
                out["max_requests_per_connection"] = common.max_requests_per_connection.value
        h2: Any = None
        which = options.WhichOneof("upstream_protocol_options")
        if which == "explicit_http_config":
            explicit = options.explicit_http_config
            kind = explicit.WhichOneof("protocol_config")
            if kind == "http_protocol_options":
                _only(ctx, explicit.http_protocol_options, (), f"{here}.explicit_http_config.http_protocol_options")
            elif kind == "http2_protocol_options":
                h2, out["http2"] = explicit.http2_protocol_options, True
            else:
                raise ctx.fail(f"{here}.explicit_http_config", "http_protocol_options or http2_protocol_options")
        elif which == "use_downstream_protocol_config":
            down = options.use_downstream_protocol_config
            _only(ctx, down, {"http_protocol_options", "http2_protocol_options"},
                  f"{here}.use_downstream_protocol_config")
            _only(ctx, down.http_protocol_options, (),
                  f"{here}.use_downstream_protocol_config.http_protocol_options")
            h2, out["use_downstream_protocol"] = down.http2_protocol_options, True
        else:
            raise ctx.fail(here, "explicit_http_config or use_downstream_protocol_config is required")
        if h2 is not None:
            h2_path = f"{here}.{which}.http2_protocol_options"
            _only(ctx, h2, {"max_concurrent_streams"}, h2_path)
            if h2.HasField("max_concurrent_streams"):
                if h2.max_concurrent_streams.value < 1:
                    raise ctx.fail(f"{h2_path}.max_concurrent_streams", "must be positive")
                out["h2_max_concurrent_streams"] = h2.max_concurrent_streams.value
    return out


def cluster_extras(ctx: _Ctx, c: cluster_pb2.Cluster) -> dict[str, Any]:
    """The ``model.Cluster`` keyword arguments for the fields in ``CLUSTER_FIELDS``."""
    out = _protocol_options(ctx, c, "typed_extension_protocol_options")
    if c.HasField("circuit_breakers"):
        out["limits"] = limits(ctx, c.circuit_breakers, "circuit_breakers")
    if c.HasField("outlier_detection"):
        out["outlier"] = outlier(ctx, c.outlier_detection, "outlier_detection")
    if c.HasField("common_lb_config"):
        lb = c.common_lb_config
        _only(ctx, lb, {"healthy_panic_threshold"}, "common_lb_config")
        if not lb.HasField("healthy_panic_threshold") or lb.healthy_panic_threshold.value != 0:
            raise ctx.fail("common_lb_config.healthy_panic_threshold", "only 0 (panic mode off) is supported")
    return out
