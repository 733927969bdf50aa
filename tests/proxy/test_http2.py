"""HTTP/2 through the proxy: h2c and ALPN downstream, HTTP/1.1 and HTTP/2 upstreams.

A real proxy (in-process, standalone Istio YAML) listens on an HTTP port whose
upstream is a ``RecordingUpstream`` (HTTP/1.1) and on an HTTP2 port whose
upstream is an ``H2Server`` (h2c, prior knowledge). Clients are the h2 library
over a real socket, ``curl --http2-prior-knowledge`` and plain HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.config import HOST, service_entry, sidecar, write
from tests.helpers.h2server import H2Client, H2Server
from tests.helpers.net import ProxyHandle, RawClient, free_port, standalone_proxy
from tests.helpers.upstreams import RecordingUpstream

H2HOST = "h2up.default.svc.cluster.local"


@dataclass
class Mesh:
    http_port: int  # -> HTTP/1.1 upstream
    h2_port: int  # -> HTTP/2 upstream
    up: RecordingUpstream
    h2up: H2Server
    proxy: ProxyHandle


def mesh_yaml(http_port: int, h2_port: int, up: int, h2up: int, extra: str = "") -> str:
    docs = [
        service_entry("upstream", HOST, [("http", http_port, "HTTP")], [("127.0.0.1", {"http": up}, {})]),
        service_entry("h2up", H2HOST, [("http2", h2_port, "HTTP2")], [("127.0.0.1", {"http2": h2up}, {})]),
        sidecar([(http_port, "HTTP"), (h2_port, "HTTP2")]),
    ]
    if extra:
        docs.append(extra)
    return "---\n".join(docs)


@contextlib.asynccontextmanager
async def mesh(tmp_path: Path, extra: str = "", **proxy_kw: object) -> AsyncIterator[Mesh]:
    async with RecordingUpstream("h1up") as up, H2Server("h2up") as h2up:
        http_port, h2_port = free_port(), free_port()
        write(tmp_path, mesh_yaml(http_port, h2_port, up.port, h2up.port, extra))
        async with standalone_proxy(tmp_path, drain_seconds=0.5, **proxy_kw) as proxy:  # type: ignore[arg-type]
            yield Mesh(http_port, h2_port, up, h2up, proxy)


@contextlib.asynccontextmanager
async def h2client(port: int, **kw: object) -> AsyncIterator[H2Client]:
    c = await H2Client.connect(port, **kw)  # type: ignore[arg-type]
    try:
        yield c
    finally:
        c.close()


def seen(headers: list[tuple[str, str]]) -> dict:
    raw = dict(headers).get("x-seen")
    assert raw is not None, headers
    return json.loads(raw)


# ---------------------------------------------------------------------- h2c -> HTTP/1.1 upstream
async def test_h2c_client_to_http1_upstream(tmp_path):
    async with mesh(tmp_path) as m, h2client(m.http_port) as c:
        r = await c.request("GET", "/a?b=1", HOST, [("x-custom", "v"), ("cookie", "a=1"), ("cookie", "b=2")])
        assert r.status == 200 and r.body == b"hello from h1up"
        head = seen(r.headers)
        assert head["method"] == "GET" and head["path"] == "/a?b=1"
        hdrs = {k.lower(): v for k, v in head["headers"]}
        assert hdrs["host"] == HOST and hdrs["x-custom"] == "v"
        assert hdrs["cookie"] == "a=1; b=2"  # RFC 9113 8.2.3: crumbs joined for HTTP/1.1
        assert hdrs["x-forwarded-proto"] == "http" and "x-request-id" in hdrs
        raw = m.up.state.all_bytes
        assert raw.startswith(b"GET /a?b=1 HTTP/1.1\r\n") and b":authority" not in raw

        # a body of unknown length goes chunked to HTTP/1.1; a known one keeps its length
        sid = c.start("POST", "/echo", HOST, body=None, end=False)
        await c.send_all(sid, b"x" * 100_000)
        r = await c.response(sid)
        assert r.status == 200 and r.body == b"x" * 100_000
        r = await c.request("POST", "/echo", HOST, [("content-length", "5")], b"hello")
        assert r.body == b"hello"
        assert b"transfer-encoding: chunked" in m.up.state.all_bytes


async def test_many_concurrent_streams_on_one_connection(tmp_path):
    async with mesh(tmp_path) as m, h2client(m.http_port) as c:
        await asyncio.wait_for(c.settings.wait(), 5)
        assert c.raw.remote_settings.max_concurrent_streams == 100  # the listener's setting
        sids = [c.start("POST", "/echo", HOST, [("content-length", "6")], b"n%05d" % i) for i in range(100)]
        got = await asyncio.gather(*(c.response(s) for s in sids))
        assert [r.body for r in got] == [b"n%05d" % i for i in range(100)]
        assert all(r.status == 200 for r in got)
    async with mesh(tmp_path) as m, h2client(m.h2_port) as c:
        # the other upstream, over HTTP/2, multiplexed on one connection
        await asyncio.wait_for(c.settings.wait(), 5)
        sids = [c.start("GET", f"/s{i}", H2HOST) for i in range(100)]
        got = await asyncio.gather(*(c.response(s) for s in sids))
        assert all(r.status == 200 and r.body == b"hello from h2up" for r in got)
        assert m.h2up.connections == 1


async def test_curl_http2_prior_knowledge(tmp_path):
    async with mesh(tmp_path) as m:
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sS", "--http2-prior-knowledge", "-o", "-", "-w", "\n%{http_version} %{http_code}",
            "-H", f"host: {HOST}", f"http://127.0.0.1:{m.http_port}/x", stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), 10)
        assert out.endswith(b"\n2 200") and out.startswith(b"hello from h1up"), out


async def test_http1_still_served_on_the_same_listener(tmp_path):
    async with mesh(tmp_path) as m:
        c = await RawClient.connect(m.http_port)
        try:
            r = await c.request("GET", "/", HOST)
            assert r.status == 200 and r.body == b"hello from h1up"
        finally:
            await c.close()


# ---------------------------------------------------------------------- HTTP/2 upstream
async def test_h2_to_h2_upstream_with_trailers_and_headers(tmp_path):
    async with mesh(tmp_path) as m, h2client(m.h2_port) as c:
        r = await c.request("POST", "/echo", H2HOST, [("x-want-trailers", "1"), ("te", "trailers")], b"ping")
        assert r.status == 200 and r.body == b"ping"
        assert ("x-echo-trailer", "yes") in r.trailers
        assert r.header("x-server") == "h2up"
        req = m.h2up.requests[-1]
        hd = dict(req.headers)
        assert hd[":authority"] == H2HOST and hd[":scheme"] == "http" and hd[":path"] == "/echo"
        assert hd["te"] == "trailers" and "x-forwarded-proto" in hd
        assert not any(k in hd for k in ("connection", "transfer-encoding", "host"))


async def test_http1_client_to_h2_upstream_gets_trailers_in_the_last_chunk(tmp_path):
    async with mesh(tmp_path) as m:
        c = await RawClient.connect(m.h2_port)
        try:
            await c.send(f"POST /echo HTTP/1.1\r\nhost: {H2HOST}\r\nx-want-trailers: 1\r\n"
                         "transfer-encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n".encode())
            raw = b""
            while not raw.endswith(b"\r\n\r\n") or b"\r\n0\r\n" not in raw:
                raw += await asyncio.wait_for(c.reader.read(65536), 5)
            assert raw.startswith(b"HTTP/1.1 200")
            assert b"transfer-encoding: chunked" in raw.lower()
            assert b"abcd" in raw and raw.endswith(b"0\r\nx-echo-trailer: yes\r\n\r\n")
            r = await c.request("GET", "/plain", H2HOST)
            assert r.status == 200 and r.body == b"hello from h2up"
        finally:
            await c.close()
        assert len(m.h2up.requests) == 2 and m.h2up.requests[0].body == b"abcd"


async def test_large_bodies_both_ways_with_flow_control(tmp_path):
    big = bytes(range(256)) * 12_000  # ~3 MiB: several times every window
    async with mesh(tmp_path) as m, h2client(m.h2_port, window=65535) as c:
        r = await c.request("POST", "/echo", H2HOST, body=big, timeout=20)
        assert r.status == 200 and r.body == big
        r = await c.request("GET", f"/big?n={len(big)}", H2HOST, timeout=20)
        assert len(r.body) == len(big)
    async with mesh(tmp_path) as m, h2client(m.http_port, window=65535) as c:
        # h2 client -> h1 upstream, same sizes
        r = await c.request("POST", "/echo", HOST, [("content-length", str(len(big)))], big, timeout=20)
        assert r.body == big
        r = await c.request("GET", f"/big?n={len(big)}", HOST, timeout=20)
        assert len(r.body) == len(big)


async def test_slow_upstream_reader_pushes_back_to_the_client(tmp_path):
    """The upstream does not acknowledge a request's DATA: the proxy stops acknowledging the client's."""
    async with mesh(tmp_path) as m, h2client(m.h2_port) as c:
        big = b"y" * (8 << 20)
        sid = c.start("POST", "/hold", H2HOST, body=None, end=False)
        sender = asyncio.ensure_future(c.send_all(sid, big, timeout=30))

        def upstream_got() -> int:
            return sum(len(r.body) for cn in m.h2up.conns for r in cn.reqs.values())

        # the upstream took what its window allows (65535) and no more; the client's window closed
        await m.h2up.wait_for(lambda: upstream_got() >= 65535)
        await c.wait(lambda: c.raw.local_flow_control_window(sid) == 0)
        assert not sender.done() and upstream_got() == 65535
        st = next(s for conn in _ctx(m.proxy).connections for s in getattr(conn, "streams", {}).values())
        held = sum(len(b) for b in st.out) + st.upstream.pend_bytes
        assert held <= (1 << 20) + (1 << 17), held  # about one client window (1 MiB), not the 8 MiB
        m.h2up.release()
        await sender
        r = await c.response(sid, timeout=30)
        assert r.status == 200 and len(r.body) == len(big)


async def test_refused_stream_is_retried(tmp_path):
    vs = ("apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\n"
          "metadata: {name: vs-h2, namespace: default}\n"
          f"spec:\n  hosts: [{H2HOST}]\n  http:\n  - route: [{{destination: {{host: {H2HOST}}}}}]\n"
          "    retries: {attempts: 2, retryOn: refused-stream}\n")
    async with mesh(tmp_path, extra=vs) as m, h2client(m.h2_port) as c:
        r = await c.request("GET", "/refuse-once", H2HOST)
        assert r.status == 200, r
        assert m.h2up.refused and len(m.h2up.requests) == 2


async def test_upstream_goaway_moves_new_streams_to_a_new_connection(tmp_path):
    async with mesh(tmp_path) as m, h2client(m.h2_port) as c:
        assert (await c.request("GET", "/1", H2HOST)).status == 200
        m.h2up.goaway()
        await m.h2up.wait_for(lambda: True)
        r = await c.request("GET", "/2", H2HOST)
        assert r.status == 200
        assert m.h2up.connections == 2


async def test_drain_sends_goaway_and_lets_streams_finish(tmp_path):
    async with mesh(tmp_path) as m, h2client(m.h2_port) as c:
        sid = c.start("POST", "/echo", H2HOST, body=b"part1", end=False)
        await m.h2up.wait_for(lambda: any(r.body == b"part1" for cn in m.h2up.conns for r in cn.reqs.values()))
        ctx = _ctx(m.proxy)
        for conn in list(ctx.connections):
            conn.drain()
        await c.wait(lambda: c.goaway is not None)
        assert c.goaway is not None and c.goaway.error_code == 0 and c.goaway.last_stream_id == sid
        c.send_body(sid, b"+part2")
        r = await c.response(sid)
        assert r.status == 200 and r.body == b"part1+part2"
        await asyncio.wait_for(c.closed.wait(), 5)


def _ctx(proxy: ProxyHandle):  # type: ignore[no-untyped-def]
    """The in-process worker's Context (the proxy runs on this test's loop)."""
    return proxy.supervisor.workers[0].worker.ctx  # type: ignore[union-attr]


async def test_h2_fields_seam_gives_what_the_http1_head_would(tmp_path, monkeypatch):
    """[http2] An unedited HTTP/2 request goes upstream from its decoded fields, not re-parsed from out[0]."""
    from proxy.stream_h2 import H2Stream
    from proxy.upstream_h2conn import h2_headers

    checked: list[bool] = []
    real = H2Stream.h2_fields

    def h2_fields(self, head, scheme):  # type: ignore[no-untyped-def]
        fields = real(self, head, scheme)
        if fields is not None:
            assert fields == h2_headers(head, scheme)
            assert real(self, head[:-1] + head[-1:], scheme) is None  # an edited (replaced) head: not used
        checked.append(fields is not None)
        return fields

    monkeypatch.setattr(H2Stream, "h2_fields", h2_fields)
    async with mesh(tmp_path) as m, h2client(m.h2_port) as c:
        r = await c.request("POST", "/echo?q=1", H2HOST, [("te", "trailers"), ("cookie", "a=1"), ("cookie", "b=2"),
                                                         ("x-multi", "1"), ("x-multi", "2"), ("user-agent", "t/1")],
                            b"ping")
        assert r.status == 200 and r.body == b"ping"
        hd = m.h2up.requests[-1].headers
        assert ("cookie", "a=1; b=2") in hd and [v for k, v in hd if k == "x-multi"] == ["1", "2"]
        assert dict(hd)[":path"] == "/echo?q=1" and ("te", "trailers") in hd
    assert checked == [True]
