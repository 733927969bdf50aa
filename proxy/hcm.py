"""The HTTP/1.1 connection manager: one downstream connection, its requests.

Owns the downstream side of HTTP/1.1: httptools parses the client's bytes,
each request becomes a ``Stream`` (``stream.py``) that routes it and relays it
to an upstream connection, and local replies (400, 404, 503, 504, ...) are
written here and only here.

Strategy: callbacks, not tasks. ``data_received`` feeds the parser; parser
callbacks fill the stream being parsed; the stream's bytes for the upstream
are collected during the feed and written once after it returns, so a
request whose later bytes turn out malformed never has any of them sent (the
parse error is raised inside the same feed). Responses are written through
``queue_write`` and flushed once per upstream read for the same reason (one
syscall per read). HTTP/1.1 pipelining is served in order: a request parsed
while another is active waits in ``_pending`` with reading paused.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from proxy.context import Context
from proxy.errors import DownstreamProtocolError, HeadersTooLargeError, ProxyError
from proxy.model import Listener
from proxy.stats import ListenerStats
from proxy.stream import Stream
from proxy.stream_h1 import H1Stream
from proxy.tls import Peer, peer_of, sans_allowed

if TYPE_CHECKING:
    from proxy.upstream import UpstreamConnection

log = logging.getLogger("pillion.http")

HIGH_WATER = 64 * 1024
LOW_WATER = 16 * 1024

_REASONS = {
    400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found", 413: b"Payload Too Large",
    431: b"Request Header Fields Too Large", 500: b"Internal Server Error", 501: b"Not Implemented",
    502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
}


def _grpc_message(err: ProxyError) -> bytes:
    """grpc-message is percent-encoded (the gRPC HTTP/2 protocol spec)."""
    return err.body.replace(b"%", b"%25").replace(b"\r", b"%0D").replace(b"\n", b"%0A")


class HttpConnection(asyncio.Protocol):
    __slots__ = (
        "_active",
        "_closing",
        "_deferred_error",
        "_eof",
        "_hbytes",
        "_idle_tick",
        "_in_feed",
        "_parsing",
        "_pending",
        "_read_paused",
        "_reasons",
        "_tunnel",
        "_upgrading",
        "_wbuf",
        "client_ip",
        "client_port",
        "ctx",
        "listener",
        "lstats",
        "max_header_bytes",
        "max_header_count",
        "parser",
        "peer",
        "transport",
        "write_paused",
    )

    def __init__(self, ctx: Context, listener: Listener, lstats: ListenerStats) -> None:
        assert listener.http is not None
        # per-connection
        self.ctx = ctx
        self.listener = listener
        self.lstats = lstats
        self.max_header_bytes = listener.http.max_request_headers_bytes
        self.max_header_count = listener.http.max_request_headers_count
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client_ip = b""
        self.client_port = 0  # [accesslog]
        self.peer: Peer | None = None  # the TLS peer (mTLS), for x-forwarded-client-cert
        self._wbuf: list[bytes] = []
        self._in_feed = False
        self._read_paused = False
        self.write_paused = False
        self._closing = False  # close once the active response is written
        self._eof = False
        self._tunnel: UpstreamConnection | None = None
        self._upgrading: H1Stream | None = None  # an Upgrade request waiting for its 101
        self._deferred_error: ProxyError | None = None  # a parse error behind a request still being served
        self._idle_tick = ctx.tick
        # per-request
        self._parsing: H1Stream | None = None  # the request httptools is filling
        self._active: H1Stream | None = None  # the request whose response is being produced
        self._pending: deque[H1Stream] = deque()  # pipelined requests waiting their turn
        self._hbytes = 0

    # ------------------------------------------------------------------ asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0].encode() if peer else b""
        self.client_port = peer[1] if peer else 0
        self.ctx.connections.add(self)
        self.lstats.cx_total += 1
        self.lstats.cx_active += 1
        if self.ctx.draining:
            self._closing = True
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

    def data_received(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel.write(data)
            return
        up = self._upgrading
        if up is not None and up.upgrade_rest is not None:
            # Bytes after an Upgrade request, before the upstream said 101.
            up.upgrade_rest += data
            self.pause_reading()
            return
        self._in_feed = True
        err: ProxyError | None = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            st = self._upgrading
            if st is not None:
                st.upgrade_rest = data[e.args[0]:] if e.args else b""
                self.pause_reading()
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if not isinstance(cause, ProxyError):
                log.error("bug in a request callback", exc_info=cause)
            err = cause if isinstance(cause, ProxyError) else DownstreamProtocolError()
        except httptools.HttpParserError:
            err = DownstreamProtocolError()
        finally:
            self._in_feed = False
        if err is not None:
            self._protocol_error(err)
        st = self._active
        if st is not None:
            st.flush_upstream()
        if self._wbuf:
            self.flush()

    def eof_received(self) -> bool:
        tun = self._tunnel
        if tun is not None:
            self._eof = True
            if tun.tunnel_done_writing:
                return False  # both directions finished: close (connection_lost closes the upstream)
            tun.write_eof()
            return True
        self._eof = True
        # A client's FIN ends the connection, even after a complete request: as Envoy's HTTP/1
        # codec (no half-close), the request in flight is reset upstream and logged DC.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.ctx.forget(self)
        self.lstats.cx_active -= 1
        self.lstats.cx_destroy += 1
        self._closing = True
        if self._tunnel is not None:
            self._tunnel.abort()
            self._tunnel = None
        st = self._active
        self._active = None
        if st is not None:
            st.downstream_lost()
        self._pending.clear()
        self.transport = None

    def pause_writing(self) -> None:
        self.write_paused = True
        st = self._active
        if st is not None and st.upstream is not None:
            st.upstream.pause_reading()
        elif self._tunnel is not None:
            self._tunnel.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        st = self._active
        if st is not None and st.upstream is not None:
            st.upstream.resume_reading()
        elif self._tunnel is not None:
            self._tunnel.resume_reading()

    # ------------------------------------------------------------------ httptools
    def on_message_begin(self) -> None:
        self._hbytes = 0
        st = H1Stream(self, self.ctx)
        self._parsing = st
        if self._active is not None:
            # Pipelined request while another is active: stop reading more.
            self.pause_reading()

    def on_url(self, url: bytes) -> None:
        st = self._parsing
        assert st is not None
        st.url += url
        self._hbytes += len(url)
        if self._hbytes > self.max_header_bytes:
            raise HeadersTooLargeError()

    def on_header(self, name: bytes, value: bytes) -> None:
        st = self._parsing
        assert st is not None
        headers = st.raw_headers
        headers.append((name, value))
        self._hbytes += len(name) + len(value) + 4
        if self._hbytes > self.max_header_bytes or len(headers) > self.max_header_count:
            raise HeadersTooLargeError()

    def on_headers_complete(self) -> None:
        st = self._parsing
        assert st is not None
        p = self.parser
        st.method = p.get_method()
        st.http10 = p.get_http_version() == "1.0"
        st.keep_alive = p.should_keep_alive()
        st.upgrade = p.should_upgrade()
        self.lstats.rq_total += 1
        st.nfields = len(st.raw_headers)
        st.prepare()  # validates and builds the upstream head; raises DownstreamProtocolError
        if st.upgrade:
            self._upgrading = st
        if self._active is None:
            self._activate(st)
        else:
            self._pending.append(st)

    def on_body(self, body: bytes) -> None:
        st = self._parsing
        if st is not None:
            st.request_body(body)

    def on_message_complete(self) -> None:
        st = self._parsing
        if st is not None:
            self._parsing = None
            self._idle_tick = self.ctx.tick
            fields = st.raw_headers
            if len(fields) > st.nfields:  # a chunked body's trailers
                st.request_trailers(fields[st.nfields:])
            st.request_complete()

    # ------------------------------------------------------------------ streams
    def _activate(self, st: H1Stream) -> None:
        self._active = st
        try:
            st.start()
        except ProxyError as err:
            self.local_reply(st, err)

    def stream_done(self, st: Stream, close: bool) -> None:
        """Called by the active stream once its response is fully written."""
        if st is not self._active:
            return
        self._active = None
        self._idle_tick = self.ctx.tick
        if self._pending and not close:
            nxt = self._pending.popleft()
            self._activate(nxt)
            if self._active is nxt:
                nxt.flush_upstream()
            return
        if self._deferred_error is not None and not close:
            err, self._deferred_error = self._deferred_error, None
            self.local_reply(None, err)
            return
        if close or self._closing or self.ctx.draining:
            self._close_after_flush()
            return
        if self._active is None or self._active.buffered <= HIGH_WATER:
            self.resume_reading()

    def start_tunnel(self, upstream: UpstreamConnection) -> None:
        self._tunnel = upstream
        self._active = None
        self._upgrading = None
        self.resume_reading()

    # TunnelPeer: after a 101 the upstream writes straight through.
    def tunnel_write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def tunnel_eof(self) -> bool:
        """The upstream finished sending; returns whether the upstream side stays open."""
        t = self.transport
        if self._eof:
            self._close_after_flush()  # both directions finished
            return False
        if t is not None and t.can_write_eof():
            t.write_eof()
        return True

    def tunnel_closed(self) -> None:
        self._tunnel = None
        self._close_after_flush()

    def pause_downstream(self) -> None:
        self.pause_reading()

    def resume_downstream(self) -> None:
        self.resume_reading()

    # ------------------------------------------------------------------ output
    def queue_write(self, data: bytes) -> None:
        self._wbuf.append(data)

    def flush(self) -> None:
        buf = self._wbuf
        if buf and self.transport is not None:
            self.transport.write(buf[0] if len(buf) == 1 else b"".join(buf))
        buf.clear()

    def write_now(self, data: bytes) -> None:
        if self.transport is not None:
            self.flush()
            self.transport.write(data)

    def local_reply(self, st: Stream | None, err: ProxyError) -> None:
        """The one place a request is answered by the proxy itself."""
        assert st is None or isinstance(st, H1Stream)
        self.ctx.stats.count_local_reply(err.flag)
        close = self._closing or st is None or st.upgrade or not st.keep_alive
        if st is not None and not st.req_complete and (st.expect_continue or st.large_body()):
            # The rest of the body would have to be read and thrown away: close instead.
            close = True
        if st is not None and st.response_started:
            # Too late for a reply: the only honest signal left is to reset.
            st.finish_local(err, 0)
            self.abort()
            return
        status = err.status
        body = b"" if st is not None and st.method == b"HEAD" else err.body
        if st is not None and st.grpc:
            # gRPC clients get a trailers-only answer: 200 with grpc-status (as Envoy does)
            body = b""
            head = [b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\ncontent-type: application/grpc\r\n",
                    b"grpc-status: %d\r\n" % err.grpc_status, b"grpc-message: ", _grpc_message(err), b"\r\n"]
        else:
            head = [
                b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown")),
                b"content-length: %d\r\n" % len(err.body),  # a HEAD reply says the length it leaves out
            ]
            if err.body:
                head.append(b"content-type: text/plain\r\n")
        for name, value in err.headers:
            head += (name, b": ", value, b"\r\n")
        if err.flag:
            head.append(b"x-pillion-flags: " + err.flag.encode() + b"\r\n")
        if close:
            head.append(b"connection: close\r\n")
        elif st is not None and st.http10:
            head.append(b"connection: keep-alive\r\n")
        head.append(b"\r\n")
        head.append(body)
        self.write_now(b"".join(head))
        if st is not None:
            st.finish_local(err, len(body))
            if st is self._active:
                self.stream_done(st, close)
            return
        self._close_after_flush()

    def _protocol_error(self, err: ProxyError) -> None:
        self.lstats.protocol_errors += 1
        st = self._parsing
        self._parsing = None
        if st is not None:
            st.discard_request()  # none of its bytes go upstream
            if st in self._pending:
                self._pending.remove(st)
        self.pause_reading()
        if self._active is not None and self._active is not st:
            # Requests pipelined ahead of the broken one are answered first (as Envoy
            # does); the error reply follows them, then the connection closes.
            self._deferred_error = err
            return
        self._closing = True
        self._active = None
        self._pending.clear()
        self.local_reply(None, err)

    # ------------------------------------------------------------------ flow, lifecycle
    def pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if (self._read_paused and self.transport is not None and not self._closing
                and self._deferred_error is None):
            self._read_paused = False
            self.transport.resume_reading()

    def _close_after_flush(self) -> None:
        self._closing = True
        t = self.transport
        if t is not None:
            self.flush()
            t.close()

    def abort(self) -> None:
        t = self.transport
        if t is not None:
            t.abort()

    def drain(self) -> None:
        """Finish the current response with ``connection: close``; close if idle."""
        self._closing = True
        if self._active is None and self._tunnel is None:
            self._close_after_flush()

    def on_tick(self, tick: int) -> None:
        http = self.listener.http
        if http is None or not http.idle_timeout or self._active is not None or self._tunnel is not None:
            return
        if (tick - self._idle_tick) * self.ctx.tick_seconds >= http.idle_timeout:
            self._close_after_flush()
