"""Mutual TLS resources as a static Envoy bootstrap (SDS secrets from files), and Envoy's verdict."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from control.translate import Resources, load_text, translate
from control.translate.bootstrap import envoy_bootstrap
from tests.control.test_translate_envoy import ENVOY
from tests.control.test_translate_security import (
    HOST,
    REGISTRY,
    SERVER,
    SERVER_SIDECAR,
    join,
    peer_auth,
)
from tests.control.translate_fixtures import named, write_mesh_certs

# --- static bootstrap and Envoy ------------------------------------------------------------

MIXED = [
    peer_auth("w", "shop", "STRICT", "app: ratings", "3306: {mode: PERMISSIVE}"),
    """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9081, name: http}]
  endpoints:
  - {address: 10.5.0.1, serviceAccount: reviews}
  - {address: 10.5.0.2}
  - {address: 10.5.0.3, labels: {security.istio.io/tlsMode: istio}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews.shop.svc.cluster.local
  trafficPolicy:
    tls: {mode: ISTIO_MUTUAL}
  subsets:
  - name: simple
    trafficPolicy: {tls: {mode: SIMPLE, caCertificates: CA, subjectAltNames: [reviews.example]}}
  - name: mutual
    trafficPolicy: {tls: {mode: MUTUAL, caCertificates: CA, clientCertificate: CERT, privateKey: KEY}}
""",
]


def mixed_resources(files: dict[str, str | tuple[str, str]] | None = None) -> Resources:
    text = join(REGISTRY, SERVER_SIDECAR, *MIXED)
    if files is not None:
        chain, key = files["default"]
        text = text.replace("CA,", f"{files['ROOTCA']},").replace("CERT", chain).replace("KEY", key)
    return translate(load_text(text), SERVER)


def test_mixed_resources_have_every_shape() -> None:
    table = named(mixed_resources())
    assert [c.name for c in table["0.0.0.0_9080"].filter_chains] == ["tls"]  # type: ignore[attr-defined]
    assert [c.name for c in table["0.0.0.0_3306"].filter_chains] == ["tls", "plaintext"]  # type: ignore[attr-defined]
    assert len(table[f"outbound|9080||{HOST}"].transport_socket_matches) == 2  # type: ignore[attr-defined]
    assert table["outbound|9081||reviews.shop.svc.cluster.local"].HasField("transport_socket")  # type: ignore[attr-defined]


def test_bootstrap_makes_sds_secrets_static() -> None:
    resources = mixed_resources()
    with pytest.raises(ValueError, match="pass secrets= with files for ROOTCA, default"):
        envoy_bootstrap(resources, admin_port=0)
    with pytest.raises(ValueError, match=r"files for ROOTCA$"):
        envoy_bootstrap(resources, admin_port=0, secrets={"default": ("c", "k")})
    secrets = {"default": ("/c.pem", "/k.pem"), "ROOTCA": "/ca.pem"}
    bootstrap = envoy_bootstrap(resources, admin_port=0, secrets=secrets)
    assert bootstrap["static_resources"]["secrets"] == [
        {"name": "ROOTCA", "validation_context": {"trusted_ca": {"filename": "/ca.pem"}}},
        {
            "name": "default",
            "tls_certificate": {
                "certificate_chain": {"filename": "/c.pem"},
                "private_key": {"filename": "/k.pem"},
            },
        },
    ]
    text = json.dumps(bootstrap)
    assert '"sds_config"' not in text and '"ads"' not in text
    assert '"tls_certificate_sds_secret_configs": [{"name": "default"}]' in text
    # the xDS resources themselves keep their ADS references
    listener = next(item for item in resources.listeners if item.name == "0.0.0.0_9080")
    context = tls_pb2.DownstreamTlsContext()
    listener.filter_chains[0].transport_socket.typed_config.Unpack(context)
    assert context.common_tls_context.tls_certificate_sds_secret_configs[0].HasField("sds_config")


def test_bootstrap_without_tls_needs_no_secrets() -> None:
    text = join(REGISTRY, SERVER_SIDECAR, peer_auth("ns", "shop", "DISABLE"))
    resources = translate(load_text(text.replace("security.istio.io/tlsMode", "x")), SERVER)
    assert "secrets" not in envoy_bootstrap(resources, admin_port=0)["static_resources"]


def test_translation_with_tls_is_deterministic() -> None:
    assert mixed_resources().digest() == mixed_resources().digest()
    assert (
        mixed_resources().digest()
        != translate(load_text(join(REGISTRY, SERVER_SIDECAR)), SERVER).digest()
    )


@pytest.mark.skipif(not ENVOY.exists(), reason=f"no Envoy binary at {ENVOY}")
def test_envoy_validates_mutual_tls_config(tmp_path: Path) -> None:
    """STRICT and PERMISSIVE listeners; ISTIO_MUTUAL, SIMPLE, MUTUAL and auto-mTLS clusters."""
    secrets = write_mesh_certs(tmp_path)
    resources = mixed_resources(secrets)
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(envoy_bootstrap(resources, admin_port=0, secrets=secrets), indent=1))
    result = subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr
