"""A real Envoy accepts every shape of translated jwt_authn and RBAC filter (`envoy --mode validate`)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from control.translate import load_text, translate
from control.translate.bootstrap import envoy_bootstrap
from tests.control.test_translate_authz import JWKS, authz_policy, request_auth
from tests.control.test_translate_envoy import ENVOY
from tests.control.test_translate_security import SERVER, SERVER_SIDECAR, join
from tests.control.translate_fixtures import write_mesh_certs

EVERYTHING = [
    authz_policy("allow", """\
  selector: {matchLabels: {app: ratings}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/shop/sa/web, "*/sa/admin", "cluster.local/*"]
        notNamespaces: ["test-*", "*-dev"]
        requestPrincipals: ["https://issuer.example/*", "*"]
        ipBlocks: [10.0.0.0/8, "2001:db8::/32"]
        notRemoteIpBlocks: [192.168.1.1]
    to:
    - operation:
        hosts: [ratings.shop.svc.cluster.local, "*.example.com", "api.*", "ratings:9080"]
        notPorts: ["15000"]
        methods: [GET, POST]
        paths: [/exact, "/prefix/*", "*.css", "/items/{*}/detail", "/files/{**}", "*"]
        notPaths: ["/admin*"]
    when:
    - {key: "request.headers[x-user]", values: ["admin-*", "*"], notValues: [guest]}
    - {key: source.ip, values: [10.1.0.0/16]}
    - {key: remote.ip, notValues: [203.0.113.7]}
    - {key: source.namespace, values: [shop]}
    - {key: source.principal, values: ["*"]}
    - {key: request.auth.principal, values: [https://issuer.example/alice]}
    - {key: request.auth.audiences, values: [web]}
    - {key: request.auth.presenter, values: ["*"]}
    - {key: "request.auth.claims[groups]", values: [admins]}
    - {key: "request.auth.claims[org][tier]", values: ["gold*"]}
    - {key: destination.ip, values: [10.1.0.1]}
    - {key: destination.port, values: ["9080"]}
    - {key: connection.sni, values: ["*.shop.svc.cluster.local"]}
  - {}
"""),
    authz_policy("deny", "  action: DENY\n  rules:\n  - to: [{operation: {methods: [DELETE], ports: ['3306']}}]\n"),
    authz_policy("audit", "  action: AUDIT\n  rules:\n  - to: [{operation: {paths: [/admin*]}}]\n", "istio-system"),
    request_auth(extra="    audiences: [web]\n    outputPayloadToHeader: x-jwt\n"
                       "    outputClaimToHeaders: [{header: x-sub, claim: sub}]\n"),
    request_auth("remote", extra="").replace(f"jwks: '{JWKS}'", "jwksUri: https://keys.example/jwks")
    .replace("https://issuer.example", "https://other.example"),
]


@pytest.mark.skipif(not ENVOY.exists(), reason=f"no Envoy binary at {ENVOY}")
def test_envoy_validates_every_authz_shape(tmp_path: Path) -> None:
    secrets = write_mesh_certs(tmp_path)
    resources = translate(load_text(join(SERVER_SIDECAR, *EVERYTHING)), SERVER)
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(envoy_bootstrap(resources, admin_port=0, secrets=secrets), indent=1))
    result = subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True, text=True, timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "OK" in output and "Deprecated" not in output
