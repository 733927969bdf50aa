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
stream may be opened (``can_open``).
"""

from __future__ import annotations

from typing import NoReturn, Protocol

from hpack import HPACKError

from proxy.h2frames import (
    ACK,
    CONTINUATION,
    DATA,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    GOAWAY_BODY,
    HDR,
    HEADERS,
    MAX_FRAME,
    MAX_WINDOW,
    PING,
    PREFACE,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    RST_STREAM,
    S_ENABLE_PUSH,
    S_HEADER_TABLE_SIZE,
    S_INITIAL_WINDOW_SIZE,
    S_MAX_CONCURRENT_STREAMS,
    S_MAX_FRAME_SIZE,
    SETTING,
    SETTINGS,
    STREAM_CLOSED,
    U32,
    WINDOW_UPDATE,
    FieldEncoder,
    H2ConnectionError,
    MemoDecoder,
    frame,
    goaway_frame,
    header_frames,
    pack_hdr,
    rst_frame,
    settings_frame,
    unpad,
    window_frame,
)
from proxy.h2frames import COMPRESSION_ERROR as _COMPRESSION_ERROR

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


class ClientStream:
    __slots__ = ("final", "local_closed", "recv_unacked", "recv_window", "remote_closed", "send_window")

    def __init__(self, send_window: int, recv_window: int) -> None:
        self.send_window = send_window
        self.recv_window = recv_window
        self.recv_unacked = 0
        self.remote_closed = False
        self.local_closed = False
        self.final = False  # the final (non-1xx) response head came: a later HEADERS is the trailers


class ClientH2:
    __slots__ = (
        "_buf", "_cont", "_out", "_settings_seen", "dead", "decoder", "encoder", "goaway_last", "handler",
        "max_concurrent", "max_frame", "next_sid", "peer_initial_window", "recv_unacked", "recv_window",
        "recv_window_max", "send_window", "stream_window", "streams",
    )

    def __init__(self, handler: ClientHandler, stream_window: int, conn_window: int) -> None:
        self.handler = handler
        self.stream_window = stream_window  # the SETTINGS_INITIAL_WINDOW_SIZE we advertise
        self.recv_window_max = max(conn_window, DEFAULT_WINDOW)
        self.recv_window = DEFAULT_WINDOW
        self.recv_unacked = 0
        self.send_window = DEFAULT_WINDOW
        self.peer_initial_window = DEFAULT_WINDOW
        self.max_frame = MAX_FRAME  # the server's SETTINGS_MAX_FRAME_SIZE: our outbound frame limit
        self.max_concurrent: int | None = None  # the server's SETTINGS_MAX_CONCURRENT_STREAMS (None: unlimited)
        self.streams: dict[int, ClientStream] = {}
        self.next_sid = 1
        self.goaway_last: int | None = None
        self.dead = False
        self.encoder = FieldEncoder()
        self.decoder = MemoDecoder()
        self._buf = b""
        self._settings_seen = False
        self._cont: tuple[int, int, list[bytes], int] | None = None  # sid, flags, fragments, size
        self._out: list[bytes | memoryview] = []

    # ------------------------------------------------------------------ output
    def initiate(self) -> None:
        """The connection preface: the magic, our SETTINGS, the connection window we want."""
        self._out += (PREFACE, settings_frame(((S_ENABLE_PUSH, 0), (S_INITIAL_WINDOW_SIZE, self.stream_window))))
        extra = self.recv_window_max - DEFAULT_WINDOW
        if extra > 0:
            self.recv_window += extra
            self._out.append(window_frame(0, extra))

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = b"".join(out)
        out.clear()
        return data

    def can_open(self) -> bool:
        return not self.dead and self.goaway_last is None and self.next_sid < MAX_SID

    def send_headers(self, headers: list[tuple[bytes, bytes]], end_stream: bool) -> int:
        """Open a stream with a request head; its id (0 if no stream can be opened)."""
        if not self.can_open():
            return 0
        sid = self.next_sid
        self.next_sid = sid + 2
        st = self.streams[sid] = ClientStream(self.peer_initial_window, self.stream_window)
        self._out.append(header_frames(sid, self.encoder.encode(headers), end_stream, self.max_frame))
        if end_stream:
            st.local_closed = True
        return sid

    def send_data(self, sid: int, data: bytes | memoryview, end_stream: bool = False) -> None:
        """``data`` must fit the windows and the frame size (``window``, ``max_frame``)."""
        st = self.streams.get(sid)
        if st is None or st.local_closed:
            return
        n = len(data)
        self.send_window -= n
        st.send_window -= n
        self._out += (pack_hdr(n >> 8, n & 0xFF, DATA, END_STREAM if end_stream else 0, sid), data)
        if end_stream:
            self._local_end(sid, st)

    def _local_end(self, sid: int, st: ClientStream) -> None:
        if st.remote_closed:
            del self.streams[sid]
        else:
            st.local_closed = True

    def reset_stream(self, sid: int, code: int) -> None:
        if self.streams.pop(sid, None) is not None and not self.dead:
            self._out.append(rst_frame(sid, code))

    def wants_write(self) -> bool:
        return bool(self._out)

    def done(self, sid: int) -> bool:
        """True if the stream is fully closed (or gone); False if a side is still open."""
        return sid not in self.streams

    def window(self, sid: int) -> int:
        """What may be sent on ``sid`` now (the smaller of its window and the connection's)."""
        st = self.streams.get(sid)
        if st is None:
            return 0
        w = st.send_window
        return w if w < self.send_window else self.send_window

    def acknowledge_received_data(self, n: int, sid: int) -> None:
        """Hand ``n`` flow-controlled bytes back: WINDOW_UPDATEs once half a window is owed (batched)."""
        if not n or self.dead:
            return
        self.recv_unacked += n
        if self.recv_unacked * 2 >= self.recv_window_max or self.recv_window <= 0:
            self._out.append(window_frame(0, self.recv_unacked))
            self.recv_window += self.recv_unacked
            self.recv_unacked = 0
        st = self.streams.get(sid)
        if st is not None and not st.remote_closed:
            st.recv_unacked += n
            if st.recv_unacked * 2 >= self.stream_window or st.recv_window <= 0:
                self._out.append(window_frame(sid, st.recv_unacked))
                st.recv_window += st.recv_unacked
                st.recv_unacked = 0

    def close_connection(self, code: int) -> None:
        if not self.dead:
            self._out.append(goaway_frame(0, code))  # the server opens no streams: none processed
            self.dead = True

    # ------------------------------------------------------------------ input
    def receive_data(self, data: bytes) -> None:
        """Parse and dispatch every complete frame. Raises H2ConnectionError (GOAWAY queued)."""
        if self.dead:
            return
        buf = self._buf + data if self._buf else data
        pos = 0
        end = len(buf)
        unpack = HDR.unpack_from
        try:
            while end - pos >= 9:
                hi, lo, ftype, flags, sid = unpack(buf, pos)
                length = (hi << 8) | lo
                if length > MAX_FRAME:
                    self._fail(FRAME_SIZE_ERROR, "frame larger than SETTINGS_MAX_FRAME_SIZE")
                if end - pos - 9 < length:
                    break
                sid &= 0x7FFFFFFF
                payload = buf[pos + 9:pos + 9 + length]
                pos += 9 + length
                self._frame(ftype, flags, sid, payload)
                if self.dead:
                    return
        finally:
            self._buf = buf[pos:] if pos < end else b""

    def _fail(self, code: int, msg: str) -> NoReturn:
        self.close_connection(code)
        raise H2ConnectionError(code, msg)

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if not self._settings_seen:
            if ftype != SETTINGS or flags & ACK:
                self._fail(PROTOCOL_ERROR, "the server preface must start with SETTINGS")
            self._settings_seen = True
        if self._cont is not None:
            if ftype != CONTINUATION or sid != self._cont[0]:
                self._fail(PROTOCOL_ERROR, "expected CONTINUATION")
            self._continuation(flags, payload)
        elif ftype == DATA:
            self._data(flags, sid, payload)
        elif ftype == HEADERS:
            self._headers(flags, sid, payload)
        elif ftype == WINDOW_UPDATE:
            self._window_update(sid, payload)
        elif ftype == SETTINGS:
            self._settings(flags, sid, payload)
        elif ftype == RST_STREAM:
            if not sid:
                self._fail(PROTOCOL_ERROR, "RST_STREAM on stream 0")
            if len(payload) != 4:
                self._fail(FRAME_SIZE_ERROR, "RST_STREAM of the wrong size")
            self._idle_check(sid)
            if self.streams.pop(sid, None) is not None:
                self.handler.on_reset(sid, U32.unpack(payload)[0], True)
        elif ftype == PING:
            if sid:
                self._fail(PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                self._fail(FRAME_SIZE_ERROR, "PING of the wrong size")
            if not flags & ACK:
                self._out.append(frame(PING, ACK, 0, payload))
        elif ftype == GOAWAY:
            if sid:
                self._fail(PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                self._fail(FRAME_SIZE_ERROR, "GOAWAY too short")
            last, code = GOAWAY_BODY.unpack_from(payload)
            last &= 0x7FFFFFFF
            prev = self.goaway_last
            self.goaway_last = last if prev is None else min(prev, last)
            for s in [s for s in self.streams if s > last]:
                del self.streams[s]  # never processed by the server (the handler retries them)
            self.handler.on_goaway(last, code)
        elif ftype == PUSH_PROMISE:
            self._fail(PROTOCOL_ERROR, "PUSH_PROMISE though SETTINGS_ENABLE_PUSH is 0")
        elif ftype == CONTINUATION:
            self._fail(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        # PRIORITY and unknown types: ignored (RFC 9113 sections 5.3.2 and 4.1)

    def _idle_check(self, sid: int) -> None:
        if sid >= self.next_sid or not sid & 1:
            self._fail(PROTOCOL_ERROR, "a frame on a stream we never opened")

    def _stream_error(self, sid: int, code: int) -> None:
        self._out.append(rst_frame(sid, code))
        if self.streams.pop(sid, None) is not None:
            self.handler.on_reset(sid, code, False)

    def _data(self, flags: int, sid: int, payload: bytes) -> None:
        if not sid:
            self._fail(PROTOCOL_ERROR, "DATA on stream 0")
        n = len(payload)
        self.recv_window -= n
        if self.recv_window < 0:
            self._fail(FLOW_CONTROL_ERROR, "connection window exceeded")
        st = self.streams.get(sid)
        if st is None or st.remote_closed or not st.final:
            if st is None:
                self._idle_check(sid)  # else a stream we reset or forgot: its DATA is ignored
            else:
                self._stream_error(sid, PROTOCOL_ERROR if not st.final and not st.remote_closed
                                   else STREAM_CLOSED)
            self.acknowledge_received_data(n, sid)  # nobody reads it: the connection window comes back now
            return
        data = unpad(flags, payload)
        if data is None:
            self._fail(PROTOCOL_ERROR, "invalid padding")
        st.recv_window -= n
        if st.recv_window < 0:
            self._stream_error(sid, FLOW_CONTROL_ERROR)
            self.acknowledge_received_data(n, sid)
            return
        self.handler.on_data(sid, data, n)
        if flags & END_STREAM:
            self._remote_end(sid, st)

    def _headers(self, flags: int, sid: int, payload: bytes) -> None:
        if not sid:
            self._fail(PROTOCOL_ERROR, "HEADERS on stream 0")
        block = unpad(flags, payload)
        if block is None:
            self._fail(PROTOCOL_ERROR, "invalid padding")
        if flags & PRIORITY_FLAG:
            if len(block) < 5:
                self._fail(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            block = block[5:]
        if flags & END_HEADERS:
            self._header_block(sid, flags, block)
        else:
            self._cont = (sid, flags, [block], len(block))

    def _continuation(self, flags: int, payload: bytes) -> None:
        assert self._cont is not None
        sid, hflags, parts, size = self._cont
        parts.append(payload)
        size += len(payload)
        if size > 4 * self.decoder.decoder.max_header_list_size:
            self._fail(ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            self._cont = None
            self._header_block(sid, hflags, b"".join(parts))
        else:
            self._cont = (sid, hflags, parts, size)

    def _header_block(self, sid: int, flags: int, block: bytes) -> None:
        try:
            headers = self.decoder.decode(block)  # always: the HPACK state must follow every block
        except HPACKError as e:
            self._fail(_COMPRESSION_ERROR, f"header block: {e}")
        self._idle_check(sid)
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

    def _remote_end(self, sid: int, st: ClientStream) -> None:
        st.remote_closed = True
        if st.local_closed:
            self.streams.pop(sid, None)
        self.handler.on_end(sid)

    def _window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            self._fail(FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong size")
        inc = U32.unpack(payload)[0] & 0x7FFFFFFF
        if not sid:
            if not inc:
                self._fail(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += inc
            if self.send_window > MAX_WINDOW:
                self._fail(FLOW_CONTROL_ERROR, "connection window overflow")
        else:
            st = self.streams.get(sid)
            if st is None:
                self._idle_check(sid)
                return  # a closed stream: ignored
            if not inc:
                self._stream_error(sid, PROTOCOL_ERROR)
                return
            st.send_window += inc
            if st.send_window > MAX_WINDOW:
                self._stream_error(sid, FLOW_CONTROL_ERROR)
                return
        self.handler.on_window(sid)

    def _settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            self._fail(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                self._fail(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            self._fail(FRAME_SIZE_ERROR, "SETTINGS of a wrong length")
        window_changed = False
        mcs = None
        for pos in range(0, len(payload), 6):
            key, value = SETTING.unpack_from(payload, pos)
            if key == S_HEADER_TABLE_SIZE:
                self.encoder.set_max(value)
            elif key == S_ENABLE_PUSH:
                if value != 0:
                    self._fail(PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH from a server")
            elif key == S_MAX_CONCURRENT_STREAMS:
                mcs = self.max_concurrent = value
            elif key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    self._fail(FLOW_CONTROL_ERROR, "invalid SETTINGS_INITIAL_WINDOW_SIZE")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                if delta:
                    window_changed = True
                    for st in self.streams.values():
                        st.send_window += delta
                        if st.send_window > MAX_WINDOW:
                            self._fail(FLOW_CONTROL_ERROR, "stream window overflow")
            elif key == S_MAX_FRAME_SIZE:
                if not MAX_FRAME <= value <= (1 << 24) - 1:
                    self._fail(PROTOCOL_ERROR, "invalid SETTINGS_MAX_FRAME_SIZE")
                self.max_frame = value
        self._out.append(frame(SETTINGS, ACK, 0))
        self.handler.on_settings(mcs, window_changed)
