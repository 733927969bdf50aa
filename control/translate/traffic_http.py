"""Builders for a VirtualService http[] entry's traffic-management fields.

Owns: the meaning beyond shape of match conditions other than uri and
headers (method, authority, scheme, queryParams, withoutHeaders,
ignoreUriCase, sourceLabels, sourceNamespace, port) and of rewrite,
redirect, directResponse, headers, mirror(s), fault and retries: which
combinations Istio allows, value ranges, names that must be known (gRPC
status codes, retry conditions), RE2 rewrite substitutions. `traffic.py`
calls it for each http[] entry; it reports through `Build` and returns plain
values from `model_traffic.py`. No xDS here (`routes_traffic.py` does that).

Decisions where Istio leaves room:
- retryOn: the Envoy conditions Pillion implements are accepted; Envoy's
  others (reset-before-request, envoy-ratelimited, retriable-headers,
  http3-post-connect-failure) are "not supported yet"; numbers are status
  codes (100-599); anything else is refused.
- retryRemoteLocalities: false (the default) is accepted; true is refused
  ("not supported yet"): Pillion's endpoints have no locality priorities.
- `attempts` unset or 0 disables retries, as in Istio; no `retries` at all
  means Istio's default policy (see `routes_traffic.py`).
- A redirect or directResponse answers locally: route, rewrite, timeout,
  retries and mirrors have nothing to act on and are refused with it;
  headers and fault still apply.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from control.translate.fields import regex
from control.translate.model import Destination, Mirror, StringMatch
from control.translate.model_traffic import (
    NO_HEADERS,
    DirectResponse,
    Fault,
    HeaderOps,
    Redirect,
    Retries,
    Rewrite,
)
from control.translate.schema import child, parse_duration

if TYPE_CHECKING:
    from control.translate.istio import Build

DestinationFn = Callable[[dict[str, Any], str], Destination | None]
StringMatchFn = Callable[[dict[str, Any], str, "Build"], StringMatch]

GRPC_CODES = {
    "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9,
    "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13, "UNAVAILABLE": 14,
    "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}  # fmt: skip
RETRY_ON = frozenset({
    "5xx", "gateway-error", "reset", "connect-failure", "refused-stream", "retriable-4xx",
    "retriable-status-codes", "cancelled", "deadline-exceeded", "resource-exhausted", "unavailable",
    "internal",
})  # fmt: skip
RETRY_ON_LATER = frozenset(
    {"reset-before-request", "envoy-ratelimited", "retriable-headers", "http3-post-connect-failure"}
)
REDIRECT_CODES = (301, 302, 303, 307, 308)
# Headers the route may not set or remove: pseudo-headers, and Host (use rewrite.authority).
_RESERVED = re.compile(r"^(:.*|host)$")
_SUBSTITUTION = re.compile(r"\\(.)?", re.DOTALL)


def match_extras(
    raw: dict[str, Any], path: str, b: Build, string_match: StringMatchFn
) -> dict[str, Any]:
    """The HttpMatch fields beyond name, uri and headers."""
    out: dict[str, Any] = {}
    for name in ("method", "authority", "scheme"):
        if name in raw:
            out[name] = string_match(raw[name], f"{path}.{name}", b)
    for key, attr in (("queryParams", "query"), ("withoutHeaders", "without_headers")):
        pairs = []
        for name, match in raw.get(key, {}).items():
            here = child(f"{path}.{key}", name)
            if not name:
                b(here, "a name is required")
            elif key == "withoutHeaders" and name != name.lower():
                b(here, "header names must be lower case")
            pairs.append((name, string_match(match, here, b)))
        out[attr] = tuple(pairs)
    out["ignore_uri_case"] = bool(raw.get("ignoreUriCase", False))
    if "sourceLabels" in raw:
        out["source_labels"] = dict(sorted(raw["sourceLabels"].items()))
    out["source_namespace"] = raw.get("sourceNamespace", "")
    out["port"] = raw.get("port")
    return out


def route_extras(
    raw: dict[str, Any], path: str, b: Build, destination: DestinationFn
) -> dict[str, Any]:
    """The HttpRoute fields beyond name, matches, destinations and timeout."""
    out: dict[str, Any] = {}
    local = [name for name in ("redirect", "directResponse") if name in raw]
    if len(local) > 1:
        b(path, "redirect and directResponse cannot both be set")
    if local:
        for name in ("route", "rewrite", "timeout", "retries", "mirror", "mirrors"):
            if name in raw:
                b(f"{path}.{name}", f"not used with {local[0]} (the request is answered locally)")
    elif "route" not in raw:
        b(f"{path}.route", "required field is missing (or set redirect or directResponse)")
    if "redirect" in raw:
        out["redirect"] = _redirect(raw["redirect"], f"{path}.redirect", b)
    if "directResponse" in raw:
        out["direct_response"] = _direct_response(raw["directResponse"], f"{path}.directResponse", b)
    if "rewrite" in raw:
        out["rewrite"] = _rewrite(raw["rewrite"], f"{path}.rewrite", b)
    headers = raw.get("headers", {})
    out["request_headers"] = _header_ops(headers.get("request"), f"{path}.headers.request", b)
    out["response_headers"] = _header_ops(headers.get("response"), f"{path}.headers.response", b)
    out["mirrors"] = _mirrors(raw, path, b, destination)
    if "fault" in raw:
        out["fault"] = _fault(raw["fault"], f"{path}.fault", b)
    if "retries" in raw:
        out["retries"] = _retries(raw["retries"], f"{path}.retries", b)
    return out


def _redirect(raw: dict[str, Any], path: str, b: Build) -> Redirect:
    code = raw.get("redirectCode", 301)
    if code not in REDIRECT_CODES:
        b(f"{path}.redirectCode", f"{code} is not a redirect code Envoy sends ({', '.join(map(str, REDIRECT_CODES))})")
    if not any(name in raw for name in ("uri", "authority", "port", "scheme")):
        b(path, "set at least one of uri, authority, port, scheme")
    uri = raw.get("uri", "")
    if "uri" in raw and not uri.startswith("/"):
        b(f"{path}.uri", "must start with /")
    return Redirect(uri, raw.get("authority", ""), raw.get("port"), raw.get("scheme", ""), code)


def _direct_response(raw: dict[str, Any], path: str, b: Build) -> DirectResponse:
    status = raw["status"]
    if not 200 <= status <= 599:
        b(f"{path}.status", f"{status} is not an HTTP status Envoy sends (200-599)")
    body = raw.get("body", {})
    data: bytes | None = None
    if "bytes" in body:
        try:
            data = base64.b64decode(body["bytes"], validate=True)
        except (binascii.Error, ValueError):
            b(f"{path}.body.bytes", "must be base64")
    return DirectResponse(status, body.get("string"), data)


def _rewrite(raw: dict[str, Any], path: str, b: Build) -> Rewrite:
    if "uri" in raw and "uriRegexRewrite" in raw:
        b(path, "uri and uriRegexRewrite cannot both be set")
    if not raw:
        b(path, "set uri, uriRegexRewrite or authority")
    if "uri" in raw and not raw["uri"]:
        b(f"{path}.uri", "must not be empty")
    if "authority" in raw and not raw["authority"]:
        b(f"{path}.authority", "must not be empty")
    pattern = substitution = ""
    if "uriRegexRewrite" in raw:
        here = f"{path}.uriRegexRewrite"
        pattern, substitution = raw["uriRegexRewrite"]["match"], raw["uriRegexRewrite"]["rewrite"]
        before = b.failed
        regex(pattern, f"{here}.match", b)
        if not pattern:
            b(f"{here}.match", "must not be empty")
        elif b.failed == before:
            _check_substitution(substitution, re.compile(pattern).groups, f"{here}.rewrite", b)
    return Rewrite(raw.get("uri", ""), raw.get("authority", ""), pattern, substitution)


def _check_substitution(text: str, groups: int, path: str, b: Build) -> None:
    """RE2's rewrite syntax: \\0 (the match) to \\9 name groups, \\\\ is a backslash; nothing else."""
    for found in _SUBSTITUTION.finditer(text):
        after = found.group(1)
        if after is not None and after.isdigit():
            if int(after) > groups:
                b(path, f"\\{after} names a group the match does not have (it has {groups})")
        elif after != "\\":
            b(path, "a backslash must be followed by a group number (\\1) or another backslash")


def _header_ops(raw: dict[str, Any] | None, path: str, b: Build) -> HeaderOps:
    if not raw:
        return NO_HEADERS

    def name_ok(name: str, here: str) -> str:
        if not name:
            b(here, "a header name is required")
        elif _RESERVED.match(name.lower()):
            b(here, f"{name} cannot be changed here (pseudo-headers and Host; use rewrite.authority)")
        return name.lower()

    set_ = tuple((name_ok(k, child(f"{path}.set", k)), v) for k, v in raw.get("set", {}).items())
    add = tuple((name_ok(k, child(f"{path}.add", k)), v) for k, v in raw.get("add", {}).items())
    remove = tuple(name_ok(k, f"{path}.remove[{i}]") for i, k in enumerate(raw.get("remove", [])))
    return HeaderOps(set_, add, remove)


def _percent(raw: dict[str, Any], name: str, legacy: tuple[str, ...], path: str, b: Build) -> float:
    """A Percent message (`name`), or one of the deprecated integer fields; unset is 100%."""
    present = [key for key in (name, *legacy) if key in raw]
    if len(present) > 1:
        b(f"{path}.{present[1]}", f"set {name} only ({', '.join(legacy)} deprecated)")
    if name in raw:
        return float(raw[name].get("value", 0.0))
    return float(raw[present[0]]) if present else 100.0


def _mirrors(raw: dict[str, Any], path: str, b: Build, destination: DestinationFn) -> tuple[Mirror, ...]:
    out: list[Mirror] = []
    legacy = ("mirrorPercent", "mirror_percent")
    if "mirror" in raw:
        if "mirrors" in raw:
            b(f"{path}.mirrors", "mirror and mirrors cannot both be set")
        percent = _percent(raw, "mirrorPercentage", legacy, path, b)
        found = destination(raw["mirror"], f"{path}.mirror")
        if found is not None and percent > 0:
            out.append(Mirror(found, percent))
    else:
        for name in ("mirrorPercentage", *legacy):
            if name in raw:
                b(f"{path}.{name}", "only used with mirror")
    for i, entry in enumerate(raw.get("mirrors", [])):
        here = f"{path}.mirrors[{i}]"
        percent = float(entry.get("percentage", {}).get("value", 100.0))
        found = destination(entry["destination"], f"{here}.destination")
        if found is not None and percent > 0:
            out.append(Mirror(found, percent))
    return tuple(out)


def _fault(raw: dict[str, Any], path: str, b: Build) -> Fault:
    if not raw:
        b(path, "set delay, abort or both")
    delay: float | None = None
    delay_percent = abort_percent = 100.0
    if "delay" in raw:
        here = f"{path}.delay"
        if "fixedDelay" not in raw["delay"]:
            b(f"{here}.fixedDelay", "required field is missing")
        else:
            delay = parse_duration(raw["delay"]["fixedDelay"])
            if not delay:
                b(f"{here}.fixedDelay", "must be positive")
        delay_percent = _percent(raw["delay"], "percentage", ("percent",), here, b)
    abort_http, abort_grpc = 0, None
    if "abort" in raw:
        here = f"{path}.abort"
        kinds = [name for name in ("httpStatus", "grpcStatus") if name in raw["abort"]]
        if len(kinds) != 1:
            b(here, "exactly one of httpStatus, grpcStatus must be set")
        if "httpStatus" in raw["abort"]:
            abort_http = raw["abort"]["httpStatus"]
            if not 200 <= abort_http <= 599:
                b(f"{here}.httpStatus", f"{abort_http} is not an HTTP status Envoy sends (200-599)")
        if "grpcStatus" in raw["abort"]:
            name = raw["abort"]["grpcStatus"]
            abort_grpc = GRPC_CODES.get(name)
            if abort_grpc is None:
                b(f"{here}.grpcStatus", f"unknown gRPC status {name!r}; one of {', '.join(GRPC_CODES)}")
        abort_percent = _percent(raw["abort"], "percentage", (), here, b)
    return Fault(delay, delay_percent, abort_http, abort_grpc, abort_percent)


def _retries(raw: dict[str, Any], path: str, b: Build) -> Retries:
    attempts = raw.get("attempts", 0)
    per_try = parse_duration(raw["perTryTimeout"]) if "perTryTimeout" in raw else None
    if per_try is not None and per_try <= 0:
        b(f"{path}.perTryTimeout", "must be positive")
    if raw.get("retryRemoteLocalities"):
        b(f"{path}.retryRemoteLocalities", "true is not supported yet (endpoints have no locality priorities)")
    conditions: list[str] = []
    codes: list[int] = []
    text = raw.get("retryOn", "")
    wrong = False
    for item in (part.strip() for part in text.split(",")) if text else ():
        if item.isdigit():
            if not 100 <= int(item) <= 599:
                b(f"{path}.retryOn", f"{item} is not an HTTP status (100-599)")
            codes.append(int(item))
        elif item in RETRY_ON:
            conditions.append(item)
        elif item in RETRY_ON_LATER:
            wrong = True
            b(f"{path}.retryOn", f"{item} is not supported yet")
        else:
            wrong = True
            b(f"{path}.retryOn", f"unknown retry condition {item!r}; one of {', '.join(sorted(RETRY_ON))} or a status code")
    if text and not conditions and not codes and not wrong:
        b(f"{path}.retryOn", "must name at least one condition")
    if codes and "retriable-status-codes" not in conditions:
        conditions.append("retriable-status-codes")
    return Retries(attempts, per_try, tuple(conditions), tuple(codes))
