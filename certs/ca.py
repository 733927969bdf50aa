"""The mesh CA: create a root (and optionally an intermediate), load one, sign workload CSRs.

Owns: what a Pillion CA certificate and a workload certificate contain (names,
extensions, validity window, serial) and the Istio plug-in CA file names
(``root-cert.pem``, ``root-key.pem``, ``ca-cert.pem``, ``ca-key.pem``, ``cert-chain.pem``).

Must not: read the clock (every function takes ``now``), decide who a workload is
(the caller passes the identity the workload proved), verify peers (``verify.py``),
or write files (``cli.py`` does, through ``pem.py``). ``load``/``load_dir`` read only
the paths they are given.

Strategy, for a workload certificate:

- subject empty and the SPIFFE ID as the one URI SAN, marked critical (RFC 5280
  4.2.1.6 requires that when the subject is empty), as Istio issues them;
- keyUsage digitalSignature+keyEncipherment (critical), extendedKeyUsage
  serverAuth+clientAuth, basicConstraints CA=false (critical), subject and
  authority key identifiers, a random 159-bit serial;
- notBefore = ``now - clock_skew`` (60 s by default, so a peer whose clock is a little
  behind still accepts a fresh cert), never earlier than the CA's own notBefore;
  notAfter = ``now + ttl`` (24 h by default), never later than any CA cert above it.
  The backdate does not lengthen the life of a cert past ``now + ttl``.

CA certs carry basicConstraints CA=true (critical) with a path length (0 for an
intermediate, 0 for a root that signs leaves, 1 for a root with an intermediate),
keyUsage keyCertSign+cRLSign (critical), key identifiers, subject ``O=<trust domain>``
and the trust domain id ``spiffe://<td>`` as URI SAN, which is how ``load`` and
``verify.TrustBundle`` learn the trust domain back.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs._time import as_utc, whole_seconds
from certs.csr import check_csr
from certs.errors import CaError, IdentityMismatch
from certs.pem import PrivateKey, read_certs, read_private_key
from certs.spiffe import SpiffeId, trust_domain_id, validate_trust_domain
from certs.verify import ca_trust_domain, is_signed_by

KeyType = Literal["ec", "rsa"]

DEFAULT_LEAF_TTL = dt.timedelta(hours=24)
DEFAULT_ROOT_TTL = dt.timedelta(days=3650)
DEFAULT_INTERMEDIATE_TTL = dt.timedelta(days=730)
DEFAULT_CLOCK_SKEW = dt.timedelta(seconds=60)

ROOT_CERT_FILE = "root-cert.pem"
ROOT_KEY_FILE = "root-key.pem"
CA_CERT_FILE = "ca-cert.pem"
CA_KEY_FILE = "ca-key.pem"
CERT_CHAIN_FILE = "cert-chain.pem"

ROOT_COMMON_NAME = "Pillion Root CA"
INTERMEDIATE_COMMON_NAME = "Pillion Intermediate CA"


def generate_ca_key(key_type: KeyType = "ec") -> PrivateKey:
    """A new CA key: ECDSA P-256 (``"ec"``, the default) or RSA 2048 (``"rsa"``)."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {key_type!r} (want 'ec' or 'rsa')")


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    """A signing CA: its cert and key, the certs above it (root last) and its trust domain.

    For a root, ``parents`` is empty. For an intermediate it is ``(root,)``.
    """

    cert: x509.Certificate
    key: PrivateKey
    parents: tuple[x509.Certificate, ...]
    trust_domain: str

    @property
    def root(self) -> x509.Certificate:
        """The self-signed root at the top of this CA's chain."""
        return self.parents[-1] if self.parents else self.cert

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """This CA's cert followed by its parents: what goes after a leaf it signs."""
        return (self.cert, *self.parents)

    def sign_csr(
        self,
        csr: x509.CertificateSigningRequest,
        identity: SpiffeId,
        *,
        now: dt.datetime,
        ttl: dt.timedelta = DEFAULT_LEAF_TTL,
        clock_skew: dt.timedelta = DEFAULT_CLOCK_SKEW,
    ) -> list[x509.Certificate]:
        """Sign ``csr`` for ``identity``; return the chain, leaf first and root last.

        ``identity`` is the one the caller authenticated; ``check_csr`` refuses a CSR
        asking for any other SAN (InvalidCsr). IdentityMismatch if ``identity`` is not
        in this CA's trust domain; CaError if the CA is not valid at ``now``.
        """
        if identity.trust_domain != self.trust_domain:
            raise IdentityMismatch(f"{identity} is not in this CA's trust domain {self.trust_domain!r}")
        check_csr(csr, identity)
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):  # check_csr ensured
            raise TypeError(f"unsupported public key type {type(public_key).__name__}")
        not_before, not_after = _window(self.chain, as_utc(now), ttl, clock_skew)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(leaf=True), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(_authority_key_id(self.cert), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
                critical=True,
            )
            .sign(self.key, _hash_for(self.key))
        )
        return [leaf, *self.chain]

    @classmethod
    def load(
        cls,
        cert_path: str | os.PathLike[str],
        key_path: str | os.PathLike[str],
        chain_path: str | os.PathLike[str] | None = None,
        *,
        trust_domain: str | None = None,
    ) -> CertificateAuthority:
        """Load a CA from PEM files and check it is usable (CaError if not).

        ``chain_path`` holds the certs above ``cert_path`` up to the root (it may also
        start with the CA cert itself, as Istio's ``cert-chain.pem`` does); omit it for
        a root. ``trust_domain`` is needed only if the CA cert has no ``spiffe://<td>``
        URI SAN (a CA made by another tool).
        """
        certs = read_certs(cert_path)
        parents = read_certs(chain_path) if chain_path is not None else certs[1:]
        if parents and parents[0] == certs[0]:
            parents = parents[1:]
        return cls.from_parts(certs[0], read_private_key(key_path), parents, trust_domain=trust_domain)

    @classmethod
    def load_dir(
        cls, directory: str | os.PathLike[str], *, trust_domain: str | None = None
    ) -> CertificateAuthority:
        """Load the CA from a directory laid out as ``pillion certs init`` writes it.

        With ``ca-cert.pem``/``ca-key.pem`` present (Istio's plug-in CA layout), the
        intermediate signs and ``cert-chain.pem`` (else ``root-cert.pem``) gives its
        parents; otherwise ``root-cert.pem``/``root-key.pem`` are the signing CA.
        """
        base = os.fspath(directory)
        ca_cert = os.path.join(base, CA_CERT_FILE)
        if os.path.exists(ca_cert):
            chain = os.path.join(base, CERT_CHAIN_FILE)
            if not os.path.exists(chain):
                chain = os.path.join(base, ROOT_CERT_FILE)
            return cls.load(ca_cert, os.path.join(base, CA_KEY_FILE), chain, trust_domain=trust_domain)
        root_cert, root_key = os.path.join(base, ROOT_CERT_FILE), os.path.join(base, ROOT_KEY_FILE)
        return cls.load(root_cert, root_key, trust_domain=trust_domain)

    @classmethod
    def from_parts(
        cls,
        cert: x509.Certificate,
        key: PrivateKey,
        parents: list[x509.Certificate] | tuple[x509.Certificate, ...] = (),
        *,
        trust_domain: str | None = None,
    ) -> CertificateAuthority:
        """Assemble a CA from objects, checking key match, CA flags and chain links."""
        if _public_der(key.public_key()) != _public_der(cert.public_key()):
            raise CaError("the CA private key does not match the CA certificate")
        chain = [cert, *parents]
        for child, parent in itertools.pairwise(chain):
            if not is_signed_by(child, parent):
                raise CaError(f"{_name(child)} is not signed by the next cert {_name(parent)}")
        for link in chain:
            _require_ca(link)
        if not is_signed_by(chain[-1], chain[-1]):
            raise CaError(f"the last cert of the CA chain ({_name(chain[-1])}) is not a self-signed root")
        return cls(cert, key, tuple(parents), _trust_domain_of(cert, trust_domain))


def create_root_ca(
    trust_domain: str,
    *,
    now: dt.datetime,
    ttl: dt.timedelta = DEFAULT_ROOT_TTL,
    key_type: KeyType = "ec",
    path_length: int = 0,
    clock_skew: dt.timedelta = DEFAULT_CLOCK_SKEW,
) -> CertificateAuthority:
    """A new self-signed root for ``trust_domain``, valid from ``now - clock_skew``.

    ``path_length`` is 0 for a root that signs workloads itself and 1 for a root
    that will sign one level of intermediate.
    """
    validate_trust_domain(trust_domain)
    if path_length < 0:
        raise ValueError("path_length must be >= 0")
    if ttl <= dt.timedelta(0) or clock_skew < dt.timedelta(0):
        raise ValueError("ttl must be positive and clock_skew not negative")
    start = whole_seconds(as_utc(now))
    key = generate_ca_key(key_type)
    name = _ca_name(trust_domain, ROOT_COMMON_NAME)
    cert = _build_ca_cert(
        name, name, key.public_key(), key, None,
        start - clock_skew, start + ttl, path_length, trust_domain,
    )
    return CertificateAuthority(cert, key, (), trust_domain)


def create_intermediate_ca(
    parent: CertificateAuthority,
    *,
    now: dt.datetime,
    ttl: dt.timedelta = DEFAULT_INTERMEDIATE_TTL,
    key_type: KeyType = "ec",
    clock_skew: dt.timedelta = DEFAULT_CLOCK_SKEW,
) -> CertificateAuthority:
    """A new intermediate (path length 0) signed by ``parent``, capped at its expiry.

    CaError if ``parent``'s path length leaves no room for another CA level.
    """
    constraints = parent.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    if constraints.path_length is not None and constraints.path_length < 1:
        raise CaError(
            f"{_name(parent.cert)} has path length {constraints.path_length}; "
            "it cannot sign an intermediate CA (create the root with path_length=1)"
        )
    not_before, not_after = _window(parent.chain, as_utc(now), ttl, clock_skew)
    key = generate_ca_key(key_type)
    cert = _build_ca_cert(
        _ca_name(parent.trust_domain, INTERMEDIATE_COMMON_NAME), parent.cert.subject,
        key.public_key(), parent.key, parent.cert,
        not_before, not_after, 0, parent.trust_domain,
    )
    return CertificateAuthority(cert, key, parent.chain, parent.trust_domain)


def _window(
    issuers: tuple[x509.Certificate, ...],
    now: dt.datetime,
    ttl: dt.timedelta,
    clock_skew: dt.timedelta,
) -> tuple[dt.datetime, dt.datetime]:
    """(notBefore, notAfter) for a cert issued at ``now``, fitted inside every issuer."""
    if ttl <= dt.timedelta(0):
        raise ValueError("ttl must be positive")
    if clock_skew < dt.timedelta(0):
        raise ValueError("clock_skew must not be negative")
    now = whole_seconds(now)
    earliest = max(cert.not_valid_before_utc for cert in issuers)
    latest = min(cert.not_valid_after_utc for cert in issuers)
    if now < earliest:
        raise CaError(f"the CA is not valid until {earliest.isoformat()}")
    if now >= latest:
        raise CaError(f"the CA expired at {latest.isoformat()}")
    return max(now - clock_skew, earliest), min(now + ttl, latest)


def _build_ca_cert(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    signing_key: PrivateKey,
    issuer_cert: x509.Certificate | None,
    not_before: dt.datetime,
    not_after: dt.datetime,
    path_length: int,
    trust_domain: str,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(leaf=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(trust_domain_id(trust_domain))]),
            critical=False,
        )
    )
    if issuer_cert is not None:
        builder = builder.add_extension(_authority_key_id(issuer_cert), critical=False)
    return builder.sign(signing_key, _hash_for(signing_key))


def _ca_name(trust_domain: str, common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _key_usage(*, leaf: bool) -> x509.KeyUsage:
    """Leaf: digitalSignature + keyEncipherment. CA: keyCertSign + cRLSign."""
    ca = not leaf
    return x509.KeyUsage(leaf, False, leaf, False, False, ca, ca, False, False)


def _authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _hash_for(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _public_der(public_key: object) -> bytes:
    if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise CaError(f"unsupported CA key type {type(public_key).__name__}")
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _require_ca(cert: x509.Certificate) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise CaError(f"{_name(cert)} has no basicConstraints; it is not a CA") from None
    if not constraints.ca:
        raise CaError(f"{_name(cert)} is not a CA certificate (basicConstraints CA=false)")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.key_cert_sign:
        raise CaError(f"{_name(cert)} lacks keyUsage keyCertSign")


def _trust_domain_of(cert: x509.Certificate, given: str | None) -> str:
    found = ca_trust_domain(cert)
    if given is not None:
        validate_trust_domain(given)
        if found is not None and found != given:
            raise CaError(f"the CA cert is for trust domain {found!r}, not {given!r}")
        return given
    if found is None:
        raise CaError("the CA cert names no trust domain (no spiffe://<td> URI SAN); pass trust_domain")
    return found


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


__all__ = [
    "CA_CERT_FILE", "CA_KEY_FILE", "CERT_CHAIN_FILE", "DEFAULT_CLOCK_SKEW", "DEFAULT_INTERMEDIATE_TTL",
    "DEFAULT_LEAF_TTL", "DEFAULT_ROOT_TTL", "ROOT_CERT_FILE", "ROOT_KEY_FILE", "CertificateAuthority",
    "KeyType", "create_intermediate_ca", "create_root_ca", "generate_ca_key",
]
