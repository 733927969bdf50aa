"""proxy.compile_rbac: what Pillion accepts of Envoy's RBAC and jwt_authn configs, and what it NACKs."""

from __future__ import annotations

import pytest
from envoy.config.listener.v3 import listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.cors.v3 import cors_pb2  # noqa: F401 (registers the type for ParseDict)
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from google.protobuf import json_format

from control.translate import load_text, translate
from proxy import authz, jwt
from proxy.compile import XdsResources, compile_snapshot, validate_resource
from proxy.errors import InvalidResource
from tests.control.test_translate_authz_envoy import EVERYTHING
from tests.control.test_translate_security import SERVER, SERVER_SIDECAR, join


def resources():  # type: ignore[no-untyped-def]
    return translate(load_text(join(SERVER_SIDECAR, *EVERYTHING)), SERVER)


def test_pillion_compiles_every_shape_envoy_validates() -> None:
    res = resources()
    snap = compile_snapshot(XdsResources(res.listeners, res.routes, res.clusters, res.endpoints))
    http = next(ls for ls in snap.listeners if ls.port == 9080).http
    assert http is not None and http.policy is not None
    assert http.policy.jwt is not None and sorted(http.policy.jwt.providers) == ["shop.jwt.0", "shop.remote.0"]
    assert [f.action for f in http.policy.rbac] == [authz.Action.LOG, authz.Action.DENY, authz.Action.ALLOW]
    assert http.policy.jwt.payload_headers == frozenset({b"x-jwt", b"x-sub"})
    remote = http.policy.jwt.providers["shop.remote.0"].remote
    assert remote == jwt.RemoteJwks("https://keys.example/jwks", 5.0, 600.0)
    tcp = next(ls for ls in snap.listeners if ls.port == 3306).tcp
    # On TCP the AUDIT rule (paths) is dropped, so no LOG filter; the allow policy's `{}` rule remains.
    assert tcp is not None and [f.action for f in tcp.rbac] == [authz.Action.DENY, authz.Action.ALLOW]


def _listener_with(http_filters: list[dict]) -> listener_pb2.Listener:
    res = resources()
    listener = next(ls for ls in res.listeners if ls.name == "0.0.0.0_9080")
    changed = listener_pb2.Listener()
    changed.CopyFrom(listener)
    manager = hcm_pb2.HttpConnectionManager()
    changed.filter_chains[0].filters[0].typed_config.Unpack(manager)
    del manager.http_filters[:]
    for item in http_filters:
        manager.http_filters.append(json_format.ParseDict(item, hcm_pb2.HttpFilter()))
    for chain in changed.filter_chains:
        chain.filters[0].typed_config.Pack(manager)
    return changed


ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
JWT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"


def rbac(rules: dict, **extra: object) -> dict:
    return {"name": "envoy.filters.http.rbac", "typed_config": {"@type": RBAC_TYPE, "rules": rules, **extra}}


ANY_POLICY = {"permissions": [{"any": True}], "principals": [{"any": True}]}


@pytest.mark.parametrize(("filters", "field", "message"), [
    ([rbac({"policies": {"p": ANY_POLICY}})], "http_filters", "the router filter must be last"),
    ([{"name": "envoy.filters.http.cors", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}}, ROUTER],
     "http_filters[0]", "unsupported HTTP filter 'envoy.filters.http.cors'"),
    ([rbac({"policies": {"p": ANY_POLICY}}, shadow_rules={"action": "DENY"}), ROUTER],
     "http_filters[0].typed_config.shadow_rules", "field is not supported"),
    ([rbac({"policies": {"p": {**ANY_POLICY, "condition": {"const_expr": {"bool_value": True}}}}}), ROUTER],
     'http_filters[0].typed_config.rules.policies["p"].condition', "field is not supported"),
    ([rbac({"policies": {"p": {"permissions": [{"any": True}], "principals": [
        {"filter_state": {"key": "k", "string_match": {"exact": "v"}}}]}}}), ROUTER],
     'http_filters[0].typed_config.rules.policies["p"].principals[0]', "principal 'filter_state' is not supported"),
    ([rbac({"policies": {"p": {"permissions": [{"any": True}], "principals": []}}}), ROUTER],
     'http_filters[0].typed_config.rules.policies["p"]', "a policy needs at least one permission and one principal"),
    ([rbac({"policies": {"p": {"permissions": [{"url_path": {"path": {"safe_regex": {"regex": "("}}}}],
                               "principals": [{"any": True}]}}}), ROUTER],
     "url_path.path.safe_regex.regex", "invalid regex"),
    ([rbac({"policies": {"p": ANY_POLICY}}), {"name": "envoy.filters.http.jwt_authn", "typed_config": {
        "@type": JWT_TYPE, "providers": {"a": {"issuer": "i", "local_jwks": {"inline_string": "{}"}}}}}, ROUTER],
     "http_filters[1]", "one jwt_authn filter, before the RBAC filters"),
    ([{"name": "envoy.filters.http.jwt_authn", "typed_config": {
        "@type": JWT_TYPE, "providers": {"a": {"issuer": "i", "local_jwks": {"inline_string": "{}"}}}}}, ROUTER],
     'providers["a"].local_jwks', 'a JWKS is a JSON object with a "keys" list'),
    ([{"name": "envoy.filters.http.jwt_authn", "typed_config": {
        "@type": JWT_TYPE, "providers": {"a": {"issuer": "i", "remote_jwks": {
            "http_uri": {"uri": "https://k/j", "cluster": "c", "timeout": "1s"}}, "subjects": {"exact": "x"}}}}},
      ROUTER], 'providers["a"].subjects', "field is not supported"),
    ([{"name": "envoy.filters.http.jwt_authn", "typed_config": {
        "@type": JWT_TYPE, "providers": {"a": {"issuer": "i", "remote_jwks": {
            "http_uri": {"uri": "https://k/j", "cluster": "c", "timeout": "1s"}}}},
        "rules": [{"match": {"prefix": "/"}, "requires": {"requires_all": {"requirements": [
            {"provider_name": "a"}, {"provider_name": "a"}]}}}]}}, ROUTER],
     "rules[0].requires.requires_all", "not supported by this proxy"),
])
def test_unsupported_filter_configs_are_nacked_with_the_field(filters: list[dict], field: str, message: str) -> None:
    with pytest.raises(InvalidResource) as caught:
        validate_resource(_listener_with(filters))
    assert field in caught.value.field, caught.value
    assert caught.value.message.startswith(message), caught.value.message


def test_an_rbac_filter_without_rules_enforces_nothing_and_compiles_away() -> None:
    listener = _listener_with([{"name": "envoy.filters.http.rbac", "typed_config": {"@type": RBAC_TYPE}}, ROUTER])
    res = resources()
    others = [ls for ls in res.listeners if ls.name != listener.name]
    snap = compile_snapshot(XdsResources([listener, *others], res.routes, res.clusters, res.endpoints))
    http = next(ls for ls in snap.listeners if ls.port == 9080).http
    assert http is not None and http.policy is None


def test_network_rbac_only_before_tcp_proxy() -> None:
    res = resources()
    tcp = next(ls for ls in res.listeners if ls.name == "0.0.0.0_3306")
    changed = listener_pb2.Listener()
    changed.CopyFrom(tcp)
    for chain in changed.filter_chains:
        config = network_rbac_pb2.RBAC(stat_prefix="x", rules=rbac_pb2.RBAC(action=rbac_pb2.RBAC.DENY),
                                       enforcement_type=network_rbac_pb2.RBAC.CONTINUOUS)
        chain.filters[0].typed_config.Pack(config)
    with pytest.raises(InvalidResource, match="only ONE_TIME_ON_FIRST_BYTE"):
        validate_resource(changed)
    http = next(ls for ls in res.listeners if ls.name == "0.0.0.0_9080")
    changed.CopyFrom(http)
    for chain in changed.filter_chains:
        chain.filters.insert(0, tcp.filter_chains[0].filters[0])
    with pytest.raises(InvalidResource, match="network RBAC is supported before tcp_proxy only"):
        validate_resource(changed)
