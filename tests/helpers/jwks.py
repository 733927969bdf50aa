"""Test identity providers: signing keys, JWKS documents, tokens (good and hostile), a JWKS server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import time
from typing import Any

import jwt as pyjwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

ISSUER = "https://issuer.example"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


class Issuer:
    """An identity provider with an RSA, an EC (P-256) and an Ed25519 key."""

    def __init__(self, issuer: str = ISSUER, kid: str = "rsa-1") -> None:
        self.issuer = issuer
        self.kid = kid
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.ed = ed25519.Ed25519PrivateKey.generate()

    def jwk(self, which: str = "rsa") -> dict[str, Any]:
        if which == "rsa":
            data = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(self.rsa.public_key()))
            data.update(kid=self.kid, use="sig")
        elif which == "ec":
            data = json.loads(pyjwt.algorithms.ECAlgorithm.to_jwk(self.ec.public_key()))
            data.update(kid="ec-1")
        else:
            data = json.loads(pyjwt.algorithms.OKPAlgorithm.to_jwk(self.ed.public_key()))
            data.update(kid="ed-1")
        return dict(data)

    def jwks(self, *which: str) -> str:
        return json.dumps({"keys": [self.jwk(w) for w in (which or ("rsa",))]})

    def public_pem(self) -> bytes:
        return self.rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def claims(self, **extra: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.issuer, "sub": "alice", "iat": now, "exp": now + 600}
        claims.update(extra)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, alg: str = "RS256", kid: str | None = None, **claims: Any) -> str:
        key: Any = {"RS256": self.rsa, "RS384": self.rsa, "RS512": self.rsa, "PS256": self.rsa,
                    "ES256": self.ec, "EdDSA": self.ed}[alg]
        default_kid = {"ES256": "ec-1", "EdDSA": "ed-1"}.get(alg, self.kid)
        headers = {"kid": kid if kid is not None else default_kid}
        return pyjwt.encode(self.claims(**claims), key, algorithm=alg, headers=headers)

    # --- hostile tokens -------------------------------------------------------------------

    def raw(self, header: dict[str, Any] | str, payload: dict[str, Any] | str, sign: bool = True) -> str:
        """A token with exactly this header and payload JSON (strings are used verbatim)."""
        head = b64url(header.encode()) if isinstance(header, str) else b64json(header)
        body = b64url(payload.encode()) if isinstance(payload, str) else b64json(payload)
        signing_input = f"{head}.{body}".encode()
        sig = pyjwt.algorithms.RSAAlgorithm(pyjwt.algorithms.RSAAlgorithm.SHA256).sign(signing_input, self.rsa)
        return f"{head}.{body}.{b64url(sig) if sign else ''}"

    def alg_none(self) -> str:
        return f"{b64json({'alg': 'none', 'typ': 'JWT'})}.{b64json(self.claims())}."

    def hs256_with_public_key(self) -> str:
        """The alg-confusion attack: HMAC-SHA256 keyed with the RSA public key's PEM."""
        head = b64json({"alg": "HS256", "typ": "JWT", "kid": self.kid})
        body = b64json(self.claims())
        mac = hmac.new(self.public_pem(), f"{head}.{body}".encode(), hashlib.sha256).digest()
        return f"{head}.{body}.{b64url(mac)}"


class JwksServer:
    """A tiny HTTP/1.1 server on 127.0.0.1:0 serving a JWKS document; `status`/`body` may change."""

    def __init__(self, body: str, status: int = 200) -> None:
        self.body = body
        self.status = status
        self.requests = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/jwks.json"

    async def __aenter__(self) -> JwksServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            body = self.body.encode()
            writer.write(f"HTTP/1.1 {self.status} X\r\ncontent-type: application/json\r\n"
                         f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
