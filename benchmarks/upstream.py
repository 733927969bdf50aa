"""Upstream apps for the benchmarks: a fast HTTP/1.1 server and TCP echo, sink and source.

Each app is an asyncio Protocol on uvloop and does the least work its job allows, so
that what a benchmark measures is the proxy in front of it. Run one with

    python -m benchmarks.upstream {http,echo,bulk,tcp} [--host H] [--port P]

It prints ``READY <port>`` on stdout once it listens (``--port 0`` picks a free port)
and serves until SIGINT or SIGTERM.

- ``http``: answers every request ``200`` with the body ``hello\\n`` and a
  Content-Length, keeping the connection alive unless the client asks otherwise.
- ``echo``: writes back every byte it reads.
- ``bulk``: the first byte picks the direction. ``R``: the server streams bytes until
  the client goes away (a source). ``W``: the server reads and discards until EOF, then
  answers the count as 8 big-endian bytes and closes (a sink).
- ``tcp``: one port for both TCP benchmarks, since a proxy gives us one TCP port. The
  first byte is ``E`` (echo the rest), ``R`` or ``W`` (as ``bulk``).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys

import httptools
import uvloop

BODY = b"hello\n"
RESPONSE_KEEP_ALIVE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
    % (len(BODY), BODY)
)
RESPONSE_CLOSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
    b"Connection: close\r\n\r\n%s" % (len(BODY), BODY)
)
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

SOURCE_CHUNK = b"\x5a" * (256 * 1024)
WRITE_HIGH_WATER = 1024 * 1024

MODE_ECHO = 0x45  # "E"
MODE_SOURCE = 0x52  # "R": the client reads
MODE_SINK = 0x57  # "W": the client writes


class HttpServer(asyncio.Protocol):
    """HTTP/1.1 keep-alive responder; pipelined requests are answered in order."""

    __slots__ = ("_parser", "_transport")

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            assert self._transport is not None
            self._transport.write(BAD_REQUEST)
            self._transport.close()

    # httptools callback
    def on_message_complete(self) -> None:
        transport = self._transport
        assert transport is not None
        if self._parser.should_keep_alive():
            transport.write(RESPONSE_KEEP_ALIVE)
        else:
            transport.write(RESPONSE_CLOSE)
            transport.close()


class TcpServer(asyncio.Protocol):
    """Echo, sink or source; ``fixed_mode`` skips the one-byte mode prefix."""

    def __init__(self, fixed_mode: int | None, bulk_only: bool) -> None:
        self._mode = fixed_mode
        self._bulk_only = bulk_only
        self._transport: asyncio.Transport | None = None
        self._paused = False
        self._sunk = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        _nodelay(transport)
        self._transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        mode = self._mode
        if mode is None:
            mode = data[0]
            allowed = (MODE_SOURCE, MODE_SINK) if self._bulk_only else (
                MODE_ECHO, MODE_SOURCE, MODE_SINK)
            if mode not in allowed:
                transport.close()
                return
            self._mode = mode
            data = data[1:]
            if mode == MODE_SOURCE:
                self._pump()
                return
        if mode == MODE_ECHO:
            if data:
                transport.write(data)
        elif mode == MODE_SINK:
            self._sunk += len(data)
        # MODE_SOURCE: whatever the client sends is ignored.

    def eof_received(self) -> bool | None:
        if self._mode == MODE_SINK and self._transport is not None:
            self._transport.write(self._sunk.to_bytes(8, "big"))
        return None  # close our side too

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._mode == MODE_SOURCE:
            self._pump()

    def _pump(self) -> None:
        transport = self._transport
        # write() calls pause_writing() itself once the buffer passes the high mark.
        while transport is not None and not self._paused and not transport.is_closing():
            transport.write(SOURCE_CHUNK)


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def protocol_factory(kind: str):
    if kind == "http":
        return HttpServer
    if kind == "echo":
        return lambda: TcpServer(MODE_ECHO, bulk_only=False)
    if kind == "bulk":
        return lambda: TcpServer(None, bulk_only=True)
    if kind == "tcp":
        return lambda: TcpServer(None, bulk_only=False)
    raise ValueError(f"unknown upstream kind {kind!r}")


async def serve(kind: str, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    server = await loop.create_server(protocol_factory(kind), host, port, backlog=1024)
    chosen = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"READY {chosen}\n")
    sys.stdout.flush()
    try:
        await stop
    finally:
        server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.upstream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("http", "echo", "bulk", "tcp"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args(argv)
    uvloop.run(serve(args.kind, args.host, args.port))


if __name__ == "__main__":
    main()
