"""A mesh PKI for tests, made with the project's own certs library."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from certs.ca import CertificateAuthority, create_root_ca
from certs.csr import build_csr, generate_key
from certs.pem import certs_to_pem, key_to_pem, write_certs, write_private_key
from certs.spiffe import SpiffeId


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class MeshPki:
    def __init__(self, trust_domain: str = "cluster.local") -> None:
        self.trust_domain = trust_domain
        self.ca: CertificateAuthority = create_root_ca(trust_domain, now=utcnow() - dt.timedelta(days=1))

    @property
    def root_pem(self) -> bytes:
        return certs_to_pem([self.ca.root])

    def issue(self, out: Path, namespace: str, service_account: str, *, ttl: dt.timedelta = dt.timedelta(hours=24),
              now: dt.datetime | None = None, trust_domain: str | None = None) -> Path:
        """Write cert-chain.pem, key.pem and root-cert.pem (Istio's file names) into ``out``."""
        out.mkdir(parents=True, exist_ok=True)
        key = generate_key()
        identity = SpiffeId(trust_domain or self.trust_domain, namespace, service_account)
        chain = self.ca.sign_csr(build_csr(key, identity), identity, now=now or utcnow(), ttl=ttl)
        write_certs(out / "cert-chain.pem", chain[:-1] or chain)
        write_private_key(out / "key.pem", key)
        (out / "root-cert.pem").write_bytes(self.root_pem)
        return out

    def client_files(self, out: Path, namespace: str, service_account: str, **kw: object) -> tuple[str, str, str]:
        d = self.issue(out, namespace, service_account, **kw)  # type: ignore[arg-type]
        return str(d / "cert-chain.pem"), str(d / "key.pem"), str(d / "root-cert.pem")


def pem_key(key: object) -> bytes:
    return key_to_pem(key)  # type: ignore[arg-type]
