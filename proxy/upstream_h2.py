"""HTTP/2 upstream: multiplexed connections to one endpoint, one ``H2Exchange`` per request.

``H2Pool.acquire`` has the contract of ``upstream.Pool.acquire`` (an object now,
or None and ``done(obj, err)`` later; UpstreamOverflowError past the circuit
breakers), but what it hands out is one stream on a shared connection: a
connection takes streams until the peer's SETTINGS_MAX_CONCURRENT_STREAMS
(or the cluster's ``h2_max_concurrent_streams``, whichever is lower) are open;
past that another connection is opened while ``max_connections`` allows,
else the request waits (a pending request, bounded by
``max_pending_requests``). HTTP/2 over TLS offers the endpoint's ALPN list
(Istio's includes "h2"); plaintext is h2c with prior knowledge.

The connection and the per-request exchange are in ``upstream_h2conn``, the
framing in ``h2wire_client`` (no h2 library on the proxy's path).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from typing import Any, cast

from proxy.errors import (
    ConnectError,
    ConnectTimeoutError,
    ProxyError,
    TlsError,
    UpstreamOverflowError,
)
from proxy.model import DEFAULT_LIMITS, CircuitBreakers, TlsClient
from proxy.stats import ClusterStats
from proxy.tls import MissingSecret, TlsProvider, failure_reason, peer_of, sans_allowed
from proxy.upstream import Done, tls_client_args
from proxy.upstream_h2conn import H2Exchange, H2UpstreamConnection, h2_headers

__all__ = ["H2Exchange", "H2Pool", "H2UpstreamConnection", "h2_headers"]

log = logging.getLogger("pillion.upstream.h2")


class H2Pool:
    """The HTTP/2 connections of one endpoint of one cluster, for one worker."""

    __slots__ = (
        "connect_timeout",
        "conns",
        "host",
        "limits",
        "loop",
        "max_streams",
        "max_uses",
        "opening",
        "port",
        "provider",
        "retired",
        "stats",
        "tls",
        "waiters",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, host: str, port: int, connect_timeout: float,
                 stats: ClusterStats, tls: TlsClient | None = None, provider: TlsProvider | None = None,
                 max_streams: int = 1024) -> None:
        self.loop = loop
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.stats = stats
        self.tls = tls
        self.provider = provider
        self.max_streams = max_streams
        self.limits: CircuitBreakers = DEFAULT_LIMITS
        self.max_uses = 0
        self.conns: list[H2UpstreamConnection] = []
        self.opening = 0
        self.retired = False
        self.waiters: deque[Done] = deque()

    def _usable(self) -> H2UpstreamConnection | None:
        for conn in self.conns:
            if conn.usable():
                return conn
        return None

    def acquire(self, done: Done) -> H2Exchange | None:
        conn = self._usable()
        if conn is not None:
            return conn.new_exchange()
        stats = self.stats
        limits = self.limits
        if stats.rq_pending_active >= limits.max_pending_requests:
            stats.rq_pending_overflow += 1
            raise UpstreamOverflowError()
        stats.rq_pending_active += 1
        self.waiters.append(done)
        self._maybe_connect()
        return None

    def cancel(self, done: Done) -> None:
        try:
            self.waiters.remove(done)
        except ValueError:
            return
        self.stats.rq_pending_active -= 1

    def _maybe_connect(self) -> None:
        """Open a connection if the waiting requests exceed what the opening ones will take."""
        if self.retired or len(self.waiters) <= self.opening * self.max_streams:
            return
        stats = self.stats
        if stats.cx_active + stats.cx_connecting < self.limits.max_connections:
            self.opening += 1
            self.loop.create_task(self._connect())
        else:
            stats.cx_overflow += 1

    def serve_waiters(self) -> None:
        waiters = self.waiters
        while waiters:
            conn = self._usable()
            if conn is None:
                self._maybe_connect()
                return
            done = waiters.popleft()
            self.stats.rq_pending_active -= 1
            done(cast(Any, conn.new_exchange()), None)

    def _fail_waiters(self, err: ProxyError) -> None:
        if self.opening or self._usable() is not None:
            return  # another connection will serve them
        waiters = list(self.waiters)
        self.waiters.clear()
        self.stats.rq_pending_active -= len(waiters)
        for done in waiters:
            done(None, err)

    async def _connect(self) -> None:
        stats = self.stats
        stats.cx_connecting += 1
        try:
            conn, err = await self._open()
        finally:
            stats.cx_connecting -= 1
            self.opening -= 1
        if conn is None:
            self._fail_waiters(err or ConnectError())
            return
        stats.cx_total += 1
        stats.cx_active += 1
        self.conns.append(conn)
        conn.ready = True
        self.serve_waiters()

    async def _open(self) -> tuple[H2UpstreamConnection | None, ProxyError | None]:
        stats = self.stats
        try:
            ssl_args = tls_client_args(self.tls, self.provider)
        except (MissingSecret, ssl.SSLError, ValueError) as e:
            log.warning("no certificate (secret %s) yet for TLS to %s:%s", e, self.host, self.port)
            stats.cx_connect_fail += 1
            return None, TlsError("missing secret")
        try:
            transport, proto = await asyncio.wait_for(
                self.loop.create_connection(lambda: H2UpstreamConnection(self), self.host, self.port, **ssl_args),
                self.connect_timeout)
        except ssl.SSLError as e:
            stats.cx_connect_fail += 1
            if self.provider is not None:
                self.provider.count_failure(failure_reason(e))
            return None, TlsError(failure_reason(e))
        except TimeoutError:
            stats.cx_connect_fail += 1
            stats.cx_connect_timeout += 1
            return None, ConnectTimeoutError()
        except OSError:
            stats.cx_connect_fail += 1
            return None, ConnectError()
        if self.tls is not None and not sans_allowed(self.tls.peer_sans, peer_of(transport)):
            stats.cx_connect_fail += 1
            if self.provider is not None:
                self.provider.count_failure("wrong_san")
            transport.abort()
            return None, TlsError("wrong_san")
        assert isinstance(proto, H2UpstreamConnection)
        if proto.closed or self.retired:
            transport.close()
            return None, ConnectError()
        return proto, None

    def forget(self, conn: H2UpstreamConnection) -> None:
        if conn in self.conns:
            self.conns.remove(conn)
            self.stats.cx_active -= 1
            if self.waiters:
                self.serve_waiters()

    def close_idle(self, now: float, idle_timeout: float) -> None:
        """The cluster's idle_timeout: close connections with no stream for that long."""
        for conn in [c for c in self.conns if not c.active and now - c.idle_since >= idle_timeout]:
            conn.close()

    def retire(self) -> None:
        """No new streams; connections close when their streams end."""
        self.retired = True
        for conn in list(self.conns):
            conn.goaway = True
            if not conn.active:
                conn.close()

    def close(self) -> None:
        self.retired = True
        for conn in list(self.conns):
            conn.close()
