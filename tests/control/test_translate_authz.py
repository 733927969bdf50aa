"""AuthorizationPolicy / RequestAuthentication -> the inbound listeners' jwt_authn and RBAC filters."""

from __future__ import annotations

import json

import pytest
from envoy.config.listener.v3 import listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format

from control.translate import NodeInfo, load_text, translate
from control.translate.authz_rbac import _sub_patterns
from tests.control.test_translate_security import SERVER, SERVER_SIDECAR, join
from tests.control.translate_fixtures import named

JWKS = json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1",
                             "x": "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4",
                             "y": "4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"}]})  # RFC 7517 A.1


def authz_policy(name: str, spec: str, namespace: str = "shop") -> str:
    return (f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}")


def request_auth(name: str = "jwt", namespace: str = "shop", extra: str = "") -> str:
    return (f"apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
            f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  jwtRules:\n"
            f"  - issuer: https://issuer.example\n    jwks: '{JWKS}'\n{extra}")


def listener(*docs: str, port: int = 9080, node: NodeInfo = SERVER) -> listener_pb2.Listener:
    found = named(translate(load_text(join(SERVER_SIDECAR, *docs)), node))[f"0.0.0.0_{port}"]
    assert isinstance(found, listener_pb2.Listener)
    return found


def http_filters(*docs: str, node: NodeInfo = SERVER) -> list[hcm_pb2.HttpFilter]:
    manager = hcm_pb2.HttpConnectionManager()
    listener(*docs, node=node).filter_chains[0].filters[0].typed_config.Unpack(manager)
    return list(manager.http_filters)


def rbac(f: hcm_pb2.HttpFilter) -> rbac_pb2.RBAC:
    config = http_rbac_pb2.RBAC()
    f.typed_config.Unpack(config)
    return config.rules


ALLOW_GET = authz_policy("allow-get", "  action: ALLOW\n  rules:\n  - to:\n    - operation:\n        methods: [\"GET\"]\n")
DENY_NS = authz_policy("deny-test", "  action: DENY\n  rules:\n  - from: [{source: {namespaces: [test]}}]\n")
AUDIT = authz_policy("audit", "  action: AUDIT\n  rules:\n  - to: [{operation: {paths: [/admin*]}}]\n")


def test_no_policy_means_only_the_router_and_only_tcp_proxy() -> None:
    assert [f.name for f in http_filters()] == ["envoy.filters.http.router"]
    tcp = listener(port=3306)
    assert [f.name for f in tcp.filter_chains[0].filters] == ["envoy.filters.network.tcp_proxy"]


def test_filter_order_jwt_audit_deny_allow_router_on_every_chain() -> None:
    filters = http_filters(ALLOW_GET, DENY_NS, AUDIT, request_auth())
    assert [f.name for f in filters] == [
        "envoy.filters.http.jwt_authn", "envoy.filters.http.rbac", "envoy.filters.http.rbac",
        "envoy.filters.http.rbac", "envoy.filters.http.router",
    ]
    assert [rbac(f).action for f in filters[1:4]] == [rbac_pb2.RBAC.LOG, rbac_pb2.RBAC.DENY, rbac_pb2.RBAC.ALLOW]
    assert list(rbac(filters[3]).policies) == ["ns[shop]-policy[allow-get]-rule[0]"]
    chains = listener(ALLOW_GET, DENY_NS).filter_chains
    assert [c.name for c in chains] == ["tls", "plaintext"]  # PERMISSIVE: both chains carry the filters
    assert chains[0].filters[0] == chains[1].filters[0]


def test_the_seed_policy_as_envoy_rbac() -> None:
    (allow, _router) = http_filters(ALLOW_GET)
    policy = rbac(allow).policies["ns[shop]-policy[allow-get]-rule[0]"]
    assert json_format.MessageToDict(policy) == {
        "permissions": [{"header": {"name": ":method", "stringMatch": {"exact": "GET"}}}],
        "principals": [{"any": True}],
    }


def test_an_allow_policy_without_rules_denies_everything_and_deny_without_rules_is_dropped() -> None:
    empty = authz_policy("deny-all", "  {}\n").replace("spec:\n  {}\n", "spec: {}\n")
    (allow, _router) = http_filters(empty)
    assert rbac(allow).action == rbac_pb2.RBAC.ALLOW and not rbac(allow).policies
    assert [f.name for f in http_filters(authz_policy("d", "  action: DENY\n"))] == ["envoy.filters.http.router"]


def test_principals_namespaces_and_ip_blocks() -> None:
    doc = authz_policy("p", """\
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/shop/sa/web, "cluster.local/ns/ops/*"]
        namespaces: [ops]
        ipBlocks: [10.1.2.3, 10.0.0.0/8]
        notRemoteIpBlocks: [192.168.0.0/16]
""")
    (allow, _router) = http_filters(doc)
    principal = json_format.MessageToDict(rbac(allow).policies["ns[shop]-policy[p]-rule[0]"].principals[0])
    ids = principal["andIds"]["ids"]
    assert ids[0] == {"orIds": {"ids": [
        {"authenticated": {"principalName": {"exact": "spiffe://cluster.local/ns/shop/sa/web"}}},
        {"authenticated": {"principalName": {"prefix": "spiffe://cluster.local/ns/ops/"}}}]}}
    assert ids[1] == {"authenticated": {"principalName": {"prefix": "spiffe://cluster.local/ns/ops/"}}}
    assert ids[2]["orIds"]["ids"][0] == {"directRemoteIp": {"addressPrefix": "10.1.2.3", "prefixLen": 32}}
    assert ids[3] == {"notId": {"remoteIp": {"addressPrefix": "192.168.0.0", "prefixLen": 16}}}


def test_jwt_authn_provider_and_requirement() -> None:
    extra = ("    audiences: [web]\n    forwardOriginalToken: true\n    outputPayloadToHeader: x-jwt\n"
             "    fromHeaders: [{name: x-token, prefix: 'Token '}]\n    fromParams: [tok]\n"
             "    outputClaimToHeaders: [{header: x-sub, claim: sub}]\n")
    jwt_filter = http_filters(request_auth(extra=extra))[0]
    config = jwt_pb2.JwtAuthentication()
    jwt_filter.typed_config.Unpack(config)
    provider = config.providers["shop.jwt.0"]
    assert provider.issuer == "https://issuer.example" and list(provider.audiences) == ["web"]
    assert provider.local_jwks.inline_string == JWKS and provider.forward
    assert provider.payload_in_metadata == "https://issuer.example" and provider.clock_skew_seconds == 60
    assert [(h.name, h.value_prefix) for h in provider.from_headers] == [("x-token", "Token ")]
    assert list(provider.from_params) == ["tok"] and provider.forward_payload_header == "x-jwt"
    (rule,) = config.rules
    assert rule.match.prefix == "/"
    assert json_format.MessageToDict(rule.requires) == {"requiresAny": {"requirements": [
        {"providerName": "shop.jwt.0"}, {"allowMissing": {}}]}}


def test_remote_jwks_is_fetched_asynchronously() -> None:
    doc = request_auth().replace(f"jwks: '{JWKS}'", "jwksUri: https://keys.example:8443/jwks\n    timeout: 2s")
    config = jwt_pb2.JwtAuthentication()
    http_filters(doc)[0].typed_config.Unpack(config)
    remote = config.providers["shop.jwt.0"].remote_jwks
    assert remote.http_uri.uri == "https://keys.example:8443/jwks"
    assert remote.http_uri.cluster == "outbound|8443||keys.example"
    assert remote.http_uri.timeout.seconds == 2 and remote.cache_duration.seconds == 600
    assert remote.async_fetch.fast_listener


def test_selection_by_root_namespace_namespace_and_selector() -> None:
    docs = [
        authz_policy("mesh", "  action: DENY\n  rules: [{}]\n", "istio-system"),
        authz_policy("other-app", "  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules: [{}]\n"),
        authz_policy("other-ns", "  action: DENY\n  rules: [{}]\n", "web"),
        authz_policy("mine", "  selector: {matchLabels: {app: ratings}}\n  action: DENY\n  rules: [{}]\n"),
        request_auth(namespace="istio-system"),
        request_auth(namespace="web"),
    ]
    filters = http_filters(*docs)
    assert sorted(rbac(filters[1]).policies) == ["ns[istio-system]-policy[mesh]-rule[0]",
                                                 "ns[shop]-policy[mine]-rule[0]"]
    config = jwt_pb2.JwtAuthentication()
    filters[0].typed_config.Unpack(config)
    assert list(config.providers) == ["istio-system.jwt.0"]


def test_tcp_port_gets_network_rbac_before_tcp_proxy() -> None:
    chain = listener(ALLOW_GET, DENY_NS, port=3306).filter_chains[0]
    assert [f.name for f in chain.filters] == [
        "envoy.filters.network.rbac", "envoy.filters.network.rbac", "envoy.filters.network.tcp_proxy"]


@pytest.mark.parametrize(("pattern", "subs"), [
    ("*", ["*"]), ("https://i.example/alice", ["alice"]), ("https://other/alice", []),
    ("https://i.example/a*", ["a*"]), ("https://i*", ["*"]), ("https://j*", []),
    ("*/alice", ["*/alice", "alice"]), ("*le/x", ["*le/x", "x"]),
])
def test_request_principal_patterns_per_issuer(pattern: str, subs: list[str]) -> None:
    assert _sub_patterns(pattern, "https://i.example") == subs


def test_translation_is_deterministic() -> None:
    docs = [ALLOW_GET, DENY_NS, AUDIT, request_auth()]
    first = translate(load_text(join(SERVER_SIDECAR, *docs)), SERVER).digest()
    assert first == translate(load_text(join(SERVER_SIDECAR, *reversed(docs))), SERVER).digest()
