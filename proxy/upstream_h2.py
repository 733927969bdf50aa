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

Strategy: the stream converts the HTTP/1.1 head the core built into HEADERS
(pseudo-headers from the request line and ``host``, connection-specific
fields dropped), sends DATA within the peer's windows and queues the rest,
and acknowledges response DATA only while its downstream is not paused, so a
slow client closes the server's window instead of filling memory. What the
streams queue in h2 is written once per loop iteration (one write for many
streams). A GOAWAY from the peer stops new streams on that connection; the
streams above its last_stream_id fail with RefusedStreamError (retriable).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections import deque
from typing import Any, cast

from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError as H2ProtocolError
from h2.settings import SettingCodes

from proxy.errors import (
    ConnectError,
    ConnectTimeoutError,
    ProxyError,
    RefusedStreamError,
    TlsError,
    UpstreamOverflowError,
    UpstreamProtocolError,
    UpstreamResetError,
)
from proxy.h2base import GracefulH2, config
from proxy.model import DEFAULT_LIMITS, CircuitBreakers, TlsClient
from proxy.stats import ClusterStats
from proxy.tls import MissingSecret, TlsProvider, failure_reason, peer_of, sans_allowed
from proxy.upstream import Done, tls_client_args

log = logging.getLogger("pillion.upstream.h2")

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
PEND_HIGH = 64 * 1024  # request bytes queued past the peer's window before the downstream is paused
WINDOW = 1 << 20  # what we let an upstream send before we hand window back (stream and connection)

_CLIENT_CONFIG = config(client=True)
_DROP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"host",
                   b"te"})
_REFUSED = ErrorCodes.REFUSED_STREAM
_CANCEL = ErrorCodes.CANCEL


class _Reset(UpstreamResetError):
    flag = "UR"
    body = b"upstream connect error or disconnect/reset before headers. reset reason: remote reset"


class _Lost(UpstreamResetError):
    flag = "UR"
    body = b"upstream connect error or disconnect/reset before headers. reset reason: connection termination"


_RESET, _LOST = _Reset(), _Lost()


def h2_headers(head: bytes, scheme: bytes) -> list[tuple[bytes, bytes]]:
    """The HTTP/1.1 head built by the core, as HTTP/2 request headers (RFC 9113 section 8.3)."""
    lines = head.split(b"\r\n")
    method, path, _ = lines[0].split(b" ", 2)
    authority = b""
    rest: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        value = value.strip()
        if name in _DROP:
            if name == b"host":
                authority = value
            elif name == b"te" and value.lower() == b"trailers":
                rest.append((b"te", b"trailers"))
            continue
        rest.append((name, value))
    return [(b":method", method), (b":scheme", scheme), (b":authority", authority), (b":path", path), *rest]


class H2Exchange:
    """One request on an ``H2UpstreamConnection``: what a stream's ``upstream`` is for HTTP/2."""

    __slots__ = ("closed", "conn", "end_pending", "exchange", "head_only", "paused", "pend", "pend_bytes", "sid",
                 "unacked", "writer_paused")

    def __init__(self, conn: H2UpstreamConnection) -> None:
        self.conn = conn
        self.sid = 0  # allocated when the HEADERS go out (stream ids must rise in sending order)
        self.exchange: Any = None
        self.head_only = False
        self.closed = False
        self.paused = False
        self.unacked = 0
        self.pend: list[bytes] = []
        self.pend_bytes = 0
        self.end_pending = False
        self.writer_paused = False  # more than PEND_HIGH queued: the downstream must not be read

    def send_head(self, head: bytes, end_stream: bool) -> None:
        conn = self.conn
        if self.closed or conn.closed:
            return
        h2 = conn.h2
        sid = self.sid = h2.get_next_available_stream_id()
        conn.streams[sid] = self
        h2.send_headers(sid, h2_headers(head, conn.scheme), end_stream=end_stream)
        conn.want_flush()

    def send_data(self, data: bytes, end_stream: bool) -> None:
        if self.closed or not self.sid:
            return
        if self.pend:
            if data:
                self.pend.append(data)
                self.pend_bytes += len(data)
            self.end_pending = self.end_pending or end_stream
            if self.pend_bytes > PEND_HIGH and self.exchange is not None:
                self.writer_paused = True
                self.exchange.pause_downstream()
            return
        self._send(data, end_stream)
        self.conn.want_flush()

    def _send(self, data: bytes, end_stream: bool) -> None:
        conn = self.conn
        h2 = conn.h2
        sid = self.sid
        n = len(data)
        window = h2.local_flow_control_window(sid)
        frame = h2.max_outbound_frame_size
        if n <= window and n <= frame:
            h2.send_data(sid, data, end_stream=end_stream)
            return
        view = memoryview(data)
        pos = 0
        while pos < n and window > 0:
            size = min(frame, window, n - pos)
            pos += size
            window -= size
            h2.send_data(sid, view[pos - size:pos], end_stream=end_stream and pos == n)
        if pos < n:
            rest = data[pos:]
            self.pend.append(rest)
            self.pend_bytes += len(rest)
            self.end_pending = end_stream
            conn.blocked.add(self)
            if self.pend_bytes > PEND_HIGH and self.exchange is not None:
                self.writer_paused = True
                self.exchange.pause_downstream()

    def drain(self) -> None:
        """The peer opened its window: send what waited."""
        pend = self.pend
        self.pend = []
        self.pend_bytes = 0
        end = self.end_pending
        self.end_pending = False
        data = b"".join(pend)
        self._send(data, end)
        if not self.pend:
            self.conn.blocked.discard(self)
            self.writer_paused = False
            if self.exchange is not None:
                self.exchange.resume_downstream()

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        if self.paused:
            self.paused = False
            if self.unacked and not self.closed:
                self.conn.ack(self)

    def release(self, reusable: bool) -> None:
        """The exchange is over; reset the stream unless both sides ended it."""
        self.exchange = None
        if not self.closed:
            self.closed = True
            self.conn.end(self, reset=not reusable)

    def abort(self) -> None:
        self.exchange = None
        if not self.closed:
            self.closed = True
            self.conn.end(self, reset=True)


class H2UpstreamConnection(asyncio.Protocol):
    __slots__ = ("_flush_handle", "active", "blocked", "closed", "goaway", "h2", "limit", "pool", "ready", "scheme",
                 "streams", "transport", "uses")

    def __init__(self, pool: H2Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.h2 = GracefulH2(config=_CLIENT_CONFIG)
        self.streams: dict[int, H2Exchange] = {}
        self.blocked: set[H2Exchange] = set()
        self.active = 0  # exchanges handed out and not released (some may not have sent HEADERS yet)
        self.uses = 0
        self.limit = pool.max_streams
        self.goaway = False
        self.closed = False
        self.ready = False
        self.scheme = b"https" if pool.tls is not None else b"http"
        self._flush_handle: asyncio.Handle | None = None

    # -- asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        h2 = self.h2
        h2.local_settings = type(h2.local_settings)(client=True, initial_values={
            SettingCodes.ENABLE_PUSH: 0, SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
        })
        h2.initiate_connection()
        h2.increment_flow_control_window(WINDOW - 65535)
        transport.write(h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except H2ProtocolError as e:
            log.info("HTTP/2 protocol error from %s:%s: %s", self.pool.host, self.pool.port, e)
            self._fail_all(UpstreamProtocolError())
            self.flush()
            self.close()
            return
        touched: list[H2Exchange] = []  # streams that got response bytes (their window to hand back)
        told: list[Any] = []  # exchanges to flush downstream once this batch is relayed
        streams = self.streams
        ev: Any
        for ev in events:
            t = type(ev)
            if t is DataReceived:
                up = streams.get(ev.stream_id)
                if up is None or up.exchange is None:
                    if ev.flow_controlled_length:
                        self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    continue
                up.unacked += ev.flow_controlled_length
                ex = up.exchange
                ex.on_upstream_body(ev.data)
                touched.append(up)
                told.append(ex)
            elif t is ResponseReceived:
                up = streams.get(ev.stream_id)
                if up is not None and up.exchange is not None:
                    status = 0
                    hdrs = []
                    for name, value in ev.headers:
                        if name[:1] == b":":
                            if name == b":status":
                                status = int(value)
                        else:
                            hdrs.append((name, value))
                    ex = up.exchange
                    ex.on_upstream_head(status, b"", hdrs, True)
                    told.append(ex)
            elif t is StreamEnded:
                up = streams.get(ev.stream_id)
                if up is not None and up.exchange is not None:
                    ex = up.exchange
                    ex.on_upstream_complete(True)
                    told.append(ex)
            elif t is TrailersReceived:
                up = streams.get(ev.stream_id)
                if up is not None and up.exchange is not None:
                    ex = up.exchange
                    ex.on_upstream_trailers(list(ev.headers))
                    told.append(ex)
            elif t is StreamReset:
                up = streams.pop(ev.stream_id, None)
                if up is not None:
                    self._lost_stream(up, RefusedStreamError() if ev.error_code == _REFUSED else _RESET)
            elif t is WindowUpdated:
                if self.blocked:
                    for up in list(self.blocked):
                        if ev.stream_id in (0, up.sid):
                            up.drain()
            elif t is RemoteSettingsChanged:
                self._settings(ev)
            elif t is ConnectionTerminated:
                self._on_goaway(ev)
        for up in touched:
            if up.unacked and not up.paused and not up.closed:
                self.ack(up)
        for ex in told:
            ex.on_upstream_flush()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        self._fail_all(_LOST)
        self.pool.forget(self)

    def pause_writing(self) -> None:
        for up in list(self.streams.values()):
            if up.exchange is not None:
                up.exchange.pause_downstream()

    def resume_writing(self) -> None:
        for up in list(self.streams.values()):
            if up.exchange is not None and not up.pend:
                up.exchange.resume_downstream()

    # -- events
    def _settings(self, ev: RemoteSettingsChanged) -> None:
        changed = ev.changed_settings
        mcs = changed.get(SettingCodes.MAX_CONCURRENT_STREAMS)
        if mcs is not None:
            self.limit = min(self.pool.max_streams, mcs.new_value)
            self.pool.serve_waiters()
        if SettingCodes.INITIAL_WINDOW_SIZE in changed:
            for up in list(self.blocked):
                up.drain()

    def _on_goaway(self, ev: ConnectionTerminated) -> None:
        self.goaway = True
        last = ev.last_stream_id if ev.last_stream_id is not None else 0
        for sid in [s for s in self.streams if s > last]:
            self._lost_stream(self.streams.pop(sid), RefusedStreamError())
        if ev.error_code != ErrorCodes.NO_ERROR:
            for sid in list(self.streams):
                self._lost_stream(self.streams.pop(sid), _RESET)
        if not self.active:
            self.close()
        self.pool.serve_waiters()

    def _lost_stream(self, up: H2Exchange, err: ProxyError) -> None:
        ex = up.exchange
        self.blocked.discard(up)
        if not up.closed:
            up.closed = True
            up.exchange = None
            self.active -= 1
        if ex is not None:
            ex.on_upstream_error(err)
            ex.on_upstream_flush()

    def _fail_all(self, err: ProxyError) -> None:
        streams = list(self.streams.values())
        self.streams.clear()
        for up in streams:
            self._lost_stream(up, err)

    # -- used by the exchanges and the pool
    def new_exchange(self) -> H2Exchange:
        self.active += 1
        self.uses += 1
        max_uses = self.pool.max_uses
        if max_uses and self.uses >= max_uses:
            self.goaway = True  # no more streams here; closes when the last one ends
        return H2Exchange(self)

    def usable(self) -> bool:
        return self.ready and not self.goaway and not self.closed and self.active < self.limit

    def end(self, up: H2Exchange, reset: bool) -> None:
        self.active -= 1
        self.blocked.discard(up)
        sid = up.sid
        if sid and self.streams.pop(sid, None) is not None:
            if up.unacked:
                self.h2.acknowledge_received_data(up.unacked, sid)  # the connection window, at least
                up.unacked = 0
            if reset and not self.closed:
                with contextlib.suppress(H2ProtocolError):
                    self.h2.reset_stream(sid, _CANCEL)
            self.want_flush()
        if self.goaway and not self.active:
            self.close()
        else:
            self.pool.serve_waiters()

    def ack(self, up: H2Exchange) -> None:
        n = up.unacked
        up.unacked = 0
        if not self.closed:
            self.h2.acknowledge_received_data(n, up.sid)
            self.want_flush()

    def want_flush(self) -> None:
        if self._flush_handle is None and self.transport is not None:
            self._flush_handle = self.pool.loop.call_soon(self.flush)

    def flush(self) -> None:
        h = self._flush_handle
        if h is not None:
            self._flush_handle = None
            h.cancel()
        t = self.transport
        if t is not None:
            data = self.h2.data_to_send()
            if data:
                t.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.flush()
            self.transport.close()
        self.closed = True
        self.pool.forget(self)


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
