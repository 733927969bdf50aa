"""AuthorizationPolicy / RequestAuthentication mistakes: each refused with file, resource and field."""

from __future__ import annotations

import json

import pytest

from tests.control.translate_fixtures import only_problem, problems_of


def doc(kind: str, spec: str, name: str = "p") -> str:
    return (f"apiVersion: security.istio.io/v1beta1\nkind: {kind}\n"
            f"metadata: {{name: {name}, namespace: shop}}\nspec:\n{spec}")


def authz(spec: str) -> str:
    return doc("AuthorizationPolicy", spec)


def jwt_rule(rule: str) -> str:
    return doc("RequestAuthentication", f"  jwtRules:\n  - issuer: https://issuer.example\n{rule}")


@pytest.mark.parametrize(("spec", "field", "message"), [
    ("  action: REJECT\n", "spec.action", "'REJECT' is not one of ALLOW, DENY, AUDIT, CUSTOM"),
    ("  action: CUSTOM\n  provider: {name: opa}\n", "spec.action", "CUSTOM is not supported (no ext_authz)"),
    ("  action: DENY\n  provider: {name: opa}\n", "spec.provider",
     "provider is only used with action CUSTOM, which is not supported"),
    ("  rules:\n  - from: [{source: {principal: [a]}}]\n", "spec.rules[0].from[0].source.principal",
     "unknown field"),
    ("  rules:\n  - from: [{source: {ipBlocks: [10.0.0.0/33]}}]\n", "spec.rules[0].from[0].source.ipBlocks[0]",
     "'10.0.0.0/33' is not an IP address or CIDR range"),
    ("  rules:\n  - from: [{source: {remoteIpBlocks: [bogus]}}]\n",
     "spec.rules[0].from[0].source.remoteIpBlocks[0]", "'bogus' is not an IP address or CIDR range"),
    ("  rules:\n  - from: [{source: {notIpBlocks: ['1.2.3.4.5']}}]\n",
     "spec.rules[0].from[0].source.notIpBlocks[0]", "'1.2.3.4.5' is not an IP address or CIDR range"),
    ("  rules:\n  - from: [{source: {serviceAccounts: [shop/web]}}]\n",
     "spec.rules[0].from[0].source.serviceAccounts", "not supported yet"),
    ("  rules:\n  - from: [{source: {}}]\n", "spec.rules[0].from[0].source", "set at least one of principals"),
    ("  rules:\n  - from: [{}]\n", "spec.rules[0].from[0].source", "required field is missing"),
    ("  rules:\n  - to: [{operation: {ports: ['0']}}]\n", "spec.rules[0].to[0].operation.ports[0]",
     "'0' is not a port number (1-65535)"),
    ("  rules:\n  - to: [{operation: {paths: ['/a*b']}}]\n", "spec.rules[0].to[0].operation.paths[0]",
     "'*' is only supported alone"),
    ("  rules:\n  - to: [{operation: {paths: ['/a/{**}/b']}}]\n", "spec.rules[0].to[0].operation.paths[0]",
     "'{**}' must be the last segment of a path template"),
    ("  rules:\n  - to: [{operation: {methods: ['']}}]\n", "spec.rules[0].to[0].operation.methods[0]",
     "must not be empty"),
    ("  rules:\n  - when: [{key: request.time, values: [x]}]\n", "spec.rules[0].when[0].key",
     "unsupported condition key 'request.time'"),
    ("  rules:\n  - when: [{key: 'request.headers[bad header]', values: [x]}]\n", "spec.rules[0].when[0].key",
     "'bad header' is not a valid header name"),
    ("  rules:\n  - when: [{key: source.ip, values: [nope]}]\n", "spec.rules[0].when[0].values[0]",
     "'nope' is not an IP address or CIDR range"),
    ("  rules:\n  - when: [{key: destination.port, notValues: ['x']}]\n",
     "spec.rules[0].when[0].notValues[0]", "'x' is not a port number (1-65535)"),
    ("  rules:\n  - when: [{key: source.namespace}]\n", "spec.rules[0].when[0]", "set values or notValues"),
    ("  targetRef: {kind: Gateway, name: gw}\n", "spec.targetRef", "not supported yet"),
])
def test_authorization_policy_problems(spec: str, field: str, message: str) -> None:
    problem = only_problem(authz(spec), "authz.yaml")
    assert (problem.file, problem.resource, problem.field) == ("authz.yaml", "AuthorizationPolicy shop/p", field)
    assert problem.message.startswith(message), problem.message


@pytest.mark.parametrize(("rule", "field", "message"), [
    ("    jwks: '{not json'\n", "spec.jwtRules[0].jwks", "invalid JWKS JSON"),
    ("    jwks: '{\"keys\": []}'\n", "spec.jwtRules[0].jwks", 'a JWKS must be a JSON object with a non-empty "keys" list'),
    ("    jwks: '{\"keys\": [{\"kty\": \"oct\", \"k\": \"c2VjcmV0\"}]}'\n", "spec.jwtRules[0].jwks",
     "keys[0]: symmetric (oct) keys are not accepted"),
    ("    jwks: '{\"keys\": [{\"kty\": \"RSA\", \"n\": \"AQAB\", \"e\": \"AQAB\", \"alg\": \"HS256\"}]}'\n",
     "spec.jwtRules[0].jwks", "keys[0]: alg 'HS256' is not accepted for this key"),
    ("    jwks: '{\"keys\": [{\"kty\": \"EC\", \"crv\": \"P-521\", \"x\": \"AA\", \"y\": \"AA\"}]}'\n",
     "spec.jwtRules[0].jwks", "keys[0]: unsupported curve 'P-521'"),
    ("    jwks: '{\"keys\": [{\"kty\": \"RSA\", \"n\": \"a\", \"n\": \"b\", \"e\": \"AQAB\"}]}'\n",
     "spec.jwtRules[0].jwks", "invalid JWKS JSON: member 'n' appears twice"),
    ("    jwksUri: ftp://keys.example/jwks\n", "spec.jwtRules[0].jwksUri",
     "'ftp://keys.example/jwks' is not an http:// or https:// URL with a host"),
    ("    jwksUri: https://a/k\n    jwks: '{}'\n", "spec.jwtRules[0].jwksUri", "set jwks or jwksUri, not both"),
    ("    audiences: [x]\n", "spec.jwtRules[0]", "set jwks or jwksUri"),
    ("    jwksUri: https://a/k\n    fromHeaders: [{name: 'x y'}]\n", "spec.jwtRules[0].fromHeaders[0].name",
     "'x y' is not a valid header name"),
    ("    jwksUri: https://a/k\n    outputClaimToHeaders: [{header: x-sub}]\n",
     "spec.jwtRules[0].outputClaimToHeaders[0].claim", "required field is missing"),
    ("    jwksUri: https://a/k\n    timeout: 0s\n", "spec.jwtRules[0].timeout", "must be greater than zero"),
    ("    jwksUri: https://a/k\n    issuers: [x]\n", "spec.jwtRules[0].issuers", "unknown field"),
])
def test_request_authentication_problems(rule: str, field: str, message: str) -> None:
    problem = only_problem(jwt_rule(rule), "jwt.yaml")
    assert (problem.file, problem.resource, problem.field) == ("jwt.yaml", "RequestAuthentication shop/p", field)
    assert problem.message.startswith(message), problem.message


def test_every_problem_of_a_policy_is_reported_at_once() -> None:
    spec = ("  action: CUSTOM\n  rules:\n  - from: [{source: {ipBlocks: [x, y]}}]\n"
            "    when: [{key: nope, values: ['1']}]\n")
    fields = [p.field for p in problems_of(authz(spec))]
    assert fields == ["spec.action", "spec.rules[0].from[0].source.ipBlocks[0]",
                      "spec.rules[0].from[0].source.ipBlocks[1]", "spec.rules[0].when[0].key"]


def test_a_valid_inline_jwks_with_every_key_type_loads() -> None:
    keys = [
        {"kty": "RSA", "kid": "r", "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw",
         "e": "AQAB", "alg": "RS256"},
        {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
    ]
    from control.translate import load_text

    config = load_text(jwt_rule(f"    jwks: '{json.dumps({'keys': keys})}'\n"))
    (auth,) = config.request_authentications
    assert auth.jwt_rules[0].issuer == "https://issuer.example"
