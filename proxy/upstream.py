"""Upstream HTTP/1.1 connections and the per-endpoint keep-alive pool.

``UpstreamConnection`` is an asyncio Protocol that carries one exchange at a
time: the stream that checked it out writes the request, and the response
parser's callbacks are handed to that stream (``Exchange`` below is the
interface it implements). ``Pool`` keeps idle connections per endpoint (LIFO,
so the warmest socket is reused) and opens new ones with the cluster's
connect timeout.

Strategy: after an exchange the connection goes back to the pool only if the
response said keep-alive, the request was fully sent and nothing odd
happened; otherwise it is closed. A response to HEAD ends at its head, so the
parser is replaced before the next use (httptools cannot be told to skip a
body). A close-delimited response ends at EOF.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, cast

import httptools

from proxy.errors import (
    ConnectError,
    ConnectTimeoutError,
    ProxyError,
    TlsError,
    UpstreamOverflowError,
    UpstreamProtocolError,
)
from proxy.model import DEFAULT_LIMITS, CircuitBreakers, TlsClient
from proxy.stats import ClusterStats
from proxy.tls import MissingSecret, TlsProvider, failure_reason, peer_of, sans_allowed

log = logging.getLogger("pillion.upstream")

HIGH_WATER = 64 * 1024
LOW_WATER = 16 * 1024


class Exchange(Protocol):
    """What an upstream connection reports to the stream using it."""

    def on_upstream_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None: ...
    def on_upstream_body(self, data: bytes) -> None: ...
    def on_upstream_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None: ...
    def on_upstream_complete(self, keep_alive: bool) -> None: ...
    def on_upstream_upgrade(self, rest: bytes) -> None: ...
    def on_upstream_error(self, err: ProxyError) -> None: ...
    def on_upstream_flush(self) -> None: ...
    def pause_downstream(self) -> None: ...
    def resume_downstream(self) -> None: ...


class TunnelPeer(Protocol):
    """The downstream side of an upgraded (spliced) connection."""

    def tunnel_write(self, data: bytes) -> None: ...
    def tunnel_eof(self) -> bool: ...
    def tunnel_closed(self) -> None: ...
    def pause_downstream(self) -> None: ...
    def resume_downstream(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_headers", "_reason", "closed", "exchange", "head_only", "idle_since", "parser", "pool", "reader_paused",
        "transport", "tunnel", "tunnel_done_writing", "uses", "writer_paused",
    )

    def __init__(self, pool: Pool) -> None:
        # per-connection
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.uses = 0
        self.idle_since = 0.0  # loop time it went back to the pool
        self.reader_paused = False
        self.writer_paused = False
        self.tunnel: TunnelPeer | None = None  # the downstream, once an Upgrade succeeded
        self.tunnel_done_writing = False  # the upstream sent its FIN on the tunnel
        # per-exchange
        self.exchange: Exchange | None = None
        self.head_only = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.tunnel_write(data)
            return
        ex = self.exchange
        if ex is None:
            # Bytes while idle: the server is confused or closing; never reuse.
            self.abort()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            rest = data[e.args[0]:] if e.args else b""
            ex.on_upstream_upgrade(rest)
        except httptools.HttpParserCallbackError as e:
            # Not the peer's fault: a bug on our side. Log it, reset this exchange, keep serving.
            log.error("bug while relaying a response", exc_info=e.__context__)
            self.abort()
            ex.on_upstream_error(UpstreamProtocolError())
            return
        except httptools.HttpParserError:
            self.abort()
            ex.on_upstream_error(UpstreamProtocolError())
            return
        ex.on_upstream_flush()

    def eof_received(self) -> bool:
        if self.tunnel is not None:
            self.tunnel_done_writing = True
            return self.tunnel.tunnel_eof()  # half-close unless the client is done too
        return False  # close our side too; connection_lost finishes the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.tunnel is not None:
            peer, self.tunnel = self.tunnel, None
            peer.tunnel_closed()
            return
        ex = self.exchange
        if ex is not None:
            self.exchange = None
            ex.on_upstream_error(_LOST)

    def pause_writing(self) -> None:
        self.writer_paused = True
        target = self.exchange or self.tunnel
        if target is not None:
            target.pause_downstream()

    def resume_writing(self) -> None:
        self.writer_paused = False
        target = self.exchange or self.tunnel
        if target is not None:
            target.resume_downstream()

    # -- httptools callbacks (response side)
    def on_message_begin(self) -> None:
        self._headers = []
        self._reason = b""

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            return  # interim responses are consumed here (Envoy's default for 100-continue)
        ex = self.exchange
        if ex is not None:
            ex.on_upstream_head(status, self._reason, self._headers, self.parser.should_keep_alive())
            if self.head_only and self.exchange is ex:
                # The response to HEAD has no body whatever its headers say.
                keep_alive = self.parser.should_keep_alive()
                self.parser = httptools.HttpResponseParser(self)
                self.head_only = False
                ex.on_upstream_complete(keep_alive)

    def on_body(self, body: bytes) -> None:
        ex = self.exchange
        if ex is not None:
            ex.on_upstream_body(body)

    def on_message_complete(self) -> None:
        if 100 <= self.parser.get_status_code() < 200 and self.parser.get_status_code() != 101:
            return
        ex = self.exchange
        if ex is not None:
            ex.on_upstream_complete(self.parser.should_keep_alive())

    # -- used by the stream
    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def write_eof(self) -> None:
        if self.transport is not None and not self.closed and self.transport.can_write_eof():
            self.transport.write_eof()

    def pause_reading(self) -> None:
        if not self.reader_paused and self.transport is not None and not self.closed:
            self.reader_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reader_paused and self.transport is not None and not self.closed:
            self.reader_paused = False
            self.transport.resume_reading()

    def release(self, reusable: bool) -> None:
        """End of an exchange: back to the pool, or closed."""
        self.exchange = None
        if reusable and not self.closed and self.tunnel is None:
            self.resume_reading()
            self.pool.put(self)
        else:
            self.abort()

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.exchange = None
            self.pool.forget(self)
            if self.transport is not None:
                self.transport.close()


def tls_client_args(tls: TlsClient | None, provider: TlsProvider | None) -> dict[str, Any]:
    """Keyword arguments for loop.create_connection that originate TLS, if the endpoint needs it."""
    if tls is None or provider is None:
        return {}
    return {"ssl": provider.client_context(tls), "server_hostname": tls.sni or None,
            "ssl_handshake_timeout": 10.0}


class _Lost(UpstreamProtocolError):
    flag = "UR"
    body = b"upstream connect error or disconnect/reset before headers. reset reason: connection termination"


_LOST = _Lost()


Done = Callable[[UpstreamConnection | None, ProxyError | None], None]


class Pool:
    """Keep-alive connections to one endpoint of one cluster, for one worker.

    [traffic] ``acquire`` applies the cluster's circuit breakers: a new connection
    only while the cluster has fewer than max_connections open or opening; past
    that the request waits for a connection to come back (a pending request),
    unless max_pending_requests are already waiting: then 503 UO at once. A
    connection serves at most ``max_uses`` requests (0: unlimited).
    """

    __slots__ = ("_all", "connect_timeout", "connecting", "host", "idle", "limits", "loop", "max_uses", "port", "provider",
                 "retired", "stats", "tls", "waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop, host: str, port: int, connect_timeout: float,
                 stats: ClusterStats, tls: TlsClient | None = None, provider: TlsProvider | None = None) -> None:
        self.loop = loop
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.stats = stats
        self.tls = tls  # originate TLS to this endpoint (ISTIO_MUTUAL, SIMPLE, MUTUAL)
        self.provider = provider
        self.idle: list[UpstreamConnection] = []
        self.retired = False  # set when the endpoint left the cluster: no more reuse
        self._all: set[UpstreamConnection] = set()
        self.limits: CircuitBreakers = DEFAULT_LIMITS
        self.max_uses = 0
        self.waiters: deque[Done] = deque()  # requests waiting for a connection (max_connections reached)
        self.connecting = 0  # this endpoint's connections being opened

    # ---- [traffic] circuit breakers
    def acquire(self, done: Done) -> UpstreamConnection | None:
        """An idle connection now, or None and ``done`` is called later. Raises UpstreamOverflowError."""
        conn = self.checkout()
        if conn is not None:
            return conn
        stats = self.stats
        limits = self.limits
        if stats.rq_pending_active >= limits.max_pending_requests:
            stats.rq_pending_overflow += 1
            raise UpstreamOverflowError()
        stats.rq_pending_active += 1
        if self._may_open():
            self.connect(self._pending_done(done))
        else:
            stats.cx_overflow += 1
            self.waiters.append(done)
        return None

    def _pending_done(self, done: Done) -> Done:
        def finish(conn: UpstreamConnection | None, err: ProxyError | None) -> None:
            self.stats.rq_pending_active -= 1
            if err is not None:
                self._serve_waiter()  # the slot this connection held is free again
            done(conn, err)
        return finish

    def cancel(self, done: Done) -> None:
        """A waiting request gave up (timeout, client gone)."""
        try:
            self.waiters.remove(done)
        except ValueError:
            return
        self.stats.rq_pending_active -= 1

    def _serve_waiter(self) -> None:
        """Capacity freed up: open a connection for the request waiting longest."""
        if self.waiters and not self.retired and self._may_open():
            done = self.waiters.popleft()
            self.connect(self._pending_done(done))

    def _may_open(self) -> bool:
        """Below the cluster's max_connections, or this endpoint has no connection at all (as
        Envoy: other endpoints' connections must not leave its requests with nothing to wait for)."""
        stats = self.stats
        return (stats.cx_active + stats.cx_connecting < self.limits.max_connections
                or (not self._all and not self.connecting))
    # ---- [traffic] end

    def checkout(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.uses += 1
                return conn
        return None

    def put(self, conn: UpstreamConnection) -> None:
        if self.retired or (self.max_uses and conn.uses >= self.max_uses):
            conn.abort()
        elif self.waiters:
            done = self.waiters.popleft()  # [traffic] hand it straight to a waiting request
            self.stats.rq_pending_active -= 1
            conn.uses += 1
            done(conn, None)
        else:
            conn.idle_since = self.loop.time()
            self.idle.append(conn)

    def close_idle(self, now: float, idle_timeout: float) -> None:
        """The cluster's idle_timeout (common_http_protocol_options): close connections idle that long."""
        for conn in [c for c in self.idle if now - c.idle_since >= idle_timeout]:
            conn.abort()

    def forget(self, conn: UpstreamConnection) -> None:
        if conn in self._all:
            self._all.discard(conn)
            self.stats.cx_active -= 1
            if self.waiters:
                self._serve_waiter()
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def connect(self, done: Callable[[UpstreamConnection | None, ProxyError | None], None]) -> asyncio.Task[None]:
        """Open a new connection; ``done(conn, None)`` or ``done(None, error)`` is called once."""
        self.stats.cx_connecting += 1  # counted now: the breaker sees it before the task runs
        self.connecting += 1
        return self.loop.create_task(self._connect(done))

    async def _connect(self, done: Callable[[UpstreamConnection | None, ProxyError | None], None]) -> None:
        stats = self.stats
        finished = False

        def once(conn: UpstreamConnection | None, err: ProxyError | None) -> None:
            nonlocal finished
            finished = True
            stats.cx_connecting -= 1  # before ``done``: it may hand the slot to a waiting request
            self.connecting -= 1
            done(conn, err)

        try:
            await self._open(once)
        finally:
            if not finished:
                stats.cx_connecting -= 1
                self.connecting -= 1

    async def _open(self, done: Callable[[UpstreamConnection | None, ProxyError | None], None]) -> None:
        stats = self.stats
        try:
            ssl_args = tls_client_args(self.tls, self.provider)
        except (MissingSecret, ssl.SSLError, ValueError) as e:
            log.warning("no certificate (secret %s) yet for TLS to %s:%s", e, self.host, self.port)
            stats.cx_connect_fail += 1
            done(None, TlsError("missing secret"))
            return
        try:
            transport, proto = await asyncio.wait_for(
                self.loop.create_connection(lambda: UpstreamConnection(self), self.host, self.port, **ssl_args),
                self.connect_timeout,
            )
        except ssl.SSLError as e:
            stats.cx_connect_fail += 1
            if self.provider is not None:
                self.provider.count_failure(failure_reason(e))
            log.info("TLS handshake with %s:%s failed: %s", self.host, self.port, e)
            done(None, TlsError(failure_reason(e)))
            return
        except TimeoutError:
            stats.cx_connect_fail += 1
            stats.cx_connect_timeout += 1
            done(None, ConnectTimeoutError())
            return
        except OSError as e:
            stats.cx_connect_fail += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("connect to %s:%s failed: %s", self.host, self.port, e)
            done(None, ConnectError())
            return
        if self.tls is not None and not sans_allowed(self.tls.peer_sans, peer_of(transport)):
            stats.cx_connect_fail += 1
            if self.provider is not None:
                self.provider.count_failure("wrong_san")
            log.info("TLS peer %s:%s is not one of the expected identities", self.host, self.port)
            transport.abort()
            done(None, TlsError("wrong_san"))
            return
        stats.cx_total += 1
        stats.cx_active += 1
        assert isinstance(proto, UpstreamConnection)
        proto.uses = 1
        self._all.add(proto)
        if proto.closed:
            done(None, ConnectError())
            return
        done(proto, None)

    def retire(self) -> None:
        """Close idle connections now; busy ones close when their exchange ends."""
        self.retired = True
        for conn in list(self.idle):
            conn.abort()
        self.idle.clear()

    def close(self) -> None:
        self.retired = True
        for conn in list(self._all):
            conn.abort()
        self.idle.clear()
