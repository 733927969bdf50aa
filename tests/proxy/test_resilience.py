"""Retries, per-try timeouts, retry budgets, circuit breakers and outlier detection, on real sockets.

Each test serves a hand-built snapshot (tests/helpers/snapshots.py) in front of
upstreams whose answers the test decides, and checks what the client got, what
each upstream saw, and the counters and response flags the proxy recorded.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from proxy import model
from tests.helpers.config import HOST, simple_mesh, write
from tests.helpers.net import free_port, one_request, standalone_proxy
from tests.helpers.snapshots import FixedUpstream, cluster, route, serve, snapshot

GET = b"GET /x HTTP/1.1\r\nhost: svc\r\n\r\n"


def retry(on: str, n: int = 2, **kw: object) -> model.RetryPolicy:
    bits = 0
    for name in on.split(","):
        bits |= model.RETRY_ON_NAMES[name]
    return model.RetryPolicy(bits, n, backoff_base=0.001, backoff_max=0.002, **kw)  # type: ignore[arg-type]


async def test_a_503_is_retried_on_another_host() -> None:
    async with FixedUpstream(lambda n: 503) as bad, FixedUpstream(lambda n: 200) as good:
        snap = snapshot([route(retry=retry("5xx", other_host=True, host_selection_attempts=3))],
                        [cluster("c", bad.port, good.port)])
        async with serve(snap) as px:
            r = await one_request(px.port, GET)
            assert r.status == 200 and r.header("x-served-by") == str(good.port)
            assert len(bad.seen) == 1 and len(good.seen) == 1
            st = px.stats()
            assert (st.rq_retry, st.rq_retry_success) == (1, 1)
            assert px.flags() == {(200, ""): 1}


async def test_retries_run_out_and_the_last_response_is_returned_with_urx() -> None:
    async with FixedUpstream(lambda n: 503) as bad:
        snap = snapshot([route(retry=retry("gateway-error", n=2))], [cluster("c", bad.port)])
        async with serve(snap) as px:
            r = await one_request(px.port, GET)
            assert r.status == 503 and r.body == b"from %d" % bad.port
            assert len(bad.seen) == 3  # the try and two retries
            assert px.flags() == {(503, "URX"): 1}


async def test_not_retried_when_retry_on_does_not_match() -> None:
    async with FixedUpstream(lambda n: 500) as bad:
        snap = snapshot([route(retry=retry("gateway-error,connect-failure"))], [cluster("c", bad.port)])
        async with serve(snap) as px:
            r = await one_request(px.port, GET)
            assert r.status == 500 and len(bad.seen) == 1
            assert px.stats().rq_retry == 0


async def test_retriable_status_codes_and_4xx() -> None:
    async with FixedUpstream(lambda n: 409 if n == 0 else 418 if n == 1 else 200) as up:
        pol = retry("retriable-4xx,retriable-status-codes", n=3, retriable_status=frozenset({418}))
        async with serve(snapshot([route(retry=pol)], [cluster("c", up.port)])) as px:
            r = await one_request(px.port, GET)
            assert r.status == 200 and len(up.seen) == 3


async def test_connect_failure_is_retried_and_flagged_when_it_runs_out() -> None:
    dead = free_port()
    async with FixedUpstream(lambda n: 200) as good:
        pol = retry("connect-failure", n=1, other_host=True, host_selection_attempts=3)
        async with serve(snapshot([route(retry=pol)], [cluster("c", dead, good.port)])) as px:
            r = await one_request(px.port, GET)
            assert r.status == 200 and len(good.seen) == 1
    async with serve(snapshot([route(retry=retry("connect-failure", n=1))], [cluster("c", dead)])) as px:
        r = await one_request(px.port, GET)
        assert r.status == 503 and r.header("x-pillion-flags") == "UF,URX"
        assert px.stats().rq_retry == 1


async def test_a_reset_is_retried_with_the_request_body_replayed() -> None:
    async with FixedUpstream(lambda n: "reset" if n == 0 else 200) as up, \
            serve(snapshot([route(retry=retry("reset"))], [cluster("c", up.port)])) as px:
        body = b"x" * 5000
        r = await one_request(px.port, b"POST /p HTTP/1.1\r\nhost: svc\r\ncontent-length: %d\r\n\r\n%s"
                              % (len(body), body))
        assert r.status == 200
        assert len(up.seen) == 2 and up.seen[0] == up.seen[1] and up.seen[1].endswith(body)


async def test_per_try_timeout_moves_on_to_the_next_host() -> None:
    async with FixedUpstream(lambda n: "hang") as slow, FixedUpstream(lambda n: 200) as good:
        pol = retry("5xx", n=1, per_try_timeout=0.2, other_host=True, host_selection_attempts=3)
        async with serve(snapshot([route(retry=pol)], [cluster("c", slow.port, good.port)])) as px:
            r = await one_request(px.port, GET)
            assert r.status == 200 and r.header("x-served-by") == str(good.port)
            assert px.stats().rq_per_try_timeout == 1


async def test_per_try_timeout_without_retries_left_is_a_504() -> None:
    async with FixedUpstream(lambda n: "hang") as slow:
        pol = retry("connect-failure", n=1, per_try_timeout=0.1)
        async with serve(snapshot([route(retry=pol)], [cluster("c", slow.port)])) as px:
            r = await one_request(px.port, GET)
            assert r.status == 504 and r.header("x-pillion-flags") == "UT"


async def test_max_retries_zero_refuses_the_retry_with_uo() -> None:
    async with FixedUpstream(lambda n: 503) as bad:
        limits = model.CircuitBreakers(max_retries=0)
        async with serve(snapshot([route(retry=retry("5xx"))], [cluster("c", bad.port, limits=limits)])) as px:
            r = await one_request(px.port, GET)
            assert r.status == 503 and len(bad.seen) == 1
            assert px.stats().rq_retry_overflow == 1
            assert px.flags() == {(503, "UO"): 1}


async def test_retry_budget_caps_retries_in_flight() -> None:
    # 20% of 10 active requests, at least 3: a sick upstream gets at most 3 retries at a time.
    async with FixedUpstream(lambda n: 503) as bad:
        limits = model.CircuitBreakers(budget_percent=20.0, min_retry_concurrency=3)
        pol = model.RetryPolicy(model.RETRY_5XX, 1, backoff_base=0.3, backoff_max=0.3)  # retries wait a while
        async with serve(snapshot([route(retry=pol)], [cluster("c", bad.port, limits=limits)])) as px:
            results = await asyncio.gather(*(one_request(px.port, GET) for _ in range(10)))
            assert all(r.status == 503 for r in results)
            st = px.stats()
            assert st.rq_retry <= 3 < 10 and st.rq_retry + st.rq_retry_overflow == 10


async def test_circuit_breaker_overflow_is_an_immediate_503_uo() -> None:
    async with FixedUpstream(lambda n: "hang") as up:
        limits = model.CircuitBreakers(max_connections=1, max_pending_requests=1)
        async with serve(snapshot([route(timeout=0.5)], [cluster("c", up.port, limits=limits)])) as px:
            results = await asyncio.gather(*(one_request(px.port, GET) for _ in range(5)))
            codes = sorted((r.status, r.header("x-pillion-flags")) for r in results)
            uo = [c for c in codes if c == (503, "UO")]
            assert len(uo) >= 3, codes  # one on the connection, at most one waiting
            assert len(up.transports) == 1  # never more than max_connections
            st = px.stats()
            assert st.rq_pending_overflow == len(uo) and st.rq_pending_active == 0


async def test_pending_request_gets_the_connection_when_it_comes_back() -> None:
    async with FixedUpstream(lambda n: 200) as up:
        limits = model.CircuitBreakers(max_connections=1, max_pending_requests=10)
        async with serve(snapshot([route()], [cluster("c", up.port, limits=limits)])) as px:
            results = await asyncio.gather(*(one_request(px.port, GET) for _ in range(6)))
            assert [r.status for r in results] == [200] * 6
            assert len(up.transports) == 1 and px.stats().rq_pending_active == 0


async def test_max_requests_overflow() -> None:
    async with FixedUpstream(lambda n: "hang") as up:
        limits = model.CircuitBreakers(max_requests=1)
        async with serve(snapshot([route(timeout=0.3)], [cluster("c", up.port, limits=limits)])) as px:
            results = await asyncio.gather(*(one_request(px.port, GET) for _ in range(3)))
            assert sorted(r.status for r in results) == [503, 503, 504]
            assert px.stats().rq_overflow == 2


async def test_max_requests_per_connection_opens_a_new_connection() -> None:
    async with FixedUpstream(lambda n: 200) as up, \
            serve(snapshot([route()], [cluster("c", up.port, max_requests_per_connection=1)])) as px:
        for _ in range(3):
            assert (await one_request(px.port, GET)).status == 200
        assert len(up.transports) == 3


async def test_outlier_detection_ejects_a_failing_host_and_brings_it_back() -> None:
    async with FixedUpstream(lambda n: 500 if n == 0 else 200) as flaky, FixedUpstream(lambda n: 200) as good:
        od = model.OutlierDetection(consecutive_5xx=1, base_ejection_time=0.3, max_ejection_percent=50)
        async with serve(snapshot([route()], [cluster("c", flaky.port, good.port, outlier=od)])) as px:
            first = await one_request(px.port, GET)
            assert first.status == 500  # round robin starts with the flaky host
            st = px.stats()
            assert (st.ejections_total, st.ejections_active) == (1, 1)
            for _ in range(4):
                r = await one_request(px.port, GET)
                assert r.header("x-served-by") == str(good.port)
            # after base_ejection_time the host is back in rotation
            async with asyncio.timeout(5):
                while len(flaky.seen) < 2:
                    await one_request(px.port, GET)
            assert st.ejections_active == 0


async def test_outlier_detection_respects_max_ejection_percent() -> None:
    async with FixedUpstream(lambda n: 500) as a, FixedUpstream(lambda n: 500) as b:
        od = model.OutlierDetection(consecutive_5xx=1, base_ejection_time=30, max_ejection_percent=50)
        async with serve(snapshot([route()], [cluster("c", a.port, b.port, outlier=od)])) as px:
            for _ in range(4):
                await one_request(px.port, GET)
            assert px.stats().ejections_active == 1  # the second host stays: 50% at most


async def test_ejections_show_in_admin_clusters_and_prometheus(tmp_path: Path) -> None:
    """A DestinationRule's outlierDetection, end to end: the ejected host is flagged in /clusters
    (as Envoy spells it) and counted in /stats/prometheus."""
    async with FixedUpstream(lambda n: 500) as bad, FixedUpstream(lambda n: 200) as good:
        port = free_port()
        rule = f"""apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: upstream, namespace: default}}
spec:
  host: {HOST}
  trafficPolicy:
    outlierDetection: {{consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 3m, maxEjectionPercent: 50}}
"""
        write(tmp_path, simple_mesh(port, [bad.port, good.port], extra=rule))
        async with standalone_proxy(tmp_path) as px:
            codes = [(await one_request(port, f"GET / HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode())).status
                     for _ in range(4)]
            assert codes.count(500) == 1 and len(bad.seen) == 1  # ejected after its first 500
            _, text = await px.admin_get("/clusters")
            assert f"127.0.0.1:{bad.port}::health_flags::/failed_outlier_check" in text.decode()
            assert f"127.0.0.1:{good.port}::health_flags::healthy" in text.decode()
            _, prom = await px.admin_get("/stats/prometheus")
            assert "envoy_cluster_outlier_detection_ejections_enforced_total{" in prom.decode()
            assert 'envoy_cluster_outlier_detection_ejections_active{envoy_cluster_name="outbound|' \
                   f'{port}||{HOST}"}} 1' in prom.decode()


async def test_idle_upstream_connections_close_after_the_cluster_idle_timeout() -> None:
    async with FixedUpstream(lambda n: 200) as up, \
            serve(snapshot([route()], [cluster("c", up.port, idle_timeout=0.2)])) as px:
        assert (await one_request(px.port, GET)).status == 200
        assert up.closed == 0 and len(up.transports) == 1  # kept for reuse at first
        await up.wait_for(lambda: up.closed == 1, timeout=5)  # the worker's next sweep closes it
        assert (await one_request(px.port, GET)).status == 200  # and a new one is opened when needed
        assert len(up.transports) == 2


async def test_a_retried_request_s_span_counts_its_retries() -> None:
    """The client span of a request that took a retry says so (retry_count), exported to a real receiver."""
    from control.otlp_receiver import OtlpReceiver
    from tests.helpers.poll import poll

    async with OtlpReceiver() as rx, FixedUpstream(lambda n: 503 if n == 0 else 200) as up:
        tracing = model.TraceSettings(100.0, "collector", "client.default", False)
        snap = snapshot([route(retry=retry("5xx"))], [cluster("c", up.port), cluster("collector", rx.port)],
                        http={"tracing": tracing})
        async with serve(snap) as px:
            assert (await one_request(px.port, GET)).status == 200
            spans = await poll(lambda: [s for t in rx.traces() for s in t["spans"]], timeout=10,
                               what="the client span at the receiver")
        assert [(s["kind"], s["attributes"]["retry_count"]) for s in spans] == [("CLIENT", 1)]


async def test_a_body_too_big_to_replay_is_not_retried() -> None:
    """Only bytes still held (up to 1 MiB) can be replayed: a bigger upload that is reset is not retried."""
    async with FixedUpstream(lambda n: "reset") as up, \
            serve(snapshot([route(retry=retry("reset", n=3))], [cluster("c", up.port)])) as px:
        body = b"x" * (1 << 20) + b"y" * 4096
        r = await one_request(px.port, b"POST /p HTTP/1.1\r\nhost: svc\r\ncontent-length: %d\r\n\r\n%s"
                              % (len(body), body), timeout=10)
        assert r.status == 503 and r.header("x-pillion-flags") == "UR"  # no URX: never retried
        assert len(up.seen) == 1 and px.stats().rq_retry == 0


async def test_idle_http2_upstream_connections_close_after_the_cluster_idle_timeout() -> None:
    from tests.helpers.h2server import H2Server

    async with H2Server() as up, \
            serve(snapshot([route()], [cluster("c", up.port, http2=True, idle_timeout=0.2)])) as px:
        assert (await one_request(px.port, GET)).status == 200
        assert up.connections == 1
        await up.wait_for(lambda: not [c for c in up.conns if c.transport is not None], timeout=5)
        assert (await one_request(px.port, GET)).status == 200  # a new connection when needed
        assert up.connections == 2
