"""HTTP/1.1 through the proxy: routing, framing, keep-alive, local replies, stats.

Every test runs a real proxy (in-process, on the test's loop) in front of one
or two ``RecordingUpstream`` servers on 127.0.0.1, speaks raw HTTP/1.1 to it
and checks both what the client got and what bytes the upstream received.
Expected results are Envoy's unless a comment says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.config import HOST, service_entry, sidecar, simple_mesh, write
from tests.helpers.net import ProxyHandle, RawClient, Response, free_port, standalone_proxy
from tests.helpers.poll import poll
from tests.helpers.upstreams import RecordingUpstream

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
OTHER = "other.default.svc.cluster.local"


# ---------------------------------------------------------------------- helpers
@dataclass
class Mesh:
    port: int  # the proxy's HTTP egress listener
    ups: list[RecordingUpstream]
    proxy: ProxyHandle

    @property
    def up(self) -> RecordingUpstream:
        return self.ups[0]

    def cluster(self, host: str = HOST) -> str:
        return f"outbound|{self.port}||{host}"

    async def gauges(self) -> dict[str, float]:
        """This listener's and HOST cluster's Envoy-style gauges and counters."""
        _, body = await self.proxy.admin_get("/stats/prometheus")
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(body.decode()):
            for smp in fam.samples:
                if (smp.labels.get("envoy_cluster_name") == self.cluster()
                        or smp.labels.get("envoy_listener_name") == f"127.0.0.1_{self.port}"):
                    out[smp.name] = smp.value
        return out

    async def wait_gauges(self, want: dict[str, float], timeout: float = 0.5) -> dict[str, float]:
        """Poll the admin API (with a deadline) until every sample in ``want`` has its value."""
        last: dict[str, float] = {}

        async def settled() -> bool:
            got = await self.gauges()
            last.update({k: got.get(k, -1) for k in want})
            return all(got.get(k) == v for k, v in want.items())

        with contextlib.suppress(TimeoutError):
            await poll(settled, timeout=timeout)
        return last


@contextlib.asynccontextmanager
async def mesh(tmp_path: Path, n: int = 1, *, extra: str = "", dead_upstream: bool = False) -> AsyncIterator[Mesh]:
    """A proxy whose egress listener routes HOST to ``n`` recording upstreams.

    ``dead_upstream``: the endpoint is a port nothing listens on.
    """
    async with contextlib.AsyncExitStack() as stack:
        ups = [await stack.enter_async_context(RecordingUpstream(f"u{i + 1}")) for i in range(n)]
        port = free_port()
        ports = [free_port()] if dead_upstream else [u.port for u in ups]
        write(tmp_path, simple_mesh(port, ports, extra=extra))
        proxy = await stack.enter_async_context(standalone_proxy(tmp_path, drain_seconds=0.5))
        yield Mesh(port, ups, proxy)


@contextlib.asynccontextmanager
async def client(port: int) -> AsyncIterator[RawClient]:
    c = await RawClient.connect(port)
    try:
        yield c
    finally:
        await c.close()


def seen(r: Response) -> dict:
    """The request head the default upstream handler echoed back in ``x-seen``."""
    raw = r.header("x-seen")
    assert raw is not None, r
    return json.loads(raw)


def seen_header(r: Response, name: str) -> list[str]:
    return [v for k, v in seen(r)["headers"] if k.lower() == name.lower()]


def head_of(raw: bytes) -> bytes:
    """The lowercased head (request line and headers) of the first request in ``raw``."""
    return raw.split(b"\r\n\r\n", 1)[0].lower()


async def read_head(reader: asyncio.StreamReader, timeout: float = 2.0) -> tuple[int, dict[str, str]]:
    """Read one response head exactly (nothing after it), for tunnels and interim responses."""
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    return status, headers


def vs_yaml(host: str, http: str) -> str:
    return (
        "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\n"
        f"metadata: {{name: vs-{host.split('.')[0]}, namespace: default}}\n"
        f"spec:\n  hosts: [{host}]\n  http:\n{http}"
    )


# ---------------------------------------------------------------------- routing
async def test_routes_by_host_forms_and_unknown_host_is_404_nr_keeping_the_connection(tmp_path):
    async with mesh(tmp_path) as m, client(m.port) as c:
        _, body = await m.proxy.admin_get("/config_dump")
        domains = set(re.findall(r'"domains": \[([^\]]*)\]', json.dumps(json.loads(body))))
        short_routable = any('"upstream"' in d for d in domains)

        for host in (HOST, f"{HOST}:{m.port}", HOST.upper()):
            r = await c.request("GET", "/a", host)
            assert r.status == 200, (host, r)
            assert r.body == b"hello from u1"
        r = await c.request("GET", "/a", "upstream")
        assert r.status == (200 if short_routable else 404)

        r = await c.request("GET", "/a", "nope.example.com")
        assert r.status == 404
        assert r.header("x-pillion-flags") == "NR"
        assert r.keep_alive
        r = await c.request("GET", "/after-404", HOST)
        assert r.status == 200
        assert seen(r)["path"] == "/after-404"
    assert all(b"nope.example.com" not in raw for raw in m.up.state.raw)


async def test_routes_by_path_to_different_services(tmp_path):
    async with RecordingUpstream("main") as main, RecordingUpstream("other") as other:
        port = free_port()
        vs = vs_yaml(HOST, (
            f"  - match: [{{uri: {{prefix: /other}}}}]\n"
            f"    route: [{{destination: {{host: {OTHER}}}}}]\n"
            f"  - match: [{{uri: {{exact: /main}}}}, {{uri: {{prefix: /api/}}}}]\n"
            f"    route: [{{destination: {{host: {HOST}}}}}]\n"
        ))
        docs = [
            service_entry("upstream", HOST, [("http", port, "HTTP")], [("127.0.0.1", {"http": main.port}, {})]),
            service_entry("other", OTHER, [("http", port, "HTTP")], [("127.0.0.1", {"http": other.port}, {})]),
            sidecar([(port, "HTTP")]),
            vs,
        ]
        write(tmp_path, "---\n".join(docs))
        async with standalone_proxy(tmp_path), client(port) as c:
            r = await c.request("GET", "/other/x", HOST)
            assert r.body == b"hello from other"
            r = await c.request("GET", "/main", HOST)
            assert r.body == b"hello from main"
            r = await c.request("GET", "/main?q=1", HOST)  # exact path match ignores the query
            assert r.body == b"hello from main"
            r = await c.request("GET", "/api/v1", HOST)
            assert r.body == b"hello from main"
            r = await c.request("GET", "/mainly", HOST)  # no rule matches: 404, as in Istio
            assert r.status == 404 and r.header("x-pillion-flags") == "NR"
            r = await c.request("GET", "/x", OTHER)  # the other service has no VS: default route
            assert r.body == b"hello from other"
        assert [q.path for q in main.requests] == ["/main", "/main?q=1", "/api/v1"]
        assert [q.path for q in other.requests] == ["/other/x", "/x"]


async def test_absolute_form_target_is_routed_and_forwarded_in_origin_form(tmp_path):
    async with mesh(tmp_path) as m, client(m.port) as c:
        await c.send(f"GET http://{HOST}:{m.port}/abs/x?y=1 HTTP/1.1\r\nhost: {HOST}:{m.port}\r\n\r\n".encode())
        r = await c.response()
        assert r.status == 200, r
        assert seen(r)["path"] == "/abs/x?y=1"
        assert m.up.state.all_bytes.startswith(b"GET /abs/x?y=1 HTTP/1.1\r\n")


async def test_absolute_form_authority_wins_over_host_header(tmp_path):
    # RFC 9112 section 3.2.2: a proxy must ignore Host and use the target's authority.
    async with mesh(tmp_path) as m, client(m.port) as c:
        await c.send(f"GET http://{HOST}/abs HTTP/1.1\r\nhost: nope.example.com\r\n\r\n".encode())
        r = await c.response()
        assert r.status == 200, r
        assert seen_header(r, "host") == [HOST]


async def test_round_robin_alternates_between_two_endpoints(tmp_path):
    async with mesh(tmp_path, n=2) as m, client(m.port) as c:
        names = []
        for i in range(6):
            r = await c.request("GET", f"/rr{i}", HOST)
            assert r.status == 200
            names.append(r.header("x-upstream"))
        assert set(names) == {"u1", "u2"}
        assert names == [names[0], names[1]] * 3
        assert [len(u.requests) for u in m.ups] == [3, 3]


# ---------------------------------------------------------------------- connections
async def test_client_keep_alive_and_upstream_pooling(tmp_path):
    async with mesh(tmp_path) as m:
        async with client(m.port) as c:
            for i in range(5):
                r = await c.request("GET", f"/k{i}", HOST)
                assert r.status == 200 and r.keep_alive
                assert seen(r)["path"] == f"/k{i}"
        async with client(m.port) as c2:  # a second client reuses the pooled upstream connection
            r = await c2.request("GET", "/k5", HOST)
            assert r.status == 200
        assert m.up.state.connections == 1
        assert [q.path for q in m.up.requests] == [f"/k{i}" for i in range(6)]


async def test_connection_close_from_client_is_honoured(tmp_path):
    async with mesh(tmp_path) as m, client(m.port) as c:
        r = await c.request("GET", "/bye", HOST, headers={"connection": "close"})
        assert r.status == 200
        assert r.header("connection") == "close"
        assert await c.eof(timeout=1.0)
        # The client's Connection header is hop-by-hop: the upstream connection stays pooled.
        assert b"connection: close" not in m.up.state.all_bytes.lower()


async def test_pipelined_requests_are_answered_in_order(tmp_path):
    async with mesh(tmp_path) as m, client(m.port) as c:
        await c.send(
            f"GET /slow?ms=100 HTTP/1.1\r\nhost: {HOST}\r\n\r\n"
            f"GET /second HTTP/1.1\r\nhost: {HOST}\r\n\r\n"
            f"POST /echo HTTP/1.1\r\nhost: {HOST}\r\ncontent-length: 5\r\n\r\nthird".encode()
        )
        r1 = await c.response()
        r2 = await c.response()
        r3 = await c.response()
        assert r1.status == 200 and seen(r1)["path"] == "/slow?ms=100"
        assert r2.status == 200 and seen(r2)["path"] == "/second"
        assert r3.status == 200 and r3.body == b"third"
        assert [q.path for q in m.up.requests] == ["/slow?ms=100", "/second", "/echo"]


async def test_pipelined_local_reply_between_proxied_requests(tmp_path):
    async with mesh(tmp_path) as m, client(m.port) as c:
        await c.send(
            f"GET /slow?ms=50 HTTP/1.1\r\nhost: {HOST}\r\n\r\n"
            "GET /x HTTP/1.1\r\nhost: nope.example.com\r\n\r\n"
            f"GET /third HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode()
        )
        statuses = [(await c.response()).status for _ in range(3)]
        assert statuses == [200, 404, 200]
        assert [q.path for q in m.up.requests] == ["/slow?ms=50", "/third"]


async def test_local_reply_before_the_body_then_the_connection_goes_on(tmp_path):
    async with mesh(tmp_path) as m, client(m.port) as c:
        await c.send(b"POST /x HTTP/1.1\r\nhost: nope.example.com\r\ncontent-length: 5\r\n\r\n")
        r = await c.response()  # answered at the head; the small body is still to come
        assert r.status == 404
        if r.keep_alive:
            await c.send(b"hello")
            r = await c.request("GET", "/after", HOST)
            assert r.status == 200 and seen(r)["path"] == "/after"
        else:
            assert await c.eof(timeout=1.0)
        assert all(b"hello" not in raw for raw in m.up.state.raw)


async def test_client_disconnect_mid_request_closes_the_upstream_exchange(tmp_path):
    async with mesh(tmp_path) as m:
        async with client(m.port) as c:
            await c.send(f"POST /echo HTTP/1.1\r\nhost: {HOST}\r\ncontent-length: 100000\r\n\r\n".encode()
                         + b"a" * 1000)
            await m.up.state.wait_for(lambda: b"a" * 1000 in m.up.state.all_bytes)
        # The upstream saw a partial request: that connection must not be reused.
        await m.up.state.wait_for(lambda: all(t.is_closing() for t in m.up.state.transports), timeout=0.5)
        async with client(m.port) as c:
            r = await c.request("GET", "/after", HOST)
            assert r.status == 200
        assert m.up.state.connections == 2


async def test_upstream_closing_an_idle_pooled_connection_is_survived(tmp_path):
    async with mesh(tmp_path) as m, client(m.port) as c:
        assert (await c.request("GET", "/first", HOST)).status == 200
        for t in m.up.state.transports:
            t.close()  # the server's idle timeout
        got = await m.wait_gauges({"envoy_cluster_upstream_cx_active": 0})
        assert got["envoy_cluster_upstream_cx_active"] == 0
        r = await c.request("GET", "/second", HOST)
        assert r.status == 200 and seen(r)["path"] == "/second"
        assert m.up.state.connections == 2


# ---------------------------------------------------------------------- HTTP/1.0 clients
async def test_http10_client_keep_alive_and_default_close(tmp_path):
    async with mesh(tmp_path) as m, client(m.port) as c:
        await c.send(f"GET /ka HTTP/1.0\r\nhost: {HOST}\r\nconnection: keep-alive\r\n\r\n".encode())
        r = await c.response()
        assert r.status == 200 and r.body == b"hello from u1"
        assert (r.header("connection") or "").lower() == "keep-alive"
        await c.send(f"GET /no-ka HTTP/1.0\r\nhost: {HOST}\r\n\r\n".encode())
        r = await c.response()
        assert r.status == 200 and r.body == b"hello from u1"
        assert await c.eof(timeout=1.0)
        # Upstream, the proxy speaks HTTP/1.1 and keeps its pooled connection.
        assert m.up.state.connections == 1
        assert all(b" http/1.1\r\n" in head_of(bytes(raw)) for raw in m.up.state.raw)


async def test_chunked_response_to_http10_client_is_close_delimited(tmp_path):
    async with mesh(tmp_path) as m, client(m.port) as c:
        await c.send(f"GET /chunked?n=3 HTTP/1.0\r\nhost: {HOST}\r\nconnection: keep-alive\r\n\r\n".encode())
        raw = await asyncio.wait_for(c.reader.read(-1), 2.0)  # HTTP/1.0 has no chunked coding
        head, _, body = raw.partition(b"\r\n\r\n")
        assert b" 200 " in head.split(b"\r\n")[0]
        assert b"transfer-encoding" not in head.lower()
        assert body == b"piece-0;piece-1;piece-2;"


# ---------------------------------------------------------------------- request bodies
async def test_content_length_body_is_forwarded(tmp_path):
    body = bytes(range(256)) * 400  # 100 KiB, more than one read
    async with mesh(tmp_path) as m, client(m.port) as c:
        r = await c.request("POST", "/echo", HOST, body=body)
        assert r.status == 200
        assert r.body == body
        assert r.header("content-length") == str(len(body))
        q = m.up.requests[0]
        assert q.body == body
        assert q.header("content-length") == str(len(body))
        assert q.header("transfer-encoding") is None


async def test_chunked_request_body_arrives_intact_and_rechunked(tmp_path):
    async with mesh(tmp_path) as m, client(m.port) as c:
        await c.send(
            f"POST /echo HTTP/1.1\r\nhost: {HOST}\r\ntransfer-encoding: chunked\r\n\r\n".encode()
            + b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\n\r\n"
        )
        r = await c.response()
        assert r.status == 200
        assert r.body == b"hello world"
        q = m.up.requests[0]
        assert q.body == b"hello world"
        raw = m.up.state.all_bytes
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.lower().count(b"transfer-encoding") == 1
        assert b"transfer-encoding: chunked" in head.lower()
        assert b"content-length" not in head.lower()
        # The upstream gets a valid chunked body with the same data and a last chunk.
        assert body.endswith(b"0\r\n\r\n")
        assert b"hello" in body and b"world" in body and b"ext=1" not in body


async def test_big_body_is_streamed_not_buffered(tmp_path):
    size = 5 * 1024 * 1024
    body = bytes(range(256)) * (size // 256)
    first = 256 * 1024
    async with mesh(tmp_path) as m, client(m.port) as c:
        await c.send(f"POST /echo HTTP/1.1\r\nhost: {HOST}\r\ncontent-length: {size}\r\n\r\n".encode() + body[:first])
        # The upstream must see body bytes while most of the body is still unsent.
        await asyncio.wait_for(m.up.state.body_started.wait(), 2.0)
        assert not m.up.state.request_seen.is_set()
        await c.send(body[first:])
        r = await c.response(timeout=5.0)
        assert r.status == 200
        assert len(r.body) == size and r.body == body
        assert m.up.requests[0].body == body


async def test_expect_100_continue(tmp_path):
    async with mesh(tmp_path) as m, client(m.port) as c:
        await c.send(
            f"POST /echo HTTP/1.1\r\nhost: {HOST}\r\ncontent-length: 7\r\nexpect: 100-continue\r\n\r\n".encode()
        )
        status, _ = await read_head(c.reader)  # before any body byte was sent
        assert status == 100
        await c.send(b"payload")
        r = await c.response()
        assert r.status == 200
        assert r.body == b"payload"
        q = m.up.requests[0]
        assert q.header("expect") is None
        assert q.body == b"payload"


# ---------------------------------------------------------------------- response framing
async def test_chunked_response_is_relayed(tmp_path):
    async with mesh(tmp_path) as m, client(m.port) as c:
        r = await c.request("GET", "/chunked?n=5", HOST)
        assert r.status == 200
        assert r.body == b"".join(b"piece-%d;" % i for i in range(5))
        assert r.header("transfer-encoding") == "chunked"
        assert r.header("content-length") is None
        r = await c.request("GET", "/after", HOST)  # the chunked framing ended cleanly
        assert r.status == 200
        assert m.up.state.connections == 1


async def test_close_delimited_response_to_http11_client_is_chunked(tmp_path):
    async with mesh(tmp_path) as m, client(m.port) as c:
        r = await c.request("GET", "/close", HOST)
        assert r.status == 200
        assert r.body == b"until-eof-body"
        assert r.header("transfer-encoding") == "chunked"
        assert r.keep_alive  # the upstream's close is hop-by-hop
        r = await c.request("GET", "/after", HOST)
        assert r.status == 200
        assert m.up.state.connections == 2  # the closed upstream connection was not reused


async def test_close_delimited_response_to_http10_client_is_close_delimited(tmp_path):
    async with mesh(tmp_path) as m, client(m.port) as c:
        await c.send(f"GET /close HTTP/1.0\r\nhost: {HOST}\r\n\r\n".encode())
        raw = await asyncio.wait_for(c.reader.read(-1), 2.0)  # to EOF: the proxy must close
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200")
        assert b"transfer-encoding" not in head.lower()
        assert b"content-length" not in head.lower()
        assert body == b"until-eof-body"


async def test_head_response_has_no_body_and_connections_are_reused(tmp_path):
    async with mesh(tmp_path) as m, client(m.port) as c:
        await c.send(f"HEAD /h HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode())
        r = await c.response(head=True)
        assert r.status == 200
        assert r.header("content-length") == str(len(b"hello from u1"))
        r = await c.request("GET", "/after-head", HOST)
        # If the proxy had sent a body after the HEAD response, it would be parsed as this response.
        assert r.status == 200
        assert r.body == b"hello from u1"
        assert seen(r)["path"] == "/after-head"
        assert m.up.state.connections == 1


async def test_204_and_304_have_no_body_and_keep_the_connection(tmp_path):
    async with mesh(tmp_path) as m, client(m.port) as c:
        for code in (204, 304):
            r = await c.request("GET", f"/status/{code}", HOST)
            assert r.status == code
            assert r.body == b""
            assert r.header("transfer-encoding") is None
            assert r.keep_alive
        r = await c.request("GET", "/after", HOST)
        assert r.status == 200 and r.body == b"hello from u1"
        assert m.up.state.connections == 1


async def test_big_response_arrives_intact(tmp_path):
    n = 3 * 1024 * 1024
    async with mesh(tmp_path) as m, client(m.port) as c:
        r = await c.request("GET", f"/big?n={n}", HOST)
        assert r.status == 200
        assert r.body == b"x" * n
        r = await c.request("GET", "/after", HOST)
        assert r.status == 200


# ---------------------------------------------------------------------- upgrade
async def test_websocket_upgrade_tunnels_both_ways(tmp_path):
    async with mesh(tmp_path) as m, client(m.port) as c:
        # Bytes right behind the upgrade request must reach the upstream once it said 101.
        await c.send(
            f"GET /ws HTTP/1.1\r\nhost: {HOST}\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\r\n".encode()
            + b"early"
        )
        status, headers = await read_head(c.reader)
        assert status == 101
        assert headers.get("upgrade", "").lower() == "websocket"
        assert await asyncio.wait_for(c.reader.readexactly(5), 2.0) == b"early"
        for msg in (b"ping", b"\x00\x01binary\xff" * 1000):
            await c.send(msg)
            assert await asyncio.wait_for(c.reader.readexactly(len(msg)), 2.0) == msg
        head = head_of(m.up.state.all_bytes)
        assert b"upgrade: websocket" in head
        assert b"connection: upgrade" in head
        # Half-close passes through the tunnel: the upstream answers our FIN with its own.
        c.writer.write_eof()
        assert await asyncio.wait_for(c.reader.read(), 2.0) == b""


async def test_websocket_tunnel_is_closed_once_both_sides_are_done(tmp_path):
    async with mesh(tmp_path) as m:
        async with client(m.port) as c:
            await c.send(
                f"GET /ws HTTP/1.1\r\nhost: {HOST}\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n".encode()
            )
            status, _ = await read_head(c.reader)
            assert status == 101
            await c.send(b"ping")
            assert await asyncio.wait_for(c.reader.readexactly(4), 2.0) == b"ping"
            c.writer.write_eof()  # FIN one way; the upstream answers with its own FIN
            assert await asyncio.wait_for(c.reader.read(), 2.0) == b""
        # Both directions ended and the client closed: the proxy must drop both sockets.
        want = {"envoy_listener_downstream_cx_active": 0, "envoy_cluster_upstream_cx_active": 0}
        assert await m.wait_gauges(want) == want


async def test_upgrade_refused_by_upstream_is_an_ordinary_response(tmp_path):
    async with mesh(tmp_path) as m, client(m.port) as c:
        r = await c.request("GET", "/no-ws", HOST, headers={"connection": "upgrade", "upgrade": "websocket"})
        assert r.status == 200
        assert r.body == b"hello from u1"
        assert seen_header(r, "upgrade") == ["websocket"]
        assert len(m.up.requests) == 1


# ---------------------------------------------------------------------- headers
async def test_x_forwarded_for_added_and_appended(tmp_path):
    async with mesh(tmp_path) as m, client(m.port) as c:
        r = await c.request("GET", "/xff", HOST)
        assert seen_header(r, "x-forwarded-for") == ["127.0.0.1"]
        assert seen_header(r, "x-forwarded-proto") == ["http"]
        r = await c.request("GET", "/xff", HOST, headers={"x-forwarded-for": "10.0.0.1"})
        assert seen_header(r, "x-forwarded-for") == ["10.0.0.1, 127.0.0.1"]


async def test_x_request_id_generated_when_absent_and_kept_when_present(tmp_path):
    async with mesh(tmp_path) as m, client(m.port) as c:
        r1 = await c.request("GET", "/rid", HOST)
        r2 = await c.request("GET", "/rid", HOST)
        ids = seen_header(r1, "x-request-id") + seen_header(r2, "x-request-id")
        assert len(ids) == 2
        assert all(UUID4.match(i) for i in ids), ids
        assert ids[0] != ids[1]
        r = await c.request("GET", "/rid", HOST, headers={"x-request-id": "my-own-id"})
        assert seen_header(r, "x-request-id") == ["my-own-id"]


async def test_hop_by_hop_request_headers_are_not_forwarded(tmp_path):
    async with mesh(tmp_path) as m, client(m.port) as c:
        r = await c.request("GET", "/hop", HOST, headers={
            "Connection": "keep-alive, X-Drop-Me",
            "Keep-Alive": "timeout=5",
            "TE": "deflate",
            "Proxy-Connection": "keep-alive",
            "X-Drop-Me": "1",
            "X-Keep-Me": "2",
        })
        assert r.status == 200
        names = {k.lower() for k, _ in seen(r)["headers"]}
        assert "x-keep-me" in names
        for gone in ("keep-alive", "te", "proxy-connection", "x-drop-me", "transfer-encoding"):
            assert gone not in names, gone
        assert all("x-drop-me" not in v.lower() for v in seen_header(r, "connection"))


# ---------------------------------------------------------------------- local replies
async def test_upstream_connect_failure_is_503_uf(tmp_path):
    async with mesh(tmp_path, dead_upstream=True) as m, client(m.port) as c:
        for _ in range(2):  # the client connection survives the local reply
            r = await asyncio.wait_for(c.request("GET", "/uf", HOST), 2.0)
            assert r.status == 503
            assert r.header("x-pillion-flags") == "UF,URX"  # after Istio's default retries (connect-failure, 2 attempts)
            assert r.keep_alive


async def test_upstream_reset_is_503_ur_and_the_client_connection_survives(tmp_path):
    async with mesh(tmp_path) as m, client(m.port) as c:
        r = await asyncio.wait_for(c.request("GET", "/reset", HOST), 2.0)
        assert r.status == 503
        assert r.header("x-pillion-flags") == "UR"
        assert r.keep_alive
        r = await c.request("GET", "/after-reset", HOST)
        assert r.status == 200
        assert seen(r)["path"] == "/after-reset"


async def test_route_timeout_is_504_ut_and_the_client_connection_survives(tmp_path):
    vs = vs_yaml(HOST, f"  - timeout: 0.2s\n    route: [{{destination: {{host: {HOST}}}}}]\n")
    async with mesh(tmp_path, extra=vs) as m, client(m.port) as c:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        r = await asyncio.wait_for(c.request("GET", "/slow?ms=2000", HOST), 1.5)
        assert r.status == 504
        assert r.header("x-pillion-flags") == "UT"
        assert 0.15 <= loop.time() - t0 < 1.0
        assert r.keep_alive
        r = await c.request("GET", "/after-timeout", HOST)
        assert r.status == 200
        assert seen(r)["path"] == "/after-timeout"
        # The timed-out upstream connection still owes a response: it must not be reused.
        assert m.up.state.connections == 2


# ---------------------------------------------------------------------- stats
async def test_prometheus_counts_requests_per_cluster(tmp_path):
    n = 4
    async with mesh(tmp_path) as m, client(m.port) as c:
        for i in range(n):
            assert (await c.request("GET", f"/s{i}", HOST)).status == 200
        assert (await c.request("GET", "/status/503", HOST)).status == 503
        status, body = await m.proxy.admin_get("/stats/prometheus")
        assert status == 200
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        assert "istio_requests" in families  # the parser drops the _total suffix of counters
        counts = {
            (s.labels["destination_cluster"], s.labels["response_code"]): s.value
            for s in families["istio_requests"].samples
            if s.name == "istio_requests_total"
        }
        assert counts[(m.cluster(), "200")] == n
        assert counts[(m.cluster(), "503")] == 1
