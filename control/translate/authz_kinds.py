"""Builders for AuthorizationPolicy and RequestAuthentication: validated YAML -> typed objects.

Owns: the meaning of their fields beyond shape (`specs.py` checks the shape):
actions (CUSTOM is refused: there is no ext_authz), IP blocks and CIDRs,
ports, wildcard and path-template patterns, `when` condition keys and their
value formats, and a RequestAuthentication's JWKS (inline JSON checked
structurally with the standard library; the proxy parses the keys). It must
not read files, select policies for a node or produce xDS (`authz.py` does).

Rules (Istio's):
- A value is matched exactly, as a prefix ("abc*"), as a suffix ("*abc"), or
  for presence ("*"); any other "*" is refused rather than taken literally.
- Paths may instead be templates: segments "{*}" (one segment) and "{**}"
  (any rest, last segment only), e.g. "/api/{*}/items/{**}".
- Empty `source` / `operation` entries and `when` entries without values are
  refused (they would match everything by accident).
- JWKS keys: RSA, EC (P-256, P-384) and OKP (Ed25519, Ed448). Symmetric
  ("oct") keys and algorithms outside RS256/RS384/RS512/ES256/ES384/PS256/
  EdDSA are refused: the proxy never verifies with them (no "none", no HS*).
"""

from __future__ import annotations

import binascii
import ipaddress
import json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from control.translate.model import (
    AuthorizationPolicy,
    AuthzAction,
    AuthzCondition,
    AuthzOperation,
    AuthzRule,
    AuthzSource,
    JwtRule,
    RequestAuthentication,
    frozen_map,
)
from control.translate.schema import parse_duration

if TYPE_CHECKING:
    from control.translate.istio import Build, Entry

# The signature algorithms the proxy verifies (proxy/jwt.py holds the same list).
JWT_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "EdDSA"})
_KEY_ALGORITHMS = {
    "RSA": frozenset({"RS256", "RS384", "RS512", "PS256"}),
    "EC": frozenset({"ES256", "ES384"}),
    "OKP": frozenset({"EdDSA"}),
}
_CURVES = {"EC": {"P-256": "ES256", "P-384": "ES384"}, "OKP": {"Ed25519": "EdDSA", "Ed448": "EdDSA"}}
_KEY_MEMBERS = {"RSA": ("n", "e"), "EC": ("x", "y"), "OKP": ("x",)}
_B64URL = re.compile(r"^[A-Za-z0-9_-]+={0,2}$")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP header name (RFC 9110 5.1)
_HEADER_KEY = re.compile(r"^request\.headers\[([^\[\]]+)\]$")
_CLAIM_KEY = re.compile(r"^request\.auth\.claims((?:\[[^\[\]]+\])+)$")
_PLAIN_KEYS = frozenset(
    {
        "source.ip",
        "remote.ip",
        "source.namespace",
        "source.principal",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "destination.ip",
        "destination.port",
        "connection.sni",
    }
)
_IP_KEYS = frozenset({"source.ip", "remote.ip", "destination.ip"})
SUPPORTED_KEYS = (
    "request.headers[<name>]",
    *sorted(_PLAIN_KEYS),
    "request.auth.claims[<name>]",
)
_SOURCE_FIELDS = tuple(AuthzSource.__dataclass_fields__)
_OPERATION_FIELDS = tuple(AuthzOperation.__dataclass_fields__)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


# --- shared value rules -----------------------------------------------------------


def pattern_problem(value: str) -> str | None:
    """Why `value` is not an exact/prefix/suffix/presence pattern, or None if it is one."""
    if not value:
        return "must not be empty"
    stars = value.count("*")
    if value == "*" or stars == 0:
        return None
    if stars == 1 and (value.startswith("*") or value.endswith("*")):
        return None
    return "'*' is only supported alone, as a prefix (\"*abc\") or as a suffix (\"abc*\")"


def template_problem(path: str) -> str | None:
    """Why `path` is not an Istio path template ("/a/{*}/b/{**}"), or None if it is one."""
    if not path.startswith("/"):
        return "a path template must start with '/'"
    segments = path[1:].split("/")
    for index, segment in enumerate(segments):
        if segment == "{**}":
            if index != len(segments) - 1:
                return "'{**}' must be the last segment of a path template"
        elif segment == "{*}":
            continue
        elif any(ch in segment for ch in "{}*"):
            return "path template segments are literal text, '{*}' or '{**}'"
    return None


def cidr(value: str) -> str | None:
    """The normalized CIDR ("10.1.0.0/16", "10.1.2.3/32") of an IP or CIDR string, or None."""
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        return None


def port_number(value: str) -> int | None:
    if value.isascii() and value.isdigit() and 1 <= int(value) <= 65535:
        return int(value)
    return None


# --- AuthorizationPolicy ------------------------------------------------------------


def authorization_policy(e: Entry, b: Build) -> AuthorizationPolicy | None:
    spec = e.spec
    action = spec.get("action", "ALLOW")
    if action == "CUSTOM":
        b("spec.action", "CUSTOM is not supported (no ext_authz)")
    elif "provider" in spec:
        b("spec.provider", "provider is only used with action CUSTOM, which is not supported")
    rules = tuple(
        _rule(raw, f"spec.rules[{i}]", b) for i, raw in enumerate(spec.get("rules", []))
    )
    if b.failed:
        return None
    labels = spec.get("selector", {}).get("matchLabels")
    return AuthorizationPolicy(
        e.meta(), frozen_map(labels) if labels else None, AuthzAction(action), rules
    )


def _rule(raw: dict[str, Any], path: str, b: Build) -> AuthzRule:
    sources = []
    for j, entry in enumerate(raw.get("from", [])):
        where = f"{path}.from[{j}]"
        if "source" not in entry:
            b(f"{where}.source", "required field is missing")
            continue
        sources.append(_source(entry["source"], f"{where}.source", b))
    operations = []
    for j, entry in enumerate(raw.get("to", [])):
        where = f"{path}.to[{j}]"
        if "operation" not in entry:
            b(f"{where}.operation", "required field is missing")
            continue
        operations.append(_operation(entry["operation"], f"{where}.operation", b))
    conditions = tuple(
        _condition(item, f"{path}.when[{k}]", b) for k, item in enumerate(raw.get("when", []))
    )
    return AuthzRule(tuple(sources), tuple(operations), conditions)


def _values(raw: dict[str, Any], field: str, path: str, b: Build, check: Callable[[str], str | None]) -> tuple[str, ...]:
    out = []
    for i, value in enumerate(raw.get(field, [])):
        problem = check(value)
        if problem:
            b(f"{path}.{field}[{i}]", problem)
        out.append(value)
    return tuple(out)


def _cidrs(raw: dict[str, Any], field: str, path: str, b: Build) -> tuple[str, ...]:
    out = []
    for i, value in enumerate(raw.get(field, [])):
        found = cidr(value)
        if found is None:
            b(f"{path}.{field}[{i}]", f"{value!r} is not an IP address or CIDR range")
        else:
            out.append(found)
    return tuple(out)


def _source(raw: dict[str, Any], path: str, b: Build) -> AuthzSource:
    if not any(raw.get(_camel(name)) for name in _SOURCE_FIELDS):
        b(path, f"set at least one of {', '.join(_camel(n) for n in _SOURCE_FIELDS)}")
    found: dict[str, tuple[str, ...]] = {}
    for name in _SOURCE_FIELDS:
        field = _camel(name)
        if "ip_blocks" in name:
            found[name] = _cidrs(raw, field, path, b)
        else:
            found[name] = _values(raw, field, path, b, pattern_problem)
    return AuthzSource(**found)


def _path_problem(value: str) -> str | None:
    if "{" in value or "}" in value:
        return template_problem(value)
    return pattern_problem(value)


def _port_problem(value: str) -> str | None:
    return None if port_number(value) is not None else f"{value!r} is not a port number (1-65535)"


def _operation(raw: dict[str, Any], path: str, b: Build) -> AuthzOperation:
    if not any(raw.get(_camel(name)) for name in _OPERATION_FIELDS):
        b(path, f"set at least one of {', '.join(_camel(n) for n in _OPERATION_FIELDS)}")
    found: dict[str, Any] = {}
    for name in _OPERATION_FIELDS:
        field = _camel(name)
        if name.endswith("ports"):
            values = _values(raw, field, path, b, _port_problem)
            found[name] = tuple(port_number(v) or 0 for v in values)
        elif name.endswith("paths"):
            found[name] = _values(raw, field, path, b, _path_problem)
        else:
            found[name] = _values(raw, field, path, b, pattern_problem)
    return AuthzOperation(**found)


def _condition(raw: dict[str, Any], path: str, b: Build) -> AuthzCondition:
    key: str = raw["key"]
    values, not_values = raw.get("values", []), raw.get("notValues", [])
    if not values and not not_values:
        b(path, "set values or notValues")
    header, claim = _HEADER_KEY.match(key), _CLAIM_KEY.match(key)
    if header is not None and not _TOKEN.match(header.group(1)):
        b(f"{path}.key", f"{header.group(1)!r} is not a valid header name")
    elif header is None and claim is None and key not in _PLAIN_KEYS:
        b(f"{path}.key", f"unsupported condition key {key!r}; supported: {', '.join(SUPPORTED_KEYS)}")
    for field in ("values", "notValues"):
        for i, value in enumerate(raw.get(field, [])):
            where = f"{path}.{field}[{i}]"
            if key in _IP_KEYS:
                if cidr(value) is None:
                    b(where, f"{value!r} is not an IP address or CIDR range")
            elif key == "destination.port":
                if port_number(value) is None:
                    b(where, f"{value!r} is not a port number (1-65535)")
            else:
                problem = pattern_problem(value)
                if problem:
                    b(where, problem)
    if key in _IP_KEYS:
        values = [cidr(v) or v for v in values]
        not_values = [cidr(v) or v for v in not_values]
    return AuthzCondition(key, tuple(values), tuple(not_values))


def claim_path(key: str) -> tuple[str, ...]:
    """["a", "b"] for "request.auth.claims[a][b]"."""
    match = _CLAIM_KEY.match(key)
    assert match is not None
    return tuple(match.group(1)[1:-1].split("]["))


# --- RequestAuthentication ---------------------------------------------------------


def request_authentication(e: Entry, b: Build) -> RequestAuthentication | None:
    rules = tuple(
        _jwt_rule(raw, f"spec.jwtRules[{i}]", b) for i, raw in enumerate(e.spec.get("jwtRules", []))
    )
    if b.failed:
        return None
    labels = e.spec.get("selector", {}).get("matchLabels")
    return RequestAuthentication(e.meta(), frozen_map(labels) if labels else None, rules)


def _header_name(value: str, path: str, b: Build) -> None:
    if not _TOKEN.match(value):
        b(path, f"{value!r} is not a valid header name")


def _jwt_rule(raw: dict[str, Any], path: str, b: Build) -> JwtRule:
    issuer: str = raw["issuer"]
    if not issuer:
        b(f"{path}.issuer", "must not be empty")
    jwks, uri = raw.get("jwks", ""), raw.get("jwksUri", "")
    if jwks and uri:
        b(f"{path}.jwksUri", "set jwks or jwksUri, not both")
    elif not jwks and not uri:
        b(path, "set jwks or jwksUri (OpenID discovery from the issuer is not supported)")
    if jwks and not uri:
        problem = jwks_problem(jwks)
        if problem:
            b(f"{path}.jwks", problem)
    if uri:
        parts = urlsplit(uri)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            b(f"{path}.jwksUri", f"{uri!r} is not an http:// or https:// URL with a host")
    headers = []
    for i, item in enumerate(raw.get("fromHeaders", [])):
        _header_name(item["name"], f"{path}.fromHeaders[{i}].name", b)
        headers.append((item["name"].lower(), item.get("prefix", "")))
    for field in ("fromParams", "fromCookies"):
        for i, value in enumerate(raw.get(field, [])):
            if not value:
                b(f"{path}.{field}[{i}]", "must not be empty")
    output = raw.get("outputPayloadToHeader", "")
    if output:
        _header_name(output, f"{path}.outputPayloadToHeader", b)
    claims = []
    for i, item in enumerate(raw.get("outputClaimToHeaders", [])):
        where = f"{path}.outputClaimToHeaders[{i}]"
        for field in ("header", "claim"):
            if not item.get(field):
                b(f"{where}.{field}", "required field is missing")
        if item.get("header"):
            _header_name(item["header"], f"{where}.header", b)
        claims.append((item.get("header", "").lower(), item.get("claim", "")))
    timeout = parse_duration(raw["timeout"]) if "timeout" in raw else 5.0
    if timeout is not None and timeout <= 0:
        b(f"{path}.timeout", "must be greater than zero")
    return JwtRule(
        issuer=issuer,
        path=path,
        audiences=tuple(raw.get("audiences", [])),
        jwks=jwks,
        jwks_uri=uri,
        timeout=timeout or 5.0,
        from_headers=tuple(headers),
        from_params=tuple(raw.get("fromParams", [])),
        from_cookies=tuple(raw.get("fromCookies", [])),
        output_payload_to_header=output.lower(),
        forward_original_token=raw.get("forwardOriginalToken", False),
        output_claim_to_headers=tuple(claims),
    )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"member {key!r} appears twice")
        out[key] = value
    return out


def _b64url(value: Any) -> bool:
    if not isinstance(value, str) or not _B64URL.match(value):
        return False
    try:
        binascii.a2b_base64(value.replace("-", "+").replace("_", "/") + "==", strict_mode=False)
    except binascii.Error:
        return False
    return True


def jwks_problem(text: str) -> str | None:
    """Why `text` is not a JWKS the proxy would accept (a structural check), or None."""
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        return f"invalid JWKS JSON: {exc}"
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list) or not keys:
        return 'a JWKS must be a JSON object with a non-empty "keys" list'
    kids: set[str] = set()
    for i, key in enumerate(keys):
        problem = _key_problem(key, kids)
        if problem:
            return f"keys[{i}]: {problem}"
    return None


def _key_problem(key: Any, kids: set[str]) -> str | None:
    if not isinstance(key, dict):
        return "expected a JSON object"
    kty = key.get("kty")
    if kty == "oct":
        return "symmetric (oct) keys are not accepted: HS* tokens are never verified"
    if kty not in _KEY_MEMBERS:
        return f"unsupported kty {kty!r} (RSA, EC and OKP keys are accepted)"
    for member in _KEY_MEMBERS[kty]:
        if not _b64url(key.get(member)):
            return f"{kty} key member {member!r} must be a base64url string"
    algorithms = _KEY_ALGORITHMS[kty]
    if kty in _CURVES:
        crv = key.get("crv")
        if crv not in _CURVES[kty]:
            return f"unsupported curve {crv!r} for {kty} (use {', '.join(_CURVES[kty])})"
        algorithms = frozenset({_CURVES[kty][crv]})
    alg = key.get("alg")
    if alg is not None and alg not in algorithms:
        return f"alg {alg!r} is not accepted for this key (accepted: {', '.join(sorted(algorithms))})"
    kid = key.get("kid")
    if kid is not None:
        if not isinstance(kid, str):
            return "kid must be a string"
        if kid in kids:
            return f"kid {kid!r} is used by two keys"
        kids.add(kid)
    return None
