"""A real OTLP/gRPC trace collector for benchmarks: ``control.otlp_receiver`` on its own.

    python -m benchmarks.collector

Prints ``READY <otlp port> <status port>`` once both listen. ``GET /`` on the status
port answers ``{"spans": N}``: how many spans it has received so far. Stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

from control.otlp_receiver import OtlpReceiver


class _Counting(OtlpReceiver):
    """Counts spans and keeps nothing: it shares the load generator's core, so it must stay cheap
    (turning every span into Python objects, as the demo receiver does, would slow wrk down and
    make tracing look more expensive than it is)."""

    spans = 0

    def ingest(self, request) -> None:  # type: ignore[no-untyped-def]
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                self.spans += len(ss.spans)


async def main() -> int:
    rx = _Counting(limit=10)
    port = await rx.start()

    async def status(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = json.dumps({"spans": rx.spans}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(status, "127.0.0.1", 0)
    print(f"READY {port} {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await rx.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
