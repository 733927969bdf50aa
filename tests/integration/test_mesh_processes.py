"""The whole product as a user runs it: `pillion control` and two `pillion proxy --xds` processes.

The control server serves the Istio YAML over ADS and is the mesh CA; each
sidecar proves its identity with a bootstrap token minted by `pillion control
token`, gets its certificate, and the call productpage -> reviews crosses the
two sidecars with mutual TLS (STRICT by PeerAuthentication).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

from tests.helpers.net import REPO, free_port, http_get, one_request, wait_until
from tests.helpers.upstreams import RecordingUpstream
from tests.proxy.test_mesh_mtls import HOST, mesh_yaml


def pillion(*args: str, **kw: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "proxy", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, **kw)  # type: ignore[call-overload]


def test_control_server_ca_and_two_sidecars_with_mtls(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with RecordingUpstream("reviews-app") as app:
            egress, ingress = free_port(), free_port()
            xds, debug = free_port(), free_port()
            cfg = tmp_path / "cfg"
            cfg.mkdir()
            (cfg / "mesh.yaml").write_text(mesh_yaml(egress, ingress, app.port))
            state = tmp_path / "ca-state"
            procs: list[subprocess.Popen[bytes]] = []
            try:
                control = pillion("control", "--config-dir", str(cfg), "--xds-port", str(xds), "--debug-port",
                                  str(debug), "--ca-state-dir", str(state))
                procs.append(control)
                assert await asyncio.to_thread(
                    wait_until, lambda: http_get(f"http://127.0.0.1:{debug}/ready")[0] == 200, 20)
                admins = {}
                for sa in ("reviews", "productpage"):
                    token = tmp_path / f"{sa}.token"
                    rc = subprocess.run([sys.executable, "-m", "proxy", "control", "token", "--state-dir", str(state),
                                         "--namespace", "default", "--service-account", sa, "--out", str(token)],
                                        cwd=REPO, capture_output=True, timeout=30)
                    assert rc.returncode == 0, rc.stderr
                    assert token.stat().st_mode & 0o777 == 0o600
                    admins[sa] = free_port()
                    procs.append(pillion("proxy", "--xds", f"127.0.0.1:{xds}", "--token-file", str(token),
                                         "--labels", f"app={sa}", "--service-account", sa,
                                         "--admin-port", str(admins[sa])))
                for sa, port in admins.items():
                    ok = await asyncio.to_thread(
                        wait_until, lambda p=port: http_get(f"http://127.0.0.1:{p}/ready")[0] == 200, 30)
                    assert ok, f"{sa} not ready: {http_get(f'http://127.0.0.1:{port}/ready')}"
                r = await one_request(egress, f"GET /e2e HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode())
                assert r.status == 200 and r.body == b"hello from reviews-app"
                xfcc = app.requests[-1].header("x-forwarded-client-cert") or ""
                assert "URI=spiffe://cluster.local/ns/default/sa/productpage" in xfcc
                # Plaintext straight to reviews' port is refused (STRICT).
                try:
                    refused = await one_request(ingress, f"GET / HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode(), timeout=3)
                    raise AssertionError(f"plaintext got an answer: {refused.status}")
                except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
                    pass
                # `pillion control status` lists both proxies as in sync.
                out = subprocess.run([sys.executable, "-m", "proxy", "control", "status", "--server",
                                      f"127.0.0.1:{debug}"], cwd=REPO, capture_output=True, timeout=30, text=True)
                assert out.returncode == 0, out.stderr
                assert "reviews" in out.stdout and "productpage" in out.stdout and "SYNCED" in out.stdout
                status, body = http_get(f"http://127.0.0.1:{debug}/debug/syncz")
                assert status == 200 and len(json.loads(body)) == 2
            finally:
                for p in reversed(procs):
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                for p in procs:
                    try:
                        rc = p.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        rc = p.wait()
                    assert rc == 0, (p.args, rc, p.stdout.read().decode()[-2000:] if p.stdout else "")

    import uvloop

    uvloop.run(scenario())
