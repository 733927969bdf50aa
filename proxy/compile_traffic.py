"""Route-level traffic management in xDS -> model: the extras of a Route and its RouteAction.

A helper of ``compile_routes.py`` (same rules as ``compile.py``: accept exactly
what is implemented, refuse any other set field with its path). Owns: query
parameter matchers, header mutations (a virtual host's merged into each of its
routes), rewrites (with RE2 substitutions turned into Python templates),
redirects, direct responses, request mirrors, the per-route fault config and
the HCM's fault filter, retry policies (retry_on names to ``model.RETRY_*``
bits) and the gRPC timeout setting.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2

from proxy import model
from proxy.compile_base import _Ctx, _only, _regex, _seconds

FAULT_FILTER = "envoy.filters.http.fault"
FAULT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"
PREVIOUS_HOSTS_TYPE = "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
_DENOMINATORS = {
    percent_pb2.FractionalPercent.HUNDRED: 100,
    percent_pb2.FractionalPercent.TEN_THOUSAND: 10_000,
    percent_pb2.FractionalPercent.MILLION: 1_000_000,
}
_REDIRECT_STATUS = {
    rc.RedirectAction.MOVED_PERMANENTLY: 301,
    rc.RedirectAction.FOUND: 302,
    rc.RedirectAction.SEE_OTHER: 303,
    rc.RedirectAction.TEMPORARY_REDIRECT: 307,
    rc.RedirectAction.PERMANENT_REDIRECT: 308,
}
_SUBSTITUTION = re.compile(rb"\\(.)?", re.DOTALL)
_RESERVED_HEADERS = (b"host",)


def percent(ctx: _Ctx, fp: percent_pb2.FractionalPercent, path: str) -> float:
    """A FractionalPercent as a percentage (0-100; more than the whole is the whole, as Envoy)."""
    _only(ctx, fp, {"numerator", "denominator"}, path)
    whole = _DENOMINATORS.get(fp.denominator)
    if whole is None:
        raise ctx.fail(f"{path}.denominator", "unknown denominator")
    return min(100.0, fp.numerator * 100.0 / whole)


# --- match --------------------------------------------------------------------------------


def query_match(ctx: _Ctx, qm: rc.QueryParameterMatcher, path: str, string_match: Any) -> model.QueryMatch:
    _only(ctx, qm, {"name", "string_match", "present_match"}, path)
    if not qm.name:
        raise ctx.fail(f"{path}.name", "required")
    if qm.WhichOneof("query_parameter_match_specifier") == "string_match":
        kind, value, rx = string_match(ctx, qm.string_match, f"{path}.string_match")
        return model.QueryMatch(qm.name.encode(), kind, value, rx)
    if qm.HasField("present_match") and not qm.present_match:
        raise ctx.fail(f"{path}.present_match", "must be true (or use string_match)")
    return model.QueryMatch(qm.name.encode(), model.StringKind.PRESENT)


# --- headers ------------------------------------------------------------------------------


def _header_name(ctx: _Ctx, name: str, path: str) -> bytes:
    lowered = name.lower().encode()
    if not lowered or lowered.startswith(b":") or lowered in _RESERVED_HEADERS:
        raise ctx.fail(path, f"{name!r} cannot be added or removed (pseudo-headers and host are not)")
    return lowered


def _header_ops(ctx: _Ctx, options: Iterable[base_pb2.HeaderValueOption], path: str) -> tuple[model.HeaderOp, ...]:
    out = []
    for i, hvo in enumerate(options):
        here = f"{path}[{i}]"
        _only(ctx, hvo, {"header", "append", "append_action"}, here)
        _only(ctx, hvo.header, {"key", "value"}, f"{here}.header")
        name = _header_name(ctx, hvo.header.key, f"{here}.header.key")
        if hvo.HasField("append"):  # deprecated BoolValue; wins when set, as Envoy
            if hvo.append_action != base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD:
                raise ctx.fail(f"{here}.append", "set append_action or append, not both")
            append = hvo.append.value
        elif hvo.append_action == base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD:
            append = True
        elif hvo.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD:
            append = False
        else:
            action = base_pb2.HeaderValueOption.HeaderAppendAction.Name(hvo.append_action)
            raise ctx.fail(f"{here}.append_action", f"{action} is not supported (APPEND_IF_EXISTS_OR_ADD and "
                                                    "OVERWRITE_IF_EXISTS_OR_ADD are)")
        out.append(model.HeaderOp(name, hvo.header.value.encode(), append))
    return tuple(out)


def _removed(ctx: _Ctx, names: Iterable[str], path: str) -> tuple[bytes, ...]:
    return tuple(_header_name(ctx, name, f"{path}[{i}]") for i, name in enumerate(names))


def header_mutation(ctx: _Ctx, r: Any, r_path: str, v: Any, v_path: str) -> model.HeaderMutation | None:
    """A route's header mutation, the virtual host's appended (route first, as Envoy applies them)."""
    parts: dict[str, Any] = {}
    for name in ("request_headers_to_add", "response_headers_to_add"):
        parts[name] = _header_ops(ctx, getattr(r, name), f"{r_path}.{name}") + _header_ops(
            ctx, getattr(v, name), f"{v_path}.{name}")
    for name in ("request_headers_to_remove", "response_headers_to_remove"):
        parts[name] = _removed(ctx, getattr(r, name), f"{r_path}.{name}") + _removed(
            ctx, getattr(v, name), f"{v_path}.{name}")
    if not any(parts.values()):
        return None
    return model.HeaderMutation(parts["request_headers_to_add"], parts["request_headers_to_remove"],
                                parts["response_headers_to_add"], parts["response_headers_to_remove"])


# --- route action ---------------------------------------------------------------------------


def python_substitution(text: bytes) -> bytes:
    """An RE2 rewrite template (\\0-\\9 groups, \\\\ a backslash) as a Python ``re.sub`` template."""
    def one(found: re.Match[bytes]) -> bytes:
        after = found.group(1)
        return b"\\\\" if after == b"\\" else b"\\g<" + (after or b"") + b">"
    return _SUBSTITUTION.sub(one, text)


def _substitution(ctx: _Ctx, text: str, groups: int, path: str) -> bytes:
    for found in _SUBSTITUTION.finditer(text.encode()):
        after = found.group(1)
        if after == b"\\":
            continue
        if after is None or not after.isdigit():
            raise ctx.fail(path, "only \\0-\\9 and \\\\ may follow a backslash (RE2 rewrite syntax)")
        if int(after) > groups:
            raise ctx.fail(path, f"\\{after.decode()} names a group the pattern does not have")
    return python_substitution(text.encode())


def rewrite(ctx: _Ctx, a: rc.RouteAction, path: str, path_kind: model.PathKind) -> model.Rewrite | None:
    prefix = regex = None
    substitution = b""
    if a.prefix_rewrite and a.HasField("regex_rewrite"):
        raise ctx.fail(f"{path}.regex_rewrite", "set prefix_rewrite or regex_rewrite, not both")
    if a.prefix_rewrite:
        if path_kind is model.PathKind.REGEX:
            raise ctx.fail(f"{path}.prefix_rewrite", "not supported with a safe_regex match (use regex_rewrite)")
        prefix = a.prefix_rewrite.encode()
    if a.HasField("regex_rewrite"):
        rr = a.regex_rewrite
        _only(ctx, rr, {"pattern", "substitution"}, f"{path}.regex_rewrite")
        _only(ctx, rr.pattern, {"regex"}, f"{path}.regex_rewrite.pattern")
        regex = _regex(ctx, rr.pattern.regex, f"{path}.regex_rewrite.pattern.regex")
        substitution = _substitution(ctx, rr.substitution, regex.groups, f"{path}.regex_rewrite.substitution")
    host = a.host_rewrite_literal.encode() if a.host_rewrite_literal else None
    if prefix is None and regex is None and host is None:
        return None
    return model.Rewrite(prefix, regex, substitution, host)


def mirrors(ctx: _Ctx, policies: Iterable[rc.RouteAction.RequestMirrorPolicy], path: str) -> tuple[model.Mirror, ...]:
    out = []
    for i, p in enumerate(policies):
        here = f"{path}[{i}]"
        _only(ctx, p, {"cluster", "runtime_fraction"}, here)
        if not p.cluster:
            raise ctx.fail(f"{here}.cluster", "required")
        share = 100.0
        if p.HasField("runtime_fraction"):
            _only(ctx, p.runtime_fraction, {"default_value"}, f"{here}.runtime_fraction")
            share = percent(ctx, p.runtime_fraction.default_value, f"{here}.runtime_fraction.default_value")
        out.append(model.Mirror(p.cluster, share))
    return tuple(out)


def retry(ctx: _Ctx, rp: rc.RetryPolicy, path: str) -> model.RetryPolicy:
    _only(ctx, rp, {"retry_on", "num_retries", "per_try_timeout", "retriable_status_codes", "retry_back_off",
                    "retry_host_predicate", "host_selection_retry_max_attempts"}, path)
    bits = 0
    for name in (part.strip() for part in rp.retry_on.split(",") if part.strip()):
        bit = model.RETRY_ON_NAMES.get(name)
        if bit is None:
            raise ctx.fail(f"{path}.retry_on", f"{name!r} is not supported (known: {', '.join(model.RETRY_ON_NAMES)})")
        bits |= bit
    if not bits:
        raise ctx.fail(f"{path}.retry_on", "at least one retry condition is required")
    base, cap = 0.025, None
    if rp.HasField("retry_back_off"):
        bo = rp.retry_back_off
        _only(ctx, bo, {"base_interval", "max_interval"}, f"{path}.retry_back_off")
        base = _seconds(bo.base_interval)
        if base <= 0:
            raise ctx.fail(f"{path}.retry_back_off.base_interval", "must be positive")
        if bo.HasField("max_interval"):
            cap = _seconds(bo.max_interval)
            if cap < base:
                raise ctx.fail(f"{path}.retry_back_off.max_interval", "must not be less than base_interval")
    other_host = False
    for i, pred in enumerate(rp.retry_host_predicate):
        here = f"{path}.retry_host_predicate[{i}]"
        _only(ctx, pred, {"name", "typed_config"}, here)
        url = pred.typed_config.type_url
        if pred.name != PREVIOUS_HOSTS or url not in ("", PREVIOUS_HOSTS_TYPE):
            raise ctx.fail(here, f"only {PREVIOUS_HOSTS} is supported")
        other_host = True
    for i, code in enumerate(rp.retriable_status_codes):
        if not 100 <= code <= 599:
            raise ctx.fail(f"{path}.retriable_status_codes[{i}]", f"{code} is not an HTTP status")
    return model.RetryPolicy(
        retry_on=bits,
        num_retries=rp.num_retries.value if rp.HasField("num_retries") else 1,
        per_try_timeout=_seconds(rp.per_try_timeout) if rp.HasField("per_try_timeout") else 0.0,
        retriable_status=frozenset(rp.retriable_status_codes),
        backoff_base=base,
        backoff_max=cap if cap is not None else base * 10,
        other_host=other_host,
        host_selection_attempts=max(1, rp.host_selection_retry_max_attempts),
    )


def grpc_timeout(ctx: _Ctx, msd: rc.RouteAction.MaxStreamDuration, path: str) -> tuple[bool, float, float]:
    """max_stream_duration: (whether grpc-timeout bounds the route, its cap (0: none), the route's
    timeout). With max_stream_duration present Envoy ignores RouteAction.timeout: the stream's
    duration is max_stream_duration.max_stream_duration (unset: unbounded)."""
    _only(ctx, msd, {"grpc_timeout_header_max", "max_stream_duration"}, path)
    limit = _seconds(msd.max_stream_duration) if msd.HasField("max_stream_duration") else 0.0
    if not msd.HasField("grpc_timeout_header_max"):
        return False, 0.0, limit
    return True, _seconds(msd.grpc_timeout_header_max), limit


# --- route --------------------------------------------------------------------------------


def redirect(ctx: _Ctx, ra: rc.RedirectAction, path: str) -> model.Redirect:
    _only(ctx, ra, {"https_redirect", "scheme_redirect", "host_redirect", "port_redirect", "path_redirect",
                    "prefix_rewrite", "response_code", "strip_query"}, path)
    status = _REDIRECT_STATUS.get(ra.response_code)
    if status is None:
        raise ctx.fail(f"{path}.response_code", "unknown redirect response code")
    scheme = b"https" if ra.https_redirect else (ra.scheme_redirect.lower().encode() or None)
    return model.Redirect(
        status=status,
        scheme=scheme,
        host=ra.host_redirect.encode() or None,
        port=ra.port_redirect,
        path=ra.path_redirect.encode() or None,
        prefix=ra.prefix_rewrite.encode() or None,
        strip_query=ra.strip_query,
    )


def direct_response(ctx: _Ctx, dr: rc.DirectResponseAction, path: str) -> model.DirectResponse:
    _only(ctx, dr, {"status", "body"}, path)
    if not 200 <= dr.status <= 599:
        raise ctx.fail(f"{path}.status", f"{dr.status} is not an HTTP status Envoy sends (200-599)")
    body = b""
    if dr.HasField("body"):
        _only(ctx, dr.body, {"inline_string", "inline_bytes"}, f"{path}.body")
        which = dr.body.WhichOneof("specifier")
        body = dr.body.inline_string.encode() if which == "inline_string" else dr.body.inline_bytes
    return model.DirectResponse(dr.status, body)


def _http_fault(ctx: _Ctx, config: fault_pb2.HTTPFault, path: str) -> model.Fault | None:
    _only(ctx, config, {"delay", "abort"}, path)
    delay = delay_percent = abort_percent = 0.0
    status, grpc = 0, None
    if config.HasField("delay"):
        d = config.delay
        _only(ctx, d, {"fixed_delay", "percentage"}, f"{path}.delay")
        if not d.HasField("fixed_delay"):
            raise ctx.fail(f"{path}.delay.fixed_delay", "required")
        delay = _seconds(d.fixed_delay)
        delay_percent = percent(ctx, d.percentage, f"{path}.delay.percentage")  # unset: 0%, as Envoy
    if config.HasField("abort"):
        a = config.abort
        _only(ctx, a, {"http_status", "grpc_status", "percentage"}, f"{path}.abort")
        which = a.WhichOneof("error_type")
        if which == "http_status":
            if not 200 <= a.http_status <= 599:
                raise ctx.fail(f"{path}.abort.http_status", f"{a.http_status} is not in [200, 600)")
            status = a.http_status
        elif which == "grpc_status":
            grpc = a.grpc_status
        else:
            raise ctx.fail(f"{path}.abort", "http_status or grpc_status is required")
        abort_percent = percent(ctx, a.percentage, f"{path}.abort.percentage")
    if not delay and not status and grpc is None:
        return None
    return model.Fault(delay, delay_percent, status, grpc, abort_percent)


def route_fault(ctx: _Ctx, configs: Mapping[str, any_pb2.Any], path: str) -> model.Fault | None:
    """A route's typed_per_filter_config: only the fault filter's HTTPFault is understood."""
    found = None
    for name in sorted(configs):
        here = f'{path}["{name}"]'
        if name != FAULT_FILTER or configs[name].type_url != FAULT_TYPE:
            raise ctx.fail(here, f"only {FAULT_FILTER} (HTTPFault) per-route config is supported")
        config = fault_pb2.HTTPFault()
        configs[name].Unpack(config)
        found = _http_fault(ctx, config, here)
    return found


def fault_filter(ctx: Any, f: Any, path: str) -> None:
    """The HCM's fault filter: its own settings must be empty (the routes carry the faults)."""
    config = fault_pb2.HTTPFault()
    f.typed_config.Unpack(config)
    _only(ctx, config, (), f"{path}.typed_config")


def has_fault(table: model.RouteTable) -> bool:
    return any(r.fault is not None for vh in table.virtual_hosts for r in vh.routes)
