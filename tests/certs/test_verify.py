"""certs.verify: accepted chains, and the precise CertError for each kind of bad chain."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

from certs import errors
from certs.ca import CertificateAuthority, create_root_ca
from certs.errors import (
    CaError,
    CertError,
    ExpiredCert,
    IdentityMismatch,
    InvalidUsage,
    MalformedCert,
    NotACa,
    NotYetValid,
    SelfSignedLeaf,
    UntrustedChain,
)
from certs.pem import certs_to_pem
from certs.spiffe import SpiffeId
from certs.verify import PeerRole, TrustBundle, verify_peer
from tests.certs.factory import NOW, TD, WEB, Issued, der, issue, make_cert, tamper_signature, uri

WEB_ID = SpiffeId.parse(WEB)


def reason_of(chain, bundle, now=NOW, **kwargs) -> tuple[type, str]:
    with pytest.raises(CertError) as info:
        verify_peer(chain, bundle, now=now, **kwargs)
    return type(info.value), info.value.reason


# --- success ---------------------------------------------------------------


def test_root_signed_leaf(root_ca: CertificateAuthority) -> None:
    chain, _ = issue(root_ca)
    assert verify_peer(chain[:1], [root_ca.cert], now=NOW) == WEB_ID


def test_intermediate_chain_as_der(intermediate_ca: CertificateAuthority, mesh_root: CertificateAuthority) -> None:
    chain, _ = issue(intermediate_ca)
    peer = [der(cert) for cert in chain[:2]]
    bundle = TrustBundle.from_roots([mesh_root.cert])
    assert bundle.trust_domain == TD
    for role in (None, PeerRole.CLIENT, PeerRole.SERVER):
        assert verify_peer(peer, bundle, now=NOW, role=role, expected=WEB_ID) == WEB_ID


def test_chain_including_root_and_multi_root_bundle(
    intermediate_ca: CertificateAuthority, mesh_root: CertificateAuthority, root_ca: CertificateAuthority
) -> None:
    chain, _ = issue(intermediate_ca)
    bundle = TrustBundle.from_pem(certs_to_pem([root_ca.cert, mesh_root.cert]))
    assert verify_peer(chain, bundle, now=NOW) == WEB_ID


def test_whole_validity_window(root_ca: CertificateAuthority) -> None:
    leaf = issue(root_ca)[0][0]
    for now in (leaf.not_valid_before_utc, leaf.not_valid_after_utc, NOW + dt.timedelta(hours=12)):
        assert verify_peer([leaf], [root_ca.cert], now=now) == WEB_ID


def test_now_in_another_timezone(root_ca: CertificateAuthority) -> None:
    leaf = issue(root_ca)[0][0]
    later = NOW.astimezone(dt.timezone(dt.timedelta(hours=-7)))
    assert verify_peer([leaf], [root_ca.cert], now=later) == WEB_ID
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_peer([leaf], [root_ca.cert], now=NOW.replace(tzinfo=None))


def test_rsa_ca() -> None:
    root = create_root_ca(TD, now=NOW, key_type="rsa")
    assert verify_peer(issue(root)[0], [root.cert], now=NOW) == WEB_ID


# --- validity --------------------------------------------------------------


def test_expired(root_ca: CertificateAuthority) -> None:
    leaf = issue(root_ca)[0][0]
    after = leaf.not_valid_after_utc + dt.timedelta(seconds=1)
    assert reason_of([leaf], [root_ca.cert], now=after) == (ExpiredCert, "expired")


def test_not_yet_valid(root_ca: CertificateAuthority) -> None:
    leaf = issue(root_ca, now=NOW + dt.timedelta(hours=2))[0][0]
    assert reason_of([leaf], [root_ca.cert], now=NOW) == (NotYetValid, "not_yet_valid")


def test_expired_intermediate(mesh_root: CertificateAuthority) -> None:
    inter = make_cert(mesh_root, ca=True, path_length=0, sans=None, not_after=NOW - dt.timedelta(minutes=1))
    leaf = make_cert(inter)  # the factory does not cap the leaf at its issuer
    assert reason_of([leaf.cert, inter.cert], [mesh_root.cert]) == (ExpiredCert, "expired")


def test_expired_root() -> None:
    root = make_cert(None, ca=True, path_length=0, sans=[uri(f"spiffe://{TD}")],
                     not_after=NOW - dt.timedelta(minutes=1))
    leaf = make_cert(root)
    assert reason_of([leaf.cert], [root.cert]) == (ExpiredCert, "expired")


# --- trust -----------------------------------------------------------------


def test_wrong_ca(root_ca: CertificateAuthority) -> None:
    other = create_root_ca(TD, now=NOW)
    chain, _ = issue(other)
    assert reason_of(chain[:1], [root_ca.cert]) == (UntrustedChain, "untrusted")
    assert reason_of(chain, [root_ca.cert]) == (UntrustedChain, "untrusted")  # its own root sent along


def test_missing_intermediate(intermediate_ca: CertificateAuthority, mesh_root: CertificateAuthority) -> None:
    chain, _ = issue(intermediate_ca)
    assert reason_of(chain[:1], [mesh_root.cert]) == (UntrustedChain, "untrusted")


def test_self_signed_leaf(root_ca: CertificateAuthority) -> None:
    leaf = make_cert(None)
    assert reason_of([leaf.cert], [root_ca.cert]) == (SelfSignedLeaf, "self_signed")
    named = make_cert(None, subject=x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "web")]))
    assert reason_of([named.cert], [root_ca.cert]) == (SelfSignedLeaf, "self_signed")
    assert issubclass(SelfSignedLeaf, UntrustedChain)


@pytest.mark.parametrize("which", ["leaf", "intermediate"])
def test_tampered_signature(which: str, intermediate_ca: CertificateAuthority, mesh_root: CertificateAuthority) -> None:
    chain, _ = issue(intermediate_ca)
    leaf, inter = chain[0], chain[1]
    if which == "leaf":
        leaf = tamper_signature(leaf)
    else:
        inter = tamper_signature(inter)
    assert leaf.tbs_certificate_bytes == chain[0].tbs_certificate_bytes
    assert reason_of([leaf, inter], [mesh_root.cert]) == (UntrustedChain, "untrusted")


def test_leaf_used_as_ca(root_ca: CertificateAuthority) -> None:
    chain, key = issue(root_ca)
    fake_issuer = Issued(chain[0], key)
    victim = make_cert(fake_issuer, sans=[uri("spiffe://cluster.local/ns/default/sa/admin")])
    assert reason_of([victim.cert, chain[0]], [root_ca.cert]) == (NotACa, "not_ca")


def test_ca_cert_as_leaf(root_ca: CertificateAuthority, mesh_root: CertificateAuthority,
                         intermediate_ca: CertificateAuthority) -> None:
    assert reason_of([intermediate_ca.cert], [mesh_root.cert]) == (InvalidUsage, "bad_usage")
    # a CA carrying a workload SAN is still not a leaf
    ca_with_id = make_cert(root_ca, ca=True, path_length=0)
    assert reason_of([ca_with_id.cert], [root_ca.cert]) == (InvalidUsage, "bad_usage")


def test_path_length_exceeded(root_ca: CertificateAuthority) -> None:
    # root_ca has path length 0; an intermediate under it must not be honoured
    inter = make_cert(root_ca, ca=True, path_length=0, sans=None)
    leaf = make_cert(inter)
    assert reason_of([leaf.cert, inter.cert], [root_ca.cert]) == (UntrustedChain, "untrusted")


def test_garbage_and_empty_chains(root_ca: CertificateAuthority) -> None:
    assert reason_of([], [root_ca.cert]) == (UntrustedChain, "untrusted")
    assert reason_of([b"\x30\x03junk"], [root_ca.cert]) == (MalformedCert, "bad_cert")
    leaf = issue(root_ca)[0][0]
    assert reason_of([der(leaf)[:-20]], [root_ca.cert]) == (MalformedCert, "bad_cert")


def test_unparseable_extension(root_ca: CertificateAuthority) -> None:
    # a basicConstraints extension whose value is not a BasicConstraints structure
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([])).issuer_name(root_ca.cert.subject).public_key(key.public_key())
        .serial_number(7).not_valid_before(NOW).not_valid_after(NOW + dt.timedelta(hours=1))
        .add_extension(x509.UnrecognizedExtension(ExtensionOID.BASIC_CONSTRAINTS, b"\x04\x00"), critical=True)
        .add_extension(x509.SubjectAlternativeName([uri(WEB)]), critical=True)
        .sign(root_ca.key, hashes.SHA256())
    )
    assert reason_of([cert], [root_ca.cert]) == (MalformedCert, "bad_cert")


# --- SAN / identity ----------------------------------------------------------


@pytest.mark.parametrize(
    "sans",
    [
        pytest.param(None, id="no-san"),
        pytest.param([x509.DNSName("web.default.svc.cluster.local")], id="dns-only"),
        pytest.param([uri(WEB), x509.DNSName("web")], id="uri-and-dns"),
        pytest.param([uri(WEB), uri("spiffe://cluster.local/ns/default/sa/api")], id="two-uris"),
        pytest.param([uri("spiffe://other.domain/ns/default/sa/web")], id="other-trust-domain"),
        pytest.param([uri("spiffe://cluster.local")], id="trust-domain-id"),
        pytest.param([uri("https://web.example/ns/default/sa/web")], id="not-spiffe"),
        pytest.param([uri("spiffe://cluster.local/ns/default/sa/web?x")], id="query"),
        pytest.param([x509.RFC822Name("web@cluster.local")], id="email"),
    ],
)
def test_wrong_san(sans, root_ca: CertificateAuthority) -> None:
    leaf = make_cert(root_ca, sans=sans, subject=x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "w")]))
    assert reason_of([leaf.cert], [root_ca.cert]) == (IdentityMismatch, "wrong_san")


def test_unexpected_identity(root_ca: CertificateAuthority) -> None:
    chain, _ = issue(root_ca)
    other = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/api")
    assert reason_of(chain, [root_ca.cert], expected=other) == (IdentityMismatch, "wrong_san")


def test_bundle_trust_domain_given(root_ca: CertificateAuthority) -> None:
    chain, _ = issue(root_ca)
    bundle = TrustBundle.from_roots([root_ca.cert], trust_domain="other.domain")
    assert reason_of(chain, bundle) == (IdentityMismatch, "wrong_san")


def test_bundle_needs_a_trust_domain() -> None:
    anonymous = make_cert(None, ca=True, path_length=0, sans=None)
    with pytest.raises(CaError):
        TrustBundle.from_roots([anonymous.cert])
    assert TrustBundle.from_roots([anonymous.cert], trust_domain=TD).trust_domain == TD
    with pytest.raises(CaError):
        TrustBundle(TD, ())


# --- usage ----------------------------------------------------------------


def test_role_eku(root_ca: CertificateAuthority) -> None:
    server_only = make_cert(root_ca, ekus=[ExtendedKeyUsageOID.SERVER_AUTH]).cert
    client_only = make_cert(root_ca, ekus=[ExtendedKeyUsageOID.CLIENT_AUTH]).cert
    roots = [root_ca.cert]
    assert verify_peer([server_only], roots, now=NOW, role=PeerRole.SERVER) == WEB_ID
    assert verify_peer([client_only], roots, now=NOW, role=PeerRole.CLIENT) == WEB_ID
    assert verify_peer([server_only], roots, now=NOW) == WEB_ID
    assert reason_of([server_only], roots, role=PeerRole.CLIENT) == (InvalidUsage, "bad_usage")
    assert reason_of([client_only], roots, role=PeerRole.SERVER) == (InvalidUsage, "bad_usage")
    code_signing = make_cert(root_ca, ekus=[ExtendedKeyUsageOID.CODE_SIGNING]).cert
    assert reason_of([code_signing], roots) == (InvalidUsage, "bad_usage")


def test_key_usage_without_digital_signature(root_ca: CertificateAuthority) -> None:
    leaf = make_cert(root_ca, digital_signature=False).cert
    assert reason_of([leaf], [root_ca.cert]) == (InvalidUsage, "bad_usage")


def test_reasons_are_distinct_labels() -> None:
    classes = [getattr(errors, name) for name in errors.__all__]
    reasons = [cls.reason for cls in classes]
    assert len(set(reasons)) == len(reasons)
    for reason in reasons:
        assert reason.isascii() and reason == reason.lower() and " " not in reason
    assert all(issubclass(cls, CertError) for cls in classes)
