"""Spans for HTTP requests: started and queued on the hot path, exported off it.

On the path (``begin`` from ``Stream.prepare``, ``end`` from ``Stream._record``)
a request only reads its incoming trace context, makes a span id, writes the
upstream's ``traceparent`` (and B3 headers if it came with B3) and, if
sampled, appends one small tuple to a bounded deque. Nothing is formatted
and no protobuf is touched there.

Sampling: a request that arrives with a sampling decision keeps it (parent-based).
A new trace is sampled by its trace id, as OpenTelemetry's trace-id ratio sampler
does: the ids are random, so ``sample_percent`` % of new traces are sampled, and the
decision is one bytes comparison (``TraceSettings.sample_below``), no random draw.
A context that came without a decision (B3 without ``x-b3-sampled``) draws one.

A background thread (one per worker, started on the first snapshot that
traces) wakes every ``flush_interval`` seconds, drains the deque in batches
and sends them over OTLP/gRPC (``proxy.tracing_export``, imported by the
thread only, so the data plane never loads protobuf or gRPC). A full deque,
or a collector that is down or slow, costs dropped spans, counted in
``dropped_queue_full`` and ``dropped_export``, never request latency: the
loop thread never waits for the exporter.

Thread safety: the loop thread only appends to the deque (``deque.append`` is
atomic); the exporter thread only pops from it. Each counter has one writer.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from binascii import hexlify
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from proxy import tracecontext as tc
from proxy.model import Listener, Snapshot, TraceSettings

if TYPE_CHECKING:
    from proxy.stream import Stream

log = logging.getLogger("pillion.tracing")

_ZERO_SPAN = b"0" * 16
_POOL_BYTES = 24 * 256  # random bytes for 256 (trace id, span id) pairs
_POOL_BITS = _POOL_BYTES * 8
QUEUE_LIMIT = 16384  # 0.2 s of spans at 80k requests/s; a tuple each (a few MiB at most)
BATCH_SIZE = 512

# One finished span, as queued (positional, to stay a plain tuple):
# (settings, trace_id, span_id, parent_id, start_ns, end_ns, method, host, path, status, flags,
#  upstream_cluster, peer_address, peer_spiffe_id, workload, namespace, retries)
SpanRecord = tuple[Any, ...]


class ActiveSpan:
    """A sampled request's span while it is in flight."""

    __slots__ = ("parent_id", "settings", "span_id", "start_ns", "trace_id")

    def __init__(self, settings: TraceSettings, trace_id: bytes, span_id: bytes, parent_id: bytes,
                 start_ns: int) -> None:
        self.settings = settings
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.start_ns = start_ns


_TP, _B3, _B3_TRACE_ID = tc.TRACEPARENT, tc.B3, tc.B3_TRACE_ID
# A line is b"traceparent: 00-", the trace id (32 hex), b"-", the span id (16 hex), b"-", the flags, CRLF.
_LINE = b"traceparent: 00-" + b"0" * 32 + b"-" + b"0" * 16 + b"-00\r\n"
_ID_END = 16 + 32
_FLAGS_AT = _ID_END + 1 + 16 + 1
_LINES = _POOL_BYTES // 24
_TEMPLATE = _LINE * _LINES
# Hex digit k of every line's ids, column by column: (where it goes in the lines, where it is in the pool)
_COLUMNS = [(slice(16 + k, None, len(_LINE)), slice(k, None, 48)) for k in range(32)] + [
    (slice(_ID_END + 1 + k, None, len(_LINE)), slice(32 + k, None, 48)) for k in range(16)]


def _fresh_lines(ctx: Any) -> list[bytes]:
    """The next 256 unsampled ``traceparent`` header lines of new traces, made in one go.

    One random draw and one hexlify per 256 requests, and the ids are copied into a
    template of 256 lines one hex column at a time (48 strided copies cost about half
    of 256 formatted lines). A request then takes its line with one ``list.pop``; a
    sampled one flips the flags (see ``begin``)."""
    while True:
        pool = hexlify(ctx.getrandbits(_POOL_BITS).to_bytes(_POOL_BYTES, "little"))
        if _ZERO_SPAN not in pool:  # all-zero ids are invalid (W3C); 2**-64 a line, but never send one
            break
    buf = bytearray(_TEMPLATE)
    for dst, src in _COLUMNS:
        buf[dst] = pool[src]
    return bytes(buf).splitlines(keepends=True)


def begin(st: Stream, settings: TraceSettings, parts: list[bytes]) -> None:
    """Read the request's context, make our span, and append the upstream's header lines to ``parts``.

    Sets ``st.span`` only when the request is sampled; an unsampled one still propagates."""
    hdrs = st.hdrs
    ctx = st.ctx
    if _TP not in hdrs and _B3 not in hdrs and _B3_TRACE_ID not in hdrs:
        # A new trace (the usual case at the edge of the mesh): the next ready-made line.
        lines = ctx.trace_lines
        line = lines.pop() if lines else _new_lines(ctx)
        if line < settings.sample_below:  # the trace id decides (see TraceSettings.sample_below)
            st.span = ActiveSpan(settings, line[16:_ID_END], line[_ID_END + 1:_FLAGS_AT - 1], b"", time.time_ns())
            line = line[:_FLAGS_AT] + b"01\r\n"
        parts.append(line)
        return
    incoming = tc.extract(hdrs)
    span_id = tc.new_span_id(ctx.getrandbits)
    if incoming is None:
        trace_id, parent_id, style = tc.new_trace_id(ctx.getrandbits), b"", tc.STYLE_NONE
        sampled = tc.sample(None, settings.sample_percent, ctx.random())
    else:
        trace_id, parent_id, style = incoming.trace_id, incoming.span_id, incoming.style
        sampled = tc.sample(incoming.sampled, settings.sample_percent, ctx.random())
    if sampled:
        st.span = ActiveSpan(settings, trace_id, span_id, parent_id, time.time_ns())
    parts.append(b"traceparent: " + tc.format_traceparent(trace_id, span_id, sampled) + b"\r\n")
    if style == tc.STYLE_B3_MULTI or style == tc.STYLE_B3_SINGLE:
        parts += tc.b3_headers(trace_id, span_id, parent_id, sampled, style)


def _new_lines(ctx: Any) -> bytes:
    lines = ctx.trace_lines = _fresh_lines(ctx)
    return lines.pop()


def end(st: Stream, span: ActiveSpan, status: int, flags: str) -> None:
    """Queue the finished span (called once, from the stream's ending)."""
    st.span = None
    ctx = st.ctx
    conn = st.conn
    peer = conn.peer
    rt = st.cluster
    node = ctx.node
    ctx.tracer.offer((
        span.settings, span.trace_id, span.span_id, span.parent_id, span.start_ns, time.time_ns(),
        st.method, st.host, st.path, status, flags, rt.spec.name if rt is not None else "",
        conn.client_ip, peer.spiffe_id if peer is not None else "",
        node.get("workload", ""), node.get("namespace", ""), max(st.attempt - 1, 0),
    ))


class Tracer:
    """One worker's span queue and exporter thread."""

    def __init__(self, *, limit: int = QUEUE_LIMIT, flush_interval: float = 0.2, timeout: float = 2.0) -> None:
        self.queue: deque[SpanRecord] = deque()
        self.limit = limit
        self.flush_interval = flush_interval
        self.timeout = timeout  # per export call
        self.target = ""  # "host:port" of the collector; "" = none known (spans are dropped)
        self.dropped_queue_full = 0  # written by the loop thread only
        self.dropped_export = 0  # written by the exporter thread only
        self.exported = 0  # written by the exporter thread only
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------ loop thread
    def offer(self, record: SpanRecord) -> None:
        q = self.queue
        if len(q) >= self.limit:
            self.dropped_queue_full += 1
            return
        q.append(record)

    def update(self, snapshot: Snapshot) -> None:
        """On swap: find the collector (the first traced listener's cluster) and start exporting."""
        settings = next(_traced(snapshot.listeners), None)
        if settings is None:
            return
        cluster = snapshot.clusters.get(settings.collector_cluster)
        eps = cluster.endpoints if cluster is not None else ()
        self.target = eps[0].address if eps else ""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pillion-span-export", daemon=True)
            self._thread.start()

    def stats(self) -> dict[str, int]:
        return {"dropped_queue_full": self.dropped_queue_full, "dropped_export": self.dropped_export,
                "exported": self.exported}

    def close(self) -> None:
        """Stop the exporter after one last flush (bounded by the export timeout)."""
        t = self._thread
        if t is not None:
            self._thread = None
            self._stop.set()
            t.join(self.timeout + 1.0)

    # ------------------------------------------------------------------ exporter thread
    def _run(self) -> None:
        export = importlib.import_module("proxy.tracing_export")  # protobuf and gRPC: this thread only
        sender = export.Sender(self.timeout)
        try:
            while True:
                stopping = self._stop.wait(self.flush_interval)
                self._flush(sender)
                if stopping:
                    return
        finally:
            sender.close()

    def _flush(self, sender: Any) -> None:
        q = self.queue
        while q:
            batch: list[SpanRecord] = []
            while q and len(batch) < BATCH_SIZE:
                batch.append(q.popleft())
            target = self.target
            if not target:
                self.dropped_export += len(batch)
                continue
            try:
                sender.send(target, batch)
                self.exported += len(batch)
            except Exception as exc:  # a down or slow collector: drop and count
                self.dropped_export += len(batch)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("span export to %s failed: %s", target, exc)


def _traced(listeners: Iterable[Listener]) -> Iterator[TraceSettings]:
    for ls in listeners:
        if ls.http is not None and ls.http.tracing is not None:
            yield ls.http.tracing
        cap = ls.capture
        if cap is not None:
            yield from _traced(cap.by_port.values())
            if cap.default is not None:
                yield from _traced((cap.default,))
