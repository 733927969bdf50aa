"""The proxy's workload certificate: key made in memory, signed by the mesh CA, renewed.

``CertManager.run`` generates an ECDSA P-256 key (it never touches disk),
sends a CSR for this workload's SPIFFE ID to the CA (``certs.ca_api``, the
IstioCertificateService shape) with the workload's bootstrap token, and hands
the result to ``on_change`` as the two SDS secrets Istio names: ``default``
(chain + key) and ``ROOTCA`` (the root, last in the chain). It renews at
about half the lifetime (with jitter, ``certs.rotation``); if the CA cannot be
reached it keeps the current certificate and retries with jittered
exponential backoff. Swapping secrets changes only new handshakes: established
connections keep theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from certs.ca_api import DEFAULT_VALIDITY_SECONDS, METHOD, CertificateRequest, CertificateResponse
from certs.csr import build_csr, csr_to_pem, generate_key
from certs.pem import certs_to_pem, key_to_pem
from certs.rotation import renew_at
from certs.spiffe import SpiffeId

log = logging.getLogger("pillion.certs")

SecretsCallback = Callable[[tuple[secret_pb2.Secret, ...]], Awaitable[None]]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CertManager:
    def __init__(self, ca_address: str, token_file: str, identity: SpiffeId, on_change: SecretsCallback, *,
                 validity_seconds: int = DEFAULT_VALIDITY_SECONDS, rng: random.Random | None = None,
                 clock: Callable[[], dt.datetime] = _now, backoff_base: float = 0.5, backoff_max: float = 60.0,
                 call_timeout: float = 10.0) -> None:
        self.ca_address = ca_address
        self.token_file = token_file
        self.identity = identity
        self.on_change = on_change
        self.validity_seconds = validity_seconds
        self.rng = rng or random.Random()
        self.clock = clock
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.call_timeout = call_timeout
        self.secrets: tuple[secret_pb2.Secret, ...] = ()
        self.leaf: x509.Certificate | None = None
        self.renewals = 0
        self.failures = 0
        self.last_error = ""
        self.renew_at: dt.datetime | None = None
        self.have_cert = asyncio.Event()
        self.attempted = asyncio.Condition()  # notified after every attempt, good or bad

    async def wait_for(self, pred: Callable[[], bool], timeout: float) -> None:
        """Wait until ``pred()`` holds, re-checked after each attempt (for tests and tools)."""
        async with self.attempted:
            await asyncio.wait_for(self.attempted.wait_for(pred), timeout)

    async def run(self, stop: asyncio.Event) -> None:
        attempt = 0
        while not stop.is_set():
            try:
                fetched = self.clock()
                await self.fetch()
                attempt = 0
                assert self.leaf is not None
                # Half of the lifetime from when we got it: the CA backdates notBefore for clock
                # skew, which must not pull renewal forward (with short certificates it would loop).
                start = max(self.leaf.not_valid_before_utc, fetched)
                self.renew_at = renew_at(start, self.leaf.not_valid_after_utc, self.clock(), rng=self.rng)
                delay = max(0.0, (self.renew_at - self.clock()).total_seconds())
            except (grpc.aio.AioRpcError, OSError, ValueError) as e:
                self.failures += 1
                self.last_error = _describe(e)
                attempt += 1
                delay = min(self.backoff_max, self.backoff_base * 2 ** min(attempt, 10)) * (0.5 + self.rng.random())
                log.warning("certificate from %s failed (%s); %s; retrying in %.1fs", self.ca_address,
                            self.last_error, "keeping the current one" if self.leaf else "no certificate yet", delay)
            async with self.attempted:
                self.attempted.notify_all()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def fetch(self) -> None:
        """One CSR round trip; on success the new secrets are applied before returning."""
        token = Path(self.token_file).read_text().strip()
        key = generate_key()
        csr = build_csr(key, self.identity)
        req = CertificateRequest(csr=csr_to_pem(csr).decode(), validity_duration=self.validity_seconds)
        async with grpc.aio.insecure_channel(self.ca_address) as channel:
            call = channel.unary_unary(METHOD, request_serializer=CertificateRequest.SerializeToString,
                                       response_deserializer=CertificateResponse.FromString)
            resp = await call(req, metadata=(("authorization", f"Bearer {token}"),), timeout=self.call_timeout)
        pems = [p.encode() for p in resp.cert_chain]
        if len(pems) < 2:
            raise ValueError("the CA returned no chain")
        chain = [x509.load_pem_x509_certificate(p) for p in pems]
        leaf_uris = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
            .get_values_for_type(x509.UniformResourceIdentifier)
        if leaf_uris != [str(self.identity)]:
            raise ValueError(f"the CA signed {leaf_uris}, not {self.identity}")
        default = secret_pb2.Secret(name="default")
        default.tls_certificate.certificate_chain.inline_bytes = certs_to_pem(chain[:-1])
        default.tls_certificate.private_key.inline_bytes = key_to_pem(key)
        rootca = secret_pb2.Secret(name="ROOTCA")
        rootca.validation_context.trusted_ca.inline_bytes = certs_to_pem(chain[-1:])
        renewed = self.leaf is not None
        self.leaf = chain[0]
        self.secrets = (default, rootca)
        self.last_error = ""
        if renewed:
            self.renewals += 1
        self.have_cert.set()
        await self.on_change(self.secrets)
        log.info("certificate for %s %s, valid until %s", self.identity, "renewed" if renewed else "obtained",
                 self.leaf.not_valid_after_utc.isoformat())

    def status(self) -> dict[str, Any]:
        leaf = self.leaf
        return {
            "identity": str(self.identity), "ca": self.ca_address,
            "serial": format(leaf.serial_number, "x") if leaf else "",
            "not_before": leaf.not_valid_before_utc.isoformat() if leaf else "",
            "not_after": leaf.not_valid_after_utc.isoformat() if leaf else "",
            "renew_at": self.renew_at.isoformat() if self.renew_at else "",
            "renewals": self.renewals, "failures": self.failures, "last_error": self.last_error,
        }

    def metrics(self) -> dict[str, float]:
        out = {"pillion_cert_renewals_total": float(self.renewals),
               "pillion_cert_fetch_failures_total": float(self.failures)}
        if self.leaf is not None:
            out["pillion_cert_expiry_timestamp_seconds"] = self.leaf.not_valid_after_utc.timestamp()
        return out


def _describe(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return str(e) or type(e).__name__
