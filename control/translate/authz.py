"""Request authentication and authorization for a node's inbound listeners (Envoy filter configs).

Owns: which AuthorizationPolicies and RequestAuthentications apply to a
node, and the filters its inbound listeners carry: on HTTP ports the HCM's
`envoy.filters.http.jwt_authn` and `envoy.filters.http.rbac` filters (before
the router), on TCP ports an `envoy.filters.network.rbac` filter before
tcp_proxy. How a rule becomes an RBAC policy is `authz_rbac.py`; the shape
and meaning of the YAML is `authz_kinds.py`. No I/O.

Rules (Istio's):
- A policy applies to a node when it is in the mesh's root namespace
  (mesh-wide) or in the node's namespace, and has no selector or a selector
  whose matchLabels the node's labels contain.
- Filter order: jwt_authn, then one RBAC filter per action present: AUDIT
  (Envoy LOG: counts, never denies; first, so it sees every request), DENY,
  ALLOW. An ALLOW filter is emitted whenever an ALLOW policy applies, even
  one without rules: then nothing is allowed (`spec: {}` denies all).
- jwt_authn: one provider per jwtRule of every applying
  RequestAuthentication; the requirement is "any provider, or no token at
  all" (Istio: a request without a token passes on to authorization, one with
  an invalid token is refused with 401). Each provider stores its verified
  payload in dynamic metadata under its issuer, for the RBAC principals.
- jwksUri becomes remote_jwks fetched asynchronously (the listener does not
  wait; tokens fail until the keys arrive), cached `JWKS_CACHE_SECONDS`; its
  http_uri cluster is named as Istio names outbound clusters
  (outbound|port||host); Pillion's proxy fetches the URI itself.
- No applying policy: no filter at all, so requests pay nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar
from urllib.parse import urlsplit

from envoy.config.core.v3 import base_pb2, http_uri_pb2
from envoy.config.listener.v3 import listener_components_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from google.protobuf import empty_pb2

from control.translate.authz_rbac import JwtIssuer, RuleContext, rbac_rules
from control.translate.model import (
    AuthorizationPolicy,
    AuthzAction,
    ConfigSet,
    NodeInfo,
    RequestAuthentication,
    labels_match,
)
from control.translate.protos import duration, packed

JWT_FILTER = "envoy.filters.http.jwt_authn"
HTTP_RBAC_FILTER = "envoy.filters.http.rbac"
NETWORK_RBAC_FILTER = "envoy.filters.network.rbac"
CLOCK_SKEW_SECONDS = 60
JWKS_CACHE_SECONDS = 600.0  # Envoy's default cache_duration
_ORDER = (AuthzAction.AUDIT, AuthzAction.DENY, AuthzAction.ALLOW)

P = TypeVar("P", AuthorizationPolicy, RequestAuthentication)


def applying(policies: Iterable[P], root_namespace: str, node: NodeInfo) -> list[P]:
    """The policies that apply to `node`, in (namespace, name) order."""
    return [
        policy
        for policy in policies
        if policy.meta.namespace in (root_namespace, node.namespace)
        and (policy.selector is None or labels_match(policy.selector, node.labels))
    ]


class NodeAuthz:
    """The authn/authz filters of one node's inbound listeners, built once per translation."""

    def __init__(self, config: ConfigSet, node: NodeInfo) -> None:
        root = config.mesh.root_namespace
        self.policies = applying(config.authorization_policies, root, node)
        self.authentications = applying(config.request_authentications, root, node)
        self.trust_domain = config.mesh.trust_domain
        self.jwt, self.issuers = jwt_authn(self.authentications)

    def http_filters(self) -> list[hcm.HttpFilter]:
        """The HCM filters to put before the router (none when nothing applies)."""
        filters = []
        if self.jwt is not None:
            filters.append(hcm.HttpFilter(name=JWT_FILTER, typed_config=packed(self.jwt)))
        ctx = RuleContext(self.trust_domain, self.issuers, http=True)
        for action in _ORDER:
            rules = self._rules(action, ctx)
            if rules is not None:
                config = http_rbac_pb2.RBAC(rules=rules)
                filters.append(hcm.HttpFilter(name=HTTP_RBAC_FILTER, typed_config=packed(config)))
        return filters

    def network_filters(self) -> list[listener_components_pb2.Filter]:
        """The network filters to put before tcp_proxy (none when nothing applies)."""
        filters = []
        ctx = RuleContext(self.trust_domain, self.issuers, http=False)
        for action in _ORDER:
            rules = self._rules(action, ctx)
            if rules is not None:
                prefix = f"tcp_{action.value.lower()}."
                config = network_rbac_pb2.RBAC(rules=rules, stat_prefix=prefix)
                filters.append(
                    listener_components_pb2.Filter(name=NETWORK_RBAC_FILTER, typed_config=packed(config))
                )
        return filters

    def _rules(self, action: AuthzAction, ctx: RuleContext) -> rbac_pb2.RBAC | None:
        selected = [p for p in self.policies if p.action is action]
        if not selected:
            return None
        rules = rbac_rules(action, selected, ctx)
        if not rules.policies and action is not AuthzAction.ALLOW:
            return None  # a DENY or AUDIT filter that can match nothing changes nothing
        return rules


def provider_name(auth: RequestAuthentication, index: int) -> str:
    return f"{auth.meta.namespace}.{auth.meta.name}.{index}"


def jwks_cluster(uri: str) -> str:
    parts = urlsplit(uri)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"outbound|{port}||{parts.hostname}"


def jwt_authn(
    authentications: Iterable[RequestAuthentication],
) -> tuple[jwt_pb2.JwtAuthentication | None, tuple[JwtIssuer, ...]]:
    """The jwt_authn config for these RequestAuthentications (None if they have no rules)."""
    config = jwt_pb2.JwtAuthentication()
    issuers: list[JwtIssuer] = []
    for auth in authentications:
        for index, rule in enumerate(auth.jwt_rules):
            provider = jwt_pb2.JwtProvider(
                issuer=rule.issuer,
                audiences=list(rule.audiences),
                forward=rule.forward_original_token,
                from_headers=[
                    jwt_pb2.JwtHeader(name=name, value_prefix=prefix)
                    for name, prefix in rule.from_headers
                ],
                from_params=list(rule.from_params),
                from_cookies=list(rule.from_cookies),
                forward_payload_header=rule.output_payload_to_header,
                payload_in_metadata=rule.issuer,
                clock_skew_seconds=CLOCK_SKEW_SECONDS,
                claim_to_headers=[
                    jwt_pb2.JwtClaimToHeader(header_name=header, claim_name=claim)
                    for header, claim in rule.output_claim_to_headers
                ],
            )
            if rule.jwks:
                provider.local_jwks.CopyFrom(base_pb2.DataSource(inline_string=rule.jwks))
            else:
                provider.remote_jwks.CopyFrom(
                    jwt_pb2.RemoteJwks(
                        http_uri=http_uri_pb2.HttpUri(
                            uri=rule.jwks_uri,
                            cluster=jwks_cluster(rule.jwks_uri),
                            timeout=duration(rule.timeout),
                        ),
                        cache_duration=duration(JWKS_CACHE_SECONDS),
                        async_fetch=jwt_pb2.JwksAsyncFetch(fast_listener=True),
                    )
                )
            config.providers[provider_name(auth, index)].CopyFrom(provider)
            issuers.append(JwtIssuer(rule.issuer, rule.issuer))
    if not config.providers:
        return None, ()
    requirements = [jwt_pb2.JwtRequirement(provider_name=name) for name in sorted(config.providers)]
    requirements.append(jwt_pb2.JwtRequirement(allow_missing=empty_pb2.Empty()))
    config.rules.append(
        jwt_pb2.RequirementRule(
            match=route_components_pb2.RouteMatch(prefix="/"),
            requires=jwt_pb2.JwtRequirement(
                requires_any=jwt_pb2.JwtRequirementOrList(requirements=requirements)
            ),
        )
    )
    unique = {issuer.payload_key: issuer for issuer in issuers}
    return config, tuple(unique[key] for key in sorted(unique))

