"""Macro benchmark: direct vs Pillion vs Envoy on loopback, in one run, one command.

    python -m benchmarks.macro [--quick] [--out benchmarks/results]

Strategy: the upstream apps and the proxy under test share one core, the load
generators (wrk and ``benchmarks.loadgen``) get the other, and this harness sits on
the load core too. Targets run one after another against the same upstream apps, each
through the same scenarios:

1. ``wrk -t1 -c32`` on keep-alive HTTP/1.1 (after a short unmeasured warm-up): req/s,
   and the proxy's CPU seconds over that run per 1000 requests.
2. Open-loop GETs at a fixed moderate rate: p50/p99 latency; "added" = target - direct.
3. TCP ping-pong (100 bytes, 16 connections): round trips/s; and TCP bulk download on
   one connection: MB/s.

Peak RSS is sampled through all scenarios, idle RSS once right after the target is
ready. Results go to ``results.json`` and ``results.png`` in ``--out``, child logs to
``--out/logs``. Every child is stopped on the way out, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from benchmarks.config import SERVICE_HOST
from benchmarks.envoy_config import BootstrapUnavailable
from benchmarks.procs import Pinning, StartError, TreeMeter
from benchmarks.report import TARGETS, format_table, summarize, write_chart
from benchmarks.targets import (
    PYTHON,
    REPO_ROOT,
    Target,
    Upstreams,
    direct,
    envoy_binary,
    start_envoy,
    start_pillion,
    start_upstreams,
)

GRACE = 20.0  # seconds a load generator may overrun its duration before it is killed


@dataclass(frozen=True, slots=True)
class Plan:
    """Durations and shapes of every scenario; ``--quick`` shortens the durations only."""

    wrk_warmup_s: float
    wrk_s: int
    wrk_connections: int
    latency_rate: float
    latency_s: float
    latency_warmup_s: float
    latency_connections: int
    pingpong_s: float
    pingpong_connections: int
    pingpong_bytes: int
    bulk_s: float
    tcp_warmup_s: float

    @classmethod
    def make(cls, quick: bool) -> Plan:
        return cls(
            wrk_warmup_s=1 if quick else 2,
            wrk_s=3 if quick else 10,
            wrk_connections=32,
            latency_rate=1000.0,
            latency_s=3.0 if quick else 10.0,
            latency_warmup_s=0.5 if quick else 1.0,
            latency_connections=8,
            pingpong_s=2.0 if quick else 5.0,
            pingpong_connections=16,
            pingpong_bytes=100,
            bulk_s=2.0 if quick else 5.0,
            tcp_warmup_s=0.5,
        )


class ScenarioError(Exception):
    """A load generator failed or reported errors; the scenario has no number."""


def say(message: str) -> None:
    sys.stderr.write(f"[macro] {message}\n")
    sys.stderr.flush()


# --- load generators ----------------------------------------------------------------------

_WRK_RPS = re.compile(r"Requests/sec:\s*([\d.]+)")
_WRK_TOTAL = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m)")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s*(\d+)")
_WRK_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_WRK_PCT = re.compile(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_TO_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6}


def parse_wrk(text: str) -> dict[str, Any]:
    rps = _WRK_RPS.search(text)
    total = _WRK_TOTAL.search(text)
    if not rps or not total:
        raise ScenarioError(f"could not parse wrk output: {text.strip()[-300:]!r}")
    result: dict[str, Any] = {
        "requests": int(total.group(1)),
        "seconds": float(total.group(2)) * _TO_US[total.group(3)] / 1e6,
        "requests_per_s": float(rps.group(1)),
        "non_2xx": int(m.group(1)) if (m := _WRK_NON2XX.search(text)) else 0,
        "socket_errors": sum(map(int, m.groups())) if (m := _WRK_SOCKET.search(text)) else 0,
    }
    for pct, value, unit in _WRK_PCT.findall(text):
        result[f"closed_loop_p{pct}_us"] = float(value) * _TO_US[unit]
    return result


def run_wrk(pinning: Pinning, port: int, seconds: float, connections: int) -> dict[str, Any]:
    argv = pinning.load(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
                         "-H", f"Host: {SERVICE_HOST}", f"http://127.0.0.1:{port}/"])
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + GRACE,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise ScenarioError(f"wrk ran past {seconds + GRACE:.0f}s") from exc
    if done.returncode != 0:
        raise ScenarioError(f"wrk exited {done.returncode}: {done.stderr.strip()[-300:]}")
    result = parse_wrk(done.stdout)
    bad = result["non_2xx"] + result["socket_errors"]
    if bad > result["requests"] * 0.001:
        result["error"] = f"{bad} of {result['requests']} requests failed (non-2xx or socket)"
    return result


def run_loadgen(pinning: Pinning, mode: str, port: int, seconds: float,
                extra: list[str]) -> dict[str, Any]:
    argv = pinning.load([PYTHON, "-m", "benchmarks.loadgen", mode, "--port", str(port),
                         "--duration", str(seconds), *extra])
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + GRACE,
                              check=False, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired as exc:
        raise ScenarioError(f"loadgen {mode} ran past {seconds + GRACE:.0f}s") from exc
    lines = done.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        result = {}
    if done.returncode != 0 or not result or "error" in result:
        why = result.get("error") or done.stderr.strip()[-300:] or f"exit {done.returncode}"
        raise ScenarioError(f"loadgen {mode}: {why}")
    return result


# --- one target ---------------------------------------------------------------------------


def _scenario(results: dict, key: str, target: Target, run) -> dict | None:
    """Run one scenario into ``results[key]``; a failure is recorded, not raised."""
    if target.child is not None and not target.child.alive():
        results[key] = {"error": f"{target.name} exited before this scenario"}
        return None
    try:
        results[key] = run()
    except ScenarioError as exc:
        results[key] = {"error": str(exc)}
        say(f"{target.name} {key}: {exc}")
        return None
    return results[key]


def measure(target: Target, plan: Plan, pinning: Pinning,
            upstream_meter: TreeMeter) -> dict[str, Any]:
    results: dict[str, Any] = {"available": True, "info": target.info}
    resources: dict[str, Any] = {"idle_rss_bytes": target.idle_rss}
    results["resources"] = resources

    say(f"{target.name}: wrk warm-up {plan.wrk_warmup_s}s")
    _scenario({}, "warmup", target, lambda: run_wrk(
        pinning, target.http_port, plan.wrk_warmup_s, plan.wrk_connections))

    say(f"{target.name}: wrk -c{plan.wrk_connections} {plan.wrk_s}s")
    cpu_before = target.meter.cpu_seconds() if target.meter else None
    up_before = upstream_meter.cpu_seconds()
    wrk = _scenario(results, "http_rps", target, lambda: run_wrk(
        pinning, target.http_port, plan.wrk_s, plan.wrk_connections))
    if wrk and wrk.get("requests"):
        per_1k = wrk["requests"] / 1000
        if target.meter is not None and cpu_before is not None:
            resources["cpu_s_per_1k"] = (target.meter.cpu_seconds() - cpu_before) / per_1k
        resources["upstream_cpu_s_per_1k"] = (upstream_meter.cpu_seconds() - up_before) / per_1k

    say(f"{target.name}: latency at {plan.latency_rate:.0f} req/s for {plan.latency_s}s")
    latency = _scenario(results, "latency", target, lambda: run_loadgen(
        pinning, "latency", target.http_port, plan.latency_s,
        ["--rate", str(plan.latency_rate), "--connections", str(plan.latency_connections),
         "--warmup", str(plan.latency_warmup_s)]))
    if latency and (latency.get("errors") or latency.get("non_2xx")):
        latency["warning"] = (f"{latency['errors']} errors, {latency['non_2xx']} non-2xx "
                              "(excluded from percentiles)")

    say(f"{target.name}: TCP ping-pong {plan.pingpong_s}s")
    _scenario(results, "tcp_rr", target, lambda: run_loadgen(
        pinning, "pingpong", target.tcp_port, plan.pingpong_s,
        ["--connections", str(plan.pingpong_connections), "--size", str(plan.pingpong_bytes),
         "--warmup", str(plan.tcp_warmup_s)]))

    say(f"{target.name}: TCP bulk {plan.bulk_s}s")
    bulk = _scenario(results, "tcp_bulk", target, lambda: run_loadgen(
        pinning, "bulk", target.tcp_port, plan.bulk_s,
        ["--direction", "down", "--warmup", str(plan.tcp_warmup_s)]))
    if bulk and bulk.get("failed"):
        results["tcp_bulk"] = {"error": "connection closed during bulk transfer", **bulk}

    if target.meter is not None:
        resources["peak_rss_bytes"] = target.meter.stop_sampling()
    return results


def run_target(name: str, plan: Plan, pinning: Pinning, workdir: Path, logs: Path,
               out: Path, upstreams: Upstreams, upstream_meter: TreeMeter,
               envoy_config: str) -> dict[str, Any]:
    say(f"{name}: starting")
    try:
        if name == "direct":
            target = direct(upstreams)
        elif name == "pillion":
            target = start_pillion(pinning, workdir, logs, upstreams)
        else:
            target = start_envoy(pinning, workdir, logs, upstreams, envoy_config, out)
    except (StartError, BootstrapUnavailable, OSError, psutil.Error) as exc:
        say(f"{name}: not available: {str(exc).splitlines()[0]}")
        return {"available": False, "error": str(exc)}
    try:
        return measure(target, plan, pinning, upstream_meter)
    finally:
        target.stop()


# --- the run ------------------------------------------------------------------------------


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _meta(args: argparse.Namespace, plan: Plan, pinning: Pinning) -> dict[str, Any]:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "git": _version(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model,
        "cpus": os.cpu_count(),
        "pinning": pinning.describe(),
        "envoy": _version([envoy_binary(), "--version"]),
        "wrk": _version(["wrk", "--version"]),
        "plan": asdict(plan),
        "targets": args.targets,
    }


def _on_signal(signum: int, frame: object) -> None:
    """Unwind through every ``finally``, which stops the children; ignore repeats meanwhile."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.macro", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short durations (about a minute)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results",
                        help="where results.json, results.png and logs/ go")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help="comma-separated subset of direct,pillion,envoy")
    parser.add_argument("--envoy-config", choices=("auto", "translate", "fallback"),
                        default="auto", help="Envoy bootstrap source (default: translate, "
                        "falling back to the hand-made one)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to cores")
    args = parser.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if "direct" not in args.targets:
        args.targets.insert(0, "direct")  # "added latency" needs the baseline
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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

    with tempfile.TemporaryDirectory(prefix="pillion-bench-") as tmp:
        upstreams = start_upstreams(pinning, logs)
        try:
            upstream_meter = TreeMeter(upstreams.http.pid)
            for name in args.targets:
                workdir = Path(tmp) / name
                workdir.mkdir()
                results["targets"][name] = run_target(
                    name, plan, pinning, workdir, logs, out, upstreams, upstream_meter,
                    args.envoy_config)
        finally:
            upstreams.stop()

    results.update(summarize(results["targets"]))
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    title = (f"Pillion macro benchmark{' (quick)' if args.quick else ''}, "
             f"{results['meta']['started']}, git {results['meta']['git']}")
    write_chart(results, results["targets"], out / "results.png", title)
    print(format_table(results, results["targets"]))
    print(f"\nwrote {out / 'results.json'} and {out / 'results.png'}")
    return 0 if results["targets"].get("direct", {}).get("available") else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        say("interrupted: children stopped, no results written")
        sys.exit(130)
