"""Mutual TLS on loopback with certs from certs.ca: Python's ssl accepts them, then certs.verify.

Both sides load an issued chain + key, require the peer's cert (CERT_REQUIRED) and
trust only the mesh root (cafile). VERIFY_X509_STRICT is on, so the certs also pass
OpenSSL's strict RFC 5280 checks. There is no hostname check: SPIFFE certs carry
no DNS name, and the identity is checked afterwards by certs.verify on the DER the
handshake delivered.

Python 3.11's ssl has no ``get_verified_chain()`` (3.13 adds it): ``getpeercert(
binary_form=True)`` gives only the peer's leaf. So the leaf is verified together
with the intermediate we know the mesh uses.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509

from certs.ca import CertificateAuthority, KeyType, create_intermediate_ca, create_root_ca
from certs.errors import UntrustedChain
from certs.pem import write_certs, write_private_key
from certs.spiffe import SpiffeId
from certs.verify import PeerRole, TrustBundle, verify_peer
from tests.certs.factory import issue

TD = "cluster.local"
CLIENT_ID = SpiffeId(TD, "default", "frontend")
SERVER_ID = SpiffeId(TD, "shop", "reviews")
TIMEOUT = 10.0


def real_now() -> dt.datetime:
    # OpenSSL checks validity against the real clock, so these certs are issued at it
    return dt.datetime.now(dt.UTC)


@dataclass
class Workload:
    chain_file: Path
    key_file: Path
    chain: list[x509.Certificate]


def make_workload(ca: CertificateAuthority, identity: SpiffeId, directory: Path) -> Workload:
    directory.mkdir()
    chain, key = issue(ca, identity, now=real_now())
    write_certs(directory / "cert-chain.pem", chain)
    write_private_key(directory / "key.pem", key)
    return Workload(directory / "cert-chain.pem", directory / "key.pem", chain)


def context(side: str, me: Workload, cafile: Path, version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if side == "server" else ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.minimum_version = ctx.maximum_version = version
    ctx.load_verify_locations(cafile=str(cafile))
    ctx.load_cert_chain(str(me.chain_file), str(me.key_file))
    return ctx


@dataclass
class ServerResult:
    peer_der: bytes | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


def serve_once(listener: socket.socket, ctx: ssl.SSLContext, result: ServerResult) -> None:
    try:
        conn, _ = listener.accept()
        conn.settimeout(TIMEOUT)
        with ctx.wrap_socket(conn, server_side=True) as tls:
            result.peer_der = tls.getpeercert(binary_form=True)
            tls.sendall(b"pong " + tls.recv(16))
    except (OSError, ssl.SSLError) as exc:
        result.error = exc
    finally:
        result.done.set()


@dataclass
class ClientResult:
    server_der: bytes | None = None
    reply: bytes = b""
    error: BaseException | None = None


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[ServerResult, ClientResult]:
    """One connection, ping/pong: what each side saw (peer leaf DER, reply, error)."""
    server, client = ServerResult(), ClientResult()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        thread = threading.Thread(target=serve_once, args=(listener, server_ctx, server), daemon=True)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as raw, \
                    client_ctx.wrap_socket(raw) as tls:
                client.server_der = tls.getpeercert(binary_form=True)
                tls.sendall(b"ping")
                client.reply = tls.recv(64)
        except (OSError, ssl.SSLError) as exc:
            client.error = exc
        finally:
            thread.join(TIMEOUT)
    assert server.done.is_set(), "server thread did not finish"
    return server, client


@pytest.fixture(scope="module", params=["ec", "rsa"])
def mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    key_type: KeyType = request.param
    base = tmp_path_factory.mktemp(f"mesh-{key_type}")
    root = create_root_ca(TD, now=real_now(), key_type=key_type, path_length=1)
    inter = create_intermediate_ca(root, now=real_now(), key_type=key_type)
    write_certs(base / "root-cert.pem", [root.cert])
    client = make_workload(inter, CLIENT_ID, base / "client")
    server = make_workload(inter, SERVER_ID, base / "server")
    return root, inter, base / "root-cert.pem", client, server


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
def test_mutual_tls_then_spiffe_verify(mesh, version: ssl.TLSVersion) -> None:
    root, inter, cafile, client, server = mesh
    server_side, client_side = handshake(
        context("server", server, cafile, version), context("client", client, cafile, version)
    )
    assert server_side.error is None and client_side.error is None, (server_side.error, client_side.error)
    assert client_side.reply == b"pong ping"
    assert server_side.peer_der is not None and client_side.server_der is not None
    bundle = TrustBundle.from_roots([root.cert])
    # the server authorizes the client, the client authorizes the server
    assert verify_peer([server_side.peer_der, inter.cert], bundle, now=real_now(), role=PeerRole.CLIENT) == CLIENT_ID
    assert verify_peer([client_side.server_der, inter.cert], bundle, now=real_now(), role=PeerRole.SERVER,
                       expected=SERVER_ID) == SERVER_ID
    # the leaf alone does not reach the root: the intermediate is needed
    with pytest.raises(UntrustedChain):
        verify_peer([client_side.server_der], bundle, now=real_now())


def test_server_refuses_client_from_another_ca(mesh, tmp_path: Path) -> None:
    _, _, cafile, _, server = mesh
    rogue_ca = create_root_ca(TD, now=real_now())
    rogue = make_workload(rogue_ca, CLIENT_ID, tmp_path / "rogue")
    version = ssl.TLSVersion.TLSv1_3
    server_ctx = context("server", server, cafile, version)
    client_ctx = context("client", rogue, cafile, version)
    server_side, client_side = handshake(server_ctx, client_ctx)
    assert isinstance(server_side.error, ssl.SSLCertVerificationError)
    assert "certificate verify failed" in str(server_side.error)
    assert server_side.peer_der is None
    # TLS 1.3: the client finishes its side before the server checks its cert, so the
    # refusal reaches the client as an alert on its first read (or as a closed socket)
    assert client_side.error is not None or client_side.reply == b""


def test_client_refuses_server_from_another_ca(mesh, tmp_path: Path) -> None:
    _, _, cafile, client, _ = mesh
    rogue_ca = create_root_ca(TD, now=real_now())
    rogue = make_workload(rogue_ca, SERVER_ID, tmp_path / "rogue")
    rogue_cafile = tmp_path / "rogue-root.pem"
    write_certs(rogue_cafile, [rogue_ca.cert])
    version = ssl.TLSVersion.TLSv1_2
    server_side, client_side = handshake(
        context("server", rogue, rogue_cafile, version), context("client", client, cafile, version)
    )
    assert isinstance(client_side.error, ssl.SSLCertVerificationError)
    assert client_side.server_der is None
    assert isinstance(server_side.error, ssl.SSLError)  # the client's alert
