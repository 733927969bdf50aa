"""One worker: one event loop, its listeners, pools and stats.

A ``Worker`` applies snapshots (clusters first, then the snapshot reference,
then listeners), runs the once-a-tick sweep that enforces idle timeouts, and
drains: stop accepting, let in-flight requests finish with
``connection: close``, close idle keep-alives, and after the deadline close
whatever is left.

With ``--concurrency N`` (N > 1) each worker is its own process started by
the supervisor (``python -m proxy.worker``); it talks to the supervisor over
a socket pair with length-prefixed pickled messages: ``("apply", snapshot)``,
``("stats",)``, ``("drain", seconds)``. Snapshots are plain model objects,
so workers never import protobuf or YAML.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import pickle
import signal
import socket
import struct
import sys
from typing import Any

from proxy.context import Context
from proxy.listener import ListenerManager
from proxy.model import Direction, Snapshot

log = logging.getLogger("pillion.worker")


class Worker:
    def __init__(self, loop: asyncio.AbstractEventLoop, *, reuse_port: bool = False,
                 node: dict[str, str] | None = None, tick_seconds: float = 1.0) -> None:
        self.ctx = Context(loop, node=node)
        self.ctx.tick_seconds = tick_seconds
        self.listeners = ListenerManager(self.ctx, reuse_port=reuse_port)
        self._sweeper: asyncio.TimerHandle | None = None
        self.applied = False
        self.drain_started = asyncio.Event()  # listeners have stopped accepting

    async def apply(self, snapshot: Snapshot) -> list[str]:
        self.ctx.swap(snapshot)
        errors = await self.listeners.apply(snapshot.listeners)
        self.applied = True
        if self._sweeper is None:
            self._schedule_sweep()
        return errors

    def _schedule_sweep(self) -> None:
        self._sweeper = self.ctx.loop.call_later(self.ctx.tick_seconds, self._sweep)

    def _sweep(self) -> None:
        ctx = self.ctx
        ctx.tick += 1
        tick = ctx.tick
        for conn in list(ctx.connections):
            conn.on_tick(tick)
        ctx.clusters.sweep(ctx.loop.time())  # [traffic] upstream idle timeouts
        self._schedule_sweep()

    def export_stats(self) -> dict[str, Any]:
        out = self.ctx.stats.export()
        out["tls_failures"] = dict(self.ctx.tls.handshake_failures)
        out["access_log_dropped"] = self.ctx.access_log.dropped  # [accesslog]
        out["spans"] = self.ctx.tracer.stats()  # [tracing]
        return out

    def drain_listeners(self) -> None:
        """Envoy's /drain_listeners: stop accepting; open connections keep going."""
        self.listeners.stop_accepting()

    async def drain(self, seconds: float, exit_on_zero: bool = False) -> None:
        """Drain for up to ``seconds``. With ``exit_on_zero`` (Istio's EXIT_ON_ZERO_ACTIVE_CONNECTIONS)
        only inbound listeners stop accepting: the app may still call out while it finishes, and the
        drain ends as soon as no connection is left."""
        ctx = self.ctx
        ctx.draining = True
        if exit_on_zero:
            self.listeners.stop_accepting(lambda spec: spec.direction is Direction.INBOUND)
        else:
            self.listeners.stop_accepting()
        self.drain_started.set()
        for conn in list(ctx.connections):
            if exit_on_zero and _is_outbound(conn):
                continue  # the app closes these itself when it is done
            conn.drain()
        if ctx.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx.drained.wait(), seconds)
        self.listeners.stop_accepting()
        for conn in list(ctx.connections):
            conn.abort()
        ctx.clusters.close()
        ctx.jwks.close()
        await ctx.access_log.aclose()  # [accesslog] write what is queued
        await asyncio.to_thread(ctx.tracer.close)  # [tracing] a last flush, bounded by the export timeout
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


def _is_outbound(conn: object) -> bool:
    listener = getattr(conn, "listener", None)
    return listener is not None and listener.direction is Direction.OUTBOUND


# ---------------------------------------------------------------- process side (concurrency > 1)

_LEN = struct.Struct("!I")


async def send_msg(writer: asyncio.StreamWriter, msg: Any) -> None:
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_LEN.pack(len(data)) + data)
    await writer.drain()


async def recv_msg(reader: asyncio.StreamReader) -> Any:
    head = await reader.readexactly(_LEN.size)
    (n,) = _LEN.unpack(head)
    return pickle.loads(await reader.readexactly(n))


async def _serve(fd: int, node: dict[str, str], tick: float) -> None:
    loop = asyncio.get_running_loop()
    worker = Worker(loop, reuse_port=True, node=node, tick_seconds=tick)
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    # The supervisor owns signals; a worker only stops when told (or when the pipe closes).
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: None)
    while True:
        try:
            msg = await recv_msg(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            await worker.drain(0)
            return
        kind = msg[0]
        if kind == "apply":
            await send_msg(writer, ("applied", await worker.apply(msg[1])))
        elif kind == "stats":
            await send_msg(writer, ("stats", worker.export_stats()))
        elif kind == "drain_listeners":
            worker.drain_listeners()
            await send_msg(writer, ("ok",))
        elif kind == "drain":
            await worker.drain(msg[1], bool(msg[2]) if len(msg) > 2 else False)
            await send_msg(writer, ("drained",))
            return


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pillion-worker")
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--node", default="")
    ap.add_argument("--tick", type=float, default=1.0)
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [worker {args.index}] %(name)s: %(message)s")
    node = dict(kv.split("=", 1) for kv in args.node.split(",") if "=" in kv)
    import uvloop

    uvloop.run(_serve(args.fd, node, args.tick))
    os._exit(0)  # no interpreter teardown work: the supervisor is waiting on us
    return 0


if __name__ == "__main__":
    sys.exit(main())
