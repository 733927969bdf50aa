"""Test-only certificate factory: builds the malformed and hostile certs the CA refuses to make.

``certs.ca`` only issues well-formed workload certs, so every negative case for
``certs.verify`` (DNS-only SANs, two URIs, a foreign trust domain, a self-signed
leaf, a leaf acting as an issuer, odd validity windows) is built here directly
with cryptography, signed by a real test CA key where the case needs one.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.ca import CertificateAuthority
from certs.csr import build_csr, generate_key
from certs.pem import PrivateKey
from certs.spiffe import SpiffeId

NOW = dt.datetime(2030, 6, 1, 12, 0, 0, tzinfo=dt.UTC)
TD = "cluster.local"
WEB = f"spiffe://{TD}/ns/default/sa/web"

BOTH_EKUS = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)


@dataclass
class Issued:
    cert: x509.Certificate
    key: PrivateKey


def uri(value: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(value)


def make_cert(
    issuer: CertificateAuthority | Issued | None,
    *,
    sans: Sequence[x509.GeneralName] | None = (uri(WEB),),
    ca: bool = False,
    path_length: int | None = None,
    subject: x509.Name | None = None,
    not_before: dt.datetime = NOW - dt.timedelta(hours=1),
    not_after: dt.datetime = NOW + dt.timedelta(hours=23),
    digital_signature: bool = True,
    ekus: Sequence[x509.ObjectIdentifier] | None = BOTH_EKUS,
    key: PrivateKey | None = None,
) -> Issued:
    """A cert for a fresh P-256 key, signed by ``issuer`` (or self-signed when None)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    if subject is None:
        subject = (
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")]) if ca else x509.Name([])
        )
    issuer_name = issuer.cert.subject if issuer is not None else subject
    signing_key = issuer.key if issuer is not None else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature, False, not ca, False, False, ca, ca, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    if ekus:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=not subject)
    return Issued(builder.sign(signing_key, hashes.SHA256()), key)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def tamper_signature(cert: x509.Certificate) -> x509.Certificate:
    """The same cert with one bit of its signature flipped (the TBS part is untouched)."""
    data = bytearray(der(cert))
    signature = cert.signature
    offset = bytes(data).rindex(signature)
    # flip a bit inside the ECDSA integer r, past its DER header, so it still parses
    data[offset + 8] ^= 0x01
    return x509.load_der_x509_certificate(bytes(data))


def issue(
    ca: CertificateAuthority,
    identity: SpiffeId | str = WEB,
    *,
    now: dt.datetime = NOW,
    ttl: dt.timedelta | None = None,
) -> tuple[list[x509.Certificate], ec.EllipticCurvePrivateKey]:
    """A real workload chain from ``ca`` (CSR and all) and its key."""
    if isinstance(identity, str):
        identity = SpiffeId.parse(identity)
    key = generate_key()
    csr = build_csr(key, identity)
    if ttl is None:
        return ca.sign_csr(csr, identity, now=now), key
    return ca.sign_csr(csr, identity, now=now, ttl=ttl), key
