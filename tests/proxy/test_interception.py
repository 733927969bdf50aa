"""Transparent interception for real: iptables in two network namespaces, two sidecars, mTLS.

Namespace A runs an app that knows nothing of the mesh (a plain
``GET http://10.250.0.2:8080/``) and sidecar A; namespace B runs an HTTP app
on 0.0.0.0:8080 and sidecar B. Each namespace gets ``pillion init-iptables``;
each sidecar runs ``pillion proxy --intercept`` as uid 1337 (exempt from
capture) with a certificate from the test PKI. The request crosses both
sidecars with mutual TLS (STRICT by PeerAuthentication): app B sees A's SPIFFE
id in x-forwarded-client-cert and the connection coming from its own sidecar.
A plaintext connection that bypasses sidecar A is refused by B; a client that
dials 15001 itself is closed, not looped; ``--clean`` restores the nat table.

Skipped (with the reason) where namespaces or iptables cannot be made.
Addresses 10.250.0.x exist only inside the namespaces the test creates.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.net import REPO
from tests.helpers.netns import B_IP, PROXY_UID, Namespace, unavailable, veth_pair
from tests.helpers.pki import MeshPki

WHY_NOT = unavailable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")

PY = sys.executable
SPIFFE_A = "spiffe://cluster.local/ns/default/sa/a"
SPIFFE_B = "spiffe://cluster.local/ns/default/sa/b"

MESH = f"""\
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: b, namespace: default}}
spec:
  hosts: [b.default.svc.cluster.local]
  addresses: [{B_IP}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {{app: b}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: WorkloadEntry
metadata: {{name: b, namespace: default}}
spec:
  address: {B_IP}
  labels: {{app: b, security.istio.io/tlsMode: istio}}
  serviceAccount: b
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {{name: default, namespace: istio-system}}
spec:
  mtls: {{mode: STRICT}}
"""

# App B: answers every GET with what it saw (peer address, request headers) as JSON.
APP_B = """
import http.server, json
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        seen = {"peer": self.client_address[0], "headers": {k.lower(): v for k, v in self.headers.items()}}
        body = json.dumps(seen).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Handler)
print("ready", flush=True)
server.serve_forever()
"""

# App A: a plain HTTP client, no proxy settings.
APP_A = """
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
    print(r.status)
    print(r.read().decode())
"""

# A raw client: connect, send one request, report what came back (or how it ended).
RAW = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
try:
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(b"GET / HTTP/1.1\\r\\nhost: " + host.encode() + b"\\r\\n\\r\\n")
    data = s.recv(65536)
    print("ANSWERED " + data[:40].decode("latin-1") if data else "CLOSED")
except ConnectionRefusedError:
    print("REFUSED")
except ConnectionError:  # reset, or a broken pipe when the close came before the request was written
    print("RESET")
except TimeoutError:
    print("TIMEOUT")
"""

# Readiness inside a namespace: the product's own `pillion wait` (it polls the sidecar's /ready).
WAIT_READY = ("-m", "proxy", "wait", "--url", "http://127.0.0.1:15000/ready", "--timeout", "15")


def wait_line(proc: subprocess.Popen[bytes], text: bytes, timeout: float = 10.0) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            if text in line:
                return
            if not line and proc.poll() is not None:
                break
    raise AssertionError(f"{proc.args} did not print {text!r} (rc={proc.poll()})")


def output(proc: subprocess.Popen[bytes]) -> str:
    if proc.poll() is None:
        return "(running)"
    return proc.stdout.read().decode(errors="replace")[-3000:] if proc.stdout else ""


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory the proxy's uid can read (pytest's tmp_path parents are private to root)."""
    d = Path(tempfile.mkdtemp(prefix="pillion-intercept-"))
    try:
        d.chmod(0o755)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def pillion(ns: Namespace, *args: str) -> subprocess.CompletedProcess[str]:
    return ns.run(PY, "-m", "proxy", *args, cwd=REPO)


def start_sidecar(ns: Namespace, workdir: Path, app: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    return ns.start(PY, "-m", "proxy", "proxy", "--intercept", "--config-dir", str(workdir / "cfg"),
                    "--cert-dir", str(workdir / app), "--labels", f"app={app}", "--service-account", app,
                    "--no-watch", "--drain-seconds", "0.5", "--log-level", "debug",
                    uid=PROXY_UID, cwd=REPO, env=env)


def test_two_sidecars_intercept_and_talk_mtls(workdir: Path) -> None:
    (workdir / "cfg").mkdir()
    (workdir / "cfg" / "mesh.yaml").write_text(MESH)
    pki = MeshPki()
    for sa in ("a", "b"):
        pki.issue(workdir / sa, "default", sa)
    for path in workdir.rglob("*"):
        os.chown(path, PROXY_UID, PROXY_UID)
    with veth_pair() as (a, b):
        before = {(ns.name, tool): ns.nat_rules(tool) for ns in (a, b) for tool in ("iptables", "ip6tables")}
        for ns in (a, b):
            for _ in range(2):  # installing twice leaves one copy
                done = pillion(ns, "init-iptables")
                assert done.returncode == 0, done.stderr
        rules = a.nat_rules()
        assert rules.count("-A OUTPUT -p tcp -j PILLION_OUTPUT") == 1
        assert rules.count("-A PREROUTING -p tcp -j PILLION_INBOUND") == 1
        assert "-A PILLION_OUTPUT -m owner --uid-owner 1337 -j RETURN" in rules

        app_b = b.start(PY, "-c", APP_B)
        wait_line(app_b, b"ready")
        sidecars = {"a": start_sidecar(a, workdir, "a"), "b": start_sidecar(b, workdir, "b")}
        for name, ns in (("a", a), ("b", b)):
            ready = ns.run(PY, *WAIT_READY, cwd=REPO)
            assert ready.returncode == 0, (ready.stderr, output(sidecars[name]))

        # The app's plain request crosses both sidecars, with mTLS between them.
        got = a.run(PY, "-c", APP_A, f"http://{B_IP}:8080/hello")
        assert got.returncode == 0, (got.stderr, output(sidecars["a"]))
        status, body = got.stdout.split("\n", 1)
        assert status == "200"
        seen = json.loads(body)
        xfcc = seen["headers"].get("x-forwarded-client-cert", "")
        assert f"URI={SPIFFE_A}" in xfcc and f"By={SPIFFE_B}" in xfcc, seen
        assert seen["peer"] == "127.0.0.1", seen  # from sidecar B, not from A
        assert seen["headers"]["host"] == f"{B_IP}:8080"

        # Bypassing sidecar A (uid 1337 is exempt from capture): B's STRICT inbound refuses plaintext.
        bypass = a.run(PY, "-c", RAW, B_IP, "8080", uid=PROXY_UID)
        assert bypass.stdout.split()[0] in ("CLOSED", "RESET"), bypass

        # Dialling the capture port itself is refused, not looped through the proxy.
        for host in ("127.0.0.1", a.ip):
            direct = a.run(PY, "-c", RAW, host, "15001")
            assert direct.stdout.split()[0] in ("CLOSED", "RESET"), direct
        stats = a.run(PY, "-c", "import urllib.request; print(urllib.request.urlopen("
                      "'http://127.0.0.1:15000/stats/prometheus').read().decode())")
        assert 'pillion_local_replies_total{response_flags="NR"} 2' in stats.stdout, stats.stdout[-2000:]
        assert sidecars["a"].poll() is None and sidecars["b"].poll() is None

        for ns in (a, b):
            done = pillion(ns, "init-iptables", "--clean")
            assert done.returncode == 0, done.stderr
            for tool in ("iptables", "ip6tables"):
                assert ns.nat_rules(tool) == before[(ns.name, tool)], tool
            again = pillion(ns, "init-iptables", "--clean")  # nothing left to remove: still fine
            assert again.returncode == 0, again.stderr


# A TCP server on 9000 (IPv4 and IPv6): answers each connection with "<peer> <first bytes>".
ECHO_PEER = """
import socket, threading
srv = socket.socket(socket.AF_INET6)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("::", 9000))
srv.listen(16)
print("ready", flush=True)
def serve(conn, peer):
    with conn:
        data = conn.recv(100)
        conn.sendall(peer[0].removeprefix("::ffff:").encode() + b" " + data)
while True:
    conn, peer = srv.accept()
    threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
"""

TCP_CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
    s.sendall(b"hi")
    print(s.recv(100).decode())
"""


def test_unknown_destinations_pass_through_on_ipv4_and_ipv6(workdir: Path) -> None:
    """ALLOW_ANY: TCP to a destination the mesh does not know leaves through the sidecar to
    where the app sent it, over IPv4 and IPv6 (ip6tables, a dual-stack capture socket)."""
    (workdir / "cfg").mkdir()
    (workdir / "cfg" / "mesh.yaml").write_text("kind: MeshConfig\nspec: {trustDomain: cluster.local}\n")
    with veth_pair() as (a, b):
        done = pillion(a, "init-iptables")
        assert done.returncode == 0, done.stderr
        ipv6 = bool(a.ip6 and b.ip6) and "IPv6 traffic is left alone" not in done.stderr
        server = b.start(PY, "-c", ECHO_PEER)
        wait_line(server, b"ready")
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
        sidecar = a.start(PY, "-m", "proxy", "proxy", "--intercept", "--config-dir", str(workdir / "cfg"),
                          "--labels", "app=a", "--no-watch", "--drain-seconds", "0.5",
                          uid=PROXY_UID, cwd=REPO, env=env)
        ready = a.run(PY, *WAIT_READY, cwd=REPO)
        assert ready.returncode == 0, (ready.stderr, output(sidecar))
        targets = [b.ip, *([b.ip6] if ipv6 else [])]
        for target in targets:
            got = a.run(PY, "-c", TCP_CLIENT, target, "9000")
            assert got.returncode == 0, (got.stderr, output(sidecar))
            source = a.ip6 if ":" in target else a.ip
            assert got.stdout.strip() == f"{source} hi"
        stats = a.run(PY, "-c", "import urllib.request; print(urllib.request.urlopen("
                      "'http://127.0.0.1:15000/stats/prometheus').read().decode())").stdout
        opened = f'envoy_cluster_upstream_cx_total{{envoy_cluster_name="PassthroughCluster"}} {len(targets)}'
        assert opened in stats, stats[-3000:]
