"""An http[] entry's traffic-management settings -> the Envoy route pieces that carry them.

Owns: RouteMatch conditions beyond uri and headers (pseudo-header matchers
for method/authority/scheme, query_parameters, inverted matchers for
withoutHeaders, case_sensitive), the RouteAction's rewrite, retry policy,
request mirror policies and gRPC timeout, the Route's redirect or
direct_response, header mutations and the per-route fault config, and the
HCM's fault filter. `routes.py` decides which routes exist and calls these.

Rules (Istio's):
- No `retries`: Istio's default policy (2 attempts on connect-failure,
  refused-stream, unavailable, cancelled and 503, previous_hosts with 5 host
  selection attempts); `attempts` 0 (or unset): no retry_policy at all.
- rewrite.uri is prefix_rewrite on prefix and exact matches; on a regex
  match it becomes a regex_rewrite of that regex (the match covers the whole
  path, so the whole path is replaced, as Envoy's prefix_rewrite would do).
- Percentages are FractionalPercent per million (mirror, fault).
- max_stream_duration.grpc_timeout_header_max is the route timeout (0s when
  the route has none): a gRPC request's grpc-timeout is honoured, capped by
  the route's timeout when there is one, as Istio's max_grpc_timeout did.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.common.fault.v3 import fault_pb2 as common_fault_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import wrappers_pb2

from control.translate.model import HttpMatch, HttpRoute, MatchKind, StringMatch
from control.translate.model_traffic import DirectResponse, Fault, HeaderOps, Redirect, Retries
from control.translate.protos import duration, packed

FAULT_FILTER = "envoy.filters.http.fault"
PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"
DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
DEFAULT_RETRY_ATTEMPTS = 2
DEFAULT_RETRY_STATUS = (503,)
HOST_SELECTION_ATTEMPTS = 5
_REDIRECT_CODES = {
    301: rc.RedirectAction.MOVED_PERMANENTLY,
    302: rc.RedirectAction.FOUND,
    303: rc.RedirectAction.SEE_OTHER,
    307: rc.RedirectAction.TEMPORARY_REDIRECT,
    308: rc.RedirectAction.PERMANENT_REDIRECT,
}


def fault_filter() -> hcm.HttpFilter:
    """The HCM's fault filter: no settings of its own; routes carry theirs."""
    return hcm.HttpFilter(name=FAULT_FILTER, typed_config=packed(fault_pb2.HTTPFault()))


def per_million(percent: float) -> percent_pb2.FractionalPercent:
    return percent_pb2.FractionalPercent(
        numerator=round(percent * 10_000), denominator=percent_pb2.FractionalPercent.MILLION
    )


# --- match ----------------------------------------------------------------------


def _matcher(match: StringMatch, ignore_case: bool = False) -> string_pb2.StringMatcher:
    if match.kind is MatchKind.EXACT:
        return string_pb2.StringMatcher(exact=match.value, ignore_case=ignore_case)
    if match.kind is MatchKind.PREFIX:
        return string_pb2.StringMatcher(prefix=match.value, ignore_case=ignore_case)
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=match.value))


def add_match_extras(result: rc.RouteMatch, match: HttpMatch) -> None:
    """Conditions of `match` beyond uri and headers, added to `result`."""
    for name, value in ((":method", match.method), (":authority", match.authority), (":scheme", match.scheme)):
        if value is not None:
            result.headers.append(rc.HeaderMatcher(name=name, string_match=_matcher(value)))
    for name, value in match.without_headers:
        result.headers.append(rc.HeaderMatcher(name=name, string_match=_matcher(value), invert_match=True))
    for name, value in match.query:
        if value.kind is MatchKind.EXACT and not value.value:
            result.query_parameters.append(rc.QueryParameterMatcher(name=name, present_match=True))
        else:
            result.query_parameters.append(rc.QueryParameterMatcher(name=name, string_match=_matcher(value)))
    if match.ignore_uri_case:
        result.case_sensitive.CopyFrom(wrappers_pb2.BoolValue(value=False))
        if result.HasField("safe_regex") and not result.safe_regex.regex.startswith("(?i)"):
            result.safe_regex.regex = "(?i)" + result.safe_regex.regex  # case_sensitive skips regexes


# --- route action -----------------------------------------------------------------


def default_retry_policy() -> rc.RetryPolicy:
    """Istio's retry policy for routes whose VirtualService sets no `retries`."""
    return rc.RetryPolicy(
        retry_on=DEFAULT_RETRY_ON,
        num_retries=wrappers_pb2.UInt32Value(value=DEFAULT_RETRY_ATTEMPTS),
        retriable_status_codes=DEFAULT_RETRY_STATUS,
        retry_host_predicate=[
            rc.RetryPolicy.RetryHostPredicate(
                name=PREVIOUS_HOSTS, typed_config=packed(previous_hosts_pb2.PreviousHostsPredicate())
            )
        ],
        host_selection_retry_max_attempts=HOST_SELECTION_ATTEMPTS,
    )


def retry_policy(retries: Retries | None) -> rc.RetryPolicy | None:
    """The route's policy: the default one, the VirtualService's, or None (attempts 0)."""
    if retries is not None and retries.attempts <= 0:
        return None
    policy = default_retry_policy()
    if retries is None:
        return policy
    policy.num_retries.value = retries.attempts
    if retries.retry_on:
        policy.retry_on = ",".join(retries.retry_on)
        del policy.retriable_status_codes[:]
        policy.retriable_status_codes.extend(retries.status_codes)
    if retries.per_try_timeout is not None:
        policy.per_try_timeout.CopyFrom(duration(retries.per_try_timeout))
    return policy


def grpc_timeout(action: rc.RouteAction, timeout: float) -> None:
    """On routes of gRPC/HTTP2 ports: a client's grpc-timeout bounds the request, capped by the
    route timeout (0: uncapped), and the route timeout bounds the stream.

    Envoy ignores RouteAction.timeout on a route with max_stream_duration, so the stream's limit
    is repeated there; Istio uses the deprecated max_grpc_timeout instead, which Envoy 1.40
    refuses by default. HTTP/1.1 ports keep RouteAction.timeout alone (grpc-timeout is a gRPC,
    hence HTTP/2, header)."""
    action.max_stream_duration.max_stream_duration.CopyFrom(duration(timeout))
    action.max_stream_duration.grpc_timeout_header_max.CopyFrom(duration(timeout))


def apply_action_extras(action: rc.RouteAction, http: HttpRoute, match: HttpMatch, grpc: bool) -> None:
    """Rewrite, retries, gRPC timeout (`grpc`: the port speaks HTTP/2) of an http[] entry's
    route action (mirrors: `routes.py`)."""
    if grpc:
        grpc_timeout(action, http.timeout or 0)
    policy = retry_policy(http.retries)
    if policy is not None:
        action.retry_policy.CopyFrom(policy)
    rewrite = http.rewrite
    if rewrite is None:
        return
    if rewrite.authority:
        action.host_rewrite_literal = rewrite.authority
    if rewrite.regex:
        action.regex_rewrite.pattern.regex = rewrite.regex
        action.regex_rewrite.substitution = rewrite.substitution
    elif rewrite.uri:
        if match.uri is not None and match.uri.kind is MatchKind.REGEX:
            action.regex_rewrite.pattern.regex = match.uri.value
            action.regex_rewrite.substitution = rewrite.uri.replace("\\", "\\\\")
        else:
            action.prefix_rewrite = rewrite.uri


def mirror_policy(cluster: str, percent: float) -> rc.RouteAction.RequestMirrorPolicy:
    return rc.RouteAction.RequestMirrorPolicy(
        cluster=cluster,
        runtime_fraction=base_pb2.RuntimeFractionalPercent(default_value=per_million(percent)),
    )


# --- route --------------------------------------------------------------------------


def redirect_action(redirect: Redirect) -> rc.RedirectAction:
    action = rc.RedirectAction(response_code=_REDIRECT_CODES[redirect.code])
    if redirect.uri:
        action.path_redirect = redirect.uri
    if redirect.authority:
        action.host_redirect = redirect.authority
    if redirect.port is not None:
        action.port_redirect = redirect.port
    if redirect.scheme:
        action.scheme_redirect = redirect.scheme
    return action


def direct_response_action(response: DirectResponse) -> rc.DirectResponseAction:
    action = rc.DirectResponseAction(status=response.status)
    if response.body is not None:
        action.body.inline_string = response.body
    elif response.body_bytes is not None:
        action.body.inline_bytes = response.body_bytes
    return action


def _header_options(ops: HeaderOps) -> list[base_pb2.HeaderValueOption]:
    out = []
    for pairs, how in (
        (ops.set, base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD),
        (ops.add, base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD),
    ):
        for name, value in pairs:
            out.append(
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=name, value=value), append_action=how
                )
            )
    return out


def http_fault(fault: Fault) -> fault_pb2.HTTPFault:
    config = fault_pb2.HTTPFault()
    if fault.delay is not None:
        config.delay.CopyFrom(
            common_fault_pb2.FaultDelay(
                fixed_delay=duration(fault.delay), percentage=per_million(fault.delay_percent)
            )
        )
    if fault.aborts:
        config.abort.percentage.CopyFrom(per_million(fault.abort_percent))
        if fault.abort_grpc is not None:
            config.abort.grpc_status = fault.abort_grpc
        else:
            config.abort.http_status = fault.abort_http
    return config


def apply_route_extras(route: rc.Route, http: HttpRoute) -> None:
    """Header mutations and fault of an http[] entry on its Route."""
    route.request_headers_to_add.extend(_header_options(http.request_headers))
    route.request_headers_to_remove.extend(http.request_headers.remove)
    route.response_headers_to_add.extend(_header_options(http.response_headers))
    route.response_headers_to_remove.extend(http.response_headers.remove)
    if http.fault is not None:
        route.typed_per_filter_config[FAULT_FILTER].CopyFrom(packed(http_fault(http.fault)))
