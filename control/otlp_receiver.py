"""An embedded OTLP/gRPC trace receiver: the last N traces, in memory.

``pillion control --otlp-port 4317`` runs it next to the xDS server, so a
demo mesh needs no external collector; ``/debug/traces`` on the debug port
serves what it holds and ``pillion traces`` prints it as trees. It keeps at
most ``limit`` traces (the oldest trace is forgotten first) and at most
``span_limit`` spans per trace, so a busy mesh cannot grow it without bound.

Usable on its own (tests): ``async with OtlpReceiver() as rx: rx.port``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

_KINDS = {trace_pb2.Span.SPAN_KIND_SERVER: "SERVER", trace_pb2.Span.SPAN_KIND_CLIENT: "CLIENT",
          trace_pb2.Span.SPAN_KIND_INTERNAL: "INTERNAL", trace_pb2.Span.SPAN_KIND_PRODUCER: "PRODUCER",
          trace_pb2.Span.SPAN_KIND_CONSUMER: "CONSUMER"}
_STATUS = {trace_pb2.Status.STATUS_CODE_UNSET: "UNSET", trace_pb2.Status.STATUS_CODE_OK: "OK",
           trace_pb2.Status.STATUS_CODE_ERROR: "ERROR"}


def _value(v: common_pb2.AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "string_value":
        return v.string_value
    if which == "int_value":
        return v.int_value
    if which == "bool_value":
        return v.bool_value
    if which == "double_value":
        return v.double_value
    return str(v)


def span_dict(service: str, span: trace_pb2.Span) -> dict[str, Any]:
    """One received span as plain JSON-able values (ids in hex)."""
    return {
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
        "parent_span_id": span.parent_span_id.hex(),
        "name": span.name,
        "kind": _KINDS.get(span.kind, "UNSPECIFIED"),
        "service": service,
        "start_ns": span.start_time_unix_nano,
        "duration_ms": max(0, span.end_time_unix_nano - span.start_time_unix_nano) / 1e6,
        "status": _STATUS.get(span.status.code, "UNSET"),
        "attributes": {kv.key: _value(kv.value) for kv in span.attributes},
    }


class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, owner: OtlpReceiver) -> None:
        self.owner = owner

    async def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
                     context: grpc.aio.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        self.owner.ingest(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    def __init__(self, limit: int = 100, span_limit: int = 1000) -> None:
        self.limit = limit
        self.span_limit = span_limit
        self.port = 0
        self.spans_received = 0
        self._traces: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self._server: grpc.aio.Server | None = None

    def ingest(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        traces = self._traces
        for rs in request.resource_spans:
            service = next((kv.value.string_value for kv in rs.resource.attributes if kv.key == "service.name"), "")
            for ss in rs.scope_spans:
                for span in ss.spans:
                    self.spans_received += 1
                    key = span.trace_id.hex()
                    spans = traces.get(key)
                    if spans is None:
                        spans = traces[key] = []
                        while len(traces) > self.limit:
                            traces.popitem(last=False)
                    else:
                        traces.move_to_end(key)
                    if len(spans) < self.span_limit:
                        spans.append(span_dict(service, span))

    def traces(self) -> list[dict[str, Any]]:
        """The traces held, most recently updated first, each with its spans by start time."""
        return [{"trace_id": tid, "spans": sorted(spans, key=lambda s: s["start_ns"])}
                for tid, spans in reversed(self._traces.items())]

    def status(self) -> dict[str, Any]:
        return {"spans_received": self.spans_received, "traces": self.traces()}

    def add_to_server(self, server: grpc.aio.Server) -> None:
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(self), server)

    async def start(self, address: str = "127.0.0.1", port: int = 0) -> int:
        server = grpc.aio.server()
        self.add_to_server(server)
        bound = server.add_insecure_port(f"{address}:{port}")
        if bound == 0:
            raise OSError(f"cannot bind the OTLP port {address}:{port}")
        await server.start()
        self._server, self.port = server, bound
        return bound

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0.5)
            self._server = None

    async def __aenter__(self) -> OtlpReceiver:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
