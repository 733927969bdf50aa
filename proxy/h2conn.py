"""The HTTP/2 connection manager: one downstream HTTP/2 connection, its streams.

The counterpart of ``hcm.HttpConnection`` for clients that negotiated "h2"
by ALPN or opened with the h2c prior-knowledge preface. The codec
(``h2wire.ServerH2``, sans-IO) turns bytes into calls of the ``on_*``
methods below; each request stream becomes an
``H2Stream`` (``stream_h2.py``) that routes and forwards it like any other
``Stream``. Local replies for HTTP/2 streams are written here and only here
(gRPC requests get trailers-only answers).

Strategy: one pass per ``data_received``: feed the codec, which calls back per frame,
let each stream that got input write to its upstream, hand back flow-control
credit for what was forwarded, and write everything the codec queued in one
``transport.write``. Responses are sent within the client's windows; bytes
past them wait on their stream (whose upstream then stops being read) until
a WINDOW_UPDATE. A client whose request data is not forwarded (slow upstream)
stops getting WINDOW_UPDATEs for that stream, so nothing grows unbounded.

Protection: malformed requests are reset (PROTOCOL_ERROR) without reaching
an upstream; more than ``h2_max_resets_per_interval`` RST_STREAMs from the
client within ``h2_reset_interval`` seconds (the rapid-reset attack, CVE-2023-44487)
end the connection with GOAWAY ENHANCE_YOUR_CALM.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from proxy import h2wire
from proxy.capture import Address
from proxy.context import Context
from proxy.errors import ProxyError
from proxy.h2wire import H2ConnectionError, ServerH2, goaway_frame
from proxy.model import Listener
from proxy.stats import ListenerStats
from proxy.stream_h2 import H2Stream, MalformedRequest
from proxy.tls import Peer, peer_of, sans_allowed

log = logging.getLogger("pillion.h2")

HIGH_WATER = 256 * 1024  # transport write buffer
LOW_WATER = 64 * 1024
PEND_HIGH = 64 * 1024  # response bytes a stream holds past the client's window before its upstream is paused

_PROTOCOL_ERROR = h2wire.PROTOCOL_ERROR
_NO_ERROR = h2wire.NO_ERROR


def _grpc_message(err: ProxyError) -> bytes:
    return err.body.replace(b"%", b"%25").replace(b"\r", b"%0D").replace(b"\n", b"%0A")


class H2ServerConnection(asyncio.Protocol):
    __slots__ = (
        "_blocked", "_closing", "_goaway_sent", "_heads", "_idle_tick", "_in_feed", "_last_sid", "_rst_count",
        "_rst_start", "_touched", "client_ip", "client_port", "ctx", "h2", "listener", "lstats", "original_dst", "peer", "streams",
        "transport", "write_paused",
    )

    def __init__(self, ctx: Context, listener: Listener, lstats: ListenerStats,
                 original_dst: Address | None = None) -> None:
        assert listener.http is not None
        self.ctx = ctx
        self.listener = listener
        self.lstats = lstats
        self.original_dst = original_dst
        self.transport: asyncio.Transport | None = None
        self.client_ip = b""
        self.client_port = 0  # [accesslog]
        self.peer: Peer | None = None
        http = listener.http
        # The hpack decoder's hard cap (a connection error): well above the per-request limit,
        # which is checked per stream (a 431 for that request only).
        self.h2 = ServerH2(self, http.h2_max_concurrent_streams, http.h2_initial_stream_window,
                           http.h2_initial_connection_window, 4 * http.max_request_headers_bytes + 4096)
        self._touched: list[H2Stream] = []  # streams that got input in this ``data_received``
        self.streams: dict[int, H2Stream] = {}
        self._blocked: set[H2Stream] = set()  # streams with response bytes waiting for window
        self._heads: list[H2Stream] = []  # streams whose response HEADERS wait for the next flush
        self._in_feed = False
        self.write_paused = False
        self._closing = False
        self._goaway_sent = False
        self._last_sid = 0
        self._rst_count = 0
        self._rst_start = 0.0
        self._idle_tick = ctx.tick

    # ------------------------------------------------------------------ asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        peername = transport.get_extra_info("peername")
        self.client_ip = peername[0].encode() if peername else b""
        self.client_port = peername[1] if peername else 0
        self.ctx.connections.add(self)
        self.lstats.cx_total += 1
        self.lstats.cx_active += 1
        tls = self.listener.tls
        if tls is not None and transport.get_extra_info("ssl_object") is not None:
            peer = peer_of(transport)
            if not sans_allowed(tls.peer_sans, peer):
                self.ctx.tls.count_failure("wrong_san")
                log.info("listener %s: peer %s is not an accepted identity", self.listener.name,
                         peer.uris if peer else "without a certificate")
                transport.abort()
                return
            self.peer = peer
        self.h2.initiate()
        if self.ctx.draining:
            self.drain()
        self.flush()

    def data_received(self, data: bytes) -> None:
        self._in_feed = True
        touched = self._touched
        try:
            self.h2.receive_data(data)
        except H2ConnectionError as e:
            # the codec queued the GOAWAY with the error's code: send it and close.
            self.lstats.protocol_errors += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("listener %s: HTTP/2 connection error: %s", self.listener.name, e)
            touched.clear()
            self._in_feed = False
            self._terminate(None)
            return
        finally:
            self._in_feed = False
        if self.transport is None:
            touched.clear()
            return
        if len(touched) > 1:
            touched = list(dict.fromkeys(touched))  # once each, in order
            self._touched.clear()
        for st in touched:
            if not st.done:
                st.flush_upstream()
            if st.unacked and (not st.recv_paused or st.done):
                self.ack(st)
        touched.clear()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.ctx.forget(self)
        self.lstats.cx_active -= 1
        self.lstats.cx_destroy += 1
        self._closing = True
        self.transport = None
        streams = list(self.streams.values())
        self.streams.clear()
        self._blocked.clear()
        for st in streams:
            st.downstream_lost()

    def pause_writing(self) -> None:
        self.write_paused = True
        for st in self.streams.values():
            if st.upstream is not None:
                st.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        for st in self.streams.values():
            if st.upstream is not None and not st.pend:
                st.upstream.resume_reading()

    # ------------------------------------------------------------------ codec callbacks (h2wire.Handler)
    def on_request(self, sid: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        self._idle_tick = self.ctx.tick
        if self._goaway_sent:
            self._reset(sid, h2wire.REFUSED_STREAM)  # after our GOAWAY: never processed
            return
        self._last_sid = sid
        self.lstats.rq_total += 1
        st = H2Stream(self, sid)
        try:
            st.prepare(headers, ended)
        except MalformedRequest as e:
            self.lstats.protocol_errors += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("listener %s: stream %d reset: %s", self.listener.name, sid, e)
            self._reset(sid, _PROTOCOL_ERROR)
            st.discard_request()
            return
        except ProxyError as err:
            self.streams[sid] = st
            self.local_reply(st, err)
            return
        self.streams[sid] = st
        try:
            st.start()
        except ProxyError as err:
            self.local_reply(st, err)
        self._touched.append(st)

    def on_data(self, sid: int, data: bytes, n: int) -> None:
        st = self.streams.get(sid)
        if st is None or st.done:
            if n:  # a stream we already answered or reset: give the connection window back
                self.h2.acknowledge_received_data(n, sid)
            return
        st.unacked += n
        st.request_body(data)
        self._touched.append(st)

    def on_trailers(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        st = self.streams.get(sid)
        if st is None or st.done:
            return
        try:
            st.request_trailers(headers)
        except MalformedRequest as e:
            self.lstats.protocol_errors += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("listener %s: stream %d reset: %s", self.listener.name, sid, e)
            self._reset(sid, _PROTOCOL_ERROR)
            self._forget(st)
            st.discard_request()

    def on_end(self, sid: int) -> None:
        st = self.streams.get(sid)
        if st is not None:
            st.request_complete()
            self._touched.append(st)

    def on_reset(self, sid: int, remote: bool) -> None:
        if remote:
            http = self.listener.http
            assert http is not None
            now = self.ctx.loop.time()
            if now - self._rst_start > http.h2_reset_interval:
                self._rst_start = now
                self._rst_count = 0
            self._rst_count += 1
            if self._rst_count > http.h2_max_resets_per_interval:
                self.lstats.protocol_errors += 1
                log.warning("listener %s: %s sent more than %d stream resets in %.1fs: closing (rapid reset)",
                            self.listener.name, self.client_ip.decode(), http.h2_max_resets_per_interval,
                            http.h2_reset_interval)
                self._terminate(h2wire.ENHANCE_YOUR_CALM)
                return
        st = self.streams.pop(sid, None)
        if st is not None:
            self._blocked.discard(st)
            if st.unacked:
                self.ack(st)
            st.downstream_lost()

    def on_window(self, sid: int) -> None:
        if not self._blocked:
            return
        if sid:
            st = self.streams.get(sid)
            if st is not None and st.pend:
                self._drain_pending(st)
        else:
            for st in list(self._blocked):
                self._drain_pending(st)

    def on_settings(self, window_changed: bool) -> None:
        if window_changed:
            for st in list(self._blocked):
                self._drain_pending(st)

    def on_goaway(self, last_sid: int, code: int) -> None:
        """The client is going away: finish what it still wants, then close."""
        if code != _NO_ERROR:
            self._terminate(None)
            return
        self._closing = True
        for sid in [s for s in self.streams if s > last_sid]:
            self.streams[sid].downstream_lost()
            self.streams.pop(sid, None)
        if not self.streams:
            self._close()

    # ------------------------------------------------------------------ responses
    def send_head(self, st: H2Stream, headers: list[tuple[bytes, bytes]]) -> None:
        """Held until the body, the end or the next flush: a response that ends right away goes out as
        one HEADERS frame with END_STREAM (gRPC's trailers-only form must stay that way)."""
        st.head = headers
        self._heads.append(st)

    def _emit_head(self, st: H2Stream, end: bool = False) -> None:
        head = st.head
        st.head = None
        if head is not None and self.transport is not None:
            self.h2.send_headers(st.sid, head, end_stream=end)

    def send_body(self, st: H2Stream, data: bytes) -> None:
        if st.head is not None:
            self._emit_head(st)
        if st.pend:
            st.pend.append(data)
            st.pend_bytes += len(data)
            if st.pend_bytes > PEND_HIGH and st.upstream is not None:
                st.upstream.pause_reading()
            return
        if self.transport is not None:
            self._send(st, data)

    def _send(self, st: H2Stream, data: bytes) -> None:
        """Send what the windows allow; queue the rest on the stream."""
        h2 = self.h2
        sid = st.sid
        window = h2.local_flow_control_window(sid)
        n = len(data)
        frame = h2.max_frame
        if n <= window and n <= frame:
            h2.send_data(sid, data)
            return
        view = memoryview(data)
        pos = 0
        while pos < n and window > 0:
            size = min(frame, window, n - pos)
            h2.send_data(sid, view[pos:pos + size])
            pos += size
            window -= size
        if pos < n:
            rest = data[pos:]
            st.pend.append(rest)
            st.pend_bytes += len(rest)
            self._blocked.add(st)
            if st.upstream is not None:
                st.upstream.pause_reading()

    def send_end(self, st: H2Stream, trailers: list[tuple[bytes, bytes]] | None) -> None:
        if st.head is not None:
            self._emit_head(st, end=not trailers)
            if not trailers:
                return
        if st.pend:
            st.pend_end = trailers if trailers else True
            return
        if self.transport is None:
            return
        if trailers:
            self.h2.send_headers(st.sid, trailers, end_stream=True)
        else:
            self.h2.end_stream(st.sid)

    def _drain_pending(self, st: H2Stream) -> None:
        pend = st.pend[:]
        st.pend.clear()
        st.pend_bytes = 0
        for i, chunk in enumerate(pend):
            self._send(st, chunk)
            if st.pend:  # out of window again: keep the order
                st.pend += pend[i + 1:]
                st.pend_bytes = sum(len(c) for c in st.pend)
                return
        self._blocked.discard(st)
        end = st.pend_end
        if end is not None:
            st.pend_end = None
            self.send_end(st, end if isinstance(end, list) else None)
            if st.done:
                self._finished(st)
                return
        if st.upstream is not None and not self.write_paused:
            st.upstream.resume_reading()

    def ack(self, st: H2Stream) -> None:
        """Hand ``st``'s forwarded request bytes back to the client as window."""
        n = st.unacked
        st.unacked = 0
        if self.transport is not None:
            self.h2.acknowledge_received_data(n, st.sid)
            if not self._in_feed:
                self.flush()

    # ------------------------------------------------------------------ the rescue point
    def local_reply(self, st: H2Stream, err: ProxyError) -> None:
        """The one place an HTTP/2 request is answered (or reset) by the proxy itself."""
        self.ctx.stats.count_local_reply(err.flag)
        if st.done:
            return
        if self.transport is None or self.streams.get(st.sid) is not st:
            st.finish_local(err, 0)
            return
        if st.response_started:
            st.finish_local(err, 0)  # too late for a reply: reset the stream
            self._reset(st.sid, h2wire.INTERNAL_ERROR)
            self._forget(st)
            if not self._in_feed:
                self.flush()
            return
        body = b""
        if st.grpc:
            headers = [(b":status", b"200"), (b"content-type", b"application/grpc"),
                       (b"grpc-status", b"%d" % err.grpc_status), (b"grpc-message", _grpc_message(err))]
        else:
            body = b"" if st.method == b"HEAD" else err.body
            headers = [(b":status", b"%d" % err.status), (b"content-length", b"%d" % len(err.body))]
            if err.body:
                headers.append((b"content-type", b"text/plain"))
        for name, value in err.headers:
            headers.append((name.lower(), value))
        if err.flag:
            headers.append((b"x-pillion-flags", err.flag.encode()))
        sid = st.sid
        h2 = self.h2
        if body:
            h2.send_headers(sid, headers)
            self._send(st, body)
            self.send_end(st, None)
        else:
            h2.send_headers(sid, headers, end_stream=True)
        st.finish_local(err, len(body))
        self.stream_done(st)

    def stream_done(self, st: H2Stream) -> None:
        """``st`` has its whole response written, or queued behind the client's window (then
        ``_drain_pending`` finishes it)."""
        if not st.pend:
            self._finished(st)

    def _finished(self, st: H2Stream) -> None:
        if not st.req_complete and self.transport is not None:
            # RFC 9113 section 8.1: a complete response before the request ends; the rest is not wanted.
            self._reset(st.sid, _NO_ERROR)
        if self.streams.get(st.sid) is st:
            self._forget(st)
        if not self._in_feed:
            self.flush()

    def _reset(self, sid: int, code: int) -> None:
        """RST_STREAM, unless the stream is already closed (both sides ended it, or reset)."""
        self.h2.reset_stream(sid, code)

    def _forget(self, st: H2Stream) -> None:
        self.streams.pop(st.sid, None)
        self._blocked.discard(st)
        if st.unacked:
            self.ack(st)
        self._idle_tick = self.ctx.tick
        if self._closing and not self.streams:
            self._close()

    # ------------------------------------------------------------------ output, lifecycle
    def flush(self) -> None:
        heads = self._heads
        if heads:
            for st in heads:
                if st.head is not None and self.streams.get(st.sid) is st:
                    self._emit_head(st)
            heads.clear()
        t = self.transport
        if t is not None:
            data = self.h2.data_to_send()
            if data:
                t.write(data)

    def write_now(self, data: bytes) -> None:
        """HTTP/1.1 only."""

    def _terminate(self, code: int | None) -> None:
        """A connection error: GOAWAY with ``code`` (None: h2 already queued one), close, reset every stream."""
        t = self.transport
        if t is None:
            return
        if code is not None:
            self.h2.close_connection(code, self._last_sid)
        self.h2.dead = True  # no more input is read
        self.flush()
        self._closing = True
        t.close()

    def _close(self) -> None:
        t = self.transport
        if t is not None:
            self.flush()
            t.close()

    def drain(self) -> None:
        """GOAWAY (NO_ERROR, the last stream we took): streams in flight finish, then the connection closes."""
        self._closing = True
        t = self.transport
        if t is None:
            return
        if not self._goaway_sent:
            self._goaway_sent = True
            self.flush()
            t.write(goaway_frame(self._last_sid, 0))
        if not self.streams:
            self._close()

    def abort(self) -> None:
        t = self.transport
        if t is not None:
            t.abort()

    def on_tick(self, tick: int) -> None:
        http = self.listener.http
        if http is None or not http.idle_timeout or self.streams:
            return
        if (tick - self._idle_tick) * self.ctx.tick_seconds >= http.idle_timeout:
            self.drain()
