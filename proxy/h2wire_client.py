"""The client side of an HTTP/2 connection, framing and state only (RFC 9113), without the h2 library.

``ClientH2`` is what ``upstream_h2conn.H2UpstreamConnection`` feeds an
upstream's bytes to, and what it asks to frame requests. It replaced the h2
library's ``H2Connection`` for the reasons ``h2wire`` gives for the server
side: h2's frame objects, event objects and per-stream state machines cost
more than 100 us of a proxied gRPC call in-process (``benchmarks/micro_h2``).

What the upstream side needs: we open the streams (odd ids, rising in the
order HEADERS go out), the server only answers them (push is disabled in our
SETTINGS, so PUSH_PROMISE is a connection error). Per stream we keep its two
windows, two "ended" flags and whether the final response head came (a
second HEADERS is the trailers; 1xx heads are skipped). The server's
SETTINGS are honoured: MAX_CONCURRENT_STREAMS (reported to the handler,
which limits what it opens), INITIAL_WINDOW_SIZE (applied to open streams),
MAX_FRAME_SIZE (our outbound frames) and HEADER_TABLE_SIZE (our encoder's
table, at most 4 KiB). Requests are HPACK-encoded by ``h2frames.FieldEncoder``
(per-request ids never enter the table), responses decoded by hpack with
blocks memoised per table generation. DATA is handed back in batches: a
WINDOW_UPDATE goes out once half a window is owed, and only for what the
caller acknowledges (``acknowledge_received_data``), i.e. what it forwarded.

Errors: a connection error raises ``H2ConnectionError`` after queueing GOAWAY;
a stream error queues RST_STREAM and calls ``on_reset(sid, code, False)``. A
GOAWAY from the server is reported with its last stream id; the streams above
it are dropped here (never processed: the handler retries them), and no new
stream may be opened (``can_open``). The connection core both sides share
is ``h2endpoint.H2Endpoint``; this module adds only the client's part.
"""

from __future__ import annotations

from typing import Protocol

from hpack import HPACKError

from proxy.h2endpoint import H2Endpoint, H2Stream
from proxy.h2frames import COMPRESSION_ERROR as _COMPRESSION_ERROR
from proxy.h2frames import (
    END_STREAM,
    PREFACE,
    PROTOCOL_ERROR,
    S_ENABLE_PUSH,
    S_HEADER_TABLE_SIZE,
    S_INITIAL_WINDOW_SIZE,
    STREAM_CLOSED,
    FieldEncoder,
    goaway_frame,
    header_frames,
    rst_frame,
    settings_frame,
)

MAX_SID = (1 << 31) - 1


class ClientHandler(Protocol):
    def on_response(self, sid: int, status: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None: ...
    def on_data(self, sid: int, data: bytes, flow_len: int) -> None: ...
    def on_trailers(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None: ...
    def on_end(self, sid: int) -> None: ...
    def on_reset(self, sid: int, code: int, remote: bool) -> None: ...
    def on_window(self, sid: int) -> None: ...
    def on_settings(self, max_concurrent: int | None, window_changed: bool) -> None: ...
    def on_goaway(self, last_sid: int, code: int) -> None: ...


class ClientH2(H2Endpoint):
    __slots__ = ("encoder", "goaway_last", "max_concurrent", "next_sid")
    PREFACE_ERROR = "the server preface must start with SETTINGS"
    PUSH_PROMISE_ERROR = "PUSH_PROMISE though SETTINGS_ENABLE_PUSH is 0"
    handler: ClientHandler

    def __init__(self, handler: ClientHandler, stream_window: int, conn_window: int) -> None:
        super().__init__(handler, stream_window, conn_window, stream_window, 65536, expect_magic=False)
        self.max_concurrent: int | None = None  # the server's SETTINGS_MAX_CONCURRENT_STREAMS (None: unlimited)
        self.next_sid = 1
        self.goaway_last: int | None = None
        self.encoder = FieldEncoder()

    # ------------------------------------------------------------------ output
    def initiate(self) -> None:
        """The connection preface: the magic, our SETTINGS, the connection window we want."""
        self._out += (PREFACE, settings_frame(((S_ENABLE_PUSH, 0), (S_INITIAL_WINDOW_SIZE, self.stream_window))))
        self._open_window()

    def can_open(self) -> bool:
        return not self.dead and self.goaway_last is None and self.next_sid < MAX_SID

    def send_headers(self, headers: list[tuple[bytes, bytes]], end_stream: bool) -> int:
        """Open a stream with a request head; its id (0 if no stream can be opened)."""
        if not self.can_open():
            return 0
        sid = self.next_sid
        self.next_sid = sid + 2
        st = self.streams[sid] = H2Stream(self.peer_initial_window, self.recv_initial)
        self._out.append(header_frames(sid, self.encoder.encode(headers), end_stream, self.max_frame))
        if end_stream:
            st.local_closed = True
        return sid

    def send_trailers(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        """A request's trailers: a HEADERS block that ends the stream (after all its DATA)."""
        st = self.streams.get(sid)
        if st is None or st.local_closed:
            return
        self._out.append(header_frames(sid, self.encoder.encode(headers), True, self.max_frame))
        self._local_end(sid, st)

    def reset_stream(self, sid: int, code: int) -> None:
        if self.streams.pop(sid, None) is not None and not self.dead:
            self._out.append(rst_frame(sid, code))

    def done(self, sid: int) -> bool:
        """True if the stream is fully closed (or gone); False if a side is still open."""
        return sid not in self.streams

    def close_connection(self, code: int) -> None:
        if not self.dead:
            self._out.append(goaway_frame(0, code))  # the server opens no streams: none processed
            self.dead = True

    # ------------------------------------------------------------------ the client's part of the input
    def _idle(self, sid: int, what: str) -> None:
        if sid >= self.next_sid or not sid & 1:
            self._fail(PROTOCOL_ERROR, "a frame on a stream we never opened")

    def _unknown_stream_data(self, sid: int) -> None:
        self._idle(sid, "DATA")  # else a stream we reset or forgot: its DATA is ignored

    def _stream_error(self, sid: int, code: int) -> None:
        self._out.append(rst_frame(sid, code))
        if self.streams.pop(sid, None) is not None:
            self.handler.on_reset(sid, code, False)

    def _peer_reset(self, sid: int, code: int) -> None:
        if self.streams.pop(sid, None) is not None:
            self.handler.on_reset(sid, code, True)

    def _priority(self, sid: int, payload: bytes) -> None:
        pass  # ignored (RFC 9113 section 5.3.2)

    def _goaway(self, last_sid: int, code: int) -> None:
        prev = self.goaway_last
        self.goaway_last = last_sid if prev is None else min(prev, last_sid)
        for s in [s for s in self.streams if s > last_sid]:
            del self.streams[s]  # never processed by the server (the handler retries them)
        self.handler.on_goaway(last_sid, code)

    def _setting(self, key: int, value: int) -> None:
        if key == S_HEADER_TABLE_SIZE:
            self.encoder.set_max(value)
        elif key == S_ENABLE_PUSH and value != 0:
            self._fail(PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH from a server")

    def _settings_done(self, max_concurrent: int | None, window_changed: bool) -> None:
        if max_concurrent is not None:
            self.max_concurrent = max_concurrent
        self.handler.on_settings(max_concurrent, window_changed)

    def _header_block(self, sid: int, flags: int, block: bytes) -> None:
        try:
            headers = self.decoder.decode(block)  # always: the HPACK state must follow every block
        except HPACKError as e:
            self._fail(_COMPRESSION_ERROR, f"header block: {e}")
        self._idle(sid, "HEADERS")
        st = self.streams.get(sid)
        if st is None:
            return  # a stream we reset or forgot
        ended = bool(flags & END_STREAM)
        if st.remote_closed:
            self._stream_error(sid, STREAM_CLOSED)
            return
        if st.final:  # trailers
            if not ended:
                self._stream_error(sid, PROTOCOL_ERROR)  # a second HEADERS must end the stream
                return
            self.handler.on_trailers(sid, headers)
            self._remote_end(sid, st)
            return
        status = 0
        regular: list[tuple[bytes, bytes]] = []
        for name, value in headers:
            if name[:1] == b":":
                if name != b":status" or status or regular or not value.isdigit() or len(value) != 3:
                    status = -1
                    break
                status = int(value)
            else:
                regular.append((name, value))
        if status < 100:
            self._stream_error(sid, PROTOCOL_ERROR)  # malformed (RFC 9113 section 8.1.1)
            return
        if status < 200:
            if ended:
                self._stream_error(sid, PROTOCOL_ERROR)
            return  # an interim response: skipped
        st.final = True
        self.handler.on_response(sid, status, regular, ended)
        if ended:
            self._remote_end(sid, st)
