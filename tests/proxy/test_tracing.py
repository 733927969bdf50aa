"""Trace context propagation (W3C, B3), sampling, the span queue, and the HCM `tracing` compile."""

from __future__ import annotations

import random
from binascii import hexlify

import pytest
from envoy.config.core.v3 import grpc_service_pb2
from envoy.config.trace.v3 import http_tracer_pb2, opentelemetry_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from proxy import model, tracing
from proxy import tracecontext as tc
from proxy.compile_tracing import with_tracing
from proxy.errors import InvalidResource
from proxy.tracing import Tracer
from proxy.tracing_export import encode_request, to_request

TRACE = b"4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = b"00f067aa0ba902b7"


def test_traceparent_round_trip() -> None:
    for sampled in (True, False):
        value = tc.format_traceparent(TRACE, SPAN, sampled)
        got = tc.parse_traceparent(value)
        assert got is not None
        assert (got.trace_id, got.span_id, got.sampled, got.style) == (TRACE, SPAN, sampled, tc.STYLE_W3C)


@pytest.mark.parametrize("bad", [
    b"", b"garbage", b"00-" + TRACE + b"-" + SPAN, b"00-" + TRACE + b"-" + SPAN + b"-01-extra",
    b"ff-" + TRACE + b"-" + SPAN + b"-01", b"00-" + b"0" * 32 + b"-" + SPAN + b"-01",
    b"00-" + TRACE + b"-" + b"0" * 16 + b"-01", b"00-" + TRACE.upper() + b"-" + SPAN + b"-01",
    b"00-" + TRACE + b"-" + SPAN + b"-zz", b"0x-" + TRACE + b"-" + SPAN + b"-01",
])
def test_malformed_traceparent_is_ignored(bad: bytes) -> None:
    assert tc.parse_traceparent(bad) is None
    assert tc.extract({b"traceparent": bad}) is None


def test_future_traceparent_version_may_append_fields() -> None:
    got = tc.parse_traceparent(b"01-" + TRACE + b"-" + SPAN + b"-01-what-ever")
    assert got is not None and got.sampled


def test_b3_multi_round_trip_and_64_bit_ids() -> None:
    lines = tc.b3_headers(TRACE, SPAN, b"1111111111111111", True, tc.STYLE_B3_MULTI)
    hdrs = dict(line.rstrip(b"\r\n").split(b": ", 1) for line in lines)
    got = tc.parse_b3_multi(hdrs)
    assert got is not None and (got.trace_id, got.span_id, got.sampled) == (TRACE, SPAN, True)
    assert hdrs[b"x-b3-parentspanid"] == b"1111111111111111"
    short = tc.parse_b3_multi({b"x-b3-traceid": b"A3CE929D0E0E4736", b"x-b3-spanid": SPAN})
    assert short is not None and short.trace_id == b"0" * 16 + b"a3ce929d0e0e4736" and short.sampled is None
    debug = tc.parse_b3_multi({b"x-b3-traceid": TRACE, b"x-b3-spanid": SPAN, b"x-b3-flags": b"1",
                               b"x-b3-sampled": b"0"})
    assert debug is not None and debug.sampled is True
    assert tc.parse_b3_multi({b"x-b3-traceid": b"xyz", b"x-b3-spanid": SPAN}) is None
    assert tc.parse_b3_multi({b"x-b3-traceid": TRACE}) is None


def test_b3_single_round_trip() -> None:
    (line,) = tc.b3_headers(TRACE, SPAN, b"", False, tc.STYLE_B3_SINGLE)
    assert line == b"b3: " + TRACE + b"-" + SPAN + b"-0\r\n"
    got = tc.parse_b3_single(line[4:-2])
    assert got is not None and (got.trace_id, got.span_id, got.sampled) == (TRACE, SPAN, False)
    assert tc.parse_b3_single(TRACE + b"-" + SPAN) is not None
    for bad in (b"1", b"0", b"d", TRACE + b"-" + SPAN + b"-x", TRACE + b"-" + SPAN + b"-1-nothex",
                TRACE + b"-short", b"a-b-c-d-e"):
        assert tc.parse_b3_single(bad) is None


def test_extract_prefers_traceparent_then_b3() -> None:
    other = b"0af7651916cd43dd8448eb211c80319c"
    hdrs = {b"traceparent": tc.format_traceparent(TRACE, SPAN, True), b"b3": other + b"-" + SPAN + b"-1"}
    got = tc.extract(hdrs)
    assert got is not None and got.trace_id == TRACE
    hdrs[b"traceparent"] = b"broken"
    got = tc.extract(hdrs)
    assert got is not None and got.trace_id == other and got.style == tc.STYLE_B3_SINGLE


def test_ids_and_sampling() -> None:
    rng = random.Random(7)
    tid, sid = tc.new_trace_id(rng.getrandbits), tc.new_span_id(rng.getrandbits)
    assert len(tid) == 32 and len(sid) == 16 and tid != b"0" * 32
    assert tc.new_span_id(lambda _bits: 0) == b"0000000000000001"
    assert tc.sample(True, 0.0, 0.99) and not tc.sample(False, 100.0, 0.0)
    assert tc.sample(None, 1.0, 0.005) and not tc.sample(None, 1.0, 0.02)
    assert not tc.sample(None, 0.0, 0.0) and tc.sample(None, 100.0, 0.9999)


class _WorkerCtx:
    """What ``tracing.begin`` reads of a worker's context."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        self.getrandbits, self.random = rng.getrandbits, rng.random
        self.trace_lines: list[bytes] = []


class _St:
    def __init__(self, ctx: _WorkerCtx, hdrs: dict[bytes, bytes]) -> None:
        self.ctx, self.hdrs, self.span = ctx, hdrs, None


def test_new_traces_take_ready_made_lines_with_fresh_ids() -> None:
    # The lines are built a column at a time; they must be exactly what formatting each one gives.
    ctx = _WorkerCtx(11)
    lines = tracing._fresh_lines(ctx)
    rng = random.Random(11)
    pool = hexlify(rng.getrandbits(tracing._POOL_BITS).to_bytes(tracing._POOL_BYTES, "little"))
    assert lines == [b"traceparent: 00-%b-%b-00\r\n" % (pool[i:i + 32], pool[i + 32:i + 48])
                     for i in range(0, len(pool), 48)]
    # begin: every request of a new trace gets its own ids; a sampled one says so, and its span has them
    unsampled = model.TraceSettings(0.0, "c", "s", False)
    sampled = model.TraceSettings(100.0, "c", "s", False)
    ctx, seen = _WorkerCtx(3), set()
    for i in range(600):  # more than one pool's worth
        st = _St(ctx, {b"host": b"a"})
        parts: list[bytes] = []
        tracing.begin(st, sampled if i % 2 else unsampled, parts)  # type: ignore[arg-type]
        assert len(parts) == 1
        found = tc.parse_traceparent(parts[0][len(b"traceparent: "):-2])
        assert found is not None and found.style == tc.STYLE_W3C
        assert found.sampled == bool(i % 2)
        if i % 2:
            assert st.span is not None and (st.span.trace_id, st.span.span_id) == (found.trace_id, found.span_id)
            assert st.span.parent_id == b""
        else:
            assert st.span is None
        seen.add(found.trace_id)
    assert len(seen) == 600


@pytest.mark.parametrize("percent", [0.0, 0.5, 1.0, 25.0, 99.0, 100.0])
def test_new_traces_are_sampled_by_trace_id_at_the_configured_ratio(percent: float) -> None:
    settings = model.TraceSettings(percent, "c", "s", False)
    ctx, n, sampled = _WorkerCtx(percent), 20000, 0
    for _ in range(n):
        st = _St(ctx, {b"host": b"a"})
        parts: list[bytes] = []
        tracing.begin(st, settings, parts)  # type: ignore[arg-type]
        trace_id = parts[0][16:48]
        # the rule: a trace id below percent% of 2**128 is sampled, and the header says so
        assert (st.span is not None) == (int(trace_id, 16) < percent / 100 * 2**128)
        assert parts[0].endswith(b"-01\r\n" if st.span is not None else b"-00\r\n")
        sampled += st.span is not None
    # a binomial count: within 5 standard deviations of n * p (and exact at 0% and 100%)
    p = percent / 100
    assert abs(sampled - n * p) <= 5 * (n * p * (1 - p)) ** 0.5


def test_an_incoming_context_is_continued() -> None:
    st = _St(_WorkerCtx(5), {tc.TRACEPARENT: b"00-" + TRACE + b"-" + SPAN + b"-01"})
    parts: list[bytes] = []
    tracing.begin(st, model.TraceSettings(0.0, "c", "s", True), parts)  # type: ignore[arg-type]
    found = tc.parse_traceparent(parts[0][len(b"traceparent: "):-2])
    assert found is not None and found.trace_id == TRACE and found.span_id != SPAN and found.sampled
    assert st.span is not None and st.span.parent_id == SPAN  # parent-based: the caller sampled it


SETTINGS = model.TraceSettings(100.0, "outbound|4317||collector", "reviews.default", True)


def _record(i: int) -> tuple[object, ...]:
    return (SETTINGS, TRACE, b"%016x" % (i + 1), SPAN, 1_000, 2_000_000, b"GET", b"reviews", b"/r?q=1", 503, "UF",
            "outbound|9080||reviews", b"10.0.0.1", "spiffe://cluster.local/ns/default/sa/p", "reviews-v1", "default",
            i % 3)


def test_the_queue_is_bounded_and_counts_drops() -> None:
    tracer = Tracer(limit=3)
    for i in range(5):
        tracer.offer(_record(i))
    assert len(tracer.queue) == 3 and tracer.stats()["dropped_queue_full"] == 2


def test_records_become_otlp_spans() -> None:
    req = to_request([_record(0)])
    (rs,) = req.resource_spans
    assert rs.resource.attributes[0].value.string_value == "reviews.default"
    (span,) = rs.scope_spans[0].spans
    assert span.trace_id.hex() == TRACE.decode() and span.parent_span_id.hex() == SPAN.decode()
    assert span.name == "reviews/r" and span.kind == span.SPAN_KIND_SERVER
    assert span.status.code == span.status.STATUS_CODE_ERROR  # 5xx
    attrs = {kv.key: kv.value for kv in span.attributes}
    assert attrs["url.path"].string_value == "/r" and attrs["http.response.status_code"].int_value == 503
    assert attrs["response_flags"].string_value == "UF"
    assert attrs["peer.spiffe_id"].string_value == "spiffe://cluster.local/ns/default/sa/p"


def test_the_wire_encoding_is_the_same_message_as_the_proto_classes_build() -> None:
    """What the exporter sends (hand-encoded) decodes to exactly what opentelemetry-proto builds."""
    client = model.TraceSettings(1.0, "outbound|4317||collector", "productpage.default", False)
    batch = [_record(i) for i in range(3)]
    batch.append((client, TRACE, b"00000000000000ff", b"", 5, 10**18, b"POST", b"ratings:9080", b"/", 200, "",
                  "outbound|9080||ratings", "10.0.0.2", "", "productpage-v1", "default", 0))  # no parent, no peer id
    batch.append((SETTINGS, TRACE, b"0000000000000100", SPAN, 7, 8, b"GET", b"h", b"/x", 0, "DC",
                  "c", b"::1", "", "w", "ns", 2))  # status 0 (client gone): an error span
    batch.append((SETTINGS, TRACE, b"0000000000000101", SPAN, 7, 8, b"GET", b"h\xe9", b"/caf\xe9?q", 200, "",
                  "c", b"::1", "", "w", "ns", 0))  # bytes beyond ASCII: proto strings stay valid UTF-8
    wire = encode_request(batch)
    assert trace_service_pb2.ExportTraceServiceRequest.FromString(wire) == to_request(batch)


class _Ctx:
    def fail(self, path: str, message: str) -> InvalidResource:
        return InvalidResource("Listener", "l", path, message)


def _hcm(sampling: float | None = 25.0, cluster: str = "outbound|4317||collector") -> hcm_pb2.HttpConnectionManager:
    cfg = opentelemetry_pb2.OpenTelemetryConfig(
        grpc_service=grpc_service_pb2.GrpcService(envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=cluster)),
        service_name="reviews.default")
    packed = any_pb2.Any()
    packed.Pack(cfg)
    tr = hcm_pb2.HttpConnectionManager.Tracing(
        provider=http_tracer_pb2.Tracing.Http(name="envoy.tracers.opentelemetry", typed_config=packed))
    if sampling is not None:
        tr.random_sampling.CopyFrom(percent_pb2.Percent(value=sampling))
    return hcm_pb2.HttpConnectionManager(tracing=tr)


def test_compile_hcm_tracing() -> None:
    http = model.HttpSettings("p", "r")
    assert with_tracing(_Ctx(), hcm_pb2.HttpConnectionManager(), http, model.Direction.INBOUND, "x") is http
    got = with_tracing(_Ctx(), _hcm(), http, model.Direction.OUTBOUND, "x").tracing
    assert got == model.TraceSettings(25.0, "outbound|4317||collector", "reviews.default", False)
    got = with_tracing(_Ctx(), _hcm(None), http, model.Direction.INBOUND, "x").tracing
    assert got is not None and got.sample_percent == 100.0 and got.server


def test_compile_refuses_what_it_does_not_implement() -> None:
    m = _hcm()
    m.tracing.client_sampling.value = 10
    with pytest.raises(InvalidResource, match="client_sampling"):
        with_tracing(_Ctx(), m, model.HttpSettings("p", "r"), model.Direction.INBOUND, "x")
    m = _hcm()
    m.tracing.provider.typed_config.type_url = "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig"
    with pytest.raises(InvalidResource, match="OpenTelemetryConfig"):
        with_tracing(_Ctx(), m, model.HttpSettings("p", "r"), model.Direction.INBOUND, "x")
    with pytest.raises(InvalidResource, match="cluster_name"):
        with_tracing(_Ctx(), _hcm(cluster=""), model.HttpSettings("p", "r"), model.Direction.INBOUND, "x")
