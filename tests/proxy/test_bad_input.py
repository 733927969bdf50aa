"""Malformed requests: the proxy answers with a 4xx/5xx, closes, and forwards nothing.

Each case is one raw write (so the proxy sees the whole request in one read)
carrying a marker; the ``RecordingUpstream`` behind the proxy proves that
none of the request's bytes reached it. Expected statuses are Envoy's.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.config import HOST, simple_mesh, write
from tests.helpers.net import ProxyHandle, RawClient, free_port, standalone_proxy
from tests.helpers.upstreams import RecordingUpstream

MARKER = b"m4rk3r"


@dataclass
class Setup:
    port: int
    up: RecordingUpstream
    proxy: ProxyHandle


@contextlib.asynccontextmanager
async def proxied(tmp_path: Path) -> AsyncIterator[Setup]:
    async with RecordingUpstream("u1") as up:
        port = free_port()
        write(tmp_path, simple_mesh(port, [up.port]))
        async with standalone_proxy(tmp_path, drain_seconds=0.5) as proxy:
            yield Setup(port, up, proxy)


def req(*lines: bytes, body: bytes = b"") -> bytes:
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


H = b"host: " + HOST.encode()
# (id, raw request, expected status, whether the proxy may have opened an upstream connection)
CASES = [
    ("bad-request-line", req(b"G(T /" + MARKER + b" HTTP/1.1", H), 400, False),
    ("bad-version", req(b"GET /" + MARKER + b" HTTP/7.x", H), 400, False),
    ("header-name-with-space", req(b"GET /" + MARKER + b" HTTP/1.1", H, b"bad name: x"), 400, False),
    ("header-name-ctl-byte", req(b"GET /" + MARKER + b" HTTP/1.1", H, b"bad\x01name: x"), 400, False),
    ("nul-in-header-value", req(b"GET /" + MARKER + b" HTTP/1.1", H, b"x-a: a\x00b"), 400, False),
    ("cl-and-te", req(b"POST /" + MARKER + b" HTTP/1.1", H, b"content-length: 5", b"transfer-encoding: chunked",
                      body=b"5\r\nhello\r\n0\r\n\r\n"), 400, False),
    ("two-differing-cl", req(b"POST /" + MARKER + b" HTTP/1.1", H, b"content-length: 5", b"content-length: 6",
                             body=b"hello!"), 400, False),
    ("oversized-headers", req(b"GET /" + MARKER + b" HTTP/1.1", H,
                              *[b"x-pad-%03d: %s" % (i, b"p" * 1000) for i in range(70)]), 431, False),
    ("oversized-request-target", req(b"GET /" + MARKER + b"/" + b"u" * 70 * 1024 + b" HTTP/1.1", H), 431, False),
    ("invalid-chunk-size", req(b"POST /" + MARKER + b" HTTP/1.1", H, b"transfer-encoding: chunked",
                               body=b"zz\r\nhello\r\n0\r\n\r\n"), 400, True),
    ("te-gzip-chunked", req(b"POST /" + MARKER + b" HTTP/1.1", H, b"transfer-encoding: gzip, chunked",
                            body=b"5\r\nhello\r\n0\r\n\r\n"), 501, False),
    ("te-gzip", req(b"POST /" + MARKER + b" HTTP/1.1", H, b"transfer-encoding: gzip", body=b"hello"), 501, False),
    ("missing-host", req(b"GET /" + MARKER + b" HTTP/1.1", b"x-a: 1"), 400, False),
    ("two-hosts", req(b"GET /" + MARKER + b" HTTP/1.1", H, H), 400, False),
    ("two-different-hosts", req(b"GET /" + MARKER + b" HTTP/1.1", H, b"host: other.example"), 400, False),
]


@pytest.mark.parametrize(("raw", "status", "may_connect"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_bad_request_is_rejected_closed_and_never_forwarded(tmp_path, raw, status, may_connect):
    async with proxied(tmp_path) as s:
        c = await RawClient.connect(s.port)
        try:
            await c.send(raw)
            r = await c.response(timeout=2.0)
            assert r.status == status, r
            assert not r.keep_alive
            assert await c.eof(timeout=1.0)
        finally:
            await c.close()
        assert MARKER not in s.up.state.all_bytes
        assert s.up.requests == []
        if not may_connect:
            assert s.up.state.connections == 0


async def test_bad_request_after_a_good_one_on_the_same_connection(tmp_path):
    async with proxied(tmp_path) as s:
        c = await RawClient.connect(s.port)
        try:
            r = await c.request("GET", "/good", HOST)
            assert r.status == 200 and r.keep_alive
            await c.send(req(b"GET /" + MARKER + b" HTTP/1.1", H, b"x-a: a\x00b"))
            r = await c.response(timeout=2.0)
            assert r.status == 400
            assert await c.eof(timeout=1.0)
        finally:
            await c.close()
        assert [q.path for q in s.up.requests] == ["/good"]
        assert MARKER not in s.up.state.all_bytes


async def test_bad_request_pipelined_behind_a_good_one_in_one_write(tmp_path):
    # Envoy parses a pipelined request only once the previous response is done, so the
    # good request is answered before the bad one gets its 400.
    async with proxied(tmp_path) as s:
        c = await RawClient.connect(s.port)
        try:
            await c.send(req(b"GET /good HTTP/1.1", H) + req(b"GET /" + MARKER + b" HTTP/1.1", H, b"x-a: a\x00b"))
            r = await c.response(timeout=2.0)
            assert r.status == 200
            r = await c.response(timeout=2.0)
            assert r.status == 400
            assert await c.eof(timeout=1.0)
        finally:
            await c.close()
        assert MARKER not in s.up.state.all_bytes


async def test_headers_under_the_limit_are_accepted(tmp_path):
    # Control for the 431 case: 50 KiB of headers is within Envoy's default 60 KiB.
    pads = {f"x-pad-{i:03d}": "p" * 1000 for i in range(50)}
    async with proxied(tmp_path) as s:
        c = await RawClient.connect(s.port)
        try:
            r = await c.request("GET", "/big-head", HOST, headers=pads)
            assert r.status == 200
        finally:
            await c.close()
        assert s.up.requests[0].header("x-pad-049") == "p" * 1000


async def test_protocol_errors_are_counted(tmp_path):
    async with proxied(tmp_path) as s:
        for _ in range(2):
            c = await RawClient.connect(s.port)
            try:
                await c.send(req(b"G(T / HTTP/1.1", H))
                assert (await c.response(timeout=2.0)).status == 400
            finally:
                await c.close()
        _, body = await s.proxy.admin_get("/stats/prometheus")
        lines = [ln for ln in body.decode().splitlines() if ln.startswith("envoy_listener_downstream_protocol_error{")]
        assert any(ln.endswith(" 2") and f"_{s.port}" in ln for ln in lines), lines


async def test_more_than_100_headers_is_431_and_never_forwarded(tmp_path):
    """Envoy's default max_headers_count is 100; one more is refused like oversized headers."""
    from tests.helpers.config import HOST, simple_mesh, write
    from tests.helpers.net import free_port, one_request, standalone_proxy
    from tests.helpers.upstreams import RecordingUpstream

    async with RecordingUpstream("u") as up:
        port = free_port()
        write(tmp_path, simple_mesh(port, [up.port]))
        async with standalone_proxy(tmp_path):
            many = "".join(f"x-h{i}: v\r\n" for i in range(100))
            r = await one_request(port, f"GET /many HTTP/1.1\r\nhost: {HOST}\r\n{many}\r\n".encode())
            assert r.status == 431 and not r.keep_alive
            ok = "".join(f"x-h{i}: v\r\n" for i in range(99))
            r = await one_request(port, f"GET /fine HTTP/1.1\r\nhost: {HOST}\r\n{ok}\r\n".encode())
            assert r.status == 200
            assert [q.path for q in up.requests] == ["/fine"]
