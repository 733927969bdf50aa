"""A small HTTP/1.1 app for demos: says who it is and what it was sent.

``GET /anything`` answers 200 with JSON: service, version, method, path, and
the request headers the sidecar added (x-request-id, x-forwarded-for, ...).
``/status/N`` answers status N; ``--fail-every N`` makes it answer 503 to
every Nth request (a flaky service, for retries to show). Runs on uvloop + httptools, keep-alive, and
handles SIGTERM (a container's PID 1 must). Also an async context manager
for running in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import cast

import httptools


class _AppConn(asyncio.Protocol):
    def __init__(self, app: DemoApp) -> None:
        self.app = app
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.app.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.app.conns.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = {}
        self.body = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body += len(body)

    def on_message_complete(self) -> None:
        if self.app.calls:
            # Fan out to the upstream services first (through this app's sidecar), then answer.
            if self.transport is not None:
                self.transport.pause_reading()
            asyncio.get_running_loop().create_task(self._answer_after_calls(
                self.parser.get_method().decode(), self.url.decode("latin-1"), dict(self.headers),
                self.parser.should_keep_alive()))
            return
        self._answer(self.parser.get_method().decode(), self.url.decode("latin-1"), self.headers,
                     self.parser.should_keep_alive(), [])

    async def _answer_after_calls(self, method: str, path: str, headers: dict[str, str], keep: bool) -> None:
        calls = await asyncio.gather(*(call_upstream(c, headers) for c in self.app.calls))
        self._answer(method, path, headers, keep, list(calls))
        if self.transport is not None:
            self.transport.resume_reading()

    def _answer(self, method: str, path: str, headers: dict[str, str], keep: bool, calls: list[dict[str, object]]) -> None:
        t = self.transport
        if t is None:
            return
        self.app.requests += 1
        status = 200
        if path.startswith("/status/"):
            try:
                status = int(path.split("/")[2])
            except ValueError:
                status = 400
        if any(c.get("status") != 200 for c in calls):
            status = 502
        if self.app.fail_every and self.app.requests % self.app.fail_every == 0:
            status = 503
        xfcc = headers.get("x-forwarded-client-cert", "")
        doc = {
            "service": self.app.name, "version": self.app.version, "method": method,
            "path": path, "body_bytes": self.body,
            "peer": next((f[4:] for f in xfcc.split(";") if f.startswith("URI=")), ""),
            "headers": {k: v for k, v in headers.items() if k.startswith("x-") or k in ("host", "end-user")},
            "calls": calls,
        }
        body = (json.dumps(doc) + "\n").encode()
        t.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n" % (
            status, b"OK" if status == 200 else b"Status", len(body), b"" if keep else b"connection: close\r\n") + body)
        if not keep:
            t.close()


# Headers an app must copy from its request to the requests it makes, so the mesh can
# follow a call across services (Istio asks apps to do the same).
PROPAGATE = ("end-user", "x-request-id", "traceparent", "tracestate", "x-b3-traceid", "x-b3-spanid",
             "x-b3-parentspanid", "x-b3-sampled", "b3")


async def call_upstream(target: str, headers: dict[str, str], timeout: float = 5.0) -> dict[str, object]:
    """GET ``target`` ("ADDR:PORT/HOST/PATH": through the sidecar at ADDR:PORT, for service HOST)."""
    addr, _, rest = target.partition("/")
    host, _, path = rest.partition("/")
    ip, _, port = addr.rpartition(":")
    lines = [f"GET /{path} HTTP/1.1", f"host: {host}", "connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k in PROPAGATE]
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, int(port)), timeout)
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        raw = await asyncio.wait_for(reader.read(), timeout)
        writer.close()
    except (OSError, TimeoutError) as e:
        return {"service": host, "status": 0, "error": str(e) or type(e).__name__}
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    status = int(status_line[1]) if len(status_line) > 1 else 0
    flags = next((line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                  if line.lower().startswith(b"x-pillion-flags:")), "")
    try:
        doc = json.loads(body) if body.startswith(b"{") else {"service": host}  # apps answer JSON, even errors
    except ValueError:
        doc = {"service": host}
    doc["status"] = status
    if flags:
        doc["flags"] = flags
    return dict(doc)


class DemoApp:
    def __init__(self, name: str, version: str = "v1", host: str = "127.0.0.1", port: int = 0,
                 calls: tuple[str, ...] = (), fail_every: int = 0) -> None:
        self.calls = calls  # upstream targets, "ADDR:PORT/HOST/PATH" (see call_upstream)
        self.fail_every = fail_every
        self.name = name
        self.version = version
        self.host = host
        self.port = port
        self.requests = 0
        self.conns: set[_AppConn] = set()
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _AppConn(self), self.host, self.port)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self.port

    def close(self) -> None:
        """Stop accepting and close open connections (as a crashed app would)."""
        if self.server is not None:
            self.server.close()
        for c in list(self.conns):
            if c.transport is not None:
                c.transport.close()

    async def __aenter__(self) -> DemoApp:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


async def _main(args: argparse.Namespace) -> int:
    app = DemoApp(args.name, args.version, args.host, args.port, tuple(args.call), args.fail_every)
    port = await app.start()
    print(f"READY {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    app.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m control.demoapp")
    ap.add_argument("--name", default="hello")
    ap.add_argument("--version", default="v1")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--call", action="append", default=[], metavar="ADDR:PORT/HOST/PATH",
                    help="on each request, first GET this upstream (through the sidecar at ADDR:PORT)")
    ap.add_argument("--fail-every", type=int, default=0, metavar="N",
                    help="answer 503 to every Nth request (a flaky service)")
    args = ap.parse_args(argv)
    import uvloop

    return int(uvloop.run(_main(args)))


if __name__ == "__main__":
    sys.exit(main())
