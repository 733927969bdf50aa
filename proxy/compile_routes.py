"""RouteConfiguration (and route hash policies) -> ``model.RouteTable``.

A helper of ``compile.py``: virtual hosts become an exact-host dict plus
suffix/prefix/wildcard lists, routes keep their order (first match wins),
regexes are compiled here, and every RouteAction field Pillion does not
implement is refused with its path. Route extras (rewrites, redirects,
retries, mirrors, faults, header mutations) are compiled by
``compile_traffic.py``.
"""

from __future__ import annotations

import re
from typing import Any

from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.type.matcher.v3 import string_pb2

from proxy import model
from proxy.compile_base import ENVOY_DEFAULT_ROUTE_TIMEOUT, _Ctx, _only, _regex, _seconds
from proxy.compile_traffic import (
    direct_response,
    grpc_timeout,
    header_mutation,
    mirrors,
    query_match,
    redirect,
    retry,
    rewrite,
    route_fault,
)

# Pseudo-headers a route may match (Envoy's names; Istio's method, authority and scheme matches).
PSEUDO_HEADERS = (b":method", b":authority", b":scheme")


def _string_match(ctx: _Ctx, sm: string_pb2.StringMatcher, path: str) -> tuple[model.StringKind, bytes, re.Pattern[bytes] | None]:
    _only(ctx, sm, {"exact", "prefix", "suffix", "contains", "safe_regex"}, path)
    kind = sm.WhichOneof("match_pattern")
    if kind == "exact":
        return model.StringKind.EXACT, sm.exact.encode(), None
    if kind == "prefix":
        return model.StringKind.PREFIX, sm.prefix.encode(), None
    if kind == "suffix":
        return model.StringKind.SUFFIX, sm.suffix.encode(), None
    if kind == "contains":
        return model.StringKind.CONTAINS, sm.contains.encode(), None
    if kind == "safe_regex":
        return model.StringKind.REGEX, b"", _regex(ctx, sm.safe_regex.regex, f"{path}.safe_regex.regex")
    raise ctx.fail(path, "a match pattern is required")


def _header_match(ctx: _Ctx, hm: route_components_pb2.HeaderMatcher, path: str) -> model.HeaderMatch:
    _only(ctx, hm, {"name", "string_match", "present_match", "invert_match", "exact_match",
                    "prefix_match", "suffix_match", "safe_regex_match"}, path)
    name = hm.name.lower().encode()
    if not name or (name.startswith(b":") and name not in PSEUDO_HEADERS):
        raise ctx.fail(f"{path}.name", "a regular header name, :method, :authority or :scheme is required")
    which = hm.WhichOneof("header_match_specifier")
    if which == "string_match":
        kind, value, rx = _string_match(ctx, hm.string_match, f"{path}.string_match")
    elif which == "present_match":
        kind, value, rx = model.StringKind.PRESENT, b"", None
        return model.HeaderMatch(name, kind, value, rx, invert=hm.invert_match != (not hm.present_match))
    elif which == "exact_match":
        kind, value, rx = model.StringKind.EXACT, hm.exact_match.encode(), None
    elif which == "prefix_match":
        kind, value, rx = model.StringKind.PREFIX, hm.prefix_match.encode(), None
    elif which == "suffix_match":
        kind, value, rx = model.StringKind.SUFFIX, hm.suffix_match.encode(), None
    elif which == "safe_regex_match":
        kind, value, rx = model.StringKind.REGEX, b"", _regex(ctx, hm.safe_regex_match.regex, f"{path}.safe_regex_match.regex")
    else:
        kind, value, rx = model.StringKind.PRESENT, b"", None
    return model.HeaderMatch(name, kind, value, rx, invert=hm.invert_match)


_ROUTE_FIELDS = {"name", "match", "route", "redirect", "direct_response", "metadata", "decorator",
                 "request_headers_to_add", "request_headers_to_remove", "response_headers_to_add",
                 "response_headers_to_remove", "typed_per_filter_config"}
_ACTION_FIELDS = {"cluster", "weighted_clusters", "timeout", "hash_policy", "retry_policy", "request_mirror_policies",
                  "prefix_rewrite", "regex_rewrite", "host_rewrite_literal", "max_stream_duration",
                  "max_grpc_timeout"}
_NO_VHOST = route_components_pb2.VirtualHost()  # no header mutation of its own


def _route(ctx: _Ctx, r: route_components_pb2.Route, path: str,
           vhost: route_components_pb2.VirtualHost = _NO_VHOST, vhost_path: str = "") -> model.Route:
    _only(ctx, r, _ROUTE_FIELDS, path)
    m = r.match
    _only(ctx, m, {"prefix", "path", "safe_regex", "headers", "query_parameters", "case_sensitive"}, f"{path}.match")
    spec = m.WhichOneof("path_specifier")
    rx = None
    if spec == "prefix":
        kind, value = model.PathKind.PREFIX, m.prefix.encode()
    elif spec == "path":
        kind, value = model.PathKind.EXACT, m.path.encode()
    elif spec == "safe_regex":
        kind, value = model.PathKind.REGEX, b""
        rx = _regex(ctx, m.safe_regex.regex, f"{path}.match.safe_regex.regex")
    else:
        raise ctx.fail(f"{path}.match", "a path specifier (prefix, path or safe_regex) is required")
    headers = tuple(_header_match(ctx, h, f"{path}.match.headers[{i}]") for i, h in enumerate(m.headers))
    extras: dict[str, Any] = {
        "query": tuple(query_match(ctx, q, f"{path}.match.query_parameters[{i}]", _string_match)
                       for i, q in enumerate(m.query_parameters)),
        "case_sensitive": m.case_sensitive.value if m.HasField("case_sensitive") else True,
        "mutation": header_mutation(ctx, r, path, vhost, vhost_path),
        "fault": route_fault(ctx, r.typed_per_filter_config, f"{path}.typed_per_filter_config"),
    }
    action = r.WhichOneof("action")
    if action == "redirect":
        return model.Route(r.name, kind, value, rx, headers, "", redirect=redirect(ctx, r.redirect, f"{path}.redirect"),
                           **extras)
    if action == "direct_response":
        return model.Route(r.name, kind, value, rx, headers, "",
                           direct=direct_response(ctx, r.direct_response, f"{path}.direct_response"), **extras)
    if action != "route":
        raise ctx.fail(f"{path}.action", "route, redirect or direct_response is required")
    a = r.route
    _only(ctx, a, _ACTION_FIELDS, f"{path}.route")
    timeout = _seconds(a.timeout) if a.HasField("timeout") else ENVOY_DEFAULT_ROUTE_TIMEOUT
    extras["hash_policy"] = tuple(_hash_policy(ctx, h, f"{path}.route.hash_policy[{i}]")
                                  for i, h in enumerate(a.hash_policy))  # [lb]
    extras["rewrite"] = rewrite(ctx, a, f"{path}.route", kind)
    extras["mirrors"] = mirrors(ctx, a.request_mirror_policies, f"{path}.route.request_mirror_policies")
    if a.HasField("retry_policy"):
        extras["retry"] = retry(ctx, a.retry_policy, f"{path}.route.retry_policy")
    if a.HasField("max_stream_duration"):
        extras["grpc_timeout"], extras["grpc_timeout_max"], timeout = grpc_timeout(
            ctx, a.max_stream_duration, f"{path}.route.max_stream_duration")
    elif a.HasField("max_grpc_timeout"):  # Istio's (deprecated in Envoy, still honoured): 0 = uncapped
        extras["grpc_timeout"], extras["grpc_timeout_max"] = True, _seconds(a.max_grpc_timeout)
    which = a.WhichOneof("cluster_specifier")
    if which == "cluster":
        if not a.cluster:
            raise ctx.fail(f"{path}.route.cluster", "must not be empty")
        return model.Route(r.name, kind, value, rx, headers, a.cluster, timeout=timeout, **extras)
    if which == "weighted_clusters":
        wc = a.weighted_clusters
        _only(ctx, wc, {"clusters", "total_weight"}, f"{path}.route.weighted_clusters")
        out = []
        for i, c in enumerate(wc.clusters):
            _only(ctx, c, {"name", "weight"}, f"{path}.route.weighted_clusters.clusters[{i}]")
            if c.weight.value > 0:
                out.append(model.WeightedCluster(c.name, c.weight.value))
        if not out:
            raise ctx.fail(f"{path}.route.weighted_clusters", "at least one cluster needs a positive weight")
        total = sum(w.weight for w in out)
        return model.Route(r.name, kind, value, rx, headers, out[0].name, tuple(out), total, timeout, **extras)
    raise ctx.fail(f"{path}.route", "cluster or weighted_clusters is required")


def compile_route_config(rc: route_pb2.RouteConfiguration, name: str | None = None) -> model.RouteTable:
    ctx = _Ctx("RouteConfiguration", name or rc.name)
    _only(ctx, rc, {"name", "virtual_hosts", "validate_clusters"}, "")
    exact: dict[bytes, model.VirtualHost] = {}
    suffixes: list[tuple[bytes, model.VirtualHost]] = []
    prefixes: list[tuple[bytes, model.VirtualHost]] = []
    wildcard = None
    vhosts = []
    for i, v in enumerate(rc.virtual_hosts):
        path = f"virtual_hosts[{i}]"
        _only(ctx, v, {"name", "domains", "routes", "metadata", "request_headers_to_add", "request_headers_to_remove",
                       "response_headers_to_add", "response_headers_to_remove"}, path)
        routes = tuple(_route(ctx, r, f"{path}.routes[{j}]", v, path) for j, r in enumerate(v.routes))
        vh = model.VirtualHost(v.name, tuple(v.domains), routes)
        vhosts.append(vh)
        for d in v.domains:
            key = d.lower().encode()
            if key == b"*":
                wildcard = wildcard or vh
            elif key.startswith(b"*"):
                suffixes.append((key[1:], vh))
            elif key.endswith(b"*"):
                prefixes.append((key[:-1], vh))
            elif key in exact:
                raise ctx.fail(f"{path}.domains", f"domain {d!r} is already used by virtual host {exact[key].name!r}")
            else:
                exact[key] = vh
    suffixes.sort(key=lambda p: -len(p[0]))
    prefixes.sort(key=lambda p: -len(p[0]))
    return model.RouteTable(ctx.name, exact, tuple(suffixes), tuple(prefixes), wildcard, tuple(vhosts))


def _hash_policy(ctx: _Ctx, h: route_components_pb2.RouteAction.HashPolicy, path: str) -> model.HashPolicy:
    _only(ctx, h, {"header", "cookie", "connection_properties", "query_parameter"}, path)
    which = h.WhichOneof("policy_specifier")
    if which == "header":
        _only(ctx, h.header, {"header_name"}, f"{path}.header")
        if not h.header.header_name or h.header.header_name.startswith(":"):
            raise ctx.fail(f"{path}.header.header_name", "a regular header name is required")
        return model.HashPolicy(model.HashKind.HEADER, h.header.header_name.lower().encode())
    if which == "cookie":
        # ttl/path only matter when Envoy generates a missing cookie, which this proxy does not do.
        _only(ctx, h.cookie, {"name", "ttl", "path"}, f"{path}.cookie")
        if not h.cookie.name:
            raise ctx.fail(f"{path}.cookie.name", "required")
        return model.HashPolicy(model.HashKind.COOKIE, h.cookie.name.encode())
    if which == "connection_properties":
        if not h.connection_properties.source_ip:
            raise ctx.fail(f"{path}.connection_properties.source_ip", "must be true")
        return model.HashPolicy(model.HashKind.SOURCE_IP)
    if which == "query_parameter":
        if not h.query_parameter.name:
            raise ctx.fail(f"{path}.query_parameter.name", "required")
        return model.HashPolicy(model.HashKind.QUERY_PARAMETER, h.query_parameter.name.encode())
    raise ctx.fail(path, f"{which or 'a policy'} is not supported (header, cookie, connection_properties, "
                         "query_parameter are)")
# [lb] end
