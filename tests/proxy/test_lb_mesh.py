"""Load-balancing policies end to end: DestinationRule -> translator -> proxy -> real upstreams."""

from __future__ import annotations

import asyncio
from collections import Counter

from tests.helpers.config import HOST, simple_mesh, write
from tests.helpers.net import RawClient, free_port, standalone_proxy
from tests.helpers.upstreams import RecordingUpstream


def _rule(load_balancer: str) -> str:
    return f"""\
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: upstream, namespace: default}}
spec:
  host: {HOST}
  trafficPolicy:
    loadBalancer: {load_balancer}
"""


async def _spread(port: int, n: int, headers: dict[str, str] | None = None, path: str = "/") -> Counter[str]:
    c = await RawClient.connect(port)
    seen: Counter[str] = Counter()
    try:
        for _ in range(n):
            r = await c.request("GET", path, HOST, headers)
            assert r.status == 200
            seen[r.header("x-upstream") or ""] += 1
    finally:
        await c.close()
    return seen


async def test_round_robin_alternates(tmp_path):
    async with RecordingUpstream("a") as a, RecordingUpstream("b") as b:
        port = free_port()
        write(tmp_path, simple_mesh(port, [a.port, b.port], extra=_rule("{simple: ROUND_ROBIN}")))
        async with standalone_proxy(tmp_path):
            assert await _spread(port, 10) == {"a": 5, "b": 5}


async def test_random_spreads_within_tolerance(tmp_path):
    async with RecordingUpstream("a") as a, RecordingUpstream("b") as b:
        port = free_port()
        write(tmp_path, simple_mesh(port, [a.port, b.port], extra=_rule("{simple: RANDOM}")))
        async with standalone_proxy(tmp_path):
            seen = await _spread(port, 400)
            assert set(seen) == {"a", "b"}
            assert abs(seen["a"] - 200) < 50, seen  # 5 standard deviations


async def test_least_request_avoids_the_busy_endpoint(tmp_path):
    async with RecordingUpstream("a") as a, RecordingUpstream("b") as b:
        port = free_port()
        write(tmp_path, simple_mesh(port, [a.port, b.port], extra=_rule("{simple: LEAST_REQUEST}")))
        async with standalone_proxy(tmp_path):
            slow = await RawClient.connect(port)
            await slow.send(f"GET /slow?ms=3000 HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode())
            arrived = [asyncio.ensure_future(u.state.request_seen.wait()) for u in (a, b)]
            await asyncio.wait(arrived, timeout=5, return_when=asyncio.FIRST_COMPLETED)
            for fut in arrived:
                fut.cancel()
            busy = "a" if any(r.path.startswith("/slow") for r in a.requests) else "b"
            seen = await _spread(port, 60)
            # Two random choices: the busy endpoint wins only when drawn twice (1/4); round robin: 1/2.
            assert seen[busy] <= 24, seen
            await slow.close()


async def test_ring_hash_by_header(tmp_path):
    async with RecordingUpstream("a") as a, RecordingUpstream("b") as b:
        port = free_port()
        rule = _rule("{consistentHash: {httpHeaderName: x-user, minimumRingSize: 256}}")
        write(tmp_path, simple_mesh(port, [a.port, b.port], extra=rule))
        async with standalone_proxy(tmp_path):
            seen = await _spread(port, 50, {"x-user": "alice"})
            assert len(seen) == 1 and sum(seen.values()) == 50
            owners = Counter()
            for i in range(30):
                owners.update(await _spread(port, 2, {"x-user": f"user-{i}"}))
            assert set(owners) == {"a", "b"}
            assert all(n % 2 == 0 for n in owners.values())  # each user's two requests went together


async def test_ring_hash_by_source_ip(tmp_path):
    async with RecordingUpstream("a") as a, RecordingUpstream("b") as b:
        port = free_port()
        write(tmp_path, simple_mesh(port, [a.port, b.port], extra=_rule("{consistentHash: {useSourceIp: true}}")))
        async with standalone_proxy(tmp_path):
            seen: Counter[str] = Counter()
            for _ in range(10):  # a new connection each time: same client address, same endpoint
                seen.update(await _spread(port, 2))
            assert len(seen) == 1 and sum(seen.values()) == 20
