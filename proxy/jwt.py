"""JWT authentication (Istio's RequestAuthentication, Envoy's jwt_authn filter): pure.

Owns: JWKS key sets (parsed once, at compile or fetch time, into PyJWT's key
objects, indexed by kid), token extraction (headers with a prefix, query
parameters, cookies), verification, and what a verified token does to the
request (payload in dynamic metadata for RBAC, the token header removed
unless forwarded, payload and claim headers added). No I/O and no clock:
the caller passes `now` and a lookup for remotely fetched key sets
(``jwks_fetch.py`` fetches them).

Verification, in order; each failure refuses the token with Envoy's text:
the token must be at most ``MAX_TOKEN_BYTES`` and three base64url sections;
the header and payload are JSON objects in which no member appears twice
(checked here, before anything trusts them: PyJWT's json.loads would keep
the last duplicate); the header's alg must be one Envoy knows and no "crit"
extension is allowed; iss must be the provider's issuer; exp and nbf, when
present, must be numbers and hold within the provider's clock skew (60 s);
aud must name one of the provider's audiences when it lists some (else 403,
as Envoy answers); then a key of the set whose kid, type, curve and alg fit
the token must verify the signature (PyJWT's algorithm objects, over
cryptography). Only ``ALGORITHMS`` ever verify -- never "none", never HS* (a
public RSA key used as an HMAC secret would let anyone sign): keys are never
made usable for any other alg.

Strategy: a requirement lists providers; each provider extracts a token
from its locations; the token is decoded once and checked by the providers
whose issuer it names. ``authenticate`` returns None (nothing to do: no rule
for the path, or no token where missing is allowed), an ``Authenticated``
(what to change in the request), or raises ``JwtFailure``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_to_bytes

# PyJWT (and with it cryptography, ~18 MB) is imported on first use, not at import time:
# a sidecar with no RequestAuthentication never loads it.

ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "EdDSA"})
# Algorithms Envoy's parser knows: a token naming one of the others is refused as a bad alg at once;
# one naming HS*, ES512, PS384 or PS512 parses but can never verify (no key here ever allows them),
# so its refusal reads as Envoy's does (no matching key, or the audience first).
KNOWN_ALGORITHMS = ALGORITHMS | {"HS256", "HS384", "HS512", "ES512", "PS384", "PS512"}
MAX_TOKEN_BYTES = 8192
DEFAULT_CLOCK_SKEW = 60

# Envoy's texts for each failure (the body of its 401).
MISSING = "Jwt is missing"
BAD_FORMAT = "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
BAD_HEADER = "Jwt header is an invalid JSON"
BAD_PAYLOAD = "Jwt payload is an invalid JSON"
BAD_ALG = "Jwt header [alg] is not supported"
EXPIRED = "Jwt is expired"
NOT_YET_VALID = "Jwt not yet valid"
UNKNOWN_ISSUER = "Jwt issuer is not configured"
BAD_AUDIENCE = "Audiences in Jwt are not allowed"
NO_KEY = "Jwks doesn't have key to match kid or alg from Jwt"
NO_JWKS = "Jwks remote fetch is failed"
BAD_SIGNATURE = "Jwt verification fails"

_VERIFIER_CACHE: dict[str, Any] = {}


def _pyjwt_error() -> type[Exception]:
    from jwt.exceptions import PyJWTError

    return PyJWTError


def _verifiers() -> Mapping[str, Any]:
    """PyJWT's algorithm objects for the algorithms we accept (built once, on first use)."""
    if not _VERIFIER_CACHE:
        from jwt.algorithms import get_default_algorithms

        _VERIFIER_CACHE.update({n: a for n, a in get_default_algorithms().items() if n in ALGORITHMS})
    return _VERIFIER_CACHE
_KEY_ALGORITHMS: dict[tuple[Any, Any], frozenset[str]] = {
    ("RSA", None): frozenset({"RS256", "RS384", "RS512", "PS256"}),
    ("EC", "P-256"): frozenset({"ES256"}),
    ("EC", "P-384"): frozenset({"ES384"}),
    ("OKP", "Ed25519"): frozenset({"EdDSA"}),
    ("OKP", "Ed448"): frozenset({"EdDSA"}),
}
_B64URL = re.compile(rb"^[A-Za-z0-9_-]+$")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class JwtFailure(Exception):
    """A token was presented and refused; ``reason`` is Envoy's text for why, ``status`` its
    HTTP status (403 for an audience that is not allowed, else 401, as Envoy answers)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = 403 if reason == BAD_AUDIENCE else 401


class JwksError(ValueError):
    """A JWKS document that yields no usable key."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate member {key!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(data: bytes | str) -> Any:
    """json.loads that refuses duplicate object members and NaN/Infinity."""
    return json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)


# --- keys -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Jwk:
    kid: str | None
    algorithms: frozenset[str]  # the token algs this key may verify
    key: Any  # a cryptography public key


class KeySet:
    """The usable keys of one JWKS document. Pickles as its text (keys are re-parsed)."""

    __slots__ = ("by_kid", "keys", "skipped", "text")

    def __init__(self, text: str) -> None:
        try:
            data = strict_json(text)
        except (ValueError, RecursionError) as exc:
            raise JwksError(f"invalid JWKS JSON: {exc}") from None
        raw = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(raw, list):
            raise JwksError('a JWKS is a JSON object with a "keys" list')
        keys: list[Jwk] = []
        skipped: list[str] = []
        for index, item in enumerate(raw):
            try:
                keys.append(_jwk(item))
            except (JwksError, _pyjwt_error(), ValueError, TypeError) as exc:
                skipped.append(f"keys[{index}]: {exc}")
        if not keys:
            raise JwksError("no usable key: " + ("; ".join(skipped) or "the key list is empty"))
        self.text = text
        self.keys = tuple(keys)
        self.skipped = tuple(skipped)
        by_kid: dict[str, tuple[Jwk, ...]] = {}
        for key in keys:
            if key.kid is not None:
                by_kid[key.kid] = (*by_kid.get(key.kid, ()), key)
        self.by_kid = by_kid

    def __reduce__(self) -> tuple[type[KeySet], tuple[str]]:
        return (KeySet, (self.text,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeySet) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def candidates(self, kid: str | None, alg: str) -> list[Jwk]:
        pool = self.keys if kid is None else self.by_kid.get(kid, ())
        return [key for key in pool if alg in key.algorithms]


def _jwk(item: Any) -> Jwk:
    if not isinstance(item, dict):
        raise JwksError("not a JSON object")
    kty = item.get("kty")
    crv = item.get("crv") if kty != "RSA" else None
    algorithms = _KEY_ALGORITHMS.get((kty, crv))
    if algorithms is None:
        raise JwksError(f"unsupported key type {kty!r}{f' curve {crv!r}' if crv else ''}")
    declared = item.get("alg")
    if declared is not None:
        if declared not in algorithms:
            raise JwksError(f"alg {declared!r} is not accepted for this key")
        algorithms = frozenset({declared})
    use = item.get("use")
    if use is not None and use != "sig":
        raise JwksError(f"use {use!r} is not a signature key")
    kid = item.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise JwksError("kid must be a string")
    from jwt.api_jwk import PyJWK

    key = PyJWK(item, algorithm=min(algorithms)).key
    if hasattr(key, "public_key"):  # private material in a JWKS: only the public half is used
        key = key.public_key()
    return Jwk(kid, algorithms, key)


# --- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RemoteJwks:
    uri: str
    timeout: float = 5.0  # seconds
    cache_duration: float = 600.0  # seconds between refreshes


@dataclass(frozen=True, slots=True)
class Provider:
    """One compiled jwt_authn provider (one RequestAuthentication jwtRule)."""

    name: str
    issuer: str = ""
    audiences: frozenset[str] = frozenset()
    keys: KeySet | None = None  # local_jwks
    remote: RemoteJwks | None = None  # remote_jwks, looked up in the fetched key sets
    from_headers: tuple[tuple[bytes, bytes], ...] = ((b"authorization", b"bearer "),)  # (name, lowercase prefix)
    from_params: tuple[str, ...] = ("access_token",)
    from_cookies: tuple[str, ...] = ()
    forward: bool = False  # keep the token header in the request sent upstream
    payload_header: bytes = b""  # forward_payload_header
    pad_payload: bool = False
    payload_key: str = ""  # payload_in_metadata ("" = not stored)
    clock_skew: int = DEFAULT_CLOCK_SKEW
    claim_headers: tuple[tuple[bytes, tuple[str, ...]], ...] = ()  # (header, claim path)
    require_expiration: bool = False


@dataclass(frozen=True, slots=True)
class Requirement:
    providers: tuple[str, ...]
    allow_missing: bool = False  # no token at all is fine
    allow_failed: bool = False  # an invalid token is fine too (verified payloads are still kept)


@dataclass(frozen=True, slots=True)
class Rule:
    """A requirement for request paths: ``exact`` path or ``prefix`` (query ignored for exact)."""

    value: bytes
    exact: bool
    requirement: Requirement

    def applies(self, path: bytes) -> bool:
        if self.exact:
            q = path.find(b"?")
            return (path if q < 0 else path[:q]) == self.value
        return path.startswith(self.value)


@dataclass(frozen=True, slots=True)
class JwtAuthn:
    """A compiled jwt_authn filter."""

    providers: Mapping[str, Provider]
    rules: tuple[Rule, ...]
    payload_headers: frozenset[bytes] = field(default=frozenset())  # headers only a verified token may set

    def requirement(self, path: bytes) -> Requirement | None:
        for rule in self.rules:
            if rule.applies(path):
                return rule.requirement
        return None


# --- tokens ---------------------------------------------------------------------------------------


def _b64decode(part: bytes) -> bytes:
    if not _B64URL.match(part) or len(part) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(part + b"=" * (-len(part) % 4))


@dataclass(frozen=True, slots=True)
class Token:
    raw: bytes
    header: dict[str, Any]
    payload: dict[str, Any]
    payload_b64: bytes
    signing_input: bytes
    signature: bytes


def decode(raw: bytes) -> Token:
    """Split and decode a compact JWS; refuses anything malformed or not allowed. Trusts nothing yet."""
    if len(raw) > MAX_TOKEN_BYTES:
        raise JwtFailure(BAD_SIGNATURE)
    parts = raw.split(b".")
    if len(parts) != 3:
        raise JwtFailure(BAD_FORMAT)
    head_b64, body_b64, sig_b64 = parts
    if not head_b64 or not body_b64 or not sig_b64:
        raise JwtFailure(BAD_FORMAT)
    try:
        header = strict_json(_b64decode(head_b64))
    except (ValueError, binascii.Error, RecursionError):
        raise JwtFailure(BAD_HEADER) from None
    if not isinstance(header, dict):
        raise JwtFailure(BAD_HEADER)
    alg = header.get("alg")
    if alg not in KNOWN_ALGORITHMS or "crit" in header:
        raise JwtFailure(BAD_ALG)
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise JwtFailure(BAD_HEADER)
    try:
        payload = strict_json(_b64decode(body_b64))
        signature = _b64decode(sig_b64)
    except (ValueError, binascii.Error, RecursionError):  # RecursionError: JSON nested too deep
        raise JwtFailure(BAD_PAYLOAD) from None
    if not isinstance(payload, dict):
        raise JwtFailure(BAD_PAYLOAD)
    return Token(raw, header, payload, body_b64, head_b64 + b"." + body_b64, signature)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def verify(token: Token, provider: Provider, keys: KeySet | None, now: float) -> dict[str, Any]:
    """The payload of `token` if `provider` accepts it at time `now` (seconds); else JwtFailure."""
    payload = token.payload
    if provider.issuer and payload.get("iss") != provider.issuer:
        raise JwtFailure(UNKNOWN_ISSUER)
    skew = provider.clock_skew
    exp = payload.get("exp")
    if exp is not None:
        if not _number(exp):
            raise JwtFailure(BAD_PAYLOAD)
        if now > exp + skew:
            raise JwtFailure(EXPIRED)
    elif provider.require_expiration:
        raise JwtFailure(EXPIRED)
    nbf = payload.get("nbf")
    if nbf is not None:
        if not _number(nbf):
            raise JwtFailure(BAD_PAYLOAD)
        if nbf > now + skew:
            raise JwtFailure(NOT_YET_VALID)
    if provider.audiences:
        aud = payload.get("aud")
        names = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not any(isinstance(name, str) and name in provider.audiences for name in names):
            raise JwtFailure(BAD_AUDIENCE)
    if keys is None:
        raise JwtFailure(NO_JWKS)
    alg = token.header["alg"]
    candidates = keys.candidates(token.header.get("kid"), alg) if alg in ALGORITHMS else []
    if not candidates:  # never "none", never HS*: no key is ever usable for them
        raise JwtFailure(NO_KEY)
    verifier = _verifiers()[alg]
    for key in candidates:
        if verifier.verify(token.signing_input, key.key, token.signature):
            return payload
    raise JwtFailure(BAD_SIGNATURE)


# --- extraction and the filter ------------------------------------------------------------------


def _query_param(path: bytes, name: str) -> bytes | None:
    q = path.find(b"?")
    if q < 0:
        return None
    want = name.encode()
    for pair in path[q + 1 :].split(b"#", 1)[0].split(b"&"):
        key, sep, value = pair.partition(b"=")
        if sep and unquote_to_bytes(key) == want:
            return unquote_to_bytes(value)
    return None


def _cookie(headers: Mapping[bytes, bytes], name: str) -> bytes | None:
    raw = headers.get(b"cookie")
    if raw is None:
        return None
    want = name.encode()
    for item in raw.replace(b",", b";").split(b";"):
        key, sep, value = item.strip().partition(b"=")
        if sep and key == want:
            return value.strip(b'"')
    return None


def extract(provider: Provider, path: bytes, headers: Mapping[bytes, bytes]) -> tuple[bytes, bytes] | None:
    """(token, header it came from, or b"" for a parameter or cookie), or None."""
    for name, prefix in provider.from_headers:
        value = headers.get(name)
        if value is not None and value[: len(prefix)].lower() == prefix:
            token = value[len(prefix) :].strip()
            if token:
                return token, name
    for param in provider.from_params:
        found = _query_param(path, param)
        if found:
            return found, b""
    for cookie in provider.from_cookies:
        found = _cookie(headers, cookie)
        if found:
            return found, b""
    return None


@dataclass(slots=True)
class Authenticated:
    """What a verified token does: metadata for RBAC and the changes to the upstream request."""

    metadata: dict[str, Any] = field(default_factory=dict)  # payload_key -> payload
    remove: set[bytes] = field(default_factory=set)  # header names to drop
    add: list[tuple[bytes, bytes]] = field(default_factory=list)


def _claim(payload: Mapping[str, Any], path: tuple[str, ...]) -> bytes | None:
    node: Any = payload
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    if isinstance(node, bool):
        return b"true" if node else b"false"
    if isinstance(node, int | str):
        value = str(node).encode()
        # A claim becomes a header value: nothing that could end the header or the head.
        return None if _CONTROL.search(value) else value
    return None


def authenticate(
    authn: JwtAuthn,
    path: bytes,
    headers: Mapping[bytes, bytes],
    now: float,
    remote_keys: Callable[[str], KeySet | None],
) -> Authenticated | None:
    """Apply the requirement for `path`. None: nothing to change; raises JwtFailure to refuse."""
    requirement = authn.requirement(path)
    if requirement is None:
        return None
    found: list[tuple[Provider, bytes, bytes]] = []
    for name in requirement.providers:
        provider = authn.providers[name]
        extracted = extract(provider, path, headers)
        if extracted is not None:
            found.append((provider, *extracted))
    if not found:
        if requirement.allow_missing:
            return None
        raise JwtFailure(MISSING)
    result: Authenticated | None = None
    failure: JwtFailure | None = None
    decoded: dict[bytes, Token | JwtFailure] = {}
    for provider, raw, where in found:
        token = decoded.get(raw)
        if token is None:
            try:
                token = decoded[raw] = decode(raw)
            except JwtFailure as exc:
                token = decoded[raw] = exc
        if isinstance(token, JwtFailure):
            failure = failure or token
            continue
        if provider.issuer and token.payload.get("iss") != provider.issuer:
            failure = failure or JwtFailure(UNKNOWN_ISSUER)
            continue
        keys = provider.keys if provider.remote is None else remote_keys(provider.remote.uri)
        try:
            payload = verify(token, provider, keys, now)
        except JwtFailure as exc:
            failure = exc
            continue
        result = result or Authenticated()
        _apply(result, provider, token, payload, where)
        if not requirement.allow_failed:
            return result  # requires_any: the first provider that accepts a token decides
    if result is not None or requirement.allow_failed:
        return result
    assert failure is not None
    raise failure


def _apply(result: Authenticated, provider: Provider, token: Token, payload: dict[str, Any], where: bytes) -> None:
    if provider.payload_key:
        result.metadata[provider.payload_key] = payload
    if where and not provider.forward:
        result.remove.add(where)
    if provider.payload_header:
        value = token.payload_b64
        if provider.pad_payload:
            value += b"=" * (-len(value) % 4)
        result.add.append((provider.payload_header, value))
    for header, path in provider.claim_headers:
        claim = _claim(payload, path)
        if claim is not None:
            result.add.append((header, claim))
