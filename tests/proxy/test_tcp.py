"""TCP proxying (the L4 splice): bytes both ways, half-close, failures, backpressure, stats.

A proxy with a TCP egress listener in front of a ``TcpServer`` on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
import struct
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.config import HOST, simple_mesh, write
from tests.helpers.net import ProxyHandle, free_port, standalone_proxy
from tests.helpers.poll import poll
from tests.helpers.upstreams import TcpServer, UnacceptingListener


@dataclass
class Tcp:
    port: int  # the proxy's TCP egress listener
    server: TcpServer | None
    proxy: ProxyHandle

    @property
    def cluster(self) -> str:
        return f"outbound|{self.port}||{HOST}"

    async def stats(self) -> dict[str, float]:
        """This listener's and cluster's numbers from /stats/prometheus, by sample name."""
        status, body = await self.proxy.admin_get("/stats/prometheus")
        assert status == 200
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(body.decode()):
            for s in fam.samples:
                lab = s.labels
                if (lab.get("destination_cluster") == self.cluster or lab.get("envoy_cluster_name") == self.cluster
                        or lab.get("envoy_listener_name") == f"127.0.0.1_{self.port}"):
                    out[s.name] = s.value
        return out

    async def wait_stats(self, want: dict[str, float], timeout: float = 0.5) -> dict[str, float]:
        """Poll the admin API (with a deadline) until every sample in ``want`` has its value."""
        last: dict[str, float] = {}

        async def settled() -> bool:
            got = await self.stats()
            last.clear()
            last.update(got)
            return all(got.get(k) == v for k, v in want.items())

        with contextlib.suppress(TimeoutError):
            await poll(settled, timeout=timeout)
        return last


CLOSED = {"istio_tcp_connections_closed_total": 1, "envoy_listener_downstream_cx_active": 0}


@contextlib.asynccontextmanager
async def tcp_proxy(tmp_path: Path, server: TcpServer | None, target: int = 0) -> AsyncIterator[Tcp]:
    """A proxy whose TCP listener forwards to ``server``, else to ``target``, else to a
    port nobody listens on."""
    http_port, tcp_port = free_port(), free_port()
    target = server.port if server is not None else target or free_port()
    write(tmp_path, simple_mesh(http_port, [], tcp_port=tcp_port, tcp_upstream=target))
    async with standalone_proxy(tmp_path, drain_seconds=0.5) as proxy:
        yield Tcp(tcp_port, server, proxy)


@contextlib.asynccontextmanager
async def connect(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield r, w
    finally:
        w.close()
        with contextlib.suppress(Exception):
            await w.wait_closed()


async def read_to_eof(r: asyncio.StreamReader, timeout: float = 2.0) -> bytes:
    return await asyncio.wait_for(r.read(), timeout)


def payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def test_echo_round_trip(tmp_path):
    async with TcpServer() as srv, tcp_proxy(tmp_path, srv) as t, connect(t.port) as (r, w):
        for msg in (b"hello", b"\x00" * 10, b"world\r\n"):
            w.write(msg)
            assert await asyncio.wait_for(r.readexactly(len(msg)), 2.0) == msg
        assert srv.connections == 1


async def test_ten_megabytes_both_ways_intact(tmp_path):
    data = payload(10 * 1024 * 1024, 1)
    async with TcpServer() as srv, tcp_proxy(tmp_path, srv) as t, connect(t.port) as (r, w):

        async def send() -> None:
            w.write(data)
            await w.drain()
            w.write_eof()

        sender = asyncio.create_task(send())
        got = await read_to_eof(r, timeout=10.0)
        await sender
        assert len(got) == len(data)
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        assert srv.received == len(data)
        assert srv.sha.digest() == hashlib.sha256(data).digest()


async def test_half_close_still_delivers_the_upstream_reply(tmp_path):
    async with TcpServer(echo=False, reply_on_eof=b"bye after your FIN") as srv, \
            tcp_proxy(tmp_path, srv) as t, connect(t.port) as (r, w):
        w.write(b"request")
        w.write_eof()
        # Our FIN reaches the upstream only after our bytes, and its reply still reaches us.
        assert await read_to_eof(r) == b"bye after your FIN"
        assert srv.received == len(b"request")
        assert srv.eofs == 1


async def test_connection_pair_closes_after_both_fins(tmp_path):
    async with TcpServer(echo=True, reply_on_eof=b"!") as srv, tcp_proxy(tmp_path, srv) as t, \
            connect(t.port) as (r, w):
        w.write(b"abc")
        w.write_eof()
        assert await read_to_eof(r) == b"abc!"
        # Both directions are finished: the proxy closes without waiting for our close.
        got = await t.wait_stats(CLOSED)
        assert {k: got.get(k) for k in CLOSED} == CLOSED


async def test_upstream_connection_gauge_returns_to_zero(tmp_path):
    async with TcpServer() as srv, tcp_proxy(tmp_path, srv) as t:
        for _ in range(3):
            async with connect(t.port) as (r, w):
                w.write(b"x")
                assert await asyncio.wait_for(r.readexactly(1), 2.0) == b"x"
        got = await t.wait_stats({**CLOSED, "istio_tcp_connections_closed_total": 3,
                                  "envoy_cluster_upstream_cx_active": 0})
        assert got.get("istio_tcp_connections_closed_total") == 3
        assert got.get("envoy_cluster_upstream_cx_total") == 3
        assert got.get("envoy_cluster_upstream_cx_active") == 0


async def test_upstream_refusing_closes_the_client_promptly(tmp_path):
    async with tcp_proxy(tmp_path, None) as t:
        async with connect(t.port) as (r, w):
            w.write(b"anyone there?")
            with contextlib.suppress(ConnectionResetError):
                assert await read_to_eof(r, timeout=1.0) == b""
        got = await t.stats()
        assert got.get("envoy_cluster_upstream_cx_connect_fail_total") == 1  # the parser adds _total


async def test_upstream_closing_closes_the_client(tmp_path):
    async with TcpServer() as srv, tcp_proxy(tmp_path, srv) as t, connect(t.port) as (r, w):
        w.write(b"x")
        assert await asyncio.wait_for(r.readexactly(1), 2.0) == b"x"
        for tr in srv.transports:
            tr.close()
        assert await read_to_eof(r, timeout=1.0) == b""


async def test_client_reset_closes_the_upstream(tmp_path):
    async with TcpServer() as srv, tcp_proxy(tmp_path, srv) as t:
        r, w = await asyncio.open_connection("127.0.0.1", t.port)
        w.write(b"x")
        assert await asyncio.wait_for(r.readexactly(1), 2.0) == b"x"
        sock = w.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()  # RST, not FIN
        # The proxy closes its upstream side (a FIN or a reset both end the server's reads).
        await srv.wait_for(lambda: srv.eofs == 1 or srv.closed == 1, timeout=1.0)
        got = await t.wait_stats(CLOSED)
        assert {k: got.get(k) for k in CLOSED} == CLOSED


class _BlockingSender(threading.Thread):
    """Writes ``data`` with a blocking socket: no user-space buffer on the client side."""

    def __init__(self, sock: socket.socket, data: bytes | memoryview) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.view = memoryview(data)
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while self.sent < len(self.view):
                self.sent += self.sock.send(self.view[self.sent:self.sent + 1024 * 1024])
            self.sock.shutdown(socket.SHUT_WR)
        except BaseException as e:  # reported by the test
            self.error = e

    def stop(self) -> None:
        """Unblock a pending send (close() from another thread would not) and reap the thread."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        if self.is_alive():
            self.join(2)
        assert not self.is_alive()


async def _wait_for_stall(sender: _BlockingSender, timeout: float = 5.0) -> bool:
    """True once the sender has made no progress over four checks 50 ms apart (False: it never stopped).

    A stall is the absence of progress, so it can only be observed over time: this is a
    quiescence window, polled with a deadline, not a wait for something to happen.
    """
    state = {"last": -1, "still": 0}

    def stalled() -> bool:
        cur = sender.sent
        state["still"] = state["still"] + 1 if cur == state["last"] else 0
        state["last"] = cur
        return state["still"] >= 4

    try:
        return await poll(stalled, timeout=timeout, interval=0.05, what="the sender to stall")
    except TimeoutError:
        return False


TOTAL = 50 * 1024 * 1024
MAX_GROWTH = 20 * 1024 * 1024


def _kernel_max(name: str) -> int:
    """The largest size the kernel autotunes a TCP socket buffer to (net.ipv4.tcp_rmem / tcp_wmem)."""
    return int(open(f"/proc/sys/net/ipv4/{name}").read().split()[2])


async def test_backpressure_bounds_memory_and_loses_nothing(tmp_path):
    data = payload(TOTAL, 2)
    proc = psutil.Process()
    async with TcpServer(echo=False, paused=True) as srv, tcp_proxy(tmp_path, srv) as t:
        rss0 = proc.memory_info().rss
        # The kernel autotunes socket buffers up to tcp_rmem/tcp_wmem's maximum (32 MiB here), and
        # what it absorbs is not the proxy's doing: fix the buffers of the test's own two sockets so
        # that only the proxy's (its client-side receive and upstream-side send buffers) can grow.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
        sock.connect(("127.0.0.1", t.port))
        sender = _BlockingSender(sock, memoryview(data)[1:])
        try:
            sock.sendall(data[:1])
            # The splice is up (the upstream holds our first byte, unread) before the flood.
            await srv.wait_for(lambda: any(p.held for p in srv.protocols), timeout=2.0)
            for tr in srv.transports:
                tr.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
            sender.start()
            assert await _wait_for_stall(sender)
            grown = proc.memory_info().rss - rss0
            assert srv.received == 0
            # Bytes in flight: the proxy's two kernel buffers at most, plus its 1 MiB high-water mark.
            bound = _kernel_max("tcp_rmem") + _kernel_max("tcp_wmem") + 4 * 1024 * 1024
            assert sender.sent < min(bound, TOTAL), \
                f"{sender.sent} of {TOTAL} bytes accepted while the upstream read nothing (bound {bound})"
            assert grown < MAX_GROWTH, f"RSS grew by {grown / 1e6:.1f} MB while the upstream did not read"

            srv.resume()
            await srv.wait_for(lambda: srv.eofs == 1, timeout=10.0)
            assert sender.error is None
            assert srv.received == TOTAL
            assert srv.sha.digest() == hashlib.sha256(data).digest()
        finally:
            sender.stop()


async def test_client_burst_while_the_upstream_connect_is_pending_is_bounded(tmp_path):
    # The proxy must not read (and hold) more than about a high-water mark of the
    # client's bytes while it has nowhere to send them yet.
    data = bytes(TOTAL)
    proc = psutil.Process()
    with UnacceptingListener() as never:
        async with tcp_proxy(tmp_path, None, target=never.port) as t:
            rss0 = proc.memory_info().rss
            sock = socket.create_connection(("127.0.0.1", t.port))
            sender = _BlockingSender(sock, memoryview(data))
            try:
                sender.start()
                assert await _wait_for_stall(sender)
                grown = proc.memory_info().rss - rss0
                assert sender.sent < TOTAL // 2, f"{sender.sent} of {TOTAL} bytes accepted before the upstream connected"
                assert grown < MAX_GROWTH, f"RSS grew by {grown / 1e6:.1f} MB before the upstream connected"
            finally:
                sender.stop()


async def test_byte_counters_match_the_traffic(tmp_path):
    up_bytes = payload(100_000, 3)
    async with TcpServer(echo=True, reply_on_eof=b"+tail") as srv, tcp_proxy(tmp_path, srv) as t:
        async with connect(t.port) as (r, w):
            w.write(up_bytes)
            w.write_eof()
            got = await read_to_eof(r)
        assert got == up_bytes + b"+tail"
        values = await t.wait_stats({"istio_tcp_connections_closed_total": 1})
        assert values["istio_tcp_received_bytes_total"] == len(up_bytes)
        assert values["istio_tcp_sent_bytes_total"] == len(got)
        assert values["istio_tcp_connections_opened_total"] == 1
        assert values["istio_tcp_connections_closed_total"] == 1
