"""An HTTP/2 (h2c, prior knowledge) gRPC-shaped upstream app for ``benchmarks.h2bench``.

    python -m benchmarks.upstream_h2 [--host H] [--port P]

Prints ``READY <port>`` once it listens. Every request stream, once it ends,
is answered like a unary gRPC call: HEADERS (``:status: 200``,
``content-type: application/grpc``), one DATA frame (a 5-byte gRPC frame
header and a 64-byte message) and trailers (``grpc-status: 0``) with
END_STREAM. The response blocks use only literals without indexing, so they
are the same bytes on every connection and for every request (no encoder
state); request blocks still go through an HPACK decoder (memoised, from
``proxy.h2frames``), as the protocol requires. Received DATA is handed back
in batches. Frames are parsed with ``struct`` on uvloop: it does far less
work per request than a proxy, so it is not the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys

import uvloop

from proxy.h2frames import (
    ACK,
    DATA,
    END_HEADERS,
    END_STREAM,
    HDR,
    HEADERS,
    PING,
    PREFACE,
    S_INITIAL_WINDOW_SIZE,
    S_MAX_CONCURRENT_STREAMS,
    SETTINGS,
    MemoDecoder,
    frame,
    settings_frame,
    window_frame,
)

GRPC_MSG = b"\x00" + (64).to_bytes(4, "big") + b"m" * 64
BIG = (1 << 31) - 1


def _literal(name: bytes, value: bytes) -> bytes:
    """A literal field without indexing, new name (RFC 7541 section 6.2.2); short strings only."""
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


_HEAD = b"\x88" + _literal(b"content-type", b"application/grpc")  # 0x88: static index 8, ":status: 200"
_TRAILERS = _literal(b"grpc-status", b"0")


def response(sid: int) -> bytes:
    return (frame(HEADERS, END_HEADERS, sid, _HEAD) + frame(DATA, 0, sid, GRPC_MSG)
            + frame(HEADERS, END_HEADERS | END_STREAM, sid, _TRAILERS))


class H2GrpcServer(asyncio.Protocol):
    __slots__ = ("_buf", "_cont", "_decoder", "_preface", "_transport", "_unacked")

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buf = b""
        self._preface = False
        self._decoder = MemoDecoder()
        self._unacked = 0
        self._cont: list[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(settings_frame(((S_MAX_CONCURRENT_STREAMS, 10000), (S_INITIAL_WINDOW_SIZE, BIG)))  # type: ignore[attr-defined]
                        + window_frame(0, BIG - 65535))

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        pos = 0
        if not self._preface:
            if len(buf) < 24:
                self._buf = buf
                return
            if buf[:24] != PREFACE:
                assert self._transport is not None
                self._transport.close()
                return
            self._preface = True
            pos = 24
        out: list[bytes] = []
        end = len(buf)
        unpack = HDR.unpack_from
        while end - pos >= 9:
            hi, lo, ftype, flags, sid = unpack(buf, pos)
            length = (hi << 8) | lo
            if end - pos - 9 < length:
                break
            payload = buf[pos + 9:pos + 9 + length]
            pos += 9 + length
            if ftype == DATA:
                self._unacked += length
                if flags & END_STREAM:
                    out.append(response(sid))
            elif ftype == HEADERS:
                if flags & 0x8:  # PADDED
                    payload = payload[1:len(payload) - payload[0]]
                if flags & 0x20:  # PRIORITY
                    payload = payload[5:]
                if flags & END_HEADERS:
                    self._decoder.decode(payload)
                else:
                    self._cont = [payload]
                if flags & END_STREAM:
                    out.append(response(sid))
            elif ftype == 9 and self._cont is not None:  # CONTINUATION
                self._cont.append(payload)
                if flags & END_HEADERS:
                    self._decoder.decode(b"".join(self._cont))
                    self._cont = None
            elif ftype == SETTINGS and not flags & ACK:
                out.append(frame(SETTINGS, ACK, 0))
            elif ftype == PING and not flags & ACK:
                out.append(frame(PING, ACK, 0, payload))
        self._buf = buf[pos:] if pos < end else b""
        if self._unacked > 1 << 24:
            out.append(window_frame(0, self._unacked))
            self._unacked = 0
        if out:
            assert self._transport is not None
            self._transport.write(b"".join(out))


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    server = await loop.create_server(H2GrpcServer, host, port, backlog=1024)
    sys.stdout.write(f"READY {server.sockets[0].getsockname()[1]}\n")
    sys.stdout.flush()
    try:
        await stop
    finally:
        server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.upstream_h2", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args(argv)
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
