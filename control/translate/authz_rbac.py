"""AuthorizationPolicy rules -> Envoy RBAC policies (envoy.config.rbac.v3), for HTTP and TCP.

Owns: how each Istio field becomes an RBAC permission or principal, the
policy names ("ns[NS]-policy[NAME]-rule[i]"), and what happens to
HTTP-only fields on a TCP port. It must not select policies for a node or
assemble filters (`authz.py` does).

Mapping (Istio's meaning, expressed in plain Envoy so a real Envoy enforces it too):
- a rule matches when any `from` entry, any `to` entry and every `when`
  condition match: each `to` entry is one permission (an and_rules of its
  fields and of the permission-side conditions), each `from` entry one
  principal (likewise), and Envoy ORs the lists;
- principals "cluster.local/ns/a/sa/b" -> the peer certificate's URI SAN
  "spiffe://cluster.local/ns/a/sa/b"; namespaces "a" -> URI SAN prefix
  "spiffe://<trust domain>/ns/a/"; ipBlocks -> direct_remote_ip;
  remoteIpBlocks -> remote_ip;
- requestPrincipals "<iss>/<sub>" and request.auth.* -> dynamic metadata of
  the jwt_authn filter: each provider stores the verified payload under its
  issuer (`payload_in_metadata`), so "<iss>/<sub>" is the claim "sub" under
  the key of a provider whose issuer is <iss> (patterns are split per
  provider); claims match a string value or an element of a list value;
- hosts -> ":authority", case-insensitive, with or without a port;
  methods -> ":method"; paths -> the path without query (url_path), path
  templates -> uri_template; ports -> destination_port.
- TCP (Istio's documented behaviour): a rule that uses an HTTP-only field
  (hosts, methods, paths, requestPrincipals, request.* conditions) is
  dropped from ALLOW and AUDIT policies (it can never match a connection),
  while in DENY policies the HTTP-only fields are ignored, so the rule
  denies more rather than less.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from envoy.config.core.v3 import address_pb2, extension_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.rbac.v3.rbac_pb2 import Permission, Principal
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.path.match.uri_template.v3 import uri_template_match_pb2
from envoy.type.matcher.v3 import metadata_pb2, path_pb2, regex_pb2, string_pb2, value_pb2
from google.protobuf import wrappers_pb2

from control.translate.authz_kinds import claim_path
from control.translate.model import (
    AuthorizationPolicy,
    AuthzAction,
    AuthzCondition,
    AuthzOperation,
    AuthzRule,
    AuthzSource,
)
from control.translate.protos import packed

JWT_FILTER = "envoy.filters.http.jwt_authn"
URI_TEMPLATE = "envoy.path.match.uri_template.uri_template_matcher"
ACTIONS = {
    AuthzAction.ALLOW: rbac_pb2.RBAC.ALLOW,
    AuthzAction.DENY: rbac_pb2.RBAC.DENY,
    AuthzAction.AUDIT: rbac_pb2.RBAC.LOG,
}
_HTTP_CONDITIONS = re.compile(r"^request\.")
_PERMISSION_CONDITIONS = frozenset({"destination.ip", "destination.port", "connection.sni"})



@dataclass(frozen=True)
class JwtIssuer:
    """A jwt_authn provider as RBAC sees it: its issuer and the metadata key of its payload."""

    issuer: str
    payload_key: str


@dataclass(frozen=True)
class RuleContext:
    trust_domain: str
    issuers: tuple[JwtIssuer, ...]  # the node's jwt_authn providers
    http: bool  # False: a TCP port (network RBAC)


def policy_name(policy: AuthorizationPolicy, index: int) -> str:
    return f"ns[{policy.meta.namespace}]-policy[{policy.meta.name}]-rule[{index}]"


def rbac_rules(
    action: AuthzAction, policies: Sequence[AuthorizationPolicy], ctx: RuleContext
) -> rbac_pb2.RBAC:
    """One RBAC for the policies of `action` (for ALLOW, no policies at all means: deny everything)."""
    rules = rbac_pb2.RBAC(action=ACTIONS[action])
    for policy in policies:
        for index, rule in enumerate(policy.rules):
            built = _policy(rule, action, ctx)
            if built is not None:
                rules.policies[policy_name(policy, index)].CopyFrom(built)
    return rules


# --- rules --------------------------------------------------------------------------


def _uses_http(rule: AuthzRule) -> bool:
    return (
        any(s.request_principals or s.not_request_principals for s in rule.sources)
        or any(
            o.hosts or o.not_hosts or o.methods or o.not_methods or o.paths or o.not_paths
            for o in rule.operations
        )
        or any(_HTTP_CONDITIONS.match(c.key) for c in rule.conditions)
    )


def _policy(rule: AuthzRule, action: AuthzAction, ctx: RuleContext) -> rbac_pb2.Policy | None:
    if not ctx.http and _uses_http(rule) and action is not AuthzAction.DENY:
        return None  # an ALLOW (or AUDIT) rule about HTTP never matches a TCP connection
    conditions = [c for c in rule.conditions if ctx.http or not _HTTP_CONDITIONS.match(c.key)]
    to_conditions = [_condition_permission(c) for c in conditions if c.key in _PERMISSION_CONDITIONS]
    from_conditions = [
        _condition_principal(c, ctx) for c in conditions if c.key not in _PERMISSION_CONDITIONS
    ]
    permissions = [
        _all_of([*_operation(op, ctx), *to_conditions]) for op in rule.operations
    ] or [_all_of(to_conditions)]
    principals = [
        _all_ids([*_source(src, ctx), *from_conditions]) for src in rule.sources
    ] or [_all_ids(from_conditions)]
    return rbac_pb2.Policy(permissions=permissions, principals=principals)


def _operation(op: AuthzOperation, ctx: RuleContext) -> list[Permission]:
    out: list[Permission] = []
    out += _field(op.ports, op.not_ports, _port)
    if ctx.http:
        out += _field(op.hosts, op.not_hosts, _host)
        out += _field(op.methods, op.not_methods, _method)
        out += _field(op.paths, op.not_paths, _path)
    return out


def _source(src: AuthzSource, ctx: RuleContext) -> list[Principal]:
    def principal(value: str) -> Principal:
        return _authenticated(_spiffe(value))

    def namespace(value: str) -> Principal:
        return _authenticated(_namespace(ctx.trust_domain, value))

    def request_principal(value: str) -> Principal:
        return _request_principal(value, ctx.issuers)

    out: list[Principal] = []
    out += _ids(src.principals, src.not_principals, principal)
    out += _ids(src.namespaces, src.not_namespaces, namespace)
    out += _ids(src.ip_blocks, src.not_ip_blocks, lambda v: Principal(direct_remote_ip=_cidr(v)))
    out += _ids(src.remote_ip_blocks, src.not_remote_ip_blocks, lambda v: Principal(remote_ip=_cidr(v)))
    if ctx.http:
        out += _ids(src.request_principals, src.not_request_principals, request_principal)
    return out


def _condition_permission(c: AuthzCondition) -> Permission:
    if c.key == "destination.ip":
        return _all_of(_field(c.values, c.not_values, lambda v: Permission(destination_ip=_cidr(v))))
    if c.key == "destination.port":
        return _all_of(_field(c.values, c.not_values, lambda v: _port(int(v))))
    return _all_of(
        _field(c.values, c.not_values, lambda v: Permission(requested_server_name=_string(v)))
    )


def _condition_principal(c: AuthzCondition, ctx: RuleContext) -> Principal:
    key = c.key
    if key.startswith("request.headers["):
        name = key[len("request.headers[") : -1].lower()
        return _all_ids(_ids(c.values, c.not_values, lambda v: Principal(header=_header(name, v))))
    if key.startswith("request.auth.claims"):
        path = claim_path(key)
        return _all_ids(_ids(c.values, c.not_values, lambda v: _claim(path, v, ctx.issuers)))
    if key == "request.auth.principal":
        return _all_ids(_ids(c.values, c.not_values, lambda v: _request_principal(v, ctx.issuers)))
    if key in ("request.auth.audiences", "request.auth.presenter"):
        path = ("aud",) if key.endswith("audiences") else ("azp",)
        return _all_ids(_ids(c.values, c.not_values, lambda v: _claim(path, v, ctx.issuers)))
    if key == "source.ip":
        return _all_ids(_ids(c.values, c.not_values, lambda v: Principal(direct_remote_ip=_cidr(v))))
    if key == "remote.ip":
        return _all_ids(_ids(c.values, c.not_values, lambda v: Principal(remote_ip=_cidr(v))))
    if key == "source.namespace":
        return _all_ids(
            _ids(c.values, c.not_values, lambda v: _authenticated(_namespace(ctx.trust_domain, v)))
        )
    assert key == "source.principal", key
    return _all_ids(_ids(c.values, c.not_values, lambda v: _authenticated(_spiffe(v))))


# --- combinators ----------------------------------------------------------------------


def _field(values: Sequence[Any], negated: Sequence[Any], make: Callable[[Any], Permission]) -> list[Permission]:
    """[any of `values`, none of `negated`], each part only when given."""
    out: list[Permission] = []
    if values:
        out.append(_any_of([make(v) for v in values]))
    if negated:
        out.append(Permission(not_rule=_any_of([make(v) for v in negated])))
    return out


def _ids(values: Sequence[str], negated: Sequence[str], make: Callable[[str], Principal]) -> list[Principal]:
    out: list[Principal] = []
    if values:
        out.append(_any_ids([make(v) for v in values]))
    if negated:
        out.append(Principal(not_id=_any_ids([make(v) for v in negated])))
    return out


def _any_of(items: list[Permission]) -> Permission:
    if len(items) == 1:
        return items[0]
    return Permission(or_rules=Permission.Set(rules=items))


def _all_of(items: list[Permission]) -> Permission:
    if not items:
        return Permission(any=True)
    if len(items) == 1:
        return items[0]
    return Permission(and_rules=Permission.Set(rules=items))


def _any_ids(items: list[Principal]) -> Principal:
    if not items:
        return Principal(not_id=Principal(any=True))  # matches nothing
    if len(items) == 1:
        return items[0]
    return Principal(or_ids=Principal.Set(ids=items))


def _all_ids(items: list[Principal]) -> Principal:
    if not items:
        return Principal(any=True)
    if len(items) == 1:
        return items[0]
    return Principal(and_ids=Principal.Set(ids=items))


# --- leaves -----------------------------------------------------------------------------


def _regex(pattern: str) -> string_pb2.StringMatcher:
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=pattern))


def _string(value: str, prefix: str = "", *, ignore_case: bool = False) -> string_pb2.StringMatcher:
    """Istio's value patterns: "*" (presence), "abc*", "*abc" or exact; `prefix` is prepended."""
    if value == "*":
        return _regex(re.escape(prefix) + ".+")
    if value.endswith("*"):
        return string_pb2.StringMatcher(prefix=prefix + value[:-1], ignore_case=ignore_case)
    if value.startswith("*"):
        return string_pb2.StringMatcher(suffix=value[1:], ignore_case=ignore_case)
    return string_pb2.StringMatcher(exact=prefix + value, ignore_case=ignore_case)


def _spiffe(value: str) -> string_pb2.StringMatcher:
    return _string(value, "spiffe://")


def _namespace(trust_domain: str, value: str) -> string_pb2.StringMatcher:
    base = f"spiffe://{trust_domain}/ns/"
    if value == "*":
        return string_pb2.StringMatcher(prefix=base)
    if "*" not in value:
        return string_pb2.StringMatcher(prefix=f"{base}{value}/")
    if value.endswith("*"):
        return _regex(f"{re.escape(base + value[:-1])}[^/]*/.*")
    return _regex(f"{re.escape(base)}[^/]*{re.escape(value[1:])}/.*")


def _authenticated(matcher: string_pb2.StringMatcher) -> Principal:
    return Principal(authenticated=Principal.Authenticated(principal_name=matcher))


def _cidr(value: str) -> address_pb2.CidrRange:
    address, _, length = value.partition("/")
    return address_pb2.CidrRange(
        address_prefix=address, prefix_len=wrappers_pb2.UInt32Value(value=int(length))
    )


def _port(port: int) -> Permission:
    return Permission(destination_port=port)


def _header(name: str, value: str, *, ignore_case: bool = False) -> route_components_pb2.HeaderMatcher:
    if value == "*":
        return route_components_pb2.HeaderMatcher(name=name, present_match=True)
    return route_components_pb2.HeaderMatcher(
        name=name, string_match=_string(value, ignore_case=ignore_case)
    )


def _method(value: str) -> Permission:
    return Permission(header=_header(":method", value))


def _host(value: str) -> Permission:
    """Case-insensitive; a host without a port also matches it with any port."""
    if value == "*" or value.endswith("*"):
        return Permission(header=_header(":authority", value, ignore_case=True))
    body = f".*{re.escape(value[1:])}" if value.startswith("*") else re.escape(value)
    port = "" if re.search(r":[0-9]+$", value) else "(:[0-9]+)?"
    matcher = _regex(f"(?i){body}{port}")
    return Permission(header=route_components_pb2.HeaderMatcher(name=":authority", string_match=matcher))


def _path(value: str) -> Permission:
    if "{" in value:
        template = "/".join(
            {"{*}": "*", "{**}": "**"}.get(segment, segment) for segment in value.split("/")
        )
        config = uri_template_match_pb2.UriTemplateMatchConfig(path_template=template)
        return Permission(
            uri_template=extension_pb2.TypedExtensionConfig(name=URI_TEMPLATE, typed_config=packed(config))
        )
    if value == "*":
        return Permission(url_path=path_pb2.PathMatcher(path=_regex(".*")))
    return Permission(url_path=path_pb2.PathMatcher(path=_string(value)))


# --- JWT-derived attributes (jwt_authn dynamic metadata) -----------------------------------


def _metadata(path: Sequence[str], value: value_pb2.ValueMatcher) -> Principal:
    matcher = metadata_pb2.MetadataMatcher(
        filter=JWT_FILTER,
        path=[metadata_pb2.MetadataMatcher.PathSegment(key=key) for key in path],
        value=value,
    )
    return Principal(sourced_metadata=rbac_pb2.SourcedMetadata(metadata_matcher=matcher))


def _value(pattern: str) -> list[value_pb2.ValueMatcher]:
    """A claim matches as a string, or as a list with a matching element."""
    one = (
        value_pb2.ValueMatcher(present_match=True)
        if pattern == "*"
        else value_pb2.ValueMatcher(string_match=_string(pattern))
    )
    return [one, value_pb2.ValueMatcher(list_match=value_pb2.ListMatcher(one_of=one))]


def _claim(path: Sequence[str], pattern: str, issuers: Sequence[JwtIssuer]) -> Principal:
    return _any_ids(
        [_metadata((jwt.payload_key, *path), value) for jwt in issuers for value in _value(pattern)]
    )


def _sub_patterns(pattern: str, issuer: str) -> list[str]:
    """The patterns on "sub" under which "<issuer>/<sub>" matches `pattern` ("*": any sub)."""
    full = issuer + "/"
    if pattern == "*":
        return ["*"]
    if "*" not in pattern:
        sub = pattern[len(full) :] if pattern.startswith(full) else ""
        return [sub] if sub else []
    if pattern.endswith("*"):
        head = pattern[:-1]
        if head.startswith(full):
            rest = head[len(full) :]
            return [rest + "*"] if rest else ["*"]
        return ["*"] if full.startswith(head) else []
    tail = pattern[1:]
    found = ["*" + tail]  # subs at least as long as the suffix
    for length in range(1, len(tail)):  # shorter subs: the suffix reaches into "<issuer>/"
        if full.endswith(tail[: len(tail) - length]):
            found.append(tail[len(tail) - length :])
    return found


def _request_principal(pattern: str, issuers: Sequence[JwtIssuer]) -> Principal:
    ids = []
    for jwt in issuers:
        for sub in _sub_patterns(pattern, jwt.issuer):
            value = (
                value_pb2.ValueMatcher(present_match=True)
                if sub == "*"
                else value_pb2.ValueMatcher(string_match=_string(sub))
            )
            ids.append(_metadata((jwt.payload_key, "sub"), value))
    return _any_ids(ids)

