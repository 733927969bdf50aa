"""SPIFFE identities: parse, validate and format ``spiffe://<td>/ns/<ns>/sa/<sa>``.

Owns: the ``SpiffeId`` value object and the character rules for trust domains and
path segments. Pure string work, safe on the hot path (``proxy/authz`` compares ids).

Must not: touch certificates, files, clocks or the network, or import the rest of
Pillion. Certificates carry ids; ``verify.py`` and ``ca.py`` extract and place them.

Strategy: be stricter than a URI parser, because the string is an identity and two
spellings of one identity must never both be accepted. The rules are those of the
SPIFFE ID specification (section 2), applied to the Istio workload shape:

- the scheme is exactly ``spiffe://`` (lowercase, nothing percent-encoded);
- the trust domain uses only ``[a-z0-9._-]``, is non-empty and at most 255
  characters, so there is no room for userinfo (``@``) or a port (``:``);
- the path uses only ``[A-Za-z0-9._-]`` per segment, with no empty, ``.`` or ``..``
  segment and no trailing slash, so there is no room for a query or fragment;
- the whole id is at most 2048 bytes;
- a workload id's path is exactly ``/ns/<namespace>/sa/<service-account>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from certs.errors import InvalidSpiffeId

SCHEME_PREFIX = "spiffe://"
MAX_ID_LENGTH = 2048
MAX_TRUST_DOMAIN_LENGTH = 255

_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")


def validate_trust_domain(trust_domain: str) -> str:
    """Return ``trust_domain`` unchanged if it is a valid SPIFFE trust domain name.

    Raises InvalidSpiffeId otherwise. Uppercase is rejected rather than folded, so a
    config typo surfaces instead of silently naming a second spelling of the domain.
    """
    if not isinstance(trust_domain, str):
        raise InvalidSpiffeId(f"trust domain must be a string, not {type(trust_domain).__name__}")
    if not trust_domain:
        raise InvalidSpiffeId("trust domain is empty")
    if len(trust_domain) > MAX_TRUST_DOMAIN_LENGTH:
        raise InvalidSpiffeId(f"trust domain is longer than {MAX_TRUST_DOMAIN_LENGTH} characters")
    if not _TRUST_DOMAIN_RE.fullmatch(trust_domain):
        raise InvalidSpiffeId(
            f"trust domain {trust_domain!r} may contain only lowercase letters, digits, '.', '-' and '_'"
        )
    return trust_domain


def validate_segment(segment: str, what: str) -> str:
    """Check one path segment (namespace or service account); raises InvalidSpiffeId."""
    return _validate_segment(segment, what)


def _validate_segment(segment: str, what: str) -> str:
    if not isinstance(segment, str):
        raise InvalidSpiffeId(f"{what} must be a string, not {type(segment).__name__}")
    if not segment:
        raise InvalidSpiffeId(f"{what} is empty")
    if segment in (".", ".."):
        raise InvalidSpiffeId(f"{what} must not be '.' or '..'")
    if not _SEGMENT_RE.fullmatch(segment):
        raise InvalidSpiffeId(
            f"{what} {segment!r} may contain only letters, digits, '.', '-' and '_'"
        )
    return segment


def trust_domain_id(trust_domain: str) -> str:
    """The trust domain's own SPIFFE ID, ``spiffe://<td>`` (no path); CA certs carry it."""
    return SCHEME_PREFIX + validate_trust_domain(trust_domain)


def parse_trust_domain_id(value: str) -> str:
    """Parse ``spiffe://<td>`` (a trust domain id, no path) and return the trust domain."""
    if not value.startswith(SCHEME_PREFIX):
        raise InvalidSpiffeId(f"{value!r} does not start with {SCHEME_PREFIX!r}")
    trust_domain = value[len(SCHEME_PREFIX) :]
    if "/" in trust_domain:
        raise InvalidSpiffeId(f"{value!r} has a path; a trust domain id has none")
    return validate_trust_domain(trust_domain)


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A workload identity ``spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>``.

    Construction validates every field, so an instance is always well formed and
    ``SpiffeId.parse(str(x)) == x`` holds for every ``x``.
    """

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        _validate_segment(self.namespace, "namespace")
        _validate_segment(self.service_account, "service account")
        if len(str(self).encode()) > MAX_ID_LENGTH:
            raise InvalidSpiffeId(f"SPIFFE ID is longer than {MAX_ID_LENGTH} bytes")

    @classmethod
    def parse(cls, value: str) -> SpiffeId:
        """Parse a workload SPIFFE ID; raise InvalidSpiffeId naming the first problem."""
        if not isinstance(value, str):
            raise InvalidSpiffeId(f"SPIFFE ID must be a string, not {type(value).__name__}")
        if len(value.encode()) > MAX_ID_LENGTH:
            raise InvalidSpiffeId(f"SPIFFE ID is longer than {MAX_ID_LENGTH} bytes")
        if not value.startswith(SCHEME_PREFIX):
            raise InvalidSpiffeId(f"{value!r} does not start with {SCHEME_PREFIX!r}")
        rest = value[len(SCHEME_PREFIX) :]
        trust_domain, slash, path = rest.partition("/")
        validate_trust_domain(trust_domain)
        if not slash:
            raise InvalidSpiffeId(f"{value!r} is a trust domain id, not a workload identity")
        segments = path.split("/")
        for index, segment in enumerate(segments):
            _validate_segment(segment, f"path segment {index + 1}")
        if len(segments) != 4 or segments[0] != "ns" or segments[2] != "sa":
            raise InvalidSpiffeId(
                f"{value!r}: path must be exactly /ns/<namespace>/sa/<service-account>"
            )
        return cls(trust_domain, segments[1], segments[3])

    @property
    def trust_domain_id(self) -> str:
        """``spiffe://<trust_domain>``: the id of the domain this workload belongs to."""
        return SCHEME_PREFIX + self.trust_domain

    def __str__(self) -> str:
        return (
            f"{SCHEME_PREFIX}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"
        )


__all__ = [
    "MAX_ID_LENGTH",
    "SCHEME_PREFIX",
    "SpiffeId",
    "parse_trust_domain_id",
    "trust_domain_id",
    "validate_trust_domain",
]
