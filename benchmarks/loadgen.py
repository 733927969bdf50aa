"""Load generators the macro benchmark runs on their own core: HTTP latency, TCP ping-pong, TCP bulk.

    python -m benchmarks.loadgen latency --port P [--rate 1000] [--duration 10] [--connections 8]
    python -m benchmarks.loadgen pingpong --port P [--connections 16] [--size 100] [--duration 5]
    python -m benchmarks.loadgen bulk --port P [--duration 5] [--direction down|up]

Each prints one JSON object on stdout and exits non-zero if it could not measure.
Every run is bounded: a warm-up, a measured window, then a short grace period.

Strategy (latency): open loop. Request ``i`` is due at ``t0 + i / rate`` whatever the
responses do; a due request goes out on an idle keep-alive connection, or waits in a
queue when all are busy. Two latencies are kept per request: from the write to the end
of the response (``p50_us``/``p99_us``, what we report) and from the due time
(``sched_*``, which also counts time spent waiting for a free connection, so a stalling
target cannot hide by slowing the sender down). uvloop timers tick in milliseconds, so
due requests are released in one-millisecond batches; clocks are ``perf_counter_ns``.

Strategy (TCP): the upstream is ``benchmarks.upstream tcp``, whose first byte picks
the mode. Ping-pong keeps one message in flight per connection and counts round
trips; bulk reads (``down``) from a source, or writes (``up``) to a sink and then
reads back the count the sink saw, which needs the proxy to pass on a half-close.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import socket
import sys
import time

import httptools
import uvloop

DEFAULT_HOST_HEADER = "upstream.default.svc.cluster.local"
CONNECT_TIMEOUT = 5.0
GRACE = 5.0
NS = 1_000_000_000


def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile of an ascending list; ``nan`` when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return float(sorted_values[rank - 1])


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _connect_all(factory, host: str, port: int, count: int) -> list:
    loop = asyncio.get_running_loop()
    pairs = await asyncio.wait_for(
        asyncio.gather(*(loop.create_connection(factory, host, port) for _ in range(count))),
        CONNECT_TIMEOUT,
    )
    return [protocol for _transport, protocol in pairs]


# --- HTTP latency -------------------------------------------------------------------------


class _HttpConn(asyncio.Protocol):
    def __init__(self, gen: LatencyRun) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.due_ns = 0
        self.sent_ns = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.gen.failed(self)
            if self.transport is not None:
                self.transport.close()

    def on_message_complete(self) -> None:
        self.gen.completed(self, time.perf_counter_ns(), self.parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.gen.lost(self)


class LatencyRun:
    """One open-loop run: schedule, dispatch, record."""

    def __init__(self, request: bytes, rate: float, duration: float, warmup: float) -> None:
        self.request = request
        self.interval_ns = NS / rate
        self.total = int(rate * (warmup + duration))
        self.record_from = int(rate * warmup)  # index of the first recorded request
        self.issued = 0
        self.finished = 0
        self.errors = 0
        self.non_2xx = 0
        self.idle: list[_HttpConn] = []
        self.busy: dict[_HttpConn, int] = {}  # connection -> request index
        self.queue: collections.deque[int] = collections.deque()  # waiting for a connection
        self.service_ns: list[int] = []
        self.sched_ns: list[int] = []
        self.t0 = 0
        self.done: asyncio.Future[None] | None = None

    async def run(self, host: str, port: int, connections: int) -> dict:
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        conns = await _connect_all(lambda: _HttpConn(self), host, port, connections)
        self.idle = list(conns)
        self.t0 = time.perf_counter_ns()
        self._tick()
        window = self.total * self.interval_ns / NS
        timed_out = False
        try:
            await asyncio.wait_for(asyncio.shield(self.done), window + GRACE)
        except TimeoutError:
            timed_out = True
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()
        return self._summary(timed_out)

    def _tick(self) -> None:
        now = time.perf_counter_ns()
        due = min(self.total, int((now - self.t0) / self.interval_ns) + 1)
        while self.issued < due:
            due_ns = self.t0 + int(self.issued * self.interval_ns)
            index = self.issued
            self.issued += 1
            if self.idle:
                self._send(self.idle.pop(), index, due_ns)
            else:
                self.queue.append(index)
        if self.issued < self.total:
            next_due = self.t0 + self.issued * self.interval_ns
            delay = max(0.001, (next_due - time.perf_counter_ns()) / NS)
            asyncio.get_running_loop().call_later(delay, self._tick)
        else:
            self._maybe_done()

    def _send(self, conn: _HttpConn, index: int, due_ns: int) -> None:
        conn.due_ns = due_ns
        conn.sent_ns = time.perf_counter_ns()
        self.busy[conn] = index
        assert conn.transport is not None
        conn.transport.write(self.request)

    def completed(self, conn: _HttpConn, now: int, status: int) -> None:
        index = self.busy.pop(conn, None)
        if index is None:
            return
        self.finished += 1
        if not 200 <= status < 300:
            self.non_2xx += 1
        elif index >= self.record_from:
            self.service_ns.append(now - conn.sent_ns)
            self.sched_ns.append(now - conn.due_ns)
        if self.queue:
            queued = self.queue.popleft()
            self._send(conn, queued, self.t0 + int(queued * self.interval_ns))
        else:
            self.idle.append(conn)
        self._maybe_done()

    def failed(self, conn: _HttpConn) -> None:
        if self.busy.pop(conn, None) is not None:
            self.finished += 1
            self.errors += 1
        self._maybe_done()

    def lost(self, conn: _HttpConn) -> None:
        self.failed(conn)
        if conn in self.idle:
            self.idle.remove(conn)

    def _maybe_done(self) -> None:
        if self.done is None or self.done.done():
            return
        all_lost = not (self.idle or self.busy)
        if all_lost or (self.issued >= self.total and self.finished >= self.total):
            self.done.set_result(None)

    def _summary(self, timed_out: bool) -> dict:
        service = sorted(self.service_ns)
        sched = sorted(self.sched_ns)
        window = (self.total - self.record_from) * self.interval_ns / NS
        return {
            "requests": self.total - self.record_from,
            "recorded": len(service),
            "errors": self.errors + (self.total - self.finished),
            "non_2xx": self.non_2xx,
            "timed_out": timed_out,
            "rate_target": NS / self.interval_ns,
            "rate_achieved": len(service) / window if window else 0.0,
            "p50_us": percentile(service, 0.50) / 1000,
            "p90_us": percentile(service, 0.90) / 1000,
            "p99_us": percentile(service, 0.99) / 1000,
            "p999_us": percentile(service, 0.999) / 1000,
            "max_us": (service[-1] / 1000) if service else math.nan,
            "sched_p50_us": percentile(sched, 0.50) / 1000,
            "sched_p99_us": percentile(sched, 0.99) / 1000,
        }


async def run_latency(args: argparse.Namespace) -> dict:
    request = (
        f"GET {args.path} HTTP/1.1\r\nHost: {args.host_header}\r\nUser-Agent: pillion-bench\r\n\r\n"
    ).encode()
    run = LatencyRun(request, args.rate, args.duration, args.warmup)
    return await run.run(args.host, args.port, args.connections)


# --- TCP ping-pong ------------------------------------------------------------------------


class _PingPong(asyncio.Protocol):
    def __init__(self, message: bytes) -> None:
        self.message = message
        self.transport: asyncio.Transport | None = None
        self.pending = 0
        self.round_trips = 0
        self.running = True
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _nodelay(transport)

    def start(self) -> None:
        assert self.transport is not None
        self.pending = len(self.message)
        self.transport.write(b"E" + self.message)

    def data_received(self, data: bytes) -> None:
        self.pending -= len(data)
        if self.pending > 0:
            return
        self.round_trips += 1
        if self.running and self.transport is not None:
            self.pending = len(self.message)
            self.transport.write(self.message)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


async def run_pingpong(args: argparse.Namespace) -> dict:
    message = b"p" * args.size
    conns = await _connect_all(lambda: _PingPong(message), args.host, args.port, args.connections)
    for conn in conns:
        conn.start()
    await asyncio.sleep(args.warmup)  # warm-up window, not a readiness wait
    before = sum(c.round_trips for c in conns)
    start = time.perf_counter()
    await asyncio.sleep(args.duration)
    after = sum(c.round_trips for c in conns)
    elapsed = time.perf_counter() - start
    lost = sum(1 for c in conns if c.lost.done())
    for conn in conns:
        conn.running = False
        if conn.transport is not None:
            conn.transport.close()
    count = after - before
    return {
        "connections": args.connections,
        "message_bytes": args.size,
        "round_trips": count,
        "seconds": elapsed,
        "round_trips_per_s": count / elapsed,
        "connections_lost": lost,
    }


# --- TCP bulk -----------------------------------------------------------------------------


class _Bulk(asyncio.Protocol):
    def __init__(self, direction: str) -> None:
        self.direction = direction
        self.transport: asyncio.Transport | None = None
        self.received = 0
        self.reply = b""
        self.writing = False
        self.paused = False
        self.sent = 0
        self.chunk = b"\xa5" * (256 * 1024)
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _nodelay(transport)
        self.transport.set_write_buffer_limits(high=1024 * 1024)

    def start(self) -> None:
        assert self.transport is not None
        if self.direction == "down":
            self.transport.write(b"R")
        else:
            self.transport.write(b"W")
            self.writing = True
            self._pump()

    def stop_writing(self) -> None:
        self.writing = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write_eof()

    def _pump(self) -> None:
        transport = self.transport
        while self.writing and not self.paused and transport is not None \
                and not transport.is_closing():
            transport.write(self.chunk)
            self.sent += len(self.chunk)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump()

    def data_received(self, data: bytes) -> None:
        if self.direction == "down":
            self.received += len(data)
        else:
            self.reply += data

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def run_bulk(args: argparse.Namespace) -> dict:
    (conn,) = await _connect_all(lambda: _Bulk(args.direction), args.host, args.port, 1)
    conn.start()
    if args.direction == "down":
        await asyncio.sleep(args.warmup)
        before, start = conn.received, time.perf_counter()
        await asyncio.sleep(args.duration)
        moved, elapsed = conn.received - before, time.perf_counter() - start
        failed = conn.closed.done()
        assert conn.transport is not None
        conn.transport.close()
    else:
        # The sink's count is the only honest number: bytes in our buffers or the
        # proxy's were not delivered yet. So: write, half-close, wait for the count.
        start = time.perf_counter()
        await asyncio.sleep(args.warmup + args.duration)
        conn.stop_writing()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(conn.closed), GRACE)
        elapsed = time.perf_counter() - start
        failed = len(conn.reply) != 8
        moved = int.from_bytes(conn.reply[:8], "big") if not failed else 0
        if conn.transport is not None:
            conn.transport.close()
    return {
        "direction": args.direction,
        "bytes": moved,
        "seconds": elapsed,
        "mb_per_s": moved / elapsed / 1e6,
        "failed": failed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", default="127.0.0.1")
    common.add_argument("--port", type=int, required=True)
    common.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    common.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds first")

    lat = sub.add_parser("latency", parents=[common], help="open-loop HTTP/1.1 latency")
    lat.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    lat.add_argument("--connections", type=int, default=8)
    lat.add_argument("--path", default="/")
    lat.add_argument("--host-header", default=DEFAULT_HOST_HEADER)

    pp = sub.add_parser("pingpong", parents=[common], help="TCP request/response")
    pp.add_argument("--connections", type=int, default=16)
    pp.add_argument("--size", type=int, default=100, help="message bytes")

    bulk = sub.add_parser("bulk", parents=[common], help="TCP throughput on one connection")
    bulk.add_argument("--direction", choices=("down", "up"), default="down")

    args = parser.parse_args(argv)
    runner = {"latency": run_latency, "pingpong": run_pingpong, "bulk": run_bulk}[args.mode]
    try:
        result = uvloop.run(runner(args))
    except (OSError, TimeoutError) as exc:
        json.dump({"error": f"{type(exc).__name__}: {exc}"}, sys.stdout)
        sys.stdout.write("\n")
        return 1
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
