"""Request trailers through the proxy, every way the two sides can meet.

HTTP/2 -> HTTP/2: a HEADERS frame after the DATA; HTTP/2 or chunked HTTP/1.1 ->
chunked HTTP/1.1: the last chunk's fields; chunked HTTP/1.1 -> HTTP/2: a HEADERS
frame. Fields about framing or the connection never pass, and a malformed
trailer block from an HTTP/2 client resets that stream (PROTOCOL_ERROR) before
the upstream gets a complete request. Same mesh as ``test_http2`` (a real
standalone proxy, an h1 ``RecordingUpstream`` and an h2 ``H2Server``).
"""

from __future__ import annotations

import asyncio

from h2.errors import ErrorCodes

from tests.helpers.config import HOST
from tests.helpers.h2server import H2Client, H2Response
from tests.helpers.net import RawClient
from tests.proxy.test_http2 import H2HOST, h2client, mesh

TRAILERS = [("x-checksum", "abc123"), ("x-count", "2")]


def send_trailers(c: H2Client, sid: int, trailers: list[tuple[str, str]]) -> None:
    c.raw.send_headers(sid, [(k.encode(), v.encode()) for k, v in trailers], end_stream=True)
    c.flush()


async def test_h2_client_trailers_reach_an_h2_upstream(tmp_path):
    async with mesh(tmp_path) as m, h2client(m.h2_port) as c:
        sid = c.start("POST", "/echo", H2HOST, [("te", "trailers")], b"part-1", end=False)
        c.send_body(sid, b"part-2", end=False)
        send_trailers(c, sid, TRAILERS)
        r = await c.response(sid)
        assert r.status == 200 and r.body == b"part-1part-2"
        req = m.h2up.requests[-1]
        assert req.body == b"part-1part-2" and req.trailers == TRAILERS


async def test_trailers_wait_behind_a_body_the_upstream_window_holds_back(tmp_path):
    body = bytes(range(256)) * 1200  # 300 KiB: far past the upstream's initial 64 KiB window
    async with mesh(tmp_path) as m, h2client(m.h2_port) as c:
        sid = c.start("POST", "/echo", H2HOST, [], None, end=False)
        await c.send_all(sid, body, end=False)
        send_trailers(c, sid, TRAILERS)
        r = await c.response(sid)
        assert r.status == 200 and r.body == body
        req = m.h2up.requests[-1]
        assert req.body == body and req.trailers == TRAILERS


async def test_h2_client_trailers_go_in_the_last_chunk_to_http1(tmp_path):
    async with mesh(tmp_path) as m, h2client(m.http_port) as c:
        sid = c.start("POST", "/echo", HOST, [], b"abcd", end=False)
        send_trailers(c, sid, [*TRAILERS, ("content-length", "4")])  # a framing field never passes
        r = await c.response(sid)
        assert r.status == 200
        raw = m.up.state.all_bytes
        assert b"transfer-encoding: chunked\r\n" in raw
        assert raw.endswith(b"4\r\nabcd\r\n0\r\nx-checksum: abc123\r\nx-count: 2\r\n\r\n"), raw
        # no body at all: only the last chunk, with the trailers
        sid = c.start("POST", "/empty", HOST, [], None, end=False)
        send_trailers(c, sid, TRAILERS)
        assert (await c.response(sid)).status == 200
        assert m.up.state.all_bytes.endswith(b"\r\n\r\n0\r\nx-checksum: abc123\r\nx-count: 2\r\n\r\n")
        # a body with a content-length goes as is: HTTP/1.1 has no place for trailers there (dropped, as Envoy does)
        sid = c.start("POST", "/sized", HOST, [("content-length", "3")], b"xyz", end=False)
        send_trailers(c, sid, TRAILERS)
        assert (await c.response(sid)).status == 200
        assert m.up.requests[-1].body == b"xyz" and m.up.state.all_bytes.endswith(b"\r\n\r\nxyz")


async def test_http1_chunked_trailers_reach_both_kinds_of_upstream(tmp_path):
    body = "transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Checksum: abc123\r\nConnection: x\r\n\r\n"
    async with mesh(tmp_path) as m:
        c = await RawClient.connect(m.h2_port)
        try:
            await c.send(f"POST /echo HTTP/1.1\r\nhost: {H2HOST}\r\n{body}".encode())
            r = await c.response()
            assert r.status == 200 and r.body == b"abc"
        finally:
            await c.close()
        assert m.h2up.requests[-1].trailers == [("x-checksum", "abc123")]

        c = await RawClient.connect(m.http_port)
        try:
            await c.send(f"POST /t HTTP/1.1\r\nhost: {HOST}\r\n{body}".encode())
            assert (await c.response()).status == 200
        finally:
            await c.close()
        assert m.up.state.all_bytes.endswith(b"3\r\nabc\r\n0\r\nx-checksum: abc123\r\n\r\n")
        seen = m.up.requests[-1].headers
        assert ("x-checksum", "abc123") in seen and ("connection", "x") not in seen


async def test_a_malformed_trailer_block_resets_the_stream_and_the_upstream_gets_nothing(tmp_path):
    async with mesh(tmp_path) as m, h2client(m.http_port, validate=False) as c:
        await asyncio.wait_for(c.settings.wait(), 5)
        for bad in ([(":path", "/x")], [("x-bad", "a\r\nb")], [("X-Upper", "1")]):
            sid = c.start("POST", "/bad", HOST, [], b"abc", end=False)
            send_trailers(c, sid, bad)
            r: H2Response = await c.response(sid)
            assert r.reset == ErrorCodes.PROTOCOL_ERROR and r.status == 0, bad
        r = await c.request("GET", "/after", HOST)  # the connection goes on
        assert r.status == 200
        assert [q.path for q in m.up.requests] == ["/after"]
