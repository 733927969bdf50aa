"""HCM ``tracing`` (xDS) -> ``model.TraceSettings``.

Accepted: an ``envoy.tracers.opentelemetry`` provider whose ``grpc_service``
is an ``envoy_grpc`` cluster (the OTLP/gRPC collector), its ``service_name``,
``random_sampling`` (default 100%, as Envoy) and ``overall_sampling`` at
100% (a no-op). Client sampling (x-client-trace-id), custom tags, other
tracers and Zipkin-style settings are refused, not ignored.

The collector's address is resolved from the cluster's endpoints when a
snapshot is installed (``tracing.Tracer.update``), so EDS changes reach it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Protocol

from envoy.config.trace.v3 import opentelemetry_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf.message import Message

from proxy import model
from proxy.errors import InvalidResource

OTEL_TRACER = "envoy.tracers.opentelemetry"
OTEL_CONFIG_TYPE = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig"
DEFAULT_SERVICE_NAME = "unknown_service:pillion"


class Ctx(Protocol):
    def fail(self, path: str, message: str) -> InvalidResource: ...


def _only(ctx: Ctx, msg: Message, allowed: Iterable[str], path: str) -> None:
    allowed = set(allowed)
    for fd, _ in msg.ListFields():
        if fd.name not in allowed:
            raise ctx.fail(f"{path}.{fd.name}", "field is not supported by this proxy")


def with_tracing(ctx: Ctx, hcm: hcm_pb2.HttpConnectionManager, http: model.HttpSettings,
                 direction: model.Direction, path: str) -> model.HttpSettings:
    """``http`` with its ``tracing`` set when the HCM traces; ``path`` names the HCM."""
    if not hcm.HasField("tracing"):
        return http
    tr = hcm.tracing
    p = f"{path}.tracing"
    _only(ctx, tr, {"provider", "random_sampling", "overall_sampling"}, p)
    if tr.HasField("overall_sampling") and tr.overall_sampling.value != 100.0:
        raise ctx.fail(f"{p}.overall_sampling", "only 100 is supported")
    percent = tr.random_sampling.value if tr.HasField("random_sampling") else 100.0
    if not 0.0 <= percent <= 100.0:
        raise ctx.fail(f"{p}.random_sampling.value", "must be between 0 and 100")
    if not tr.HasField("provider"):
        raise ctx.fail(f"{p}.provider", "required (an envoy.tracers.opentelemetry provider)")
    prov = tr.provider
    _only(ctx, prov, {"name", "typed_config"}, f"{p}.provider")
    if prov.typed_config.type_url != OTEL_CONFIG_TYPE:
        raise ctx.fail(f"{p}.provider.typed_config", f"only {OTEL_TRACER} (OpenTelemetryConfig) is supported")
    cfg = opentelemetry_pb2.OpenTelemetryConfig()
    prov.typed_config.Unpack(cfg)
    cp = f"{p}.provider.typed_config"
    _only(ctx, cfg, {"grpc_service", "service_name"}, cp)
    gs = cfg.grpc_service
    _only(ctx, gs, {"envoy_grpc", "timeout"}, f"{cp}.grpc_service")
    _only(ctx, gs.envoy_grpc, {"cluster_name", "authority"}, f"{cp}.grpc_service.envoy_grpc")
    cluster = gs.envoy_grpc.cluster_name
    if not cluster:
        raise ctx.fail(f"{cp}.grpc_service.envoy_grpc.cluster_name", "required")
    settings = model.TraceSettings(percent, cluster, cfg.service_name or DEFAULT_SERVICE_NAME,
                                   direction is model.Direction.INBOUND)
    return replace(http, tracing=settings)
