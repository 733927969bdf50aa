"""The HTTP/2 side of a request: one stream of a downstream HTTP/2 connection.

``H2Stream`` is the ``Stream`` that ``h2conn.H2ServerConnection`` creates per
HTTP/2 request. It checks the decoded header block the way RFC 9113 section
8 asks (pseudo-headers first, exactly once, lowercase names, no
connection-specific fields, ``te`` only "trailers") because the h2 library's
own inbound validation is turned off (it costs a lot per request and would
make a malformed request a connection error instead of a stream error). It
builds the HTTP/1.1 head the core forwards and writes the response through
the connection, which owns the h2 state machine and flow control.

Strategy: the stream is also the ``conn`` its core talks to. Pause/resume
then mean "this stream" (stop acknowledging its DATA, so the client's
window closes) instead of "the whole connection", without one more object
per request; everything connection-wide is delegated to ``h2``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from proxy import tracing  # [tracing]
from proxy.accesslog import PROTOCOL_HTTP2
from proxy.errors import DownstreamProtocolError, HeadersTooLargeError, NoRouteError, ProxyError
from proxy.stream import Stream

if TYPE_CHECKING:
    from proxy.h2conn import H2ServerConnection


class MalformedRequest(Exception):
    """RFC 9113 section 8.1.1: a malformed request is a stream error of type PROTOCOL_ERROR."""


_CONN_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"})
# Request fields not copied into the forwarded head as received (the proxy writes its own).
_REQ_SPECIAL = frozenset({b"te", b"host", b"cookie", b"x-forwarded-for", b"x-forwarded-proto",
                          b"x-forwarded-client-cert"})
_REQ_TRACED = _REQ_SPECIAL | tracing.tc.REWRITTEN  # [tracing]
_NAME_OK = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+\Z").match
_VALUE_BAD = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z").search
# Response fields an HTTP/2 response must not carry (RFC 9113 section 8.2.2).
_RESP_DROP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
                        b"te", b"trailer"})
_STATUS = {code: b"%d" % code for code in range(100, 600)}


class H2Stream(Stream):
    __slots__ = (
        "client_ip",
        "h2",
        "h2_req",
        "head",
        "listener",
        "original_dst",
        "peer",
        "pend",
        "pend_bytes",
        "pend_end",
        "recv_paused",
        "sid",
        "unacked",
    )

    def __init__(self, h2: H2ServerConnection, sid: int) -> None:
        super().__init__(self, h2.ctx)  # type: ignore[arg-type]  # the stream is its own ``conn``
        self.h2 = h2
        self.sid = sid
        self.listener = h2.listener
        self.client_ip = h2.client_ip
        self.peer = h2.peer
        self.original_dst = h2.original_dst
        self.http10 = PROTOCOL_HTTP2  # type: ignore[assignment]  # the access log's protocol field
        self.recv_paused = False
        self.head: list[tuple[bytes, bytes]] | None = None  # response HEADERS not yet handed to h2
        self.unacked = 0  # flow-controlled bytes received and not yet handed back to the client
        self.pend: list[bytes] = []  # response bytes waiting for the client's window
        self.pend_bytes = 0
        self.pend_end: list[tuple[bytes, bytes]] | bool | None = None  # end of response queued behind ``pend``
        self.h2_req: tuple[bytes, bytes, bytes, bytes, list[bytes], frozenset[bytes]] | None = None  # [http2]

    @property
    def client_port(self) -> int:  # [accesslog] read only when a line is logged
        return self.h2.client_port

    # ------------------------------------------------------------------ request head
    def prepare(self, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        """Check the header block and build the upstream head. Raises MalformedRequest or ProxyError."""
        method = path = scheme = authority = None
        hdrs = self.hdrs
        traced = self.listener.http.tracing  # type: ignore[union-attr]  # [tracing]
        special = _REQ_SPECIAL if traced is None else _REQ_TRACED
        parts: list[bytes] = []
        size = 0
        regular = False
        for name, value in headers:
            size += len(name) + len(value)
            if name[:1] == b":":
                if regular:
                    raise MalformedRequest("pseudo-header after a regular field")
                if name == b":method" and method is None:
                    method = value
                elif name == b":path" and path is None:
                    path = value
                elif name == b":scheme" and scheme is None:
                    scheme = value
                elif name == b":authority" and authority is None:
                    authority = value
                else:
                    raise MalformedRequest("unknown or repeated pseudo-header")
                continue
            regular = True
            if _NAME_OK(name) is None or _VALUE_BAD(value) is not None:
                raise MalformedRequest("invalid field name or value")
            if name in _CONN_SPECIFIC or (name == b"te" and value != b"trailers"):
                raise MalformedRequest("connection-specific field")
            prev = hdrs.get(name)
            if prev is None:
                hdrs[name] = value
            else:
                hdrs[name] = prev + (b"; " if name == b"cookie" else b",") + value  # RFC 9113 8.2.3 cookies
            if name not in special:
                parts += (name, b": ", value, b"\r\n")
        http = self.listener.http
        assert http is not None
        if size + 4 * len(headers) > http.max_request_headers_bytes or len(headers) > http.max_request_headers_count:
            raise HeadersTooLargeError()
        if method is None:
            raise MalformedRequest("no :method")
        if method == b"CONNECT":
            if authority is None or path is not None or scheme is not None:
                raise MalformedRequest("CONNECT with :path or :scheme, or without :authority")
            raise NoRouteError()  # tunnels are not proxied over HTTP/2
        if scheme is None or not path:
            raise MalformedRequest("no :scheme or :path")
        if path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS"):
            raise MalformedRequest("bad :path")
        host = authority if authority is not None else hdrs.get(b"host")
        if not host:
            raise DownstreamProtocolError()
        hdrs[b"host"] = host
        cookie = hdrs.get(b"cookie")
        if cookie is not None:
            parts += (b"cookie: ", cookie, b"\r\n")
        self.method = method
        self.path = path
        self.url = path
        self.host = host.lower()
        self.scheme = scheme
        self.raw_headers = headers
        ctype = hdrs.get(b"content-type")
        if ctype is not None and ctype.startswith(b"application/grpc"):
            self.grpc = True
        head = [method, b" ", path, b" HTTP/1.1\r\nhost: ", host, b"\r\n", *parts]
        if not ended and b"content-length" not in hdrs:
            self.req_chunked = True  # the length is known only at END_STREAM
            head.append(b"transfer-encoding: chunked\r\n")
        if hdrs.get(b"te") == b"trailers":
            head.append(b"te: trailers\r\n")
        extra = self.upstream_headers()
        head += extra
        head.append(b"\r\n")
        h1 = b"".join(head)
        self.out.append(h1)
        self.h2_req = (h1, method, path, host, extra, special)  # [http2] for h2_fields, while out[0] is h1

    def request_trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        """Trailers are checked as strictly as the head: no pseudo-headers (RFC 9113 section 8.1), valid
        lowercase names and values. Raises MalformedRequest."""
        for name, value in fields:
            if _NAME_OK(name) is None or _VALUE_BAD(value) is not None:
                raise MalformedRequest("invalid trailer field name or value")
        super().request_trailers(fields)

    def h2_fields(self, head: bytes, scheme: bytes) -> list[tuple[bytes, bytes]] | None:
        """The forwarded request as HTTP/2 fields, from the decoded block instead of the HTTP/1.1 text.

        Only while ``head`` is the very head ``prepare`` built (a route or policy edit replaces ``out[0]``).
        Same fields in the same order as ``upstream_h2conn.h2_headers(head)`` would give."""
        req = self.h2_req
        if req is None or req[0] is not head:
            return None
        _, method, path, host, extra, special = req
        fields = [(b":method", method), (b":scheme", scheme), (b":authority", host), (b":path", path)]
        for name, value in self.raw_headers:
            if name[:1] != b":" and name not in special:
                fields.append((name, value))
        hdrs = self.hdrs
        cookie = hdrs.get(b"cookie")
        if cookie is not None:
            fields.append((b"cookie", cookie))
        if hdrs.get(b"te") == b"trailers":
            fields.append((b"te", b"trailers"))
        if extra:
            for line in b"".join(extra).split(b"\r\n"):
                if line:
                    name, _, value = line.partition(b":")
                    fields.append((name.lower(), value.strip()))
        return fields

    def downstream_h2(self) -> bool:
        return True

    # ------------------------------------------------------------------ response
    def emit_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        out = [(b":status", _STATUS.get(status) or b"%d" % status)]
        for name, value in headers:
            lname = name.lower()
            if lname not in _RESP_DROP and lname[:1] != b":":
                out.append((lname, value))
        self.h2.send_head(self, out)

    def emit_body(self, data: bytes) -> None:
        if data:
            self.h2.send_body(self, data)

    def emit_end(self, trailers: list[tuple[bytes, bytes]] | None) -> None:
        if trailers:
            trailers = [(n.lower(), v) for n, v in trailers if n.lower() not in _RESP_DROP]
        self.h2.send_end(self, trailers or None)

    # ------------------------------------------------------------------ the ``conn`` the core talks to
    @property
    def _in_feed(self) -> bool:
        return self.h2._in_feed

    @property
    def write_paused(self) -> bool:
        return self.h2.write_paused or bool(self.pend)

    @property
    def transport(self) -> Any:
        return self.h2.transport

    def local_reply(self, st: Stream | None, err: ProxyError) -> None:
        self.h2.local_reply(self, err)

    def stream_done(self, st: Stream, close: bool) -> None:
        self.h2.stream_done(self)

    def flush(self) -> None:
        self.h2.flush()

    def write_now(self, data: bytes) -> None:
        """HTTP/1.1 only (100-continue): nothing to do on HTTP/2."""

    def pause_reading(self) -> None:
        """Stop handing this stream's DATA back to the client: its window closes."""
        self.recv_paused = True

    def resume_reading(self) -> None:
        up = self.upstream
        if up is not None and up.writer_paused:
            return  # its upstream still has too much queued (it resumes us when it drains)
        if self.recv_paused:
            self.recv_paused = False
            if self.unacked:
                self.h2.ack(self)
