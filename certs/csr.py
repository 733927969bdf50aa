"""Workload keys and certificate signing requests, from both sides of the CA.

Owns: making a workload key (ECDSA P-256, in memory) and a CSR that names the
workload's SPIFFE ID as its one URI SAN; decoding a CSR that arrived over the wire;
and deciding whether a CSR is acceptable to sign for an identity the caller has
already authenticated (``check_csr``).

Must not: write files (``pem.py`` does, when a caller asks), sign anything (``ca.py``),
or decide who a workload is. The CA service proves the identity; this module only
refuses CSRs that ask for more or other than that identity.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from certs.errors import InvalidCsr
from certs.pem import PrivateKey, key_to_pem
from certs.spiffe import SpiffeId

ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1)
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key. It lives in memory until someone writes it."""
    return ec.generate_private_key(ec.SECP256R1())


def build_csr(key: PrivateKey, identity: SpiffeId) -> x509.CertificateSigningRequest:
    """A CSR signed by ``key`` with an empty subject and ``identity`` as its only SAN.

    The subject is empty, as in Istio: the identity lives in the URI SAN alone.
    """
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )


def csr_to_pem(csr: x509.CertificateSigningRequest) -> bytes:
    """The CSR as a PEM ``CERTIFICATE REQUEST`` block."""
    return csr.public_bytes(serialization.Encoding.PEM)


def csr_to_der(csr: x509.CertificateSigningRequest) -> bytes:
    """The CSR as DER, for protocols that carry bytes."""
    return csr.public_bytes(serialization.Encoding.DER)


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """Decode a CSR from PEM or DER; InvalidCsr if it is neither."""
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError as exc:
        raise InvalidCsr(f"cannot decode CSR: {exc}") from exc


def check_csr(csr: x509.CertificateSigningRequest, identity: SpiffeId) -> None:
    """Refuse a CSR the CA must not sign for ``identity``; return None if it is fine.

    Checked: the CSR's self-signature (proof of possession of the key), the key type
    and size, and the requested SANs: none at all, or exactly one URI equal to
    ``identity``. DNS, IP and email SANs and second URIs are refused rather than
    dropped, so a client that expects them learns at once that it will not get them.
    A CSR asking for basicConstraints CA=true is refused. Its subject and any other
    extensions are ignored: the CA builds the certificate from ``identity`` alone.
    """
    try:
        signature_ok = csr.is_signature_valid
    except UnsupportedAlgorithm as exc:
        raise InvalidCsr(f"CSR signature algorithm is not supported: {exc}") from exc
    if not signature_ok:
        raise InvalidCsr("CSR signature does not verify (no proof of possession of the key)")
    check_public_key(csr.public_key())
    try:
        extensions = csr.extensions
    except ValueError as exc:
        raise InvalidCsr(f"CSR extensions cannot be parsed: {exc}") from exc
    for extension in extensions:
        value = extension.value
        if isinstance(value, x509.BasicConstraints) and value.ca:
            raise InvalidCsr("CSR asks for a CA certificate")
        if isinstance(value, x509.SubjectAlternativeName):
            _check_requested_sans(list(value), identity)


def _check_requested_sans(names: list[x509.GeneralName], identity: SpiffeId) -> None:
    others = [name for name in names if not isinstance(name, x509.UniformResourceIdentifier)]
    if others:
        kinds = sorted({type(name).__name__ for name in others})
        raise InvalidCsr(f"CSR asks for non-URI SANs ({', '.join(kinds)}); only the SPIFFE ID is issued")
    uris = [name.value for name in names if isinstance(name, x509.UniformResourceIdentifier)]
    if len(uris) > 1:
        raise InvalidCsr(f"CSR asks for {len(uris)} URI SANs; exactly one SPIFFE ID is issued")
    if uris and uris[0] != str(identity):
        raise InvalidCsr(f"CSR asks for {uris[0]!r} but the caller is authorized as {identity}")


def check_public_key(public_key: object) -> None:
    """Accept ECDSA P-256/P-384 and RSA 2048..8192 keys; raise InvalidCsr for the rest."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, ACCEPTED_CURVES):
            raise InvalidCsr(f"EC curve {public_key.curve.name} is not accepted (P-256 or P-384)")
        return
    if isinstance(public_key, rsa.RSAPublicKey):
        if not MIN_RSA_BITS <= public_key.key_size <= MAX_RSA_BITS:
            raise InvalidCsr(
                f"RSA key of {public_key.key_size} bits is not accepted "
                f"({MIN_RSA_BITS}..{MAX_RSA_BITS})"
            )
        return
    raise InvalidCsr(f"key type {type(public_key).__name__} is not accepted (EC or RSA)")


__all__ = [
    "build_csr",
    "check_csr",
    "check_public_key",
    "csr_to_der",
    "csr_to_pem",
    "generate_key",
    "key_to_pem",
    "load_csr",
]
