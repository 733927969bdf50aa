"""``proxy.h2wire_client.ClientH2``, the upstream HTTP/2 codec: raw server frames in, frames out, no sockets.

The server side is built with hpack and hyperframe (independent of the codec),
and what the codec writes is parsed back frame by frame. ``FieldEncoder``'s
blocks are checked against hpack's decoder.
"""

from __future__ import annotations

import random

import pytest
from hpack import Decoder, Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from proxy import h2frames
from proxy.h2frames import FieldEncoder, H2ConnectionError
from proxy.h2wire_client import ClientH2
from tests.helpers import rawh2
from tests.helpers.rawh2 import data_frame, frames

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
REQ = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"svc:50051"), (b":path", b"/pkg.Svc/M"),
       (b"content-type", b"application/grpc"), (b"te", b"trailers")]
OK = [(b":status", b"200"), (b"content-type", b"application/grpc")]


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_response(self, sid, status, headers, ended):  # type: ignore[no-untyped-def]
        self.calls.append(("response", sid, status, headers, ended))

    def on_data(self, sid, data, n):  # type: ignore[no-untyped-def]
        self.calls.append(("data", sid, data, n))

    def on_trailers(self, sid, headers):  # type: ignore[no-untyped-def]
        self.calls.append(("trailers", sid, headers))

    def on_end(self, sid):  # type: ignore[no-untyped-def]
        self.calls.append(("end", sid))

    def on_reset(self, sid, code, remote):  # type: ignore[no-untyped-def]
        self.calls.append(("reset", sid, code, remote))

    def on_window(self, sid):  # type: ignore[no-untyped-def]
        self.calls.append(("window", sid))

    def on_settings(self, max_concurrent, window_changed):  # type: ignore[no-untyped-def]
        self.calls.append(("settings", max_concurrent, window_changed))

    def on_goaway(self, last_sid, code):  # type: ignore[no-untyped-def]
        self.calls.append(("goaway", last_sid, code))







def hdrs(sid: int, block: bytes, end_stream: bool = False, end_headers: bool = True, pad: int = 0) -> bytes:
    return rawh2.hdrs(sid, block, end_stream, end_headers, pad)


def goaway_code(h: ClientH2) -> int:
    return rawh2.goaway_code(h.data_to_send())



def client(settings: dict[int, int] | None = None, window: int = 1 << 20,
           conn_window: int = 1 << 20) -> tuple[ClientH2, Recorder, Encoder]:
    rec = Recorder()
    c = ClientH2(rec, window, conn_window)
    c.initiate()
    c.data_to_send()
    c.receive_data(SettingsFrame(0, settings=settings or {}).serialize())
    c.data_to_send()
    rec.calls.clear()
    return c, rec, Encoder()




def test_preface_settings_window_and_a_unary_call_with_trailers():
    rec = Recorder()
    c = ClientH2(rec, 1 << 20, 1 << 20)
    c.initiate()
    out = c.data_to_send()
    assert out.startswith(PREFACE)
    fs = frames(out[24:])
    assert isinstance(fs[0], SettingsFrame)
    assert fs[0].settings == {SettingsFrame.ENABLE_PUSH: 0, SettingsFrame.INITIAL_WINDOW_SIZE: 1 << 20}
    assert isinstance(fs[1], WindowUpdateFrame) and fs[1].window_increment == (1 << 20) - 65535
    with pytest.raises(H2ConnectionError):  # the server's preface must be SETTINGS
        ClientH2(Recorder(), 65535, 65535).receive_data(PingFrame(0, b"12345678").serialize())
    c.receive_data(SettingsFrame(0, settings={SettingsFrame.MAX_CONCURRENT_STREAMS: 7}).serialize())
    assert rec.calls == [("settings", 7, False)]
    ack = frames(c.data_to_send())
    assert isinstance(ack[0], SettingsFrame) and "ACK" in ack[0].flags
    rec.calls.clear()
    dec = Decoder()
    sids = [c.send_headers(REQ, False), c.send_headers(REQ, True)]
    assert sids == [1, 3]
    c.send_data(1, b"msg", True)
    sent = frames(c.data_to_send())
    assert [(type(f), f.stream_id) for f in sent] == [(HeadersFrame, 1), (HeadersFrame, 3), (DataFrame, 1)]
    assert [dec.decode(f.data, raw=True) for f in sent[:2]] == [REQ, REQ]
    assert "END_STREAM" not in sent[0].flags and "END_STREAM" in sent[1].flags and "END_STREAM" in sent[2].flags
    assert len(sent[1].data) < 8  # the second block is all indexes
    enc = Encoder()
    c.receive_data(hdrs(1, enc.encode(OK)) + data_frame(1, b"reply") + hdrs(1, enc.encode([(b"grpc-status", b"0")]),
                                                                               end_stream=True))
    assert rec.calls == [("response", 1, 200, [(b"content-type", b"application/grpc")], False),
                         ("data", 1, b"reply", 5), ("trailers", 1, [(b"grpc-status", b"0")]), ("end", 1)]
    assert c.done(1) and not c.done(3)
    rec.calls.clear()
    c.receive_data(hdrs(3, enc.encode([(b":status", b"404")]), end_stream=True))  # a trailers-only answer
    assert rec.calls == [("response", 3, 404, [], True), ("end", 3)]
    assert c.done(3) and not c.streams


def test_frames_split_across_reads_continuation_padding_and_interim_heads():
    c, rec, enc = client()
    c.send_headers(REQ, True)
    enc100 = enc.encode([(b":status", b"100")])
    big = enc.encode([(b":status", b"200"), (b"x-big", b"v" * 300)])
    raw = (hdrs(1, enc100) + hdrs(1, big[:100], end_headers=False)
           + ContinuationFrame(1, data=big[100:], flags=["END_HEADERS"]).serialize()
           + data_frame(1, b"abc", pad=10) + hdrs(1, enc.encode([(b"grpc-status", b"0")]), end_stream=True, pad=3))
    for i in range(len(raw)):
        c.receive_data(raw[i:i + 1])
    assert rec.calls == [("response", 1, 200, [(b"x-big", b"v" * 300)], False), ("data", 1, b"abc", 14),
                         ("trailers", 1, [(b"grpc-status", b"0")]), ("end", 1)]


def test_server_settings_frame_size_initial_window_and_table_size():
    c, rec, _enc = client({SettingsFrame.INITIAL_WINDOW_SIZE: 10})
    sid = c.send_headers(REQ, False)
    assert c.window(sid) == 10
    c.receive_data(SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 100,
                                              SettingsFrame.MAX_FRAME_SIZE: 20000,
                                              SettingsFrame.HEADER_TABLE_SIZE: 0}).serialize())
    assert rec.calls == [("settings", None, True)]
    assert c.window(sid) == 100 and c.max_frame == 20000
    c.data_to_send()
    huge = [*REQ, (b"x-huge", b"h" * 30000)]
    c.send_headers(huge, True)
    out = frames(c.data_to_send())
    assert [type(f) for f in out] == [HeadersFrame, ContinuationFrame]
    assert len(out[0].data) == 20000 and "END_HEADERS" in out[1].flags
    dec = Decoder()
    assert dec.decode(out[0].data + out[1].data, raw=True) == huge  # starts with the table size update
    assert dec.header_table.maxsize == 0


def test_send_windows_and_window_updates():
    c, rec, _enc = client({SettingsFrame.INITIAL_WINDOW_SIZE: 5})
    sid = c.send_headers(REQ, False)
    c.send_data(sid, b"12345")
    assert c.window(sid) == 0 and c.send_window == 65530
    c.receive_data(WindowUpdateFrame(sid, window_increment=50).serialize()
                   + WindowUpdateFrame(0, window_increment=5).serialize())
    assert rec.calls == [("window", sid), ("window", 0)]
    assert c.window(sid) == 50 and c.send_window == 65535
    with pytest.raises(H2ConnectionError):
        c.receive_data(WindowUpdateFrame(0, window_increment=(1 << 31) - 1).serialize())
    assert goaway_code(c) == h2frames.FLOW_CONTROL_ERROR


def test_received_data_is_acknowledged_in_batches():
    c, rec, enc = client(window=65536, conn_window=1 << 20)
    sid = c.send_headers(REQ, True)
    c.data_to_send()
    c.receive_data(hdrs(sid, enc.encode(OK)) + data_frame(sid, b"x" * 16384) + data_frame(sid, b"x" * 3616))
    c.acknowledge_received_data(20000, sid)
    assert c.data_to_send() == b""  # less than half a window owed
    c.receive_data(data_frame(sid, b"x" * 16384))
    c.acknowledge_received_data(16384, sid)
    out = frames(c.data_to_send())
    assert [(f.stream_id, f.window_increment) for f in out] == [(sid, 36384)]  # the connection's is larger
    c.receive_data(data_frame(sid, b"x" * 16384) + data_frame(sid, b"x" * 16384) + data_frame(sid, b"x" * 16384)
                   + data_frame(sid, b"x" * 16384))
    assert rec.calls[-1][0] == "data"
    c.receive_data(data_frame(sid, b"x" * 100))  # past the stream's window: a stream error
    assert rec.calls[-1] == ("reset", sid, h2frames.FLOW_CONTROL_ERROR, False)
    assert [type(f) for f in frames(c.data_to_send())][:1] == [RstStreamFrame]


def test_rst_stream_goaway_and_ping():
    c, rec, enc = client()
    s1, s3, s5 = (c.send_headers(REQ, True) for _ in range(3))
    c.data_to_send()
    c.receive_data(RstStreamFrame(s1, error_code=h2frames.REFUSED_STREAM).serialize()
                   + PingFrame(0, b"pingpong").serialize())
    assert rec.calls == [("reset", s1, h2frames.REFUSED_STREAM, True)]
    ping = frames(c.data_to_send())
    assert isinstance(ping[0], PingFrame) and "ACK" in ping[0].flags and ping[0].opaque_data == b"pingpong"
    c.receive_data(GoAwayFrame(0, last_stream_id=s3, error_code=0).serialize())
    assert rec.calls[-1] == ("goaway", s3, 0)
    assert not c.can_open() and c.send_headers(REQ, True) == 0
    assert s5 not in c.streams and s3 in c.streams
    c.receive_data(hdrs(s3, enc.encode(OK)) + data_frame(s3, b"done", end=True))  # below last_stream_id: finishes
    assert rec.calls[-2:] == [("data", s3, b"done", 4), ("end", s3)]


@pytest.mark.parametrize(("raw", "code"), [
    (PushPromiseFrame(1, promised_stream_id=2, data=b"", flags=["END_HEADERS"]).serialize(), h2frames.PROTOCOL_ERROR),
    (DataFrame(9, data=b"x").serialize(), h2frames.PROTOCOL_ERROR),  # a stream we never opened
    (b"\x00\x40\x01\x00\x00\x00\x00\x00\x01" + b"x" * 16385, h2frames.FRAME_SIZE_ERROR),
    (b"\x00\x00\x01\x01\x05\x00\x00\x00\x01\xff", h2frames.COMPRESSION_ERROR),  # a broken HPACK block
    (ContinuationFrame(1, data=b"").serialize(), h2frames.PROTOCOL_ERROR),
    (b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00", h2frames.PROTOCOL_ERROR),  # WINDOW_UPDATE of 0
    (SettingsFrame(0, settings={SettingsFrame.ENABLE_PUSH: 1}).serialize(), h2frames.PROTOCOL_ERROR),
])
def test_connection_errors_queue_goaway(raw, code):
    c, _rec, _enc = client()
    c.send_headers(REQ, True)
    c.data_to_send()
    with pytest.raises(H2ConnectionError):
        c.receive_data(raw)
    assert goaway_code(c) == code and c.dead


def test_stream_errors_reset_only_that_stream():
    c, rec, enc = client()
    s1, s3, s5 = (c.send_headers(REQ, True) for _ in range(3))
    c.data_to_send()
    c.receive_data(data_frame(s1, b"early"))  # DATA before the response head: malformed
    c.receive_data(hdrs(s3, enc.encode([(b"content-type", b"x")])))  # no :status
    c.receive_data(hdrs(s5, enc.encode(OK)) + hdrs(s5, enc.encode([(b"grpc-status", b"0")])))  # trailers not ending
    assert rec.calls == [("reset", s1, h2frames.PROTOCOL_ERROR, False), ("reset", s3, h2frames.PROTOCOL_ERROR, False),
                         ("response", s5, 200, [(b"content-type", b"application/grpc")], False),
                         ("reset", s5, h2frames.PROTOCOL_ERROR, False)]
    assert [type(f) for f in frames(c.data_to_send())] == [RstStreamFrame] * 3
    c.receive_data(data_frame(s1, b"late"))  # a stream we reset: ignored, connection window handed back
    assert rec.calls[-1][0] == "reset" and not c.dead


def test_field_encoder_round_trips_through_hpack_with_eviction_and_volatile_fields():
    rnd = random.Random(7)
    for table in (4096, 256, 0):
        enc, dec = FieldEncoder(), Decoder()
        enc.set_max(table)
        for i in range(300):
            fields = [*REQ[:4], (b"x-request-id", b"%032x" % rnd.getrandbits(128)),
                      (b"x-n%d" % rnd.randrange(150), b"v" * rnd.randrange(200)), (b"user-agent", b"grpc-python")]
            if i % 50 == 0:
                fields.append((b"authorization", b"Bearer " + b"t" * 300))
            assert dec.decode(enc.encode(fields), raw=True) == fields
        assert enc.size <= table
        assert not any(f[0][0] == b"x-request-id" for f in enc.entries)
