"""HTTP/2 frames for codec tests, built and parsed with hyperframe (independent of the proxy's codec)."""

from __future__ import annotations

from typing import Any

from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame


def frames(data: bytes) -> list[Any]:
    """Every frame in ``data``, parsed."""
    out = []
    while data:
        f, length = Frame.parse_frame_header(memoryview(data[:9]))
        f.parse_body(memoryview(data[9:9 + length]))
        out.append(f)
        data = data[9 + length:]
    return out


def hdrs(sid: int, block: bytes, end_stream: bool, end_headers: bool = True, pad: int = 0) -> bytes:
    f = HeadersFrame(sid, data=block)
    if end_headers:
        f.flags.add("END_HEADERS")
    if end_stream:
        f.flags.add("END_STREAM")
    if pad:
        f.flags.add("PADDED")
        f.pad_length = pad
    return f.serialize()


def data_frame(sid: int, data: bytes, end: bool = False, pad: int = 0) -> bytes:
    f = DataFrame(sid, data=data)
    if end:
        f.flags.add("END_STREAM")
    if pad:
        f.flags.add("PADDED")
        f.pad_length = pad
    return f.serialize()


def goaway_code(sent: bytes) -> int:
    """The error code of the one GOAWAY among the frames ``sent``."""
    gs = [f for f in frames(sent) if isinstance(f, GoAwayFrame)]
    assert len(gs) == 1
    return int(gs[0].error_code)
