"""Instructions per request on the in-process request path, by tracing mode: a drift-free cost.

    python -m benchmarks.instructions [--requests N]

Requests/s on this machine scatter by several percent between two identical
runs (see the "off again" row of ``benchmarks.tracing``), so a cost of a few
percent is better seen as work done. For each mode (tracing off, 0%, 1%,
100%) this runs ``benchmarks.micro``'s request path (parse, route, pool
checkout, serialize, response; no sockets, exporter thread not started, so
sampled spans stay in the queue) in a child process under ``perf stat -e
instructions:u``, once with N requests and once with one, and reports the
difference divided by N - 1: user-space instructions per request, the
start-up cost cancelled. Needs ``perf`` (Debian: linux-perf).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

from benchmarks.targets import PYTHON, REPO_ROOT

MODES = {"off": "none", "0%": "0", "1%": "1", "100%": "100"}

_CHILD = """
import sys
from benchmarks import micro
from proxy import tracing
tracing.Tracer.update = lambda self, snap: None  # no exporter thread: only the loop thread's work counts
micro._runs = lambda fn, n, repeat: [fn(n)]
mode, n = sys.argv[1], int(sys.argv[2])
micro.bench_request_path(n, 1, None if mode == "none" else float(mode))
"""


def count(mode: str, n: int) -> int:
    """User-space instructions of one child process running ``n`` requests in ``mode``."""
    done = subprocess.run(["perf", "stat", "-x,", "-e", "instructions:u", PYTHON, "-c", _CHILD, mode, str(n)],
                          capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    for line in done.stderr.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2].startswith("instructions"):
            return int(fields[0])
    raise RuntimeError(f"perf printed no instruction count: {done.stderr.strip()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=100_000)
    args = ap.parse_args(argv)
    if shutil.which("perf") is None:
        print("perf is not installed (Debian: apt-get install linux-perf)", file=sys.stderr)
        return 2
    base: int | None = None
    print(f"{'tracing':<8} {'instructions/request':>21} {'vs off':>8}")
    for name, mode in MODES.items():
        per_request = (count(mode, args.requests) - count(mode, 1)) / (args.requests - 1)
        base = base or per_request
        print(f"{name:<8} {per_request:>21,.0f} {per_request / base:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
