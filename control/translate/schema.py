"""Shape checking for parsed YAML: field names, types, enums, required and one-of fields.

Owns: the small declarative vocabulary (`Obj`, `ListOf`, `MapOf`, `Str`, `Int`,
`Enum`, ...) that `specs.py` uses to describe Istio's resources, and the walk
that compares a parsed YAML value against such a description. It knows nothing
about Istio and builds no typed objects.

Strategy: `check(value, spec, path, report)` never raises. Each mismatch is
reported as `(field path, message)` and the walk carries on, so one document
yields all its mistakes. A field Istio defines but Pillion does not implement
is listed in `Obj(unsupported=...)` and reported as "not supported yet"; a
field nobody defines is "unknown field". Nothing is ignored silently. YAML
nulls are removed before checking (`strip_nulls`), as Kubernetes treats
`field: null` as unset.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Report = Callable[[str, str], None]

_SIMPLE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|us|µs|ns|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def child(path: str, key: object) -> str:
    """The path of mapping entry `key` under `path` (brackets when the key has dots)."""
    text = str(key)
    if _SIMPLE_KEY.match(text):
        return f"{path}.{text}" if path else text
    return f'{path}["{text}"]'


def item(path: str, index: int) -> str:
    return f"{path}[{index}]"


def type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


def strip_nulls(value: Any) -> Any:
    """A copy of `value` without mapping entries whose value is null."""
    if isinstance(value, dict):
        return {k: strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [strip_nulls(v) for v in value]
    return value


def parse_duration(text: str) -> float | None:
    """Seconds in a Go/Istio style duration ("10s", "1.5s", "100ms", "1m30s"); None if invalid."""
    if not text:
        return None
    position, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            return None
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    return total if position == len(text) else None


class Spec:
    """What a value must look like. Subclasses implement `check`."""

    expected = "a value"

    def check(self, value: Any, path: str, report: Report) -> None:
        raise NotImplementedError


def _wrong_type(spec: Spec, value: Any, path: str, report: Report) -> None:
    report(path, f"expected {spec.expected}, got {type_name(value)} {value!r}")


class Str(Spec):
    expected = "a string"

    def check(self, value: Any, path: str, report: Report) -> None:
        if not isinstance(value, str):
            _wrong_type(self, value, path, report)


class Bool(Spec):
    expected = "a boolean"

    def check(self, value: Any, path: str, report: Report) -> None:
        if not isinstance(value, bool):
            _wrong_type(self, value, path, report)


@dataclass(frozen=True)
class Int(Spec):
    low: int = 0
    high: int = 2**32 - 1
    expected = "an integer"

    def check(self, value: Any, path: str, report: Report) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            _wrong_type(self, value, path, report)
        elif not self.low <= value <= self.high:
            report(path, f"{value} is out of range [{self.low}, {self.high}]")


@dataclass(frozen=True)
class Number(Spec):
    low: float = 0.0
    high: float = 100.0
    expected = "a number"

    def check(self, value: Any, path: str, report: Report) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            _wrong_type(self, value, path, report)
        elif not self.low <= value <= self.high:
            report(path, f"{value} is out of range [{self.low}, {self.high}]")


@dataclass(frozen=True)
class Enum(Spec):
    """One of `supported`; a value in `unsupported` is Istio's but not implemented yet."""

    supported: tuple[str, ...]
    unsupported: tuple[str, ...] = ()
    expected = "a string"

    def check(self, value: Any, path: str, report: Report) -> None:
        if not isinstance(value, str):
            _wrong_type(self, value, path, report)
        elif value in self.unsupported:
            report(path, f"{value} is not supported yet")
        elif value not in self.supported:
            report(path, f"{value!r} is not one of {', '.join(self.supported + self.unsupported)}")


class Duration(Spec):
    expected = 'a duration string such as "10s", "1.5s" or "100ms"'

    def check(self, value: Any, path: str, report: Report) -> None:
        if not isinstance(value, str) or parse_duration(value) is None:
            _wrong_type(self, value, path, report)


@dataclass(frozen=True)
class ListOf(Spec):
    item: Spec
    expected = "a list"

    def check(self, value: Any, path: str, report: Report) -> None:
        if not isinstance(value, list):
            _wrong_type(self, value, path, report)
            return
        for index, element in enumerate(value):
            self.item.check(element, item(path, index), report)


@dataclass(frozen=True)
class MapOf(Spec):
    key: Spec
    value: Spec
    expected = "a mapping"

    def check(self, value: Any, path: str, report: Report) -> None:
        if not isinstance(value, dict):
            _wrong_type(self, value, path, report)
            return
        for key, element in value.items():
            if not isinstance(key, str):
                report(child(path, key), f"expected a string key, got {type_name(key)} {key!r}")
                continue
            self.key.check(key, child(path, key), report)
            self.value.check(element, child(path, key), report)


def port_key(key: object) -> int | None:
    """The port number a mapping key names (YAML writes 8080, JSON "8080"), or None."""
    if isinstance(key, bool):
        return None
    if isinstance(key, str) and key.isascii() and key.isdigit():
        key = int(key)
    if isinstance(key, int) and 1 <= key <= 65535:
        return key
    return None


@dataclass(frozen=True)
class PortMapOf(Spec):
    """A mapping from port numbers to `value` (such as PeerAuthentication's portLevelMtls)."""

    value: Spec
    expected = "a mapping"

    def check(self, value: Any, path: str, report: Report) -> None:
        if not isinstance(value, dict):
            _wrong_type(self, value, path, report)
            return
        for key, element in value.items():
            here = child(path, key)
            if port_key(key) is None:
                report(
                    here, f"expected a port number (1-65535) as key, got {type_name(key)} {key!r}"
                )
            else:
                self.value.check(element, here, report)


@dataclass(frozen=True)
class Obj(Spec):
    """A mapping with known field names.

    `required` fields must be present; exactly one of `one_of` must be present
    when `one_of` is given; `unsupported` fields are Istio's but not
    implemented in Pillion yet.
    """

    fields: Mapping[str, Spec]
    required: Sequence[str] = ()
    unsupported: Sequence[str] = ()
    one_of: Sequence[str] = ()
    expected = "a mapping"
    _unsupported: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_unsupported", frozenset(self.unsupported))

    def check(self, value: Any, path: str, report: Report) -> None:
        if not isinstance(value, dict):
            _wrong_type(self, value, path, report)
            return
        for key, element in value.items():
            here = child(path, key)
            if not isinstance(key, str):
                report(here, f"expected a string key, got {type_name(key)} {key!r}")
            elif key in self.fields:
                self.fields[key].check(element, here, report)
            elif key in self._unsupported:
                report(here, "not supported yet")
            else:
                report(here, "unknown field")
        for name in self.required:
            if name not in value:
                report(child(path, name), "required field is missing")
        if self.one_of:
            present = [name for name in self.one_of if name in value]
            if len(present) != 1:
                report(path, f"exactly one of {', '.join(self.one_of)} must be set")
