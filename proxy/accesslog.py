"""Access logs: records queued on the hot path, formatted and written in the background.

On the path (STYLE.md 2.3) a finished request or TCP connection costs one
``AccessLogger.push`` of a small tuple of references it already holds
(the stream's header dict, its peer, its endpoint): no formatting, no clock
read beyond the loop's, no I/O. When the bounded queue is full the record is
dropped and counted (``pillion_access_log_dropped_total``). A background task
per worker drains the queue, formats each record (Envoy's default text line,
or Istio's default JSON fields) and appends the lines to their file in a
thread (the file is opened once; ``/dev/stdout`` and ``/dev/stderr`` write to
the process's own descriptors). Listeners without an access log pay one
attribute check.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import deque
from datetime import UTC, datetime
from typing import Any

from proxy.model import AccessLog
from proxy.tls import Peer

log = logging.getLogger("pillion.accesslog")

QUEUE_LIMIT = 16384

# Record kinds (first field after the AccessLog).
HTTP = 0
TCP = 1
PROTOCOL_HTTP2 = 2  # [http2] the record's "http10" field of an HTTP/2 stream (False: HTTP/1.1, True: HTTP/1.0)

_STD = {"/dev/stdout": 1, "/dev/stderr": 2}


class AccessLogger:
    """One worker's access log queue and its writer task."""

    __slots__ = ("_files", "_idle", "_task", "_wake", "dropped", "limit", "loop", "queue", "written")

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int = QUEUE_LIMIT) -> None:
        self.loop = loop
        self.limit = limit
        self.queue: deque[tuple[Any, ...]] = deque()
        self.dropped = 0
        self.written = 0
        self._files: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._idle = True
        self._task: asyncio.Task[None] | None = None

    def push(self, record: tuple[Any, ...]) -> None:
        """Queue one record (hot path: an append and, when the writer sleeps, one wake-up)."""
        q = self.queue
        if len(q) >= self.limit:
            self.dropped += 1
            return
        q.append(record)
        if self._idle:
            self._idle = False
            if self._task is None:
                self._task = self.loop.create_task(self._run())
            self._wake.set()

    async def _run(self) -> None:
        q = self.queue
        while True:
            if not q:
                self._idle = True
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = list(q)
            q.clear()
            out = format_batch(batch, time.time(), self.loop.time())
            await self.loop.run_in_executor(None, self._write, out)
            self.written += len(batch)

    def _write(self, out: dict[str, list[str]]) -> None:
        for path, lines in out.items():
            fd = self._files.get(path)
            try:
                if fd is None:
                    fd = _STD.get(path)
                    if fd is None:
                        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                    self._files[path] = fd
                data = "".join(lines).encode()
                while data:
                    data = data[os.write(fd, data):]
            except OSError as exc:
                log.warning("access log %s: %s", path, exc)

    async def aclose(self) -> None:
        """Write what is queued, stop the writer and close the files."""
        task = self._task
        if task is not None:
            if self.queue:
                out = format_batch(list(self.queue), time.time(), self.loop.time())
                self.queue.clear()
                await self.loop.run_in_executor(None, self._write, out)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._task = None
        for path, fd in self._files.items():
            if path not in _STD:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._files.clear()


# ---------------------------------------------------------------- formatting (background only)

def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(wall * 1000) % 1000:03d}Z"


def _s(v: bytes | None) -> str | None:
    return None if v is None else v.decode("latin-1")


def _address(ip: bytes, port: int) -> str | None:
    """ip:port as Envoy prints an address ([ip]:port for IPv6)."""
    if not ip:
        return None
    host = ip.decode("latin-1")
    if not port:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _trace_id(traceparent: bytes | None) -> str | None:
    if traceparent is None:
        return None
    parts = traceparent.split(b"-")
    return parts[1].decode("latin-1") if len(parts) >= 4 and len(parts[1]) == 32 else None


def http_fields(rec: tuple[Any, ...], wall_now: float, loop_now: float) -> dict[str, Any]:
    """Istio's default JSON access log fields for an HTTP record (None where Envoy prints "-")."""
    (_, _, t0, t1, method, path, http10, code, flags, rx, tx, hdrs, client_ip, peer, upstream, cluster, t_head,
     client_port) = rec
    hdrs = hdrs or {}
    peer_uri = peer.spiffe_id or (peer.uris[0] if peer.uris else None) if isinstance(peer, Peer) else None
    return {
        "start_time": _iso(wall_now - (loop_now - t0)),
        "method": _s(method) or None,
        "path": _s(path) or None,
        "protocol": "HTTP/2" if http10 == PROTOCOL_HTTP2 else "HTTP/1.0" if http10 else "HTTP/1.1",
        "response_code": code,
        "response_flags": flags or "-",
        "bytes_received": rx,
        "bytes_sent": tx,
        "duration": round((t1 - t0) * 1000),
        # from routing to the upstream's response head (Envoy: x-envoy-upstream-service-time); none for local replies
        "upstream_service_time": round((t_head - t0) * 1000) if t_head else None,
        "x_forwarded_for": _s(hdrs.get(b"x-forwarded-for")),
        "user_agent": _s(hdrs.get(b"user-agent")),
        "request_id": _s(hdrs.get(b"x-request-id")),
        "authority": _s(hdrs.get(b"host")),
        "upstream_host": upstream.address if upstream is not None and not isinstance(upstream, str) else upstream,
        "upstream_cluster": cluster,
        "downstream_remote_address": _address(client_ip, client_port),
        "downstream_peer_uri_san": peer_uri,
        "trace_id": _trace_id(hdrs.get(b"traceparent")),
    }


def tcp_fields(rec: tuple[Any, ...], wall_now: float, loop_now: float) -> dict[str, Any]:
    (_, _, t0, t1, rx, tx, client_ip, peer, upstream, cluster) = rec
    peer_uri = peer.spiffe_id or (peer.uris[0] if peer.uris else None) if isinstance(peer, Peer) else None
    return {
        "start_time": _iso(wall_now - (loop_now - t0)),
        "method": None, "path": None, "protocol": None, "response_code": 0, "response_flags": "-",
        "bytes_received": rx,
        "bytes_sent": tx,
        "duration": round((t1 - t0) * 1000),
        "upstream_service_time": None, "x_forwarded_for": None, "user_agent": None, "request_id": None,
        "authority": None,
        "upstream_host": upstream,
        "upstream_cluster": cluster,
        "downstream_remote_address": client_ip or None,
        "downstream_peer_uri_san": peer_uri,
        "trace_id": None,
    }


def _d(v: Any) -> str:
    return "-" if v is None else str(v)


def text_line(f: dict[str, Any]) -> str:
    """Envoy's default access log format."""
    return (f'[{f["start_time"]}] "{_d(f["method"])} {_d(f["path"])} {_d(f["protocol"])}" '
            f'{f["response_code"]} {f["response_flags"]} {f["bytes_received"]} {f["bytes_sent"]} '
            f'{f["duration"]} {_d(f["upstream_service_time"])} "{_d(f["x_forwarded_for"])}" '
            f'"{_d(f["user_agent"])}" "{_d(f["request_id"])}" "{_d(f["authority"])}" '
            f'"{_d(f["upstream_host"])}"\n')


def format_batch(batch: list[tuple[Any, ...]], wall_now: float, loop_now: float) -> dict[str, list[str]]:
    """Records -> lines, per file path."""
    out: dict[str, list[str]] = {}
    for rec in batch:
        spec: AccessLog = rec[0]
        try:
            f = http_fields(rec, wall_now, loop_now) if rec[1] == HTTP else tcp_fields(rec, wall_now, loop_now)
        except Exception:  # a malformed record must not stop the writer
            log.exception("access log record could not be formatted")
            continue
        line = json.dumps(f, separators=(",", ":")) + "\n" if spec.encoding == "JSON" else text_line(f)
        out.setdefault(spec.path, []).append(line)
    return out
