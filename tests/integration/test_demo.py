"""The README's run command: `pillion demo` (the bookinfo mesh) and `pillion demo --sidecar`."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.helpers.net import REPO


def run(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "proxy", "demo", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_mesh_demo_routes_canary_with_mtls_and_stops_everything():
    out = run()
    counts = {m.group(1) + m.group(2): int(m.group(3))
              for m in re.finditer(r"(jason|alice)\s+-> reviews (v\d|HTTP 502): (\d+)", out)}
    # jason's calls to ratings are aborted 10% of the time by the demo's fault: reviews then answers 502
    assert counts.get("jasonv2", 0) + counts.get("jasonHTTP 502", 0) >= 10, out
    assert "jasonv1" not in counts and "jasonv3" not in counts, out
    assert counts.get("alicev1", 0) > 0 and counts.get("alicev3", 0) > 0 and "alicev2" not in counts, out
    assert "alicev2" not in counts and "aliceHTTP 502" not in counts, out  # retries hide ratings' own failures
    faults = out.split("-- faults and retries on ratings", 1)[1].split("-- mutual TLS", 1)[0]
    retried = re.search(r"retries (\d+), retries that succeeded (\d+), aborts injected (\d+)", faults)
    assert retried is not None and int(retried.group(1)) >= 1 and int(retried.group(2)) >= 1, faults
    assert "alice  <- ratings HTTP 200" in faults and "alice  <- ratings HTTP 503" not in faults, faults
    aborted = re.search(r"jason  <- ratings HTTP 503 \(FI\): (\d+)", faults)
    assert int(retried.group(3)) == (int(aborted.group(1)) if aborted else 0), faults
    assert "reviews      <- spiffe://cluster.local/ns/default/sa/bookinfo-productpage" in out
    assert "ratings      <- spiffe://cluster.local/ns/default/sa/bookinfo-reviews" in out
    assert out.count("SYNCED") >= 24  # 6 proxies x 4 types
    # A whole distributed trace from the sidecars' OTLP spans: jason's request reaches ratings via v2.
    tree = out.split("pillion traces", 1)[1].split("-- proxy status", 1)[0]
    for span in ("productpage.default SERVER", "details.default SERVER", "reviews.default SERVER",
                 "ratings.default SERVER"):
        assert span in tree, tree
    assert "stopped 13 processes, all cleanly" in out


def test_single_sidecar_tour():
    out = run("--sidecar")
    assert "end-user=jason  -> v2" in out and "HTTP 404, x-pillion-flags: NR" in out
    assert "sidecar exited with status 0" in out


def test_ctrl_c_stops_the_demo_and_every_process():
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "proxy", "demo", "--duration", "60"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:  # read until the mesh is up, then press Ctrl-C
        lines.append(line)
        if "ready" in line and "sidecars" in line:
            proc.send_signal(signal.SIGINT)
            break
    out, _ = proc.communicate(timeout=60)
    text = "".join(lines) + out
    assert proc.returncode == 130, text[-3000:]
    assert "interrupted" in text and "stopped 13 processes, all cleanly" in text
