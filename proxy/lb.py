"""Load balancers: pick one endpoint of a cluster for one request.

A small interface so that later policies (least request, random, ring hash)
slot in beside round robin. Pure: no I/O, no clock; state is a cursor.
"""

from __future__ import annotations

from typing import Protocol

from proxy.model import Endpoint


class LoadBalancer(Protocol):
    def pick(self) -> Endpoint | None: ...


class RoundRobin:
    """Weighted round robin by expansion (weights are small integers in a mesh).

    Endpoint order is as configured; the cursor starts at 0 so that tests are
    deterministic.
    """

    __slots__ = ("_cursor", "_ring")

    def __init__(self, endpoints: tuple[Endpoint, ...]) -> None:
        ring: list[Endpoint] = []
        for ep in endpoints:
            ring.extend([ep] * max(1, min(ep.weight, 128)))
        self._ring = tuple(ring)
        self._cursor = 0

    def pick(self) -> Endpoint | None:
        ring = self._ring
        if not ring:
            return None
        i = self._cursor
        self._cursor = i + 1 if i + 1 < len(ring) else 0
        return ring[i]


def make_lb(policy: str, endpoints: tuple[Endpoint, ...]) -> LoadBalancer:
    # Only ROUND_ROBIN exists so far; compile refuses any other policy.
    return RoundRobin(endpoints)
