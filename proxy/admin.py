"""The admin API (127.0.0.1:15000 by default), as Envoy names its endpoints.

``/ready``, ``/stats/prometheus``, ``/stats``, ``/config_dump``, ``/clusters``,
``/listeners``, ``/server_info``, ``POST /drain_listeners``, ``POST
/quitquitquit``; plus Istio's ``/healthz/ready`` so the same server can stand
on the status port (15021) and ``/stats/prometheus`` on 15090.

Not on the hot path: each request is answered by a small task. The admin
knows nothing of workers or config sources; it asks an ``AdminBackend``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Protocol, cast

import httptools

log = logging.getLogger("pillion.admin")


class AdminBackend(Protocol):
    def ready(self) -> tuple[bool, str]: ...
    async def stats_export(self) -> dict[str, Any]: ...
    def prometheus_extra(self) -> dict[str, float]: ...
    def node(self) -> dict[str, str]: ...
    def config_dump(self) -> dict[str, Any]: ...
    def clusters_text(self, stats: dict[str, Any]) -> str: ...
    def listeners_info(self) -> list[dict[str, Any]]: ...
    def server_info(self) -> dict[str, Any]: ...
    async def drain_listeners(self) -> None: ...
    def quit(self) -> None: ...


class _AdminConnection(asyncio.Protocol):
    def __init__(self, server: AdminServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.queue: asyncio.Queue[tuple[bytes, bytes, bool]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.task = asyncio.get_running_loop().create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.task is not None:
            self.task.cancel()

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        self.queue.put_nowait((self.parser.get_method(), self.url, self.parser.should_keep_alive()))

    async def _serve(self) -> None:
        while self.transport is not None:
            method, url, keep = await self.queue.get()
            try:
                status, ctype, body = await self.server.handle(method.decode(), url.decode("latin-1"))
            except Exception:
                log.exception("admin handler failed for %s", url)
                status, ctype, body = 500, "text/plain", b"internal error\n"
            if self.transport is None:
                return
            lines = [f"HTTP/1.1 {status} {_REASON.get(status, 'OK')}", f"content-type: {ctype}",
                     f"content-length: {len(body)}"]
            if not keep:
                lines.append("connection: close")
            self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            if not keep:
                self.transport.close()
                return


_REASON = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error", 503: "Service Unavailable"}


class AdminServer:
    def __init__(self, backend: AdminBackend) -> None:
        self.backend = backend
        self.servers: list[asyncio.AbstractServer] = []

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _AdminConnection(self), host, port)
        self.servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    def close(self) -> None:
        for s in self.servers:
            s.close()

    async def handle(self, method: str, url: str) -> tuple[int, str, bytes]:
        path, _, query = url.partition("?")
        b = self.backend
        if path in ("/ready", "/healthz/ready"):
            ok, why = b.ready()
            return (200 if ok else 503), "text/plain", (why + "\n").encode()
        if path == "/stats/prometheus":
            from proxy.stats import render_prometheus

            text = render_prometheus(await b.stats_export(), b.node(), b.prometheus_extra())
            return 200, "text/plain; version=0.0.4", text.encode()
        if path == "/stats":
            export = await b.stats_export()
            if "format=json" in query:
                return 200, "application/json", json.dumps(export, indent=1, sort_keys=True).encode()
            return 200, "text/plain", "\n".join(_flatten("", export)).encode() + b"\n"
        if path == "/config_dump":
            return 200, "application/json", json.dumps(b.config_dump(), indent=1).encode()
        if path == "/clusters":
            return 200, "text/plain", b.clusters_text(await b.stats_export()).encode()
        if path == "/listeners":
            return 200, "application/json", json.dumps(b.listeners_info(), indent=1).encode()
        if path == "/server_info":
            return 200, "application/json", json.dumps(b.server_info(), indent=1).encode()
        if path == "/drain_listeners":
            if method != "POST":
                return 405, "text/plain", b"use POST\n"
            await b.drain_listeners()
            return 200, "text/plain", b"OK\n"
        if path == "/quitquitquit":
            if method != "POST":
                return 405, "text/plain", b"use POST\n"
            asyncio.get_running_loop().call_soon(b.quit)
            return 200, "text/plain", b"OK\n"
        return 404, "text/plain", b"not found\n"


def _flatten(prefix: str, obj: Any) -> list[str]:
    if isinstance(obj, dict):
        out: list[str] = []
        for k in sorted(obj):
            out += _flatten(f"{prefix}.{k}" if prefix else str(k), obj[k])
        return out
    if isinstance(obj, list):
        return [f"{prefix}: {obj}"]
    return [f"{prefix}: {obj}"]
