"""HTTP/2 wire pieces shared by both sides of the proxy (RFC 9113, RFC 7541), without the h2 library.

``h2wire.ServerH2`` (downstream) and ``h2wire_client.ClientH2`` (upstream)
both use: the frame and error constants, frame builders, ``H2ConnectionError``,
the HPACK dynamic table that counts its changes (``Table``), and a decoder
that memoises header blocks per table generation (``MemoDecoder``).

``FieldEncoder`` is the request-side HPACK encoder. The hpack library's
``Encoder`` costs about 1 us a field (Huffman coding, a table search per
field), and the server side avoids it by memoising whole blocks; a proxied
request cannot be memoised that way because it carries a fresh
``x-request-id`` (and trace ids) every time. So this encoder is simple on
purpose: a field already in the static or dynamic table is one index byte,
a new one is a literal (never Huffman-coded: cheaper to make, a few bytes
larger) added to the dynamic table, and fields that change per request
(``VOLATILE``) or are sensitive are never added, so they cannot push the
steady fields out. Dynamic entries are evicted oldest first, as RFC 7541
section 4.4 says; an entry's index is computed from its insertion number,
so nothing is renumbered when the table changes.
"""

from __future__ import annotations

import struct
from collections import deque

from hpack import Decoder
from hpack.table import HeaderTable

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_WINDOW = (1 << 31) - 1
DEFAULT_WINDOW = 65535
MAX_FRAME = 16384  # what we accept: we never advertise a larger SETTINGS_MAX_FRAME_SIZE

# frame types and flags
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# error codes
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 5, 6, 7, 8, 9
ENHANCE_YOUR_CALM = 11
# settings
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS, S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE = 1, 2, 3, 4, 5

HDR = struct.Struct(">HBBBI")  # length high 16, length low 8, type, flags, stream id
pack_hdr = HDR.pack
U32 = struct.Struct(">I")
SETTING = struct.Struct(">HI")
GOAWAY_BODY = struct.Struct(">II")
CACHE_MAX = 64


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return pack_hdr(n >> 8, n & 0xFF, ftype, flags, sid) + payload


def rst_frame(sid: int, code: int) -> bytes:
    return pack_hdr(0, 4, RST_STREAM, 0, sid) + U32.pack(code)


def window_frame(sid: int, n: int) -> bytes:
    return pack_hdr(0, 4, WINDOW_UPDATE, 0, sid) + U32.pack(n)


def goaway_frame(last_sid: int, code: int) -> bytes:
    return pack_hdr(0, 8, GOAWAY, 0, 0) + GOAWAY_BODY.pack(last_sid, code)


def settings_frame(settings: tuple[tuple[int, int], ...]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(SETTING.pack(k, v) for k, v in settings))


def header_frames(sid: int, block: bytes, end_stream: bool, max_frame: int) -> bytes:
    """HEADERS, plus CONTINUATIONs when ``block`` is larger than the peer's frame size."""
    flags = END_STREAM if end_stream else 0
    n = len(block)
    if n <= max_frame:
        return pack_hdr(n >> 8, n & 0xFF, HEADERS, flags | END_HEADERS, sid) + block
    out = [frame(HEADERS, flags, sid, block[:max_frame])]
    for pos in range(max_frame, n, max_frame):
        out.append(frame(CONTINUATION, END_HEADERS if pos + max_frame >= n else 0, sid, block[pos:pos + max_frame]))
    return b"".join(out)


def unpad(flags: int, payload: bytes) -> bytes | None:
    """The payload without its padding; None if the padding is invalid."""
    if not flags & PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        return None
    return payload[1:len(payload) - payload[0]]


class H2ConnectionError(Exception):
    """An HTTP/2 connection error: GOAWAY with ``code`` is queued; the connection must close."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code


class Table(HeaderTable):
    """hpack's dynamic table, counting its changes (the memo key)."""

    def __init__(self) -> None:
        super().__init__()
        self.gen = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.gen += 1
        super().add(name, value)

    @HeaderTable.maxsize.setter  # type: ignore[attr-defined,misc,untyped-decorator]
    def maxsize(self, newmax: int) -> None:
        self.gen += 1
        HeaderTable.maxsize.fset(self, newmax)  # type: ignore[attr-defined]


class MemoDecoder:
    """hpack's ``Decoder``; a block that leaves the table untouched is remembered for that table generation."""

    __slots__ = ("cache", "decoder", "table")

    def __init__(self, max_header_list_size: int = 65536) -> None:
        self.decoder = Decoder(max_header_list_size)
        self.table = self.decoder.header_table = Table()
        self.cache: dict[bytes, tuple[int, list[tuple[bytes, bytes]]]] = {}

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """The fields of ``block`` (a fresh list). Raises HPACKError."""
        gen = self.table.gen
        cache = self.cache
        hit = cache.get(block)
        if hit is not None and hit[0] == gen:
            return list(hit[1])
        headers: list[tuple[bytes, bytes]] = [(n, v) for n, v in self.decoder.decode(block, raw=True)]  # type: ignore[misc]
        if self.table.gen == gen:
            if len(cache) >= CACHE_MAX:
                cache.clear()
            cache[block] = (gen, headers)
            return list(headers)
        return headers


# ---------------------------------------------------------------------- the request-side HPACK encoder
_STATIC = HeaderTable.STATIC_TABLE
_STATIC_FIELD: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAME: dict[bytes, int] = {}
for _i, (_n, _v) in enumerate(_STATIC, 1):
    _STATIC_FIELD.setdefault((_n, _v), _i)
    _STATIC_NAME.setdefault(_n, _i)
_ONE = [bytes([0x80 | i]) for i in range(127)]  # an indexed field below 127: one byte
# Fields whose values change per request (ids, deadlines, lengths), or that are secret: never indexed.
VOLATILE = frozenset({
    b"x-request-id", b"traceparent", b"tracestate", b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid",
    b"x-b3-sampled", b"x-b3-flags", b"b3", b"grpc-timeout", b"content-length", b"x-client-trace-id",
    b"x-envoy-attempt-count", b"x-envoy-expected-rq-timeout-ms", b"date",
})
SENSITIVE = frozenset({b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"})
TABLE_MAX = 4096  # we use at most this much of the peer's table (bounded memory, both sides)


def _int(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer (RFC 7541 section 5.1), ``first`` holding the representation's high bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _str(s: bytes) -> bytes:
    n = len(s)
    return (bytes([n]) if n < 127 else _int(n, 7, 0)) + s


class FieldEncoder:
    __slots__ = ("entries", "index", "max", "pending", "seq", "size")

    def __init__(self) -> None:
        self.max = TABLE_MAX
        self.size = 0
        self.seq = 0  # insertions so far; entry number s has index 62 + (seq - 1 - s)
        self.entries: deque[tuple[tuple[bytes, bytes], int, int]] = deque()  # (field, size, number), oldest first
        # field -> its entry number in the dynamic table (>= 0), or minus its static index: one lookup a field
        self.index: dict[tuple[bytes, bytes], int] = {f: -i for f, i in _STATIC_FIELD.items()}
        self.pending: list[int] = []  # table size updates to signal at the start of the next block

    def set_max(self, peer_max: int) -> None:
        """The peer's SETTINGS_HEADER_TABLE_SIZE."""
        new = min(peer_max, TABLE_MAX)
        if new == self.max and not self.pending:
            return
        self.max = new
        self._evict(0)
        self.pending.append(new)

    def _evict(self, room: int) -> None:
        entries = self.entries
        index = self.index
        while entries and self.size + room > self.max:
            field, size, num = entries.popleft()
            self.size -= size
            if index.get(field) == num:
                del index[field]

    def encode(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        out = bytearray()
        if self.pending:
            sizes = self.pending
            for size in (min(sizes), sizes[-1]) if min(sizes) != sizes[-1] else (sizes[-1],):
                out += _int(size, 5, 0x20)
            sizes.clear()
        index = self.index
        get = index.get
        for field in headers:
            code = get(field)
            if code is not None:
                i = -code if code < 0 else 61 + self.seq - code
                out += _ONE[i] if i < 127 else _int(i, 7, 0x80)
                continue
            name, value = field
            ni = _STATIC_NAME.get(name, 0)
            size = len(name) + len(value) + 32
            if name in VOLATILE or name in SENSITIVE or size * 2 > self.max:
                out += _int(ni, 4, 0x10 if name in SENSITIVE else 0)  # never indexed / without indexing
            else:
                out += _int(ni, 6, 0x40)  # with incremental indexing
                self._evict(size)
                num = self.seq
                self.seq = num + 1
                self.entries.append((field, size, num))
                self.size += size
                index[field] = num
            if not ni:
                out += _str(name)
            out += _str(value)
        return bytes(out)
