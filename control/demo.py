"""``pillion demo``: a sidecar in front of a small app, with traffic, on loopback.

Until the full demo mesh exists (control server, several apps and sidecars),
this starts two versions of a demo app (v1, v2), a TCP echo server and one
``pillion proxy`` process in standalone mode with the Istio YAML printed
below, then drives requests through the sidecar and shows what the mesh did:
routing by header (the seed's ``end-user: jason`` -> v2 rule), the headers the
sidecar added, chunked upload, a TCP round trip, the local replies for an
unknown host and a dead upstream, the Prometheus counters, and a graceful
drain on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from control.demoapp import DemoApp

HOST = "reviews.default.svc.cluster.local"

MESH_YAML = """\
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [{host}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: {http_port}, name: http, protocol: HTTP}}
  - {{number: {tcp_port}, name: tcp-echo, protocol: TCP}}
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {v1_port}, tcp-echo: {echo_port}}}, labels: {{app: reviews, version: v1}}}}
  - {{address: 127.0.0.1, ports: {{http: {v2_port}, tcp-echo: {echo_port}}}, labels: {{app: reviews, version: v2}}}}
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination:
        host: reviews
        subset: v2
  - route:
    - destination:
        host: reviews
        subset: v1
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
---
apiVersion: networking.istio.io/v1beta1
kind: Sidecar
metadata: {{name: productpage, namespace: default}}
spec:
  workloadSelector: {{labels: {{app: productpage}}}}
  egress:
  - port: {{number: {http_port}, protocol: HTTP, name: http}}
    bind: 127.0.0.1
    captureMode: NONE
    hosts: ["./*"]
  - port: {{number: {tcp_port}, protocol: TCP, name: tcp-echo}}
    bind: 127.0.0.1
    captureMode: NONE
    hosts: ["./*"]
"""


def free_ports(n: int) -> list[int]:
    """n distinct loopback ports that were free a moment ago.

    The sockets are held until all n are chosen, so the ports differ from each
    other and from every port already bound (start the apps first)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        self.t.write(data)  # type: ignore[attr-defined]


async def _http(port: int, method: str, path: str, host: str, headers: dict[str, str] | None = None,
                body: bytes | None = None, chunks: list[bytes] | None = None) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [f"{method} {path} HTTP/1.1", f"host: {host}", "connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if chunks is not None:
            lines.append("transfer-encoding: chunked")
            payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        else:
            payload = body or b""
            if body is not None:
                lines.append(f"content-length: {len(payload)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        raw = await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *hdr_lines = head.decode("latin-1").split("\r\n")
    hdrs = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in hdr_lines)}
    if hdrs.get("transfer-encoding") == "chunked":
        out, buf = b"", rest
        while buf:
            size_s, _, buf = buf.partition(b"\r\n")
            size = int(size_s, 16)
            if size == 0:
                break
            out, buf = out + buf[:size], buf[size + 2:]
        rest = out
    return int(status_line.split()[1]), hdrs, rest


async def _wait_ready(admin_port: int, proc: asyncio.subprocess.Process, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            return False
        with contextlib.suppress(OSError, ValueError, IndexError, TimeoutError):
            status, _, _ = await _http(admin_port, "GET", "/ready", "admin")
            if status == 200:
                return True
        await asyncio.sleep(0.05)  # poll with a deadline; a user-facing wait, not a test
    return False


_LABEL = re.compile(r'(\w+)="([^"]*)"')


def _say(text: str = "") -> None:
    print(text, flush=True)


async def run_demo(duration: float, keep_dir: bool) -> int:
    loop = asyncio.get_running_loop()
    tmp = tempfile.mkdtemp(prefix="pillion-demo-")
    v1, v2 = DemoApp("reviews", "v1"), DemoApp("reviews", "v2")
    await v1.start()
    await v2.start()
    echo = await loop.create_server(_Echo, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    # chosen after the apps are bound, so the sidecar's listeners cannot land on an app's port
    http_port, tcp_port, admin_port = free_ports(3)
    yaml_text = MESH_YAML.format(host=HOST, http_port=http_port, tcp_port=tcp_port, v1_port=v1.port,
                                 v2_port=v2.port, echo_port=echo_port)
    Path(tmp, "mesh.yaml").write_text(yaml_text)
    _say("== Pillion demo: one sidecar (app=productpage) in standalone mode")
    _say(f"   config: {tmp}/mesh.yaml  (ServiceEntry, the seed's VirtualService + DestinationRule, Sidecar)")
    _say(f"   apps: reviews v1 on :{v1.port}, reviews v2 on :{v2.port}, tcp echo on :{echo_port}")
    _say(f"   sidecar: HTTP egress 127.0.0.1:{http_port}, TCP egress 127.0.0.1:{tcp_port}, admin 127.0.0.1:{admin_port}")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log_path = Path(tmp, "proxy.log")
    log_file = log_path.open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "proxy", "--config-dir", tmp, "--admin-port", str(admin_port),
        "--labels", "app=productpage", "--drain-seconds", "2", stdout=log_file, stderr=log_file, env=env)
    rc = 1
    try:
        if not await _wait_ready(admin_port, proc):
            _say("!! the sidecar did not become ready; its log:")
            _say(log_path.read_text())
            return 1
        _say("   sidecar ready (/ready = 200)\n")

        _say("-- 1. routing by header (VirtualService: end-user=jason -> v2, everyone else -> v1)")
        seen: Counter[str] = Counter()
        deadline = time.monotonic() + max(0.0, duration)
        n = 0
        while n < 20 or time.monotonic() < deadline:
            user = "jason" if n % 4 == 0 else "alice"
            status, _, body = await _http(http_port, "GET", f"/reviews/{n}", "reviews", {"end-user": user})
            version = json.loads(body)["version"] if status == 200 else f"HTTP {status}"
            seen[f"end-user={user:<6} -> {version}"] += 1
            n += 1
        for k, v in sorted(seen.items()):
            _say(f"   {k}: {v} requests")

        _say("\n-- 2. what the sidecar added to the request")
        status, _, body = await _http(http_port, "GET", "/details", HOST)
        doc = json.loads(body)
        for k in ("x-request-id", "x-forwarded-for", "x-forwarded-proto"):
            _say(f"   {k}: {doc['headers'].get(k)}")

        _say("\n-- 3. chunked upload streamed through (3 chunks, 30000 bytes)")
        status, _, body = await _http(http_port, "POST", "/upload", HOST, chunks=[b"x" * 10000] * 3)
        _say(f"   HTTP {status}, app received {json.loads(body)['body_bytes']} bytes")

        _say("\n-- 4. TCP (L4) through the sidecar")
        r, w = await asyncio.open_connection("127.0.0.1", tcp_port)
        w.write(b"ping over tcp")
        w.write_eof()
        echoed = await asyncio.wait_for(r.read(-1), 5)
        w.close()
        _say(f"   sent b'ping over tcp', echoed {echoed!r}")

        _say("\n-- 5. local replies, Envoy style")
        status, hdrs, _ = await _http(http_port, "GET", "/", "nowhere.example")
        _say(f"   unknown host         -> HTTP {status}, x-pillion-flags: {hdrs.get('x-pillion-flags')}")
        v2.close()
        status, hdrs, body = await _http(http_port, "GET", "/", "reviews", {"end-user": "jason"})
        _say(f"   v2 stopped, jason    -> HTTP {status}, x-pillion-flags: {hdrs.get('x-pillion-flags')} ({body.decode()[:60]})")
        status, _, body = await _http(http_port, "GET", "/", "reviews", {"end-user": "alice"})
        _say(f"   v1 still up, alice   -> HTTP {status} from {json.loads(body)['version']}")
        status, _, _ = await _http(http_port, "GET\x01", "/", "reviews")
        _say(f"   malformed request    -> HTTP {status}")

        _say("\n-- 6. Istio metrics (/stats/prometheus)")
        _, _, metrics = await _http(admin_port, "GET", "/stats/prometheus", "admin")
        for line in metrics.decode().splitlines():
            if line.startswith("istio_requests_total") or line.startswith("istio_tcp_connections_opened_total"):
                labels = dict(_LABEL.findall(line))
                _say(f"   {line.split('{')[0]} cluster={labels['destination_cluster']} "
                     f"code={labels.get('response_code', '-')} flags={labels.get('response_flags')}: {line.rsplit(' ', 1)[1]}")

        _say("\n-- 7. graceful shutdown: SIGTERM drains, then exits")
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 15)
        _say(f"   sidecar exited with status {rc}")
        _say(f"\nSidecar log: {log_path}" if keep_dir else "")
        return 0 if rc == 0 else 1
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log_file.close()
        v1.close()
        v2.close()
        echo.close()
        if not keep_dir:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """``pillion demo``: the bookinfo mesh (control server, six apps, six sidecars); ``--sidecar``:
    the one-sidecar standalone tour."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--sidecar" not in argv:
        from control.demo_mesh import main as mesh_main

        return mesh_main(argv)
    argv.remove("--sidecar")
    ap = argparse.ArgumentParser(prog="pillion demo --sidecar", description="One app behind one sidecar, standalone.")
    ap.add_argument("--duration", type=float, default=0.0, help="keep driving traffic for this many seconds")
    ap.add_argument("--keep", action="store_true", help="keep the temporary config dir and proxy log")
    args = ap.parse_args(argv)
    import uvloop

    try:
        return int(uvloop.run(run_demo(args.duration, args.keep)))
    except KeyboardInterrupt:
        return 130
