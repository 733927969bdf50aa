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
to, the connection window. The pieces both sides share are in ``h2frames``;
the upstream (client) side is ``h2wire_client``.
"""

from __future__ import annotations

from typing import NoReturn, Protocol

from hpack import Decoder, Encoder, HPACKError

from proxy.h2frames import (
    ACK,
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
    GOAWAY,
    HEADERS,
    INTERNAL_ERROR,
    MAX_FRAME,
    MAX_WINDOW,
    NO_ERROR,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RST_STREAM,
    S_ENABLE_PUSH,
    S_HEADER_TABLE_SIZE,
    S_INITIAL_WINDOW_SIZE,
    S_MAX_CONCURRENT_STREAMS,
    S_MAX_FRAME_SIZE,
    SETTINGS,
    STREAM_CLOSED,
    WINDOW_UPDATE,
    H2ConnectionError,
    Table,
    frame,
    goaway_frame,
    rst_frame,
    unpad,
    window_frame,
)
from proxy.h2frames import GOAWAY_BODY as _GOAWAY
from proxy.h2frames import HDR as _HDR
from proxy.h2frames import SETTING as _SETTING
from proxy.h2frames import U32 as _U32
from proxy.h2frames import pack_hdr as _pack_hdr

__all__ = [  # the names h2conn and the tests use from here
    "CANCEL", "COMPRESSION_ERROR", "ENHANCE_YOUR_CALM", "FLOW_CONTROL_ERROR", "FRAME_SIZE_ERROR", "INTERNAL_ERROR",
    "NO_ERROR", "PROTOCOL_ERROR", "REFUSED_STREAM", "STREAM_CLOSED", "H2ConnectionError", "ServerH2",
    "goaway_frame", "rst_frame", "window_frame",
]
_CACHE_MAX = 64
_SELF_DEP = 0x100  # internal: a HEADERS frame whose priority names its own stream


class Handler(Protocol):
    def on_request(self, sid: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None: ...
    def on_data(self, sid: int, data: bytes, flow_len: int) -> None: ...
    def on_end(self, sid: int) -> None: ...
    def on_reset(self, sid: int, remote: bool) -> None: ...
    def on_window(self, sid: int) -> None: ...
    def on_settings(self, window_changed: bool) -> None: ...
    def on_goaway(self, last_sid: int, code: int) -> None: ...


class Stream:
    __slots__ = ("local_closed", "recv_unacked", "recv_window", "remote_closed", "send_window")

    def __init__(self, send_window: int, recv_window: int) -> None:
        self.send_window = send_window
        self.recv_window = recv_window
        self.recv_unacked = 0
        self.remote_closed = False
        self.local_closed = False


class ServerH2:
    __slots__ = (
        "_buf", "_cont", "_dec_cache", "_enc_cache", "_out", "_preface", "_settings_seen", "dead", "decoder",
        "encoder", "handler", "last_sid", "max_concurrent", "max_frame", "peer_initial_window", "recv_initial",
        "recv_unacked", "recv_window", "recv_window_max", "send_window", "settings_acked", "stream_window",
        "streams",
    )

    def __init__(self, handler: Handler, max_concurrent: int, stream_window: int, conn_window: int,
                 max_header_list_size: int) -> None:
        self.handler = handler
        self.max_concurrent = max_concurrent
        self.stream_window = stream_window  # SETTINGS_INITIAL_WINDOW_SIZE we advertise
        self.recv_initial = max(stream_window, DEFAULT_WINDOW)  # until the client acknowledges our SETTINGS
        self.settings_acked = False
        self.recv_window_max = max(conn_window, DEFAULT_WINDOW)
        self.recv_window = DEFAULT_WINDOW
        self.recv_unacked = 0
        self.send_window = DEFAULT_WINDOW
        self.peer_initial_window = DEFAULT_WINDOW
        self.max_frame = MAX_FRAME  # the client's SETTINGS_MAX_FRAME_SIZE: our outbound frame limit
        self.streams: dict[int, Stream] = {}
        self.last_sid = 0
        self.dead = False
        self.decoder = Decoder(max_header_list_size)
        self.decoder.header_table = Table()
        self.encoder = Encoder()
        self.encoder.header_table = Table()
        self._dec_cache: dict[bytes, tuple[int, list[tuple[bytes, bytes]]]] = {}
        self._enc_cache: dict[tuple[tuple[bytes, bytes], ...], tuple[int, bytes]] = {}
        self._buf = b""
        self._preface = False
        self._settings_seen = False
        self._cont: tuple[int, int, list[bytes], int] | None = None  # sid, flags, fragments, size
        self._out: list[bytes | memoryview] = []

    # ------------------------------------------------------------------ output
    def initiate(self) -> None:
        settings = b"".join(_SETTING.pack(k, v) for k, v in (
            (S_ENABLE_PUSH, 0), (S_MAX_CONCURRENT_STREAMS, self.max_concurrent),
            (S_INITIAL_WINDOW_SIZE, self.stream_window)))
        self._out.append(frame(SETTINGS, 0, 0, settings))
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

    def send_data(self, sid: int, data: bytes | memoryview, end_stream: bool = False) -> None:
        """``data`` must fit the windows and the frame size (``local_flow_control_window``, ``max_frame``)."""
        st = self.streams.get(sid)
        if st is None or st.local_closed:
            return
        n = len(data)
        self.send_window -= n
        st.send_window -= n
        self._out += (_pack_hdr(n >> 8, n & 0xFF, DATA, END_STREAM if end_stream else 0, sid), data)
        if end_stream:
            self._local_end(sid, st)

    def end_stream(self, sid: int) -> None:
        st = self.streams.get(sid)
        if st is None or st.local_closed:
            return
        self._out.append(_pack_hdr(0, 0, DATA, END_STREAM, sid))
        self._local_end(sid, st)

    def _local_end(self, sid: int, st: Stream) -> None:
        if st.remote_closed:
            del self.streams[sid]  # both sides ended it: closed
        else:
            st.local_closed = True

    def reset_stream(self, sid: int, code: int) -> None:
        if self.streams.pop(sid, None) is not None:
            self._out.append(rst_frame(sid, code))

    def local_flow_control_window(self, sid: int) -> int:
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

    def close_connection(self, code: int, last_sid: int | None = None) -> None:
        self._out.append(goaway_frame(self.last_sid if last_sid is None else last_sid, code))
        self.dead = True

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
        unpack = _HDR.unpack_from
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
                self._fail(PROTOCOL_ERROR, "the client preface must start with SETTINGS")
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
            self._rst(sid, payload)
        elif ftype == PING:
            if sid:
                self._fail(PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                self._fail(FRAME_SIZE_ERROR, "PING of the wrong size")
            if not flags & ACK:
                self._out.append(frame(PING, ACK, 0, payload))
        elif ftype == PRIORITY:
            if not sid:
                self._fail(PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                self._stream_error(sid, FRAME_SIZE_ERROR)
            elif _U32.unpack_from(payload)[0] & 0x7FFFFFFF == sid:
                self._stream_error(sid, PROTOCOL_ERROR)
        elif ftype == GOAWAY:
            if sid:
                self._fail(PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                self._fail(FRAME_SIZE_ERROR, "GOAWAY too short")
            last, code = _GOAWAY.unpack_from(payload)
            self.handler.on_goaway(last & 0x7FFFFFFF, code)
        elif ftype == PUSH_PROMISE:
            self._fail(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        elif ftype == CONTINUATION:
            self._fail(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        # other types: ignored (RFC 9113 section 4.1)

    def _stream_error(self, sid: int, code: int) -> None:
        self._out.append(rst_frame(sid, code))
        if self.streams.pop(sid, None) is not None:
            self.handler.on_reset(sid, False)

    def _data(self, flags: int, sid: int, payload: bytes) -> None:
        if not sid:
            self._fail(PROTOCOL_ERROR, "DATA on stream 0")
        n = len(payload)
        self.recv_window -= n
        if self.recv_window < 0:
            self._fail(FLOW_CONTROL_ERROR, "connection window exceeded")
        st = self.streams.get(sid)
        if st is None or st.remote_closed:
            if st is None and sid > self.last_sid:
                self._fail(PROTOCOL_ERROR, "DATA on an idle stream")
            self._stream_error(sid, STREAM_CLOSED)
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
        if not sid or not sid & 1:
            self._fail(PROTOCOL_ERROR, "HEADERS on stream 0 or an even stream")
        block = unpad(flags, payload)
        if block is None:
            self._fail(PROTOCOL_ERROR, "invalid padding")
        if flags & PRIORITY_FLAG:
            if len(block) < 5:
                self._fail(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            if _U32.unpack_from(block)[0] & 0x7FFFFFFF == sid:
                flags |= _SELF_DEP
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
        if size > 4 * self.decoder.max_header_list_size:
            self._fail(ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            self._cont = None
            self._header_block(sid, hflags, b"".join(parts))
        else:
            self._cont = (sid, hflags, parts, size)

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        dec = self.decoder
        table = dec.header_table
        gen = table.gen  # type: ignore[attr-defined]
        cache = self._dec_cache
        hit = cache.get(block)
        if hit is not None and hit[0] == gen:
            return list(hit[1])
        try:
            headers: list[tuple[bytes, bytes]] = [(n, v) for n, v in dec.decode(block, raw=True)]  # type: ignore[misc]
        except HPACKError as e:
            self._fail(COMPRESSION_ERROR, f"header block: {e}")
            raise  # not reached
        if table.gen == gen:  # type: ignore[attr-defined]
            if len(cache) >= _CACHE_MAX:
                cache.clear()
            cache[block] = (gen, headers)
            return list(headers)
        return headers

    def _header_block(self, sid: int, flags: int, block: bytes) -> None:
        headers = self._decode(block)  # always: the HPACK state must follow every block
        ended = bool(flags & END_STREAM)
        if flags & _SELF_DEP:  # a stream depending on itself: a stream error (RFC 9113 section 5.3.1)
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
                self._remote_end(sid, st)  # request trailers are not forwarded
            return
        if sid <= self.last_sid:
            self._stream_error(sid, STREAM_CLOSED)
            return
        self.last_sid = sid
        if len(self.streams) >= self.max_concurrent:
            self._out.append(rst_frame(sid, REFUSED_STREAM))
            return
        st = self.streams[sid] = Stream(self.peer_initial_window, self.recv_initial)
        if ended:
            st.remote_closed = True
        self.handler.on_request(sid, headers, ended)
        if ended:
            self.handler.on_end(sid)

    def _remote_end(self, sid: int, st: Stream) -> None:
        st.remote_closed = True
        if st.local_closed:
            del self.streams[sid]
        self.handler.on_end(sid)

    def _window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            self._fail(FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong size")
        inc = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if not sid:
            if not inc:
                self._fail(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += inc
            if self.send_window > MAX_WINDOW:
                self._fail(FLOW_CONTROL_ERROR, "connection window overflow")
        else:
            st = self.streams.get(sid)
            if st is None:
                if sid > self.last_sid:
                    self._fail(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
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
        for pos in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, pos)
            if key == S_HEADER_TABLE_SIZE:
                self.encoder.header_table_size = min(value, 4096)  # we may use less than offered: bounded memory
            elif key == S_ENABLE_PUSH:
                if value > 1:
                    self._fail(PROTOCOL_ERROR, "invalid SETTINGS_ENABLE_PUSH")
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
        self.handler.on_settings(window_changed)

    def _rst(self, sid: int, payload: bytes) -> None:
        if not sid:
            self._fail(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            self._fail(FRAME_SIZE_ERROR, "RST_STREAM of the wrong size")
        if sid > self.last_sid:
            self._fail(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
        self.streams.pop(sid, None)
        self.handler.on_reset(sid, True)
