"""Listeners: bind, accept, and hand each connection to the TCP or HTTP stack.

``ListenerManager.apply`` reconciles the bound sockets with a snapshot's
listeners: a listener whose address and protocol are unchanged keeps its
socket and only its settings are replaced (new connections see them), a new
one is bound, a removed or re-typed one stops accepting and its connections
are drained. With several workers each binds with SO_REUSEPORT and the kernel
spreads connections; a connection stays on the worker that accepted it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable

from proxy.context import Context
from proxy.hcm import HttpConnection
from proxy.l4 import TcpDownstream
from proxy.model import Listener, Protocol
from proxy.stats import ListenerStats
from proxy.tls import MissingSecret, close_quietly, failure_reason

log = logging.getLogger("pillion.listener")


class BoundListener:
    """One bound socket and the listener settings new connections get."""

    def __init__(self, spec: Listener, server: asyncio.AbstractServer | TlsServerSocket, stats: ListenerStats) -> None:
        self.spec = spec
        self.server = server
        self.stats = stats

    @property
    def port(self) -> int:
        socks = getattr(self.server, "sockets", None)
        return socks[0].getsockname()[1] if socks else 0


class TlsServerSocket:
    """A listening socket whose connections are TLS-terminated, or sniffed first.

    Accepts in Python (one readiness callback per burst of connections), then
    looks at each connection's first byte without consuming it (MSG_PEEK): a TLS
    handshake record (0x16) goes to the TLS stack with the listener's current
    certificate (so a rotated certificate applies to the next handshake), anything
    else is plaintext, which only a PERMISSIVE listener accepts. A client that sends
    nothing within ``sniff_timeout`` (a server-speaks-first protocol) is taken as
    plaintext rather than stalled.
    """

    sniff_timeout = 1.0

    def __init__(self, ctx: Context, bl: BoundListener, factory: Callable[[], asyncio.BaseProtocol],
                 family: int, reuse_port: bool, backlog: int) -> None:
        self.ctx = ctx
        self.bl = bl
        self.factory = factory
        spec = bl.spec
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((spec.address, spec.port))
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.sockets = [sock]
        self.closed = False
        ctx.loop.add_reader(sock.fileno(), self._on_accept)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.ctx.loop.remove_reader(self.sock.fileno())
            self.sock.close()

    def _on_accept(self) -> None:
        loop = self.ctx.loop
        for _ in range(64):
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("listener %s: accept failed: %s", self.bl.spec.name, e)
                return
            conn.setblocking(False)
            timer = loop.call_later(self.sniff_timeout, self._sniffed, conn, None)
            loop.add_reader(conn.fileno(), self._readable, conn, timer)

    def _readable(self, conn: socket.socket, timer: asyncio.TimerHandle) -> None:
        try:
            first = conn.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            first = b""
        timer.cancel()
        self._sniffed(conn, first)

    def _sniffed(self, conn: socket.socket, first: bytes | None) -> None:
        loop = self.ctx.loop
        try:
            loop.remove_reader(conn.fileno())
        except (ValueError, OSError):
            return
        if first == b"":
            close_quietly(conn)  # closed before saying anything
            return
        spec = self.bl.spec
        tls_spec = spec.tls
        provider = self.ctx.tls
        if first == b"\x16" and tls_spec is not None:
            try:
                sslctx = provider.server_context(tls_spec)
            except (MissingSecret, ssl.SSLError, ValueError) as e:
                provider.count_failure("no_certificate")
                log.warning("listener %s: no usable certificate (%s) to terminate TLS with", spec.name, e)
                close_quietly(conn)
                return
            loop.create_task(self._serve(conn, sslctx))
        elif spec.plaintext:
            loop.create_task(self._serve(conn, None))
        else:
            provider.count_failure("plaintext_rejected")
            if log.isEnabledFor(logging.DEBUG):
                log.debug("listener %s: plaintext connection refused (STRICT mTLS)", spec.name)
            close_quietly(conn)

    async def _serve(self, conn: socket.socket, sslctx: ssl.SSLContext | None) -> None:
        try:
            await self.ctx.loop.connect_accepted_socket(self.factory, conn, ssl=sslctx,
                                                        ssl_handshake_timeout=10.0 if sslctx else None)
        except (ssl.SSLError, OSError, TimeoutError) as e:
            reason = failure_reason(e)
            self.ctx.tls.count_failure(reason)
            log.info("listener %s: TLS handshake failed (%s): %s", self.bl.spec.name, reason, e)
            close_quietly(conn)


class ListenerManager:
    def __init__(self, ctx: Context, *, reuse_port: bool = False, backlog: int = 1024) -> None:
        self.ctx = ctx
        self.reuse_port = reuse_port
        self.backlog = backlog
        self.bound: dict[str, BoundListener] = {}

    def _factory(self, bl: BoundListener) -> Callable[[], asyncio.BaseProtocol]:
        ctx = self.ctx

        def make() -> asyncio.BaseProtocol:
            spec = bl.spec
            if spec.protocol is Protocol.HTTP:
                return HttpConnection(ctx, spec, bl.stats)
            return TcpDownstream(ctx, spec, bl.stats)

        return make

    async def apply(self, listeners: tuple[Listener, ...]) -> list[str]:
        """Bind/unbind to match ``listeners``; returns one message per listener that failed to bind."""
        errors: list[str] = []
        wanted = {ls.name: ls for ls in listeners}
        for name, bl in list(self.bound.items()):
            new = wanted.get(name)
            if (new is None or new.bind_key != bl.spec.bind_key or new.protocol is not bl.spec.protocol
                    or (new.tls is None) != (bl.spec.tls is None)):
                self._unbind(name)
        for name, spec in wanted.items():
            existing = self.bound.get(name)
            if existing is not None:
                existing.spec = spec
                continue
            stats = self.ctx.stats.listener(name)
            holder = BoundListener(spec, None, stats)  # type: ignore[arg-type]
            family = socket.AF_INET6 if ":" in spec.address else socket.AF_INET
            try:
                server: asyncio.AbstractServer | TlsServerSocket
                if spec.tls is None:
                    server = await self.ctx.loop.create_server(
                        self._factory(holder), spec.address, spec.port,
                        reuse_port=self.reuse_port or None, backlog=self.backlog, family=family,
                    )
                else:
                    server = TlsServerSocket(self.ctx, holder, self._factory(holder), family,
                                             self.reuse_port, self.backlog)
            except OSError as e:
                errors.append(f"listener {name}: cannot bind {spec.address}:{spec.port}: {e.strerror or e}")
                continue
            holder.server = server
            self.bound[name] = holder
            log.info("listener %s bound on %s:%d (%s)", name, spec.address, holder.port, spec.protocol.value)
        return errors

    def _unbind(self, name: str) -> None:
        bl = self.bound.pop(name)
        bl.server.close()
        for conn in list(self.ctx.connections):
            if getattr(conn, "listener", None) is not None and conn.listener.name == name:  # type: ignore[attr-defined]
                conn.drain()
        log.info("listener %s removed; draining its connections", name)

    def stop_accepting(self) -> None:
        for bl in self.bound.values():
            bl.server.close()

    def ports(self) -> dict[str, int]:
        return {name: bl.port for name, bl in self.bound.items()}
