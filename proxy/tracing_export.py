"""OTLP/gRPC export of queued span records (runs on the exporter thread only).

``proxy.tracing`` imports this module by name from its background thread, so
the hot path never loads protobuf or gRPC. Records become an
``ExportTraceServiceRequest`` (opentelemetry-proto) grouped by service name,
sent with a deadline; any failure raises and the caller drops and counts the
batch (no retry: a retry would only make the queue fill faster).

Why protos and not the SDK's ``OTLPSpanExporter``: that exporter takes SDK
``ReadableSpan`` objects (a span object, its context and attribute containers
per span) and retries with backoff for up to its timeout; our records are
already plain tuples and dropping beats waiting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

SCOPE = common_pb2.InstrumentationScope(name="pillion")
_KIND_SERVER = trace_pb2.Span.SPAN_KIND_SERVER
_KIND_CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT


def _kv(key: str, value: str | int) -> common_pb2.KeyValue:
    if isinstance(value, int):
        return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(int_value=value))
    return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=value))


def to_span(rec: Sequence[Any]) -> trace_pb2.Span:
    """One queued record (see ``proxy.tracing.SpanRecord``) as an OTLP span."""
    (settings, trace_id, span_id, parent_id, start_ns, end_ns, method, host, path, status, flags,
     cluster, peer_addr, spiffe, workload, namespace) = rec
    m = method.decode("latin-1")
    h = host.decode("latin-1")
    p = path.decode("latin-1")
    url_path = p.split("?", 1)[0]
    attrs = [
        _kv("http.request.method", m),
        _kv("url.path", url_path),
        _kv("server.address", h),
        _kv("http.response.status_code", status),
        _kv("network.peer.address", peer_addr.decode("latin-1") if isinstance(peer_addr, bytes) else peer_addr),
        _kv("istio.canonical_service", settings.service_name.split(".", 1)[0]),
        _kv("istio.namespace", namespace),
        _kv("istio.workload", workload),
        _kv("upstream_cluster", cluster),
        _kv("response_flags", flags or "-"),
        _kv("retry_count", 0),
    ]
    if spiffe:
        attrs.append(_kv("peer.spiffe_id", spiffe))
    error = status >= 500 or status == 0
    return trace_pb2.Span(
        trace_id=bytes.fromhex(trace_id.decode()),
        span_id=bytes.fromhex(span_id.decode()),
        parent_span_id=bytes.fromhex(parent_id.decode()) if parent_id else b"",
        name=f"{h}{url_path}",  # Envoy's default operation name: host + path
        kind=_KIND_SERVER if settings.server else _KIND_CLIENT,
        start_time_unix_nano=start_ns,
        end_time_unix_nano=end_ns,
        attributes=attrs,
        status=trace_pb2.Status(code=trace_pb2.Status.STATUS_CODE_ERROR if error else trace_pb2.Status.STATUS_CODE_UNSET),
    )


def to_request(batch: Sequence[Sequence[Any]]) -> trace_service_pb2.ExportTraceServiceRequest:
    by_service: dict[str, list[trace_pb2.Span]] = {}
    for rec in batch:
        by_service.setdefault(rec[0].service_name, []).append(to_span(rec))
    return trace_service_pb2.ExportTraceServiceRequest(resource_spans=[
        trace_pb2.ResourceSpans(
            resource=resource_pb2.Resource(attributes=[_kv("service.name", service)]),
            scope_spans=[trace_pb2.ScopeSpans(scope=SCOPE, spans=spans)],
        )
        for service, spans in by_service.items()
    ])


class Sender:
    """One insecure channel per collector address, reopened when the address changes."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._target = ""
        self._channel: grpc.Channel | None = None
        self._stub: Any = None

    def send(self, target: str, batch: Sequence[Sequence[Any]]) -> None:
        if target != self._target or self._stub is None:
            self.close()
            self._channel = grpc.insecure_channel(target)
            self._stub = trace_service_pb2_grpc.TraceServiceStub(self._channel)
            self._target = target
        self._stub.Export(to_request(batch), timeout=self.timeout)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._stub = None
