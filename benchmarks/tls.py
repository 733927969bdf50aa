"""mTLS benchmark: Pillion vs Envoy terminating mutual TLS inbound, side by side, one run.

    python -m benchmarks.tls [--quick] [--out benchmarks/results]

Both proxies terminate mTLS on one inbound listener with the same certificates (a mesh
root made with ``certs``; server identity ``spiffe://cluster.local/ns/default/sa/bench``,
client identity ``.../sa/client``) and forward plain HTTP/1.1 to the same upstream
(``benchmarks.upstream http``). The upstream and the proxy under test run on the SUT
core, the load generators and this harness on the load core (see ``procs.Pinning``).

Scenarios, for Pillion and for Envoy:

1. Handshakes/s: ``openssl s_time -new`` (full handshakes, one at a time, client
   certificate presented, no request); the proxy's CPU seconds per 1000 handshakes.
2. Requests/s over established mTLS connections: this module's own client
   (``python -m benchmarks.tls client``, uvloop) keeps 16 keep-alive connections busy
   with ``GET /`` back to back; req/s, closed-loop p50/p99, proxy CPU per 1000 requests.
   The same client over plain HTTP straight to the upstream is the ``direct`` reference.
3. Pillion only, rotation under load: scenario 2 runs while the harness rewrites the
   server's cert files (``certs.pem`` writes atomically) every 2 s with a freshly issued
   certificate; Pillion watches ``--cert-dir``. Once a second the client opens a new TLS
   connection and records the server certificate's serial. Target: no failed request.

Results go to ``results-tls.json`` in ``--out``, child logs to ``--out/logs/tls-*.log``,
Envoy's bootstrap to ``--out/tls-envoy-bootstrap.json``. Every child is stopped on the
way out, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import json
import math
import os
import platform
import random
import re
import resource
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httptools
import psutil
import uvloop
from cryptography import x509

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
from certs.ca import CertificateAuthority, create_root_ca
from certs.csr import build_csr, generate_key
from certs.pem import certs_to_pem, write_certs, write_private_key
from certs.spiffe import SpiffeId

PYTHON = sys.executable
REPO_ROOT = Path(__file__).resolve().parent.parent
TRUST_DOMAIN = "cluster.local"
NAMESPACE = "default"
SERVER_SA = "bench"
CLIENT_SA = "client"
READY_TIMEOUT = 30.0
GRACE = 20.0  # seconds a load generator may overrun its duration before it is killed
CONNECT_TIMEOUT = 5.0
NS = 1_000_000_000

HCM_TYPE = ("type.googleapis.com/"
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager")
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
DOWNSTREAM_TLS_TYPE = ("type.googleapis.com/"
                       "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext")
DOWNSTREAM_CONNECTIONS_TYPE = (
    "type.googleapis.com/"
    "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig")
UNLIMITED = 4294967295


@dataclass(frozen=True, slots=True)
class Plan:
    """Durations and shapes of every scenario; ``--quick`` shortens the durations only."""

    handshake_s: int
    rps_warmup_s: float
    rps_s: float
    rps_connections: int
    rotation_s: float
    rotate_every_s: float
    probe_every_s: float

    @classmethod
    def make(cls, quick: bool) -> Plan:
        return cls(
            handshake_s=2 if quick else 5,
            rps_warmup_s=1.0 if quick else 2.0,
            rps_s=3.0 if quick else 10.0,
            rps_connections=16,
            rotation_s=6.0 if quick else 10.0,
            rotate_every_s=2.0,
            probe_every_s=1.0,
        )


class ScenarioError(Exception):
    """A load generator failed; the scenario has no number."""


def say(message: str) -> None:
    sys.stderr.write(f"[tls] {message}\n")
    sys.stderr.flush()


# --- certificates ---------------------------------------------------------------------------


class BenchPki:
    """A mesh root and the workload certificates issued from it, as Istio's three files."""

    def __init__(self) -> None:
        self.ca: CertificateAuthority = create_root_ca(
            TRUST_DOMAIN, now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))

    def issue(self, out: Path, service_account: str) -> int:
        """(Re)write cert-chain.pem, key.pem and root-cert.pem in ``out``; the leaf's serial.

        Each file is replaced atomically, the chain first, then the key; the root file is
        written only when missing (it never changes here).
        """
        out.mkdir(parents=True, exist_ok=True)
        key = generate_key()
        identity = SpiffeId(TRUST_DOMAIN, NAMESPACE, service_account)
        chain = self.ca.sign_csr(build_csr(key, identity), identity,
                                 now=dt.datetime.now(dt.UTC), ttl=dt.timedelta(hours=24))
        write_certs(out / "cert-chain.pem", chain[:-1] or chain)  # leaf (+ intermediates)
        write_private_key(out / "key.pem", key)
        root = out / "root-cert.pem"
        if not root.exists():
            root.write_bytes(certs_to_pem([self.ca.root]))
        return chain[0].serial_number


@dataclass(frozen=True, slots=True)
class CertFiles:
    chain: Path
    key: Path
    root: Path

    @classmethod
    def of(cls, directory: Path) -> CertFiles:
        return cls(directory / "cert-chain.pem", directory / "key.pem",
                   directory / "root-cert.pem")


def client_context(files: CertFiles | None) -> ssl.SSLContext:
    """Verifies the server against the mesh root (no hostname: SPIFFE certs have only a
    URI SAN); presents ``files``' certificate when given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                     cafile=str(files.root) if files else None)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED if files else ssl.CERT_NONE
    if files is not None:
        ctx.load_cert_chain(str(files.chain), str(files.key))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def tls_get(port: int, ctx: ssl.SSLContext, timeout: float = 3.0) -> tuple[int, bytes, str]:
    """One ``GET /`` over a new TLS connection: ``(status, body, error)``; status 0 if none."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except (OSError, ssl.SSLError) as exc:
        return 0, b"", f"{type(exc).__name__}: {exc}"
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return (int(match.group(1)) if match else 0), body, "" if match else f"bad answer {data[:80]!r}"


# --- the targets ----------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    admin_port: int
    child: Child
    meter: TreeMeter
    info: dict

    def stop(self) -> None:
        self.child.stop()


PILLION_YAML = """\
apiVersion: networking.istio.io/v1beta1
kind: Sidecar
metadata: {{name: bench, namespace: default}}
spec:
  workloadSelector: {{labels: {{app: bench}}}}
  ingress:
  - port: {{number: {port}, protocol: HTTP, name: http}}
    bind: 127.0.0.1
    defaultEndpoint: 127.0.0.1:{upstream}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {{name: default, namespace: istio-system}}
spec:
  mtls: {{mode: STRICT}}
"""


def start_upstream(pinning: Pinning, logs: Path) -> tuple[Child, int]:
    child = Child("upstream-http",
                  pinning.sut([PYTHON, "-m", "benchmarks.upstream", "http", "--port", "0"]),
                  logs / "tls-upstream-http.log", capture_stdout=True, cwd=REPO_ROOT)
    try:
        return child, int(child.read_line("READY", READY_TIMEOUT))
    except BaseException:
        child.stop()
        raise


def _await_mtls(child: Child, admin_port: int, port: int, client: CertFiles) -> dict:
    """Admin /ready, the port open, one mTLS GET answered by the upstream, and a GET
    without a client certificate refused (so we know mTLS is really required)."""
    wait_http_ok(admin_port, "/ready", READY_TIMEOUT, child)
    wait_tcp_open(port, READY_TIMEOUT, child)
    status, body, error = tls_get(port, client_context(client))
    if status != 200 or body != BODY:
        raise StartError(f"{child.name}: mTLS GET / on port {port} answered status {status} "
                         f"body {body[:80]!r} {error}, not 200 {BODY!r}")
    anon = client_context(None)
    anon.load_verify_locations(str(client.root))
    status, _, error = tls_get(port, anon)
    if status == 200:
        raise StartError(f"{child.name}: port {port} answered 200 without a client certificate")
    return {"no_client_cert": error or f"status {status}"}


def _started(name: str, child: Child, port: int, admin_port: int, client: CertFiles,
             info: dict) -> Target:
    try:
        info["refused_without_client_cert"] = _await_mtls(child, admin_port, port, client)
        return Target(name, port, admin_port, child, TreeMeter(child.pid), info)
    except BaseException:
        child.stop()
        raise


def start_pillion(pinning: Pinning, workdir: Path, logs: Path, upstream_port: int,
                  server_certs: Path, client: CertFiles, log_name: str,
                  log_level: str = "warning") -> Target:
    config_dir = workdir / "pillion-config"
    config_dir.mkdir(parents=True, exist_ok=True)
    port, admin_port = free_port(), free_port()
    (config_dir / "bench.yaml").write_text(PILLION_YAML.format(port=port, upstream=upstream_port))
    argv = pinning.sut([PYTHON, "-m", "proxy", "proxy",
                        "--config-dir", str(config_dir),
                        "--cert-dir", str(server_certs),
                        "--admin-port", str(admin_port),
                        "--labels", "app=bench",
                        "--namespace", NAMESPACE,
                        "--concurrency", "1",
                        "--log-level", log_level])
    child = Child("pillion", argv, logs / f"{log_name}.log", cwd=REPO_ROOT)
    return _started("pillion", child, port, admin_port, client, {"argv": argv})


def envoy_bootstrap(port: int, admin_port: int, upstream_port: int,
                    server: CertFiles) -> dict[str, Any]:
    def address(p: int) -> dict[str, Any]:
        return {"socket_address": {"address": "127.0.0.1", "port_value": p}}

    tls = {
        "@type": DOWNSTREAM_TLS_TYPE,
        "require_client_certificate": True,
        "common_tls_context": {
            "alpn_protocols": ["http/1.1"],
            "tls_certificates": [{"certificate_chain": {"filename": str(server.chain)},
                                  "private_key": {"filename": str(server.key)}}],
            "validation_context": {
                "trusted_ca": {"filename": str(server.root)},
                "match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"prefix": f"spiffe://{TRUST_DOMAIN}/"}}],
            },
        },
    }
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": f"inbound_127.0.0.1_{port}",
        "codec_type": "AUTO",
        "route_config": {"name": "inbound", "virtual_hosts": [{
            "name": "inbound", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"},
                        "route": {"cluster": "inbound-app", "timeout": "0s"}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router",
                          "typed_config": {"@type": ROUTER_TYPE}}],
    }
    return {
        "admin": {"address": address(admin_port)},
        "static_resources": {
            "listeners": [{
                "name": f"127.0.0.1_{port}",
                "address": address(port),
                "filter_chains": [{
                    "transport_socket": {"name": "envoy.transport_sockets.tls",
                                         "typed_config": tls},
                    "filters": [{"name": "envoy.filters.network.http_connection_manager",
                                 "typed_config": hcm}],
                }],
            }],
            "clusters": [{
                "name": "inbound-app",
                "type": "STATIC",
                "connect_timeout": "10s",
                "circuit_breakers": {"thresholds": [{
                    "max_connections": UNLIMITED, "max_pending_requests": UNLIMITED,
                    "max_requests": UNLIMITED, "max_retries": UNLIMITED}]},
                "load_assignment": {"cluster_name": "inbound-app", "endpoints": [
                    {"lb_endpoints": [{"endpoint": {"address": address(upstream_port)}}]}]},
            }],
        },
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {"@type": DOWNSTREAM_CONNECTIONS_TYPE,
                             "max_active_downstream_connections": 2147483647},
        }]},
    }


def envoy_binary() -> str:
    from benchmarks.targets import envoy_binary as find

    return find()


def start_envoy(pinning: Pinning, workdir: Path, logs: Path, out: Path, upstream_port: int,
                server: CertFiles, client: CertFiles) -> Target:
    port, admin_port = free_port(), free_port()
    bootstrap = envoy_bootstrap(port, admin_port, upstream_port, server)
    path = workdir / "envoy-tls.json"
    path.write_text(json.dumps(bootstrap, indent=2))
    (out / "tls-envoy-bootstrap.json").write_text(json.dumps(bootstrap, indent=2))
    argv = pinning.sut([envoy_binary(), "-c", str(path), "--concurrency", "1",
                        "--disable-hot-restart", "-l", "warning",
                        "--base-id", str(random.randint(1000, 1_000_000))])
    child = Child("envoy", argv, logs / "tls-envoy.log")
    return _started("envoy", child, port, admin_port, client, {"argv": argv})


def start_s_server(pinning: Pinning, logs: Path, server: CertFiles, client: CertFiles) -> Target:
    """``openssl s_server`` requiring a client certificate: the floor for the libssl that
    Python's ``ssl`` (so Pillion) uses, when that is the same OpenSSL as the CLI's."""
    port = free_port()
    argv = pinning.sut(["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-quiet",
                        "-cert", str(server.chain), "-key", str(server.key),
                        "-CAfile", str(server.root), "-Verify", "1", "-www"])
    child = Child("s_server", argv, logs / "tls-s_server.log")
    try:
        wait_tcp_open(port, READY_TIMEOUT, child)
        status, _body, error = tls_get(port, client_context(client))
        if status != 200:
            raise StartError(f"s_server: mTLS GET / answered status {status} {error}")
        return Target("s_server", port, 0, child, TreeMeter(child.pid), {"argv": argv})
    except BaseException:
        child.stop()
        raise


def server_counters(target: Target) -> dict[str, float]:
    """The proxy's own TLS counters: Envoy's ``ssl.*`` listener stats, Pillion's Prometheus
    TLS failures and config reloads; ``{}`` when they cannot be read."""
    counters: dict[str, float] = {}
    if target.name == "s_server":
        return counters
    if target.name == "envoy":
        status, body = http_get(target.admin_port, "/stats?filter=^listener\\..*ssl\\.")
        for line in body.decode(errors="replace").splitlines() if status == 200 else []:
            name, _, value = line.partition(": ")
            if value.strip().isdigit() and ".ssl." in name and "127.0.0.1_" in name:
                key = name.split(".ssl.", 1)[1]
                counters[key] = counters.get(key, 0) + float(value)
        return counters
    status, body = http_get(target.admin_port, "/stats/prometheus")
    for line in body.decode(errors="replace").splitlines() if status == 200 else []:
        if line.startswith("#") or " " not in line:
            continue
        name, _, value = line.rpartition(" ")
        if name.startswith(("pillion_tls_handshake_failures_total", "pillion_config_reload",
                            "envoy_listener_downstream_cx_total")):
            with contextlib.suppress(ValueError):
                counters[name] = float(value)
    return counters


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


# --- load generators ------------------------------------------------------------------------

_STIME_USER = re.compile(r"(\d+) connections in ([\d.]+)s; ([\d.]+) connections/user sec")
_STIME_REAL = re.compile(r"(\d+) connections in (\d+) real seconds")


def run_s_time(pinning: Pinning, port: int, seconds: int, client: CertFiles) -> dict[str, Any]:
    """``openssl s_time -new``: full handshakes, one at a time, for ``seconds``.

    s_time stops at the first whole second of wall time past ``seconds`` and prints the
    elapsed real time in whole seconds, so the rate here uses the wall time measured
    around the process instead (process start included, a few ms).
    """
    argv = pinning.load(["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new",
                         "-time", str(seconds), "-cert", str(client.chain),
                         "-key", str(client.key), "-CAfile", str(client.root)])
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + GRACE,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise ScenarioError(f"s_time ran past {seconds + GRACE:.0f}s") from exc
    wall = time.perf_counter() - start
    user = _STIME_USER.search(done.stdout)
    real = _STIME_REAL.search(done.stdout)
    if done.returncode != 0 or not user or not real:
        tail = (done.stdout + done.stderr).strip()[-300:]
        raise ScenarioError(f"s_time exited {done.returncode}: {tail!r}")
    conns = int(user.group(1))
    return {
        "tool": "openssl s_time -new (client certificate presented, no request)",
        "connections": conns,
        "wall_s": wall,
        "real_s_reported": int(real.group(2)),
        "client_user_s": float(user.group(2)),
        "handshakes_per_s": conns / wall,
    }


def run_client(pinning: Pinning, port: int, seconds: float, connections: int,
               client: CertFiles | None, probe_every: float = 0.0,
               during=None) -> dict[str, Any]:
    """This module's ``client`` subcommand on the load core; its JSON result.

    ``during``, when given, runs in a thread from the client's start until it exits,
    with a ``threading.Event`` that is set then (the rotation rewrites certificates there).
    """
    argv = [PYTHON, "-m", "benchmarks.tls", "client", "--port", str(port),
            "--duration", str(seconds), "--connections", str(connections)]
    if client is not None:
        argv += ["--cert", str(client.chain), "--key", str(client.key), "--ca", str(client.root)]
    if probe_every:
        argv += ["--probe-every", str(probe_every)]
    proc = subprocess.Popen(pinning.load(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO_ROOT, start_new_session=True)
    stop = threading.Event()
    worker = None
    if during is not None:
        worker = threading.Thread(target=during, args=(stop,), name="during", daemon=True)
        worker.start()
    try:
        stdout, stderr = proc.communicate(timeout=seconds + GRACE)
    except subprocess.TimeoutExpired as exc:
        raise ScenarioError(f"client ran past {seconds + GRACE:.0f}s") from exc
    finally:
        stop.set()
        if worker is not None:
            worker.join()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lines = stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        result = {}
    if proc.returncode != 0 or not result or "error" in result:
        why = result.get("error") or stderr.strip()[-300:] or f"exit {proc.returncode}"
        raise ScenarioError(f"client: {why}")
    return result


# --- the client (runs as its own process on the load core) -----------------------------------


def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile of an ascending list; ``nan`` when empty."""
    if not sorted_values:
        return math.nan
    return float(sorted_values[max(1, math.ceil(q * len(sorted_values))) - 1])


REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


class _Conn(asyncio.Protocol):
    """One keep-alive connection with one request in flight at a time."""

    def __init__(self, run: ClientRun) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.sent_ns = 0
        self.in_flight = False
        self.finished = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.run.error(self, f"bad response: {exc}")
            if self.transport is not None:
                self.transport.close()

    def on_message_complete(self) -> None:
        self.run.completed(self, time.perf_counter_ns(), self.parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        self.run.lost(self, exc)


class ClientRun:
    """Closed loop: each connection sends its next GET as soon as the last one is answered."""

    def __init__(self, port: int, ctx: ssl.SSLContext | None, seconds: float,
                 connections: int, probe_every: float) -> None:
        self.port = port
        self.ctx = ctx
        self.seconds = seconds
        self.connections = connections
        self.probe_every = probe_every
        self.t0 = 0
        self.end = 0
        self.ok = 0  # 200s answered inside the window
        self.ok_total = 0  # 200s, including those answered after the window closed
        self.non_200 = 0
        self.errors = 0  # requests lost with their connection, or unparsable answers
        self.connect_errors = 0
        self.reconnects = 0
        self.closed_idle = 0  # connections the server closed with nothing in flight
        self.error_samples: collections.Counter[str] = collections.Counter()
        self.latencies: list[int] = []
        self.live: set[_Conn] = set()
        self.probes: list[dict[str, Any]] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.done: asyncio.Future[None] | None = None

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # --- driving ---
    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        first = await asyncio.gather(*(self._connect() for _ in range(self.connections)))
        if not any(first):
            raise OSError(f"no connection to port {self.port}: "
                          f"{self.error_samples.most_common(1)}")
        cpu0 = _cpu_self()
        self.t0 = time.perf_counter_ns()
        self.end = self.t0 + int(self.seconds * NS)
        for conn in first:
            if conn is not None:
                self._send(conn)
        for _ in range(self.connections - sum(1 for c in first if c is not None)):
            self._spawn(self._reconnect())
        prober = loop.create_task(self._probe_loop()) if self.probe_every else None
        timed_out = 0
        try:
            await asyncio.wait_for(asyncio.shield(self.done), self.seconds + 5.0)
        except TimeoutError:
            timed_out = sum(1 for c in self.live if c.in_flight)
        wall = (time.perf_counter_ns() - self.t0) / NS
        cpu = _cpu_self() - cpu0
        if prober is not None:
            # The loop starts no probe after the window; let one under way finish, since a
            # probe cut mid-handshake would show up as a handshake failure on the server.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(prober, 2 * CONNECT_TIMEOUT)
        for conn in list(self.live):
            conn.finished = True
            if conn.transport is not None:
                conn.transport.close()
        lat = sorted(self.latencies)
        return {
            "tls": self.ctx is not None,
            "connections": self.connections,
            "seconds": self.seconds,
            "requests": self.ok,
            "requests_total": self.ok_total,
            "requests_per_s": self.ok / self.seconds,
            "non_200": self.non_200,
            "errors": self.errors,
            "connect_errors": self.connect_errors,
            "timeouts": timed_out,
            "failed": self.non_200 + self.errors + self.connect_errors + timed_out,
            "reconnects": self.reconnects,
            "closed_idle": self.closed_idle,
            "error_samples": dict(self.error_samples.most_common(5)),
            "p50_us": percentile(lat, 0.50) / 1e3,
            "p90_us": percentile(lat, 0.90) / 1e3,
            "p99_us": percentile(lat, 0.99) / 1e3,
            "p999_us": percentile(lat, 0.999) / 1e3,
            "client_cpu_s": cpu,
            "client_busy": cpu / wall if wall > 0 else None,
            "probes": self.probes,
        }

    async def _connect(self) -> _Conn | None:
        loop = asyncio.get_running_loop()
        try:
            _t, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Conn(self), "127.0.0.1", self.port, ssl=self.ctx),
                CONNECT_TIMEOUT)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            self.connect_errors += 1
            self.error_samples[f"connect: {type(exc).__name__}: {exc}"[:160]] += 1
            return None
        self.live.add(conn)
        return conn

    async def _reconnect(self) -> None:
        while time.perf_counter_ns() < self.end:
            conn = await self._connect()
            if conn is not None:
                self.reconnects += 1
                self._send(conn)
                return
            await asyncio.sleep(0.05)
        self._check_done()

    def _send(self, conn: _Conn) -> None:
        if time.perf_counter_ns() >= self.end or conn.transport is None:
            self._retire(conn)
            return
        conn.in_flight = True
        conn.sent_ns = time.perf_counter_ns()
        conn.transport.write(REQUEST)

    def _retire(self, conn: _Conn) -> None:
        conn.finished = True
        self.live.discard(conn)
        if conn.transport is not None:
            conn.transport.close()
        self._check_done()

    def _check_done(self) -> None:
        if (not self.live and time.perf_counter_ns() >= self.end
                and self.done is not None and not self.done.done()):
            self.done.set_result(None)

    # --- callbacks ---
    def completed(self, conn: _Conn, now: int, status: int) -> None:
        conn.in_flight = False
        if status == 200:
            self.ok_total += 1
            if now <= self.end:
                self.ok += 1
                self.latencies.append(now - conn.sent_ns)
        else:
            self.non_200 += 1
            self.error_samples[f"status {status}"] += 1
        self._send(conn)

    def error(self, conn: _Conn, why: str) -> None:
        if conn.in_flight:
            conn.in_flight = False
            self.errors += 1
        self.error_samples[why[:160]] += 1

    def lost(self, conn: _Conn, exc: Exception | None) -> None:
        if conn.finished:
            return
        conn.finished = True
        self.live.discard(conn)
        why = f"{type(exc).__name__}: {exc}" if exc else "closed by server"
        if conn.in_flight:
            conn.in_flight = False
            self.errors += 1
            self.error_samples[f"request lost: {why}"[:160]] += 1
        else:
            self.closed_idle += 1
        if self.done is not None and not self.done.done():
            self._spawn(self._reconnect())

    # --- probes: a new connection once per interval, and the server certificate's serial ---
    async def _probe_loop(self) -> None:
        n = 0
        while True:
            n += 1
            due = self.t0 + int(n * self.probe_every * NS)
            if due >= self.end - NS // 10:  # none in the last 100 ms of the window
                return
            await asyncio.sleep(max(0.0, (due - time.perf_counter_ns()) / NS))
            self.probes.append(await self._probe((time.perf_counter_ns() - self.t0) / NS))

    async def _probe(self, at: float) -> dict[str, Any]:
        record: dict[str, Any] = {"t": round(at, 3), "serial": None, "status": 0, "error": ""}
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.port, ssl=self.ctx), CONNECT_TIMEOUT)
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            record["serial"] = format(x509.load_der_x509_certificate(der).serial_number, "x")
            writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            data = await asyncio.wait_for(reader.read(-1), CONNECT_TIMEOUT)
            match = re.match(rb"HTTP/1\.[01] (\d{3})", data)
            record["status"] = int(match.group(1)) if match else 0
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"[:160]
        finally:
            if writer is not None:
                writer.close()
        return record


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def client_main(args: argparse.Namespace) -> int:
    ctx = None
    if args.cert:
        ctx = client_context(CertFiles(Path(args.cert), Path(args.key), Path(args.ca)))
    run = ClientRun(args.port, ctx, args.duration, args.connections, args.probe_every)
    try:
        result = uvloop.run(run.run())
    except (OSError, TimeoutError) as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 1 if "error" in result else 0


# --- the scenarios --------------------------------------------------------------------------


def _alive(target: Target) -> None:
    if not target.child.alive():
        raise ScenarioError(f"{target.name} exited (code {target.child.proc.returncode}): "
                            f"{target.child.log_tail(3)}")


def scenario_handshakes(target: Target, plan: Plan, pinning: Pinning,
                        client: CertFiles) -> dict[str, Any]:
    _alive(target)
    before_counters = server_counters(target)
    cpu_before = target.meter.cpu_seconds()
    result = run_s_time(pinning, target.port, plan.handshake_s, client)
    cpu = target.meter.cpu_seconds() - cpu_before
    result["proxy_cpu_s"] = cpu
    result["proxy_cpu_s_per_1k"] = cpu / (result["connections"] / 1000) if result[
        "connections"] else None
    result["server_counters"] = _delta(server_counters(target), before_counters)
    return result


def scenario_requests(target: Target, plan: Plan, pinning: Pinning, client: CertFiles,
                      upstream_meter: TreeMeter) -> dict[str, Any]:
    _alive(target)
    run_client(pinning, target.port, plan.rps_warmup_s, plan.rps_connections, client)
    cpu_before = target.meter.cpu_seconds()
    up_before = upstream_meter.cpu_seconds()
    result = run_client(pinning, target.port, plan.rps_s, plan.rps_connections, client)
    total = result["requests_total"] or 0
    if total:
        result["proxy_cpu_s_per_1k"] = (target.meter.cpu_seconds() - cpu_before) / (total / 1000)
        result["upstream_cpu_s_per_1k"] = (upstream_meter.cpu_seconds() - up_before) / (
            total / 1000)
    return result


def scenario_direct(port: int, plan: Plan, pinning: Pinning,
                    upstream_meter: TreeMeter) -> dict[str, Any]:
    run_client(pinning, port, plan.rps_warmup_s, plan.rps_connections, None)
    up_before = upstream_meter.cpu_seconds()
    result = run_client(pinning, port, plan.rps_s, plan.rps_connections, None)
    if result["requests_total"]:
        result["upstream_cpu_s_per_1k"] = (upstream_meter.cpu_seconds() - up_before) / (
            result["requests_total"] / 1000)
    return result


def reference_handshakes(plan: Plan, pinning: Pinning, logs: Path, server_dir: Path,
                         client: CertFiles) -> dict[str, Any]:
    try:
        target = start_s_server(pinning, logs, CertFiles.of(server_dir), client)
    except StartError as exc:
        raise ScenarioError(str(exc)) from exc
    try:
        return scenario_handshakes(target, plan, pinning, client)
    finally:
        target.stop()


def scenario_rotation(target: Target, plan: Plan, pinning: Pinning, client: CertFiles,
                      pki: BenchPki, server_dir: Path, initial_serial: int) -> dict[str, Any]:
    """Scenario 2 against Pillion while the server certificate is reissued every few seconds."""
    _alive(target)
    run_client(pinning, target.port, plan.rps_warmup_s, plan.rps_connections, client)
    issued: list[dict[str, Any]] = [{"t": 0.0, "serial": format(initial_serial, "x"),
                                     "initial": True}]
    rotate_errors: list[str] = []

    def rotate(stop: threading.Event) -> None:
        start = time.monotonic()
        n = 0
        while True:
            n += 1
            if stop.wait(max(0.0, start + n * plan.rotate_every_s - time.monotonic())):
                return
            if n * plan.rotate_every_s >= plan.rotation_s:
                return
            try:
                serial = pki.issue(server_dir, SERVER_SA)
            except Exception as exc:  # reported, not raised: the thread must not die silently
                rotate_errors.append(f"{type(exc).__name__}: {exc}")
                continue
            issued.append({"t": round(time.monotonic() - start, 3),
                           "serial": format(serial, "x")})

    before = server_counters(target)
    cpu_before = target.meter.cpu_seconds()
    result = run_client(pinning, target.port, plan.rotation_s, plan.rps_connections, client,
                        probe_every=plan.probe_every_s, during=rotate)
    cpu = target.meter.cpu_seconds() - cpu_before
    result["server_counters"] = _delta(server_counters(target), before)
    probes = result.get("probes", [])
    seen = [p["serial"] for p in probes if p.get("serial")]
    issued_serials = {i["serial"] for i in issued}
    result.update({
        "certs_written": len(issued) - 1,
        "issued": issued,
        "rotate_errors": rotate_errors,
        "distinct_serials_seen": len(set(seen)),
        "unknown_serials_seen": sorted(set(seen) - issued_serials),
        "probe_failures": sum(1 for p in probes if p.get("status") != 200),
        "proxy_cpu_s_per_1k": cpu / (result["requests_total"] / 1000)
        if result["requests_total"] else None,
    })
    return result


def _run(results: dict, key: str, name: str, fn) -> None:
    say(f"{name}: {key}")
    try:
        results[key] = fn()
    except (ScenarioError, OSError, psutil.Error) as exc:
        results[key] = {"error": str(exc)}
        say(f"{name} {key}: {exc}")


# --- the report -----------------------------------------------------------------------------


def _get(results: dict, *keys: str) -> Any:
    value: Any = results
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


ROWS: list[tuple[str, tuple[str, ...], int]] = [
    ("mTLS handshakes/s (s_time -new)", ("handshakes", "handshakes_per_s"), 0),
    ("proxy CPU-s per 1000 handshakes", ("handshakes", "proxy_cpu_s_per_1k"), 3),
    ("req/s, 16 keep-alive mTLS conns", ("requests", "requests_per_s"), 0),
    ("latency p50, us", ("requests", "p50_us"), 0),
    ("latency p99, us", ("requests", "p99_us"), 0),
    ("proxy CPU-s per 1000 req", ("requests", "proxy_cpu_s_per_1k"), 3),
    ("failed requests", ("requests", "failed"), 0),
]

ROTATION_ROWS: list[tuple[str, str]] = [
    ("requests (200)", "requests_total"),
    ("req/s", "requests_per_s"),
    ("failed requests", "failed"),
    ("  non-200 / lost / connect / timeout", ""),
    ("cert files rewritten", "certs_written"),
    ("new-connection probes", ""),
    ("distinct serials seen by probes", "distinct_serials_seen"),
    ("probe failures", "probe_failures"),
    ("connections closed by server (idle)", "closed_idle"),
    ("reconnects", "reconnects"),
]


def _fmt(value: float | None, decimals: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{decimals}f}"


def format_table(results: dict[str, Any]) -> str:
    targets = results["targets"]
    direct = results.get("direct", {})
    header = ("metric", "pillion", "envoy", "pillion/envoy", "reference (*)")
    rows = [header]
    references = {"handshakes": results.get("s_server", {}), "requests": direct}
    for label, keys, decimals in ROWS:
        p = _get(targets.get("pillion", {}), *keys)
        e = _get(targets.get("envoy", {}), *keys)
        ratio = p / e if p is not None and e else None
        r = _get(references, *keys)
        rows.append((label, _fmt(p, decimals), _fmt(e, decimals), _fmt(ratio, 2),
                     _fmt(r, decimals)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                       for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("(*) handshake rows: openssl s_server -Verify 1 on the SUT core "
                 f"({results['meta']['openssl_cli']}; Python's ssl: {results['meta']['ssl']});")
    lines.append("    request rows: the same client, plain HTTP, straight to the upstream.")

    rot = targets.get("pillion", {}).get("rotation")
    lines.append("")
    lines.append(f"rotation under load (pillion only, cert reissued every "
                 f"{results['meta']['plan']['rotate_every_s']:g}s):")
    if not rot:
        lines.append("  not run")
    elif "error" in rot:
        lines.append(f"  error: {rot['error']}")
    else:
        for label, key in ROTATION_ROWS:
            if label.strip().startswith("non-200"):
                value = (f"{rot['non_200']} / {rot['errors']} / {rot['connect_errors']} / "
                         f"{rot['timeouts']}")
            elif label == "new-connection probes":
                value = str(len(rot.get("probes", [])))
            else:
                value = _fmt(rot.get(key), 0)
            lines.append(f"  {label:<38} {value}")
        counters = rot.get("server_counters") or {}
        reloads = {k: v for k, v in counters.items() if k.startswith("pillion_config_reload")}
        tls_fail = {k: v for k, v in counters.items() if "tls_handshake_failures" in k}
        lines.append(f"  {'pillion reloads (delta)':<38} {_short(reloads) or 'none'}")
        lines.append(f"  {'pillion TLS failures (delta)':<38} {_short(tls_fail) or 'none'}")
        if rot.get("error_samples"):
            lines.append(f"  {'errors seen':<38} {rot['error_samples']}")
    notes = results.get("notes", [])
    if notes:
        lines.append("")
        lines.extend(f"note: {n}" for n in notes)
    return "\n".join(lines)


def _short(counters: dict[str, float]) -> str:
    return ", ".join(f"{k.replace('pillion_', '')}={v:g}" for k, v in sorted(counters.items()))


def _notes(results: dict[str, Any]) -> list[str]:
    notes = []
    for key in ("direct", "s_server"):
        if "error" in results.get(key, {}):
            notes.append(f"{key}: {results[key]['error']}")
    busy = results.get("direct", {}).get("client_busy")
    if busy is not None and busy > 0.9:
        notes.append(f"direct: the client used {busy:.0%} of its core, so the direct req/s is "
                     "the client's limit")
    for name, target in results["targets"].items():
        if not target.get("available"):
            notes.append(f"{name} not available: {str(target.get('error')).splitlines()[0]}")
            continue
        for key in ("handshakes", "requests", "rotation"):
            scen = target.get(key) or {}
            if "error" in scen:
                notes.append(f"{name} {key}: {scen['error']}")
            busy = scen.get("client_busy")
            if busy is not None and busy > 0.9:
                notes.append(f"{name} {key}: the client used {busy:.0%} of its core; "
                             "the number may be the client's limit, not the proxy's")
            if key == "handshakes" and scen.get("wall_s"):
                share = scen["client_user_s"] / scen["wall_s"]
                if share > 0.6:
                    notes.append(f"{name} handshakes: s_time spent {share:.0%} of the wall time "
                                 "in user CPU; compare the CPU-per-handshake row instead")
                bad = {k: v for k, v in (scen.get("server_counters") or {}).items()
                       if "fail" in k or "error" in k or "no_cert" in k}
                if bad:
                    notes.append(f"{name} handshakes: server-side TLS errors {bad}")
            if key in ("requests", "rotation") and scen.get("failed"):
                notes.append(f"{name} {key}: {scen['failed']} failed requests "
                             f"{scen.get('error_samples')}")
    return notes


# --- the run --------------------------------------------------------------------------------


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _meta(args: argparse.Namespace, plan: Plan, pinning: Pinning) -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "git": _version(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"]),
        "python": platform.python_version(),
        "ssl": ssl.OPENSSL_VERSION,
        "openssl_cli": _version(["openssl", "version"]),
        "envoy": _version([envoy_binary(), "--version"]),
        "platform": platform.platform(),
        "cpu": cpu_model,
        "cpus": os.cpu_count(),
        "pinning": pinning.describe(),
        "plan": asdict(plan),
        "key_type": "ECDSA P-256 (certs.csr.generate_key)",
        "handshake_tool": "openssl s_time -new",
    }


def _on_signal(signum: int, frame: object) -> None:
    """Unwind through every ``finally``, which stops the children; ignore repeats meanwhile."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def bench_target(name: str, plan: Plan, pinning: Pinning, workdir: Path, logs: Path, out: Path,
                 upstream_port: int, upstream_meter: TreeMeter, server_dir: Path,
                 client: CertFiles, pillion_log_level: str) -> dict[str, Any]:
    say(f"{name}: starting")
    try:
        if name == "pillion":
            target = start_pillion(pinning, workdir, logs, upstream_port, server_dir, client,
                                   "tls-pillion", pillion_log_level)
        else:
            target = start_envoy(pinning, workdir, logs, out, upstream_port,
                                 CertFiles.of(server_dir), client)
    except (StartError, OSError, psutil.Error) as exc:
        say(f"{name}: not available: {str(exc).splitlines()[0]}")
        return {"available": False, "error": str(exc)}
    results: dict[str, Any] = {"available": True, "info": target.info}
    try:
        _run(results, "handshakes", name,
             lambda: scenario_handshakes(target, plan, pinning, client))
        _run(results, "requests", name,
             lambda: scenario_requests(target, plan, pinning, client, upstream_meter))
    finally:
        target.stop()
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["client"]:
        parser = argparse.ArgumentParser(prog="python -m benchmarks.tls client",
                                         description="closed-loop HTTP/1.1 (m)TLS load")
        parser.add_argument("client", choices=["client"])
        parser.add_argument("--port", type=int, required=True)
        parser.add_argument("--duration", type=float, default=3.0)
        parser.add_argument("--connections", type=int, default=16)
        parser.add_argument("--cert")
        parser.add_argument("--key")
        parser.add_argument("--ca")
        parser.add_argument("--probe-every", type=float, default=0.0,
                            help="open a new connection this often and record the serial")
        return parser.parse_args(argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tls", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short durations (about 30 s)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results",
                        help="where results-tls.json and logs/ go")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to cores")
    parser.add_argument("--pillion-log-level", default="warning",
                        choices=("debug", "info", "warning", "error"),
                        help="Pillion's --log-level (info logs each failed handshake)")
    args = parser.parse_args(argv)
    args.client = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.client:
        return client_main(args)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    plan = Plan.make(args.quick)
    pinning = Pinning(not args.no_pin)
    if pinning.enabled:
        os.sched_setaffinity(0, {pinning.load_core})
    else:
        say("not pinning: needs two cores and taskset; numbers will be noisier")
    out: Path = args.out
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"meta": _meta(args, plan, pinning), "targets": {}}

    with tempfile.TemporaryDirectory(prefix="pillion-tls-bench-") as tmp:
        work = Path(tmp)
        pki = BenchPki()
        server_dir = work / "certs" / "server"
        initial_serial = pki.issue(server_dir, SERVER_SA)
        pki.issue(work / "certs" / "client", CLIENT_SA)
        client = CertFiles.of(work / "certs" / "client")
        upstream, upstream_port = start_upstream(pinning, logs)
        try:
            upstream_meter = TreeMeter(upstream.pid)
            _run(results, "direct", "direct",
                 lambda: scenario_direct(upstream_port, plan, pinning, upstream_meter))
            _run(results, "s_server", "openssl s_server",
                 lambda: reference_handshakes(plan, pinning, logs, server_dir, client))
            for name in ("pillion", "envoy"):
                workdir = work / name
                workdir.mkdir()
                results["targets"][name] = bench_target(
                    name, plan, pinning, workdir, logs, out, upstream_port, upstream_meter,
                    server_dir, client, args.pillion_log_level)
            pillion = results["targets"]["pillion"]
            if pillion.get("available"):
                # A fresh Pillion, so that the rotation starts from the first certificate
                # and its reload counters from zero.
                say("pillion: starting again for the rotation scenario")
                try:
                    target = start_pillion(pinning, work / "pillion", logs, upstream_port,
                                           server_dir, client, "tls-pillion-rotation",
                                           args.pillion_log_level)
                except (StartError, OSError, psutil.Error) as exc:
                    pillion["rotation"] = {"error": f"could not start: {exc}"}
                else:
                    try:
                        _run(pillion, "rotation", "pillion", lambda: scenario_rotation(
                            target, plan, pinning, client, pki, server_dir, initial_serial))
                    finally:
                        target.stop()
        finally:
            upstream.stop()

    results["notes"] = _notes(results)
    (out / "results-tls.json").write_text(json.dumps(results, indent=2) + "\n")
    print(format_table(results))
    print(f"\nwrote {out / 'results-tls.json'}")
    return 0 if results["targets"]["pillion"].get("available") else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        say("interrupted: children stopped, no results written")
        sys.exit(130)
