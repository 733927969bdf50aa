"""Peer certificate verification: chain to a trust bundle, then the SPIFFE identity.

Owns: deciding whether a peer's chain (leaf first, then intermediates) is trusted at
a given ``now``, which SpiffeId it proves, and, when it is not trusted, which
CertError says why (the ``reason`` becomes a metrics label).

Must not: read the clock, files or sockets (the TLS layer hands over DER bytes), or
accept a peer on the strength of anything but the bundle it is given.

Strategy: cryptography's own verifier decides trust; this module adds the SPIFFE
rules and the precise error.

- Chain building, signatures, validity of every cert, basicConstraints (CA flag
  and path length), CA keyUsage and name constraints are checked by
  ``cryptography.x509.verification`` (the Rust verifier, RFC 5280 + CA/B webpki
  profile). Its *client* verifier, checked against cryptography 50.0, accepts a leaf
  whose only SAN is a URI; the *server* verifier needs a DNS name or IP to match,
  which a SPIFFE cert does not have, so the client verifier is used for both peer
  roles, with its EKU rule replaced by one that asks for the EKU of the peer's role.
- Before that, the leaf alone is checked here (self-signed, CA flag, validity,
  keyUsage/EKU, SAN), because the library reports failures as one exception type
  with a message, and a message is no metrics label.
- If the library still refuses, ``_diagnose`` walks the chain by name and
  signature to name the cause (an expired intermediate or root, a non-CA issuer,
  a bad signature, an unknown issuer). That walk only explains a refusal; it never
  turns one into an acceptance.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from certs._time import as_utc
from certs.errors import (
    CaError,
    CertError,
    ExpiredCert,
    IdentityMismatch,
    InvalidSpiffeId,
    InvalidUsage,
    MalformedCert,
    NotACa,
    NotYetValid,
    SelfSignedLeaf,
    UntrustedChain,
)
from certs.pem import parse_certs
from certs.spiffe import SpiffeId, parse_trust_domain_id, validate_trust_domain

MAX_CHAIN_DEPTH = 8

_E = TypeVar("_E", bound=x509.ExtensionType)


class PeerRole(enum.Enum):
    """The TLS role of the peer whose chain is checked: selects the EKU it must carry."""

    CLIENT = "client"
    SERVER = "server"


_ROLE_EKU = {
    PeerRole.CLIENT: ExtendedKeyUsageOID.CLIENT_AUTH,
    PeerRole.SERVER: ExtendedKeyUsageOID.SERVER_AUTH,
}
_EKU_NAMES = {ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth", ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth"}


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """The roots a peer chain must lead to, and the trust domain its leaf must name."""

    trust_domain: str
    roots: tuple[x509.Certificate, ...]
    store: Store = field(init=False, repr=False, compare=False)
    """The roots as cryptography's immutable Store, built once per bundle, not per handshake."""

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        if not self.roots:
            raise CaError("a trust bundle needs at least one root certificate")
        object.__setattr__(self, "store", Store(list(self.roots)))

    @classmethod
    def from_roots(
        cls, roots: Sequence[x509.Certificate], trust_domain: str | None = None
    ) -> TrustBundle:
        """A bundle of ``roots``; the trust domain is read from their ``spiffe://<td>`` SAN
        unless given. CaError if it is neither given nor named by exactly one domain."""
        named = {td for td in (ca_trust_domain(root) for root in roots) if td is not None}
        if trust_domain is None:
            if len(named) != 1:
                found = ", ".join(sorted(named)) or "none"
                raise CaError(f"cannot tell the bundle's trust domain (roots name: {found}); pass it")
            trust_domain = named.pop()
        return cls(trust_domain, tuple(roots))

    @classmethod
    def from_pem(cls, data: bytes, trust_domain: str | None = None) -> TrustBundle:
        """A bundle from PEM text holding one or more root certificates."""
        return cls.from_roots(parse_certs(data, what="trust bundle"), trust_domain)


def verify_peer(
    chain: Sequence[bytes | x509.Certificate],
    bundle: TrustBundle | Sequence[x509.Certificate],
    *,
    now: dt.datetime,
    role: PeerRole | None = None,
    expected: SpiffeId | None = None,
) -> SpiffeId:
    """Verify a peer's ``chain`` (leaf first, DER or parsed) and return its SpiffeId.

    ``role`` is the peer's TLS role (CLIENT when we are the server); None accepts
    either serverAuth or clientAuth. ``expected``, if given, must equal the identity.
    Raises a CertError subclass naming the first problem found; see ``errors.py``.
    """
    now = as_utc(now)
    if not isinstance(bundle, TrustBundle):
        bundle = TrustBundle.from_roots(bundle)
    certs = _parse_chain(chain)
    leaf, intermediates = certs[0], certs[1:]

    if _self_issued(leaf) and leaf not in bundle.roots:
        raise SelfSignedLeaf(f"the peer's certificate {_describe(leaf)} is self-signed")
    if _is_ca(leaf):
        raise InvalidUsage(f"the peer's leaf {_describe(leaf)} is a CA certificate")
    _check_validity(leaf, now, "the peer's certificate")
    _check_leaf_usage(leaf, role)
    identity = spiffe_id_of(leaf)
    if identity.trust_domain != bundle.trust_domain:
        raise IdentityMismatch(
            f"peer identity {identity} is not in trust domain {bundle.trust_domain!r}"
        )
    if expected is not None and identity != expected:
        raise IdentityMismatch(f"peer identity {identity} is not the expected {expected}")

    verifier = (
        PolicyBuilder()
        .store(bundle.store)
        .time(now)
        .max_chain_depth(MAX_CHAIN_DEPTH)
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=_ee_policy(role),
        )
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, intermediates)
    except VerificationError as exc:
        raise _diagnose(leaf, intermediates, bundle.roots, now, str(exc)) from exc
    return identity


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The workload identity in ``cert``: its SAN must be exactly one SPIFFE URI.

    IdentityMismatch if the SAN is missing, holds any other name (DNS, IP, email,
    a second URI), or its URI is not a valid workload SPIFFE ID.
    """
    san = _extension(cert, x509.SubjectAlternativeName)
    if san is None:
        raise IdentityMismatch("the certificate has no subjectAltName (no SPIFFE ID)")
    sans = list(san)
    uris = [name.value for name in sans if isinstance(name, x509.UniformResourceIdentifier)]
    others = sorted({type(name).__name__ for name in sans if not isinstance(name, x509.UniformResourceIdentifier)})
    if others:
        raise IdentityMismatch(f"the certificate has non-URI SANs ({', '.join(others)}); want one SPIFFE ID")
    if len(uris) != 1:
        raise IdentityMismatch(f"the certificate has {len(uris)} URI SANs; want exactly one SPIFFE ID")
    try:
        return SpiffeId.parse(uris[0])
    except InvalidSpiffeId as exc:
        raise IdentityMismatch(f"the certificate's URI SAN is not a workload SPIFFE ID: {exc}") from exc


def _extension(cert: x509.Certificate, kind: type[_E]) -> _E | None:
    """The value of ``cert``'s ``kind`` extension, or None; MalformedCert if they do not parse."""
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise MalformedCert(f"the extensions of {_describe(cert)} cannot be parsed: {exc}") from exc


def _parse_chain(chain: Sequence[bytes | x509.Certificate]) -> list[x509.Certificate]:
    if not chain:
        raise UntrustedChain("the peer presented no certificate")
    certs = []
    for index, item in enumerate(chain):
        if isinstance(item, x509.Certificate):
            certs.append(item)
            continue
        try:
            certs.append(x509.load_der_x509_certificate(item))
        except ValueError as exc:
            raise MalformedCert(f"peer certificate {index} is not valid DER: {exc}") from exc
    return certs


def _check_validity(cert: x509.Certificate, now: dt.datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        raise NotYetValid(
            f"{what} {_describe(cert)} is not valid before {cert.not_valid_before_utc.isoformat()}"
        )
    if now > cert.not_valid_after_utc:
        raise ExpiredCert(f"{what} {_describe(cert)} expired at {cert.not_valid_after_utc.isoformat()}")


def _check_leaf_usage(leaf: x509.Certificate, role: PeerRole | None) -> None:
    usage = _extension(leaf, x509.KeyUsage)
    if usage is not None and not usage.digital_signature:
        raise InvalidUsage("the peer's certificate lacks keyUsage digitalSignature")
    ekus = _extension(leaf, x509.ExtendedKeyUsage)
    if ekus is None:
        return
    problem = _eku_problem(ekus, role)
    if problem:
        raise InvalidUsage(f"the peer's certificate {problem}")


def _eku_problem(ekus: x509.ExtendedKeyUsage, role: PeerRole | None) -> str | None:
    """Why this EKU set does not suit ``role`` (None if it does); absent EKU means any."""
    present = set(ekus)
    if ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in present:
        return None
    wanted = [_ROLE_EKU[role]] if role is not None else list(_ROLE_EKU.values())
    if present.isdisjoint(wanted):
        names = " or ".join(_EKU_NAMES[oid] for oid in wanted)
        return f"lacks extendedKeyUsage {names}"
    return None


def _ee_policy(role: PeerRole | None) -> ExtensionPolicy:
    """The webpki leaf profile, with its clientAuth-only EKU rule made role-aware."""

    def check_eku(policy: Policy, cert: x509.Certificate, ekus: x509.ExtendedKeyUsage | None) -> None:
        problem = _eku_problem(ekus, role) if ekus is not None else None
        if problem:
            raise ValueError(problem)

    return ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.ExtendedKeyUsage, Criticality.NON_CRITICAL, check_eku
    )


def _diagnose(
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    roots: tuple[x509.Certificate, ...],
    now: dt.datetime,
    detail: str,
) -> CertError:
    """Name the reason the verifier refused the chain; UntrustedChain(detail) if unclear."""
    current = leaf
    used: list[x509.Certificate] = []
    for _ in range(MAX_CHAIN_DEPTH + 1):
        anchor = next((root for root in roots if is_signed_by(current, root)), None)
        if anchor is not None:
            try:
                _check_validity(anchor, now, "trust bundle root")
            except CertError as exc:
                return exc
            return UntrustedChain(f"chain to {_describe(anchor)} refused: {detail}")
        parent = next((c for c in intermediates if c not in used and is_signed_by(current, c)), None)
        if parent is None:
            if _self_issued(current):
                return UntrustedChain(f"the chain ends at {_describe(current)}, a root not in the trust bundle")
            if any(c.subject == current.issuer for c in (*intermediates, *roots)):
                return UntrustedChain(
                    f"{_describe(current)} is not signed by the key of any trusted or presented "
                    f"cert named {current.issuer.rfc4514_string()!r} (another CA, or a bad signature)"
                )
            return UntrustedChain(
                f"{_describe(current)} is issued by {current.issuer.rfc4514_string()!r}, "
                "which is not in the trust bundle or the peer's chain"
            )
        if not _is_ca(parent):
            return NotACa(f"{_describe(current)} is signed by {_describe(parent)}, which is not a CA")
        try:
            _check_validity(parent, now, "intermediate")
        except CertError as exc:
            return exc
        used.append(parent)
        current = parent
    return UntrustedChain(f"chain longer than {MAX_CHAIN_DEPTH}: {detail}")


def is_signed_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    """True if ``parent``'s subject is ``child``'s issuer and its key verifies ``child``."""
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def ca_trust_domain(cert: x509.Certificate) -> str | None:
    """The trust domain a CA cert names in a ``spiffe://<td>`` URI SAN, or None."""
    sans = _extension(cert, x509.SubjectAlternativeName)
    if sans is None:
        return None
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        try:
            return parse_trust_domain_id(uri)
        except InvalidSpiffeId:
            continue
    return None


def _self_issued(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer and is_signed_by(cert, cert)


def _is_ca(cert: x509.Certificate) -> bool:
    constraints = _extension(cert, x509.BasicConstraints)
    return constraints is not None and constraints.ca


def _describe(cert: x509.Certificate) -> str:
    """A short name for messages: the subject, else the URI SAN, else the serial."""
    subject = cert.subject.rfc4514_string()
    if subject:
        return f"[{subject}]"
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except (x509.ExtensionNotFound, ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        uris = []
    return f"[{uris[0]}]" if uris else f"[serial {cert.serial_number:x}]"


__all__ = [
    "MAX_CHAIN_DEPTH",
    "PeerRole",
    "TrustBundle",
    "ca_trust_domain",
    "is_signed_by",
    "spiffe_id_of",
    "verify_peer",
]
