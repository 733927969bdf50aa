from __future__ import annotations

import asyncio

from tests.helpers.config import HOST, simple_mesh, write
from tests.helpers.net import RawClient, free_port, standalone_proxy
from tests.helpers.upstreams import RecordingUpstream


async def test_get_through_proxy(tmp_path):
    async with RecordingUpstream("u1") as up:
        port = free_port()
        write(tmp_path, simple_mesh(port, [up.port]))
        async with standalone_proxy(tmp_path):
            c = await RawClient.connect(port)
            r = await c.request("GET", "/hello", HOST)
            assert r.status == 200, r
            assert r.body == b"hello from u1"
            r = await c.request("POST", "/echo", HOST, body=b"abc")
            assert r.body == b"abc"
            r = await c.request("GET", "/x", "nope")
            assert r.status == 404 and r.header("x-pillion-flags") == "NR"
            r = await c.request("GET", "/chunked?n=4", HOST)
            assert r.body == b"piece-0;piece-1;piece-2;piece-3;"
            await c.close()
            assert up.state.connections == 1
            await asyncio.sleep(0)
