"""The CertError tree: every failure the identity library reports, one class per kind.

Owns: the exception types and their machine-readable ``reason`` strings. A reason
is short, stable and lowercase, because callers use it as a metrics label (for
example ``pillion_tls_handshake_errors_total{reason="expired"}``) and in access logs.

Must not: import anything, hold state, or format certificates. Messages are for
people; code branches on the class or on ``reason``, never on the message.

Shape (``reason`` in brackets)::

    CertError                       [cert_error]
      InvalidSpiffeId               [bad_spiffe_id]   also a ValueError
      InvalidPem                    [bad_pem]         also a ValueError
      InvalidCsr                    [bad_csr]
      CaError                       [bad_ca]          the CA itself is unusable
      ExpiredCert                   [expired]
      NotYetValid                   [not_yet_valid]
      UntrustedChain                [untrusted]       no valid path to a trusted root
        SelfSignedLeaf              [self_signed]
        NotACa                      [not_ca]          a non-CA cert was used as an issuer
        MalformedCert               [bad_cert]        not DER, or extensions that do not parse
      IdentityMismatch              [wrong_san]       missing/extra/invalid SAN, wrong trust domain
      InvalidUsage                  [bad_usage]       key usage, EKU or CA flag wrong for a leaf
      InvalidToken                  [bad_token]       a bootstrap token that is malformed, forged or expired
"""

from __future__ import annotations


class CertError(Exception):
    """Base of every error raised by ``certs``."""

    reason: str = "cert_error"


class InvalidSpiffeId(CertError, ValueError):
    """A string is not a SPIFFE ID of the form this mesh accepts."""

    reason = "bad_spiffe_id"


class InvalidPem(CertError, ValueError):
    """A file or buffer does not hold the PEM objects it should."""

    reason = "bad_pem"


class InvalidCsr(CertError):
    """A certificate signing request is malformed, badly signed or asks for too much."""

    reason = "bad_csr"


class CaError(CertError):
    """The signing CA cannot be used: key/cert mismatch, not a CA, expired, broken chain."""

    reason = "bad_ca"


class ExpiredCert(CertError):
    """A certificate's notAfter is in the past at the time of the check."""

    reason = "expired"


class NotYetValid(CertError):
    """A certificate's notBefore is in the future at the time of the check."""

    reason = "not_yet_valid"


class UntrustedChain(CertError):
    """No valid signature path leads from the leaf to a root of the trust bundle."""

    reason = "untrusted"


class SelfSignedLeaf(UntrustedChain):
    """The peer presented a self-signed certificate that is not in the trust bundle."""

    reason = "self_signed"


class NotACa(UntrustedChain):
    """A certificate without basicConstraints CA=true signed another certificate."""

    reason = "not_ca"


class MalformedCert(UntrustedChain):
    """A peer certificate is not valid DER or carries extensions that cannot be parsed."""

    reason = "bad_cert"


class IdentityMismatch(CertError):
    """The leaf's SAN is not exactly one SPIFFE URI of the expected trust domain/identity."""

    reason = "wrong_san"


class InvalidUsage(CertError):
    """The leaf's keyUsage, extendedKeyUsage or basicConstraints forbid its use as a peer cert."""

    reason = "bad_usage"


__all__ = [
    "CaError",
    "CertError",
    "ExpiredCert",
    "IdentityMismatch",
    "InvalidCsr",
    "InvalidPem",
    "InvalidSpiffeId",
    "InvalidUsage",
    "MalformedCert",
    "NotACa",
    "NotYetValid",
    "SelfSignedLeaf",
    "UntrustedChain",
]


class InvalidToken(CertError):
    """A workload bootstrap token is malformed, forged, or expired."""

    reason = "bad_token"
