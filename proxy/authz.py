"""Authorization: compiled RBAC matchers and their evaluation, as Envoy's RBAC filters decide.

Owns: what a request or a connection exposes to policies (``Attrs``), the
compiled RBAC filters (policies of matchers from ``authz_match.py``, which
``compile_rbac.py`` builds from ``envoy.config.rbac.v3``), and
``evaluate(filters, attrs)``.
Pure (STYLE.md tier 1): no I/O, no clock, no protobuf; everything here is a
frozen, picklable value built at config time.

Rules (Envoy's): a policy matches when one of its permissions and one of
its principals match. A filter's action decides: ALLOW lets through only
requests some policy matches (no policies: nothing), DENY refuses those some
policy matches, LOG never refuses (Istio's AUDIT). Filters run in order and
the first refusal wins; policies are tried in name order and the first match
is the one reported. Paths are matched without query and after dot-segment
removal and decoding of unreserved %XX (what Envoy's normalize_path gives its
filters), so "/./admin" and "/%61dmin" are "/admin" to a policy.

Strategy: ``Attrs`` converts IP addresses and normalizes the path lazily,
once per request, only when a matcher asks; a filter tries its policies in
order and stops at the first match.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy.authz_match import (
    And,
    Any_,
    Authenticated,
    AuthenticatedIn,
    Cidr,
    DestinationIp,
    DestinationPort,
    Header,
    HeaderIn,
    Matcher,
    Metadata,
    Not,
    Or,
    RemoteIp,
    ServerName,
    SourceIp,
    StringKind,
    StrMatch,
    UriTemplate,
    UrlPath,
    ValueKind,
    ValueMatch,
    any_of,
)
from proxy.jwt import JwtAuthn

__all__ = [
    "ALLOWED", "Action", "And", "Any_", "Attrs", "Authenticated", "AuthenticatedIn", "Cidr", "DestinationIp",
    "DestinationPort", "Header", "HeaderIn", "HttpPolicy", "Matcher", "Metadata", "Not", "Or", "Policy",
    "RbacFilter", "RemoteIp", "ServerName", "SourceIp", "StrMatch", "StringKind", "UriTemplate", "UrlPath",
    "ValueKind", "ValueMatch", "Verdict", "any_of", "evaluate", "normalize_path",
]


# --- what a request or a connection shows -------------------------------------------------

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789abcdefABCDEF")


def normalize_path(target: bytes) -> bytes:
    """The path of a request target without query or fragment, dot segments removed
    (RFC 3986 section 5.2.4) and percent-encoded unreserved characters decoded."""
    end = len(target)
    for sep in (b"?", b"#"):
        i = target.find(sep, 0, end)
        if i >= 0:
            end = i
    path = target[:end]
    if b"%" in path:
        out = bytearray()
        i, n = 0, len(path)
        while i < n:
            c = path[i]
            if c == 0x25 and i + 2 < n and path[i + 1] in _HEX and path[i + 2] in _HEX:
                value = int(path[i + 1 : i + 3], 16)
                if value in _UNRESERVED:
                    out.append(value)
                    i += 3
                    continue
            out.append(c)
            i += 1
        path = bytes(out)
    if b"/." not in path and not path.startswith(b"."):
        return path
    segments: list[bytes] = []
    parts = path.split(b"/")
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if part == b".":
            if last:
                segments.append(b"")
        elif part == b"..":
            if len(segments) > 1:
                segments.pop()
            if last:
                segments.append(b"")
        else:
            segments.append(part)
    result = b"/".join(segments)
    return result if result.startswith(b"/") or not path.startswith(b"/") else b"/" + result


def _ip(value: str) -> tuple[int, int] | None:
    """(version, integer) of an IP address string, or None."""
    try:
        address = ipaddress.ip_address(value.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.version, int(address)


class Attrs:
    """The attributes of one request (HTTP) or connection (TCP) that policies read.

    Header names are lowercased bytes; ``headers`` joins repeated headers with ","
    as Envoy's matchers see them. ``metadata`` is dynamic metadata by filter name
    (the jwt_authn filter's verified payloads). TCP connections leave the HTTP
    fields empty: header and path matchers then never match.
    """

    __slots__ = (
        "_dst",
        "_path",
        "_remote",
        "_src",
        "dest_ip",
        "dest_port",
        "headers",
        "host",
        "http",
        "metadata",
        "method",
        "path",
        "peer_dns",
        "peer_uris",
        "remote_ip",
        "scheme",
        "sni",
        "source_ip",
        "tls",
    )

    def __init__(
        self,
        *,
        http: bool = True,
        method: bytes = b"",
        path: bytes = b"",
        host: bytes = b"",
        headers: Mapping[bytes, bytes] | None = None,
        scheme: bytes = b"http",
        tls: bool = False,
        peer_uris: tuple[str, ...] = (),
        peer_dns: tuple[str, ...] = (),
        source_ip: str = "",
        remote_ip: str = "",
        dest_ip: str = "",
        dest_port: int = 0,
        sni: str = "",
        metadata: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.http = http
        self.method = method
        self.path = path
        self.host = host
        self.headers = headers if headers is not None else {}
        self.scheme = scheme
        self.tls = tls
        self.peer_uris = peer_uris
        self.peer_dns = peer_dns
        self.source_ip = source_ip
        self.remote_ip = remote_ip or source_ip
        self.dest_ip = dest_ip
        self.dest_port = dest_port
        self.sni = sni
        self.metadata = metadata
        self._path: bytes | None = None
        self._src: tuple[int, int] | bool | None = False
        self._remote: tuple[int, int] | bool | None = False
        self._dst: tuple[int, int] | bool | None = False

    def header(self, name: bytes) -> bytes | None:
        if name[:1] != b":":
            return self.headers.get(name) if self.http else None
        if not self.http:
            return None
        if name == b":method":
            return self.method
        if name == b":path":
            return self.path
        if name == b":authority":
            return self.headers.get(b"host") or self.host
        if name == b":scheme":
            return self.scheme
        return None

    def url_path(self) -> bytes | None:
        if not self.http:
            return None
        p = self._path
        if p is None:
            p = self._path = normalize_path(self.path)
        return p

    def source(self) -> tuple[int, int] | None:
        if self._src is False:
            self._src = _ip(self.source_ip)
        return self._src  # type: ignore[return-value]

    def remote(self) -> tuple[int, int] | None:
        if self._remote is False:
            self._remote = _ip(self.remote_ip)
        return self._remote  # type: ignore[return-value]

    def destination(self) -> tuple[int, int] | None:
        if self._dst is False:
            self._dst = _ip(self.dest_ip)
        return self._dst  # type: ignore[return-value]


# --- policies, filters and the decision -------------------------------------------------------


class Action(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    LOG = "LOG"  # Istio's AUDIT: count matches, refuse nothing


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    permissions: Matcher  # any of the policy's permissions
    principals: Matcher  # any of its principals

    def match(self, a: Attrs) -> bool:
        return self.permissions.match(a) and self.principals.match(a)


@dataclass(frozen=True, slots=True)
class RbacFilter:
    """One compiled RBAC filter; ``policies`` sorted by name (Envoy's order)."""

    action: Action
    policies: tuple[Policy, ...]

    def first_match(self, a: Attrs) -> str | None:
        for policy in self.policies:
            if policy.match(a):
                return policy.name
        return None


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of a chain of RBAC filters.

    ``policy``: the policy that allowed (an ALLOW match) or denied (a DENY
    match); "" when a request is denied because no ALLOW policy matched, or
    allowed without any. ``audited``: the first LOG (AUDIT) policy that matched.
    """

    allowed: bool
    policy: str = ""
    audited: str = ""


ALLOWED = Verdict(True)


def evaluate(filters: Sequence[RbacFilter], a: Attrs) -> Verdict:
    """Run the filters in order, as Envoy's filter chain does: the first refusal ends it."""
    allowed_by = ""
    audited = ""
    for f in filters:
        matched = f.first_match(a)
        action = f.action
        if action is Action.DENY:
            if matched is not None:
                return Verdict(False, matched, audited)
        elif action is Action.ALLOW:
            if matched is None:
                return Verdict(False, "", audited)
            allowed_by = allowed_by or matched
        elif matched is not None and not audited:
            audited = matched
    if not allowed_by and not audited:
        return ALLOWED
    return Verdict(True, allowed_by, audited)


@dataclass(frozen=True, slots=True)
class HttpPolicy:
    """What one HTTP connection manager enforces before routing: jwt_authn, then its RBAC filters."""

    jwt: JwtAuthn | None
    rbac: tuple[RbacFilter, ...]
    # Whether a policy reads the destination address (then fetched from the socket); computed once.
    needs_destination: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        needs = any(_reads_destination(p.permissions) or _reads_destination(p.principals)
                    for f in self.rbac for p in f.policies)
        object.__setattr__(self, "needs_destination", needs)


def _reads_destination(m: Matcher) -> bool:
    if isinstance(m, DestinationIp):
        return True
    if isinstance(m, And | Or):
        return any(_reads_destination(item) for item in m.items)
    if isinstance(m, Not):
        return _reads_destination(m.inner)
    return False
