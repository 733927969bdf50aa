"""AuthorizationPolicy and RequestAuthentication end to end, with real sidecars on loopback.

The mTLS mesh of test_mesh_mtls.py (certificates from the CA service, STRICT
mutual TLS): productpage -> reviews, plus an intruder with its own service
account; policies on reviews decide by principal, namespace, method, path and
JWT. Then a plaintext (PeerAuthentication DISABLE) sidecar for the TCP
network RBAC.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.helpers.jwks import Issuer, JwksServer
from tests.helpers.net import (
    ProxyHandle,
    RawClient,
    eventually,
    free_port,
    one_request,
    standalone_proxy,
)
from tests.helpers.upstreams import RecordingUpstream, TcpServer
from tests.proxy import test_mesh_mtls
from tests.proxy.test_mesh_mtls import HOST, mesh_yaml

ca = test_mesh_mtls.ca  # the CA service fixture (gRPC on loopback, tokens for each service account)

PRODUCTPAGE = "cluster.local/ns/default/sa/productpage"


def policy(name: str, spec: str, namespace: str = "default") -> str:
    return (f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}")


@asynccontextmanager
async def reviews_mesh(tmp_path: Path, address: str, *docs: str,
                       client: str = "productpage") -> AsyncIterator[tuple[RecordingUpstream, int, ProxyHandle]]:
    """reviews (its app and sidecar, with `docs` applied) and a client sidecar with identity `client`."""
    async with RecordingUpstream("reviews-app") as app:
        egress, ingress = free_port(), free_port()
        cfg = tmp_path / "cfg"
        cfg.mkdir(exist_ok=True)
        (cfg / "mesh.yaml").write_text("---\n".join([mesh_yaml(egress, ingress, app.port), *docs]))
        async with standalone_proxy(cfg, labels={"app": "reviews"}, service_account="reviews", ca_address=address,
                                    token_file=str(tmp_path / "reviews.token")) as rv, \
                standalone_proxy(cfg, labels={"app": "productpage"}, service_account=client, ca_address=address,
                                 token_file=str(tmp_path / f"{client}.token")):
            yield app, egress, rv


async def get(port: int, path: str = "/", method: str = "GET", headers: dict[str, str] | None = None,
              host: str = HOST) -> tuple[int, str, str, bytes]:
    c = await RawClient.connect(port)
    try:
        r = await c.request(method, path, host, headers=headers)
        return r.status, r.header("x-pillion-flags") or "", r.header("content-type") or "", r.body
    finally:
        await c.close()


async def metrics(px: ProxyHandle) -> str:
    return (await px.admin_get("/stats/prometheus"))[1].decode()


ALLOW_PRODUCTPAGE = policy("allow-productpage", f"""\
  selector: {{matchLabels: {{app: reviews}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: [{PRODUCTPAGE}]}}}}]
""")


async def test_principal_allow_lets_productpage_in_and_keeps_another_account_out(tmp_path, ca):
    _, address, _ = ca
    async with reviews_mesh(tmp_path, address, ALLOW_PRODUCTPAGE) as (app, egress, rv):
        status, _, _, body = await get(egress, "/reviews/1")
        assert status == 200 and body == b"hello from reviews-app"
        text = await metrics(rv)
        assert 'pillion_rbac_allowed_total{policy="ns[default]-policy[allow-productpage]-rule[0]"} 1' in text
    async with reviews_mesh(tmp_path, address, ALLOW_PRODUCTPAGE, client="intruder") as (app, egress, rv):
        seen = len(app.requests)
        status, flags, ctype, body = await get(egress, "/reviews/1")
        assert (status, flags, ctype, body) == (403, "RBAC", "text/plain", b"RBAC: access denied")
        assert len(app.requests) == seen  # never reached the app
        text = await metrics(rv)
        assert 'pillion_rbac_denied_total{policy="none"} 1' in text
        assert 'response_code="403",response_flags="RBAC"' in text


async def test_namespace_deny_and_method_path_rules_and_the_seed_allow_get(tmp_path, ca):
    _, address, _ = ca
    deny_admin = policy("deny-admin", """\
  action: DENY
  rules:
  - from: [{source: {namespaces: [default]}}]
    to: [{operation: {paths: ["/admin*"]}}]
""")
    seed = (Path(__file__).parents[1] / "control" / "data" / "seed_authorizationpolicy_allow_get.yaml").read_text()
    async with reviews_mesh(tmp_path, address, deny_admin, seed) as (_app, egress, rv):
        assert (await get(egress, "/reviews/1"))[0] == 200
        assert (await get(egress, "/reviews/1", "POST"))[:2] == (403, "RBAC")  # allow-get: GET only
        assert (await get(egress, "/admin/users"))[:2] == (403, "RBAC")  # the namespace's DENY
        assert (await get(egress, "/./admin/users"))[0] == 403  # matched on the normalized path
        assert (await get(egress, "/reviews/../admin"))[0] == 403
        text = await metrics(rv)
        assert 'pillion_rbac_denied_total{policy="ns[default]-policy[deny-admin]-rule[0]"} 3' in text
        assert 'pillion_rbac_denied_total{policy="none"} 1' in text


async def test_jwt_required_path_with_a_locally_served_jwks(tmp_path, ca):
    _, address, _ = ca
    idp = Issuer()
    async with JwksServer(idp.jwks("rsa", "ec")) as jwks:
        docs = [f"""\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: default}}
spec:
  selector: {{matchLabels: {{app: reviews}}}}
  jwtRules:
  - issuer: {idp.issuer}
    jwksUri: {jwks.uri}
    outputPayloadToHeader: x-jwt-payload
""", policy("require-jwt", """\
  selector: {matchLabels: {app: reviews}}
  rules:
  - from: [{source: {requestPrincipals: ["*"]}}]
    to: [{operation: {paths: ["/secure*"]}}]
  - to: [{operation: {notPaths: ["/secure*"]}}]
""")]
        async with reviews_mesh(tmp_path, address, *docs) as (app, egress, rv):
            await eventually(lambda: rv.supervisor is not None and jwks.requests >= 1)
            token = idp.token()
            bearer = {"authorization": f"Bearer {token}"}
            # The proxy fetches the JWKS in the background: wait until a good token passes.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while (await get(egress, "/secure/x", headers=bearer))[0] != 200:
                assert loop.time() < deadline, "the JWKS was never fetched"
            seen = app.requests[-1]
            assert seen.header("authorization") is None  # forwardOriginalToken is false
            assert seen.header("x-jwt-payload") == token.split(".")[1]
            assert (await get(egress, "/public"))[0] == 200  # no token: authorization decides
            assert (await get(egress, "/secure/x"))[:2] == (403, "RBAC")  # no token, required path
            status, flags, _, body = await get(egress, "/secure/x", headers={
                "authorization": f"Bearer {idp.token(exp=1)}"})
            assert (status, flags, body) == (401, "JWT", b"Jwt is expired")
            status, _, _, body = await get(egress, "/public", headers={"authorization": "Bearer not.a.jwt"})
            assert status == 401  # an invalid token is refused even where none is needed
            forged = {"authorization": f"Bearer {idp.hs256_with_public_key()}"}
            assert (await get(egress, "/secure/x", headers=forged))[0] == 401
            # A client cannot forge the payload header without a token.
            await get(egress, "/public", headers={"x-jwt-payload": "eyJzdWIiOiJhZG1pbiJ9"})
            assert app.requests[-1].header("x-jwt-payload") is None
            es = {"authorization": f"Bearer {idp.token('ES256')}"}
            assert (await get(egress, "/secure/y", headers=es))[0] == 200


async def test_tcp_network_rbac_closes_refused_connections(tmp_path):
    async with TcpServer() as echo:
        port = free_port()
        cfg = tmp_path / "cfg"
        cfg.mkdir()

        def write(allowed_ip: str) -> None:
            (cfg / "mesh.yaml").write_text(f"""\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: default}}
spec: {{mtls: {{mode: DISABLE}}}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: db, namespace: default}}
spec:
  ingress:
  - port: {{number: {port}, protocol: TCP, name: tcp}}
    bind: 127.0.0.1
    defaultEndpoint: 127.0.0.1:{echo.port}
---
{policy("allow-ip", f'''  action: ALLOW
  rules:
  - from: [{{source: {{ipBlocks: ["{allowed_ip}"]}}}}]
    to: [{{operation: {{ports: ["{port}"], methods: [GET]}}}}]
  - from: [{{source: {{ipBlocks: ["{allowed_ip}"]}}}}]
    to: [{{operation: {{ports: ["{port}"]}}}}]
''')}""")

        write("10.0.0.0/8")
        async with standalone_proxy(cfg, labels={"app": "db"}) as px:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello")
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed without a byte
            writer.close()
            assert echo.connections == 0
            assert 'pillion_rbac_denied_total{policy="none"} 1' in await metrics(px)
        write("127.0.0.1")
        async with standalone_proxy(cfg, labels={"app": "db"}):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello")
            assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
            writer.close()


@pytest.mark.parametrize("bad", ["cidr", "field"])
async def test_a_bad_policy_keeps_the_proxy_from_starting_with_file_resource_and_field(tmp_path, bad):
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    spec = ("  rules:\n  - from: [{source: {ipBlocks: [10.0.0.300/8]}}]\n" if bad == "cidr"
            else "  rules:\n  - to: [{operation: {verbs: [GET]}}]\n")
    (cfg / "authz.yaml").write_text(policy("broken", spec))
    with pytest.raises(RuntimeError):
        async with standalone_proxy(cfg):
            pass
    from control.translate import ConfigError, load_dir

    with pytest.raises(ConfigError) as caught:
        load_dir(cfg)
    (problem,) = caught.value.problems
    assert problem.resource == "AuthorizationPolicy default/broken"
    assert problem.field == ("spec.rules[0].from[0].source.ipBlocks[0]" if bad == "cidr"
                             else "spec.rules[0].to[0].operation.verbs")
    assert str(cfg / "authz.yaml") in str(problem)


async def test_plaintext_request_reaches_a_permissive_port_but_no_principal_matches(tmp_path):
    async with RecordingUpstream("app") as app:
        port = free_port()
        cfg = tmp_path / "cfg"
        cfg.mkdir()
        (cfg / "mesh.yaml").write_text(f"""\
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: web, namespace: default}}
spec:
  ingress:
  - port: {{number: {port}, protocol: HTTP, name: http}}
    bind: 127.0.0.1
    defaultEndpoint: 127.0.0.1:{app.port}
---
{ALLOW_PRODUCTPAGE.replace("app: reviews", "app: web")}""")
        async with standalone_proxy(cfg, labels={"app": "web"}):
            r = await one_request(port, b"GET / HTTP/1.1\r\nhost: web\r\n\r\n")
            assert (r.status, r.body) == (403, b"RBAC: access denied")
