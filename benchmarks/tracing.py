"""What tracing costs: requests/s with tracing off, at 1% and at 100% sampling, Pillion and Envoy.

    python -m benchmarks.tracing [--quick] [--rounds N] [--out benchmarks/results] [--targets pillion,envoy]

Each proxy is started once per mode on the macro benchmark's config (one sidecar, one
HTTP egress port, the same upstream app): without tracing ("off"), and with MeshConfig
tracing to an OTLP/gRPC collector at 0% (ids made and propagated, nothing sampled), 1%
and 100% random sampling. The collector (``benchmarks.collector``) is a real gRPC
server on the load generator's core that counts the spans it is sent, so spans are
really encoded and exported. ``wrk -t1 -c32`` drives keep-alive HTTP/1.1 after a
warm-up, pinned as in ``benchmarks.macro``. The report is each proxy's requests/s in
each mode relative to its own tracing-off run, the proxy's and the upstream's CPU time
per request (steadier than requests/s when the machine drifts), and the collector's span
count (proof that export happened). With ``--rounds N`` every mode runs N times,
each round starting at a different mode, and the median is reported, together with the
median (and range) of each round's own ratio to that round's "off" run, which cancels
the machine's drift between rounds. "off again" is a control, tracing off in a second
process: its ratio is the noise floor, what two identical runs differ by here. Issue
targets: 1% sampling costs Pillion < 5%, 100% costs < 25%.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.config import BenchPorts, write_config_dir
from benchmarks.envoy_config import BootstrapUnavailable, build_bootstrap
from benchmarks.macro import Plan, ScenarioError, run_wrk, say
from benchmarks.procs import Child, Pinning, StartError, TreeMeter, free_port
from benchmarks.targets import (
    PYTHON,
    READY_TIMEOUT,
    REPO_ROOT,
    _await_target,
    _start_envoy_with,
    pillion_command,
    start_upstreams,
)

COLLECTOR = "otel-collector.default.svc.cluster.local"
# 0%: context propagated, nothing sampled. "off again" is a control: tracing off in another process, so
# its ratio to "off" shows how far two identical runs differ on this machine (the noise floor).
MODES = {"off": None, "off again": None, "0%": 0.0, "1%": 1.0, "100%": 100.0}


def tracing_yaml(collector_port: int, sampling: float) -> str:
    return f"""---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: otel-collector, namespace: default}}
spec:
  hosts: [{COLLECTOR}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 4317, name: grpc-otlp, protocol: GRPC}}]
  endpoints: [{{address: 127.0.0.1, ports: {{grpc-otlp: {collector_port}}}}}]
---
kind: MeshConfig
spec:
  defaultConfig: {{tracing: {{sampling: {sampling}}}}}
  extensionProviders:
  - name: otel
    opentelemetry: {{service: {COLLECTOR}, port: 4317}}
  defaultProviders: {{tracing: [otel]}}
"""


def start_collector(pinning: Pinning, logs: Path) -> tuple[Child, int, int]:
    """The OTLP receiver on the load core; prints READY <port> <status port>."""
    child = Child("collector", pinning.load([PYTHON, "-m", "benchmarks.collector"]), logs / "collector.log",
                  capture_stdout=True, cwd=REPO_ROOT)
    try:
        ports = child.read_line("READY", READY_TIMEOUT).split()
    except BaseException:
        child.stop()
        raise
    return child, int(ports[0]), int(ports[1])


def spans_received(status_port: int) -> int:
    from benchmarks.procs import http_get

    status, body = http_get(status_port, "/", "collector")
    return int(json.loads(body)["spans"]) if status == 200 else -1


def run_one(proxy: str, mode: str, plan: Plan, pinning: Pinning, workdir: Path, logs: Path, out: Path,
            ports: BenchPorts, collector_port: int, upstream: TreeMeter) -> dict[str, Any]:
    config_dir = write_config_dir(workdir, ports)
    sampling = MODES[mode]
    if sampling is not None:
        (config_dir / "tracing.yaml").write_text(tracing_yaml(collector_port, sampling))
    admin = free_port()
    if proxy == "pillion":
        child = Child(f"pillion-{mode}", pinning.sut(pillion_command(config_dir, admin)),
                      logs / f"pillion-{mode.strip('%').replace(' ', '-')}.log", cwd=REPO_ROOT)
        try:
            _await_target(child, admin, ports)
        except BaseException:
            child.stop()
            raise
        stop, meter = child.stop, TreeMeter(child.pid)
    else:
        bootstrap, _source = build_bootstrap("translate", config_dir, ports, admin)
        target = _start_envoy_with(pinning, workdir, logs, ports, admin, bootstrap, "translate", out)
        assert target.meter is not None
        stop, meter = target.stop, target.meter
    try:
        say(f"{proxy} tracing {mode}: warm-up, then wrk {plan.wrk_s}s")
        run_wrk(pinning, ports.http_listen, plan.wrk_warmup_s, plan.wrk_connections)
        cpu, up = meter.cpu_seconds(), upstream.cpu_seconds()
        wrk = run_wrk(pinning, ports.http_listen, plan.wrk_s, plan.wrk_connections)
        if wrk.get("requests"):  # CPU per request: steadier than req/s when runs drift
            wrk["proxy_cpu_us_per_req"] = (meter.cpu_seconds() - cpu) * 1e6 / wrk["requests"]
            wrk["upstream_cpu_us_per_req"] = (upstream.cpu_seconds() - up) * 1e6 / wrk["requests"]
        return wrk
    finally:
        stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tracing", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--targets", default="pillion,envoy")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat every mode this many times, interleaved, and report the median (runs drift)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    plan = Plan.make(args.quick)
    pinning = Pinning(True)
    if pinning.enabled:
        os.sched_setaffinity(0, {pinning.load_core})
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="pillion-tracing-") as tmp:
        upstreams = start_upstreams(pinning, logs)
        upstream_meter = TreeMeter(upstreams.http.pid)
        collector, collector_port, status_port = start_collector(pinning, logs)
        try:
            runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
            proxies = [t.strip() for t in args.targets.split(",") if t.strip()]
            for rnd in range(args.rounds):
                # Each round starts at a different mode (and alternates the proxies), so a drift
                # of the machine over a round does not always fall on the same mode.
                modes = list(MODES)[rnd % len(MODES):] + list(MODES)[:rnd % len(MODES)]
                for proxy in proxies if rnd % 2 == 0 else proxies[::-1]:
                    for mode in modes:
                        http_port = free_port()
                        tcp_port = free_port()
                        while tcp_port == http_port:  # free_port can hand out the same port twice
                            tcp_port = free_port()
                        ports = BenchPorts(http_port, tcp_port, upstreams.http_port, upstreams.tcp_port)
                        before = spans_received(status_port)
                        workdir = Path(tmp) / f"{proxy}-{mode.strip('%').replace(' ', '-')}-{rnd}"
                        try:
                            wrk = run_one(proxy, mode, plan, pinning, workdir, logs, args.out, ports,
                                          collector_port, upstream_meter)
                        except (StartError, ScenarioError, BootstrapUnavailable, OSError) as exc:
                            say(f"{proxy} tracing {mode}: {exc}")
                            wrk = {"error": str(exc).splitlines()[0]}
                        else:
                            wrk["spans_exported"] = spans_received(status_port) - before
                        runs.setdefault(proxy, {}).setdefault(mode, []).append(wrk)
            for proxy, per_mode in runs.items():
                results[proxy] = {}
                for mode, got in per_mode.items():
                    ok = sorted((r for r in got if "requests_per_s" in r), key=lambda r: r["requests_per_s"])
                    if not ok:
                        results[proxy][mode] = got[-1]
                        continue
                    results[proxy][mode] = {**ok[len(ok) // 2], "rounds": [r["requests_per_s"] for r in got]}
                    for key in ("proxy_cpu_us_per_req", "upstream_cpu_us_per_req"):  # their own medians
                        values = sorted(r[key] for r in ok if key in r)
                        if values:
                            results[proxy][mode][key] = values[len(values) // 2]
                for mode, got in per_mode.items():  # each round's ratio to that round's "off": drift cancels
                    paired = sorted(g["requests_per_s"] / o["requests_per_s"]
                                    for g, o in zip(got, per_mode.get("off", []), strict=False)
                                    if g.get("requests_per_s") and o.get("requests_per_s"))
                    if paired and "requests_per_s" in results[proxy][mode]:
                        results[proxy][mode]["paired_ratios"] = paired
        finally:
            collector.stop()
            upstreams.stop()
    print(f"{'proxy':<8} {'tracing':<10} {'req/s':>10} {'vs off':>8} {'paired (min..max)':>20} "
          f"{'proxy CPU us/req':>17} {'upstream us/req':>16} {'spans at collector':>20}")
    for proxy, modes in results.items():
        off = modes.get("off", {}).get("requests_per_s")
        for mode, r in modes.items():
            rps = r.get("requests_per_s")
            if rps is None:
                print(f"{proxy:<8} {mode:<10} {'error':>10}  {r.get('error', '')}")
                continue
            ratio = f"{rps / off:.3f}" if off else "-"
            pr = r.get("paired_ratios") or []
            paired = f"{pr[len(pr) // 2]:.3f} ({pr[0]:.3f}..{pr[-1]:.3f})" if pr else "-"
            print(f"{proxy:<8} {mode:<10} {rps:>10.0f} {ratio:>8} {paired:>20} "
                  f"{r.get('proxy_cpu_us_per_req', 0):>17.2f} {r.get('upstream_cpu_us_per_req', 0):>16.2f} "
                  f"{r.get('spans_exported', 0):>20}")
    (args.out / "results-tracing.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
