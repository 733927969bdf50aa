"""The mesh's mutual TLS end to end: Istio YAML, certificates from the CA service, rotation.

Two sidecars (productpage -> reviews) get their certificates from a real
CA service (gRPC, on loopback) with their bootstrap tokens; reviews is STRICT
by PeerAuthentication; productpage originates mTLS to it by auto mTLS (the
WorkloadEntry carries Istio's tlsMode label). Then certificates rotate while
requests flow.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from control.ca_service import (
    CaService,
    issue_workload_token,
    load_or_create_ca,
    load_or_create_token_key,
)
from tests.helpers.net import RawClient, free_port, one_request, standalone_proxy
from tests.helpers.upstreams import RecordingUpstream
from tests.proxy.test_mesh_and_timeouts import two_sidecar_mesh

HOST = "reviews.default.svc.cluster.local"


def mesh_yaml(egress: int, ingress: int, app_port: int) -> str:
    """The two-sidecar mesh with auto mTLS and STRICT mesh-wide."""
    return two_sidecar_mesh(egress, ingress, app_port, mtls=True)


@pytest.fixture
async def ca(tmp_path):
    state = tmp_path / "ca"
    service = CaService(load_or_create_ca(state, "cluster.local"), load_or_create_token_key(state))
    server = grpc.aio.server()
    service.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    for sa in ("productpage", "reviews", "intruder"):
        (tmp_path / f"{sa}.token").write_text(issue_workload_token(state, "default", sa, 1))
    yield service, f"127.0.0.1:{port}", server
    await server.stop(0)


async def test_sidecars_get_certificates_and_talk_mtls(tmp_path, ca):
    service, address, _ = ca
    async with RecordingUpstream("reviews-app") as app:
        egress, ingress = free_port(), free_port()
        cfg = tmp_path / "cfg"
        cfg.mkdir()
        (cfg / "mesh.yaml").write_text(mesh_yaml(egress, ingress, app.port))
        async with standalone_proxy(cfg, labels={"app": "reviews"}, service_account="reviews", ca_address=address,
                                    token_file=str(tmp_path / "reviews.token")) as rv, \
                standalone_proxy(cfg, labels={"app": "productpage"}, service_account="productpage",
                                 ca_address=address, token_file=str(tmp_path / "productpage.token")) as pp:
            assert service.issued == 2
            r = await one_request(egress, f"GET /x HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode())
            assert r.status == 200 and r.body == b"hello from reviews-app"
            xfcc = app.requests[-1].header("x-forwarded-client-cert") or ""
            assert "URI=spiffe://cluster.local/ns/default/sa/productpage" in xfcc
            assert "By=spiffe://cluster.local/ns/default/sa/reviews" in xfcc
            # STRICT: a plaintext client is refused at reviews' port.
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError, TimeoutError)):
                await one_request(ingress, f"GET / HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode(), timeout=3)
            dump = (await pp.admin_get("/config_dump"))[1].decode()
            assert '"identity": "spiffe://cluster.local/ns/default/sa/productpage"' in dump
            assert "[redacted]" not in dump and "PRIVATE KEY" not in dump
            _, metrics = await rv.admin_get("/stats/prometheus")
            assert b"pillion_cert_expiry_timestamp_seconds " in metrics


async def test_a_token_cannot_buy_another_identity(tmp_path, ca):
    service, address, _ = ca
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "mesh.yaml").write_text(mesh_yaml(free_port(), free_port(), free_port()))
    # The intruder's token, asking for the reviews identity: refused, and the proxy stays not ready.
    async with standalone_proxy(cfg, labels={"app": "reviews"}, service_account="reviews", ca_address=address,
                                token_file=str(tmp_path / "intruder.token"), wait_ready=False) as px:
        certs = px.supervisor.certs
        await certs.wait_for(lambda: certs.failures > 0, 10)
        status, body = await px.admin_get("/ready")
        assert status == 503 and b"no workload certificate" in body
        assert "PERMISSION_DENIED" in px.supervisor.certs.last_error
        assert service.denied["wrong_san"] >= 1


async def test_rotation_under_traffic_keeps_every_request(tmp_path, ca):
    _service, address, server = ca
    async with RecordingUpstream("reviews-app") as app:
        egress, ingress = free_port(), free_port()
        cfg = tmp_path / "cfg"
        cfg.mkdir()
        (cfg / "mesh.yaml").write_text(mesh_yaml(egress, ingress, app.port))
        short = 2.0 / 3600  # 2-second certificates: renewed about every second
        async with standalone_proxy(cfg, labels={"app": "reviews"}, service_account="reviews", ca_address=address,
                                    token_file=str(tmp_path / "reviews.token"), cert_validity_hours=short) as rv, \
                standalone_proxy(cfg, labels={"app": "productpage"}, service_account="productpage",
                                 ca_address=address, token_file=str(tmp_path / "productpage.token"),
                                 cert_validity_hours=short) as pp:
            first = rv.supervisor.certs.status()["serial"]
            kept = await RawClient.connect(egress)
            statuses = []
            loop = asyncio.get_running_loop()
            end = loop.time() + 60
            while rv.supervisor.certs.renewals < 2 or pp.supervisor.certs.renewals < 2:
                assert loop.time() < end, "certificates were not renewed"
                statuses.append((await kept.request("GET", "/kept", HOST)).status)
                fresh = await one_request(egress, f"GET /fresh HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n".encode())
                statuses.append(fresh.status)
            assert set(statuses) == {200}, statuses
            assert rv.supervisor.certs.status()["serial"] != first
            assert rv.supervisor.certs.renewals <= 4  # renewed at about half-life, not in a loop
            assert len(statuses) > 20
            await kept.close()
            # The CA goes away: the proxy keeps its current certificate and counts the failures.
            await server.stop(0)
            certs = rv.supervisor.certs
            before = certs.failures
            await certs.wait_for(lambda: certs.failures > before, 30)
            r = await one_request(egress, f"GET /after HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode())
            assert r.status in (200, 503)  # the 2 s certificate may have expired by now; never a hang
