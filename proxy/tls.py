"""TLS at run time: SSL contexts from the snapshot's secrets, and peer identity.

``TlsProvider`` builds ``ssl.SSLContext`` objects for the compiled TLS specs
(``model.TlsServer`` on listeners, ``model.TlsClient`` on endpoints) from the
SDS secrets of the current snapshot, and caches them. When a secret changes
(certificate rotation) the contexts built from it are dropped, so the next
handshake uses the new certificate while established connections keep the
session they have.

Identity: after a handshake, ``peer_of(transport)`` reads the peer's URI SANs
(SPIFFE IDs) and the SHA-256 of its certificate; ``sans_allowed`` applies the
spec's subject-alt-name matchers (exact SPIFFE IDs for outbound ISTIO_MUTUAL,
the trust-domain prefix inbound).

The standard library loads a certificate and key only from files, so they
are written to a private temporary directory (0700, key 0600, in /dev/shm
when it exists) just long enough to be loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import ssl
import tempfile
from dataclasses import dataclass
from typing import Any

from proxy.model import SanMatch, Secret, TlsClient, TlsServer

log = logging.getLogger("pillion.tls")

_TMP = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end of a TLS connection."""

    uris: tuple[str, ...]  # URI SANs (SPIFFE IDs)
    dns: tuple[str, ...]
    cert_sha256: str  # hex, of the DER certificate
    sni: str = ""  # the server name the client asked for (AuthorizationPolicy connection.sni)

    @property
    def spiffe_id(self) -> str:
        return next((u for u in self.uris if u.startswith("spiffe://")), "")


class MissingSecret(Exception):
    """A TLS spec names a secret the snapshot does not hold (yet)."""


def _load_chain(ctx: ssl.SSLContext, chain: bytes, key: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="pillion-tls-", dir=_TMP) as d:
        cert_path, key_path = os.path.join(d, "chain.pem"), os.path.join(d, "key.pem")
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        with open(cert_path, "wb") as f:
            f.write(chain)
        ctx.load_cert_chain(cert_path, key_path)


class TlsProvider:
    def __init__(self) -> None:
        self.secrets: dict[str, Secret] = {}
        self._server: dict[TlsServer, ssl.SSLContext] = {}
        self._client: dict[TlsClient, ssl.SSLContext] = {}
        self.handshake_failures: dict[str, int] = {}

    def update(self, secrets: dict[str, Secret]) -> None:
        changed = {n for n in set(self.secrets) | set(secrets) if self.secrets.get(n) != secrets.get(n)}
        self.secrets = secrets
        if changed:
            self._server = {s: c for s, c in self._server.items() if not {s.cert_secret, s.roots_secret} & changed}
            self._client = {s: c for s, c in self._client.items() if not {s.cert_secret, s.roots_secret} & changed}

    def count_failure(self, reason: str) -> None:
        self.handshake_failures[reason] = self.handshake_failures.get(reason, 0) + 1

    def _secret(self, name: str) -> Secret:
        sec = self.secrets.get(name)
        if sec is None:
            raise MissingSecret(name)
        return sec

    def server_context(self, spec: TlsServer) -> ssl.SSLContext:
        ctx = self._server.get(spec)
        if ctx is None:
            cert = self._secret(spec.cert_secret)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            _load_chain(ctx, cert.cert_chain, cert.key)
            if spec.roots_secret:
                ctx.load_verify_locations(cadata=self._secret(spec.roots_secret).roots.decode())
                ctx.verify_mode = ssl.CERT_REQUIRED if spec.require_client_cert else ssl.CERT_OPTIONAL
            if spec.alpn:
                ctx.set_alpn_protocols(list(spec.alpn))
            ctx.sni_callback = _remember_sni
            self._server[spec] = ctx
        return ctx

    def client_context(self, spec: TlsClient) -> ssl.SSLContext:
        ctx = self._client.get(spec)
        if ctx is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.check_hostname = False  # identities are checked against the SAN matchers instead
            if spec.roots_secret:
                ctx.load_verify_locations(cadata=self._secret(spec.roots_secret).roots.decode())
                ctx.verify_mode = ssl.CERT_REQUIRED
            elif spec.ca_file:
                ctx.load_verify_locations(cafile=spec.ca_file)
                ctx.verify_mode = ssl.CERT_REQUIRED
            else:
                ctx.verify_mode = ssl.CERT_NONE  # DestinationRule insecureSkipVerify
            if spec.cert_secret:
                cert = self._secret(spec.cert_secret)
                _load_chain(ctx, cert.cert_chain, cert.key)
            elif spec.cert_file:
                ctx.load_cert_chain(spec.cert_file, spec.key_file)
            if spec.alpn:
                ctx.set_alpn_protocols(list(spec.alpn))
            self._client[spec] = ctx
        return ctx

    def local_spiffe_id(self, secret_name: str) -> str:
        """The URI SAN of our own certificate (for the By= of x-forwarded-client-cert)."""
        sec = self.secrets.get(secret_name)
        if sec is None or not sec.cert_chain:
            return ""
        return _first_uri(sec.cert_chain)


def _first_uri(chain_pem: bytes) -> str:
    from cryptography import x509

    try:
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except (ValueError, IndexError, x509.ExtensionNotFound):
        return ""
    return uris[0] if uris else ""


def _remember_sni(sslobj: Any, server_name: str | None, _ctx: ssl.SSLContext) -> None:
    """Server side: keep the client's SNI on the SSL object (the stdlib does not expose it)."""
    sslobj._pillion_sni = server_name or ""


def peer_of(transport: Any) -> Peer | None:
    """The peer of an established TLS connection, or None if it sent no certificate."""
    cert = transport.get_extra_info("peercert")
    sslobj = transport.get_extra_info("ssl_object")
    der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    if not cert or der is None:
        return None
    uris = tuple(v for k, v in cert.get("subjectAltName", ()) if k == "URI")
    dns = tuple(v for k, v in cert.get("subjectAltName", ()) if k == "DNS")
    return Peer(uris, dns, hashlib.sha256(der).hexdigest(), getattr(sslobj, "_pillion_sni", ""))


def sans_allowed(matchers: tuple[SanMatch, ...], peer: Peer | None) -> bool:
    if not matchers:
        return True
    if peer is None:
        return False
    for m in matchers:
        values = peer.uris if m.kind == "URI" else peer.dns
        if any(m.matches(m.kind, v) for v in values):
            return True
    return False


def failure_reason(exc: BaseException) -> str:
    """A short label for a failed handshake, for metrics (Envoy's ssl.* stats spirit)."""
    text = str(exc).lower()
    for needle, reason in (("wrong_san", "wrong_san"), ("expired", "expired"),
                           ("self-signed certificate in certificate chain", "untrusted"), ("not yet valid", "not_yet_valid"),
                           ("self-signed", "self_signed"), ("self signed", "self_signed"),
                           ("unknown ca", "untrusted"), ("unable to get local issuer", "untrusted"),
                           ("certificate verify failed", "untrusted"), ("peer did not return a certificate", "no_client_cert"),
                           ("certificate required", "no_client_cert"), ("wrong version number", "not_tls"),
                           ("http request", "not_tls")):
        if needle in text:
            return reason
    return "handshake_error"


def close_quietly(sock: Any) -> None:
    with contextlib.suppress(OSError):
        sock.close()
