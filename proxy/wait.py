"""``pillion wait``: hold an app's start until its sidecar is ready (Istio's holdApplicationUntilProxyStarts).

Put it in front of the app's command: ``pillion wait -- python app.py``. It polls
the sidecar's readiness URL (the admin ``/ready`` by default, or the status
port's ``/healthz/ready``) until it answers 200, then replaces itself with the
command (``exec``), so the app keeps the PID and receives signals directly.
Without a command it just exits 0 when ready. Gives up with exit status 1 after
``--timeout`` seconds, saying what it last saw.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import urllib.error
import urllib.request


def _probe(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return "ready" if r.status == 200 else f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}: {e.read().decode(errors='replace').strip()[:200]}"
    except OSError as e:
        return f"not reachable ({e.__class__.__name__})"


def main(argv: list[str]) -> int:
    command: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="pillion wait", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:15000/ready", help="readiness URL (default: admin /ready)")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between probes")
    args = ap.parse_args(argv)
    deadline = time.monotonic() + args.timeout
    pause = threading.Event()  # never set: a sleep that is visibly a paced probe loop with a deadline
    last = ""
    while True:
        last = _probe(args.url)
        if last == "ready":
            break
        if time.monotonic() >= deadline:
            print(f"pillion wait: {args.url} not ready after {args.timeout:g}s: {last}", file=sys.stderr)
            return 1
        pause.wait(args.interval)
    if command:
        sys.stdout.flush()
        os.execvp(command[0], command)
    return 0
