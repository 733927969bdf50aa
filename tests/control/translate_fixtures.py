"""Shared YAML and helpers for the translator tests (tests/control/test_translate_*.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from control.translate import ConfigError, Problem, Resources, load_text

DATA = Path(__file__).parent / "data"

# The seed's VirtualService and DestinationRule name the short host "reviews";
# this registry gives it a ServiceEntry and three workloads.
REVIEWS_REGISTRY = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: reviews
  namespace: default
spec:
  hosts: [reviews.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {number: 9080, name: http, targetPort: 9000}
  workloadSelector:
    labels: {app: reviews}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v1, namespace: default}
spec:
  address: 10.0.0.1
  labels: {app: reviews, version: v1}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v2, namespace: default}
spec:
  address: 10.0.0.2
  ports: {http: 9081}
  weight: 3
  labels: {app: reviews, version: v2}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v3, namespace: default}
spec:
  address: 10.0.0.3
  labels: {app: reviews, version: v3}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ratings-1, namespace: default}
spec:
  address: 10.0.0.9
  labels: {app: ratings, version: v1}
"""

PRODUCTPAGE_SIDECAR = """\
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: productpage, namespace: default}
spec:
  workloadSelector:
    labels: {app: productpage}
  ingress:
  - port: {number: 9090, name: http-web}
    defaultEndpoint: 127.0.0.1:8080
  egress:
  - port: {number: 9080, name: http}
    bind: 127.0.0.1
    captureMode: NONE
    hosts: ["./*"]
"""


def seed(name: str) -> str:
    return (DATA / name).read_text()


def seed_reviews() -> str:
    """The seed's VirtualService and DestinationRule, unchanged, as one multi-document text."""
    return (
        seed("seed_virtualservice_reviews.yaml")
        + "---\n"
        + seed("seed_destinationrule_reviews.yaml")
    )


def problems_of(text: str, file: str = "mesh.yaml", **kwargs: bool) -> list[Problem]:
    with pytest.raises(ConfigError) as caught:
        load_text(text, file, **kwargs)
    return caught.value.problems


def only_problem(text: str, file: str = "mesh.yaml", **kwargs: bool) -> Problem:
    found = problems_of(text, file, **kwargs)
    assert len(found) == 1, "\n".join(str(p) for p in found)
    return found[0]


def named(resources: Resources) -> dict[str, object]:
    """Every resource of `resources` by name (listeners, routes, clusters; endpoints as "cla:NAME")."""
    table: dict[str, object] = {}
    for listener in resources.listeners:
        table[listener.name] = listener
    for route in resources.routes:
        table[f"route:{route.name}"] = route
    for cluster in resources.clusters:
        table[cluster.name] = cluster
    for assignment in resources.endpoints:
        table[f"cla:{assignment.cluster_name}"] = assignment
    return table


def write_mesh_certs(
    directory: Path, trust_domain: str = "cluster.local"
) -> dict[str, str | tuple[str, str]]:
    """A throwaway root CA and one workload certificate (EC P-256) as PEM files in `directory`.

    Returns the `secrets` argument of `envoy_bootstrap`:
    {"default": (chain path, key path), "ROOTCA": root path}.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pillion test root")])
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(root_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}/ns/default/sa/default")]
            ),
            critical=True,
        )
        .sign(root_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "root.pem").write_bytes(root.public_bytes(pem))
    (directory / "cert-chain.pem").write_bytes(leaf.public_bytes(pem) + root.public_bytes(pem))
    (directory / "key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return {
        "default": (str(directory / "cert-chain.pem"), str(directory / "key.pem")),
        "ROOTCA": str(directory / "root.pem"),
    }
