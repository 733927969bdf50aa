"""Loopback plumbing for tests: free ports, a raw HTTP/1.1 client, proxies.

Everything waits on events or polls with a deadline; nothing sleeps to wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools

from proxy.options import ProxyOptions
from proxy.supervisor import Supervisor

REPO = Path(__file__).resolve().parents[2]


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports handed out by free_port come from below the kernel's ephemeral range, in turn, so a
# server that binds port 0 (or a client's local port) can never take a port a test chose
# a moment ago and has not bound yet. The start is per process, so concurrent runs rarely meet.
_FIXED_LOW = 10000
_FIXED_SPAN = max(_ephemeral_low() - _FIXED_LOW, 1000)
_next_port = itertools.count(random.randrange(_FIXED_SPAN))


def free_port() -> int:
    """A port that is free now and that nothing else in this process will be handed."""
    for _ in range(_FIXED_SPAN):
        port = _FIXED_LOW + next(_next_port) % _FIXED_SPAN
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("0.0.0.0", port))  # the widest bind: fails if any address holds the port
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


@dataclass
class Response:
    status: int = 0
    reason: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    keep_alive: bool = True

    def header(self, name: str) -> str | None:
        name = name.lower()
        vals = [v for k, v in self.headers if k.lower() == name]
        return ",".join(vals) if vals else None


class _RespParser:
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.cur = Response()
        self.done: list[Response] = []
        self.head_only = False
        self.headers_done = False

    def on_status(self, reason: bytes) -> None:
        self.cur.reason += reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.cur.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.cur.status = self.parser.get_status_code()
        self.headers_done = True
        if self.head_only:
            self._complete()

    def on_body(self, body: bytes) -> None:
        self.cur.body += body

    def on_message_complete(self) -> None:
        if not self.head_only:
            self._complete()

    def _complete(self) -> None:
        if 100 <= self.cur.status < 200 and self.cur.status != 101:
            self.cur = Response()
            return
        self.cur.keep_alive = self.parser.should_keep_alive()
        self.done.append(self.cur)
        self.cur = Response()
        if self.head_only:
            self.parser = httptools.HttpResponseParser(self)


class RawClient:
    """One client connection that writes raw bytes and reads parsed responses."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.p = _RespParser()
        self.closed = False

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> RawClient:
        r, w = await asyncio.open_connection(host, port)
        return cls(r, w)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, timeout: float = 5.0, head: bool = False) -> Response:
        """Read the next complete response (a close-delimited one completes at EOF)."""
        self.p.head_only = head
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.p.done:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError("no complete response in time")
            data = await asyncio.wait_for(self.reader.read(65536), left)
            if not data:
                self.closed = True
                if self.p.headers_done and not self.p.done:
                    self.p.cur.keep_alive = False
                    self.p.done.append(self.p.cur)
                    self.p.cur = Response()
                    break
                raise ConnectionError("connection closed before a response")
            try:
                self.p.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                self.p._complete()
        return self.p.done.pop(0)

    async def request(self, method: str, path: str, host: str, headers: dict[str, str] | None = None,
                      body: bytes = b"") -> Response:
        lines = [f"{method} {path} HTTP/1.1", f"host: {host}"]
        for k, v in (headers or {}).items():
            lines.append(f"{k}: {v}")
        if body or method in ("POST", "PUT"):
            lines.append(f"content-length: {len(body)}")
        await self.send(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        return await self.response(head=method == "HEAD")

    async def eof(self, timeout: float = 5.0) -> bool:
        """True if the server closes the connection (reads and drops anything before)."""
        with contextlib.suppress(ConnectionError):
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                left = deadline - asyncio.get_running_loop().time()
                data = await asyncio.wait_for(self.reader.read(65536), max(left, 0.001))
                if not data:
                    return True
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def one_request(port: int, raw: bytes, timeout: float = 5.0) -> Response:
    c = await RawClient.connect(port)
    try:
        await c.send(raw)
        return await c.response(timeout)
    finally:
        await c.close()


@dataclass
class ProxyHandle:
    supervisor: Supervisor
    admin_port: int
    config_dir: Path

    async def admin_get(self, path: str) -> tuple[int, bytes]:
        c = await RawClient.connect(self.admin_port)
        try:
            r = await c.request("GET", path, "admin")
            return r.status, r.body
        finally:
            await c.close()

    async def admin_post(self, path: str) -> tuple[int, bytes]:
        c = await RawClient.connect(self.admin_port)
        try:
            r = await c.request("POST", path, "admin")
            return r.status, r.body
        finally:
            await c.close()


@contextlib.asynccontextmanager
async def standalone_proxy(config_dir: Path, *, labels: dict[str, str] | None = None, namespace: str = "default",
                           watch: bool = False, drain_seconds: float = 2.0, tick_seconds: float = 1.0,
                           cert_dir: Path | None = None, wait_ready: bool = True,
                           **extra: Any) -> AsyncIterator[ProxyHandle]:
    """A proxy on this test's event loop, in standalone mode, ready when yielded.

    ``extra``: further ProxyOptions fields (service_account, ca_address, token_file, ...)."""
    opts = ProxyOptions(config_dir=str(config_dir), admin_port=0, labels=labels or {"app": "client"},
                        namespace=namespace, watch=watch, drain_seconds=drain_seconds, tick_seconds=tick_seconds,
                        cert_dir=str(cert_dir) if cert_dir else None, **extra)
    async with running_proxy(opts, config_dir, wait_ready=wait_ready) as handle:
        yield handle


@contextlib.asynccontextmanager
async def xds_proxy(address: str, *, labels: dict[str, str] | None = None, wait_ready: bool = True,
                    ) -> AsyncIterator[ProxyHandle]:
    """A proxy on this test's event loop following an ADS server; ready (first config applied) if asked."""
    opts = ProxyOptions(xds=address, admin_port=0, labels=labels or {"app": "client"}, drain_seconds=1.0)
    async with running_proxy(opts, Path("."), wait_ready=wait_ready) as handle:
        yield handle


@contextlib.asynccontextmanager
async def running_proxy(opts: ProxyOptions, config_dir: Path, wait_ready: bool = True) -> AsyncIterator[ProxyHandle]:
    sup = Supervisor(opts, install_signals=False)
    task = asyncio.get_running_loop().create_task(sup.run())
    ready = asyncio.ensure_future(sup.ready_event.wait() if wait_ready else _admin_up(sup))
    done, _ = await asyncio.wait({task, ready}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
    if task in done or not done:
        ready.cancel()
        raise RuntimeError(f"proxy did not start (rc={task.result() if task.done() else 'timeout'})")
    try:
        yield ProxyHandle(sup, sup.admin_port, config_dir)
    finally:
        sup.quit()
        await asyncio.wait_for(task, 30)


async def _admin_up(sup: Supervisor) -> None:
    while not sup.admin_port:
        await asyncio.sleep(0)


async def eventually(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``pred`` on every loop iteration until true; fail at the deadline (no fixed sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise TimeoutError("condition not met before the deadline")
        await asyncio.sleep(0)


def wait_until(pred: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll ``pred`` until true or the deadline passes (for subprocess tests)."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while time.monotonic() < deadline:
        if pred():
            return True
        tick.wait(interval)
    return pred()


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def start_proxy_process(config_dir: Path, admin_port: int, *extra: str,
                        labels: str = "app=client") -> subprocess.Popen[bytes]:
    """``python -m proxy proxy ...`` as a real process; ready when /ready says 200."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "proxy", "proxy", "--config-dir", str(config_dir), "--admin-port", str(admin_port),
         "--labels", labels, *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
