"""``proxy.h2wire.ServerH2``, the downstream HTTP/2 codec: raw frames in, frames out, no sockets.

The client side is built with hpack and hyperframe (independent of the codec),
and what the codec writes is parsed back frame by frame.
"""

from __future__ import annotations

import pytest
from hpack import Decoder, Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from proxy import h2wire
from proxy.h2wire import H2ConnectionError, ServerH2
from tests.helpers import rawh2
from tests.helpers.rawh2 import data_frame, frames

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a.example"), (b":path", b"/x")]


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_request(self, sid, headers, ended):  # type: ignore[no-untyped-def]
        self.calls.append(("request", sid, headers, ended))

    def on_data(self, sid, data, n):  # type: ignore[no-untyped-def]
        self.calls.append(("data", sid, data, n))

    def on_end(self, sid):  # type: ignore[no-untyped-def]
        self.calls.append(("end", sid))

    def on_reset(self, sid, remote):  # type: ignore[no-untyped-def]
        self.calls.append(("reset", sid, remote))

    def on_window(self, sid):  # type: ignore[no-untyped-def]
        self.calls.append(("window", sid))

    def on_settings(self, window_changed):  # type: ignore[no-untyped-def]
        self.calls.append(("settings", window_changed))

    def on_goaway(self, last_sid, code):  # type: ignore[no-untyped-def]
        self.calls.append(("goaway", last_sid, code))







def hdrs(sid: int, block: bytes, end_stream: bool = True, end_headers: bool = True, pad: int = 0) -> bytes:
    return rawh2.hdrs(sid, block, end_stream, end_headers, pad)


def goaway_code(h: ServerH2) -> int:
    return rawh2.goaway_code(h.data_to_send())



def server(settings: dict[int, int] | None = None, stream_window: int = 65535, conn_window: int = 65535,
           max_streams: int = 100) -> tuple[ServerH2, Recorder]:
    rec = Recorder()
    s = ServerH2(rec, max_streams, stream_window, conn_window, 65536)
    s.initiate()
    s.receive_data(PREFACE + SettingsFrame(0, settings=settings or {}).serialize())
    s.data_to_send()
    rec.calls.clear()
    return s, rec




def test_preface_settings_and_a_get_become_one_request_and_its_end():
    rec = Recorder()
    s = ServerH2(rec, 100, 1 << 20, 1 << 24, 65536)
    s.initiate()
    out = frames(s.data_to_send())
    assert isinstance(out[0], SettingsFrame)
    assert out[0].settings[SettingsFrame.INITIAL_WINDOW_SIZE] == 1 << 20
    assert out[0].settings[SettingsFrame.ENABLE_PUSH] == 0
    assert isinstance(out[1], WindowUpdateFrame) and out[1].window_increment == (1 << 24) - 65535
    s.receive_data(PREFACE + SettingsFrame(0).serialize() + hdrs(1, Encoder().encode(GET)))
    assert rec.calls == [("settings", False), ("request", 1, GET, True), ("end", 1)]
    acks = frames(s.data_to_send())
    assert isinstance(acks[0], SettingsFrame) and "ACK" in acks[0].flags


def test_frames_split_across_reads_and_a_bad_preface():
    s, rec = server()
    raw = hdrs(1, Encoder().encode(GET))
    for i in range(len(raw)):
        s.receive_data(raw[i:i + 1])
    assert rec.calls[0][:2] == ("request", 1)
    bad = ServerH2(Recorder(), 100, 65535, 65535, 65536)
    with pytest.raises(H2ConnectionError):
        bad.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert goaway_code(bad) == h2wire.PROTOCOL_ERROR


def test_hpack_memo_follows_the_dynamic_table():
    """The same indexed block means different fields after the table changed: never a stale hit."""
    s, rec = server()
    enc = Encoder()
    s.receive_data(hdrs(1, enc.encode([*GET, (b"x-a", b"1")])))  # adds x-a: 1 (index 62)
    same = b"\x82\x86\xbe"  # :method GET, :scheme http, dynamic index 62
    s.receive_data(hdrs(3, same))
    s.receive_data(hdrs(5, same))
    s.receive_data(hdrs(7, enc.encode([(b"x-b", b"2")])))  # now index 62 is x-b: 2
    s.receive_data(hdrs(9, same))
    got = [c[2] for c in rec.calls if c[0] == "request"]
    assert got[1] == got[2] == [(b":method", b"GET"), (b":scheme", b"http"), (b"x-a", b"1")]
    assert got[4] == [(b":method", b"GET"), (b":scheme", b"http"), (b"x-b", b"2")]
    got[1].append((b"mutated", b"by a caller"))
    assert got[2] == [(b":method", b"GET"), (b":scheme", b"http"), (b"x-a", b"1")]


def test_response_headers_memo_stays_decodable():
    s, _ = server()
    enc = Encoder()
    for sid in (1, 3, 5):
        s.receive_data(hdrs(sid, enc.encode(GET)))
    resp = [(b":status", b"200"), (b"content-type", b"text/plain")]
    dec = Decoder()
    for sid in (1, 3, 5):
        s.send_headers(sid, resp, end_stream=True)
        (f,) = frames(s.data_to_send())
        assert isinstance(f, HeadersFrame) and f.stream_id == sid and {"END_STREAM", "END_HEADERS"} <= f.flags
        assert dec.decode(f.data, raw=True) == resp
    assert not s.streams  # both sides ended: closed and forgotten


def test_response_body_honours_the_peer_windows():
    s, rec = server(settings={SettingsFrame.INITIAL_WINDOW_SIZE: 10})
    s.receive_data(hdrs(1, Encoder().encode(GET)))
    assert s.local_flow_control_window(1) == 10
    s.send_headers(1, [(b":status", b"200")])
    s.send_data(1, b"x" * 10)
    assert s.local_flow_control_window(1) == 0
    s.receive_data(WindowUpdateFrame(1, window_increment=100).serialize())
    assert ("window", 1) in rec.calls
    assert s.local_flow_control_window(1) == 100
    s.receive_data(SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 30}).serialize())
    assert ("settings", True) in rec.calls
    assert s.local_flow_control_window(1) == 120
    s.send_data(1, b"y" * 5, end_stream=True)
    out = [f for f in frames(s.data_to_send()) if isinstance(f, DataFrame)]
    assert [(f.data, "END_STREAM" in f.flags) for f in out] == [(b"x" * 10, False), (b"y" * 5, True)]
    assert s.send_window == 65535 - 15


def test_large_response_headers_go_in_continuations():
    s, _ = server()
    s.receive_data(hdrs(1, Encoder().encode(GET)))
    big = [(b":status", b"200"), *[(b"x-h%d" % i, b"v" * 1000) for i in range(40)]]
    s.send_headers(1, big)
    out = frames(s.data_to_send())
    assert isinstance(out[0], HeadersFrame) and "END_HEADERS" not in out[0].flags
    assert all(isinstance(f, ContinuationFrame) for f in out[1:])
    assert "END_HEADERS" in out[-1].flags and all(len(f.data) <= 16384 for f in out)
    assert Decoder().decode(b"".join(f.data for f in out), raw=True) == big


def test_request_body_flow_control_and_batched_window_updates():
    s, rec = server(stream_window=100, conn_window=65535)
    s.receive_data(SettingsFrame(0, flags=["ACK"]).serialize())  # our 100-byte stream window applies
    s.receive_data(hdrs(1, Encoder().encode([*GET[:1], (b":method", b"POST")][:1] + GET[1:]), end_stream=False))
    s.receive_data(data_frame(1, b"a" * 40))
    assert rec.calls[-1] == ("data", 1, b"a" * 40, 40)
    s.acknowledge_received_data(40, 1)
    assert not frames(s.data_to_send())  # less than half a window owed: nothing yet
    s.receive_data(data_frame(1, b"b" * 20))
    s.acknowledge_received_data(20, 1)
    (upd,) = frames(s.data_to_send())
    assert isinstance(upd, WindowUpdateFrame) and upd.stream_id == 1 and upd.window_increment == 60
    s.receive_data(data_frame(1, b"c" * 100))  # exactly the window again
    s.receive_data(data_frame(1, b"d"))  # one byte past it: a stream error
    out = frames(s.data_to_send())
    assert [(type(f), f.error_code) for f in out] == [(RstStreamFrame, h2wire.FLOW_CONTROL_ERROR)]
    assert ("reset", 1, False) in rec.calls and 1 not in s.streams


def test_connection_window_overrun_is_a_connection_error():
    s, _ = server(stream_window=1 << 20)
    s.receive_data(SettingsFrame(0, flags=["ACK"]).serialize())
    s.receive_data(hdrs(1, Encoder().encode(GET), end_stream=False))
    with pytest.raises(H2ConnectionError):
        for _ in range(5):
            s.receive_data(data_frame(1, b"z" * 16384))
    assert goaway_code(s) == h2wire.FLOW_CONTROL_ERROR
    s.receive_data(data_frame(1, b"ignored"))  # after the connection error: nothing


def test_data_on_a_closed_stream_is_reset_and_its_window_comes_back():
    s, rec = server()
    s.receive_data(hdrs(1, Encoder().encode(GET)))
    s.send_headers(1, [(b":status", b"204")], end_stream=True)
    s.data_to_send()
    s.receive_data(data_frame(1, b"q" * 16000) * 3)
    out = frames(s.data_to_send())
    assert [(type(f), f.error_code) for f in out[:3]] == [(RstStreamFrame, h2wire.STREAM_CLOSED)] * 3
    assert isinstance(out[3], WindowUpdateFrame) and out[3].stream_id == 0 and out[3].window_increment == 48000
    assert [c for c in rec.calls if c[0] == "data"] == []
    with pytest.raises(H2ConnectionError):
        s.receive_data(data_frame(7, b"idle"))
    assert goaway_code(s) == h2wire.PROTOCOL_ERROR


def test_continuation_assembles_and_interleaving_is_a_protocol_error():
    s, rec = server()
    block = Encoder().encode([*GET, (b"x-long", b"l" * 100)])
    s.receive_data(hdrs(1, block[:10], end_headers=False))
    c = ContinuationFrame(1, data=block[10:])
    c.flags.add("END_HEADERS")
    s.receive_data(c.serialize())
    assert rec.calls[0] == ("request", 1, [*GET, (b"x-long", b"l" * 100)], True)
    s.receive_data(hdrs(3, block[:10], end_headers=False))
    with pytest.raises(H2ConnectionError):
        s.receive_data(PingFrame(0, opaque_data=b"12345678").serialize())
    assert goaway_code(s) == h2wire.PROTOCOL_ERROR


def test_refused_past_max_concurrent_streams_ping_and_rst():
    s, rec = server(max_streams=1)
    enc = Encoder()
    s.receive_data(hdrs(1, enc.encode(GET)) + hdrs(3, enc.encode(GET)))
    out = frames(s.data_to_send())
    assert [(type(f), f.stream_id, f.error_code) for f in out] == [(RstStreamFrame, 3, h2wire.REFUSED_STREAM)]
    assert [c[1] for c in rec.calls if c[0] == "request"] == [1]
    s.receive_data(PingFrame(0, opaque_data=b"abcdefgh").serialize())
    (pong,) = frames(s.data_to_send())
    assert isinstance(pong, PingFrame) and "ACK" in pong.flags and pong.opaque_data == b"abcdefgh"
    s.receive_data(RstStreamFrame(1, error_code=8).serialize())
    assert rec.calls[-1] == ("reset", 1, True) and not s.streams
    s.send_data(1, b"after the reset")  # dropped: the stream is gone
    assert s.data_to_send() == b""


@pytest.mark.parametrize(("raw", "code"), [
    (b"\x00\x00\x04\x04\x00\x00\x00\x00\x00" + b"\x00" * 4, h2wire.FRAME_SIZE_ERROR),  # SETTINGS of 4 bytes
    (b"\x00\x00\x08\x00\x01\x00\x00\x00\x00" + b"x" * 8, h2wire.PROTOCOL_ERROR),  # DATA on stream 0
    (b"\x00\x40\x01\x00\x00\x00\x00\x00\x01" + b"x" * 16385, h2wire.FRAME_SIZE_ERROR),  # past MAX_FRAME_SIZE
    (b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00", h2wire.PROTOCOL_ERROR),  # WINDOW_UPDATE of 0
    (b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x05\x00\x00\x00\x01", h2wire.PROTOCOL_ERROR),  # MAX_FRAME 1
    (b"\x00\x00\x00\x05\x04\x00\x00\x00\x01", h2wire.PROTOCOL_ERROR),  # PUSH_PROMISE from a client
    (b"\x00\x00\x01\x01\x05\x00\x00\x00\x01\xff", h2wire.COMPRESSION_ERROR),  # a broken HPACK block
])
def test_malformed_frames_are_connection_errors(raw, code):
    s, _ = server()
    with pytest.raises(H2ConnectionError):
        s.receive_data(raw)
    assert goaway_code(s) == code
