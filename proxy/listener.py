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
from collections.abc import Callable

from proxy.context import Context
from proxy.hcm import HttpConnection
from proxy.l4 import TcpDownstream
from proxy.model import Listener, Protocol
from proxy.stats import ListenerStats

log = logging.getLogger("pillion.listener")


class BoundListener:
    """One bound socket and the listener settings new connections get."""

    def __init__(self, spec: Listener, server: asyncio.AbstractServer, stats: ListenerStats) -> None:
        self.spec = spec
        self.server = server
        self.stats = stats

    @property
    def port(self) -> int:
        socks = getattr(self.server, "sockets", None)
        return socks[0].getsockname()[1] if socks else 0


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
            if new is None or new.bind_key != bl.spec.bind_key or new.protocol is not bl.spec.protocol:
                self._unbind(name)
        for name, spec in wanted.items():
            existing = self.bound.get(name)
            if existing is not None:
                existing.spec = spec
                continue
            stats = self.ctx.stats.listener(name)
            holder = BoundListener(spec, None, stats)  # type: ignore[arg-type]
            try:
                server = await self.ctx.loop.create_server(
                    self._factory(holder), spec.address, spec.port,
                    reuse_port=self.reuse_port or None, backlog=self.backlog,
                    family=socket.AF_INET6 if ":" in spec.address else socket.AF_INET,
                )
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
