"""The connection core both HTTP/2 codecs share (RFC 9113): ``H2Endpoint``.

``h2wire.ServerH2`` (downstream) and ``h2wire_client.ClientH2`` (upstream)
extend it. Everything that does not depend on which side opened the
connection is here: the frame loop of ``receive_data`` (one buffer, the
9-byte header unpacked with ``struct``, frames above MAX_FRAME refused), the
dispatch by frame type, SETTINGS (the peer's window size, frame size and
our ACK; a side's own keys go to ``_setting``), PING, WINDOW_UPDATE, the
checks of RST_STREAM and GOAWAY, DATA with its flow control, HEADERS with
padding and priority, and CONTINUATION assembly; on the sending side the
windows, DATA frames and the batched WINDOW_UPDATEs of
``acknowledge_received_data``.

What depends on the role stays in the subclasses, through a few hooks
called only off the hot path (a frame for an unknown stream, RST_STREAM,
GOAWAY, PRIORITY, SETTINGS): the preface, which stream ids the peer may
use and what counts as idle (``_idle``), what a decoded header block means
(``_header_block``: a request, or a response, 1xx or trailers), the
handler's ``on_reset``/``on_settings``/``on_goaway``, and the HPACK encoder.
The hot calls (the loop, DATA, HEADERS) make the same Python-level calls as
when each codec had its own copy.

Each subclass gets its own copy of the core's functions (``__init_subclass__``:
same source, a new code object). CPython keeps its specialising caches
(attribute loads on ``self``, method lookups) in the code object, and they
hold one type: with one code shared by ``ServerH2`` and ``ClientH2``, a
process running both (a gRPC call proxied to an HTTP/2 upstream) would keep
missing them, about 1 us a request in ``benchmarks.micro_h2``.
"""

from __future__ import annotations

from types import FunctionType
from typing import NoReturn, Protocol

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
    PRIORITY,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    RST_STREAM,
    S_INITIAL_WINDOW_SIZE,
    S_MAX_CONCURRENT_STREAMS,
    S_MAX_FRAME_SIZE,
    SETTING,
    SETTINGS,
    STREAM_CLOSED,
    U32,
    WINDOW_UPDATE,
    H2ConnectionError,
    MemoDecoder,
    frame,
    pack_hdr,
    unpad,
    window_frame,
)

SELF_DEP = 0x100  # internal HEADERS flag: the frame's priority names its own stream


class EndpointHandler(Protocol):
    """What the core itself calls; each side's handler has more."""

    def on_data(self, sid: int, data: bytes, flow_len: int) -> None: ...
    def on_end(self, sid: int) -> None: ...
    def on_window(self, sid: int) -> None: ...


class H2Stream:
    __slots__ = ("final", "local_closed", "recv_unacked", "recv_window", "remote_closed", "send_window")

    def __init__(self, send_window: int, recv_window: int, final: bool = False) -> None:
        self.send_window = send_window
        self.recv_window = recv_window
        self.recv_unacked = 0
        self.remote_closed = False
        self.local_closed = False
        self.final = final  # the peer's (final, non-1xx) head came: DATA may follow, a later HEADERS ends it


class H2Endpoint:
    __slots__ = (
        "_buf", "_cont", "_headers_sids", "_out", "_preface", "_settings_seen", "dead", "decoder", "handler", "max_frame",
        "peer_initial_window", "recv_initial", "recv_unacked", "recv_window", "recv_window_max", "send_window",
        "settings_acked", "stream_window", "streams",
    )
    # the role's wording and rules, for the shared checks
    PREFACE_ERROR = "the peer's preface must start with SETTINGS"
    PUSH_PROMISE_ERROR = "PUSH_PROMISE"
    HEADERS_SIDS = 0x7FFFFFFF  # HEADERS on a stream id without these bits set: a connection error
    HEADERS_SID_ERROR = "HEADERS on stream 0"

    def __init__(self, handler: EndpointHandler, stream_window: int, conn_window: int, recv_initial: int,
                 max_header_list_size: int, expect_magic: bool) -> None:
        self.handler = handler
        self.stream_window = stream_window  # the SETTINGS_INITIAL_WINDOW_SIZE we advertise
        self.recv_initial = recv_initial  # the receive window of a new stream
        self.settings_acked = False
        self.recv_window_max = max(conn_window, DEFAULT_WINDOW)
        self.recv_window = DEFAULT_WINDOW
        self.recv_unacked = 0
        self.send_window = DEFAULT_WINDOW
        self.peer_initial_window = DEFAULT_WINDOW
        self.max_frame = MAX_FRAME  # the peer's SETTINGS_MAX_FRAME_SIZE: our outbound frame limit
        self.streams: dict[int, H2Stream] = {}
        self.dead = False
        self.decoder = MemoDecoder(max_header_list_size)
        self._buf = b""
        self._preface = not expect_magic  # the client's 24-byte magic is behind us
        self._settings_seen = False
        self._headers_sids = self.HEADERS_SIDS  # a slot: faster to read per frame than the class attribute
        self._cont: tuple[int, int, list[bytes], int] | None = None  # sid, flags, fragments, size
        self._out: list[bytes | memoryview] = []

    def __init_subclass__(cls, **kwargs: object) -> None:
        """Own copies of the core's functions, so their inline caches see only ``cls`` (see the module doc)."""
        super().__init_subclass__(**kwargs)
        copies: dict[int, FunctionType] = {}
        for name, f in H2Endpoint.__dict__.items():
            if isinstance(f, FunctionType) and name != "__init_subclass__":
                own = copies[id(f)] = FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__,
                                                   f.__closure__)
                own.__kwdefaults__ = f.__kwdefaults__
                own.__qualname__ = f.__qualname__
                own.__doc__ = f.__doc__
                own.__annotations__ = f.__annotations__
                own.__module__ = f.__module__
                if name not in cls.__dict__:
                    setattr(cls, name, own)
        for name, f in list(cls.__dict__.items()):  # aliases (``local_flow_control_window = H2Endpoint.window``)
            if id(f) in copies and H2Endpoint.__dict__.get(f.__name__) is f:
                setattr(cls, name, copies[id(f)])

    # ------------------------------------------------------------------ the role's part
    def close_connection(self, code: int) -> None:
        raise NotImplementedError

    def _stream_error(self, sid: int, code: int) -> None:
        """RST_STREAM ``code`` and the handler told."""
        raise NotImplementedError

    def _idle(self, sid: int, what: str) -> None:
        """A connection error if the peer's ``what`` frame names a stream that was never opened."""
        raise NotImplementedError

    def _unknown_stream_data(self, sid: int) -> None:
        """DATA on a stream we no longer know (its flow control is already handled)."""
        raise NotImplementedError

    def _header_block(self, sid: int, flags: int, block: bytes) -> None:
        raise NotImplementedError

    def _peer_reset(self, sid: int, code: int) -> None:
        raise NotImplementedError

    def _priority(self, sid: int, payload: bytes) -> None:
        raise NotImplementedError

    def _goaway(self, last_sid: int, code: int) -> None:
        raise NotImplementedError

    def _setting(self, key: int, value: int) -> None:
        """A setting the core leaves to the role (HEADER_TABLE_SIZE, ENABLE_PUSH, unknown ones)."""
        raise NotImplementedError

    def _settings_done(self, max_concurrent: int | None, window_changed: bool) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ output
    def _open_window(self) -> None:
        """The connection window we want, past the default (part of the preface)."""
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

    def wants_write(self) -> bool:
        return bool(self._out)

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

    def _local_end(self, sid: int, st: H2Stream) -> None:
        if st.remote_closed:
            del self.streams[sid]  # both sides ended it: closed
        else:
            st.local_closed = True

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
            if st.recv_unacked * 2 >= self.recv_initial or st.recv_window <= 0:
                self._out.append(window_frame(sid, st.recv_unacked))
                st.recv_window += st.recv_unacked
                st.recv_unacked = 0

    # ------------------------------------------------------------------ input
    def receive_data(self, data: bytes) -> None:
        """Parse and dispatch every complete frame. Raises H2ConnectionError (GOAWAY queued)."""
        if self.dead:
            return
        buf = self._buf + data if self._buf else data
        pos = 0
        if not self._preface:
            if len(buf) < 24:
                self._buf = buf
                return
            if buf[:24] != PREFACE:
                self._fail(PROTOCOL_ERROR, "invalid connection preface")
            self._preface = True
            pos = 24
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
                self._fail(PROTOCOL_ERROR, self.PREFACE_ERROR)
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
            self._idle(sid, "RST_STREAM")
            self._peer_reset(sid, U32.unpack(payload)[0])
        elif ftype == PING:
            if sid:
                self._fail(PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                self._fail(FRAME_SIZE_ERROR, "PING of the wrong size")
            if not flags & ACK:
                self._out.append(frame(PING, ACK, 0, payload))
        elif ftype == PRIORITY:
            self._priority(sid, payload)
        elif ftype == GOAWAY:
            if sid:
                self._fail(PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                self._fail(FRAME_SIZE_ERROR, "GOAWAY too short")
            last, code = GOAWAY_BODY.unpack_from(payload)
            self._goaway(last & 0x7FFFFFFF, code)
        elif ftype == PUSH_PROMISE:
            self._fail(PROTOCOL_ERROR, self.PUSH_PROMISE_ERROR)
        elif ftype == CONTINUATION:
            self._fail(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        # other types: ignored (RFC 9113 section 4.1)

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
                self._unknown_stream_data(sid)
            else:  # ended, or no response head yet
                self._stream_error(sid, STREAM_CLOSED if st.remote_closed else PROTOCOL_ERROR)
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

    def _remote_end(self, sid: int, st: H2Stream) -> None:
        st.remote_closed = True
        if st.local_closed:
            self.streams.pop(sid, None)
        self.handler.on_end(sid)

    def _headers(self, flags: int, sid: int, payload: bytes) -> None:
        if not sid & self._headers_sids:
            self._fail(PROTOCOL_ERROR, self.HEADERS_SID_ERROR)
        block = unpad(flags, payload)
        if block is None:
            self._fail(PROTOCOL_ERROR, "invalid padding")
        if flags & PRIORITY_FLAG:
            if len(block) < 5:
                self._fail(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            if U32.unpack_from(block)[0] & 0x7FFFFFFF == sid:
                flags |= SELF_DEP
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
                self._idle(sid, "WINDOW_UPDATE")
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
            if not self.settings_acked:
                self.settings_acked = True
                self.recv_initial = self.stream_window  # new streams get the advertised window
            return
        if len(payload) % 6:
            self._fail(FRAME_SIZE_ERROR, "SETTINGS of a wrong length")
        window_changed = False
        mcs = None
        for pos in range(0, len(payload), 6):
            key, value = SETTING.unpack_from(payload, pos)
            if key == S_INITIAL_WINDOW_SIZE:
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
            elif key == S_MAX_CONCURRENT_STREAMS:
                mcs = value
            else:
                self._setting(key, value)
        self._out.append(frame(SETTINGS, ACK, 0))
        self._settings_done(mcs, window_changed)
