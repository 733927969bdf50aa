"""The matchers of compiled RBAC policies: Envoy's permissions and principals as plain objects.

Owns: one small frozen, slotted class per Envoy rule (headers and
pseudo-headers, normalized URL paths and URI templates, destination
address and port, SNI, peer identities, source and remote IP ranges,
values in dynamic metadata such as verified JWT payloads) and the and/or/not
combinators, each with one ``match(attrs)`` method over ``authz.Attrs``.
Pure (tier 1): no I/O, no protobuf; ``compile_rbac.py`` builds them,
``authz.py`` runs them. An OR of exact values of one header or one identity
is folded into a frozenset probe (``any_of``).
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from proxy.authz import Attrs

Text = bytes | str


class Matcher(Protocol):
    def match(self, a: Attrs) -> bool: ...


# --- leaf matchers ------------------------------------------------------------------------


class StringKind(enum.Enum):
    EXACT = 1
    PREFIX = 2
    SUFFIX = 3
    CONTAINS = 4
    REGEX = 5


@dataclass(frozen=True, slots=True)
class StrMatch:
    """Envoy's StringMatcher over bytes (headers, paths) or str (identities, SNI, claims)."""

    kind: StringKind
    value: Text = b""
    regex: re.Pattern[Any] | None = None
    ignore_case: bool = False  # `value` is then lowercase already

    def match(self, v: Text) -> bool:
        if self.ignore_case:
            v = v.lower()
        kind = self.kind
        if kind is StringKind.EXACT:
            return v == self.value
        if kind is StringKind.PREFIX:
            return v.startswith(self.value)  # type: ignore[arg-type]
        if kind is StringKind.SUFFIX:
            return v.endswith(self.value)  # type: ignore[arg-type]
        if kind is StringKind.CONTAINS:
            return self.value in v  # type: ignore[operator]
        assert self.regex is not None
        return self.regex.fullmatch(v) is not None


@dataclass(frozen=True, slots=True)
class Cidr:
    version: int
    network: int
    mask: int

    @classmethod
    def parse(cls, prefix: str, length: int) -> Cidr:
        net = ipaddress.ip_network(f"{prefix}/{length}", strict=False)
        return cls(net.version, int(net.network_address), int(net.netmask))

    def contains(self, ip: tuple[int, int] | None) -> bool:
        return ip is not None and ip[0] == self.version and ip[1] & self.mask == self.network


@dataclass(frozen=True, slots=True)
class Any_:
    def match(self, a: Attrs) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class Header:
    """A header (or pseudo-header) matcher; ``string`` None means presence."""

    name: bytes
    string: StrMatch | None
    invert: bool = False
    missing_as_empty: bool = False

    def match(self, a: Attrs) -> bool:
        value = a.header(self.name)
        if value is None:
            if not self.missing_as_empty or not a.http:
                return self.invert
            value = b""
        ok = True if self.string is None else self.string.match(value)
        return ok != self.invert


@dataclass(frozen=True, slots=True)
class HeaderIn:
    """An OR of exact values of one header: one set probe."""

    name: bytes
    values: frozenset[bytes]

    def match(self, a: Attrs) -> bool:
        return a.header(self.name) in self.values


@dataclass(frozen=True, slots=True)
class UrlPath:
    string: StrMatch

    def match(self, a: Attrs) -> bool:
        path = a.url_path()
        return path is not None and self.string.match(path)


@dataclass(frozen=True, slots=True)
class UriTemplate:
    template: str
    regex: re.Pattern[bytes]

    def match(self, a: Attrs) -> bool:
        path = a.url_path()
        return path is not None and self.regex.fullmatch(path) is not None


@dataclass(frozen=True, slots=True)
class DestinationIp:
    cidr: Cidr

    def match(self, a: Attrs) -> bool:
        return self.cidr.contains(a.destination())


@dataclass(frozen=True, slots=True)
class DestinationPort:
    low: int
    high: int  # exclusive, as Envoy's Int32Range

    def match(self, a: Attrs) -> bool:
        return self.low <= a.dest_port < self.high


@dataclass(frozen=True, slots=True)
class ServerName:
    string: StrMatch

    def match(self, a: Attrs) -> bool:
        return self.string.match(a.sni)


@dataclass(frozen=True, slots=True)
class Authenticated:
    """A peer certificate whose URI SANs (else DNS SANs) match; ``string`` None: any peer certificate."""

    string: StrMatch | None

    def match(self, a: Attrs) -> bool:
        if not a.tls:
            return False
        s = self.string
        if s is None:
            return True
        names = a.peer_uris or a.peer_dns
        return any(s.match(name) for name in names)


@dataclass(frozen=True, slots=True)
class AuthenticatedIn:
    """An OR of exact peer identities: one set probe per URI SAN."""

    names: frozenset[str]

    def match(self, a: Attrs) -> bool:
        names = self.names
        return any(name in names for name in (a.peer_uris or a.peer_dns))


@dataclass(frozen=True, slots=True)
class SourceIp:
    """direct_remote_ip and source_ip: the address of the connection's peer."""

    cidr: Cidr

    def match(self, a: Attrs) -> bool:
        return self.cidr.contains(a.source())


@dataclass(frozen=True, slots=True)
class RemoteIp:
    """remote_ip: the original client (x-forwarded-for, as the HCM trusts it), else the peer."""

    cidr: Cidr

    def match(self, a: Attrs) -> bool:
        return self.cidr.contains(a.remote())


# --- values in dynamic metadata (JWT payloads) -------------------------------------------------


class ValueKind(enum.Enum):
    STRING = 1
    PRESENT = 2
    LIST = 3  # one element matches `inner`
    BOOL = 4
    NULL = 5
    OR = 6


@dataclass(frozen=True, slots=True)
class ValueMatch:
    kind: ValueKind
    string: StrMatch | None = None
    inner: tuple[ValueMatch, ...] = ()
    flag: bool = False

    def match(self, v: Any) -> bool:
        kind = self.kind
        if kind is ValueKind.STRING:
            assert self.string is not None
            return isinstance(v, str) and self.string.match(v)
        if kind is ValueKind.PRESENT:
            return self.flag == (v is not None and not isinstance(v, dict | list))
        if kind is ValueKind.LIST:
            return isinstance(v, list) and any(self.inner[0].match(item) for item in v)
        if kind is ValueKind.BOOL:
            return isinstance(v, bool) and v is self.flag
        if kind is ValueKind.NULL:
            return v is None
        return any(m.match(v) for m in self.inner)


_ABSENT = object()


@dataclass(frozen=True, slots=True)
class Metadata:
    """A value found at ``path`` under dynamic metadata ``filter``."""

    filter: str
    path: tuple[str, ...]
    value: ValueMatch
    invert: bool = False

    def match(self, a: Attrs) -> bool:
        node: Any = (a.metadata or {}).get(self.filter, _ABSENT)
        for key in self.path:
            if not isinstance(node, dict):
                node = _ABSENT
                break
            node = node.get(key, _ABSENT)
        ok = node is not _ABSENT and self.value.match(node)
        return ok != self.invert


# --- combinators ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Not:
    inner: Matcher

    def match(self, a: Attrs) -> bool:
        return not self.inner.match(a)


@dataclass(frozen=True, slots=True)
class And:
    items: tuple[Matcher, ...]

    def match(self, a: Attrs) -> bool:
        for m in self.items:  # noqa: SIM110 (a loop: no generator per request)
            if not m.match(a):
                return False
        return True


@dataclass(frozen=True, slots=True)
class Or:
    items: tuple[Matcher, ...]

    def match(self, a: Attrs) -> bool:
        for m in self.items:  # noqa: SIM110 (a loop: no generator per request)
            if m.match(a):
                return True
        return False


def any_of(items: Sequence[Matcher]) -> Matcher:
    """An OR, folding exact matches of one header or identity into a set probe."""
    items = list(items)
    if len(items) > 1:
        headers = [(m.name, _exact(m.string)) for m in items if isinstance(m, Header) and not m.invert
                   and not m.missing_as_empty]
        if len(headers) == len(items) and len({name for name, _ in headers}) == 1:
            values = [value for _, value in headers if isinstance(value, bytes)]
            if len(values) == len(items):
                return HeaderIn(headers[0][0], frozenset(values))
        names = [_exact(m.string) for m in items if isinstance(m, Authenticated)]
        texts = [name for name in names if isinstance(name, str)]
        if len(texts) == len(items):
            return AuthenticatedIn(frozenset(texts))
    return items[0] if len(items) == 1 else Or(tuple(items))


def _exact(s: StrMatch | None) -> Text | None:
    """The value of an exact, case-sensitive matcher, else None."""
    if s is None or s.kind is not StringKind.EXACT or s.ignore_case:
        return None
    return s.value
