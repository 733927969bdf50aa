"""TCP proxying: splice a downstream connection to an upstream one.

Two asyncio Protocols that write straight into each other's transport: no
task, no buffer object, no await per chunk (STYLE.md 2.3). Backpressure is
the transports' own: when one side's write buffer passes its high-water mark
(``pause_writing``), reading from the other side stops until it drains, so a
slow peer never makes the proxy hold more than about one high-water mark per
direction. A FIN from one side is passed on as a FIN to the other
(half-close); the connection pair closes when both directions are done.

Timeouts: the connect timeout is the cluster's; the idle timeout is checked
by the worker's once-a-tick sweep, comparing byte counters, so the data path
pays nothing for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from typing import TYPE_CHECKING, cast

from proxy.cluster import ClusterRuntime
from proxy.context import Context
from proxy.model import Endpoint, Listener
from proxy.policy import authorize_connection
from proxy.router import pick_weighted

if TYPE_CHECKING:
    from proxy.authz import RbacFilter
from proxy.accesslog import TCP as TCP_RECORD  # [accesslog]
from proxy.stats import ClusterStats, ListenerStats
from proxy.tls import MissingSecret, failure_reason, peer_of, sans_allowed
from proxy.upstream import tls_client_args

log = logging.getLogger("pillion.tcp")

HIGH_WATER = 1024 * 1024  # Envoy's per-connection buffer limit is 1 MiB too
LOW_WATER = 256 * 1024


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class TcpDownstream(asyncio.Protocol):
    __slots__ = (
        "_closed", "_connect", "_down_eof", "_flushed_rx", "_flushed_tx", "_idle_start", "_pending", "_seen",
        "_up_eof", "ctx", "listener",
        "log_start",  # [accesslog]
        "lstats", "original_dst", "rx", "stats", "transport", "tx", "up_t", "upstream",
    )

    def __init__(self, ctx: Context, listener: Listener, lstats: ListenerStats) -> None:
        self.ctx = ctx
        self.listener = listener
        self.lstats = lstats
        # Where the client was going before iptables redirected it (set by the capture
        # listener before connection_made; None on an explicit listener): ORIGINAL_DST clusters dial it.
        self.original_dst: tuple[str, int] | None = None
        self.transport: asyncio.Transport | None = None
        self.upstream: TcpUpstream | None = None
        self.up_t: asyncio.Transport | None = None  # the upstream's transport, for the data path
        self.stats: ClusterStats | None = None
        # Byte counts live on the connection and are added to the cluster's stats once a
        # tick and at close (Istio reports TCP metrics periodically too).
        self.rx = 0  # from the client
        self.tx = 0  # to the client
        self._flushed_rx = 0
        self._flushed_tx = 0
        self._pending: list[bytes] = []
        self._connect: asyncio.Task[None] | None = None
        self._down_eof = False
        self._up_eof = False
        self._closed = False
        self._seen = 0
        self._idle_start = ctx.tick
        self.log_start: tuple[float, str, str] | None = None  # [accesslog] (loop time, upstream host, cluster)

    # -- downstream events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        _nodelay(transport)
        ctx = self.ctx
        ctx.connections.add(self)
        self.lstats.cx_total += 1
        self.lstats.cx_active += 1
        tls = self.listener.tls
        if tls is not None and transport.get_extra_info("ssl_object") is not None \
                and not sans_allowed(tls.peer_sans, peer_of(transport)):
            ctx.tls.count_failure("wrong_san")
            transport.abort()
            return
        tcp = self.listener.tcp
        assert tcp is not None
        # [authz] network RBAC (AuthorizationPolicy on a TCP port): refused connections are closed at once.
        if tcp.rbac and not self._authorized(tcp.rbac, transport):
            ctx.stats.count_local_reply("RBAC")
            transport.abort()
            return
        # [traffic] weighted TCP routes: one pick per connection
        name = pick_weighted(tcp.weighted, tcp.total_weight, ctx.random()) if tcp.weighted else tcp.cluster
        rt = ctx.clusters.get(name)
        if rt is None:
            ep = None
        else:
            ep = rt.pick_original(self.original_dst) if rt.spec.original_dst else rt.lb.pick()
        if rt is None or ep is None:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("tcp %s: no cluster or endpoint for %s", self.listener.name, name)
            ctx.stats.count_local_reply("UH" if rt is not None else "NC")
            transport.abort()
            return
        self.stats = rt.stats
        rt.stats.tcp_opened += 1
        if tcp.access_log is not None:  # [accesslog]
            self.log_start = (ctx.loop.time(), ep.address, rt.spec.name)
        transport.pause_reading()  # until the upstream is there
        self._connect = ctx.loop.create_task(self._open(rt, ep))

    def _authorized(self, rbac: tuple[RbacFilter, ...], transport: asyncio.Transport) -> bool:
        try:
            return authorize_connection(self.ctx, rbac, transport, self.listener.port, self)
        except Exception:  # a bug in a policy must not let the connection through
            log.exception("tcp %s: network RBAC failed; closing the connection", self.listener.name)
            return False

    async def _open(self, rt: ClusterRuntime, ep: Endpoint) -> None:
        stats = rt.stats
        host, port = ep.host, ep.port
        try:
            ssl_args = tls_client_args(ep.tls, self.ctx.tls)
            transport, up = await asyncio.wait_for(
                self.ctx.loop.create_connection(lambda: TcpUpstream(self), host, port, **ssl_args),
                rt.spec.connect_timeout,
            )
            if ep.tls is not None and not sans_allowed(ep.tls.peer_sans, peer_of(transport)):
                transport.abort()
                raise ssl.SSLError("peer is not an expected identity (wrong_san)")
        except (OSError, TimeoutError, MissingSecret, ValueError) as e:
            if isinstance(e, ssl.SSLError | MissingSecret):
                self.ctx.tls.count_failure(failure_reason(e) if isinstance(e, ssl.SSLError) else "no_certificate")
            stats.cx_connect_fail += 1
            if isinstance(e, TimeoutError):
                stats.cx_connect_timeout += 1
            self.ctx.stats.count_local_reply("UF")
            if log.isEnabledFor(logging.DEBUG):
                log.debug("tcp %s: connect %s:%s failed: %r", self.listener.name, host, port, e)
            if self.transport is not None:
                self.transport.abort()
            return
        finally:
            self._connect = None
        stats.cx_total += 1
        stats.cx_active += 1
        assert isinstance(up, TcpUpstream)
        if self._closed:
            up.close()
            return
        self.upstream = up
        self.up_t = up.transport
        if self._pending:
            up.write(b"".join(self._pending))
            self._pending.clear()
        if self._down_eof:
            up.write_eof()
        elif self.transport is not None:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.rx += len(data)
        t = self.up_t
        if t is not None:
            t.write(data)
        else:
            # Still connecting. (uvloop starts reading right after connection_made, so
            # the pause there is not enough): bound what is held here.
            self._pending.append(data)
            if self.rx > HIGH_WATER and self.transport is not None:
                self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._down_eof = True
        up = self.upstream
        if up is not None:
            up.write_eof()
        return not self._up_eof

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.ctx.forget(self)
        self.lstats.cx_active -= 1
        self.lstats.cx_destroy += 1
        if self.stats is not None:
            self.flush_stats()
            self.stats.tcp_closed += 1
        if self.log_start is not None:  # [accesslog] one line per connection, at close
            self._access_log(self.log_start)
        if self._connect is not None:
            self._connect.cancel()
        up = self.upstream
        self.up_t = None
        if up is not None:
            self.upstream = None
            up.down_t = None
            if exc is None:
                up.close()  # flushes what is buffered, then FIN
            else:
                up.abort()
        self.transport = None

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    def _access_log(self, start: tuple[float, str, str]) -> None:  # [accesslog]
        tcp = self.listener.tcp
        assert tcp is not None and tcp.access_log is not None
        t = self.transport
        peername = t.get_extra_info("peername") if t is not None else None
        client = f"{peername[0]}:{peername[1]}" if peername else ""
        peer = peer_of(t) if t is not None and self.listener.tls is not None \
            and t.get_extra_info("ssl_object") is not None else None
        self.ctx.access_log.push((tcp.access_log, TCP_RECORD, start[0], self.ctx.loop.time(), self.rx, self.tx,
                                  client, peer, start[1], start[2]))

    def flush_stats(self) -> None:
        stats = self.stats
        if stats is not None:
            stats.tcp_received += self.rx - self._flushed_rx
            stats.tcp_sent += self.tx - self._flushed_tx
            self._flushed_rx = self.rx
            self._flushed_tx = self.tx

    # -- called by the upstream side
    def upstream_eof(self) -> bool:
        self._up_eof = True
        t = self.transport
        if t is not None and t.can_write_eof():
            t.write_eof()
        if self._down_eof:
            self.close()
            return False
        return True

    def upstream_lost(self, exc: Exception | None) -> None:
        self.upstream = None
        self.up_t = None
        if self.stats is not None:
            self.stats.cx_active -= 1
        t = self.transport
        if t is not None:
            if exc is None:
                t.close()
            else:
                t.abort()

    def pause_downstream(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_downstream(self) -> None:
        if self.transport is not None and self.upstream is not None:
            self.transport.resume_reading()

    # -- lifecycle
    def close(self) -> None:
        t = self.transport
        if t is not None:
            t.close()

    def abort(self) -> None:
        t = self.transport
        if t is not None:
            t.abort()

    def drain(self) -> None:
        """TCP has no request boundary: connections run until the drain deadline."""

    def on_tick(self, tick: int) -> None:
        self.flush_stats()
        tcp = self.listener.tcp
        if tcp is None or not tcp.idle_timeout or self.stats is None:
            return
        mine = self.rx + self.tx
        if mine != self._seen:
            self._seen = mine
            self._idle_start = tick
        elif (tick - self._idle_start) * self.ctx.tick_seconds >= tcp.idle_timeout:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("tcp %s: idle timeout", self.listener.name)
            self.abort()
            if self.upstream is not None:
                self.upstream.abort()


class TcpUpstream(asyncio.Protocol):
    __slots__ = ("down", "down_t", "reader_paused", "transport")

    def __init__(self, down: TcpDownstream) -> None:
        self.down = down
        self.down_t = down.transport  # the client's transport, for the data path
        self.transport: asyncio.Transport | None = None
        self.reader_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        down = self.down
        down.tx += len(data)
        t = self.down_t
        if t is not None:
            t.write(data)

    def eof_received(self) -> bool:
        return self.down.upstream_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.down_t = None
        self.down.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.down.pause_downstream()

    def resume_writing(self) -> None:
        self.down.resume_downstream()

    def write(self, data: bytes) -> None:
        t = self.transport
        if t is not None:
            t.write(data)

    def write_eof(self) -> None:
        t = self.transport
        if t is not None and t.can_write_eof():
            t.write_eof()

    def pause_reading(self) -> None:
        t = self.transport
        if t is not None and not self.reader_paused:
            self.reader_paused = True
            t.pause_reading()

    def resume_reading(self) -> None:
        t = self.transport
        if t is not None and self.reader_paused:
            self.reader_paused = False
            t.resume_reading()

    def close(self) -> None:
        t = self.transport
        if t is not None:
            t.close()

    def abort(self) -> None:
        t = self.transport
        if t is not None:
            t.abort()
