"""The control plane's CA service: signs workload certificates for callers that prove who they are.

Owns: the gRPC method ``istio.v1.auth.IstioCertificateService/CreateCertificate``
(``certs.ca_api`` defines its messages), the rule that decides what a caller may be
issued (exactly the SPIFFE ID its bootstrap token proves), the validity policy
(default 24 h, capped at 7 days), the CA service's counters, and the CA state
directory: the mesh CA (``root-cert.pem``/``root-key.pem``, or Istio's plug-in files)
and the token HMAC key (``token-key``), created on first start so they survive restarts.

Must not: hold certificate logic (``certs.ca`` builds the certificate, ``certs.csr``
judges the CSR, ``certs.tokens`` checks the token) or start a server: the control
server calls ``CaService.add_to_server`` on its own ``grpc.aio.Server``.

Answers: UNAUTHENTICATED (no ``authorization: Bearer <token>`` metadata, or a
malformed, forged or expired token); INVALID_ARGUMENT (a CSR that does not decode,
has a bad signature or an unaccepted key; a negative ``validity_duration``);
PERMISSION_DENIED (a CSR asking for any name but the token's SPIFFE ID, or for a CA
cert; logged at WARNING with the caller's address); INTERNAL (the CA cannot sign);
OK with ``cert_chain``: PEM strings, leaf first and root last.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
import stat
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from certs import ca as ca_mod
from certs import tokens
from certs.ca_api import SERVICE, CertificateRequest, CertificateResponse
from certs.csr import load_csr
from certs.errors import CaError, CertError, InvalidCsr, InvalidToken
from certs.pem import KEY_FILE_MODE, atomic_write, certs_to_pem, write_certs, write_private_key
from certs.spiffe import SpiffeId

log = logging.getLogger("pillion.control.ca")

DEFAULT_TTL = dt.timedelta(hours=24)
MAX_TTL = dt.timedelta(days=7)
MAX_CSR_BYTES = 64 * 1024
TOKEN_KEY_FILE = "token-key"

_CA_FILES = (ca_mod.ROOT_CERT_FILE, ca_mod.ROOT_KEY_FILE, ca_mod.CA_CERT_FILE, ca_mod.CA_KEY_FILE)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Refused(Exception):
    """A request the CA will not serve: the gRPC status, a metrics reason and a message."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


class CaService:
    """Signs CSRs over gRPC for workloads holding a bootstrap token of this mesh."""

    def __init__(
        self,
        authority: ca_mod.CertificateAuthority,
        token_key: bytes,
        *,
        trust_domain: str | None = None,
        default_ttl: dt.timedelta = DEFAULT_TTL,
        max_ttl: dt.timedelta = MAX_TTL,
        clock: Callable[[], dt.datetime] = utc_now,
    ) -> None:
        if trust_domain is not None and trust_domain != authority.trust_domain:
            raise ValueError(
                f"trust domain {trust_domain!r} is not the CA's ({authority.trust_domain!r})"
            )
        if len(token_key) < 16:
            raise ValueError("token key too short (want 32 random bytes)")
        if not dt.timedelta(0) < default_ttl <= max_ttl:
            raise ValueError("want 0 < default_ttl <= max_ttl")
        self.authority = authority
        self.token_key = token_key
        self.trust_domain = authority.trust_domain
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self.clock = clock
        self.issued = 0
        self.denied: Counter[str] = Counter()

    # --- wiring ------------------------------------------------------------------------

    def trust_bundle_secret(self) -> Any:
        """The mesh roots as the SDS secret Istio names ``ROOTCA`` (public: no key in it)."""
        sec = secret_pb2.Secret(name="ROOTCA")
        sec.validation_context.trusted_ca.inline_bytes = certs_to_pem([self.authority.root])
        return sec

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register CreateCertificate on ``server`` (before ``server.start()``)."""
        server.add_generic_rpc_handlers((self.handler(),))

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.unary_unary_rpc_method_handler(
            self._create_certificate,
            request_deserializer=CertificateRequest.FromString,
            response_serializer=CertificateResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(SERVICE, {"CreateCertificate": method})

    def stats(self) -> dict[str, Any]:
        """Counters for metrics: ``{"issued": n, "denied": {reason: n}}``.

        Reasons: ``no_token``, ``bad_token``, ``bad_csr``, ``bad_request``,
        ``wrong_san``, ``bad_ca``.
        """
        return {"issued": self.issued, "denied": dict(self.denied)}

    # --- the RPC -----------------------------------------------------------------------

    async def _create_certificate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        peer = context.peer() or "unknown peer"
        try:
            chain = self.create_certificate(request, context.invocation_metadata() or (), peer)
        except Refused as refusal:
            self.denied[refusal.reason] += 1
            await context.abort(refusal.code, refusal.message)  # raises
            raise  # not reached
        self.issued += 1
        return CertificateResponse(cert_chain=chain)

    def create_certificate(self, request: Any, metadata: Iterable[Any], peer: str) -> list[str]:
        """The chain (PEM strings, leaf first) for ``request``, or Refused. No I/O."""
        now = self.clock()
        identity = self._authenticate(metadata, now)
        csr = self._decode_csr(request.csr)
        self._authorize(csr, identity, peer)
        ttl = self._ttl(int(request.validity_duration))
        try:
            chain = self.authority.sign_csr(csr, identity, now=now, ttl=ttl)
        except InvalidCsr as exc:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, exc.reason, f"CSR refused: {exc}") from exc
        except CaError as exc:
            log.error("the CA cannot sign for %s: %s", identity, exc)
            raise Refused(grpc.StatusCode.INTERNAL, exc.reason, f"the CA cannot sign: {exc}") from exc
        log.info("issued a certificate for %s to %s, valid until %s",
                 identity, peer, chain[0].not_valid_after_utc.isoformat())
        return [certs_to_pem([cert]).decode() for cert in chain]

    def _authenticate(self, metadata: Iterable[Any], now: dt.datetime) -> SpiffeId:
        values = [value for key, value in metadata if key.lower() == "authorization"]
        if not values:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "no_token",
                          "no bootstrap token: send gRPC metadata 'authorization: Bearer <token>' "
                          "(make one with `pillion control token`)")
        if len(values) > 1:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "bad_token",
                          "more than one authorization header")
        value = values[0].decode(errors="replace") if isinstance(values[0], bytes) else values[0]
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "bad_token",
                          "the authorization header is not 'Bearer <token>'")
        try:
            namespace, service_account = tokens.verify_token(self.token_key, token, now)
            return SpiffeId(self.trust_domain, namespace, service_account)
        except CertError as exc:  # InvalidToken, or InvalidSpiffeId for a token of odd names
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, InvalidToken.reason,
                          f"bootstrap token refused: {exc}") from exc

    @staticmethod
    def _decode_csr(text: str) -> x509.CertificateSigningRequest:
        data = text.encode()
        if len(data) > MAX_CSR_BYTES:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, InvalidCsr.reason,
                          f"malformed CSR: larger than {MAX_CSR_BYTES} bytes")
        try:
            return load_csr(data)
        except InvalidCsr as exc:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, exc.reason, f"malformed CSR: {exc}") from exc

    def _authorize(self, csr: x509.CertificateSigningRequest, identity: SpiffeId, peer: str) -> None:
        """Refuse a CSR that asks for another name than ``identity``, or for a CA cert."""
        try:
            extensions = list(csr.extensions)
        except ValueError as exc:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, InvalidCsr.reason,
                          f"malformed CSR: its extensions cannot be parsed: {exc}") from exc
        asked: list[str] = []
        wants_ca = False
        for extension in extensions:
            value = extension.value
            if isinstance(value, x509.SubjectAlternativeName):
                asked.extend(_describe_name(name) for name in value)
            elif isinstance(value, x509.BasicConstraints) and value.ca:
                wants_ca = True
        others = [name for name in asked if name != str(identity)]
        if not others and not wants_ca:
            return
        what = ", ".join(others) if others else "a CA certificate"
        message = f"CSR asks for {what} but the token proves {identity}"
        log.warning("refused a certificate to %s: %s", peer, message)
        raise Refused(grpc.StatusCode.PERMISSION_DENIED, "wrong_san", message)

    def _ttl(self, seconds: int) -> dt.timedelta:
        if seconds < 0:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "bad_request",
                          f"validity_duration must not be negative (got {seconds})")
        if seconds == 0:
            return self.default_ttl
        return min(dt.timedelta(seconds=min(seconds, 10 * 365 * 86400)), self.max_ttl)  # no overflow


def _describe_name(name: x509.GeneralName) -> str:
    """A SAN as the CSR spelled it: the URI itself, else ``DNS:x``, ``IP:x``, ..."""
    if isinstance(name, x509.UniformResourceIdentifier):
        return name.value
    kind = {x509.DNSName: "DNS", x509.IPAddress: "IP", x509.RFC822Name: "email"}.get(type(name))
    return f"{kind or type(name).__name__}:{name.value}"


# --- the CA state directory ----------------------------------------------------------


def load_or_create_ca(
    state_dir: str | os.PathLike[str], trust_domain: str, *, now: dt.datetime | None = None
) -> ca_mod.CertificateAuthority:
    """The mesh CA in ``state_dir``; a new root CA is made and written there if it has none.

    Loads Istio's plug-in files (``ca-cert.pem``, ``ca-key.pem``, ``cert-chain.pem``,
    ``root-cert.pem``) or ``root-cert.pem``/``root-key.pem`` (as ``pillion certs init``
    writes them). If any CA file exists the CA is loaded, never replaced: a directory
    with half a CA is an error (CaError or OSError) for the operator to fix.
    """
    base = os.fspath(state_dir)
    if any(os.path.exists(os.path.join(base, name)) for name in _CA_FILES):
        if not any(os.path.exists(os.path.join(base, name))
                   for name in (ca_mod.ROOT_CERT_FILE, ca_mod.CA_CERT_FILE)):
            raise CaError(f"{base} holds a CA key but no CA certificate; restore it or remove the key")
        authority = ca_mod.CertificateAuthority.load_dir(base, trust_domain=trust_domain)
        log.info("loaded the mesh CA for %s from %s", authority.trust_domain, base)
        return authority
    _make_private_dir(base)
    authority = ca_mod.create_root_ca(trust_domain, now=now or utc_now())
    write_private_key(os.path.join(base, ca_mod.ROOT_KEY_FILE), authority.key)
    write_certs(os.path.join(base, ca_mod.ROOT_CERT_FILE), [authority.cert])
    log.info("created a new mesh root CA for %s in %s", trust_domain, base)
    return authority


def load_or_create_token_key(state_dir: str | os.PathLike[str]) -> bytes:
    """The HMAC key for bootstrap tokens: ``token-key`` in ``state_dir`` (32 random bytes,
    mode 0600), created on first use. Every token is void once this file is replaced."""
    base = os.fspath(state_dir)
    path = os.path.join(base, TOKEN_KEY_FILE)
    try:
        with open(path, "rb") as handle:
            key = handle.read()
            mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
    except FileNotFoundError:
        _make_private_dir(base)
        key = secrets.token_bytes(tokens.KEY_BYTES)
        atomic_write(path, key, KEY_FILE_MODE)
        log.info("created a new bootstrap token key in %s", path)
        return key
    if len(key) < 16:
        raise ValueError(f"{path}: token key too short ({len(key)} bytes); remove it to make a new one")
    if mode & 0o077:
        log.warning("%s is readable by others (mode %04o); anyone who reads it can mint tokens",
                    path, mode)
    return key


def issue_workload_token(
    state_dir: str | os.PathLike[str],
    namespace: str,
    sa: str,
    hours: float,
    *,
    now: dt.datetime | None = None,
) -> str:
    """A bootstrap token proving ``namespace``/``sa`` to the CA of ``state_dir``, valid ``hours``."""
    if hours <= 0:
        raise ValueError("hours must be positive")
    key = load_or_create_token_key(state_dir)
    expires = (now or utc_now()) + dt.timedelta(hours=hours)
    return tokens.issue_token(key, namespace, sa, expires)


def _make_private_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)  # the CA key and token key live here


__all__ = [
    "DEFAULT_TTL", "MAX_TTL", "TOKEN_KEY_FILE", "CaService", "Refused",
    "issue_workload_token", "load_or_create_ca", "load_or_create_token_key",
]
