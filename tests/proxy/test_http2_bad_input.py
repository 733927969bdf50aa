"""Hostile and malformed HTTP/2 input: the right RST_STREAM or GOAWAY, nothing reaches the upstream.

The client is the h2 library with its own outbound validation off (so it can
send what a conforming client never would), or raw hyperframe frames. Each
test also checks that a second connection to the same listener keeps working
and that the recording upstream saw only the well-formed requests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, SettingsFrame

from tests.helpers.config import HOST, simple_mesh, write
from tests.helpers.h2server import H2Client, H2Response
from tests.helpers.net import free_port, standalone_proxy
from tests.helpers.upstreams import RecordingUpstream

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@contextlib.asynccontextmanager
async def proxy(tmp_path: Path) -> AsyncIterator[tuple[int, RecordingUpstream]]:
    async with RecordingUpstream("app") as up:
        port = free_port()
        write(tmp_path, simple_mesh(port, [up.port]))
        async with standalone_proxy(tmp_path, drain_seconds=0.2):
            yield port, up


@contextlib.asynccontextmanager
async def client(port: int) -> AsyncIterator[H2Client]:
    c = await H2Client.connect(port, validate=False)
    try:
        await asyncio.wait_for(c.settings.wait(), 5)
        yield c
    finally:
        c.close()


async def still_serves(port: int) -> None:
    async with client(port) as other:
        r = await other.request("GET", "/ok", HOST)
        assert r.status == 200 and r.body == b"hello from app"


GOOD = [(":method", "GET"), (":scheme", "http"), (":authority", HOST), (":path", "/x")]


@pytest.mark.parametrize("headers", [
    pytest.param([(":method", "GET"), (":scheme", "http"), (":authority", HOST)], id="no-path"),
    pytest.param([(":method", "GET"), (":authority", HOST), (":path", "/x")], id="no-scheme"),
    pytest.param([(":scheme", "http"), (":authority", HOST), (":path", "/x")], id="no-method"),
    pytest.param([*GOOD, (":path", "/y")], id="repeated-pseudo"),
    pytest.param([*GOOD, (":status", "200")], id="response-pseudo"),
    pytest.param([(":method", "GET"), ("x-a", "1"), (":scheme", "http"), (":authority", HOST), (":path", "/x")],
                 id="pseudo-after-regular"),
    pytest.param([*GOOD, ("X-Upper", "1")], id="uppercase-name"),
    pytest.param([*GOOD, ("connection", "keep-alive")], id="connection"),
    pytest.param([*GOOD, ("transfer-encoding", "chunked")], id="transfer-encoding"),
    pytest.param([*GOOD, ("upgrade", "h2c")], id="upgrade"),
    pytest.param([*GOOD, ("te", "gzip")], id="te-not-trailers"),
    pytest.param([*GOOD, ("x-bad", "a\r\nb")], id="crlf-in-value"),
    pytest.param([*GOOD, ("x-bad", " padded")], id="leading-space"),
    pytest.param([(":method", "GET"), (":scheme", "http"), (":authority", HOST), (":path", "")], id="empty-path"),
])
async def test_malformed_requests_are_reset_with_protocol_error(tmp_path, headers):
    async with proxy(tmp_path) as (port, up), client(port) as c:
        sid = c.raw.get_next_available_stream_id()
        c.responses[sid] = H2Response()
        c.done[sid] = asyncio.get_running_loop().create_future()
        c.raw.send_headers(sid, [(k.encode(), v.encode()) for k, v in headers], end_stream=True)
        c.flush()
        r = await c.response(sid)
        assert r.reset == ErrorCodes.PROTOCOL_ERROR and r.status == 0
        # the same connection goes on
        r = await c.request("GET", "/after", HOST)
        assert r.status == 200
        await still_serves(port)
        assert [q.path for q in up.requests] == ["/after", "/ok"]


async def test_header_list_over_the_limit_is_431_and_the_connection_goes_on(tmp_path):
    async with proxy(tmp_path) as (port, up), client(port) as c:
        r = await c.request("GET", "/big-header", HOST, [("x-big", "a" * 70_000)])
        assert r.status == 431
        r = await c.request("GET", "/many", HOST, [(f"x-h{i}", "v") for i in range(150)])
        assert r.status == 431
        r = await c.request("GET", "/fine", HOST)
        assert r.status == 200
        assert [q.path for q in up.requests] == ["/fine"]


async def test_huge_header_block_is_a_connection_error(tmp_path):
    async with proxy(tmp_path) as (port, up), client(port) as c:
        c.start("GET", "/huge", HOST, [(f"x-h{i}", "b" * 8000) for i in range(40)])
        await c.wait(lambda: c.goaway is not None or c.closed.is_set())
        assert c.goaway is not None and c.goaway.error_code != ErrorCodes.NO_ERROR
        await still_serves(port)
        assert [q.path for q in up.requests] == ["/ok"]


async def test_data_on_a_closed_stream_is_dropped(tmp_path):
    async with proxy(tmp_path) as (port, up), client(port) as c:
        r = await c.request("GET", "/done", HOST)
        assert r.status == 200
        stray = DataFrame(1)
        stray.data = b"late"
        c.transport.write(stray.serialize())  # type: ignore[union-attr]
        # a stream error at most (h2 answers RST_STREAM STREAM_CLOSED, RFC 9113 5.1, and hands the
        # connection window back): no GOAWAY, the connection goes on, the stray bytes go nowhere
        r = await c.request("GET", "/next", HOST)
        assert r.status == 200
        await still_serves(port)
        assert c.goaway is None
        assert [q.path for q in up.requests] == ["/done", "/next", "/ok"]
        assert b"late" not in up.state.all_bytes


async def test_malformed_frames_end_the_connection_with_the_right_code(tmp_path):
    async with proxy(tmp_path) as (port, up):
        for raw, code in (
            (b"\x00\x00\x04\x04\x00\x00\x00\x00\x00" + b"\x00" * 4, ErrorCodes.FRAME_SIZE_ERROR),  # SETTINGS of 4
            (b"\x00\x00\x08\x00\x01\x00\x00\x00\x00" + b"x" * 8, ErrorCodes.PROTOCOL_ERROR),  # DATA on stream 0
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(PREFACE + SettingsFrame(0).serialize() + raw)
            got = b""
            with contextlib.suppress(ConnectionError):
                while True:
                    chunk = await asyncio.wait_for(reader.read(65536), 5)
                    if not chunk:
                        break
                    got += chunk
            writer.close()
            goaway = got.find(b"\x07\x00\x00\x00\x00\x00")  # type GOAWAY, no flags, stream 0
            assert goaway >= 3, got
            assert int.from_bytes(got[goaway + 10:goaway + 14], "big") == code
        await still_serves(port)
        assert [q.path for q in up.requests] == ["/ok"]


async def test_rapid_reset_flood_gets_enhance_your_calm(tmp_path):
    async with proxy(tmp_path) as (port, _up), client(port) as c:
        for _ in range(250):  # default: more than 200 resets within 1 s
            sid = c.raw.get_next_available_stream_id()
            c.raw.send_headers(sid, [(k.encode(), v.encode()) for k, v in GOOD])
            c.raw.reset_stream(sid, ErrorCodes.CANCEL)
        c.flush()
        await c.wait(lambda: c.goaway is not None or c.closed.is_set())
        assert c.goaway is not None and c.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        await asyncio.wait_for(c.closed.wait(), 5)
        await still_serves(port)
