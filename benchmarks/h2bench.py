"""HTTP/2 and gRPC-shaped load, side by side: direct vs Pillion vs Envoy (h2load).

    python -m benchmarks.h2bench [--quick] [--no-pin] [--targets direct,pillion,envoy]

Same setup as ``benchmarks.macro`` (same upstream app, same Istio YAML, same
pinning: the SUT core runs the app and the proxy, the other core h2load).
Clients speak HTTP/2 with prior knowledge (h2c) to the proxies' HTTP listener,
which hands requests to the HTTP/1.1 upstream app; ``direct`` runs the same
h2load with ``--h1`` (the app speaks only HTTP/1.1), as the baseline.

Scenarios (each after a short unmeasured warm-up):

- ``h2_get``: GETs, 8 connections x 16 concurrent streams.
- ``grpc_unary``: gRPC-framed unary POSTs (``content-type: application/grpc``,
  ``te: trailers``, a 5-byte frame header + 64-byte message), 4 connections x 64
  concurrent streams: the downstream gRPC request path with many streams per connection.

- ``grpc_h2up``: the same gRPC-framed unary POSTs (4 x 64), but to a GRPC port
  whose upstream speaks HTTP/2 (``benchmarks.upstream_h2``: h2c, answers HEADERS,
  DATA, trailers ``grpc-status: 0``, on the SUT core): the sidecar-to-sidecar and
  proxy-to-gRPC-app path (HTTP/2 on both sides). It has its own Istio YAML (one GRPC
  egress port) and its own proxy processes; ``direct`` is h2load over h2c to the app.

Prints requests/s, mean latency per target, the ratios to Envoy, and what the
proxy adds over direct. ``--scenarios`` picks a subset (default: all three).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.config import SERVICE_HOST
from benchmarks.envoy_config import BootstrapUnavailable, translated_bootstrap
from benchmarks.procs import Child, Pinning, StartError, free_port, wait_http_ok, wait_tcp_open
from benchmarks.targets import (
    PYTHON,
    READY_TIMEOUT,
    REPO_ROOT,
    Target,
    direct,
    envoy_binary,
    pillion_command,
    start_envoy,
    start_pillion,
    start_upstreams,
)

_RPS = re.compile(r"finished in [\d.]+\w+, ([\d.]+) req/s")
_DONE = re.compile(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored")
_TIME = re.compile(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)")
_US = {"us": 1.0, "ms": 1e3, "s": 1e6}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def h2load(pinning: Pinning, port: int, seconds: float, conns: int, streams: int, h1: bool,
           body: Path | None = None) -> dict[str, Any]:
    argv = ["h2load", "-t1", f"-c{conns}", f"-m{1 if h1 else streams}", f"-D{int(seconds)}",
            "-H", f"host: {SERVICE_HOST}" if h1 else f":authority: {SERVICE_HOST}"]
    if h1:
        argv.append("--h1")
    if body is not None:
        argv += ["-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers"]
    argv.append(f"http://127.0.0.1:{port}/bench.Svc/Unary" if body else f"http://127.0.0.1:{port}/")
    done = subprocess.run(pinning.load(argv), capture_output=True, text=True, timeout=seconds + 30, check=False)
    out = done.stdout
    rps, counts, times = _RPS.search(out), _DONE.search(out), _TIME.search(out)
    if not rps or not counts or not times:
        return {"error": f"h2load: {out.strip()[-300:]} {done.stderr.strip()[-200:]}"}
    result: dict[str, Any] = {
        "requests_per_s": float(rps.group(1)), "done": int(counts.group(1)), "failed": int(counts.group(3)),
        "max_us": float(times.group(3)) * _US[times.group(4)],
        "mean_us": float(times.group(5)) * _US[times.group(6)],
        "status": out[out.find("status codes:"):].splitlines()[0] if "status codes:" in out else "",
    }
    if result["failed"] > result["done"] * 0.001:
        result["error"] = f"{result['failed']} of {result['done']} failed"
    return result


def measure(target: Target, pinning: Pinning, seconds: float, body: Path) -> dict[str, Any]:
    h1 = target.name == "direct"
    h2load(pinning, target.http_port, 2, 8, 16, h1)  # warm-up
    return {
        "h2_get": h2load(pinning, target.http_port, seconds, 8, 16, h1),
        "grpc_unary": h2load(pinning, target.http_port, seconds, 4, 64, h1, body),
    }


H2UP_YAML = """\
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: upstream, namespace: default}}
spec:
  hosts: [{host}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: {listen}, name: grpc, protocol: GRPC}}]
  endpoints: [{{address: 127.0.0.1, ports: {{grpc: {upstream}}}}}]
---
apiVersion: networking.istio.io/v1beta1
kind: Sidecar
metadata: {{name: bench, namespace: default}}
spec:
  workloadSelector: {{labels: {{app: bench}}}}
  egress:
  - port: {{number: {listen}, protocol: GRPC, name: grpc}}
    bind: 127.0.0.1
    captureMode: NONE
    hosts: ["./*"]
"""


def start_h2_upstream(pinning: Pinning, logs: Path) -> tuple[Child, int]:
    child = Child("upstream-h2", pinning.sut([PYTHON, "-m", "benchmarks.upstream_h2", "--port", "0"]),
                  logs / "upstream-h2.log", capture_stdout=True, cwd=REPO_ROOT)
    try:
        return child, int(child.read_line("READY", READY_TIMEOUT))
    except BaseException:
        child.stop()
        raise


def start_h2up_proxy(name: str, pinning: Pinning, workdir: Path, logs: Path, up_port: int) -> tuple[Child, int]:
    """Pillion or Envoy with one GRPC egress port whose endpoint is the HTTP/2 app; (child, listen port)."""
    listen, admin = free_port(), free_port()
    config_dir = workdir / "h2up"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "bench.yaml").write_text(H2UP_YAML.format(host=SERVICE_HOST, listen=listen, upstream=up_port))
    if name == "pillion":
        child = Child("pillion-h2up", pinning.sut(pillion_command(config_dir, admin)), logs / "pillion-h2up.log",
                      cwd=REPO_ROOT)
    else:
        try:
            bootstrap = translated_bootstrap(config_dir, admin)
        except BootstrapUnavailable as exc:
            raise StartError(str(exc)) from exc
        path = workdir / "envoy-h2up.json"
        path.write_text(json.dumps(bootstrap, indent=2))
        child = Child("envoy-h2up", pinning.sut([envoy_binary(), "-c", str(path), "--concurrency", "1",
                                                 "--disable-hot-restart", "-l", "warning",
                                                 "--base-id", str(random.randint(1000, 1_000_000))]),
                      logs / "envoy-h2up.log")
    try:
        wait_http_ok(admin, "/ready", READY_TIMEOUT, child)
        wait_tcp_open(listen, READY_TIMEOUT, child)
    except BaseException:
        child.stop()
        raise
    return child, listen


def measure_h2up(name: str, pinning: Pinning, workdir: Path, logs: Path, up_port: int, seconds: float,
                 body: Path) -> dict[str, Any]:
    child = None
    port = up_port
    if name != "direct":
        child, port = start_h2up_proxy(name, pinning, workdir, logs, up_port)
    try:
        h2load(pinning, port, 2, 4, 64, False, body)  # warm-up
        return h2load(pinning, port, seconds, 4, 64, False, body)
    finally:
        if child is not None:
            child.stop()


SCENARIOS = ("h2_get", "grpc_unary", "grpc_h2up")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.h2bench")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--targets", default="direct,pillion,envoy")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="a subset of " + ",".join(SCENARIOS))
    ap.add_argument("--envoy-config", default="auto", choices=("auto", "translate", "fallback"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    seconds = 5.0 if args.quick else 15.0
    pinning = Pinning(not args.no_pin)
    if pinning.enabled:
        os.sched_setaffinity(0, {pinning.load_core})
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pillion-h2bench-") as tmp:
        body = Path(tmp) / "grpc-frame.bin"
        body.write_bytes(b"\x00" + (64).to_bytes(4, "big") + b"m" * 64)
        scenarios = [sc for sc in SCENARIOS if sc in args.scenarios.split(",")]
        targets = args.targets.split(",")
        for name in targets:
            results[name] = {}
        if "h2_get" in scenarios or "grpc_unary" in scenarios:
            run_h1_upstream(args, pinning, logs, Path(tmp), body, targets, results)
        if "grpc_h2up" in scenarios:
            h2up, up_port = start_h2_upstream(pinning, logs)
            try:
                for name in targets:
                    workdir = Path(tmp) / f"{name}-h2up"
                    workdir.mkdir()
                    say(f"{name}: grpc_h2up")
                    try:
                        results[name]["grpc_h2up"] = measure_h2up(name, pinning, workdir, logs, up_port, seconds,
                                                                   body)
                    except (StartError, OSError) as exc:
                        results[name]["grpc_h2up"] = {"error": str(exc).splitlines()[0]}
                    say(f"{name}: {json.dumps(results[name]['grpc_h2up'])}")
            finally:
                h2up.stop()
    (args.out / "h2bench.json").write_text(json.dumps(results, indent=2) + "\n")
    report(results, scenarios)
    return 0


def run_h1_upstream(args: argparse.Namespace, pinning: Pinning, logs: Path, tmp: Path, body: Path,
                    targets: list[str], results: dict[str, Any]) -> None:
    """The two scenarios whose upstream is the HTTP/1.1 app (``benchmarks.macro``'s setup)."""
    seconds = 5.0 if args.quick else 15.0
    ups = start_upstreams(pinning, logs)
    try:
        for name in targets:
            workdir = tmp / name
            workdir.mkdir()
            say(f"{name}: starting")
            try:
                if name == "direct":
                    target = direct(ups)
                elif name == "pillion":
                    target = start_pillion(pinning, workdir, logs, ups)
                else:
                    target = start_envoy(pinning, workdir, logs, ups, args.envoy_config, args.out)
            except (StartError, OSError) as exc:
                results[name] = {"error": str(exc).splitlines()[0]}
                continue
            try:
                results[name].update(measure(target, pinning, seconds, body))
            finally:
                target.stop()
            say(f"{name}: {json.dumps(results[name])}")
    finally:
        ups.stop()


def report(results: dict[str, Any], scenarios: list[str]) -> None:
    print(f"{'scenario':<12} {'target':<8} {'req/s':>10} {'mean ms':>9} {'vs envoy':>9} {'added ms':>9}")
    for sc in scenarios:
        env = results.get("envoy", {}).get(sc, {})
        base = results.get("direct", {}).get(sc, {})
        for name, res in results.items():
            r = res.get(sc, {})
            if "requests_per_s" not in r:
                print(f"{sc:<12} {name:<8} {'-':>10}  {r.get('error', res.get('error', ''))[:60]}")
                continue
            ratio = r["requests_per_s"] / env["requests_per_s"] if env.get("requests_per_s") else float("nan")
            added = (r["mean_us"] - base["mean_us"]) / 1e3 if base.get("mean_us") else float("nan")
            print(f"{sc:<12} {name:<8} {r['requests_per_s']:>10.0f} {r['mean_us'] / 1e3:>9.2f} "
                  f"{ratio:>9.2f} {added:>9.2f}")


if __name__ == "__main__":
    sys.exit(main())
