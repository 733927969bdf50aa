"""The CA service over real gRPC: tokens, CSR checks, validity policy, chain order; CA state dir; token CLI.

Each test runs a grpc.aio server on 127.0.0.1 port 0 with CaService registered and
calls it through a generic unary-unary call on a real channel. The service's clock
is injected, so expiry is tested without sleeping.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from certs.ca import CertificateAuthority, create_root_ca
from certs.ca_api import METHOD, CertificateRequest, CertificateResponse
from certs.cli import main as certs_main
from certs.csr import build_csr, csr_to_pem, generate_key
from certs.errors import CaError
from certs.pem import certs_to_pem, parse_certs
from certs.spiffe import SpiffeId
from certs.tokens import issue_token, verify_token
from certs.verify import PeerRole, verify_peer
from control.ca_service import (
    CaService,
    issue_workload_token,
    load_or_create_ca,
    load_or_create_token_key,
)
from control.tokens_cli import token_main

TD = "cluster.local"
NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
KEY = b"t" * 32
REVIEWS = SpiffeId(TD, "default", "reviews")
RATINGS = SpiffeId(TD, "default", "ratings")


@pytest.fixture(scope="module")
def authority() -> CertificateAuthority:
    return create_root_ca(TD, now=NOW - dt.timedelta(days=1))


@dataclass
class Clock:
    now: dt.datetime = NOW

    def __call__(self) -> dt.datetime:
        return self.now


@dataclass
class Harness:
    service: CaService
    clock: Clock
    call: Callable[..., Any]

    async def create(self, csr: str, token: str | None = None, validity: int = 0) -> Any:
        metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
        return await self.call(CertificateRequest(csr=csr, validity_duration=validity), metadata=metadata)


async def start(service: CaService) -> AsyncIterator[Callable[..., Any]]:
    server = grpc.aio.server()
    service.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel.unary_unary(
            METHOD,
            request_serializer=CertificateRequest.SerializeToString,
            response_deserializer=CertificateResponse.FromString,
        )
    finally:
        await channel.close()
        await server.stop(None)


@pytest.fixture
async def ca(authority: CertificateAuthority) -> AsyncIterator[Harness]:
    clock = Clock()
    service = CaService(authority, KEY, trust_domain=TD, clock=clock)
    async for call in start(service):
        yield Harness(service, clock, call)


def token_for(identity: SpiffeId, hours: float = 1.0, key: bytes = KEY) -> str:
    return issue_token(key, identity.namespace, identity.service_account, NOW + dt.timedelta(hours=hours))


def csr_for(identity: SpiffeId) -> str:
    return csr_to_pem(build_csr(generate_key(), identity)).decode()


def raw_csr(names: list[x509.GeneralName] | None = None, *, ca: bool = False) -> str:
    """A CSR built by hand: any SANs (or none), optionally asking for CA=true."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return csr_to_pem(builder.sign(generate_key(), hashes.SHA256())).decode()


def leaf_of(response: Any) -> x509.Certificate:
    return x509.load_pem_x509_certificate(response.cert_chain[0].encode())


async def refused(harness: Harness, code: grpc.StatusCode, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await harness.create(*args, **kwargs)
    assert info.value.code() == code, info.value.details()
    return info.value.details() or ""


# --- issuing ---------------------------------------------------------------------------


async def test_issues_leaf_and_root_for_the_token_identity(ca: Harness, authority: CertificateAuthority):
    response = await ca.create(csr_for(REVIEWS), token_for(REVIEWS))
    assert len(response.cert_chain) == 2
    leaf, root = (parse_certs(pem.encode())[0] for pem in response.cert_chain)
    assert root == authority.root
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [type(name) for name in san] == [x509.UniformResourceIdentifier]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(REVIEWS)]
    assert leaf.not_valid_after_utc == NOW + dt.timedelta(hours=24)
    chain = [parse_certs(pem.encode())[0] for pem in response.cert_chain[:-1]]
    for role in PeerRole:
        assert verify_peer(chain, [authority.root], now=NOW, role=role, expected=REVIEWS) == REVIEWS
    assert ca.service.stats() == {"issued": 1, "denied": {}}


@pytest.mark.parametrize(("seconds", "expected"), [
    (3600, dt.timedelta(hours=1)),
    (100 * 86400, dt.timedelta(days=7)),
    (2**63 - 1, dt.timedelta(days=7)),
])
async def test_requested_validity_is_honoured_up_to_the_cap(ca: Harness, seconds: int, expected: dt.timedelta):
    response = await ca.create(csr_for(REVIEWS), token_for(REVIEWS), validity=seconds)
    assert leaf_of(response).not_valid_after_utc == NOW + expected


async def test_csr_without_san_gets_the_token_identity(ca: Harness):
    response = await ca.create(raw_csr(), token_for(RATINGS))
    san = leaf_of(response).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(RATINGS)]


async def test_plug_in_ca_returns_leaf_intermediate_root(tmp_path: Path):
    assert certs_main(["init", "--trust-domain", TD, "--out", str(tmp_path), "--intermediate"]) == 0
    authority = load_or_create_ca(tmp_path, TD)
    assert authority.parents  # the intermediate signs
    now = dt.datetime.now(dt.UTC)  # `certs init` made the CA at the real time
    service = CaService(authority, KEY, clock=Clock(now))
    token = issue_token(KEY, "default", "reviews", now + dt.timedelta(hours=1))
    async for call in start(service):
        response = await Harness(service, Clock(now), call).create(csr_for(REVIEWS), token)
    chain = [parse_certs(pem.encode())[0] for pem in response.cert_chain]
    assert chain[1:] == [authority.cert, authority.root]
    assert verify_peer(chain[:-1], [chain[-1]], now=now) == REVIEWS


# --- refusals --------------------------------------------------------------------------


async def test_csr_for_another_identity_is_denied_and_logged(ca: Harness, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger="pillion.control.ca"):
        details = await refused(ca, grpc.StatusCode.PERMISSION_DENIED, csr_for(RATINGS), token_for(REVIEWS))
    assert details == f"CSR asks for {RATINGS} but the token proves {REVIEWS}"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "pillion.control.ca"]
    assert len(warnings) == 1
    assert str(RATINGS) in warnings[0].getMessage() and "127.0.0.1" in warnings[0].getMessage()
    assert ca.service.stats() == {"issued": 0, "denied": {"wrong_san": 1}}


async def test_extra_sans_and_ca_requests_are_denied(ca: Harness):
    names = [x509.UniformResourceIdentifier(str(REVIEWS)), x509.DNSName("reviews.example.com")]
    details = await refused(ca, grpc.StatusCode.PERMISSION_DENIED, raw_csr(names), token_for(REVIEWS))
    assert details == f"CSR asks for DNS:reviews.example.com but the token proves {REVIEWS}"
    details = await refused(ca, grpc.StatusCode.PERMISSION_DENIED, raw_csr(ca=True), token_for(REVIEWS))
    assert details == f"CSR asks for a CA certificate but the token proves {REVIEWS}"


async def test_missing_forged_and_expired_tokens_are_unauthenticated(ca: Harness):
    csr = csr_for(REVIEWS)
    assert "no bootstrap token" in await refused(ca, grpc.StatusCode.UNAUTHENTICATED, csr)
    forged = token_for(REVIEWS, key=b"x" * 32)
    assert "does not verify" in await refused(ca, grpc.StatusCode.UNAUTHENTICATED, csr, forged)
    claimed = token_for(REVIEWS).replace(":reviews:", ":ratings:")
    await refused(ca, grpc.StatusCode.UNAUTHENTICATED, csr_for(RATINGS), claimed)
    assert "not 'Bearer" in await refused(ca, grpc.StatusCode.UNAUTHENTICATED, csr, "")
    token = token_for(REVIEWS, hours=1)
    await ca.create(csr, token)  # good now
    ca.clock.now = NOW + dt.timedelta(hours=1)
    assert "expired" in await refused(ca, grpc.StatusCode.UNAUTHENTICATED, csr, token)
    assert ca.service.stats() == {"issued": 1, "denied": {"no_token": 1, "bad_token": 4}}


@pytest.mark.parametrize("csr", ["", "garbage", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"])
async def test_garbage_csr_is_invalid_argument(ca: Harness, csr: str):
    details = await refused(ca, grpc.StatusCode.INVALID_ARGUMENT, csr, token_for(REVIEWS))
    assert details.startswith("malformed CSR: ")


async def test_negative_validity_is_invalid_argument(ca: Harness):
    await refused(ca, grpc.StatusCode.INVALID_ARGUMENT, csr_for(REVIEWS), token_for(REVIEWS), validity=-1)


async def test_expired_ca_is_internal(ca: Harness, authority: CertificateAuthority):
    ca.clock.now = authority.cert.not_valid_after_utc + dt.timedelta(seconds=1)
    token = issue_token(KEY, "default", "reviews", ca.clock.now + dt.timedelta(hours=1))
    assert "expired" in await refused(ca, grpc.StatusCode.INTERNAL, csr_for(REVIEWS), token)


def test_service_refuses_a_trust_domain_other_than_the_cas(authority: CertificateAuthority):
    with pytest.raises(ValueError, match="trust domain"):
        CaService(authority, KEY, trust_domain="other.domain")


# --- state directory and token CLI -----------------------------------------------------


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_load_or_create_ca_persists_the_root(tmp_path: Path):
    state = tmp_path / "state"
    first = load_or_create_ca(state, TD)
    second = load_or_create_ca(state, TD)
    assert first.cert == second.cert and certs_to_pem([first.root]) == certs_to_pem([second.root])
    assert mode_of(state / "root-key.pem") == 0o600
    assert mode_of(state / "root-cert.pem") == 0o644
    with pytest.raises(CaError):
        load_or_create_ca(state, "other.domain")


def test_half_a_ca_is_an_error_not_replaced(tmp_path: Path):
    load_or_create_ca(tmp_path, TD)
    os.unlink(tmp_path / "root-cert.pem")
    key_before = (tmp_path / "root-key.pem").read_bytes()
    with pytest.raises(CaError, match="no CA certificate"):
        load_or_create_ca(tmp_path, TD)
    assert (tmp_path / "root-key.pem").read_bytes() == key_before


def test_token_key_is_created_once_with_mode_0600(tmp_path: Path):
    key = load_or_create_token_key(tmp_path / "state")
    assert len(key) == 32 and load_or_create_token_key(tmp_path / "state") == key
    assert mode_of(tmp_path / "state" / "token-key") == 0o600


def test_issue_workload_token_verifies_with_the_state_key(tmp_path: Path):
    token = issue_workload_token(tmp_path, "default", "reviews", 2, now=NOW)
    key = load_or_create_token_key(tmp_path)
    assert verify_token(key, token, NOW + dt.timedelta(hours=1)) == ("default", "reviews")
    with pytest.raises(ValueError):
        issue_workload_token(tmp_path, "default", "reviews", 0)


def test_token_cli_writes_0600_and_the_token_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "reviews.token"
    argv = ["--state-dir", str(tmp_path / "state"), "--namespace", "default", "--service-account", "reviews"]
    assert token_main([*argv, "--hours", "2", "--out", str(out)]) == 0
    assert mode_of(out) == 0o600 and capsys.readouterr().out == ""
    key = load_or_create_token_key(tmp_path / "state")
    now = dt.datetime.now(dt.UTC)
    assert verify_token(key, out.read_text(), now) == ("default", "reviews")
    assert token_main(argv) == 0  # default 720 h, printed
    printed = capsys.readouterr().out.strip()
    assert verify_token(key, printed, now + dt.timedelta(hours=719)) == ("default", "reviews")


def test_token_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    base = ["--state-dir", str(tmp_path), "--service-account", "reviews"]
    assert token_main(base) == 2  # --namespace missing
    assert token_main([*base, "--namespace", "a/b"]) == 1
    assert token_main([*base, "--namespace", "default", "--hours", "0"]) == 2
    assert "--hours must be positive" in capsys.readouterr().err
