"""Child processes for the macro benchmark: start pinned, wait until ready, measure, stop.

Rules this module keeps: every child gets its own session (so Ctrl-C reaches only the
harness, which then stops them in order), stderr goes to a log file whose tail explains
a failure, readiness is polled against a deadline and fails early if the child dies,
and ``Child.stop`` ends the child's whole process group: SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import http.client
import math
import os
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

POLL_INTERVAL = 0.05
STOP_TIMEOUT = 5.0


class StartError(Exception):
    """A child did not become ready; ``str()`` carries the reason and its log tail."""


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Pinning:
    """Which core the system under test gets and which the load generator gets."""

    def __init__(self, enabled: bool) -> None:
        cores = sorted(os.sched_getaffinity(0))
        self.enabled = enabled and len(cores) >= 2 and shutil.which("taskset") is not None
        self.sut_core = cores[0]
        self.load_core = cores[1] if len(cores) >= 2 else cores[0]

    def sut(self, argv: Sequence[str]) -> list[str]:
        return self._prefix(self.sut_core) + list(argv)

    def load(self, argv: Sequence[str]) -> list[str]:
        return self._prefix(self.load_core) + list(argv)

    def _prefix(self, core: int) -> list[str]:
        return ["taskset", "-c", str(core)] if self.enabled else []

    def describe(self) -> dict:
        return {"enabled": self.enabled, "sut_core": self.sut_core, "load_core": self.load_core}


class Child:
    """One started process (and its process group) with its stderr in ``log_path``."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path,
                 capture_stdout: bool = False, cwd: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if capture_stdout else self._log,
                stderr=self._log,
                start_new_session=True,
                cwd=cwd,
            )
        except OSError:
            self._log.close()
            raise
        self._stdout_buf = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def died(self, what: str) -> StartError:
        tail = self.log_tail()
        last = tail.splitlines()[-1] if tail else f"nothing in {self.log_path}"
        return StartError(f"{self.name} {what} (exit code {self.proc.returncode}): {last}"
                          + (f"\nlog tail ({self.log_path}):\n{tail}" if tail else ""))

    def read_line(self, prefix: str, timeout: float) -> str:
        """Wait for a stdout line starting with ``prefix``; return the rest of it."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._stdout_buf:
                line, self._stdout_buf = self._stdout_buf.split(b"\n", 1)
                text = line.decode(errors="replace").strip()
                if text.startswith(prefix):
                    return text[len(prefix):].strip()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StartError(f"{self.name} printed no {prefix!r} line within {timeout:.0f}s")
            readable, _, _ = select.select([fd], [], [], min(remaining, 0.5))
            if readable:
                chunk = os.read(fd, 4096)
                if not chunk:
                    self.proc.wait(timeout=STOP_TIMEOUT)
                    raise self.died(f"exited before printing {prefix!r}")
                self._stdout_buf += chunk

    def stop(self) -> None:
        """SIGTERM the group, wait, SIGKILL whatever is left. Safe to call twice."""
        try:
            if self.proc.poll() is None:
                _signal_group(self.proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=STOP_TIMEOUT)
            # The group id stays reserved while any member lives, so this cannot hit
            # a stranger: it ends stragglers (worker processes) or finds nobody.
            _signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT)
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self._log.close()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def wait_http_ok(port: int, path: str, timeout: float, child: Child | None = None,
                 host_header: str | None = None) -> None:
    """Poll ``GET http://127.0.0.1:port/path`` until it answers 200, or fail."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise child.died(f"exited while waiting for {path} on port {port}")
        status, _body = http_get(port, path, host_header, timeout=1.0)
        if status == 200:
            return
        last = f"status {status}" if status else "connection refused or reset"
        time.sleep(POLL_INTERVAL)
    name = child.name if child is not None else "target"
    raise StartError(f"{name}: GET {path} on port {port} not 200 within {timeout:.0f}s ({last})"
                     + _log_hint(child))


def wait_tcp_open(port: int, timeout: float, child: Child | None = None) -> None:
    """Poll until 127.0.0.1:port accepts a connection, or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise child.died(f"exited while waiting for port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(POLL_INTERVAL)
    name = child.name if child is not None else "target"
    raise StartError(f"{name}: port {port} did not accept connections within {timeout:.0f}s"
                     + _log_hint(child))


def _log_hint(child: Child | None) -> str:
    """The last line of a child's log, then its tail, for an error message."""
    tail = child.log_tail() if child is not None else ""
    if not tail:
        return ""
    assert child is not None
    return f"; last log line: {tail.splitlines()[-1]}\nlog tail ({child.log_path}):\n{tail}"


def http_get(port: int, path: str, host_header: str | None = None,
             timeout: float = 2.0) -> tuple[int, bytes]:
    """One GET to 127.0.0.1; ``(0, b"")`` if there was no HTTP answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Host": host_header} if host_header else {}
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return 0, b""
    finally:
        conn.close()


class TreeMeter:
    """CPU seconds and RSS of a process and its live descendants, plus an RSS sampler."""

    # Listing descendants scans /proc (about 0.5 ms), and the sampler shares the load
    # generator's core, so the list is refreshed at most this often while sampling.
    TREE_REFRESH = 0.5

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cached: list[psutil.Process] = []
        self._cached_at = -math.inf

    def _tree(self, max_age: float = 0.0) -> list[psutil.Process]:
        now = time.monotonic()
        if now - self._cached_at > max_age:
            try:
                self._cached = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                self._cached = []
            self._cached_at = now
        return self._cached

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in self._tree():
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    def rss(self, max_age: float = 0.0) -> int:
        total = 0
        for proc in self._tree(max_age):
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    def start_sampling(self) -> None:
        self.peak_rss = max(self.peak_rss, self.rss())
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._thread.start()

    def stop_sampling(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.peak_rss

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, self.rss(self.TREE_REFRESH))
