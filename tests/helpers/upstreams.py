"""Real upstream servers for tests, on 127.0.0.1 port 0.

``RecordingUpstream`` is an HTTP/1.1 server (httptools) that records every
byte it received, per connection, and answers by path:

- ``/echo``            200, the request body back, with Content-Length
- ``/chunked``         200, a chunked body of ``n`` (query) pieces
- ``/close``           200, body delimited by closing the connection (no length)
- ``/reset``           closes the connection without answering
- ``/slow?ms=N``       answers after N milliseconds
- ``/status/N``        answers status N (no body for 204/304)
- ``/big?n=BYTES``     200 with BYTES of body, written at once
- ``/ws``              101 Switching Protocols, then echoes raw bytes
- anything else        200 ``hello from <name>`` with the request's head echoed in headers

``UpstreamState.wait_for(pred)`` waits (with a deadline) until a predicate
over the recorded state holds; ``body_started`` is set at the first request
body byte (before the request is complete), so a test can prove streaming.

``TcpServer`` echoes or counts (``echo=False``), supports half-close, keeps a
SHA-256 of what it received and can start with reading paused
(``paused=True``, then ``resume()``) to exercise backpressure.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import parse_qs, urlsplit

import httptools


@dataclass
class SeenRequest:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        name = name.lower()
        vals = [v for k, v in self.headers if k.lower() == name]
        return ",".join(vals) if vals else None


@dataclass
class UpstreamState:
    name: str
    raw: list[bytearray] = field(default_factory=list)  # bytes received, per connection
    requests: list[SeenRequest] = field(default_factory=list)
    connections: int = 0
    request_seen: asyncio.Event = field(default_factory=asyncio.Event)
    body_started: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # pulsed on every recorded event
    transports: list[asyncio.Transport] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def all_bytes(self) -> bytes:
        return b"".join(bytes(r) for r in self.raw)

    def touch(self) -> None:
        self.changed.set()

    async def wait_for(self, pred: Callable[[], bool], timeout: float = 2.0) -> None:
        """Return once ``pred()`` holds; TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while not pred():
                self.changed.clear()
                await self.changed.wait()


class _Conn(asyncio.Protocol):
    def __init__(self, state: UpstreamState) -> None:
        self.state = state
        self.raw = bytearray()
        state.raw.append(self.raw)
        state.connections += 1
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.tunnel = False
        self.cur: SeenRequest | None = None
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.state.transports.append(transport)
        self.state.touch()

    def data_received(self, data: bytes) -> None:
        self.raw += data
        self.state.touch()
        if self.tunnel:
            assert self.transport is not None
            self.transport.write(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError:
            if self.transport:
                self.transport.close()

    def eof_received(self) -> bool:
        if self.tunnel and self.transport is not None:
            self.transport.write_eof()
            return True
        return False

    def on_message_begin(self) -> None:
        self.url = b""
        self.cur = SeenRequest("", "", [])

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.cur is not None
        self.cur.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        assert self.cur is not None
        self.cur.method = self.parser.get_method().decode()
        self.cur.path = self.url.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        assert self.cur is not None
        self.cur.body += body
        self.state.body_started.set()

    def on_message_complete(self) -> None:
        req = self.cur
        assert req is not None and self.transport is not None
        self.state.requests.append(req)
        self.state.request_seen.set()
        keep = self.parser.should_keep_alive()
        task = asyncio.get_running_loop().create_task(self.respond(req, keep))
        self.state.tasks.add(task)
        task.add_done_callback(self.state.tasks.discard)
        self.state.touch()

    async def respond(self, req: SeenRequest, keep: bool) -> None:
        t = self.transport
        if t is None:
            return
        u = urlsplit(req.path)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        path = u.path
        conn_hdr = b"" if keep else b"connection: close\r\n"
        if path == "/reset":
            t.abort()
            return
        if path == "/slow":
            await asyncio.sleep(int(q.get("ms", "100")) / 1000)
            if self.transport is None:
                return
        if path == "/echo":
            body = req.body
            t.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n" % (len(body), conn_hdr) + body)
        elif path == "/chunked":
            n = int(q.get("n", "3"))
            parts = [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n%s\r\n" % conn_hdr]
            for i in range(n):
                piece = b"piece-%d;" % i
                parts.append(b"%x\r\n%s\r\n" % (len(piece), piece))
            parts.append(b"0\r\n\r\n")
            t.write(b"".join(parts))
        elif path == "/close":
            t.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil-eof-body")
            t.close()
            return
        elif path.startswith("/status/"):
            code = int(path.rsplit("/", 1)[1])
            if code in (204, 304):
                t.write(b"HTTP/1.1 %d X\r\n%s\r\n" % (code, conn_hdr))
            else:
                body = b"status %d" % code
                t.write(b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n%s\r\n%s" % (code, len(body), conn_hdr, body))
        elif path == "/big":
            n = int(q.get("n", "1000000"))
            t.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n" % (n, conn_hdr) + b"x" * n)
        elif path == "/ws":
            t.write(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
            self.tunnel = True
            return
        else:
            body = f"hello from {self.state.name}".encode()
            echo = json.dumps({"method": req.method, "path": req.path, "headers": req.headers}).encode()
            length = b"content-length: %d\r\n" % len(body)
            t.write(b"HTTP/1.1 200 OK\r\n" + length + b"x-upstream: " + self.state.name.encode() +
                    b"\r\nx-seen: " + echo.replace(b"\r", b"").replace(b"\n", b"") + b"\r\n" + conn_hdr + b"\r\n" +
                    (b"" if req.method == "HEAD" else body))
        if not keep:
            t.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.state.touch()


class RecordingUpstream:
    def __init__(self, name: str = "upstream") -> None:
        self.state = UpstreamState(name)
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def __aenter__(self) -> RecordingUpstream:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Conn(self.state), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in list(self.state.tasks):
            task.cancel()
        for t in self.state.transports:
            t.abort()
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1)

    @property
    def requests(self) -> list[SeenRequest]:
        return self.state.requests


class _Echo(asyncio.Protocol):
    def __init__(self, owner: TcpServer) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.held: list[bytes] = []  # reads taken while paused, replayed by resume()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.owner.connections += 1
        self.owner.transports.append(transport)
        self.owner.protocols.append(self)
        # uvloop starts reading after connection_made, so pausing here would not stick:
        # a paused server pauses at its first read instead and holds that read.
        self.owner.changed.set()

    def resume(self) -> None:
        held, self.held = self.held, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        for data in held:
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self.owner.paused:
            self.held.append(data)
            if self.transport is not None:
                self.transport.pause_reading()
            self.owner.changed.set()
            return
        self.owner.received += len(data)
        self.owner.sha.update(data)
        if self.owner.echo and self.transport is not None:
            self.transport.write(data)
        self.owner.changed.set()

    def eof_received(self) -> bool:
        self.owner.eofs += 1
        self.owner.eof_event.set()
        self.owner.changed.set()
        if self.transport is not None:
            if self.owner.reply_on_eof:
                self.transport.write(self.owner.reply_on_eof)
            self.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.owner.closed += 1
        self.owner.changed.set()


class TcpServer:
    """``echo=True``: echo everything; else a sink. On EOF: optional reply, then FIN.

    ``paused=True`` accepts connections without reading from them until ``resume()``.
    """

    def __init__(self, echo: bool = True, reply_on_eof: bytes = b"", paused: bool = False) -> None:
        self.echo = echo
        self.reply_on_eof = reply_on_eof
        self.paused = paused
        self.received = 0
        self.sha = hashlib.sha256()
        self.connections = 0
        self.closed = 0
        self.eofs = 0
        self.eof_event = asyncio.Event()
        self.changed = asyncio.Event()  # pulsed on every connection, read, EOF and close
        self.transports: list[asyncio.Transport] = []
        self.protocols: list[_Echo] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def __aenter__(self) -> TcpServer:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Echo(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in self.transports:
            t.abort()
        if self.server is not None:
            self.server.close()

    def resume(self) -> None:
        """Start reading on every accepted connection (and on later ones)."""
        self.paused = False
        for proto in self.protocols:
            proto.resume()

    async def wait_for(self, pred: Callable[[], bool], timeout: float = 2.0) -> None:
        """Return once ``pred()`` holds; TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while not pred():
                self.changed.clear()
                await self.changed.wait()


class UnacceptingListener:
    """A listening port whose accept queue is full, so a connect to it stays pending.

    Linux drops a SYN when the listener's accept queue is full; with a backlog of
    0 one never-accepted connection fills it. Connects then hang (the kernel
    retries the SYN after 1 s, 3 s, ...) until this is closed.
    """

    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = int(self.listener.getsockname()[1])
        self.filler = socket.create_connection(("127.0.0.1", self.port))

    def __enter__(self) -> UnacceptingListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.filler.close()
        self.listener.close()
