"""certs.ca and certs.csr: what the CA puts in root, intermediate and workload certs."""

from __future__ import annotations

import datetime as dt
import ipaddress
import itertools

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs.ca import (
    DEFAULT_CLOCK_SKEW,
    CertificateAuthority,
    create_intermediate_ca,
    create_root_ca,
)
from certs.csr import build_csr, check_public_key, csr_to_der, csr_to_pem, generate_key, load_csr
from certs.errors import CaError, IdentityMismatch, InvalidCsr
from certs.pem import write_certs, write_private_key
from certs.spiffe import SpiffeId
from certs.verify import is_signed_by, spiffe_id_of
from tests.certs.factory import NOW, TD, WEB, issue, uri


def ext(cert: x509.Certificate, kind: type) -> x509.Extension:
    return cert.extensions.get_extension_for_class(kind)


def test_root_ca_shape(root_ca: CertificateAuthority) -> None:
    cert = root_ca.cert
    assert root_ca.parents == () and root_ca.root is cert and root_ca.trust_domain == TD
    assert cert.subject == cert.issuer and is_signed_by(cert, cert)
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    assert ext(cert, x509.SubjectKeyIdentifier).value.digest
    assert ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    ) == [f"spiffe://{TD}"]
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.not_valid_before_utc == NOW - DEFAULT_CLOCK_SKEW
    assert cert.not_valid_after_utc == NOW + dt.timedelta(days=3650)


def test_root_and_intermediate(mesh_root: CertificateAuthority, intermediate_ca: CertificateAuthority) -> None:
    assert ext(mesh_root.cert, x509.BasicConstraints).value.path_length == 1
    inter = intermediate_ca.cert
    assert ext(inter, x509.BasicConstraints).value.path_length == 0
    assert intermediate_ca.parents == (mesh_root.cert,)
    assert intermediate_ca.root == mesh_root.cert
    assert intermediate_ca.chain == (inter, mesh_root.cert)
    assert is_signed_by(inter, mesh_root.cert)
    aki = ext(inter, x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki == ext(mesh_root.cert, x509.SubjectKeyIdentifier).value.digest
    assert inter.not_valid_after_utc == NOW + dt.timedelta(days=730)


def test_intermediate_capped_at_root_expiry() -> None:
    root = create_root_ca(TD, now=NOW, ttl=dt.timedelta(days=10), path_length=1)
    inter = create_intermediate_ca(root, now=NOW, ttl=dt.timedelta(days=100))
    assert inter.cert.not_valid_after_utc == root.cert.not_valid_after_utc


def test_root_with_path_length_zero_cannot_sign_intermediate(root_ca: CertificateAuthority) -> None:
    with pytest.raises(CaError, match="path length 0"):
        create_intermediate_ca(root_ca, now=NOW)


def test_rsa_option() -> None:
    root = create_root_ca(TD, now=NOW, key_type="rsa")
    key = root.cert.public_key()
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048
    chain, _ = issue(root)
    assert is_signed_by(chain[0], root.cert)
    with pytest.raises(ValueError, match="key type"):
        create_root_ca(TD, now=NOW, key_type="dsa")  # type: ignore[arg-type]


@pytest.mark.parametrize("which", ["root", "intermediate"])
def test_sign_csr_chain_order_and_leaf_profile(
    which: str, root_ca: CertificateAuthority, intermediate_ca: CertificateAuthority
) -> None:
    ca = root_ca if which == "root" else intermediate_ca
    chain, key = issue(ca)
    assert chain[1:] == list(ca.chain) and chain[-1] == ca.root
    assert len(chain) == (2 if which == "root" else 3)
    for child, parent in itertools.pairwise(chain):
        assert is_signed_by(child, parent)
    leaf = chain[0]
    assert leaf.subject == x509.Name([]) and leaf.issuer == ca.cert.subject
    assert leaf.public_key() == key.public_key()
    san = ext(leaf, x509.SubjectAlternativeName)
    assert san.critical and list(san.value) == [uri(WEB)]
    assert spiffe_id_of(leaf) == SpiffeId.parse(WEB)
    bc = ext(leaf, x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext(leaf, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and ku.value.key_encipherment
    assert not ku.value.key_cert_sign
    assert list(ext(leaf, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    assert ext(leaf, x509.AuthorityKeyIdentifier).value.key_identifier == ext(
        ca.cert, x509.SubjectKeyIdentifier
    ).value.digest
    assert ext(leaf, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    assert 0 < leaf.serial_number < 2**159
    assert leaf.not_valid_before_utc == NOW - DEFAULT_CLOCK_SKEW
    assert leaf.not_valid_after_utc == NOW + dt.timedelta(hours=24)


def test_serials_are_random(root_ca: CertificateAuthority) -> None:
    serials = {issue(root_ca)[0][0].serial_number for _ in range(5)}
    assert len(serials) == 5


def test_validity_requested_and_capped(root_ca: CertificateAuthority) -> None:
    chain, _ = issue(root_ca, ttl=dt.timedelta(hours=1), now=NOW + dt.timedelta(minutes=30, microseconds=5))
    leaf = chain[0]
    assert leaf.not_valid_before_utc == NOW + dt.timedelta(minutes=29)
    assert leaf.not_valid_after_utc == NOW + dt.timedelta(minutes=90)
    near_end = root_ca.cert.not_valid_after_utc - dt.timedelta(hours=2)
    capped = issue(root_ca, now=near_end)[0][0]
    assert capped.not_valid_after_utc == root_ca.cert.not_valid_after_utc


def test_backdate_never_before_ca(root_ca: CertificateAuthority) -> None:
    leaf = issue(root_ca, now=NOW - DEFAULT_CLOCK_SKEW + dt.timedelta(seconds=10))[0][0]
    assert leaf.not_valid_before_utc == root_ca.cert.not_valid_before_utc


def test_ca_outside_validity_refuses(root_ca: CertificateAuthority) -> None:
    with pytest.raises(CaError, match="expired"):
        issue(root_ca, now=root_ca.cert.not_valid_after_utc)
    with pytest.raises(CaError, match="not valid until"):
        issue(root_ca, now=NOW - dt.timedelta(days=1))


def test_bad_ttl_and_naive_now(root_ca: CertificateAuthority) -> None:
    with pytest.raises(ValueError, match="ttl"):
        issue(root_ca, ttl=dt.timedelta(0))
    with pytest.raises(ValueError, match="timezone-aware"):
        issue(root_ca, now=NOW.replace(tzinfo=None))


def test_identity_outside_trust_domain_refused(root_ca: CertificateAuthority) -> None:
    with pytest.raises(IdentityMismatch) as info:
        issue(root_ca, "spiffe://other.domain/ns/default/sa/web")
    assert info.value.reason == "wrong_san"


def _csr(sans: list[x509.GeneralName] | None, key: ec.EllipticCurvePrivateKey | None = None,
         ca: bool = False) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return builder.sign(key or generate_key(), hashes.SHA256())


@pytest.mark.parametrize(
    ("sans", "match"),
    [
        ([x509.DNSName("web.default.svc")], "non-URI"),
        ([uri(WEB), x509.DNSName("evil.example")], "non-URI"),
        ([uri(WEB), x509.RFC822Name("a@b.c")], "non-URI"),
        ([uri(WEB), x509.IPAddress(ipaddress.ip_address("10.0.0.1"))], "non-URI"),
        ([uri(WEB), uri("spiffe://cluster.local/ns/default/sa/admin")], "2 URI SANs"),
        ([uri("spiffe://cluster.local/ns/kube-system/sa/admin")], "authorized as"),
    ],
)
def test_csr_with_other_sans_refused(root_ca: CertificateAuthority, sans: list, match: str) -> None:
    identity = SpiffeId.parse(WEB)
    with pytest.raises(InvalidCsr, match=match) as info:
        root_ca.sign_csr(_csr(sans), identity, now=NOW)
    assert info.value.reason == "bad_csr"


def test_csr_without_san_gets_the_authorized_identity(root_ca: CertificateAuthority) -> None:
    identity = SpiffeId.parse(WEB)
    leaf = root_ca.sign_csr(_csr(None), identity, now=NOW)[0]
    assert spiffe_id_of(leaf) == identity


def test_csr_asking_for_ca_refused(root_ca: CertificateAuthority) -> None:
    with pytest.raises(InvalidCsr, match="CA certificate"):
        root_ca.sign_csr(_csr(None, ca=True), SpiffeId.parse(WEB), now=NOW)


def test_csr_with_bad_signature_refused(root_ca: CertificateAuthority) -> None:
    good = csr_to_der(_csr([uri(WEB)]))
    data = bytearray(good)
    data[-10] ^= 0x01  # inside the signature
    with pytest.raises(InvalidCsr):
        root_ca.sign_csr(load_csr(bytes(data)), SpiffeId.parse(WEB), now=NOW)


def test_weak_keys_refused() -> None:
    with pytest.raises(InvalidCsr, match="curve"):
        check_public_key(ec.generate_private_key(ec.SECP256K1()).public_key())
    with pytest.raises(InvalidCsr, match="1024"):
        check_public_key(rsa.generate_private_key(65537, 1024).public_key())


def test_csr_round_trip() -> None:
    key = generate_key()
    assert isinstance(key.curve, ec.SECP256R1)
    csr = build_csr(key, SpiffeId.parse(WEB))
    assert csr.subject == x509.Name([])
    assert list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == [uri(WEB)]
    assert load_csr(csr_to_pem(csr)) == csr and load_csr(csr_to_der(csr)) == csr
    with pytest.raises(InvalidCsr):
        load_csr(b"not a csr")


def test_load_from_files(tmp_path, mesh_root: CertificateAuthority, intermediate_ca: CertificateAuthority) -> None:
    write_certs(tmp_path / "root-cert.pem", [mesh_root.cert])
    write_private_key(tmp_path / "root-key.pem", mesh_root.key)
    root = CertificateAuthority.load_dir(tmp_path)
    assert root.cert == mesh_root.cert and root.parents == () and root.trust_domain == TD
    write_certs(tmp_path / "ca-cert.pem", [intermediate_ca.cert])
    write_private_key(tmp_path / "ca-key.pem", intermediate_ca.key)
    write_certs(tmp_path / "cert-chain.pem", intermediate_ca.chain)
    loaded = CertificateAuthority.load_dir(tmp_path)
    assert loaded.cert == intermediate_ca.cert and loaded.parents == (mesh_root.cert,)
    chain, _ = issue(loaded)
    assert chain[1:] == [intermediate_ca.cert, mesh_root.cert]
    (tmp_path / "cert-chain.pem").unlink()  # falls back to root-cert.pem
    assert CertificateAuthority.load_dir(tmp_path).parents == (mesh_root.cert,)


def test_load_refuses_broken_ca(tmp_path, root_ca: CertificateAuthority, mesh_root: CertificateAuthority,
                                intermediate_ca: CertificateAuthority) -> None:
    with pytest.raises(CaError, match="does not match"):
        CertificateAuthority.from_parts(root_ca.cert, mesh_root.key)
    with pytest.raises(CaError, match="not signed by"):
        CertificateAuthority.from_parts(intermediate_ca.cert, intermediate_ca.key, [root_ca.cert])
    with pytest.raises(CaError, match="self-signed root"):
        CertificateAuthority.from_parts(intermediate_ca.cert, intermediate_ca.key, [])
    leaf, key = issue(root_ca)
    with pytest.raises(CaError, match="not a CA"):
        CertificateAuthority.from_parts(leaf[0], key, [root_ca.cert])
    with pytest.raises(CaError, match="trust domain"):
        CertificateAuthority.from_parts(root_ca.cert, root_ca.key, trust_domain="other.td")
    assert CertificateAuthority.from_parts(root_ca.cert, root_ca.key, trust_domain=TD).trust_domain == TD
