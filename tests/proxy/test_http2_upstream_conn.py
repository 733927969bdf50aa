"""``proxy.upstream_h2conn``: one upstream HTTP/2 connection fed raw server frames (no sockets).

A fake server's frames (hpack + hyperframe) go into ``data_received``; what
the connection writes is parsed back. The exchanges are recorders standing
in for the core's stream: they check the error types the retry policy keys
on (REFUSED_STREAM and GOAWAY -> RefusedStreamError, other resets ->
UpstreamResetError), pause/resume acknowledging, and send-side flow control.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hpack import Decoder, Encoder
from hyperframe.frame import (
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from proxy.errors import RefusedStreamError, UpstreamProtocolError, UpstreamResetError
from proxy.h2frames import REFUSED_STREAM
from proxy.upstream_h2conn import H2Exchange, H2UpstreamConnection
from tests.proxy.test_http2_client_wire import PREFACE, data_frame, frames, hdrs

HEAD = b"POST /pkg.Svc/M HTTP/1.1\r\nhost: svc:50051\r\ncontent-type: application/grpc\r\nte: trailers\r\n\r\n"


class Transport:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def take(self) -> list[Any]:
        out = bytes(self.data)
        self.data.clear()
        if out.startswith(PREFACE):
            out = out[24:]
        return frames(out)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class Pool:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.max_streams = 100
        self.max_uses = 0
        self.tls = None
        self.host, self.port = "127.0.0.1", 1
        self.served = 0
        self.forgotten = False

    def serve_waiters(self) -> None:
        self.served += 1

    def forget(self, conn: Any) -> None:
        self.forgotten = True


class Exchange:
    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.paused = 0

    def h2_fields(self, head: bytes, scheme: bytes) -> None:
        return None

    def on_upstream_head(self, status, reason, headers, keep_alive):  # type: ignore[no-untyped-def]
        self.events.append(("head", status, headers))

    def on_upstream_body(self, data: bytes) -> None:
        self.events.append(("body", data))

    def on_upstream_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        self.events.append(("trailers", trailers))

    def on_upstream_complete(self, keep_alive: bool) -> None:
        self.events.append(("complete",))

    def on_upstream_error(self, err: Exception) -> None:
        self.events.append(("error", type(err)))

    def on_upstream_flush(self) -> None:
        pass

    def pause_downstream(self) -> None:
        self.paused += 1

    def resume_downstream(self) -> None:
        self.paused -= 1


def connect(settings: dict[int, int] | None = None) -> tuple[H2UpstreamConnection, Transport, Encoder]:
    conn = H2UpstreamConnection(Pool())  # type: ignore[arg-type]
    t = Transport()
    conn.connection_made(t)  # type: ignore[arg-type]
    conn.data_received(SettingsFrame(0, settings=settings or {}).serialize())
    conn.ready = True
    t.take()
    return conn, t, Encoder()


def start(conn: H2UpstreamConnection, end: bool = True) -> tuple[H2Exchange, Exchange]:
    up = conn.new_exchange()
    ex = Exchange()
    up.exchange = ex
    up.send_head(HEAD, end)
    conn.flush()
    return up, ex


async def test_a_call_turns_the_http1_head_into_headers_and_relays_the_answer():
    conn, t, enc = connect()
    up, ex = start(conn)
    sent = t.take()
    assert isinstance(sent[0], HeadersFrame) and sent[0].stream_id == 1
    assert Decoder().decode(sent[0].data, raw=True) == [
        (b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"svc:50051"), (b":path", b"/pkg.Svc/M"),
        (b"content-type", b"application/grpc"), (b"te", b"trailers")]
    conn.data_received(hdrs(1, enc.encode([(b":status", b"200")])) + data_frame(1, b"hi")
                       + hdrs(1, enc.encode([(b"grpc-status", b"0")]), end_stream=True))
    assert ex.events == [("head", 200, []), ("body", b"hi"), ("trailers", [(b"grpc-status", b"0")]), ("complete",)]
    up.release(True)
    assert conn.active == 0 and not conn.streams and not conn.h2.streams
    assert t.take() == []  # both sides ended it: no RST_STREAM, and 2 bytes are not worth a WINDOW_UPDATE


async def test_refused_stream_and_other_resets_map_to_the_retry_errors():
    conn, _t, _enc = connect()
    (_, ex1), (_, ex3) = start(conn), start(conn)
    conn.data_received(RstStreamFrame(1, error_code=REFUSED_STREAM).serialize()
                       + RstStreamFrame(3, error_code=2).serialize())
    assert ex1.events == [("error", RefusedStreamError)]
    assert issubclass(ex3.events[0][1], UpstreamResetError) and ex3.events[0][1] is not RefusedStreamError
    assert conn.active == 0


async def test_goaway_refuses_the_streams_it_did_not_process_and_lets_the_others_finish():
    conn, t, enc = connect()
    (up1, ex1), (_, ex3) = start(conn), start(conn)
    conn.data_received(GoAwayFrame(0, last_stream_id=1, error_code=0).serialize())
    assert ex3.events == [("error", RefusedStreamError)]
    assert not conn.usable() and not t.closed
    conn.data_received(hdrs(1, enc.encode([(b":status", b"200")]), end_stream=True))
    assert ex1.events == [("head", 200, []), ("complete",)]
    up1.release(True)
    assert t.closed  # the last stream ended: the connection closes (with our own GOAWAY)
    assert isinstance(t.take()[-1], GoAwayFrame)


async def test_a_goaway_between_acquire_and_headers_is_a_refused_stream():
    conn, t, _enc = connect()
    up = conn.new_exchange()
    ex = Exchange()
    up.exchange = ex
    conn.data_received(GoAwayFrame(0, last_stream_id=0, error_code=0).serialize())
    up.send_head(HEAD, True)
    assert ex.events == []  # told on the next loop iteration, not inside the caller's flush
    step = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(step.set_result, None)  # runs after the callback send_head queued
    await step
    assert ex.events == [("error", RefusedStreamError)] and t.closed


async def test_paused_downstream_stops_acknowledging_and_resume_hands_the_window_back():
    conn, t, enc = connect()
    up, _ex = start(conn)
    t.take()
    up.pause_reading()
    chunk = b"x" * 16384
    conn.data_received(hdrs(1, enc.encode([(b":status", b"200")])) + b"".join(data_frame(1, chunk) for _ in range(40)))
    assert t.take() == []  # 640 KiB received, none acknowledged while paused
    assert up.unacked == 40 * 16384
    up.resume_reading()
    conn.flush()
    ups = {f.stream_id: f.window_increment for f in t.take() if isinstance(f, WindowUpdateFrame)}
    assert ups == {0: 40 * 16384, 1: 40 * 16384}


async def test_request_body_waits_for_the_servers_window():
    conn, t, _enc = connect({SettingsFrame.INITIAL_WINDOW_SIZE: 10})
    up, ex = start(conn, end=False)
    t.take()
    up.send_data(b"a" * 100_000, True)
    conn.flush()
    sent = t.take()
    assert [(type(f), len(f.data)) for f in sent] == [(DataFrame, 10)]
    assert ex.paused == 1  # more than PEND_HIGH queued: the downstream stops being read
    conn.data_received(WindowUpdateFrame(1, window_increment=200_000).serialize())
    sent = t.take()
    assert sum(len(f.data) for f in sent if isinstance(f, DataFrame)) == 65535 - 10  # now the connection's window
    conn.data_received(WindowUpdateFrame(0, window_increment=100_000).serialize())
    sent = [f for f in t.take() if isinstance(f, DataFrame)]
    assert sum(len(f.data) for f in sent) == 100_000 - 65535 and "END_STREAM" in sent[-1].flags
    assert max(len(f.data) for f in sent) <= 16384 and ex.paused == 0


async def test_max_concurrent_streams_and_a_connection_error_failing_every_stream():
    conn, t, _enc = connect()
    conn.data_received(SettingsFrame(0, settings={SettingsFrame.MAX_CONCURRENT_STREAMS: 1}).serialize())
    assert conn.limit == 1 and conn.pool.served  # type: ignore[attr-defined]
    _, ex = start(conn)
    assert not conn.usable()
    t.take()
    conn.data_received(b"\x00\x00\x01\x01\x05\x00\x00\x00\x01\xff")  # a broken HPACK block
    assert ex.events == [("error", UpstreamProtocolError)]
    assert t.closed and [type(f) for f in t.take()] == [GoAwayFrame]
