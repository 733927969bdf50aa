"""xDS RBAC and jwt_authn filter configs (protobuf) -> ``authz`` and ``jwt`` objects.

Owns: which HTTP filters an HCM may carry besides the router (one
``envoy.filters.http.jwt_authn`` first, then any number of
``envoy.filters.http.rbac``, and one ``envoy.filters.http.fault`` whose
settings live on the routes: ``compile_traffic.py``), the network RBAC filters allowed before
tcp_proxy, and the subset of Envoy's RBAC and JwtAuthentication messages
Pillion implements. Like ``compile.py``, a set field it does not implement
is refused (``InvalidResource`` -> NACK), never ignored: an authorization
rule silently dropped would open what the operator closed.

Everything is resolved here: string matchers lowered or compiled, CIDRs
turned into integers, JWKS parsed into keys, policies sorted by name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from envoy.config.core.v3 import address_pb2, extension_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.extensions.path.match.uri_template.v3 import uri_template_match_pb2
from envoy.type.matcher.v3 import metadata_pb2, string_pb2, value_pb2
from google.protobuf.message import Message

from proxy import authz, jwt
from proxy.compile_traffic import FAULT_TYPE, fault_filter
from proxy.errors import InvalidResource

_T = "type.googleapis.com/"
JWT_TYPE = _T + "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
HTTP_RBAC_TYPE = _T + "envoy.extensions.filters.http.rbac.v3.RBAC"
NETWORK_RBAC_TYPE = _T + "envoy.extensions.filters.network.rbac.v3.RBAC"
ROUTER_TYPE = _T + "envoy.extensions.filters.http.router.v3.Router"
URI_TEMPLATE_TYPE = _T + "envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig"
_ACTIONS = {
    rbac_pb2.RBAC.ALLOW: authz.Action.ALLOW,
    rbac_pb2.RBAC.DENY: authz.Action.DENY,
    rbac_pb2.RBAC.LOG: authz.Action.LOG,
}


class Ctx(Protocol):
    """The resource being compiled (``compile._Ctx``): names it in errors."""

    def fail(self, path: str, message: str) -> InvalidResource: ...


def _only(ctx: Ctx, msg: Message, allowed: Iterable[str], path: str) -> None:
    allowed = set(allowed)
    for fd, _ in msg.ListFields():
        if fd.name not in allowed:
            raise ctx.fail(f"{path}.{fd.name}" if path else fd.name, "field is not supported by this proxy")


# --- filter lists ---------------------------------------------------------------------------


def http_policy(ctx: Ctx, filters: Sequence[Any], path: str) -> authz.HttpPolicy | None:
    """An HCM's http_filters: [jwt_authn], rbac..., router (last). None when no filter enforces anything."""
    names = [f.name for f in filters]
    if not filters or filters[-1].typed_config.type_url != ROUTER_TYPE:
        raise ctx.fail(path, f"the router filter must be last, got {names}")
    authn: jwt.JwtAuthn | None = None
    rbac: list[authz.RbacFilter] = []
    fault = False
    for i, f in enumerate(filters[:-1]):
        where = f"{path}[{i}]"
        _only(ctx, f, {"name", "typed_config"}, where)
        url = f.typed_config.type_url
        if url == FAULT_TYPE:  # [traffic] applies the routes' faults; nothing of its own to compile
            if fault:
                raise ctx.fail(where, "one fault filter is supported")
            fault_filter(ctx, f, where)
            fault = True
        elif url == JWT_TYPE:
            if authn is not None or rbac:
                raise ctx.fail(where, "one jwt_authn filter, before the RBAC filters, is supported")
            config = jwt_pb2.JwtAuthentication()
            f.typed_config.Unpack(config)
            authn = jwt_authn(ctx, config, f"{where}.typed_config")
        elif url == HTTP_RBAC_TYPE:
            config_h = http_rbac_pb2.RBAC()
            f.typed_config.Unpack(config_h)
            p = f"{where}.typed_config"
            _only(ctx, config_h, {"rules", "rules_stat_prefix", "track_per_rule_stats"}, p)
            if config_h.HasField("rules"):
                rbac.append(rbac_filter(ctx, config_h.rules, f"{p}.rules"))
        else:
            raise ctx.fail(where, f"unsupported HTTP filter {f.name!r} ({url}); jwt_authn, rbac, fault and the router are")
    if authn is None and not rbac:
        return None
    return authz.HttpPolicy(authn, tuple(rbac))


def network_rbac(ctx: Ctx, filters: Sequence[Any], path: str) -> tuple[authz.RbacFilter, ...]:
    """The network RBAC filters before a chain's terminal filter (``path`` names the chain's filters)."""
    out = []
    for i, f in enumerate(filters):
        where = f"{path}[{i}]"
        _only(ctx, f, {"name", "typed_config"}, where)
        if f.typed_config.type_url != NETWORK_RBAC_TYPE:
            raise ctx.fail(where, f"only envoy.filters.network.rbac may precede the terminal filter, got {f.name!r}")
        config = network_rbac_pb2.RBAC()
        f.typed_config.Unpack(config)
        p = f"{where}.typed_config"
        _only(ctx, config, {"rules", "stat_prefix", "enforcement_type"}, p)
        if config.enforcement_type != network_rbac_pb2.RBAC.ONE_TIME_ON_FIRST_BYTE:
            raise ctx.fail(f"{p}.enforcement_type", "only ONE_TIME_ON_FIRST_BYTE is supported")
        if config.HasField("rules"):
            out.append(rbac_filter(ctx, config.rules, f"{p}.rules"))
    return tuple(out)


def rbac_filter(ctx: Ctx, rules: rbac_pb2.RBAC, path: str) -> authz.RbacFilter:
    _only(ctx, rules, {"action", "policies"}, path)
    if rules.action not in _ACTIONS:
        raise ctx.fail(f"{path}.action", "only ALLOW, DENY and LOG are supported")
    policies = []
    for name in sorted(rules.policies):
        policy = rules.policies[name]
        where = f'{path}.policies["{name}"]'
        _only(ctx, policy, {"permissions", "principals"}, where)
        if not policy.permissions or not policy.principals:
            raise ctx.fail(where, "a policy needs at least one permission and one principal")
        permissions = authz.any_of(
            [_permission(ctx, p, f"{where}.permissions[{i}]") for i, p in enumerate(policy.permissions)]
        )
        principals = authz.any_of(
            [_principal(ctx, p, f"{where}.principals[{i}]") for i, p in enumerate(policy.principals)]
        )
        policies.append(authz.Policy(name, permissions, principals))
    return authz.RbacFilter(_ACTIONS[rules.action], tuple(policies))


# --- permissions and principals -------------------------------------------------------------


def _permission(ctx: Ctx, p: rbac_pb2.Permission, path: str) -> authz.Matcher:
    which = p.WhichOneof("rule")
    here = f"{path}.{which}"
    if which == "and_rules":
        return authz.And(tuple(_permission(ctx, r, f"{here}.rules[{i}]") for i, r in enumerate(p.and_rules.rules)))
    if which == "or_rules":
        return authz.any_of([_permission(ctx, r, f"{here}.rules[{i}]") for i, r in enumerate(p.or_rules.rules)])
    if which == "not_rule":
        return authz.Not(_permission(ctx, p.not_rule, here))
    if which == "any":
        return _any(ctx, p.any, here)
    if which == "header":
        return _header(ctx, p.header, here)
    if which == "url_path":
        return _url_path(ctx, p.url_path, here)
    if which == "destination_ip":
        return authz.DestinationIp(_cidr(ctx, p.destination_ip, here))
    if which == "destination_port":
        return authz.DestinationPort(p.destination_port, p.destination_port + 1)
    if which == "destination_port_range":
        return authz.DestinationPort(p.destination_port_range.start, p.destination_port_range.end)
    if which == "metadata":
        return _metadata(ctx, p.metadata, here)
    if which == "requested_server_name":
        return authz.ServerName(_string(ctx, p.requested_server_name, here, text=True))
    if which == "uri_template":
        return _uri_template(ctx, p.uri_template, here)
    raise ctx.fail(path, f"permission {which!r} is not supported" if which else "a permission rule is required")


def _principal(ctx: Ctx, p: rbac_pb2.Principal, path: str) -> authz.Matcher:
    which = p.WhichOneof("identifier")
    here = f"{path}.{which}"
    if which == "and_ids":
        return authz.And(tuple(_principal(ctx, r, f"{here}.ids[{i}]") for i, r in enumerate(p.and_ids.ids)))
    if which == "or_ids":
        return authz.any_of([_principal(ctx, r, f"{here}.ids[{i}]") for i, r in enumerate(p.or_ids.ids)])
    if which == "not_id":
        return authz.Not(_principal(ctx, p.not_id, here))
    if which == "any":
        return _any(ctx, p.any, here)
    if which == "authenticated":
        _only(ctx, p.authenticated, {"principal_name"}, here)
        name = p.authenticated
        return authz.Authenticated(
            _string(ctx, name.principal_name, f"{here}.principal_name", text=True)
            if name.HasField("principal_name") else None
        )
    if which in ("source_ip", "direct_remote_ip"):
        return authz.SourceIp(_cidr(ctx, getattr(p, which), here))
    if which == "remote_ip":
        return authz.RemoteIp(_cidr(ctx, p.remote_ip, here))
    if which == "header":
        return _header(ctx, p.header, here)
    if which == "url_path":
        return _url_path(ctx, p.url_path, here)
    if which == "metadata":
        return _metadata(ctx, p.metadata, here)
    if which == "sourced_metadata":
        _only(ctx, p.sourced_metadata, {"metadata_matcher", "metadata_source"}, here)
        if p.sourced_metadata.metadata_source != rbac_pb2.DYNAMIC:
            raise ctx.fail(f"{here}.metadata_source", "only DYNAMIC metadata is supported")
        return _metadata(ctx, p.sourced_metadata.metadata_matcher, f"{here}.metadata_matcher")
    raise ctx.fail(path, f"principal {which!r} is not supported" if which else "a principal identifier is required")


def _any(ctx: Ctx, flag: bool, path: str) -> authz.Matcher:
    if not flag:
        raise ctx.fail(path, "any must be true")
    return authz.Any_()


def _cidr(ctx: Ctx, c: address_pb2.CidrRange, path: str) -> authz.Cidr:
    _only(ctx, c, {"address_prefix", "prefix_len"}, path)
    try:
        return authz.Cidr.parse(c.address_prefix, c.prefix_len.value)
    except ValueError as exc:
        raise ctx.fail(path, f"invalid CIDR range: {exc}") from None


def _string(ctx: Ctx, sm: string_pb2.StringMatcher, path: str, *, text: bool = False) -> authz.StrMatch:
    """A StringMatcher over bytes (headers, paths) or, with ``text``, over str."""
    _only(ctx, sm, {"exact", "prefix", "suffix", "contains", "safe_regex", "ignore_case"}, path)
    which = sm.WhichOneof("match_pattern")
    if which == "safe_regex":
        _only(ctx, sm.safe_regex, {"regex", "google_re2"}, f"{path}.safe_regex")
        pattern = sm.safe_regex.regex
        try:
            compiled: re.Pattern[Any] = re.compile(pattern if text else pattern.encode())
        except re.error as exc:
            raise ctx.fail(f"{path}.safe_regex.regex", f"invalid regex {pattern!r}: {exc}") from None
        return authz.StrMatch(authz.StringKind.REGEX, regex=compiled)
    kinds = {"exact": authz.StringKind.EXACT, "prefix": authz.StringKind.PREFIX,
             "suffix": authz.StringKind.SUFFIX, "contains": authz.StringKind.CONTAINS}
    if which not in kinds:
        raise ctx.fail(path, "a match pattern is required")
    value: str = getattr(sm, which)
    if sm.ignore_case:
        value = value.lower()
    return authz.StrMatch(kinds[which], value if text else value.encode(), ignore_case=sm.ignore_case)


def _header(ctx: Ctx, hm: route_components_pb2.HeaderMatcher, path: str) -> authz.Matcher:
    _only(ctx, hm, {"name", "string_match", "present_match", "invert_match", "exact_match", "prefix_match",
                    "suffix_match", "contains_match", "safe_regex_match", "treat_missing_header_as_empty"}, path)
    name = hm.name.lower().encode()
    if not name:
        raise ctx.fail(f"{path}.name", "required")
    which = hm.WhichOneof("header_match_specifier")
    invert, empty = hm.invert_match, hm.treat_missing_header_as_empty
    if which == "string_match":
        return authz.Header(name, _string(ctx, hm.string_match, f"{path}.string_match"), invert, empty)
    if which == "present_match" or which is None:
        present = hm.present_match if which else True
        return authz.Header(name, None, invert != (not present), empty)
    legacy = {"exact_match": "exact", "prefix_match": "prefix", "suffix_match": "suffix",
              "contains_match": "contains"}
    if which in legacy:
        sm = string_pb2.StringMatcher(**{legacy[which]: getattr(hm, which)})
        return authz.Header(name, _string(ctx, sm, f"{path}.{which}"), invert, empty)
    if which == "safe_regex_match":
        sm = string_pb2.StringMatcher(safe_regex=hm.safe_regex_match)
        return authz.Header(name, _string(ctx, sm, f"{path}.{which}"), invert, empty)
    raise ctx.fail(f"{path}.{which}", "not supported by this proxy")


def _url_path(ctx: Ctx, pm: Any, path: str) -> authz.Matcher:
    _only(ctx, pm, {"path"}, path)
    return authz.UrlPath(_string(ctx, pm.path, f"{path}.path"))


def template_regex(template: str) -> str | None:
    """The regex of an Envoy URI template ("/a/*/b/**", "/{x}/{y=**}"), or None if unsupported."""
    if not template.startswith("/"):
        return None
    out = []
    segments = template[1:].split("/")
    for index, segment in enumerate(segments):
        if segment in ("*", "{*}") or re.fullmatch(r"\{[A-Za-z_][A-Za-z0-9_]*(=\*)?\}", segment):
            out.append("[^/]+")
        elif segment == "**" or re.fullmatch(r"\{[A-Za-z_][A-Za-z0-9_]*=\*\*\}", segment):
            if index != len(segments) - 1:
                return None
            out.append(".*")
        elif any(ch in segment for ch in "{}*"):
            return None
        else:
            out.append(re.escape(segment))
    return "/" + "/".join(out)


def _uri_template(ctx: Ctx, config: extension_pb2.TypedExtensionConfig, path: str) -> authz.Matcher:
    if config.typed_config.type_url != URI_TEMPLATE_TYPE:
        raise ctx.fail(f"{path}.typed_config", "only the uri_template path matcher is supported")
    match = uri_template_match_pb2.UriTemplateMatchConfig()
    config.typed_config.Unpack(match)
    pattern = template_regex(match.path_template)
    if pattern is None:
        raise ctx.fail(f"{path}.typed_config.path_template", f"unsupported path template {match.path_template!r}")
    return authz.UriTemplate(match.path_template, re.compile(pattern.encode()))


def _metadata(ctx: Ctx, mm: metadata_pb2.MetadataMatcher, path: str) -> authz.Matcher:
    _only(ctx, mm, {"filter", "path", "value", "invert"}, path)
    keys = []
    for i, segment in enumerate(mm.path):
        _only(ctx, segment, {"key"}, f"{path}.path[{i}]")
        keys.append(segment.key)
    if not mm.HasField("value"):
        raise ctx.fail(f"{path}.value", "required")
    return authz.Metadata(mm.filter, tuple(keys), _value(ctx, mm.value, f"{path}.value"), mm.invert)


def _value(ctx: Ctx, vm: value_pb2.ValueMatcher, path: str) -> authz.ValueMatch:
    which = vm.WhichOneof("match_pattern")
    here = f"{path}.{which}"
    kind = authz.ValueKind
    if which == "string_match":
        return authz.ValueMatch(kind.STRING, _string(ctx, vm.string_match, here, text=True))
    if which == "present_match":
        return authz.ValueMatch(kind.PRESENT, flag=vm.present_match)
    if which == "bool_match":
        return authz.ValueMatch(kind.BOOL, flag=vm.bool_match)
    if which == "null_match":
        return authz.ValueMatch(kind.NULL)
    if which == "list_match":
        _only(ctx, vm.list_match, {"one_of"}, here)
        return authz.ValueMatch(kind.LIST, inner=(_value(ctx, vm.list_match.one_of, f"{here}.one_of"),))
    if which == "or_match":
        items = vm.or_match.value_matchers
        return authz.ValueMatch(kind.OR, inner=tuple(_value(ctx, v, f"{here}.value_matchers[{i}]")
                                                     for i, v in enumerate(items)))
    raise ctx.fail(path, f"value matcher {which!r} is not supported" if which else "a value matcher is required")


# --- jwt_authn ----------------------------------------------------------------------------------


def jwt_authn(ctx: Ctx, config: jwt_pb2.JwtAuthentication, path: str) -> jwt.JwtAuthn:
    _only(ctx, config, {"providers", "rules", "stat_prefix", "strip_failure_response"}, path)
    providers = {name: _provider(ctx, name, config.providers[name], f'{path}.providers["{name}"]')
                 for name in sorted(config.providers)}
    rules = []
    for i, rule in enumerate(config.rules):
        where = f"{path}.rules[{i}]"
        _only(ctx, rule, {"match", "requires"}, where)
        _only(ctx, rule.match, {"prefix", "path"}, f"{where}.match")
        which = rule.match.WhichOneof("path_specifier")
        if which not in ("prefix", "path"):
            raise ctx.fail(f"{where}.match", "a prefix or path match is required")
        requirement = _requirement(ctx, rule.requires, providers, f"{where}.requires")
        if requirement is not None:
            rules.append(jwt.Rule(getattr(rule.match, which).encode(), which == "path", requirement))
    owned = {p.payload_header for p in providers.values() if p.payload_header}
    owned |= {header for p in providers.values() for header, _ in p.claim_headers}
    return jwt.JwtAuthn(providers, tuple(rules), frozenset(owned))


def _requirement(ctx: Ctx, req: jwt_pb2.JwtRequirement, providers: dict[str, jwt.Provider],
                 path: str) -> jwt.Requirement | None:
    def named(name: str, where: str) -> str:
        if name not in providers:
            raise ctx.fail(where, f"no provider named {name!r}")
        return name

    which = req.WhichOneof("requires_type")
    everyone = tuple(providers)
    if which is None:
        return None
    if which == "provider_name":
        return jwt.Requirement((named(req.provider_name, f"{path}.provider_name"),))
    if which == "allow_missing":
        return jwt.Requirement(everyone, allow_missing=True)
    if which == "allow_missing_or_failed":
        return jwt.Requirement(everyone, allow_missing=True, allow_failed=True)
    if which == "requires_any":
        names: list[str] = []
        missing = failed = False
        for i, inner in enumerate(req.requires_any.requirements):
            kind = inner.WhichOneof("requires_type")
            where = f"{path}.requires_any.requirements[{i}]"
            if kind == "provider_name":
                names.append(named(inner.provider_name, f"{where}.provider_name"))
            elif kind == "allow_missing":
                missing = True
            elif kind == "allow_missing_or_failed":
                missing = failed = True
            else:
                raise ctx.fail(where, "requires_any may list provider_name, allow_missing and allow_missing_or_failed")
        return jwt.Requirement(tuple(names) or everyone, missing, failed)
    raise ctx.fail(f"{path}.{which}", "not supported by this proxy")


def _provider(ctx: Ctx, name: str, p: jwt_pb2.JwtProvider, path: str) -> jwt.Provider:
    _only(ctx, p, {"issuer", "audiences", "local_jwks", "remote_jwks", "forward", "from_headers", "from_params",
                   "from_cookies", "forward_payload_header", "pad_forward_payload_header", "payload_in_metadata",
                   "clock_skew_seconds", "claim_to_headers", "require_expiration"}, path)
    keys: jwt.KeySet | None = None
    remote: jwt.RemoteJwks | None = None
    which = p.WhichOneof("jwks_source_specifier")
    if which == "local_jwks":
        source = p.local_jwks
        _only(ctx, source, {"inline_string", "inline_bytes"}, f"{path}.local_jwks")
        text = source.inline_string or source.inline_bytes.decode("utf-8", "replace")
        try:
            keys = jwt.KeySet(text)
        except jwt.JwksError as exc:
            raise ctx.fail(f"{path}.local_jwks", str(exc)) from None
    elif which == "remote_jwks":
        r = p.remote_jwks
        _only(ctx, r, {"http_uri", "cache_duration", "async_fetch"}, f"{path}.remote_jwks")
        _only(ctx, r.http_uri, {"uri", "cluster", "timeout"}, f"{path}.remote_jwks.http_uri")
        uri = r.http_uri.uri
        if not re.match(r"^https?://[^/?#]+", uri):
            raise ctx.fail(f"{path}.remote_jwks.http_uri.uri", f"{uri!r} is not an http(s) URL")
        timeout = _seconds(r.http_uri.timeout) if r.http_uri.HasField("timeout") else 1.0
        cache = _seconds(r.cache_duration) if r.HasField("cache_duration") else 600.0
        remote = jwt.RemoteJwks(uri, timeout or 1.0, cache or 600.0)
    else:
        raise ctx.fail(path, "local_jwks or remote_jwks is required")
    headers = tuple((h.name.lower().encode(), h.value_prefix.lower().encode()) for h in p.from_headers)
    for i, h in enumerate(p.from_headers):
        _only(ctx, h, {"name", "value_prefix"}, f"{path}.from_headers[{i}]")
    params, cookies = tuple(p.from_params), tuple(p.from_cookies)
    if not headers and not params and not cookies:  # Envoy's default locations
        headers, params = ((b"authorization", b"bearer "),), ("access_token",)
    return jwt.Provider(
        name=name,
        issuer=p.issuer,
        audiences=frozenset(p.audiences),
        keys=keys,
        remote=remote,
        from_headers=headers,
        from_params=params,
        from_cookies=cookies,
        forward=p.forward,
        payload_header=p.forward_payload_header.lower().encode(),
        pad_payload=p.pad_forward_payload_header,
        payload_key=p.payload_in_metadata,
        clock_skew=p.clock_skew_seconds if p.clock_skew_seconds else jwt.DEFAULT_CLOCK_SKEW,
        claim_headers=tuple((c.header_name.lower().encode(), tuple(c.claim_name.split(".")))
                            for c in p.claim_to_headers),
        require_expiration=p.require_expiration,
    )


def _seconds(d: Any) -> float:
    return float(d.seconds + d.nanos / 1e9)
