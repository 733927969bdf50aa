"""The server side of an HTTP/2 connection, framing and state only (RFC 9113), without the h2 library.

``ServerH2`` is what ``h2conn.H2ServerConnection`` feeds bytes to. It was the
h2 library's ``H2Connection``; profiling (``benchmarks/micro_h2.py``) showed
that its per-frame objects, per-event objects and per-stream state machines
cost about 60 us of the 87 us a proxied GET took in-process, several times
the rest of the proxy. The downstream side needs much less: requests only
come from the client (odd stream ids, no push), the proxy validates request
headers itself (``stream_h2``), and responses are written by one owner that
already respects the windows. So this module parses frames with ``struct``
from one buffer, calls the connection's handlers directly (no event
objects), keeps per stream only its windows and two "ended" flags, and
builds frames as bytes. HPACK is the ``hpack`` library's; blocks that leave
its dynamic table untouched are memoised (a steady client re-sends the same
fully-indexed block, a proxy the same response fields), keyed by a
generation counter bumped on every table change, so a hit is always exactly
what a decode or encode would return.

Errors follow RFC 9113: a connection error raises ``H2ConnectionError`` after
queueing GOAWAY (the caller writes it and closes); a stream error queues
RST_STREAM and tells the handler the stream is gone. Frames for streams
that are already closed are stream errors (STREAM_CLOSED) or ignored, as
section 5.1 allows, and their DATA still counts against, and is handed back
to, the connection window. The connection core both sides share (the frame
loop, flow control, SETTINGS, PING, WINDOW_UPDATE, HEADERS/CONTINUATION
assembly) is ``h2endpoint.H2Endpoint``, the frame pieces are in
``h2frames``; the upstream (client) side is ``h2wire_client``.
"""

from __future__ import annotations

from typing import Protocol

from hpack import Encoder, HPACKError

from proxy.h2endpoint import SELF_DEP, H2Endpoint, H2Stream
from proxy.h2frames import (
    CANCEL,
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    HEADERS,
    INTERNAL_ERROR,
    NO_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    S_ENABLE_PUSH,
    S_HEADER_TABLE_SIZE,
    S_INITIAL_WINDOW_SIZE,
    S_MAX_CONCURRENT_STREAMS,
    STREAM_CLOSED,
    H2ConnectionError,
    Table,
    frame,
    goaway_frame,
    rst_frame,
    settings_frame,
    window_frame,
)
from proxy.h2frames import U32 as _U32
from proxy.h2frames import pack_hdr as _pack_hdr

__all__ = [  # the names h2conn and the tests use from here
    "CANCEL", "COMPRESSION_ERROR", "ENHANCE_YOUR_CALM", "FLOW_CONTROL_ERROR", "FRAME_SIZE_ERROR", "INTERNAL_ERROR",
    "NO_ERROR", "PROTOCOL_ERROR", "REFUSED_STREAM", "STREAM_CLOSED", "H2ConnectionError", "ServerH2",
    "goaway_frame", "rst_frame", "window_frame",
]
_CACHE_MAX = 64


class Handler(Protocol):
    def on_request(self, sid: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None: ...
    def on_data(self, sid: int, data: bytes, flow_len: int) -> None: ...
    def on_trailers(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None: ...
    def on_end(self, sid: int) -> None: ...
    def on_reset(self, sid: int, remote: bool) -> None: ...
    def on_window(self, sid: int) -> None: ...
    def on_settings(self, window_changed: bool) -> None: ...
    def on_goaway(self, last_sid: int, code: int) -> None: ...


class ServerH2(H2Endpoint):
    __slots__ = ("_enc_cache", "encoder", "last_sid", "max_concurrent")
    PREFACE_ERROR = "the client preface must start with SETTINGS"
    PUSH_PROMISE_ERROR = "PUSH_PROMISE from a client"
    HEADERS_SIDS = 1  # the client opens odd streams
    HEADERS_SID_ERROR = "HEADERS on stream 0 or an even stream"
    handler: Handler

    def __init__(self, handler: Handler, max_concurrent: int, stream_window: int, conn_window: int,
                 max_header_list_size: int) -> None:
        # a new stream's receive window: the larger one until the client acknowledges our SETTINGS
        super().__init__(handler, stream_window, conn_window, max(stream_window, DEFAULT_WINDOW),
                         max_header_list_size, expect_magic=True)
        self.max_concurrent = max_concurrent
        self.last_sid = 0
        self.encoder = Encoder()
        self.encoder.header_table = Table()
        self._enc_cache: dict[tuple[tuple[bytes, bytes], ...], tuple[int, bytes]] = {}

    # ------------------------------------------------------------------ output
    def initiate(self) -> None:
        self._out.append(settings_frame((
            (S_ENABLE_PUSH, 0), (S_MAX_CONCURRENT_STREAMS, self.max_concurrent),
            (S_INITIAL_WINDOW_SIZE, self.stream_window))))
        self._open_window()

    def encode(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        enc = self.encoder
        table = enc.header_table
        key = tuple(headers)
        cache = self._enc_cache
        hit = cache.get(key)
        gen = table.gen  # type: ignore[attr-defined]
        if hit is not None and hit[0] == gen and not enc.table_size_changes:
            return hit[1]
        sized = bool(enc.table_size_changes)
        block = enc.encode(headers)
        if table.gen == gen and not sized:  # type: ignore[attr-defined]
            if len(cache) >= _CACHE_MAX:
                cache.clear()
            cache[key] = (gen, block)
        return block

    def send_headers(self, sid: int, headers: list[tuple[bytes, bytes]], end_stream: bool = False) -> None:
        """HEADERS (and CONTINUATIONs) on an open stream; nothing on a closed or reset one."""
        st = self.streams.get(sid)
        if st is None or st.local_closed:
            return
        block = self.encode(headers)
        out = self._out
        flags = END_STREAM if end_stream else 0
        size = self.max_frame
        n = len(block)
        if n <= size:
            out.append(_pack_hdr(n >> 8, n & 0xFF, HEADERS, flags | END_HEADERS, sid) + block)
        else:
            out.append(frame(HEADERS, flags, sid, block[:size]))
            for pos in range(size, n, size):
                last = pos + size >= n
                out.append(frame(CONTINUATION, END_HEADERS if last else 0, sid, block[pos:pos + size]))
        if end_stream:
            self._local_end(sid, st)

    def end_stream(self, sid: int) -> None:
        st = self.streams.get(sid)
        if st is None or st.local_closed:
            return
        self._out.append(_pack_hdr(0, 0, DATA, END_STREAM, sid))
        self._local_end(sid, st)

    local_flow_control_window = H2Endpoint.window

    def reset_stream(self, sid: int, code: int) -> None:
        if self.streams.pop(sid, None) is not None:
            self._out.append(rst_frame(sid, code))

    def close_connection(self, code: int, last_sid: int | None = None) -> None:
        self._out.append(goaway_frame(self.last_sid if last_sid is None else last_sid, code))
        self.dead = True

    # ------------------------------------------------------------------ the server's part of the input
    def _stream_error(self, sid: int, code: int) -> None:
        self._out.append(rst_frame(sid, code))
        if self.streams.pop(sid, None) is not None:
            self.handler.on_reset(sid, False)

    def _idle(self, sid: int, what: str) -> None:
        if sid > self.last_sid:
            self._fail(PROTOCOL_ERROR, f"{what} on an idle stream")

    def _unknown_stream_data(self, sid: int) -> None:
        self._idle(sid, "DATA")
        self._stream_error(sid, STREAM_CLOSED)

    def _peer_reset(self, sid: int, code: int) -> None:
        self.streams.pop(sid, None)
        self.handler.on_reset(sid, True)

    def _priority(self, sid: int, payload: bytes) -> None:
        if not sid:
            self._fail(PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            self._stream_error(sid, FRAME_SIZE_ERROR)
        elif _U32.unpack_from(payload)[0] & 0x7FFFFFFF == sid:
            self._stream_error(sid, PROTOCOL_ERROR)

    def _goaway(self, last_sid: int, code: int) -> None:
        self.handler.on_goaway(last_sid, code)

    def _setting(self, key: int, value: int) -> None:
        if key == S_HEADER_TABLE_SIZE:
            self.encoder.header_table_size = min(value, 4096)  # we may use less than offered: bounded memory
        elif key == S_ENABLE_PUSH and value > 1:
            self._fail(PROTOCOL_ERROR, "invalid SETTINGS_ENABLE_PUSH")

    def _settings_done(self, max_concurrent: int | None, window_changed: bool) -> None:
        self.handler.on_settings(window_changed)

    def _header_block(self, sid: int, flags: int, block: bytes) -> None:
        try:
            headers = self.decoder.decode(block)  # always: the HPACK state must follow every block
        except HPACKError as e:
            self._fail(COMPRESSION_ERROR, f"header block: {e}")
        ended = bool(flags & END_STREAM)
        if flags & SELF_DEP:  # a stream depending on itself: a stream error (RFC 9113 section 5.3.1)
            self.last_sid = max(self.last_sid, sid)
            self._stream_error(sid, PROTOCOL_ERROR)
            return
        st = self.streams.get(sid)
        if st is not None:  # trailers
            if st.remote_closed:
                self._stream_error(sid, STREAM_CLOSED)
            elif not ended:
                self._stream_error(sid, PROTOCOL_ERROR)  # a second HEADERS must end the stream
            else:
                self.handler.on_trailers(sid, headers)
                self._remote_end(sid, st)
            return
        if sid <= self.last_sid:
            self._stream_error(sid, STREAM_CLOSED)
            return
        self.last_sid = sid
        if len(self.streams) >= self.max_concurrent:
            self._out.append(rst_frame(sid, REFUSED_STREAM))
            return
        st = self.streams[sid] = H2Stream(self.peer_initial_window, self.recv_initial, True)
        if ended:
            st.remote_closed = True
        self.handler.on_request(sid, headers, ended)
        if ended:
            self.handler.on_end(sid)
