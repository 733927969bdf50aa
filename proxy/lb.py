"""Load balancers: pick one endpoint of a cluster for one request.

Policies (Envoy's Cluster.lb_policy): ROUND_ROBIN, LEAST_REQUEST (power of two
choices over the requests active on each endpoint), RANDOM and RING_HASH
(consistent hashing of a per-request key, see ``request_hash``). Pure: no I/O,
no clock; randomness comes from an injected ``random.Random``. Each balancer is
built once per cluster update (the ring too) and then only read per request.
"""

from __future__ import annotations

import hashlib
import random
from bisect import bisect_left
from typing import Protocol

from proxy.model import Endpoint, HashKind, HashPolicy

MAX_RING_SIZE = 1 << 20  # a bound on memory and build time (Envoy's maximum_ring_size default is 8M)


class LoadBalancer(Protocol):
    def pick(self, key: int | None = None) -> Endpoint | None: ...


def _expand(endpoints: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
    ring: list[Endpoint] = []
    for ep in endpoints:
        ring.extend([ep] * max(1, min(ep.weight, 128)))
    return tuple(ring)


class RoundRobin:
    """Weighted round robin by expansion (weights are small integers in a mesh).

    Endpoint order is as configured; the cursor starts at 0 so that tests are
    deterministic.
    """

    __slots__ = ("_cursor", "_ring")

    def __init__(self, endpoints: tuple[Endpoint, ...]) -> None:
        self._ring = _expand(endpoints)
        self._cursor = 0

    def pick(self, key: int | None = None) -> Endpoint | None:
        ring = self._ring
        if not ring:
            return None
        i = self._cursor
        self._cursor = i + 1 if i + 1 < len(ring) else 0
        return ring[i]


class Random:
    """Weighted random (by expansion)."""

    __slots__ = ("_ring", "_rng")

    def __init__(self, endpoints: tuple[Endpoint, ...], rng: random.Random) -> None:
        self._ring = _expand(endpoints)
        self._rng = rng

    def pick(self, key: int | None = None) -> Endpoint | None:
        ring = self._ring
        if not ring:
            return None
        return ring[self._rng.randrange(len(ring))]


class LeastRequest:
    """Power of two choices: of two distinct random endpoints, the one with fewer active requests.

    ``active`` is the cluster's per-endpoint count of requests in flight, kept by the
    stream (incremented when it picks an endpoint, decremented when it ends). Weights
    are ignored (Envoy weighs them only when they differ; a mesh's are all 1).
    """

    __slots__ = ("_active", "_endpoints", "_rng")

    def __init__(self, endpoints: tuple[Endpoint, ...], active: dict[Endpoint, int], rng: random.Random) -> None:
        self._endpoints = endpoints
        self._active = active
        self._rng = rng

    def pick(self, key: int | None = None) -> Endpoint | None:
        eps = self._endpoints
        n = len(eps)
        if n < 2:
            return eps[0] if eps else None
        rng = self._rng
        i = rng.randrange(n)
        a = eps[i]
        b = eps[(i + 1 + rng.randrange(n - 1)) % n]  # two distinct choices: with two endpoints, always both
        active = self._active
        return b if active.get(b, 0) < active.get(a, 0) else a


def stable_hash(data: bytes) -> int:
    """A 64-bit hash that is the same in every process (ring points and request keys)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class RingHash:
    """Consistent hashing: endpoints own points on a ring; a key goes to the next point.

    Each endpoint gets a share of at least ``min_size`` points proportional to its
    weight, hashed from "address_index". A request without a key gets a random point.
    """

    __slots__ = ("_hashes", "_owners", "_rng")

    def __init__(self, endpoints: tuple[Endpoint, ...], min_size: int, rng: random.Random) -> None:
        self._rng = rng
        total = sum(max(1, ep.weight) for ep in endpoints)
        size = max(1, min(min_size, MAX_RING_SIZE))
        points: list[tuple[int, int]] = []
        for i, ep in enumerate(endpoints):
            replicas = -(-size * max(1, ep.weight) // total)
            prefix = ep.address.encode() + b"_"
            points.extend((stable_hash(prefix + str(r).encode()), i) for r in range(replicas))
        points.sort()
        self._hashes = [h for h, _ in points]
        self._owners = tuple(endpoints[i] for _, i in points)

    def pick(self, key: int | None = None) -> Endpoint | None:
        owners = self._owners
        if not owners:
            return None
        if key is None:
            return owners[self._rng.randrange(len(owners))]
        i = bisect_left(self._hashes, key)
        return owners[i if i < len(owners) else 0]


def make_lb(policy: str, endpoints: tuple[Endpoint, ...], *, active: dict[Endpoint, int] | None = None,
            rng: random.Random | None = None, ring_size: int = 1024) -> LoadBalancer:
    rng = rng or random.Random()
    if policy == "RANDOM":
        return Random(endpoints, rng)
    if policy == "LEAST_REQUEST":
        return LeastRequest(endpoints, {} if active is None else active, rng)
    if policy == "RING_HASH":
        return RingHash(endpoints, ring_size, rng)
    return RoundRobin(endpoints)


def request_hash(policies: tuple[HashPolicy, ...], headers: dict[bytes, bytes], path: bytes,
                 client_ip: bytes) -> int | None:
    """The request's hash key: the first policy that finds a value (None: a random pick).

    Envoy combines every policy that yields a value; with one policy (what the
    translator emits) that is the same. A missing cookie does not make Envoy-style
    generated cookies (``ttl``): the request falls back to a random endpoint.
    """
    for p in policies:
        kind = p.kind
        value: bytes | None = None
        if kind is HashKind.HEADER:
            value = headers.get(p.name)
        elif kind is HashKind.SOURCE_IP:
            value = client_ip or None
        elif kind is HashKind.COOKIE:
            value = _cookie(headers.get(b"cookie"), p.name)
        else:
            value = _query(path, p.name)
        if value is not None:
            return stable_hash(value)
    return None


def _cookie(header: bytes | None, name: bytes) -> bytes | None:
    if not header:
        return None
    for part in header.split(b";"):
        k, sep, v = part.strip().partition(b"=")
        if sep and k == name:
            return v
    return None


def _query(path: bytes, name: bytes) -> bytes | None:
    _, sep, query = path.partition(b"?")
    if not sep:
        return None
    for part in query.split(b"&"):
        k, _, v = part.partition(b"=")
        if k == name:
            return v
    return None
