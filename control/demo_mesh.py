"""``pillion demo``: a bookinfo-style mesh as local processes on loopback.

One ``pillion control`` (xDS + CA), six apps (productpage, details, reviews
v1/v2/v3, ratings: ``control.demoapp``) and a ``pillion proxy --xds`` sidecar
for each, every workload on its own loopback address (127.0.1.x for its
"pod", 127.0.2.x for the egress ports its app dials), so no iptables and no
containers are needed. Sidecars prove who they are with bootstrap tokens and
talk mutual TLS (STRICT mesh-wide; productpage's port is PERMISSIVE so the
demo's "user" can call it in plaintext). reviews is a canary: jason goes to
v2, everyone else is split 50/50 between v1 and v3.

The driver sends requests as two users and shows, live, which reviews
version answered, the identity each hop saw (from x-forwarded-client-cert),
a whole trace as the sidecars exported it (OTLP spans into the control
server's embedded receiver, shown with ``pillion traces``), and the proxies'
sync state; on exit every process is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from control.ca_service import issue_workload_token
from control.demo import free_ports
from control.demoapp import call_upstream

HTTP = 9080  # every service's port
APP = 8000  # + the workload's index: each app listens on 127.0.0.1:80xx (Istio's defaultEndpoint rule)


@dataclass(frozen=True)
class Workload:
    name: str  # the Kubernetes-ish workload name
    app: str
    version: str
    index: int  # picks the loopback addresses
    calls: tuple[str, ...] = ()  # services this app calls
    fail_every: int = 0  # the app answers 503 to every Nth request (retries recover them)

    @property
    def pod_ip(self) -> str:
        return f"127.0.1.{self.index}"

    @property
    def egress_ip(self) -> str:
        return f"127.0.2.{self.index}"

    @property
    def app_port(self) -> int:
        return APP + self.index

    @property
    def service_account(self) -> str:
        return f"bookinfo-{self.app}"


WORKLOADS = (
    Workload("productpage-v1", "productpage", "v1", 10, ("details", "reviews")),
    Workload("details-v1", "details", "v1", 11),
    Workload("reviews-v1", "reviews", "v1", 12),
    Workload("reviews-v2", "reviews", "v2", 13, ("ratings",)),
    Workload("reviews-v3", "reviews", "v3", 14, ("ratings",)),
    Workload("ratings-v1", "ratings", "v1", 15, fail_every=5),
)
SERVICES = ("productpage", "details", "reviews", "ratings")


def tracing_yaml(otlp_port: int) -> str:
    """Spans from every sidecar to the control server's embedded OTLP receiver (Jaeger in compose)."""
    return f"""apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: otel-collector, namespace: istio-system}}
spec:
  hosts: [otel-collector.istio-system.svc.cluster.local]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: {otlp_port}, name: grpc-otlp, protocol: GRPC}}]
  endpoints: [{{address: 127.0.0.1}}]
---
kind: MeshConfig
spec:
  defaultConfig: {{tracing: {{sampling: 100}}}}
  extensionProviders:
  - name: otel
    opentelemetry: {{service: otel-collector.istio-system.svc.cluster.local, port: {otlp_port}}}
  defaultProviders: {{tracing: [otel]}}
"""


def mesh_yaml() -> str:
    docs = []
    for svc in SERVICES:
        docs.append(f"""apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: {svc}, namespace: default}}
spec:
  hosts: [{svc}.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: {HTTP}, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {{app: {svc}}}}}
""")
    for w in WORKLOADS:
        docs.append(f"""apiVersion: networking.istio.io/v1beta1
kind: WorkloadEntry
metadata: {{name: {w.name}, namespace: default}}
spec:
  address: {w.pod_ip}
  labels: {{app: {w.app}, version: {w.version}, security.istio.io/tlsMode: istio}}
  serviceAccount: {w.service_account}
""")
        docs.append(f"""apiVersion: networking.istio.io/v1beta1
kind: Sidecar
metadata: {{name: {w.name}, namespace: default}}
spec:
  workloadSelector: {{labels: {{app: {w.app}, version: {w.version}}}}}
  ingress:
  - port: {{number: {HTTP}, protocol: HTTP, name: http}}
    bind: {w.pod_ip}
    defaultEndpoint: 127.0.0.1:{w.app_port}
  egress:
  - port: {{number: {HTTP}, protocol: HTTP, name: http}}
    bind: {w.egress_ip}
    captureMode: NONE
    hosts: ["./*"]
""")
    docs.append("""apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 50
    - destination: {host: reviews, subset: v3}
      weight: 50
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: ratings, namespace: default}
spec:
  hosts: [ratings]
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    fault:
      abort: {percentage: {value: 10}, httpStatus: 503}
      delay: {percentage: {value: 50}, fixedDelay: 100ms}
    route:
    - destination: {host: ratings}
    retries: {attempts: 3, retryOn: 5xx}
  - route:
    - destination: {host: ratings}
    retries: {attempts: 3, retryOn: 5xx}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: productpage, namespace: default}
spec:
  selector: {matchLabels: {app: productpage}}
  mtls: {mode: PERMISSIVE}
""")
    return "---\n".join(docs)


class Procs:
    """Every child process of the demo, each in its own process group; all stopped on exit."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, asyncio.subprocess.Process]] = []

    async def start(self, name: str, *argv: str) -> asyncio.subprocess.Process:
        log = (self.logs / f"{name}.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=log, stderr=log, env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        return proc

    async def stop(self) -> dict[str, int]:
        for _, p in self.procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        codes = {}
        for name, p in self.procs:
            try:
                codes[name] = await asyncio.wait_for(p.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                codes[name] = await p.wait()
        return codes


async def _wait_ready(port: int, what: str, deadline: float, procs: Procs) -> None:
    while time.monotonic() < deadline:
        r = await call_upstream(f"127.0.0.1:{port}/admin/ready", {}, timeout=1)
        if r.get("status") == 200:
            return
        for name, p in procs.procs:
            if p.returncode is not None:
                raise RuntimeError(f"{name} exited ({p.returncode}); see {procs.logs / (name + '.log')}")
        await asyncio.sleep(0.1)  # a user-facing wait with a deadline
    raise TimeoutError(f"{what} not ready; logs in {procs.logs}")


def _say(text: str = "") -> None:
    print(text, flush=True)


def _calls(doc: dict[str, object]) -> list[dict[str, object]]:
    calls = doc.get("calls")
    return [c for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []


def _versions(doc: dict[str, object]) -> str:
    for call in _calls(doc):
        if call.get("service") == "reviews":
            if call.get("status") != 200:
                return f"HTTP {call.get('status')} {call.get('flags', '')}".strip()
            return str(call.get("version"))
    return "?"


async def run_mesh_demo(duration: float, keep: bool) -> int:
    work = Path(tempfile.mkdtemp(prefix="pillion-mesh-"))
    cfg, state, logs = work / "mesh", work / "ca", work / "logs"
    for d in (cfg, logs):
        d.mkdir()
    xds, debug, otlp = free_ports(3)
    (cfg / "mesh.yaml").write_text(mesh_yaml())
    (cfg / "tracing.yaml").write_text(tracing_yaml(otlp))
    procs = Procs(logs)
    stop = asyncio.Event()  # Ctrl-C or SIGTERM: finish the current request, print, stop everything
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    py = sys.executable
    _say("== Pillion demo mesh: bookinfo as processes on loopback")
    _say(f"   config {cfg}/mesh.yaml; logs {logs}")
    try:
        await procs.start("control", py, "-m", "proxy", "control", "--config-dir", str(cfg), "--xds-port", str(xds),
                          "--debug-port", str(debug), "--ca-state-dir", str(state), "--otlp-port", str(otlp),
                          "--log-level", "warning")
        deadline = time.monotonic() + 60
        await _wait_ready_debug(debug, deadline, procs)
        _say(f"   control server: xDS + CA on 127.0.0.1:{xds}, status on 127.0.0.1:{debug}")
        admin_ports = dict(zip((w.name for w in WORKLOADS), free_ports(len(WORKLOADS)), strict=True))
        for w in WORKLOADS:
            token = work / f"{w.name}.token"
            token.write_text(issue_workload_token(str(state), "default", w.service_account, 24))
            token.chmod(0o600)
            await procs.start(f"sidecar-{w.name}", py, "-m", "proxy", "proxy", "--xds", f"127.0.0.1:{xds}",
                              "--token-file", str(token), "--labels", f"app={w.app},version={w.version}",
                              "--name", w.name, "--service-account", w.service_account, "--instance-ip", w.pod_ip,
                              "--admin-port", str(admin_ports[w.name]), "--log-level", "warning")
            calls = [a for svc in w.calls for a in ("--call", f"{w.egress_ip}:{HTTP}/{svc}/{svc}")]
            flaky = ["--fail-every", str(w.fail_every)] if w.fail_every else []
            await procs.start(f"app-{w.name}", py, "-m", "control.demoapp", "--name", w.app, "--version",
                              w.version, "--host", "127.0.0.1", "--port", str(w.app_port), *calls, *flaky)
        for w in WORKLOADS:
            await _wait_ready(admin_ports[w.name], f"sidecar {w.name}", deadline, procs)
        _say(f"   {len(WORKLOADS)} apps, {len(WORKLOADS)} sidecars: certificates issued, config synced, ready\n")
        await _drive(duration, stop, admin_ports)
        if stop.is_set():
            _say("\n-- interrupted")
            return 130
        _say("\n-- the same kind of request as the mesh traced it (pillion traces: OTLP spans from every sidecar)")
        out = b""
        deadline = time.monotonic() + 5  # spans are exported in batches: wait for a whole trace
        await _jason_ok(f"{WORKLOADS[0].pod_ip}:{HTTP}/productpage/productpage")
        while time.monotonic() < deadline:
            traces = await asyncio.create_subprocess_exec(
                py, "-m", "proxy", "traces", "--server", f"127.0.0.1:{debug}", "--limit", "1",
                stdout=asyncio.subprocess.PIPE)
            out, _ = await traces.communicate()
            if out.count(b"SERVER") >= 4:  # productpage, details, reviews, ratings
                break
            await asyncio.sleep(0.25)  # a user-facing wait with a deadline
        for line in out.decode().splitlines():
            _say("   " + line)
        _say("\n-- proxy status (pillion control status)")
        status = await asyncio.create_subprocess_exec(py, "-m", "proxy", "control", "status", "--server",
                                                      f"127.0.0.1:{debug}", stdout=asyncio.subprocess.PIPE)
        out, _ = await status.communicate()
        for line in out.decode().splitlines():
            _say("   " + line)
    finally:
        codes = await procs.stop()
        bad = {n: c for n, c in codes.items() if c not in (0, -signal.SIGTERM)}
        _say(f"\n-- stopped {len(codes)} processes" + (f" (non-zero exits: {bad})" if bad else ", all cleanly"))
        if not keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    return 0


async def _wait_ready_debug(port: int, deadline: float, procs: Procs) -> None:
    while time.monotonic() < deadline:
        r = await call_upstream(f"127.0.0.1:{port}/debug/ready", {}, timeout=1)
        if r.get("status") == 200:
            return
        for name, p in procs.procs:
            if p.returncode is not None:
                raise RuntimeError(f"{name} exited ({p.returncode}); see {procs.logs / (name + '.log')}")
        await asyncio.sleep(0.1)  # a user-facing wait with a deadline
    raise TimeoutError("control server not ready")


async def _drive(duration: float, stop: asyncio.Event, admin_ports: dict[str, int]) -> None:
    entry = WORKLOADS[0]  # productpage: the user calls its sidecar's (PERMISSIVE) port in plaintext
    target = f"{entry.pod_ip}:{HTTP}/productpage/productpage"
    seen: Counter[str] = Counter()
    ratings: Counter[str] = Counter()  # what reviews got from ratings, per user
    hops: dict[str, str] = {}
    end = time.monotonic() + max(duration, 0.0)
    n = 0
    last_print = 0.0
    while (n < 40 or time.monotonic() < end) and not stop.is_set():
        user = "jason" if n % 4 == 0 else "alice"
        doc = await call_upstream(target, {"end-user": user})
        seen[f"{user:<6} -> reviews {_versions(doc)}"] += 1
        _record_hops(doc, hops)
        for call in _calls(doc):
            for sub in _calls(call):
                if sub.get("service") == "ratings":
                    flags = sub.get("flags")
                    ratings[f"{user:<6} <- ratings HTTP {sub.get('status')}" + (f" ({flags})" if flags else "")] += 1
        n += 1
        now = time.monotonic()
        if duration > 0 and now - last_print >= 1.0:
            last_print = now
            _say(f"   ... {n} requests: " + ", ".join(f"{k}: {v}" for k, v in sorted(seen.items())))
    _say("-- traffic: who answered (VirtualService: jason -> v2, others 50/50 v1/v3)")
    for k, v in sorted(seen.items()):
        _say(f"   {k}: {v}")
    _say("\n-- faults and retries on ratings (VirtualService ratings: 10% of jason's calls aborted with 503,")
    _say("   half delayed 100 ms; the ratings app itself fails every 5th call; retries: 3 attempts on 5xx)")
    for k, v in sorted(ratings.items()):
        _say(f"   {k}: {v}")
    totals = await _ratings_counters(admin_ports)
    _say("   sidecars' counters for ratings: " + ", ".join(f"{k} {int(v)}" for k, v in totals.items()))
    _say("\n-- mutual TLS: the caller identity each service saw (x-forwarded-client-cert)")
    for callee, caller in sorted(hops.items()):
        _say(f"   {callee:<12} <- {caller or 'plaintext (the demo user, PERMISSIVE port)'}")
    sample = await _jason_ok(target)
    _say("\n-- one request's call tree")
    _tree(sample, "   ")


_COUNTERS = {
    "envoy_cluster_upstream_rq_retry": "retries",
    "envoy_cluster_upstream_rq_retry_success": "retries that succeeded",
    "envoy_cluster_fault_aborts_injected": "aborts injected",
    "envoy_cluster_fault_delays_injected": "delays injected",
}


async def _ratings_counters(admin_ports: dict[str, int]) -> dict[str, float]:
    """The retry and fault counters of every sidecar's ratings clusters (from /stats/prometheus)."""
    totals = dict.fromkeys(_COUNTERS.values(), 0.0)
    for port in admin_ports.values():
        text = await _admin_text(port, "/stats/prometheus")
        for line in text.splitlines():
            name = line.split("{", 1)[0]
            if name in _COUNTERS and "ratings" in line:
                totals[_COUNTERS[name]] += float(line.rsplit(" ", 1)[1])
    return totals


async def _admin_text(port: int, path: str) -> str:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
        writer.write(f"GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    except (OSError, TimeoutError):
        return ""
    return raw.partition(b"\r\n\r\n")[2].decode(errors="replace")


async def _jason_ok(target: str) -> dict[str, object]:
    """A request of jason's that the fault did not abort (the sample shows the whole call tree)."""
    doc: dict[str, object] = {}
    for _ in range(10):
        doc = await call_upstream(target, {"end-user": "jason"})
        if doc.get("status") == 200:
            break
    return doc


def _record_hops(doc: dict[str, object], hops: dict[str, str]) -> None:
    if doc.get("status") == 200 and "service" in doc:
        hops.setdefault(str(doc["service"]), str(doc.get("peer", "")))
    for call in _calls(doc):
        _record_hops(call, hops)


def _tree(doc: dict[str, object], indent: str) -> None:
    headers = doc.get("headers")
    rid = headers.get("x-request-id", "") if isinstance(headers, dict) else ""
    _say(f"{indent}{doc.get('service')} {doc.get('version', '')} HTTP {doc.get('status')} x-request-id={rid}")
    for call in _calls(doc):
        _tree(call, indent + "   ")


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="pillion demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=0.0, help="keep driving traffic for this many seconds")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (config, logs)")
    args = ap.parse_args(argv)
    import uvloop

    try:
        return int(uvloop.run(run_mesh_demo(args.duration, args.keep)))
    except KeyboardInterrupt:
        return 130
