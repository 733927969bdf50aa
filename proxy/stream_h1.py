"""The HTTP/1.1 side of a request: its head in, its response out.

``H1Stream`` is the ``Stream`` that ``hcm.HttpConnection`` creates per
HTTP/1.1 request. It checks the request head and builds the head sent
upstream (hop-by-hop headers removed, Host checked, absolute-form targets
turned into origin-form) and writes the response in HTTP/1.1 framing,
re-framing where the two sides disagree (chunked vs. length vs.
close-delimited, HTTP/1.0 clients). Upgrades (WebSocket) splice the two
connections after the upstream's 101.
"""

from __future__ import annotations

from proxy import tracing  # [tracing]
from proxy.errors import (
    DownstreamProtocolError,
    NoRouteError,
    NotImplementedCodingError,
    ProxyError,
    UpstreamResetError,
)
from proxy.route_edit import LAST_CHUNK, last_chunk
from proxy.stream import HIGH_WATER, Stream

# Request headers that are not forwarded as received (RFC 9110 section 7.6.1,
# plus the ones this proxy rewrites itself).
_REQ_SPECIAL = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding", b"upgrade",
    b"trailer", b"expect", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-client-cert",
})
_RESP_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding", b"upgrade",
    b"trailer", b"content-length",
})
_REQ_TRACED = _REQ_SPECIAL | tracing.tc.REWRITTEN  # [tracing] the upstream gets our context instead
_KNOWN_TOKENS = frozenset({b"close", b"keep-alive", b"upgrade", b""})
_STATUS_LINES = {code: b"HTTP/1.1 %d " % code for code in range(100, 600)}

_MODE_NONE, _MODE_LENGTH, _MODE_CHUNKED, _MODE_EOF = 0, 1, 2, 3


class H1Stream(Stream):
    __slots__ = ("mode", "nfields", "resp_eof_delimited", "upgrade", "upgrade_rest")

    def __init__(self, conn, ctx) -> None:  # type: ignore[no-untyped-def]
        super().__init__(conn, ctx)
        self.nfields = 0  # fields in the head; httptools reports a chunked body's trailers after them
        self.upgrade = False
        self.upgrade_rest: bytes | None = None
        self.mode = _MODE_NONE
        self.resp_eof_delimited = False

    # ------------------------------------------------------------------ request head
    def prepare(self) -> None:
        """Validate the head and build the bytes sent upstream. Raises DownstreamProtocolError."""
        url = self.url
        absolute = url[:1] != b"/"
        if absolute:
            url = self._origin_form(url)
        self.path = url
        hdrs = self.hdrs
        parts = [self.method, b" ", url, b" HTTP/1.1\r\n"]
        traced = self.conn.listener.http.tracing  # type: ignore[union-attr]  # [tracing]
        special = _REQ_SPECIAL if traced is None else _REQ_TRACED  # [tracing]
        for name, value in self.raw_headers:
            lname = name.lower()
            prev = hdrs.get(lname)
            if prev is None:
                hdrs[lname] = value
            else:
                if lname == b"host":
                    raise DownstreamProtocolError()  # RFC 9112 section 3.2: exactly one Host
                hdrs[lname] = prev + b"," + value
            if lname not in special:
                parts += (name, b": ", value, b"\r\n")
        host = hdrs.get(b"host")
        if host is None:
            if not self.http10:
                raise DownstreamProtocolError()
            host = b""
        if not self.host:
            self.host = host.lower()
        elif absolute and self.host != b"*":
            # RFC 9112 section 3.2.2: the target's authority replaces the Host header.
            parts = parts[:4] + [p for i in range(4, len(parts), 4)
                                 if parts[i].lower() != b"host" for p in parts[i:i + 4]]
            parts += (b"host: ", self.host, b"\r\n")
        conn_hdr = hdrs.get(b"connection")
        if conn_hdr is not None:
            extra = {t.strip().lower() for t in conn_hdr.split(b",")} - _KNOWN_TOKENS
            if extra:  # headers the client nominated as hop-by-hop (RFC 9110 section 7.6.1)
                parts = parts[:4]
                for name, value in self.raw_headers:
                    lname = name.lower()
                    if lname not in special and lname not in extra:
                        parts += (name, b": ", value, b"\r\n")
        te = hdrs.get(b"transfer-encoding")
        if te is not None:
            if te.strip().lower() != b"chunked":
                raise NotImplementedCodingError()
            self.req_chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
        if self.upgrade:
            if self.method == b"CONNECT":
                raise NoRouteError()
            parts += (b"connection: upgrade\r\nupgrade: ", hdrs.get(b"upgrade", b""), b"\r\n")
        expect = hdrs.get(b"expect")
        if expect is not None and expect.lower() == b"100-continue":
            self.expect_continue = True
        ctype = hdrs.get(b"content-type")
        if ctype is not None and ctype.startswith(b"application/grpc"):
            self.grpc = True
        parts += self.upstream_headers()
        parts.append(b"\r\n")
        self.out.append(b"".join(parts))

    def _origin_form(self, url: bytes) -> bytes:
        """Absolute-form targets (RFC 9112 section 3.2.2) route by their authority."""
        low = url[:8].lower()
        if low.startswith(b"http://") or low.startswith(b"https://"):
            rest = url.split(b"://", 1)[1]
            slash = rest.find(b"/")
            authority, path = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
            if not authority:
                raise DownstreamProtocolError()
            self.host = authority.lower()
            return path
        if url == b"*" and self.method == b"OPTIONS":
            return url
        raise DownstreamProtocolError()

    # ------------------------------------------------------------------ request body
    def large_body(self) -> bool:
        """True if the unread rest of the request body may be big (chunked or over 64 KiB)."""
        if self.req_chunked:
            return True
        cl = self.hdrs.get(b"content-length")
        try:
            return cl is not None and int(cl) - self.req_bytes > HIGH_WATER
        except ValueError:
            return True

    # ------------------------------------------------------------------ response
    def emit_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        parts = [_STATUS_LINES.get(status) or b"HTTP/1.1 %d " % status, reason, b"\r\n"]
        length: bytes | None = None
        chunked = False
        for name, value in headers:
            lname = name.lower()
            if lname in _RESP_HOP:
                if lname == b"content-length":
                    length = value
                    parts += (name, b": ", value, b"\r\n")
                elif lname == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                continue
            parts += (name, b": ", value, b"\r\n")
        conn = self.conn
        close = (conn._closing or self.ctx.draining or not self.keep_alive or not self.req_complete
                 or (self.upgrade and status != 101))
        if status == 101:
            mode = _MODE_NONE
            upgrade = next((v for n, v in headers if n.lower() == b"upgrade"), b"")
            parts += (b"connection: upgrade\r\nupgrade: ", upgrade, b"\r\n")
            close = False
        elif self.method == b"HEAD" or status == 204 or status == 304:
            mode = _MODE_NONE
        elif length is not None:
            mode = _MODE_LENGTH
        elif self.http10:
            mode = _MODE_EOF
            close = True
        else:
            mode = _MODE_CHUNKED
            parts.append(b"transfer-encoding: chunked\r\n")
        self.resp_eof_delimited = mode != _MODE_NONE and length is None and not chunked
        self.mode = mode
        if status != 101:
            if close:
                parts.append(b"connection: close\r\n")
            elif self.http10:
                parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        self.close_after = close
        conn.queue_write(b"".join(parts))

    def emit_body(self, data: bytes) -> None:
        if self.mode == _MODE_CHUNKED:
            if data:
                self.conn.queue_write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.conn.queue_write(data)

    def emit_end(self, trailers: list[tuple[bytes, bytes]] | None) -> None:
        if self.mode == _MODE_CHUNKED:
            self.conn.queue_write(last_chunk(trailers))

    def eof_ends_response(self, err: ProxyError) -> bool:
        if not (self.resp_eof_delimited and isinstance(err, UpstreamResetError)):
            return False
        # EOF is how a close-delimited body ends (RFC 9112 section 6.3).
        if self.mode == _MODE_CHUNKED:
            self.conn.queue_write(LAST_CHUNK)
        self.conn.flush()
        return True

    def on_upstream_upgrade(self, rest: bytes) -> None:
        """The upstream accepted an Upgrade (101): splice the two connections."""
        up = self.upstream
        if self.done or up is None or self.status != 101:
            return
        self.upstream = None
        self._stop()
        self._record(101, "")
        conn = self.conn
        if rest:
            conn.queue_write(rest)
        conn.flush()
        up.exchange = None
        up.tunnel = conn
        pending = self.upgrade_rest
        if pending:
            up.write(pending)
        conn.start_tunnel(up)
