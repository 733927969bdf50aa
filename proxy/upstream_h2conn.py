"""One HTTP/2 connection to an upstream endpoint (``H2UpstreamConnection``), one ``H2Exchange`` per request.

The framing is ``h2wire_client.ClientH2`` (sans-IO); this module is the
asyncio side and the per-request glue that ``upstream_h2.H2Pool`` hands out.

Strategy: the exchange converts the HTTP/1.1 head the core built into HEADERS
(pseudo-headers from the request line and ``host``, connection-specific
fields dropped) unless its stream already has them as HTTP/2 fields (a
request that came in over HTTP/2 and was not edited: ``Stream.h2_fields``),
sends DATA within the peer's windows and queues the rest, and acknowledges
response DATA only while its downstream is not paused, so a slow client
closes the server's window instead of filling memory. What the streams queue
is written once per loop iteration (one write for many streams), or at the
end of the ``data_received`` that produced it. A GOAWAY from the peer stops
new streams on that connection; the streams above its last_stream_id fail
with RefusedStreamError (retriable).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING, Any, cast

from proxy.errors import ProxyError, RefusedStreamError, UpstreamProtocolError, UpstreamResetError
from proxy.h2frames import CANCEL, NO_ERROR, REFUSED_STREAM, H2ConnectionError
from proxy.h2wire_client import MAX_SID, ClientH2

if TYPE_CHECKING:
    from proxy.upstream_h2 import H2Pool

log = logging.getLogger("pillion.upstream.h2")

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
PEND_HIGH = 64 * 1024  # request bytes queued past the peer's window before the downstream is paused
WINDOW = 1 << 20  # what we let an upstream send before we hand window back (stream and connection)

_DROP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"host",
                   b"te"})


class _Reset(UpstreamResetError):
    flag = "UR"
    body = b"upstream connect error or disconnect/reset before headers. reset reason: remote reset"


class _Lost(UpstreamResetError):
    flag = "UR"
    body = b"upstream connect error or disconnect/reset before headers. reset reason: connection termination"


_RESET, _LOST = _Reset(), _Lost()


def h2_headers(head: bytes, scheme: bytes) -> list[tuple[bytes, bytes]]:
    """The HTTP/1.1 head built by the core, as HTTP/2 request headers (RFC 9113 section 8.3)."""
    lines = head.split(b"\r\n")
    method, path, _ = lines[0].split(b" ", 2)
    authority = b""
    rest: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        value = value.strip()
        if name in _DROP:
            if name == b"host":
                authority = value
            elif name == b"te" and value.lower() == b"trailers":
                rest.append((b"te", b"trailers"))
            continue
        rest.append((name, value))
    return [(b":method", method), (b":scheme", scheme), (b":authority", authority), (b":path", path), *rest]


class H2Exchange:
    """One request on an ``H2UpstreamConnection``: what a stream's ``upstream`` is for HTTP/2."""

    __slots__ = ("closed", "conn", "end_pending", "exchange", "head_only", "paused", "pend", "pend_bytes", "sid",
                 "trailers", "unacked", "writer_paused")

    def __init__(self, conn: H2UpstreamConnection) -> None:
        self.conn = conn
        self.sid = 0  # allocated when the HEADERS go out (stream ids must rise in sending order)
        self.exchange: Any = None
        self.head_only = False
        self.closed = False
        self.paused = False
        self.unacked = 0
        self.pend: list[bytes] = []
        self.pend_bytes = 0
        self.end_pending = False
        self.trailers: list[tuple[bytes, bytes]] | None = None  # request trailers queued behind ``pend``
        self.writer_paused = False  # more than PEND_HIGH queued: the downstream must not be read

    def send_head(self, head: bytes, end_stream: bool) -> None:
        conn = self.conn
        if self.closed or conn.closed:
            return
        ex = self.exchange
        fields = ex.h2_fields(head, conn.scheme) if ex is not None else None  # [http2] no re-parse when unedited
        if fields is None:
            fields = h2_headers(head, conn.scheme)
        sid = self.sid = conn.h2.send_headers(fields, end_stream)
        if not sid:  # a GOAWAY came between acquire and now: never sent, so retriable (told once we return)
            conn.pool.loop.call_soon(conn.refuse, self)
            return
        conn.streams[sid] = self
        conn.want_flush()

    def send_data(self, data: bytes, end_stream: bool) -> None:
        if self.closed or not self.sid:
            return
        if self.pend:
            if data:
                self.pend.append(data)
                self.pend_bytes += len(data)
            self.end_pending = self.end_pending or end_stream
            if self.pend_bytes > PEND_HIGH and self.exchange is not None:
                self.writer_paused = True
                self.exchange.pause_downstream()
            return
        self._send(data, end_stream)
        self.conn.want_flush()

    def send_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """The request's trailers, which end the stream once every DATA byte queued before them is sent."""
        if self.closed or not self.sid:
            return
        if self.pend:
            self.trailers = trailers
            return
        self.conn.h2.send_trailers(self.sid, trailers)
        self.conn.want_flush()

    def _send(self, data: bytes, end_stream: bool) -> None:
        conn = self.conn
        h2 = conn.h2
        sid = self.sid
        n = len(data)
        window = h2.window(sid)
        frame = h2.max_frame
        if n <= window and n <= frame:
            h2.send_data(sid, data, end_stream)
            return
        view = memoryview(data)
        pos = 0
        while pos < n and window > 0:
            size = min(frame, window, n - pos)
            pos += size
            window -= size
            h2.send_data(sid, view[pos - size:pos], end_stream and pos == n)
        if pos < n:
            rest = data[pos:]
            self.pend.append(rest)
            self.pend_bytes += len(rest)
            self.end_pending = end_stream
            conn.blocked.add(self)
            if self.pend_bytes > PEND_HIGH and self.exchange is not None:
                self.writer_paused = True
                self.exchange.pause_downstream()

    def drain(self) -> None:
        """The peer opened its window: send what waited."""
        pend = self.pend
        self.pend = []
        self.pend_bytes = 0
        end = self.end_pending
        self.end_pending = False
        data = b"".join(pend)
        self._send(data, end)
        if not self.pend:
            trailers = self.trailers
            if trailers is not None:
                self.trailers = None
                self.conn.h2.send_trailers(self.sid, trailers)
            self.conn.blocked.discard(self)
            self.writer_paused = False
            if self.exchange is not None:
                self.exchange.resume_downstream()

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        if self.paused:
            self.paused = False
            if self.unacked and not self.closed:
                self.conn.ack(self)

    def release(self, reusable: bool) -> None:
        """The exchange is over; reset the stream unless both sides ended it."""
        self.exchange = None
        if not self.closed:
            self.closed = True
            self.conn.end(self, reset=not reusable)

    def abort(self) -> None:
        self.exchange = None
        if not self.closed:
            self.closed = True
            self.conn.end(self, reset=True)


class H2UpstreamConnection(asyncio.Protocol):
    __slots__ = ("_flush_handle", "_told", "_touched", "active", "blocked", "closed", "goaway", "h2", "idle_since",
                 "limit", "pool", "ready", "scheme", "streams", "transport", "uses")

    def __init__(self, pool: H2Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.h2 = ClientH2(self, WINDOW, WINDOW)
        self.streams: dict[int, H2Exchange] = {}
        self.blocked: set[H2Exchange] = set()
        self.active = 0  # exchanges handed out and not released (some may not have sent HEADERS yet)
        self.idle_since = pool.loop.time()  # when ``active`` last dropped to 0 (the cluster's idle_timeout)
        self.uses = 0
        self.limit = pool.max_streams
        self.goaway = False
        self.closed = False
        self.ready = False
        self.scheme = b"https" if pool.tls is not None else b"http"
        self._flush_handle: asyncio.Handle | None = None
        self._touched: list[H2Exchange] = []  # streams that got response bytes (their window to hand back)
        self._told: list[Any] = []  # exchanges to flush downstream once this batch is relayed

    # -- asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.h2.initiate()
        transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        touched = self._touched
        told = self._told
        try:
            self.h2.receive_data(data)
        except H2ConnectionError as e:
            log.info("HTTP/2 protocol error from %s:%s: %s", self.pool.host, self.pool.port, e)
            touched.clear()
            told.clear()
            self._fail_all(UpstreamProtocolError())
            self.flush()
            self.close()
            return
        if touched:
            for up in touched:
                if up.unacked and not up.paused and not up.closed:
                    self.ack(up)
            touched.clear()
        if told:
            self._told = []
            for ex in told:
                ex.on_upstream_flush()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        self._fail_all(_LOST)
        self.pool.forget(self)

    def pause_writing(self) -> None:
        for up in list(self.streams.values()):
            if up.exchange is not None:
                up.exchange.pause_downstream()

    def resume_writing(self) -> None:
        for up in list(self.streams.values()):
            if up.exchange is not None and not up.pend:
                up.exchange.resume_downstream()

    # -- codec callbacks (h2wire_client.ClientHandler)
    def on_response(self, sid: int, status: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        up = self.streams.get(sid)
        if up is not None:
            ex = up.exchange
            if ex is not None:
                ex.on_upstream_head(status, b"", headers, True)
                self._told.append(ex)

    def on_data(self, sid: int, data: bytes, flow_len: int) -> None:
        up = self.streams.get(sid)
        if up is None or up.exchange is None:
            self.h2.acknowledge_received_data(flow_len, sid)
            return
        up.unacked += flow_len
        ex = up.exchange
        ex.on_upstream_body(data)
        self._touched.append(up)
        self._told.append(ex)

    def on_trailers(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        up = self.streams.get(sid)
        if up is not None:
            ex = up.exchange
            if ex is not None:
                ex.on_upstream_trailers(headers)
                self._told.append(ex)

    def on_end(self, sid: int) -> None:
        up = self.streams.get(sid)
        if up is not None:
            ex = up.exchange
            if ex is not None:
                ex.on_upstream_complete(True)
                self._told.append(ex)

    def on_reset(self, sid: int, code: int, remote: bool) -> None:
        up = self.streams.pop(sid, None)
        if up is not None:
            err = RefusedStreamError() if code == REFUSED_STREAM else _RESET if remote else UpstreamProtocolError()
            self._lost_stream(up, err)

    def on_window(self, sid: int) -> None:
        if self.blocked:
            for up in list(self.blocked):
                if sid == 0 or sid == up.sid:
                    up.drain()

    def on_settings(self, max_concurrent: int | None, window_changed: bool) -> None:
        if max_concurrent is not None:
            self.limit = min(self.pool.max_streams, max_concurrent)
            self.pool.serve_waiters()
        if window_changed:
            for up in list(self.blocked):
                up.drain()

    def on_goaway(self, last_sid: int, code: int) -> None:
        self.goaway = True
        for sid in [s for s in self.streams if s > last_sid]:
            self._lost_stream(self.streams.pop(sid), RefusedStreamError())
        if code != NO_ERROR:
            for sid in list(self.streams):
                self._lost_stream(self.streams.pop(sid), _RESET)
        if not self.active:
            self.close()
        self.pool.serve_waiters()

    def _lost_stream(self, up: H2Exchange, err: ProxyError) -> None:
        ex = up.exchange
        self.blocked.discard(up)
        if not up.closed:
            up.closed = True
            up.exchange = None
            self.active -= 1
        if ex is not None:
            ex.on_upstream_error(err)
            ex.on_upstream_flush()

    def _fail_all(self, err: ProxyError) -> None:
        streams = list(self.streams.values())
        self.streams.clear()
        for up in streams:
            self._lost_stream(up, err)

    def refuse(self, up: H2Exchange) -> None:
        """An exchange whose HEADERS could not go out (GOAWAY first): RefusedStreamError, a retriable failure."""
        self._lost_stream(up, RefusedStreamError())
        if self.goaway and not self.active:
            self.close()

    # -- used by the exchanges and the pool
    def new_exchange(self) -> H2Exchange:
        self.active += 1
        self.uses += 1
        max_uses = self.pool.max_uses
        if max_uses and self.uses >= max_uses:
            self.goaway = True  # no more streams here; closes when the last one ends
        return H2Exchange(self)

    def usable(self) -> bool:
        return (self.ready and not self.goaway and not self.closed and self.active < self.limit
                and self.h2.next_sid + 2 * self.active < MAX_SID)

    def end(self, up: H2Exchange, reset: bool) -> None:
        self.active -= 1
        if not self.active:
            self.idle_since = self.pool.loop.time()
        self.blocked.discard(up)
        sid = up.sid
        if sid and self.streams.pop(sid, None) is not None:
            h2 = self.h2
            if up.unacked:
                h2.acknowledge_received_data(up.unacked, sid)  # the connection window, at least
                up.unacked = 0
            if (reset or not h2.done(sid)) and not self.closed:
                h2.reset_stream(sid, CANCEL)  # a side still open: we will not use it
            if h2.wants_write():
                self.want_flush()
        if self.goaway and not self.active:
            self.close()
        else:
            self.pool.serve_waiters()

    def ack(self, up: H2Exchange) -> None:
        n = up.unacked
        up.unacked = 0
        if not self.closed:
            self.h2.acknowledge_received_data(n, up.sid)
            if self.h2.wants_write():
                self.want_flush()

    def want_flush(self) -> None:
        if self._flush_handle is None and self.transport is not None:
            self._flush_handle = self.pool.loop.call_soon(self.flush)

    def flush(self) -> None:
        h = self._flush_handle
        if h is not None:
            self._flush_handle = None
            h.cancel()
        t = self.transport
        if t is not None:
            data = self.h2.data_to_send()
            if data:
                t.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.h2.close_connection(NO_ERROR)  # RFC 9113 section 6.8: say so before closing
            self.flush()
            self.transport.close()
        self.closed = True
        self.pool.forget(self)
