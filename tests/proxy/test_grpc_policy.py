"""Security policy seen by gRPC clients: denials are gRPC statuses, not HTTP pages.

A real grpcio client calls a real grpcio server through the sidecar's inbound
(GRPC) port. AuthorizationPolicy refusals reach the client as
PERMISSION_DENIED, RequestAuthentication refusals as UNAUTHENTICATED, both as
trailers-only responses (Envoy's behaviour), and the app never sees the call.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from tests.helpers.config import service_entry, sidecar, write
from tests.helpers.jwks import Issuer
from tests.helpers.net import ProxyHandle, free_port, standalone_proxy
from tests.proxy.test_grpc import App

HOST = "greeter.default.svc.cluster.local"


def policy_yaml(port: int, app_port: int, idp: Issuer) -> str:
    jwks = json.dumps(idp.jwks())
    return "---\n".join([
        service_entry("greeter", HOST, [("grpc", port, "GRPC")], [("127.0.0.1", {"grpc": port}, {"app": "greeter"})]),
        sidecar([], ingress=[(port, "GRPC", f"127.0.0.1:{app_port}")], app="greeter"),
        f"""apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: default}}
spec:
  selector: {{matchLabels: {{app: greeter}}}}
  jwtRules:
  - issuer: {idp.issuer}
    jwks: {jwks}
""",
        """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: greeter, namespace: default}
spec:
  selector: {matchLabels: {app: greeter}}
  action: ALLOW
  rules:
  - to: [{operation: {paths: ["/test.Svc/Echo"]}}]
""",
    ])


@contextlib.asynccontextmanager
async def guarded(tmp_path: Path, idp: Issuer) -> AsyncIterator[tuple[App, grpc.aio.Channel, ProxyHandle]]:
    app = App()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((app.handler(),))
    app_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        port = free_port()
        write(tmp_path, policy_yaml(port, app_port, idp))
        async with standalone_proxy(tmp_path, labels={"app": "greeter"}, drain_seconds=0.5) as px:
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[
                ("grpc.default_authority", HOST), ("grpc.enable_retries", 0)])
            try:
                yield app, channel, px
            finally:
                await channel.close()
    finally:
        await server.stop(0)


async def test_authorization_policy_denial_is_permission_denied(tmp_path: Path) -> None:
    idp = Issuer()
    async with guarded(tmp_path, idp) as (app, ch, px):
        assert await ch.unary_unary("/test.Svc/Echo")(b"hi", timeout=10) == b"echo:hi"
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await ch.unary_unary("/test.Svc/Fail")(b"x", timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert e.value.details() == "RBAC: access denied"
        assert ("x-pillion-flags", "RBAC") in tuple(e.value.trailing_metadata())
        assert app.calls == {"Echo": 1}  # the denied call never reached the app
        # Istio's labels for gRPC: request_protocol "grpc" and the gRPC status each client got
        _, prom = await px.admin_get("/stats/prometheus")
        totals = [line for line in prom.decode().splitlines() if line.startswith("istio_requests_total{")]
        assert any('request_protocol="grpc"' in t and 'grpc_response_status="0"' in t and t.endswith(" 1")
                   for t in totals), totals
        assert any('response_flags="RBAC"' in t and 'grpc_response_status="7"' in t for t in totals), totals


async def test_invalid_jwt_is_unauthenticated_and_a_valid_one_passes(tmp_path: Path) -> None:
    idp = Issuer()
    async with guarded(tmp_path, idp) as (app, ch, _px):
        echo = ch.unary_unary("/test.Svc/Echo")
        good = idp.token()
        assert await echo(b"a", metadata=(("authorization", f"Bearer {good}"),), timeout=10) == b"echo:a"
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await echo(b"b", metadata=(("authorization", f"Bearer {good[:-8]}AAAAAAAA"),), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert app.calls == {"Echo": 1}
