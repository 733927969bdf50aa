"""HTTP/2 test peers on 127.0.0.1: a recording h2c server and an h2 client, both on the h2 library.

``H2Server`` answers by path (prior knowledge, or TLS with ALPN "h2" when given an SSL context):

- ``/echo``            200, the request body back; trailers ``x-echo-trailer: yes`` if asked (header ``x-want-trailers``)
- ``/big?n=BYTES``     200 with BYTES of body, sent within the client's windows
- ``/refuse-once``     the first such request is reset with REFUSED_STREAM, later ones get 200
- ``/status/N``        answers status N
- ``/hold``            reads the request but never acknowledges its DATA (a slow reader) until ``release()``
- anything else        200 ``hello from <name>``

Every request is recorded (``requests``: method, path, headers, body) with an event per change,
so tests await instead of sleeping. ``goaway()`` sends GOAWAY(NO_ERROR) on every connection.

``H2Client`` opens one connection and runs many requests on it concurrently (``request``);
``raw`` gives the underlying h2 connection for tests that need odd frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.connection import ConnectionState
from h2.errors import ErrorCodes


class GracefulH2(h2.connection.H2Connection):
    """h2's ``H2Connection``, except that a GOAWAY does not stop the streams it lets finish.

    h2 4.x moves its whole connection to CLOSED on any GOAWAY, after which a DATA frame of a
    stream below ``last_stream_id`` is a protocol error; RFC 9113 section 6.8 says those streams
    complete normally. (The proxy itself no longer uses h2: see ``proxy.h2wire``/``h2wire_client``.)
    """

    def _receive_goaway_frame(self, frame: Any) -> Any:
        sm = self.state_machine
        before = sm.state
        result = super()._receive_goaway_frame(frame)
        if before in (ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN):
            sm.state = before  # streams up to last_stream_id go on; the caller opens no new ones
        return result


@dataclass
class H2Request:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        vals = [v for k, v in self.headers if k == name]
        return ",".join(vals) if vals else None


def _s(headers: Any) -> list[tuple[str, str]]:
    return [(k.decode() if isinstance(k, bytes) else k, v.decode() if isinstance(v, bytes) else v) for k, v in headers]


class _ServerConn(asyncio.Protocol):
    def __init__(self, server: H2Server) -> None:
        self.server = server
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.transport: asyncio.Transport | None = None
        self.reqs: dict[int, H2Request] = {}
        self.held: list[tuple[int, int]] = []
        self.pending: dict[int, tuple[memoryview, list[tuple[bytes, bytes]] | None]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.conns.append(self)
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.server.max_streams})
        self.h2.initiate_connection()
        self.flush()

    def flush(self) -> None:
        if self.transport is not None:
            data = self.h2.data_to_send()
            if data:
                self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                hd = _s(ev.headers)
                pseudo = dict(h for h in hd if h[0].startswith(":"))
                self.reqs[ev.stream_id] = H2Request(pseudo.get(":method", ""), pseudo.get(":path", ""), hd)
            elif isinstance(ev, h2.events.DataReceived):
                req = self.reqs.get(ev.stream_id)
                if req is not None:
                    req.body += ev.data
                    self.server.touch()
                if req is not None and req.path == "/hold" and not self.server.released.is_set():
                    self.held.append((ev.stream_id, ev.flow_controlled_length))
                else:
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.TrailersReceived):
                req = self.reqs.get(ev.stream_id)
                if req is not None:
                    req.trailers = _s(ev.headers)
            elif isinstance(ev, h2.events.StreamEnded):
                req = self.reqs.pop(ev.stream_id, None)
                if req is not None:
                    self.server.requests.append(req)
                    self.server.touch()
                    self.respond(ev.stream_id, req)
            elif isinstance(ev, h2.events.StreamReset):
                self.reqs.pop(ev.stream_id, None)
                self.pending.pop(ev.stream_id, None)
                self.server.resets.append(ev.stream_id)
                self.server.touch()
            elif isinstance(ev, h2.events.WindowUpdated):
                for sid in list(self.pending):
                    self.send_pending(sid)
        self.flush()

    def respond(self, sid: int, req: H2Request) -> None:
        srv = self.server
        url = urlsplit(req.path)
        path = url.path
        trailers = None
        status, body = 200, f"hello from {srv.name}".encode()
        if path == "/refuse-once" and not srv.refused:
            srv.refused = True
            self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        if path == "/echo" or path == "/hold":
            body = req.body
            if req.header("x-want-trailers"):
                trailers = [(b"x-echo-trailer", b"yes")]
        elif path == "/big":
            body = b"x" * int(parse_qs(url.query).get("n", ["0"])[0])
        elif path.startswith("/status/"):
            status, body = int(path.rsplit("/", 1)[1]), b""
        self.h2.send_headers(sid, [(b":status", str(status).encode()), (b"content-type", b"text/plain"),
                                   (b"x-server", srv.name.encode())])
        self.pending[sid] = (memoryview(body), trailers)
        self.send_pending(sid)

    def send_pending(self, sid: int) -> None:
        body, trailers = self.pending[sid]
        while body:
            n = min(len(body), self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            if n <= 0:
                self.pending[sid] = (body, trailers)
                return
            self.h2.send_data(sid, bytes(body[:n]))
            body = body[n:]
        del self.pending[sid]
        if trailers:
            self.h2.send_headers(sid, trailers, end_stream=True)
        else:
            self.h2.end_stream(sid)

    def release(self) -> None:
        for sid, n in self.held:
            with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                self.h2.acknowledge_received_data(n, sid)
        self.held.clear()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        with contextlib.suppress(ValueError):
            self.server.conns.remove(self)
        self.server.touch()


class H2Server:
    def __init__(self, name: str = "h2up", ssl_context: ssl.SSLContext | None = None, max_streams: int = 1000) -> None:
        self.name = name
        self.ssl = ssl_context
        self.max_streams = max_streams
        self.requests: list[H2Request] = []
        self.resets: list[int] = []
        self.conns: list[_ServerConn] = []
        self.connections = 0
        self.refused = False
        self.released = asyncio.Event()
        self.changed = asyncio.Event()
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    def touch(self) -> None:
        self.changed.set()

    async def wait_for(self, pred: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not pred():
                self.changed.clear()
                await self.changed.wait()

    def _make(self) -> _ServerConn:
        self.connections += 1
        return _ServerConn(self)

    async def __aenter__(self) -> H2Server:
        self._server = await asyncio.get_running_loop().create_server(self._make, "127.0.0.1", 0, ssl=self.ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for c in list(self.conns):
            if c.transport is not None:
                c.transport.abort()

    def release(self) -> None:
        """Start acknowledging the DATA of ``/hold`` requests."""
        self.released.set()
        for c in self.conns:
            c.release()

    def goaway(self) -> None:
        for c in self.conns:
            c.h2.close_connection(ErrorCodes.NO_ERROR, last_stream_id=c.h2.highest_inbound_stream_id)
            c.flush()


@dataclass
class H2Response:
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    reset: int | None = None  # the RST_STREAM error code, if the stream was reset

    def header(self, name: str) -> str | None:
        vals = [v for k, v in self.headers if k == name]
        return ",".join(vals) if vals else None


class H2Client(asyncio.Protocol):
    """An HTTP/2 client connection (h2c prior knowledge, or TLS when ``ssl`` is given)."""

    def __init__(self, validate: bool = True, window: int = 1 << 20) -> None:
        cfg = h2.config.H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=validate,
                                        normalize_outbound_headers=validate, validate_inbound_headers=validate)
        self.raw = GracefulH2(cfg)  # keeps its streams after the proxy's GOAWAY (RFC 9113 6.8)
        self.window = window
        self.transport: asyncio.Transport | None = None
        self.responses: dict[int, H2Response] = {}
        self.done: dict[int, asyncio.Future[H2Response]] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = asyncio.Event()
        self.changed = asyncio.Event()
        self.settings = asyncio.Event()  # the server's SETTINGS arrived
        self.resets: dict[int, int] = {}  # RST_STREAM codes received, by stream
        self.auto_ack = True

    @classmethod
    async def connect(cls, port: int, ssl_context: ssl.SSLContext | None = None, **kw: Any) -> H2Client:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(lambda: cls(**kw), "127.0.0.1", port, ssl=ssl_context,
                                                server_hostname="localhost" if ssl_context else None)
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.raw.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.window, h2.settings.SettingCodes.ENABLE_PUSH: 0})
        self.raw.initiate_connection()
        self.flush()

    def flush(self) -> None:
        if self.transport is not None:
            data = self.raw.data_to_send()
            if data:
                self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.raw.receive_data(data)
        except h2.exceptions.ProtocolError:
            events = []
        for ev in events:
            sid = getattr(ev, "stream_id", 0)
            r = self.responses.get(sid)
            if isinstance(ev, h2.events.ResponseReceived) and r is not None:
                hd = _s(ev.headers)
                r.status = int(dict(hd)[":status"])
                r.headers = [h for h in hd if not h[0].startswith(":")]
            elif isinstance(ev, h2.events.DataReceived) and r is not None:
                r.body += ev.data
                if self.auto_ack:
                    self.raw.acknowledge_received_data(ev.flow_controlled_length, sid)
            elif isinstance(ev, h2.events.TrailersReceived) and r is not None:
                r.trailers = _s(ev.headers)
            elif isinstance(ev, h2.events.StreamEnded) and r is not None:
                self._finish(sid)
            elif isinstance(ev, h2.events.StreamReset):
                self.resets[sid] = int(ev.error_code)
                if r is not None:
                    r.reset = int(ev.error_code)
                    self._finish(sid)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = ev
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                self.settings.set()
        self.flush()
        self.changed.set()

    def _finish(self, sid: int) -> None:
        fut = self.done.get(sid)
        if fut is not None and not fut.done():
            fut.set_result(self.responses[sid])

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.closed.set()
        self.changed.set()
        for fut in self.done.values():
            if not fut.done():
                fut.set_exception(ConnectionError("connection closed"))

    def start(self, method: str, path: str, authority: str, headers: list[tuple[str, str]] | None = None,
              body: bytes | None = b"", end: bool = True, scheme: str = "http") -> int:
        sid = self.raw.get_next_available_stream_id()
        hd = [(":method", method), (":scheme", scheme), (":authority", authority), (":path", path)]
        hd += headers or []
        self.responses[sid] = H2Response()
        self.done[sid] = asyncio.get_running_loop().create_future()
        self.raw.send_headers(sid, [(k.encode(), v.encode()) for k, v in hd], end_stream=end and not body)
        if body:
            self.send_body(sid, body, end)
        self.flush()
        return sid

    def send_body(self, sid: int, body: bytes, end: bool = True) -> None:
        """Sends what the windows allow now (tests that need more use ``send_all``)."""
        n = min(len(body), self.raw.local_flow_control_window(sid))
        for i in range(0, n, self.raw.max_outbound_frame_size):
            chunk = body[i:min(n, i + self.raw.max_outbound_frame_size)]
            self.raw.send_data(sid, chunk, end_stream=end and i + len(chunk) == len(body))
        self.flush()
        if n < len(body):
            raise BufferError(n)

    async def send_all(self, sid: int, body: bytes, timeout: float = 10.0, end: bool = True) -> None:
        """Send ``body`` (and END_STREAM unless ``end`` is False), waiting for window as needed."""
        async with asyncio.timeout(timeout):
            pos = 0
            while pos < len(body):
                n = min(len(body) - pos, self.raw.local_flow_control_window(sid), self.raw.max_outbound_frame_size)
                if n <= 0:
                    self.changed.clear()
                    await self.changed.wait()
                    continue
                self.raw.send_data(sid, body[pos:pos + n], end_stream=end and pos + n == len(body))
                pos += n
                self.flush()

    async def response(self, sid: int, timeout: float = 10.0) -> H2Response:
        return await asyncio.wait_for(asyncio.shield(self.done[sid]), timeout)

    async def request(self, method: str, path: str, authority: str, headers: list[tuple[str, str]] | None = None,
                      body: bytes = b"", timeout: float = 10.0) -> H2Response:
        if len(body) > min(self.raw.outbound_flow_control_window, self.raw.remote_settings.initial_window_size):
            sid = self.start(method, path, authority, headers, None, end=False)
            await self.send_all(sid, body, timeout)
        else:
            sid = self.start(method, path, authority, headers, body)
        return await self.response(sid, timeout)

    async def wait(self, pred: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not pred():
                self.changed.clear()
                await self.changed.wait()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
