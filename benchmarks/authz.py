"""Authorization and JWT cost: per request in-process, and requests/s through a sidecar on loopback.

In-process (as ``micro.py``): one HTTP/1.1 request goes through a sidecar's
inbound listener (parse, jwt_authn, RBAC, route, pool checkout, serialize,
response), compiled from Istio YAML, with in-memory transports. Scenarios:

- ``none``: no policy (no filter is compiled: the baseline)
- ``rbac20``: an ALLOW AuthorizationPolicy of 20 rules (methods, path
  prefix, a header condition); the request matches only the last one, so
  every rule is evaluated
- ``jwt``: a RequestAuthentication (local JWKS) and an ALLOW policy on
  requestPrincipals ["*"]; the request carries an RS256 token (``jwt-es256``:
  ES256)
- ``jwt+rbac20``: both

Also timed alone: ``authz.evaluate`` on the 20-rule policy, and
``jwt.authenticate`` for RS256 and ES256 tokens.

With ``--wrk`` it also runs ``pillion proxy`` (one worker) and a small
upstream as processes and measures requests/s with wrk through the inbound
listener for the same scenarios.

    python -m benchmarks.authz [--quick] [--wrk] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.micro import SinkTransport, _runs
from control.translate import NodeInfo, load_dir, translate
from proxy import authz, jwt
from proxy.compile import XdsResources, compile_snapshot
from proxy.context import Context
from proxy.hcm import HttpConnection
from proxy.model import Snapshot
from proxy.upstream import UpstreamConnection
from tests.helpers.jwks import Issuer

PORT = 19080
ISSUER = "https://issuer.example"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\nServer: bench\r\n\r\nhello\n"
SCENARIOS = ("none", "rbac20", "jwt", "jwt-es256", "jwt+rbac20")


def mesh_yaml(scenario: str, app_port: int, jwks: str) -> str:
    docs = [f"""\
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: bench, namespace: default}}
spec:
  workloadSelector: {{labels: {{app: bench}}}}
  ingress:
  - port: {{number: {PORT}, protocol: HTTP, name: http}}
    bind: 127.0.0.1
    defaultEndpoint: 127.0.0.1:{app_port}
""", """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: bench, namespace: default}
spec: {mtls: {mode: DISABLE}}
"""]
    if "rbac20" in scenario:
        rules = "".join(
            f"  - to: [{{operation: {{methods: [GET, HEAD], paths: ['/api/v{i}/*']}}}}]\n"
            f"    when: [{{key: 'request.headers[x-tenant]', values: ['t{i}']}}]\n"
            for i in range(1, 21)
        )
        docs.append(f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
                    f"metadata: {{name: twenty, namespace: default}}\nspec:\n  rules:\n{rules}")
    if scenario.startswith("jwt"):
        docs.append(f"""\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: default}}
spec:
  jwtRules:
  - issuer: {ISSUER}
    jwks: '{jwks}'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: need-jwt, namespace: default}}
spec:
  rules:
  - from: [{{source: {{requestPrincipals: ["*"]}}}}]
""")
    return "---\n".join(docs)


def compiled(scenario: str, app_port: int, idp: Issuer) -> Snapshot:
    with tempfile.TemporaryDirectory() as d:
        Path(d, "mesh.yaml").write_text(mesh_yaml(scenario, app_port, idp.jwks("rsa", "ec")))
        res = translate(load_dir(d), NodeInfo(namespace="default", labels={"app": "bench"}))
    return compile_snapshot(XdsResources(res.listeners, res.routes, res.clusters, res.endpoints))


def request(scenario: str, idp: Issuer) -> bytes:
    head = [b"GET /api/v20/items?id=42 HTTP/1.1", b"Host: bench.default.svc.cluster.local",
            b"User-Agent: bench/1.0", b"Accept: */*", b"X-Tenant: t20"]
    if scenario.startswith("jwt"):
        token = idp.token("ES256" if scenario == "jwt-es256" else "RS256", exp=int(time.time()) + 86400)
        head.append(b"Authorization: Bearer " + token.encode())
    return b"\r\n".join(head) + b"\r\n\r\n"


def bench_request_path(scenario: str, idp: Issuer, n: int, repeat: int) -> list[float]:
    import uvloop

    loop = uvloop.new_event_loop()
    try:
        snap = compiled(scenario, 9000, idp)
        ctx = Context(loop)
        ctx.swap(snap)
        listener = snap.listeners[0]
        conn = HttpConnection(ctx, listener, ctx.stats.listener(listener.name))
        down = SinkTransport()
        conn.connection_made(down)  # type: ignore[arg-type]
        cluster = ctx.clusters.get(f"inbound|{PORT}||")
        assert cluster is not None
        pool = cluster.pool(cluster.spec.endpoints[0], loop)
        up = UpstreamConnection(pool)
        up.connection_made(SinkTransport())  # type: ignore[arg-type]
        pool.put(up)
        raw = request(scenario, idp)

        def one_batch(k: int) -> None:
            for _ in range(k):
                conn.data_received(raw)
                up.data_received(RESPONSE)

        one_batch(50)
        before = down.written
        runs = _runs(one_batch, n, repeat)
        assert down.written > before and pool.idle == [up], "the request did not take the full path"
        assert not ctx.stats.local_replies, f"requests were refused: {ctx.stats.local_replies}"
        return runs
    finally:
        ctx.jwks.close()
        loop.close()


def bench_evaluate(idp: Issuer, n: int, repeat: int) -> list[float]:
    snap = compiled("rbac20", 9000, idp)
    http = snap.listeners[0].http
    assert http is not None and http.policy is not None
    rbac = http.policy.rbac
    headers = {b"host": b"bench", b"x-tenant": b"t20"}

    def batch(k: int) -> None:
        for _ in range(k):
            a = authz.Attrs(method=b"GET", path=b"/api/v20/items?id=42", host=b"bench", headers=headers,
                            source_ip="127.0.0.1", dest_port=PORT)
            assert authz.evaluate(rbac, a).allowed

    return _runs(batch, n, repeat)


def bench_jwt(idp: Issuer, alg: str, n: int, repeat: int) -> list[float]:
    snap = compiled("jwt", 9000, idp)
    http = snap.listeners[0].http
    assert http is not None and http.policy is not None and http.policy.jwt is not None
    authn = http.policy.jwt
    token = idp.token(alg, exp=int(time.time()) + 86400)
    headers = {b"authorization": b"Bearer " + token.encode()}
    now = time.time()

    def batch(k: int) -> None:
        for _ in range(k):
            assert jwt.authenticate(authn, b"/", headers, now, lambda uri: None) is not None

    return _runs(batch, n, repeat)


# --- loopback: wrk through a pillion process -------------------------------------------------


def wrk_rps(scenario: str, idp: Issuer, seconds: float, out: Path) -> float:
    from benchmarks.procs import Child, free_port, wait_http_ok

    app_port = free_port()
    cfg = out / f"cfg-{scenario}"
    cfg.mkdir(parents=True, exist_ok=True)
    (cfg / "mesh.yaml").write_text(mesh_yaml(scenario, app_port, idp.jwks("rsa", "ec")))
    app = Child("upstream", [sys.executable, "-m", "benchmarks.upstream", "http", "--port", str(app_port)],
                out / "logs" / f"upstream-{scenario}.log")
    proxy = Child("pillion", [sys.executable, "-m", "proxy", "proxy", "--config-dir", str(cfg), "--admin-port",
                              str(free_port()), "--labels", "app=bench", "--log-level", "warning"],
                  out / "logs" / f"pillion-{scenario}.log")
    try:
        raw = request(scenario, idp).decode().split("\r\n")
        headers = [h for line in raw[2:] if line for h in ("-H", line)]
        wait_http_ok(PORT, "/", 20, proxy) if scenario == "none" else time.sleep(1.0)
        cmd = ["wrk", "-t1", "-c32", f"-d{seconds:g}s", *headers, f"http://127.0.0.1:{PORT}/api/v20/items?id=42"]
        text = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
        if non2xx:
            raise RuntimeError(f"{scenario}: {non2xx.group(1)} refused requests:\n{text}")
        found = re.search(r"Requests/sec:\s+([\d.]+)", text)
        if found is None:
            raise RuntimeError(f"no wrk result for {scenario}:\n{text}")
        return float(found.group(1))
    finally:
        proxy.stop()
        app.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.authz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--wrk", action="store_true", help="also run wrk against a pillion process")
    ap.add_argument("--seconds", type=float, default=5.0, help="wrk duration per scenario")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    n, repeat = (2000, 3) if args.quick else (20000, 5)
    idp = Issuer(ISSUER)
    rows: dict[str, list[float]] = {}
    for scenario in SCENARIOS:
        rows[f"inbound request path, {scenario}"] = bench_request_path(scenario, idp, n, repeat)
    rows["authz.evaluate alone, 20 rules, last one matches"] = bench_evaluate(idp, n * 4, repeat)
    rows["jwt.authenticate alone, RS256 (2048-bit)"] = bench_jwt(idp, "RS256", n, repeat)
    rows["jwt.authenticate alone, ES256"] = bench_jwt(idp, "ES256", n, repeat)
    print(f"{'per request':<60} {'min us':>8} {'median us':>10} {'+us vs none':>12}")
    print("-" * 93)
    base = min(rows["inbound request path, none"])
    for name, runs in rows.items():
        extra = f"{min(runs) - base:>12.2f}" if name.startswith("inbound") else ""
        print(f"{name:<60} {min(runs):>8.2f} {statistics.median(runs):>10.2f} {extra}")
    result: dict[str, Any] = {"in_process_us": rows}
    if args.wrk:
        out = Path(tempfile.mkdtemp(prefix="pillion-authz-bench-"))
        rps = {s: wrk_rps(s, idp, args.seconds, out) for s in SCENARIOS}
        print(f"\n{'loopback, wrk -t1 -c32, one pillion worker':<60} {'req/s':>10} {'vs none':>8}")
        print("-" * 80)
        for s, value in rps.items():
            print(f"{s:<60} {value:>10.0f} {value / rps['none']:>8.2f}")
        result["wrk_rps"] = rps
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
