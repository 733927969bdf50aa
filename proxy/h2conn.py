"""The HTTP/2 connection manager: one downstream HTTP/2 connection, its streams.

The counterpart of ``hcm.HttpConnection`` for clients that negotiated "h2"
by ALPN or opened with the h2c prior-knowledge preface. The h2 library
(sans-IO) turns bytes into events; each request stream becomes an
``H2Stream`` (``stream_h2.py``) that routes and forwards it like any other
``Stream``. Local replies for HTTP/2 streams are written here and only here
(gRPC requests get trailers-only answers).

Strategy: one pass per ``data_received``: feed h2, dispatch its events,
let each stream that got input write to its upstream, hand back flow-control
credit for what was forwarded, and write everything h2 queued in one
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
import contextlib
import logging
from collections.abc import Callable
from typing import Any, cast

from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError as H2ProtocolError
from h2.settings import SettingCodes

from proxy.capture import Address
from proxy.context import Context
from proxy.errors import ProxyError
from proxy.h2base import GracefulH2, config, goaway_bytes
from proxy.model import Listener
from proxy.stats import ListenerStats
from proxy.stream_h2 import H2Stream, MalformedRequest
from proxy.tls import Peer, peer_of, sans_allowed

log = logging.getLogger("pillion.h2")

HIGH_WATER = 256 * 1024  # transport write buffer
LOW_WATER = 64 * 1024
PEND_HIGH = 64 * 1024  # response bytes a stream holds past the client's window before its upstream is paused

_SERVER_CONFIG = config(client=False)
_PROTOCOL_ERROR = ErrorCodes.PROTOCOL_ERROR
_NO_ERROR = ErrorCodes.NO_ERROR


def _grpc_message(err: ProxyError) -> bytes:
    return err.body.replace(b"%", b"%25").replace(b"\r", b"%0D").replace(b"\n", b"%0A")


class H2ServerConnection(asyncio.Protocol):
    __slots__ = (
        "_blocked", "_closing", "_goaway_sent", "_handlers", "_heads", "_idle_tick", "_in_feed", "_last_sid",
        "_rst_count", "_rst_start", "client_ip", "ctx", "h2", "listener", "lstats", "max_frame", "original_dst",
        "peer", "streams", "transport", "write_paused",
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
        self.peer: Peer | None = None
        self.h2 = GracefulH2(config=_SERVER_CONFIG)
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
        self.max_frame = 16384
        self._handlers: dict[type, Callable[[Any], H2Stream | None]] = {
            RequestReceived: self._on_request, DataReceived: self._on_data, StreamEnded: self._on_end,
            StreamReset: self._on_reset, WindowUpdated: self._on_window, RemoteSettingsChanged: self._on_settings,
            ConnectionTerminated: self._on_goaway,
        }

    # ------------------------------------------------------------------ asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        peername = transport.get_extra_info("peername")
        self.client_ip = peername[0].encode() if peername else b""
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
        http = self.listener.http
        assert http is not None
        h2 = self.h2
        h2.local_settings = type(h2.local_settings)(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: http.h2_max_concurrent_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: http.h2_initial_stream_window,
            SettingCodes.ENABLE_PUSH: 0,
        })
        # The hpack decoder's hard cap (a connection error): well above the per-request limit,
        # which is checked per stream (a 431 for that request only).
        h2.decoder.max_header_list_size = 4 * http.max_request_headers_bytes + 4096
        h2.initiate_connection()
        extra = http.h2_initial_connection_window - 65535
        if extra > 0:
            h2.increment_flow_control_window(extra)
        if self.ctx.draining:
            self.drain()
        self.flush()

    def data_received(self, data: bytes) -> None:
        self._in_feed = True
        try:
            events = self.h2.receive_data(data)
        except H2ProtocolError as e:
            # h2 queued the GOAWAY with the error's code: send it and close.
            self._in_feed = False
            self.lstats.protocol_errors += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("listener %s: HTTP/2 connection error: %s", self.listener.name, e)
            self._terminate(None)
            return
        touched: list[H2Stream] = []
        handlers = self._handlers
        try:
            for ev in events:
                handler = handlers.get(type(ev))
                if handler is not None:
                    st = handler(ev)
                    if st is not None:
                        touched.append(st)
        finally:
            self._in_feed = False
        if self.transport is None:
            return
        for st in touched:
            if not st.done:
                st.flush_upstream()
            if st.unacked and (not st.recv_paused or st.done):
                self.ack(st)
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

    # ------------------------------------------------------------------ h2 events
    def _on_request(self, ev: RequestReceived) -> H2Stream | None:
        sid = ev.stream_id
        self._idle_tick = self.ctx.tick
        if self._goaway_sent:
            self._reset(sid, ErrorCodes.REFUSED_STREAM)  # after our GOAWAY: never processed
            return None
        self._last_sid = sid
        self.lstats.rq_total += 1
        st = H2Stream(self, sid)
        try:
            st.prepare(ev.headers, ev.stream_ended is not None)  # type: ignore[arg-type]
        except MalformedRequest as e:
            self.lstats.protocol_errors += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("listener %s: stream %d reset: %s", self.listener.name, sid, e)
            self._reset(sid, _PROTOCOL_ERROR)
            st.discard_request()
            return None
        except ProxyError as err:
            self.streams[sid] = st
            self.local_reply(st, err)
            return None
        self.streams[sid] = st
        try:
            st.start()
        except ProxyError as err:
            self.local_reply(st, err)
        return st

    def _on_data(self, ev: DataReceived) -> H2Stream | None:
        st = self.streams.get(ev.stream_id)
        n = ev.flow_controlled_length
        if st is None or st.done:
            if n:  # a stream we already answered or reset: give the connection window back
                self.h2.acknowledge_received_data(n, ev.stream_id)
            return None
        st.unacked += n
        st.request_body(ev.data)
        return st

    def _on_end(self, ev: StreamEnded) -> H2Stream | None:
        st = self.streams.get(ev.stream_id)
        if st is None:
            return None
        st.request_complete()
        return st

    def _on_reset(self, ev: StreamReset) -> None:
        if ev.remote_reset:
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
                self._terminate(ErrorCodes.ENHANCE_YOUR_CALM)
                return
        st = self.streams.pop(ev.stream_id, None)
        if st is not None:
            self._blocked.discard(st)
            if st.unacked:
                self.ack(st)
            st.downstream_lost()

    def _on_window(self, ev: WindowUpdated) -> None:
        if not self._blocked:
            return
        if ev.stream_id:
            st = self.streams.get(ev.stream_id)
            if st is not None and st.pend:
                self._drain_pending(st)
        else:
            for st in list(self._blocked):
                self._drain_pending(st)

    def _on_settings(self, ev: RemoteSettingsChanged) -> None:
        frame = ev.changed_settings.get(SettingCodes.MAX_FRAME_SIZE)
        if frame is not None:
            self.max_frame = frame.new_value
        if SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings:
            for st in list(self._blocked):
                self._drain_pending(st)

    def _on_goaway(self, ev: ConnectionTerminated) -> None:
        """The client is going away: finish what it still wants, then close."""
        if ev.error_code != _NO_ERROR:
            self._terminate(None)
            return
        self._closing = True
        last = ev.last_stream_id or 0
        for sid in [s for s in self.streams if s > last]:
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
        frame = self.max_frame
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
            self._reset(st.sid, ErrorCodes.INTERNAL_ERROR)
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

    def _reset(self, sid: int, code: ErrorCodes) -> None:
        """RST_STREAM, unless h2 already considers the stream closed (both sides ended it)."""
        with contextlib.suppress(H2ProtocolError):
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

    def _terminate(self, code: ErrorCodes | None) -> None:
        """A connection error: GOAWAY with ``code`` (None: h2 already queued one), close, reset every stream."""
        t = self.transport
        if t is None:
            return
        if code is not None:
            self.h2.close_connection(code, last_stream_id=self._last_sid)
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
            t.write(goaway_bytes(self._last_sid, 0))
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
