"""What a route does besides picking a cluster: faults, redirects, direct responses, rewrites,
header mutation, richer matches, mirroring and grpc-timeout, on real sockets."""

from __future__ import annotations

import asyncio
import re

from proxy import model
from tests.helpers.h2server import H2Client, H2Server
from tests.helpers.net import one_request
from tests.helpers.snapshots import FixedUpstream, cluster, route, serve, snapshot
from tests.helpers.upstreams import RecordingUpstream


def get(path: str = "/x", host: str = "svc", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nhost: {host}\r\n{extra}\r\n".encode()


async def test_fault_abort_answers_without_the_upstream() -> None:
    async with FixedUpstream(lambda n: 200) as up:
        fault = model.Fault(abort_status=418, abort_percent=100)
        async with serve(snapshot([route(fault=fault)], [cluster("c", up.port)])) as px:
            r = await one_request(px.port, get())
            assert (r.status, r.header("x-pillion-flags"), r.body) == (418, "FI", b"fault filter abort")
            assert up.seen == [] and px.stats().fault_aborts == 1


async def test_fault_abort_with_a_grpc_status_for_a_grpc_client() -> None:
    async with FixedUpstream(lambda n: 200) as up:
        fault = model.Fault(abort_grpc=14, abort_percent=100)
        async with serve(snapshot([route(fault=fault)], [cluster("c", up.port)])) as px:
            r = await one_request(px.port, get(extra="content-type: application/grpc\r\n"))
            assert r.status == 200 and r.header("grpc-status") == "14" and up.seen == []


async def test_fault_abort_percentage_is_statistical() -> None:
    async with FixedUpstream(lambda n: 200) as up:
        fault = model.Fault(abort_status=503, abort_percent=50)
        async with serve(snapshot([route(fault=fault)], [cluster("c", up.port)])) as px:
            codes = [(await one_request(px.port, get())).status for _ in range(200)]
            aborted = codes.count(503)
            assert 60 < aborted < 140 and aborted + codes.count(200) == 200  # binomial(200, .5): far outside 6 sigma


async def test_fault_delay_holds_the_request_then_forwards_it() -> None:
    async with FixedUpstream(lambda n: 200) as up:
        fault = model.Fault(delay=0.3, delay_percent=100)
        async with serve(snapshot([route(fault=fault)], [cluster("c", up.port)])) as px:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            r = await one_request(px.port, get())
            assert r.status == 200 and loop.time() - t0 >= 0.29  # timers may fire a hair early (ms clock)
            assert px.flags() == {(200, "DI"): 1} and px.stats().fault_delays == 1


async def test_a_delay_longer_than_the_caller_waits_is_a_timeout_upstream_of_it() -> None:
    # Istio's fault-injection task: a 7 s ratings delay is longer than a 0.5 s reviews timeout.
    async with FixedUpstream(lambda n: 200) as up:
        inner = snapshot([route(fault=model.Fault(delay=7.0, delay_percent=100))], [cluster("c", up.port)])
        async with serve(inner) as ratings:
            outer = snapshot([route(timeout=0.5)], [cluster("c", ratings.port)])
            async with serve(outer) as reviews:
                r = await one_request(reviews.port, get())
                assert (r.status, r.header("x-pillion-flags")) == (504, "UT")


async def test_direct_response_and_redirect() -> None:
    routes = [
        route(name="d", prefix=b"/direct", direct=model.DirectResponse(200, b"hi there")),
        route(name="r", prefix=b"/old", redirect=model.Redirect(302, host=b"new.example", prefix=b"/new")),
        route(name="s", prefix=b"/secure", redirect=model.Redirect(301, scheme=b"https", port=8443, strip_query=True)),
    ]
    async with serve(snapshot(routes, [])) as px:
        r = await one_request(px.port, get("/direct"))
        assert (r.status, r.body) == (200, b"hi there")
        r = await one_request(px.port, get("/old/page?q=1"))
        assert r.status == 302 and r.header("location") == "http://new.example/new/page?q=1"
        r = await one_request(px.port, get("/secure/a?b=c", host="svc:80"))
        assert r.status == 301 and r.header("location") == "https://svc:8443/secure/a"


async def test_prefix_and_regex_rewrite_and_host_rewrite() -> None:
    async with RecordingUpstream() as up:
        routes = [
            route(name="p", prefix=b"/v1/", rewrite=model.Rewrite(prefix=b"/api/", host=b"backend.internal")),
            route(name="x", prefix=b"/r/", rewrite=model.Rewrite(regex=re.compile(rb"^/r/(\w+)/(\w+)$"),
                                                                 substitution=rb"/\2/\1")),
        ]
        async with serve(snapshot(routes, [cluster("c", up.port)])) as px:
            assert (await one_request(px.port, get("/v1/items?x=1"))).status == 200
            assert (await one_request(px.port, get("/r/a/b?z"))).status == 200
            first, second = up.requests
            assert first.path == "/api/items?x=1" and first.header("host") == "backend.internal"
            assert second.path == "/b/a?z" and second.header("host") == "svc"


async def test_request_and_response_header_mutation() -> None:
    async with RecordingUpstream() as up:
        mut = model.HeaderMutation(
            request_add=(model.HeaderOp(b"x-set", b"new"), model.HeaderOp(b"x-add", b"two", append=True)),
            request_remove=(b"x-drop",),
            response_add=(model.HeaderOp(b"x-resp", b"yes"),),
            response_remove=(b"x-upstream",),
        )
        async with serve(snapshot([route(mutation=mut)], [cluster("c", up.port)])) as px:
            r = await one_request(px.port, get(extra="x-set: old\r\nx-add: one\r\nx-drop: gone\r\n"))
            assert r.header("x-resp") == "yes" and r.header("x-upstream") is None
            seen = up.requests[0]
            assert seen.header("x-set") == "new" and seen.header("x-add") == "one,two"
            assert seen.header("x-drop") is None


async def test_method_authority_query_and_case_insensitive_matches() -> None:
    async with FixedUpstream(lambda n: 200) as a, FixedUpstream(lambda n: 201) as b, \
            FixedUpstream(lambda n: 202) as c, FixedUpstream(lambda n: 203) as d:
        routes = [
            route("a", name="m", headers=(model.HeaderMatch(b":method", model.StringKind.EXACT, b"POST"),)),
            route("b", name="au", headers=(model.HeaderMatch(b":authority", model.StringKind.PREFIX, b"admin."),)),
            route("c", name="q", query=(model.QueryMatch(b"user", model.StringKind.EXACT, b"jason"),)),
            route("d", name="ci", prefix=b"/CASE", case_sensitive=False),
        ]
        clusters = [cluster("a", a.port), cluster("b", b.port), cluster("c", c.port), cluster("d", d.port)]
        async with serve(snapshot(routes, clusters)) as px:
            post = b"POST /x HTTP/1.1\r\nhost: svc\r\ncontent-length: 0\r\n\r\n"
            assert (await one_request(px.port, post)).status == 200
            assert (await one_request(px.port, get(host="admin.svc"))).status == 201
            assert (await one_request(px.port, get("/x?a=1&user=jason"))).status == 202
            assert (await one_request(px.port, get("/case/x"))).status == 203
            assert (await one_request(px.port, get("/x?user=jasonx"))).status == 404


async def test_mirror_gets_a_copy_and_never_slows_the_primary() -> None:
    async with FixedUpstream(lambda n: 200) as primary, FixedUpstream(lambda n: "hang") as shadow:
        mirrors = (model.Mirror("m", 100.0),)
        snap = snapshot([route(mirrors=mirrors)], [cluster("c", primary.port), cluster("m", shadow.port)])
        async with serve(snap) as px:
            body = b"payload"
            r = await one_request(px.port, b"PUT /m HTTP/1.1\r\nhost: svc:8000\r\ncontent-length: 7\r\n\r\n" + body)
            assert r.status == 200  # the shadow never answers; the primary is not held
            await shadow.wait_for(lambda: len(shadow.seen) == 1)
            copy = shadow.seen[0]
            assert b"\r\nhost: svc-shadow:8000\r\n" in copy and copy.endswith(body)
            assert px.stats("m").rq_mirrored == 1


async def test_mirror_percentage() -> None:
    async with FixedUpstream(lambda n: 200) as primary, FixedUpstream(lambda n: 200) as shadow:
        snap = snapshot([route(mirrors=(model.Mirror("m", 0.0),))], [cluster("c", primary.port),
                                                                    cluster("m", shadow.port)])
        async with serve(snap) as px:
            for _ in range(20):
                await one_request(px.port, get())
            assert len(primary.seen) == 20 and shadow.seen == []


CHUNKED_PUT = (b"PUT /m HTTP/1.1\r\nhost: svc:8000\r\ntransfer-encoding: chunked\r\n\r\n"
               b"3\r\nabc\r\n2\r\nde\r\n0\r\nx-sum: 5\r\n\r\n")


async def test_mirror_to_an_http2_cluster_from_an_http1_primary() -> None:
    # the primary's body went chunk-framed over HTTP/1.1; the shadow gets it as DATA, trailers as HEADERS
    async with RecordingUpstream("primary") as primary, H2Server("shadow") as shadow:
        snap = snapshot([route(mirrors=(model.Mirror("m", 100.0),))],
                        [cluster("c", primary.port), cluster("m", shadow.port, http2=True)])
        async with serve(snap) as px:
            assert (await one_request(px.port, CHUNKED_PUT)).status == 200
            await shadow.wait_for(lambda: len(shadow.requests) == 1)
            copy = shadow.requests[0]
            assert copy.method == "PUT" and copy.path == "/m" and copy.body == b"abcde"
            assert dict(copy.headers)[":authority"] == "svc-shadow:8000" and copy.trailers == [("x-sum", "5")]
            assert primary.state.all_bytes.endswith(b"0\r\nx-sum: 5\r\n\r\n")
            assert px.stats("m").rq_mirrored == 1


async def test_mirror_to_an_http1_cluster_from_an_http2_primary() -> None:
    # the primary's body went plain over HTTP/2; the HTTP/1.1 shadow gets it chunk-framed
    async with H2Server("primary") as primary, RecordingUpstream("shadow") as shadow:
        snap = snapshot([route(mirrors=(model.Mirror("m", 100.0),))],
                        [cluster("c", primary.port, http2=True), cluster("m", shadow.port)])
        async with serve(snap) as px:
            assert (await one_request(px.port, CHUNKED_PUT)).status == 200
            await shadow.state.wait_for(lambda: len(shadow.requests) == 1)
            raw = shadow.state.all_bytes
            assert b"\r\nhost: svc-shadow:8000\r\n" in raw and b"transfer-encoding: chunked" in raw
            assert raw.endswith(b"\r\n\r\n5\r\nabcde\r\n0\r\nx-sum: 5\r\n\r\n"), raw
            assert shadow.requests[0].body == b"abcde"
            assert primary.requests[0].body == b"abcde" and primary.requests[0].trailers == [("x-sum", "5")]
        # and to an HTTP/2 shadow as well, with a content-length body
        snap2 = snapshot([route(mirrors=(model.Mirror("m", 100.0),))],
                         [cluster("c", primary.port, http2=True), cluster("m", primary.port, http2=True)])
        async with serve(snap2) as px:
            put = b"PUT /n HTTP/1.1\r\nhost: svc\r\ncontent-length: 3\r\n\r\nxyz"
            assert (await one_request(px.port, put)).status == 200
            await primary.wait_for(lambda: len(primary.requests) == 3)
            by_authority = {dict(q.headers)[":authority"]: q for q in primary.requests[1:]}
            assert by_authority["svc-shadow"].body == b"xyz" and by_authority["svc"].body == b"xyz"


async def test_a_mirror_cluster_that_follows_the_client_protocol_gets_http2_from_an_http2_client() -> None:
    # use_downstream_protocol (Istio's useClientProtocol) decides the shadow's protocol as it does the primary's
    async with RecordingUpstream("primary") as primary, H2Server("shadow") as shadow:
        snap = snapshot([route(mirrors=(model.Mirror("m", 100.0),))],
                        [cluster("c", primary.port), cluster("m", shadow.port, use_downstream_protocol=True)])
        async with serve(snap) as px:
            c = await H2Client.connect(px.port)
            try:
                r = await c.request("POST", "/h2", "svc", [("content-length", "2")], b"hi")
            finally:
                c.close()
            assert r.status == 200 and primary.requests[0].body == b"hi"  # the primary's cluster says HTTP/1.1
            await shadow.wait_for(lambda: len(shadow.requests) == 1)
            assert shadow.requests[0].body == b"hi" and dict(shadow.requests[0].headers)[":authority"] == "svc-shadow"


async def test_grpc_timeout_header_bounds_the_request() -> None:
    async with FixedUpstream(lambda n: "hang") as up, \
            serve(snapshot([route(timeout=30, grpc_timeout=True)], [cluster("c", up.port)])) as px:
        r = await one_request(px.port, get(extra="content-type: application/grpc\r\ngrpc-timeout: 200m\r\n"))
        assert r.status == 200 and r.header("grpc-status") == "4"  # DEADLINE_EXCEEDED, trailers-only
