"""Istio's traffic-management tasks, reproduced with their own YAML on loopback.

Each test runs `pillion control` (in process, on port 0) with the task's
VirtualService/DestinationRule YAML unchanged (tests/control/data/tasks-*.yaml)
plus a registry rewritten for loopback: the WorkloadEntries point at real
apps on 127.0.0.1, the services listen on a free port instead of 9080/8000.
A sidecar (`pillion proxy --xds`, in process) for the calling workload
follows the control server; traffic goes through it to the apps, and the
test checks the distribution, status codes, response flags and counters
that the task's text describes (with a statistical tolerance where the task
is random).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from control.server import ControlOptions, ControlServer
from tests.helpers.istio_tasks import BOOKINFO, apps, loopback, metric, task
from tests.helpers.net import ProxyHandle, free_port, one_request, xds_proxy
from tests.helpers.poll import poll


@dataclass
class Mesh:
    server: ControlServer
    config_dir: Path
    proxy: ProxyHandle
    port: int

    def apply(self, name: str, text: str) -> None:
        (self.config_dir / name).write_text(text)
        assert self.server.store.load()  # type: ignore[attr-defined]

    async def get(self, service: str, path: str = "/", headers: str = "", timeout: float = 5.0) -> Any:
        raw = f"GET {path} HTTP/1.1\r\nhost: {service}:{self.port}\r\n{headers}\r\n".encode()
        return await one_request(self.port, raw, timeout)

    async def prometheus(self) -> str:
        status, body = await self.proxy.admin_get("/stats/prometheus")
        assert status == 200
        return body.decode()


@contextlib.asynccontextmanager
async def mesh(tmp_path: Path, registry: str, task_yaml: str, app: str, port: int) -> AsyncIterator[Mesh]:
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "registry.yaml").write_text(registry)
    (cfg / "task.yaml").write_text(task_yaml)
    opts = ControlOptions(str(cfg), xds_port=0, debug_port=0, watch=False)
    async with ControlServer(opts) as server, xds_proxy(f"127.0.0.1:{server.xds_port}",
                                                        labels={"app": app, "version": "v1"}) as px:
        yield Mesh(server, cfg, px, port)


async def test_request_routing_sends_jason_to_v2(tmp_path: Path) -> None:
    port = free_port()
    async with apps(*BOOKINFO) as up:
        reg = loopback(task("registry-bookinfo"), port, {n: a.port for n, a in up.items()})
        async with mesh(tmp_path, reg, task("request-routing"), "productpage", port) as m:
            others = Counter([(await m.get("reviews")).body for _ in range(20)])
            jason = Counter([(await m.get("reviews", headers="end-user: jason\r\n")).body for _ in range(20)])
            assert others == {b"hello from reviews-v1": 20}
            assert jason == {b"hello from reviews-v2": 20}


async def test_traffic_shifting_fifty_fifty_then_all_to_v3(tmp_path: Path) -> None:
    port = free_port()
    async with apps(*BOOKINFO) as up:
        reg = loopback(task("registry-bookinfo"), port, {n: a.port for n, a in up.items()})
        async with mesh(tmp_path, reg, task("traffic-shifting"), "productpage", port) as m:
            seen = Counter([(await m.get("reviews")).body for _ in range(200)])
            assert set(seen) == {b"hello from reviews-v1", b"hello from reviews-v3"}
            assert 60 <= seen[b"hello from reviews-v1"] <= 140  # binomial(200, 0.5): beyond 5 sigma
            # virtual-service-reviews-v3.yaml: everything to v3
            m.apply("task.yaml", task("traffic-shifting").replace("      weight: 50\n", "").replace(
                "    - destination:\n        host: reviews\n        subset: v1\n", ""))

            async def all_v3() -> bool:
                return {(await m.get("reviews")).body for _ in range(20)} == {b"hello from reviews-v3"}

            await poll(cast(Any, all_v3), timeout=10, what="the 100% v3 route to be pushed")


async def test_request_timeout_cuts_a_call_whose_downstream_is_delayed(tmp_path: Path) -> None:
    """reviews (v2) calls ratings; ratings is delayed 2 s by a fault; the 0.5 s timeout on
    reviews answers 504 (Istio's request-timeouts task)."""
    port = free_port()
    holder: dict[str, int] = {}

    async def reviews_v2(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        try:
            r = await one_request(holder["port"], f"GET /ratings HTTP/1.1\r\nhost: ratings:{port}\r\n\r\n".encode(),
                                  timeout=10)
            body = b"ratings said " + r.body
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            body = b"ratings unavailable"
        with contextlib.suppress(ConnectionError):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(reviews_v2, "127.0.0.1", 0)
    async with server, apps(*BOOKINFO) as up:
        ports = {n: a.port for n, a in up.items()}
        ports["reviews-v2"] = server.sockets[0].getsockname()[1]
        holder["port"] = port
        reg = loopback(task("registry-bookinfo"), port, ports)
        async with mesh(tmp_path, reg, task("request-timeouts"), "productpage", port) as m:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            r = await m.get("reviews")
            elapsed = loop.time() - t0
            assert (r.status, r.header("x-pillion-flags")) == (504, "UT")
            assert 0.5 <= elapsed < 1.9  # the route's 0.5 s, not the 2 s delay
            prom = await m.prometheus()
            assert metric(prom, "envoy_cluster_fault_delays_injected", "ratings") == 1


async def test_fault_injection_delay_holds_only_jason(tmp_path: Path) -> None:
    port = free_port()
    async with apps(*BOOKINFO) as up:
        reg = loopback(task("registry-bookinfo"), port, {n: a.port for n, a in up.items()})
        async with mesh(tmp_path, reg, task("fault-delay"), "productpage", port) as m:
            assert (await m.get("ratings")).body == b"hello from ratings-v1"
            jason = asyncio.ensure_future(m.get("ratings", headers="end-user: jason\r\n", timeout=30))
            done, _ = await asyncio.wait({jason}, timeout=1.0)
            assert not done  # held by the 7 s delay
            assert (await m.get("ratings")).status == 200  # others are not held meanwhile
            jason.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await jason
            assert metric(await m.prometheus(), "envoy_cluster_fault_delays_injected", "ratings") == 1


async def test_fault_injection_abort_answers_jason_500(tmp_path: Path) -> None:
    port = free_port()
    async with apps(*BOOKINFO) as up:
        reg = loopback(task("registry-bookinfo"), port, {n: a.port for n, a in up.items()})
        async with mesh(tmp_path, reg, task("fault-abort"), "productpage", port) as m:
            for _ in range(5):
                r = await m.get("ratings", headers="end-user: jason\r\n")
                assert (r.status, r.header("x-pillion-flags")) == (500, "FI")
                assert (await m.get("ratings")).status == 200
            assert len(up["ratings-v1"].requests) == 5  # the aborted ones never reached it
            prom = await m.prometheus()
            assert 'response_code="500"' in prom and 'response_flags="FI"' in prom


async def test_circuit_breaking_overflows_under_concurrent_load(tmp_path: Path) -> None:
    """fortio -c 3 -n 30 against httpbin with maxConnections 1 / http1MaxPendingRequests 1:
    some calls overflow with 503 UO, the rest succeed (Istio's circuit-breaking task)."""
    port = free_port()
    async with apps("httpbin-v1", "httpbin-v2") as up:
        reg = loopback(task("registry-httpbin"), port, {n: a.port for n, a in up.items()})
        async with mesh(tmp_path, reg, task("circuit-breaking"), "fortio", port) as m:

            async def client() -> list[tuple[int, str | None]]:
                out = []
                for _ in range(10):
                    r = await m.get("httpbin", "/slow?ms=20")  # httpbin's /delay: each call takes a while
                    out.append((r.status, r.header("x-pillion-flags")))
                return out

            results = [x for batch in await asyncio.gather(*(client() for _ in range(3))) for x in batch]
            codes = Counter(results)
            assert codes[(200, None)] >= 1 and codes[(503, "UO")] >= 1, codes
            assert codes[(200, None)] + codes[(503, "UO")] == 30, codes
            prom = await m.prometheus()
            assert metric(prom, "envoy_cluster_upstream_rq_pending_overflow", "httpbin") == codes[(503, "UO")]


async def test_mirroring_sends_a_shadow_copy_to_v2(tmp_path: Path) -> None:
    port = free_port()
    async with apps("httpbin-v1", "httpbin-v2") as up:
        reg = loopback(task("registry-httpbin"), port, {n: a.port for n, a in up.items()})
        async with mesh(tmp_path, reg, task("mirroring"), "fortio", port) as m:
            for i in range(5):
                r = await m.get("httpbin", f"/headers?i={i}")
                assert r.body == b"hello from httpbin-v1"
            v2 = up["httpbin-v2"].state
            await v2.wait_for(lambda: len(v2.requests) == 5, timeout=5)
            assert {req.header("host") for req in v2.requests} == {f"httpbin-shadow:{port}"}
            assert sorted(req.path for req in v2.requests) == [f"/headers?i={i}" for i in range(5)]


async def test_tcp_traffic_shifting_eighty_twenty(tmp_path: Path) -> None:
    servers = []

    def echo_app(name: bytes) -> Any:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(name)
            await writer.drain()
            writer.close()
        return handle

    for name in (b"one", b"two"):
        servers.append(await asyncio.start_server(echo_app(name), "127.0.0.1", 0))
    ports = {"tcp-echo-v1": servers[0].sockets[0].getsockname()[1],
             "tcp-echo-v2": servers[1].sockets[0].getsockname()[1]}
    bind = "127.0.0.57"  # the task's VirtualService matches port 9000: a loopback address of our own
    reg = loopback(task("tcp-traffic-shifting"), 9000, ports, bind=bind)
    async with servers[0], servers[1], mesh(tmp_path, reg, "", "sleep", 9000):
        seen: Counter[bytes] = Counter()
        for _ in range(100):
            reader, writer = await asyncio.open_connection(bind, 9000)
            seen[await reader.read()] += 1
            writer.close()
        assert set(seen) == {b"one", b"two"} and sum(seen.values()) == 100
        assert 8 <= seen[b"two"] <= 35, seen  # binomial(100, 0.2): mean 20, sd 4
