"""Trace context propagation: W3C traceparent and B3 (multi and single header).

Pure functions over header bytes (no I/O, no clock, no protobuf): parse an
incoming context, format the one sent upstream, make new ids from an injected
``getrandbits``, and decide sampling (parent-based, else a percentage).

Ids are kept as lowercase hex ``bytes`` (32 characters for a trace id, 16 for
a span id): that is how every header carries them, so forwarding costs no
conversion; the exporter turns them into raw bytes off the hot path.

Malformed input is never an error: a header that does not parse is ignored and
the request starts a new trace, as Envoy does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
B3 = b"b3"
B3_TRACE_ID = b"x-b3-traceid"
B3_SPAN_ID = b"x-b3-spanid"
B3_PARENT_SPAN_ID = b"x-b3-parentspanid"
B3_SAMPLED = b"x-b3-sampled"
B3_FLAGS = b"x-b3-flags"
# Incoming propagation headers the proxy rewrites (tracestate is forwarded as received).
REWRITTEN = frozenset({TRACEPARENT, B3, B3_TRACE_ID, B3_SPAN_ID, B3_PARENT_SPAN_ID, B3_SAMPLED, B3_FLAGS})

_HEX = frozenset(b"0123456789abcdef")
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16

# Which header style a context came in with (the upstream gets the same, plus traceparent).
STYLE_NONE, STYLE_W3C, STYLE_B3_MULTI, STYLE_B3_SINGLE = 0, 1, 2, 3


class Incoming:
    """A parsed incoming context. ``sampled`` is None when the sender left the decision to us."""

    __slots__ = ("sampled", "span_id", "style", "trace_id")

    def __init__(self, trace_id: bytes, span_id: bytes, sampled: bool | None, style: int) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.sampled = sampled
        self.style = style

    def __repr__(self) -> str:
        return f"Incoming({self.trace_id!r}, {self.span_id!r}, {self.sampled!r}, {self.style})"


def _is_hex(value: bytes, size: int) -> bool:
    return len(value) == size and _HEX.issuperset(value)


def parse_traceparent(value: bytes) -> Incoming | None:
    """W3C Trace Context ``version-traceid-parentid-flags``; None if malformed."""
    value = value.strip()
    if len(value) < 55 or value[2:3] != b"-" or value[35:36] != b"-" or value[52:53] != b"-":
        return None
    version = value[:2]
    if not _is_hex(version, 2) or version == b"ff":
        return None
    if version == b"00" and len(value) != 55:
        return None
    if len(value) > 55 and value[55:56] != b"-":  # a future version may append fields
        return None
    trace_id, span_id, flags = value[3:35], value[36:52], value[53:55]
    if not (_is_hex(trace_id, 32) and _is_hex(span_id, 16) and _is_hex(flags, 2)):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return Incoming(trace_id, span_id, bool(int(flags, 16) & 1), STYLE_W3C)


def format_traceparent(trace_id: bytes, span_id: bytes, sampled: bool) -> bytes:
    return b"00-" + trace_id + b"-" + span_id + (b"-01" if sampled else b"-00")


def _b3_trace_id(value: bytes) -> bytes | None:
    value = value.strip().lower()
    if len(value) == 16:
        value = b"0" * 16 + value  # 64-bit B3 ids are left-padded to 128 bits
    return value if _is_hex(value, 32) and value != _ZERO_TRACE else None


def _b3_sampled(value: bytes | None) -> bool | None:
    if value is None:
        return None
    v = value.strip().lower()
    if v in (b"1", b"true", b"d"):
        return True
    if v in (b"0", b"false"):
        return False
    return None


def parse_b3_multi(hdrs: Mapping[bytes, bytes]) -> Incoming | None:
    """``x-b3-traceid`` / ``x-b3-spanid`` / ``x-b3-sampled`` (``x-b3-flags: 1`` is debug: sampled)."""
    raw_trace = hdrs.get(B3_TRACE_ID)
    raw_span = hdrs.get(B3_SPAN_ID)
    if raw_trace is None or raw_span is None:
        return None
    trace_id = _b3_trace_id(raw_trace)
    span_id = raw_span.strip().lower()
    if trace_id is None or not _is_hex(span_id, 16) or span_id == _ZERO_SPAN:
        return None
    sampled = True if hdrs.get(B3_FLAGS, b"").strip() == b"1" else _b3_sampled(hdrs.get(B3_SAMPLED))
    return Incoming(trace_id, span_id, sampled, STYLE_B3_MULTI)


def parse_b3_single(value: bytes) -> Incoming | None:
    """``b3: {traceid}-{spanid}[-{sampling}[-{parentspanid}]]``; a bare sampling state carries no ids."""
    parts = value.strip().split(b"-")
    if len(parts) < 2 or len(parts) > 4:
        return None
    trace_id = _b3_trace_id(parts[0])
    span_id = parts[1].lower()
    if trace_id is None or not _is_hex(span_id, 16) or span_id == _ZERO_SPAN:
        return None
    sampled = None
    if len(parts) >= 3:
        sampled = _b3_sampled(parts[2])
        if sampled is None:
            return None
    if len(parts) == 4 and not _is_hex(parts[3].lower(), 16):
        return None
    return Incoming(trace_id, span_id, sampled, STYLE_B3_SINGLE)


def extract(hdrs: Mapping[bytes, bytes]) -> Incoming | None:
    """The incoming context: traceparent first, then B3 single, then B3 multi."""
    tp = hdrs.get(TRACEPARENT)
    if tp is not None:
        found = parse_traceparent(tp)
        if found is not None:
            return found
    b3 = hdrs.get(B3)
    if b3 is not None:
        found = parse_b3_single(b3)
        if found is not None:
            return found
    return parse_b3_multi(hdrs)


def b3_headers(trace_id: bytes, span_id: bytes, parent_id: bytes, sampled: bool, style: int) -> list[bytes]:
    """Header lines (``name: value\\r\\n``) for the B3 style the request came with."""
    flag = b"1" if sampled else b"0"
    if style == STYLE_B3_SINGLE:
        return [b"b3: " + trace_id + b"-" + span_id + b"-" + flag + (b"-" + parent_id if parent_id else b"") + b"\r\n"]
    lines = [b"x-b3-traceid: " + trace_id + b"\r\n", b"x-b3-spanid: " + span_id + b"\r\n",
             b"x-b3-sampled: " + flag + b"\r\n"]
    if parent_id:
        lines.append(b"x-b3-parentspanid: " + parent_id + b"\r\n")
    return lines


def new_trace_id(getrandbits: Callable[[int], int]) -> bytes:
    bits = getrandbits(128) or 1
    return b"%032x" % bits


def new_span_id(getrandbits: Callable[[int], int]) -> bytes:
    bits = getrandbits(64) or 1
    return b"%016x" % bits


def sample(parent: bool | None, percent: float, draw: float) -> bool:
    """Parent-based: the parent's decision when it made one, else ``draw`` (in [0, 1)) under ``percent``."""
    if parent is not None:
        return parent
    return draw * 100.0 < percent
