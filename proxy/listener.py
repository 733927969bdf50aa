"""Listeners: bind, accept, and hand each connection to the TCP or HTTP stack.

``ListenerManager.apply`` reconciles the bound sockets with a snapshot's
listeners: a listener whose address and protocol are unchanged keeps its
socket and only its settings are replaced (new connections see them), a new
one is bound, a removed or re-typed one stops accepting and its connections
are drained. With several workers each binds with SO_REUSEPORT and the kernel
spreads connections; a connection stays on the worker that accepted it.

Interception: a listener with ``capture`` (15001/15006) is accepted in Python
(``CaptureServerSocket``) so each connection's original destination can be
read from its socket; ``capture.route`` picks the listener that serves it (a
never-bound ``bind_to_port: false`` one, or one of the capture listener's
chains), and from there the connection goes the same way as on that
listener: TLS sniffing and termination if it has TLS, then HTTP or TCP.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from typing import cast

from proxy.capture import Address, capture_ports, handoff_index, original_dst, route
from proxy.context import Context
from proxy.h2conn import H2ServerConnection
from proxy.hcm import HttpConnection
from proxy.l4 import TcpDownstream
from proxy.model import Listener, Protocol
from proxy.stats import ListenerStats
from proxy.tls import MissingSecret, close_quietly, failure_reason

Factory = Callable[[], asyncio.BaseProtocol]

log = logging.getLogger("pillion.listener")


class InterceptedHttpConnection(HttpConnection):
    """An HTTP connection that came through a capture listener: it knows its original destination."""

    __slots__ = ("original_dst",)

    def __init__(self, ctx: Context, listener: Listener, lstats: ListenerStats, dst: Address) -> None:
        super().__init__(ctx, listener, lstats)
        self.original_dst = dst


def make_protocol(ctx: Context, spec: Listener, stats: ListenerStats, dst: Address | None = None) -> asyncio.BaseProtocol:
    """The protocol serving one connection of ``spec`` (``dst``: its original destination, if captured)."""
    if spec.protocol is Protocol.HTTP:
        if spec.http is not None and spec.http.codec != "HTTP1":  # [http2] HTTP/2 by ALPN or preface
            return ProtocolSelect(ctx, spec, stats, dst)
        return _http1(ctx, spec, stats, dst)
    conn = TcpDownstream(ctx, spec, stats)
    conn.original_dst = dst
    return conn


def _http1(ctx: Context, spec: Listener, stats: ListenerStats, dst: Address | None) -> HttpConnection:
    return HttpConnection(ctx, spec, stats) if dst is None else InterceptedHttpConnection(ctx, spec, stats, dst)


# ---- [http2] which codec serves a connection
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class ProtocolSelect(asyncio.Protocol):
    """Picks HTTP/1.1 or HTTP/2 for one connection of an HTTP listener, then steps aside.

    TLS: the ALPN protocol the handshake settled on ("h2": HTTP/2). Otherwise the
    codec setting ("HTTP2": always HTTP/2), or, for "AUTO", the first bytes: the
    h2c prior-knowledge preface means HTTP/2, anything else HTTP/1.1. The chosen
    protocol replaces this one on the transport and gets the bytes read so far.
    Until then this object stands in the worker's connection set (drain, idle sweep).
    """

    __slots__ = ("buf", "ctx", "dst", "idle_tick", "listener", "stats", "transport")

    def __init__(self, ctx: Context, spec: Listener, stats: ListenerStats, dst: Address | None) -> None:
        self.ctx = ctx
        self.listener = spec
        self.stats = stats
        self.dst = dst
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.idle_tick = ctx.tick

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        sslobj = transport.get_extra_info("ssl_object")
        alpn = sslobj.selected_alpn_protocol() if sslobj is not None else None
        codec = self.listener.http.codec if self.listener.http is not None else "AUTO"
        if alpn == "h2" or codec == "HTTP2":
            self._switch(True)
        elif alpn == "http/1.1":
            self._switch(False)
        else:
            self.ctx.connections.add(self)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        n = len(H2_PREFACE)
        if len(buf) < n and H2_PREFACE.startswith(buf):
            self.buf = buf  # could still be the preface
            return
        self.buf = buf
        self._switch(buf[:n] == H2_PREFACE)
        self.ctx.forget(self)  # after the chosen protocol joined the set (an empty set ends a drain)

    def _switch(self, h2: bool) -> None:
        t = self.transport
        assert t is not None
        proto: asyncio.Protocol
        if h2:
            proto = H2ServerConnection(self.ctx, self.listener, self.stats, self.dst)
        else:
            proto = _http1(self.ctx, self.listener, self.stats, self.dst)
        t.set_protocol(proto)
        proto.connection_made(t)
        buf, self.buf = self.buf, b""
        if buf and not t.is_closing():
            proto.data_received(buf)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.ctx.forget(self)
        self.transport = None

    # the worker's connection set, until a codec is chosen
    def drain(self) -> None:
        """Nothing to finish yet: the chosen codec sees ``ctx.draining`` when it takes over."""

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def on_tick(self, tick: int) -> None:
        http = self.listener.http
        if http is not None and http.idle_timeout and (tick - self.idle_tick) * self.ctx.tick_seconds >= http.idle_timeout:
            self.abort()
# ---- [http2] end


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

    def __init__(self, ctx: Context, bl: BoundListener, factory: Factory | None,
                 family: int, reuse_port: bool, backlog: int, *, also_ipv6: bool = False) -> None:
        self.ctx = ctx
        self.bl = bl
        self.factory = factory
        spec = bl.spec
        self.sockets = [_listen(family, spec.address, spec.port, reuse_port, backlog)]
        if also_ipv6:  # a second, IPv6-only socket on "::" (IPv4 clients keep plain IPv4 addresses)
            try:
                self.sockets.append(_listen(socket.AF_INET6, "::", spec.port, reuse_port, backlog, v6only=True))
            except OSError as e:
                log.debug("listener %s: no IPv6 here (%s); IPv4 only", spec.name, e)
        self.closed = False
        for sock in self.sockets:
            ctx.loop.add_reader(sock.fileno(), self._on_accept, sock)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for sock in self.sockets:
                self.ctx.loop.remove_reader(sock.fileno())
                sock.close()

    def _on_accept(self, sock: socket.socket) -> None:
        for _ in range(64):
            try:
                conn, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("listener %s: accept failed: %s", self.bl.spec.name, e)
                return
            conn.setblocking(False)
            self._accepted(conn)

    def _accepted(self, conn: socket.socket) -> None:
        assert self.factory is not None
        self._sniff(conn, self.bl.spec, self.factory)

    def _sniff(self, conn: socket.socket, spec: Listener, factory: Factory) -> None:
        timer = self.ctx.loop.call_later(self.sniff_timeout, self._sniffed, conn, None, spec, factory)
        self.ctx.loop.add_reader(conn.fileno(), self._readable, conn, timer, spec, factory)

    def _readable(self, conn: socket.socket, timer: asyncio.TimerHandle, spec: Listener, factory: Factory) -> None:
        try:
            first = conn.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            first = b""
        timer.cancel()
        self._sniffed(conn, first, spec, factory)

    def _sniffed(self, conn: socket.socket, first: bytes | None, spec: Listener, factory: Factory) -> None:
        loop = self.ctx.loop
        try:
            loop.remove_reader(conn.fileno())
        except (ValueError, OSError):
            return
        if first == b"":
            close_quietly(conn)  # closed before saying anything
            return
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
            loop.create_task(self._serve(conn, sslctx, factory, spec))
        elif spec.plaintext:
            loop.create_task(self._serve(conn, None, factory, spec))
        else:
            provider.count_failure("plaintext_rejected")
            if log.isEnabledFor(logging.DEBUG):
                log.debug("listener %s: plaintext connection refused (STRICT mTLS)", spec.name)
            close_quietly(conn)

    async def _serve(self, conn: socket.socket, sslctx: ssl.SSLContext | None, factory: Factory,
                     spec: Listener) -> None:
        try:
            await self.ctx.loop.connect_accepted_socket(factory, conn, ssl=sslctx,
                                                        ssl_handshake_timeout=10.0 if sslctx else None)
        except (ssl.SSLError, OSError, TimeoutError) as e:
            reason = failure_reason(e)
            self.ctx.tls.count_failure(reason)
            log.info("listener %s: TLS handshake failed (%s): %s", spec.name, reason, e)
            close_quietly(conn)


class CaptureServerSocket(TlsServerSocket):
    """A capture listener (15001/15006): each connection goes to the listener for its original destination.

    The original destination is read right after accept (SO_ORIGINAL_DST);
    ``capture.route`` picks the listener that serves it, or refuses it (no
    destination, one of the proxy's own capture ports, no chain): the connection
    is closed and counted as a local reply with flag NR (Envoy's flag for "no
    matching filter chain"). Otherwise the connection continues exactly as on
    that listener: sniffed first if it has TLS, then HTTP or TCP.
    """

    def __init__(self, ctx: Context, bl: BoundListener, manager: ListenerManager, family: int,
                 reuse_port: bool, backlog: int) -> None:
        # A capture listener on 0.0.0.0 takes IPv6 too, where the host has it (ip6tables redirects there).
        also_ipv6 = bl.spec.address == "0.0.0.0" and socket.has_ipv6
        super().__init__(ctx, bl, None, family, reuse_port, backlog, also_ipv6=also_ipv6)
        self.manager = manager

    def _accepted(self, conn: socket.socket) -> None:
        ctx = self.ctx
        spec = self.bl.spec
        try:
            dst = original_dst(conn)
        except (OSError, ValueError) as e:
            self._refuse(conn, "its original destination is unknown (%s)", e)
            return
        manager = self.manager
        target = route(spec, dst, manager.handoff, manager.capture_ports)
        if target is None:
            self._refuse(conn, "nothing serves its original destination %s:%d (or it is the proxy's own port)", *dst)
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("listener %s: original destination %s:%d -> %s", spec.name, dst[0], dst[1], target.name)
        stats = ctx.stats.listener(target.name)

        def factory() -> asyncio.BaseProtocol:
            return make_protocol(ctx, target, stats, dst)

        if target.tls is None:
            ctx.loop.create_task(self._serve(conn, None, factory, target))
        else:
            self._sniff(conn, target, factory)

    def _refuse(self, conn: socket.socket, why: str, *args: object) -> None:
        self.ctx.stats.count_local_reply("NR")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("listener %s: connection closed: " + why, self.bl.spec.name, *args)
        close_quietly(conn)


class ListenerManager:
    def __init__(self, ctx: Context, *, reuse_port: bool = False, backlog: int = 1024) -> None:
        self.ctx = ctx
        self.reuse_port = reuse_port
        self.backlog = backlog
        self.bound: dict[str, BoundListener] = {}
        # Interception, derived from the applied listeners once per apply.
        self.handoff: dict[Address, Listener] = {}  # hand-off targets by (address, port)
        self.capture_ports: frozenset[int] = frozenset()
        self._served: set[str] = set()  # names of listeners and capture chains that get connections

    def _factory(self, bl: BoundListener) -> Callable[[], asyncio.BaseProtocol]:
        ctx = self.ctx

        def make() -> asyncio.BaseProtocol:
            return make_protocol(ctx, bl.spec, bl.stats)

        return make

    async def apply(self, listeners: tuple[Listener, ...]) -> list[str]:
        """Bind/unbind to match ``listeners``; returns one message per listener that failed to bind.

        Listeners with ``bind_to_port`` false are not bound: capture listeners hand them connections.
        """
        errors: list[str] = []
        self.handoff = handoff_index(listeners)
        self.capture_ports = capture_ports(listeners)
        served = _served_names(listeners)
        for name in self._served - served:  # a removed chain or never-bound listener: drain its connections
            if name not in self.bound:
                self._drain(name)
        self._served = served
        wanted = {ls.name: ls for ls in listeners if ls.bind_to_port}
        for name, bl in list(self.bound.items()):
            new = wanted.get(name)
            if (new is None or new.bind_key != bl.spec.bind_key or new.protocol is not bl.spec.protocol
                    or (new.tls is None) != (bl.spec.tls is None)
                    or (new.capture is None) != (bl.spec.capture is None)):
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
                if spec.capture is not None:
                    server = CaptureServerSocket(self.ctx, holder, self, family, self.reuse_port, self.backlog)
                elif spec.tls is None:
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
            log.info("listener %s bound on %s:%d (%s)", name, spec.address, holder.port,
                     "capture" if spec.capture is not None else spec.protocol.value)
        return errors

    def _unbind(self, name: str) -> None:
        bl = self.bound.pop(name)
        bl.server.close()
        self._drain(name)
        log.info("listener %s removed; draining its connections", name)

    def _drain(self, name: str) -> None:
        for conn in list(self.ctx.connections):
            if getattr(conn, "listener", None) is not None and conn.listener.name == name:  # type: ignore[attr-defined]
                conn.drain()

    def stop_accepting(self, only: Callable[[Listener], bool] | None = None) -> None:
        """Close the listening sockets (all, or those ``only`` selects); open connections go on."""
        for bl in self.bound.values():
            if only is None or only(bl.spec):
                bl.server.close()

    def ports(self) -> dict[str, int]:
        return {name: bl.port for name, bl in self.bound.items()}


def _listen(family: int, address: str, port: int, reuse_port: bool, backlog: int, *,
            v6only: bool = False) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if v6only:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _served_names(listeners: tuple[Listener, ...]) -> set[str]:
    names = set()
    for ls in listeners:
        names.add(ls.name)
        cap = ls.capture
        if cap is not None:
            names.update(chain.name for chain in cap.by_port.values())
            if cap.default is not None:
                names.add(cap.default.name)
    return names
