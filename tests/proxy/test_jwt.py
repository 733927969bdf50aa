"""proxy.jwt: key sets, verification, and every hostile token we could think of (each refused)."""

from __future__ import annotations

import json
import pickle
import time

import pytest

from proxy import jwt
from tests.helpers.jwks import Issuer, b64json, b64url

NOW = time.time()


@pytest.fixture(scope="module")
def idp() -> Issuer:
    return Issuer()


@pytest.fixture(scope="module")
def keys(idp: Issuer) -> jwt.KeySet:
    return jwt.KeySet(idp.jwks("rsa", "ec", "ed"))


def provider(keys: jwt.KeySet | None, **kw: object) -> jwt.Provider:
    kw.setdefault("issuer", "https://issuer.example")
    kw.setdefault("payload_key", "https://issuer.example")
    return jwt.Provider("p", keys=keys, **kw)  # type: ignore[arg-type]


def check(token: str, keys: jwt.KeySet | None, now: float = NOW, **kw: object) -> dict[str, object]:
    return jwt.verify(jwt.decode(token.encode()), provider(keys, **kw), keys, now)


def refused(token: str | bytes, keys: jwt.KeySet | None, now: float = NOW, **kw: object) -> str:
    raw = token if isinstance(token, bytes) else token.encode()
    with pytest.raises(jwt.JwtFailure) as caught:
        jwt.verify(jwt.decode(raw), provider(keys, **kw), keys, now)
    return caught.value.reason


# --- key sets ------------------------------------------------------------------------------------


def test_key_set_parses_rsa_ec_and_okp_keys_by_kid(keys: jwt.KeySet) -> None:
    assert sorted(keys.by_kid) == ["ec-1", "ed-1", "rsa-1"]
    assert keys.candidates("rsa-1", "RS256") and not keys.candidates("rsa-1", "ES256")
    assert keys.candidates(None, "ES256")[0].kid == "ec-1"


def test_key_set_pickles_as_its_text_and_reparses(keys: jwt.KeySet) -> None:
    again = pickle.loads(pickle.dumps(keys))
    assert again == keys and again.keys[0].key is not keys.keys[0].key


def test_symmetric_and_unsupported_keys_are_skipped_never_used(idp: Issuer) -> None:
    doc = {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}, {"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"},
                    idp.jwk("rsa")]}
    keys = jwt.KeySet(json.dumps(doc))
    assert [k.kid for k in keys.keys] == ["rsa-1"] and len(keys.skipped) == 2
    with pytest.raises(jwt.JwksError, match="no usable key"):
        jwt.KeySet(json.dumps({"keys": doc["keys"][:2]}))


@pytest.mark.parametrize(("text", "message"), [
    ("{", "invalid JWKS JSON"),
    ('{"keys": [], "keys": []}', "duplicate member 'keys'"),
    ('{"keyz": []}', '"keys" list'),
    ('{"keys": []}', "the key list is empty"),
    ('{"keys": [{"kty": "RSA", "n": "!!", "e": "AQAB"}]}', "no usable key"),
])
def test_bad_jwks_documents_are_refused(text: str, message: str) -> None:
    with pytest.raises(jwt.JwksError, match=message):
        jwt.KeySet(text)


def test_a_key_may_only_verify_its_declared_alg(idp: Issuer) -> None:
    jwk = idp.jwk("rsa") | {"alg": "PS256"}
    keys = jwt.KeySet(json.dumps({"keys": [jwk]}))
    assert refused(idp.token("RS256"), keys) == jwt.NO_KEY
    assert check(idp.token("PS256"), keys)["sub"] == "alice"


# --- good tokens -----------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512", "PS256", "ES256", "EdDSA"])
def test_each_allowed_algorithm_verifies(idp: Issuer, keys: jwt.KeySet, alg: str) -> None:
    assert check(idp.token(alg), keys)["sub"] == "alice"


def test_a_token_without_kid_is_tried_against_every_fitting_key(idp: Issuer, keys: jwt.KeySet) -> None:
    token = jwt.decode(idp.token("RS256").encode())
    header = {k: v for k, v in token.header.items() if k != "kid"}
    signed = idp.raw(header, token.payload)
    assert check(signed, keys)["iss"] == "https://issuer.example"


def test_clock_skew_is_sixty_seconds(idp: Issuer, keys: jwt.KeySet) -> None:
    now = int(NOW)
    assert check(idp.token(exp=now - 59), keys, now)
    assert refused(idp.token(exp=now - 61), keys, now) == jwt.EXPIRED
    assert check(idp.token(nbf=now + 59), keys, now)
    assert refused(idp.token(nbf=now + 61), keys, now) == jwt.NOT_YET_VALID


def test_audiences_string_or_list(idp: Issuer, keys: jwt.KeySet) -> None:
    aud = frozenset({"web"})
    assert check(idp.token(aud="web"), keys, audiences=aud)
    assert check(idp.token(aud=["other", "web"]), keys, audiences=aud)
    assert check(idp.token(), keys)  # no audiences configured: aud not checked


# --- hostile tokens: each refused ------------------------------------------------------------------


def test_alg_none_is_refused(idp: Issuer, keys: jwt.KeySet) -> None:
    assert refused(idp.alg_none(), keys) == jwt.BAD_FORMAT  # "x.y.": an empty signature section
    token = f"{b64json({'alg': 'none'})}.{b64json(idp.claims())}.{b64url(b'x')}"
    assert refused(token, keys) == jwt.BAD_ALG


def test_hs256_signed_with_the_rsa_public_key_is_refused(idp: Issuer, keys: jwt.KeySet) -> None:
    # Envoy's parser knows HS256, so the refusal reads like Envoy's: no key fits it (none ever will).
    assert refused(idp.hs256_with_public_key(), keys) == jwt.NO_KEY
    oct_set = jwt.KeySet(json.dumps({"keys": [{"kty": "oct", "k": b64url(idp.public_pem()), "kid": "rsa-1"},
                                              idp.jwk("rsa")]}))
    assert refused(idp.hs256_with_public_key(), oct_set) == jwt.NO_KEY  # even with an oct key published


@pytest.mark.parametrize(("alg", "reason"), [
    ("HS384", jwt.NO_KEY), ("HS512", jwt.NO_KEY), ("ES512", jwt.NO_KEY), ("PS512", jwt.NO_KEY),
    ("RSA-OAEP", jwt.BAD_ALG), ("NONE", jwt.BAD_ALG), ("", jwt.BAD_ALG),
])
def test_algorithms_outside_the_list_are_refused(idp: Issuer, keys: jwt.KeySet, alg: str, reason: str) -> None:
    assert refused(idp.raw({"alg": alg, "kid": "rsa-1"}, idp.claims()), keys) == reason


def test_a_wrong_audience_is_refused_with_403_as_envoy_does(idp: Issuer, keys: jwt.KeySet) -> None:
    with pytest.raises(jwt.JwtFailure) as caught:
        check(idp.token(aud="x"), keys, audiences=frozenset({"web"}))
    assert caught.value.status == 403
    with pytest.raises(jwt.JwtFailure) as caught:
        check(idp.token(exp=1), keys)
    assert caught.value.status == 401


def test_expired_and_not_yet_valid(idp: Issuer, keys: jwt.KeySet) -> None:
    assert refused(idp.token(exp=int(NOW) - 3600), keys) == jwt.EXPIRED
    assert refused(idp.token(nbf=int(NOW) + 3600), keys) == jwt.NOT_YET_VALID


def test_wrong_issuer_and_wrong_audience(idp: Issuer, keys: jwt.KeySet) -> None:
    assert refused(idp.token(iss="https://evil.example"), keys) == jwt.UNKNOWN_ISSUER
    assert refused(idp.token(aud="other"), keys, audiences=frozenset({"web"})) == jwt.BAD_AUDIENCE
    assert refused(idp.token(), keys, audiences=frozenset({"web"})) == jwt.BAD_AUDIENCE  # no aud at all


def test_bad_signature_tampered_payload_and_foreign_key(idp: Issuer, keys: jwt.KeySet) -> None:
    head, _, sig = idp.token().split(".")
    tampered = f"{head}.{b64json(idp.claims(sub='admin'))}.{sig}"
    assert refused(tampered, keys) == jwt.BAD_SIGNATURE
    other = Issuer()  # same kid, another key
    assert refused(other.token(), keys) == jwt.BAD_SIGNATURE


def test_unknown_kid(idp: Issuer, keys: jwt.KeySet) -> None:
    assert refused(idp.token(kid="rotated-away"), keys) == jwt.NO_KEY


@pytest.mark.parametrize("cut", ["two", "signature", "four"])
def test_truncated_or_extra_sections(idp: Issuer, keys: jwt.KeySet, cut: str) -> None:
    head, body, sig = idp.token().split(".")
    token = {"two": f"{head}.{body}", "signature": f"{head}.{body}.{sig[:20]}", "four": f"{head}.{body}.{sig}.x"}[cut]
    assert refused(token, keys) in (jwt.BAD_FORMAT, jwt.BAD_SIGNATURE)


def test_oversized_token(idp: Issuer, keys: jwt.KeySet) -> None:
    big = idp.token(pad="x" * jwt.MAX_TOKEN_BYTES)
    assert refused(big, keys) == jwt.BAD_SIGNATURE


@pytest.mark.parametrize("bad", ["head", "body", "sig"])
def test_non_base64url_sections(idp: Issuer, keys: jwt.KeySet, bad: str) -> None:
    head, body, sig = idp.token().split(".")
    parts = {"head": f"{head}!.{body}.{sig}", "body": f"{head}.{body[:-2]}+/.{sig}", "sig": f"{head}.{body}.{sig}="}
    assert refused(parts[bad], keys) in (jwt.BAD_HEADER, jwt.BAD_PAYLOAD)


def test_padding_length_that_cannot_be_base64_is_refused(idp: Issuer, keys: jwt.KeySet) -> None:
    head, body, sig = idp.token().split(".")
    assert refused(f"{head}.{body}A.{sig}" if len(body) % 4 == 0 else f"{head}.{body}.{sig}A", keys)


def test_duplicate_claims_are_refused(idp: Issuer, keys: jwt.KeySet) -> None:
    # json.loads would keep the last "sub": a signer and a verifier could disagree on who this is.
    payload = f'{{"iss":"https://issuer.example","sub":"alice","sub":"admin","exp":{int(NOW) + 600}}}'
    assert refused(idp.raw({"alg": "RS256", "kid": "rsa-1"}, payload), keys) == jwt.BAD_PAYLOAD
    header = '{"alg":"RS256","alg":"HS256","kid":"rsa-1"}'
    assert refused(idp.raw(header, idp.claims()), keys) == jwt.BAD_HEADER


@pytest.mark.parametrize("payload", ['["not", "an", "object"]', '"x"', '{"exp": NaN}', "{bad json",
                                     '{"a":' + "[" * 2000 + "]" * 2000 + "}"])
def test_payloads_that_are_not_json_objects(idp: Issuer, keys: jwt.KeySet, payload: str) -> None:
    assert refused(idp.raw({"alg": "RS256", "kid": "rsa-1"}, payload), keys) == jwt.BAD_PAYLOAD


@pytest.mark.parametrize("claims", [{"exp": "9999999999"}, {"exp": True}, {"nbf": [1]}])
def test_time_claims_must_be_numbers(idp: Issuer, keys: jwt.KeySet, claims: dict[str, object]) -> None:
    assert refused(idp.raw({"alg": "RS256", "kid": "rsa-1"}, idp.claims(**claims)), keys) == jwt.BAD_PAYLOAD


def test_crit_headers_and_non_string_kid_are_refused(idp: Issuer, keys: jwt.KeySet) -> None:
    assert refused(idp.raw({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"]}, idp.claims()), keys) == jwt.BAD_ALG
    assert refused(idp.raw({"alg": "RS256", "kid": 7}, idp.claims()), keys) == jwt.BAD_HEADER


def test_no_key_set_yet_means_the_remote_fetch_failed(idp: Issuer) -> None:
    assert refused(idp.token(), None) == jwt.NO_JWKS


# --- the filter: extraction, requirements, effects --------------------------------------------------


def authn(keys: jwt.KeySet, **kw: object) -> jwt.JwtAuthn:
    p = provider(keys, **kw)
    return jwt.JwtAuthn({"p": p}, (jwt.Rule(b"/", False, jwt.Requirement(("p",), allow_missing=True)),),
                        frozenset({p.payload_header} - {b""}))


def run(a: jwt.JwtAuthn, path: bytes = b"/", **headers: str) -> jwt.Authenticated | None:
    hdrs = {k.replace("_", "-").encode(): v.encode() for k, v in headers.items()}
    return jwt.authenticate(a, path, hdrs, NOW, lambda uri: None)


def test_missing_token_passes_when_allowed_and_fails_when_required(idp: Issuer, keys: jwt.KeySet) -> None:
    assert run(authn(keys)) is None
    assert run(authn(keys), authorization="Basic dXNlcjpwdw==") is None  # not a bearer token: missing
    required = jwt.JwtAuthn({"p": provider(keys)}, (jwt.Rule(b"/", False, jwt.Requirement(("p",))),))
    with pytest.raises(jwt.JwtFailure, match="Jwt is missing"):
        run(required)


def test_bearer_header_param_and_cookie_locations(idp: Issuer, keys: jwt.KeySet) -> None:
    token = idp.token()
    result = run(authn(keys), authorization=f"bearer {token}")
    assert result is not None and result.metadata["https://issuer.example"]["sub"] == "alice"
    assert result.remove == {b"authorization"}  # forward is false: the token is not passed on
    assert run(authn(keys), b"/x?a=1&access_token=" + token.encode()) is not None
    assert run(authn(keys), b"/x?%E2%82%AC=%FF&access_token=" + token.encode()) is not None
    cookie = authn(keys, from_headers=(), from_params=(), from_cookies=("session",))
    assert run(cookie, cookie=f"theme=dark; session={token}") is not None


def test_an_invalid_token_is_refused_even_though_missing_is_allowed(idp: Issuer, keys: jwt.KeySet) -> None:
    with pytest.raises(jwt.JwtFailure):
        run(authn(keys), authorization=f"Bearer {idp.token(exp=1)}")
    with pytest.raises(jwt.JwtFailure, match="issuer is not configured"):
        run(authn(keys), authorization=f"Bearer {Issuer('https://other.example').token()}")


def test_forwarding_payload_and_claim_headers(idp: Issuer, keys: jwt.KeySet) -> None:
    token = idp.token(group="admins", evil="a\r\nx-injected: 1")
    a = authn(keys, forward=True, payload_header=b"x-jwt-payload",
              claim_headers=((b"x-group", ("group",)), (b"x-evil", ("evil",))))
    result = run(a, authorization=f"Bearer {token}")
    assert result is not None and result.remove == set()
    added = dict(result.add)
    assert added[b"x-jwt-payload"] == token.split(".")[1].encode()
    assert added[b"x-group"] == b"admins" and b"x-evil" not in added  # no CR/LF into a header


def test_mutated_tokens_fail_cleanly_and_never_change_the_claims(idp: Issuer, keys: jwt.KeySet) -> None:
    """A small fuzz: 3000 byte-level mutations of a good token. Each is refused with JwtFailure
    (nothing else escapes), or verifies to exactly the original claims (base64's spare bits)."""
    import random

    rng = random.Random(7)
    good = idp.token().encode()
    original = check(good.decode(), keys)
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ {}\"\x00\xff"
    for _ in range(3000):
        raw = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            op, at = rng.randrange(3), rng.randrange(len(raw))
            if op == 0:
                raw[at] = rng.choice(alphabet)
            elif op == 1:
                del raw[at]
            else:
                raw.insert(at, rng.choice(alphabet))
        try:
            payload = jwt.verify(jwt.decode(bytes(raw)), provider(keys), keys, NOW)
        except jwt.JwtFailure:
            continue
        assert payload == original
