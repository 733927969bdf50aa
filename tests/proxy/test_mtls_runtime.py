"""mTLS in the data plane, on real TLS handshakes over loopback.

The proxies start from Istio YAML (two sidecars: productpage -> reviews ->
app) and certificates issued by a test mesh CA (``--cert-dir``); the TLS
settings are then applied to the compiled snapshot directly, so these tests
exercise the run time (termination, sniffing, origination, identity checks)
on their own. The YAML -> xDS side is tested in tests/control.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import ssl
from pathlib import Path

import pytest

from proxy.model import SanMatch, TlsClient, TlsServer
from tests.helpers.net import ProxyHandle, RawClient, free_port, one_request, standalone_proxy
from tests.helpers.pki import MeshPki, utcnow
from tests.helpers.upstreams import RecordingUpstream
from tests.proxy.test_mesh_and_timeouts import two_sidecar_mesh

TD = "cluster.local"
REVIEWS_ID = f"spiffe://{TD}/ns/default/sa/reviews"
PRODUCTPAGE_ID = f"spiffe://{TD}/ns/default/sa/productpage"
SERVER_TLS = TlsServer("default", "ROOTCA", True, (SanMatch("URI", f"spiffe://{TD}/", prefix=True),), ("http/1.1",))


async def make_inbound_tls(px: ProxyHandle, *, plaintext: bool) -> None:
    snap = px.supervisor.snapshot
    listeners = tuple(dataclasses.replace(ls, tls=SERVER_TLS, plaintext=plaintext) for ls in snap.listeners)
    await px.supervisor.workers[0].apply(dataclasses.replace(snap, listeners=listeners, version="tls-in"))


async def make_outbound_mtls(px: ProxyHandle, expected: str = REVIEWS_ID) -> None:
    snap = px.supervisor.snapshot
    tls = TlsClient("default", "ROOTCA", "outbound_.9080_._.reviews", (SanMatch("URI", expected),), ("http/1.1",))
    clusters = {n: dataclasses.replace(c, endpoints=tuple(dataclasses.replace(e, tls=tls) for e in c.endpoints))
                for n, c in snap.clusters.items()}
    await px.supervisor.workers[0].apply(dataclasses.replace(snap, clusters=clusters, version="tls-out"))


def client_context(pki: MeshPki, tmp: Path, namespace: str = "default", sa: str = "productpage",
                   **issue: object) -> ssl.SSLContext:
    chain, key, roots = pki.client_files(tmp, namespace, sa, **issue)
    ctx = ssl.create_default_context(cafile=roots)
    ctx.check_hostname = False
    ctx.load_cert_chain(chain, key)
    return ctx


async def tls_get(port: int, ctx: ssl.SSLContext, path: str = "/") -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    if not raw:
        raise ConnectionError("closed without a response")  # TLS 1.3: a refused client cert shows up here
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@pytest.fixture
def pki() -> MeshPki:
    return MeshPki(TD)


async def test_strict_inbound_accepts_mesh_clients_and_refuses_the_rest(tmp_path, pki):
    async with RecordingUpstream("reviews-app") as app:
        egress, ingress = free_port(), free_port()
        (tmp_path / "cfg").mkdir()
        (tmp_path / "cfg" / "mesh.yaml").write_text(two_sidecar_mesh(egress, ingress, app.port))
        certs = pki.issue(tmp_path / "reviews-certs", "default", "reviews")
        async with standalone_proxy(tmp_path / "cfg", labels={"app": "reviews"}, cert_dir=certs) as px:
            await make_inbound_tls(px, plaintext=False)
            # A mesh client with a valid certificate gets through, and the app learns who called.
            status, _, body = await tls_get(ingress, client_context(pki, tmp_path / "c1"))
            assert status == 200 and body == b"hello from reviews-app"
            xfcc = app.requests[-1].header("x-forwarded-client-cert")
            assert xfcc is not None and f"URI={PRODUCTPAGE_ID}" in xfcc and f"By={REVIEWS_ID}" in xfcc
            assert "Hash=" in xfcc
            # Plaintext is refused on a STRICT port: closed without an answer.
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError, TimeoutError)):
                await one_request(ingress, b"GET / HTTP/1.1\r\nhost: reviews\r\n\r\n", timeout=3)
            # A client without a certificate, from another CA, or expired: each handshake fails.
            no_cert = ssl.create_default_context(cafile=str(certs / "root-cert.pem"))
            no_cert.check_hostname = False
            other_ca = client_context(MeshPki(TD), tmp_path / "c2")
            other_ca.load_verify_locations(cafile=str(certs / "root-cert.pem"))
            expired = client_context(pki, tmp_path / "c3", ttl=dt.timedelta(hours=1),
                                     now=utcnow() - dt.timedelta(hours=2))
            for ctx in (no_cert, other_ca, expired):
                with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                    await tls_get(ingress, ctx)
            _, metrics = await px.admin_get("/stats/prometheus")
            text = metrics.decode()
            assert 'pillion_tls_handshake_failures_total{reason="plaintext_rejected"} 1' in text
            reasons = {line.split('"')[1] for line in text.splitlines()
                       if line.startswith("pillion_tls_handshake_failures_total{")}
            assert {"no_client_cert", "untrusted", "expired"} <= reasons, reasons
            assert len(app.requests) == 1  # nothing refused ever reached the app


async def test_permissive_inbound_serves_tls_and_plaintext_on_one_port(tmp_path, pki):
    async with RecordingUpstream("reviews-app") as app:
        egress, ingress = free_port(), free_port()
        (tmp_path / "cfg").mkdir()
        (tmp_path / "cfg" / "mesh.yaml").write_text(two_sidecar_mesh(egress, ingress, app.port))
        certs = pki.issue(tmp_path / "reviews-certs", "default", "reviews")
        async with standalone_proxy(tmp_path / "cfg", labels={"app": "reviews"}, cert_dir=certs) as px:
            await make_inbound_tls(px, plaintext=True)
            status, _, _ = await tls_get(ingress, client_context(pki, tmp_path / "c1"))
            assert status == 200
            r = await one_request(ingress, b"GET /plain HTTP/1.1\r\nhost: reviews\r\nx-forwarded-client-cert: forged\r\n\r\n")
            assert r.status == 200
            # Over plaintext a client-supplied XFCC is dropped, never forwarded.
            assert app.requests[-1].path == "/plain" and app.requests[-1].header("x-forwarded-client-cert") is None


async def test_sidecar_to_sidecar_mtls_and_identity_check(tmp_path, pki):
    async with RecordingUpstream("reviews-app") as app:
        egress, ingress = free_port(), free_port()
        (tmp_path / "cfg").mkdir()
        (tmp_path / "cfg" / "mesh.yaml").write_text(two_sidecar_mesh(egress, ingress, app.port))
        rv_certs = pki.issue(tmp_path / "reviews-certs", "default", "reviews")
        pp_certs = pki.issue(tmp_path / "pp-certs", "default", "productpage")
        async with standalone_proxy(tmp_path / "cfg", labels={"app": "reviews"}, cert_dir=rv_certs) as rv, \
                standalone_proxy(tmp_path / "cfg", labels={"app": "productpage"}, cert_dir=pp_certs) as pp:
            await make_inbound_tls(rv, plaintext=False)
            await make_outbound_mtls(pp)
            c = await RawClient.connect(egress)
            for i in range(3):
                r = await c.request("GET", f"/r/{i}", "reviews.default.svc.cluster.local")
                assert r.status == 200 and r.body == b"hello from reviews-app"
            await c.close()
            assert f"URI={PRODUCTPAGE_ID}" in (app.requests[-1].header("x-forwarded-client-cert") or "")
            # The pooled mTLS connection was reused: one handshake for three requests.
            _, text = await rv.admin_get("/stats/prometheus")
            assert f'envoy_listener_downstream_cx_total{{envoy_listener_name="127.0.0.1_{ingress}"}} 1' in text.decode()
            # If the server is not the identity the client expects, the client refuses it: 503 UF.
            await make_outbound_mtls(pp, expected=f"spiffe://{TD}/ns/default/sa/someone-else")
            r = await one_request(egress, b"GET / HTTP/1.1\r\nhost: reviews.default.svc.cluster.local\r\n\r\n")
            assert r.status == 503 and r.header("x-pillion-flags") == "UF,URX"  # Istio's default retries ran out
            assert b"TLS error: wrong_san" in r.body


async def test_mismatched_certificate_and_key_is_refused_and_the_old_pair_keeps_serving(tmp_path, pki):
    """A rotation caught half-written (new chain, old key) must not take the listener down."""
    async with RecordingUpstream("reviews-app") as app:
        egress, ingress = free_port(), free_port()
        (tmp_path / "cfg").mkdir()
        (tmp_path / "cfg" / "mesh.yaml").write_text(two_sidecar_mesh(egress, ingress, app.port))
        certs = pki.issue(tmp_path / "reviews-certs", "default", "reviews")
        async with standalone_proxy(tmp_path / "cfg", labels={"app": "reviews"}, cert_dir=certs, watch=True) as px:
            await make_inbound_tls(px, plaintext=True)
            other = pki.issue(tmp_path / "other", "default", "reviews")
            (certs / "key.pem").write_bytes((other / "key.pem").read_bytes())  # key of another certificate
            sup = px.supervisor
            async with sup.reload_attempts:
                await asyncio.wait_for(sup.reload_attempts.wait_for(lambda: sup.reloads_failed >= 1), 10)
            assert any("private_key" in p and "does not match" in p for p in sup.last_error), sup.last_error
            # The listener still terminates TLS with the previous, consistent pair.
            status, _, _ = await tls_get(ingress, client_context(pki, tmp_path / "c1"))
            assert status == 200


async def test_the_client_sni_is_seen_by_the_server_side(tmp_path, pki):
    """connection.sni (AuthorizationPolicy) needs the server name the client sent."""
    from proxy.model import Secret
    from proxy.tls import TlsProvider, peer_of

    certs = pki.issue(tmp_path / "srv", "default", "reviews")
    provider = TlsProvider()
    provider.update({"default": Secret("default", (certs / "cert-chain.pem").read_bytes(), (certs / "key.pem").read_bytes()),
                     "ROOTCA": Secret("ROOTCA", roots=(certs / "root-cert.pem").read_bytes())})
    seen: asyncio.Future = asyncio.get_running_loop().create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport):
            seen.set_result(peer_of(transport))
            transport.close()

    server = await asyncio.get_running_loop().create_server(Probe, "127.0.0.1", 0, ssl=provider.server_context(SERVER_TLS))
    port = server.sockets[0].getsockname()[1]
    ctx = client_context(pki, tmp_path / "c")
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="outbound_.9080_._.reviews")
    peer = await asyncio.wait_for(seen, 5)
    writer.close()
    server.close()
    assert peer is not None and peer.sni == "outbound_.9080_._.reviews"
    assert peer.spiffe_id == PRODUCTPAGE_ID
