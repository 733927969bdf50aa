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

What is sent is encoded by ``encode_request``: the protobuf wire format of the
same ExportTraceServiceRequest that ``to_request`` builds with the
opentelemetry-proto classes (the tests decode one and compare it with the
other). The exporter shares the worker's core and GIL with the data plane, and
building a dozen KeyValue/AnyValue messages per span cost more than the
request it describes; the wire encoding of this fixed, small schema costs a
few bytes operations per field, and the attributes that never change for a
worker are encoded once.
"""

from __future__ import annotations

from binascii import unhexlify
from collections.abc import Sequence
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
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
     cluster, peer_addr, spiffe, workload, namespace, retries) = rec
    m = method.decode("latin-1")
    h = host.decode("latin-1")
    p = path.decode("latin-1")
    url_path = p.split("?", 1)[0]
    attrs = [  # url.path first: the rest is the same for most spans (encode_span encodes it once)
        _kv("url.path", url_path),
        _kv("http.request.method", m),
        _kv("server.address", h),
        _kv("http.response.status_code", status),
        _kv("network.peer.address", peer_addr.decode("latin-1") if isinstance(peer_addr, bytes) else peer_addr),
        _kv("istio.canonical_service", settings.service_name.split(".", 1)[0]),
        _kv("istio.namespace", namespace),
        _kv("istio.workload", workload),
        _kv("upstream_cluster", cluster),
        _kv("response_flags", flags or "-"),
        _kv("retry_count", retries),
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


# ---- the wire encoding (protobuf, proto3): tags are (field number << 3) | wire type


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes, message) with its pre-encoded tag."""
    return tag + _varint(len(payload)) + payload


_KV_KEY, _KV_VALUE, _ANY_STRING, _ANY_INT = b"\x0a", b"\x12", b"\x0a", b"\x18"


_keys: dict[str, bytes] = {}


def _wire_kv(key: str, value: str | int) -> bytes:
    k = _keys.get(key)
    if k is None:
        k = _keys[key] = _ld(_KV_KEY, key.encode())
    if isinstance(value, int):
        any_value = _ANY_INT + _varint(value & 0xFFFFFFFFFFFFFFFF)
    else:
        any_value = _ld(_ANY_STRING, value.encode())
    return _ld(b"\x4a", k + _ld(_KV_VALUE, any_value))  # Span.attributes = 9


_STATUS_ERROR = _ld(b"\x7a", b"\x18\x02")  # Span.status = 15 {code = 3: ERROR}
_STATUS_UNSET = _ld(b"\x7a", b"")
_KIND = {True: b"\x30\x02", False: b"\x30\x03"}  # Span.kind = 6: SERVER 2, CLIENT 3
_SCOPE = _ld(b"\x0a", _ld(b"\x0a", b"pillion"))  # ScopeSpans.scope = 1 {name = 1}
_constant_attrs: dict[tuple[str, str, str], bytes] = {}


def _constants(service_name: str, workload: str, namespace: str) -> bytes:
    key = (service_name, workload, namespace)
    found = _constant_attrs.get(key)
    if found is None:
        if len(_constant_attrs) > 64:
            _constant_attrs.clear()
        found = _constant_attrs[key] = (
            _wire_kv("istio.canonical_service", service_name.split(".", 1)[0])
            + _wire_kv("istio.namespace", namespace) + _wire_kv("istio.workload", workload))
    return found


_attr_cache: dict[tuple[str, str | int], bytes] = {}


def _attr(key: str, value: str | int) -> bytes:
    """An encoded attribute; most values repeat span after span (method, host, cluster, code, peer)."""
    k = (key, value)
    found = _attr_cache.get(k)
    if found is None:
        if len(_attr_cache) >= 4096:
            _attr_cache.clear()
        found = _attr_cache[k] = _wire_kv(key, value)
    return found


_shape_cache: dict[tuple[Any, ...], bytes] = {}


def _shape(rec: Sequence[Any]) -> bytes:
    """The attributes after url.path, encoded once per distinct combination (most spans share one)."""
    (settings, _t, _s, _p, _st, _en, method, host, _path, status, flags,
     cluster, peer_addr, spiffe, workload, namespace, retries) = rec
    key = (method, host, status, peer_addr, settings.service_name, workload, namespace, cluster, flags, retries,
           spiffe)
    found = _shape_cache.get(key)
    if found is None:
        if len(_shape_cache) >= 4096:
            _shape_cache.clear()
        found = b"".join((
            _wire_kv("http.request.method", method.decode("latin-1")),
            _wire_kv("server.address", host.decode("latin-1")),
            _wire_kv("http.response.status_code", status),
            _wire_kv("network.peer.address", peer_addr.decode("latin-1") if isinstance(peer_addr, bytes)
                     else peer_addr),
            _constants(settings.service_name, workload, namespace),
            _wire_kv("upstream_cluster", cluster),
            _wire_kv("response_flags", flags or "-"),
            _wire_kv("retry_count", retries),
            _wire_kv("peer.spiffe_id", spiffe) if spiffe else b"",
        ))
        _shape_cache[key] = found
    return found


def encode_span(rec: Sequence[Any]) -> bytes:
    """One queued record as the wire bytes of an OTLP Span (the fields ``to_span`` sets, same order)."""
    settings, trace_id, span_id, parent_id, start_ns, end_ns, _m, host, path, status = rec[:10]
    url_path = path.decode("latin-1").split("?", 1)[0]
    parts = [
        b"\x0a\x10", unhexlify(trace_id),  # trace_id = 1 (16 bytes)
        b"\x12\x08", unhexlify(span_id),  # span_id = 2 (8 bytes)
    ]
    if parent_id:
        parts += (b"\x22\x08", unhexlify(parent_id))  # parent_span_id = 4
    parts += (
        _ld(b"\x2a", (host.decode("latin-1") + url_path).encode()),  # name = 5 (a proto string: UTF-8)
        _KIND[bool(settings.server)],
        b"\x39", start_ns.to_bytes(8, "little"),  # start_time_unix_nano = 7 (fixed64)
        b"\x41", end_ns.to_bytes(8, "little"),  # end_time_unix_nano = 8 (fixed64)
        _attr("url.path", url_path),
        _shape(rec),
        _STATUS_ERROR if status >= 500 or status == 0 else _STATUS_UNSET,
    )
    return b"".join(parts)


def encode_request(batch: Sequence[Sequence[Any]]) -> bytes:
    """The wire bytes of ``to_request(batch)``."""
    by_service: dict[str, list[bytes]] = {}
    for rec in batch:
        by_service.setdefault(rec[0].service_name, []).append(_ld(b"\x12", encode_span(rec)))  # ScopeSpans.spans = 2
    out = []
    for service, spans in by_service.items():
        resource = _ld(b"\x0a", _wire_kv_resource(service))  # ResourceSpans.resource = 1
        scope_spans = _ld(b"\x12", _SCOPE + b"".join(spans))  # ResourceSpans.scope_spans = 2
        out.append(_ld(b"\x0a", resource + scope_spans))  # ExportTraceServiceRequest.resource_spans = 1
    return b"".join(out)


def _wire_kv_resource(service: str) -> bytes:
    # Resource.attributes = 1 (the tag differs from Span.attributes)
    return _ld(b"\x0a", _ld(_KV_KEY, b"service.name") + _ld(_KV_VALUE, _ld(_ANY_STRING, service.encode())))


_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class Sender:
    """One insecure channel per collector address, reopened when the address changes."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._target = ""
        self._channel: grpc.Channel | None = None
        self._export: Any = None

    def send(self, target: str, batch: Sequence[Sequence[Any]]) -> None:
        if target != self._target or self._export is None:
            self.close()
            self._channel = grpc.insecure_channel(target)
            self._export = self._channel.unary_unary(_EXPORT)  # bytes in, bytes out: already encoded
            self._target = target
        self._export(encode_request(batch), timeout=self.timeout)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._export = None
