"""What the control server tells operators: the debug HTTP endpoints and `pillion control status`.

Owns: the small asyncio HTTP/1.1 server on the debug port (JSON, GET only,
one request per connection) with `/debug/syncz` (connected proxies and their
ACK/NACK state per type, like `istioctl proxy-status`), `/debug/config` (the
current config version and the problems of the last rejected change or of a
node's translation), `/debug/registry` (auto-registered workloads) and
`/ready`; and the client side that fetches `/debug/syncz` and prints it as
a table. It reads state through callables and must not change any.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

log = logging.getLogger("pillion.control.status")

View = Callable[[], Any]
TYPES = ("CDS", "EDS", "LDS", "RDS")
MAX_HEAD = 16384


class DebugServer:
    """GET-only JSON endpoints. `views` maps a path to a callable returning a JSON-able value."""

    def __init__(self, views: dict[str, View], ready: Callable[[], bool]) -> None:
        self.views = views
        self.ready = ready
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self, address: str, port: int) -> int:
        self._server = await asyncio.start_server(self._serve, address, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            status, body = self._answer(head)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            status, body = HTTPStatus.BAD_REQUEST, {"error": "bad request"}
        try:
            data = json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"
            writer.write(
                f"HTTP/1.1 {status.value} {status.phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(data)}\r\nconnection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _answer(self, head: bytes) -> tuple[HTTPStatus, Any]:
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or len(head) > MAX_HEAD:
            return HTTPStatus.BAD_REQUEST, {"error": "bad request line"}
        method, target = parts[0].decode("latin-1"), parts[1].decode("latin-1")
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{method} not allowed"}
        if path == "/ready":
            ok = self.ready()
            return (HTTPStatus.OK, {"ready": True}) if ok else (HTTPStatus.SERVICE_UNAVAILABLE, {"ready": False})
        view = self.views.get(path)
        if view is None:
            return HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {path}", "endpoints": sorted(self.views)}
        try:
            return HTTPStatus.OK, view()
        except Exception as exc:  # a status bug must not take the server down
            log.exception("debug view %s failed", path)
            return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": repr(exc)}


# --- client side: `pillion control status` ---------------------------------------


def fetch(server: str, path: str, timeout: float = 5.0) -> Any:
    """GET http://server/path and decode its JSON; raises OSError when unreachable."""
    with urllib.request.urlopen(f"http://{server}{path}", timeout=timeout) as response:
        return json.load(response)


def _ago(epoch: float, now: float) -> str:
    seconds = max(0, int(now - epoch))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _cell(state: dict[str, Any] | None) -> str:
    if not state:
        return "-"
    word = str(state.get("status", "-"))
    version = str(state.get("sent_version", ""))[:8]
    return f"{word} ({version})" if version and word != "-" else word


def format_syncz(rows: list[dict[str, Any]], config: dict[str, Any] | None, now: float | None = None) -> str:
    """The proxy-status table, then any NACK details and config problems."""
    now = time.time() if now is None else now
    header = ["NODE", "NAMESPACE", "WORKLOAD", "CONNECTED", *TYPES]
    table = [header]
    for row in rows:
        types = row.get("types", {})
        table.append(
            [
                str(row.get("node") or row.get("peer", "")),
                str(row.get("namespace", "")),
                str(row.get("workload", "")),
                _ago(float(row.get("connected_since", now)), now),
                *(_cell(types.get(t)) for t in TYPES),
            ]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in table]
    if not rows:
        lines.append("(no proxies connected)")
    for row in rows:
        for name, state in row.get("types", {}).items():
            nack = state.get("last_nack")
            if nack and state.get("status") == "NACKED":
                lines.append(f"NACK {row.get('node')} {name} version {nack.get('version')}: {nack.get('error_detail')}")
        for problem in row.get("problems", []):
            lines.append(f"PROBLEM {row.get('node')}: {problem}")
    if config:
        version = config.get("version") or "(none loaded)"
        lines.append(f"config {config.get('source', '')}: version {version}")
        for problem in config.get("problems", []):
            lines.append(f"  rejected change: {problem}")
        for problem in config.get("registry_problems", []):
            lines.append(f"  registry: {problem}")
    return "\n".join(lines)


def status_main(server: str) -> int:
    """Print the status table of the control server whose debug port is `server` (host:port)."""
    try:
        rows = fetch(server, "/debug/syncz")
        config = fetch(server, "/debug/config")
    except (OSError, urllib.error.URLError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"pillion control status: cannot reach {server}: {reason}", file=sys.stderr)
        return 1
    print(format_syncz(rows, config))
    return 0
