"""Load balancers (proxy/lb.py), the hash key of a request, and their compilation."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2 as rc

from proxy.compile import _cluster, _Ctx, _hash_policy
from proxy.errors import InvalidResource
from proxy.lb import LeastRequest, Random, RingHash, RoundRobin, make_lb, request_hash, stable_hash
from proxy.model import Endpoint, HashKind, HashPolicy

EPS = tuple(Endpoint(f"10.0.0.{i}", 80) for i in range(1, 4))


def test_round_robin_is_unchanged():
    lb = make_lb("ROUND_ROBIN", EPS)
    assert isinstance(lb, RoundRobin)
    assert [lb.pick() for _ in range(6)] == [*EPS, *EPS]
    assert make_lb("ROUND_ROBIN", ()).pick() is None


def test_random_spreads_evenly():
    lb = make_lb("RANDOM", EPS, rng=random.Random(7))
    assert isinstance(lb, Random)
    counts = Counter(lb.pick() for _ in range(400))
    assert set(counts) == set(EPS)
    assert all(abs(n - 400 / 3) < 40 for n in counts.values()), counts


def test_least_request_prefers_the_idle_endpoint():
    active: dict[Endpoint, int] = {EPS[0]: 5, EPS[1]: 5}
    lb = make_lb("LEAST_REQUEST", EPS, active=active, rng=random.Random(1))
    assert isinstance(lb, LeastRequest)
    counts = Counter(lb.pick() for _ in range(300))
    # EPS[2] wins every draw it is in: 1 - (2/3)^2 = 5/9 of picks.
    assert counts[EPS[2]] > 140
    assert make_lb("LEAST_REQUEST", EPS[:1]).pick() == EPS[0]


def test_ring_hash_is_stable_and_spreads():
    lb = make_lb("RING_HASH", EPS, rng=random.Random(3), ring_size=1024)
    assert isinstance(lb, RingHash)
    again = RingHash(EPS, 1024, random.Random(9))
    keys = [stable_hash(b"user-%d" % i) for i in range(300)]
    picks = [lb.pick(k) for k in keys]
    assert picks == [again.pick(k) for k in keys]  # same ring in every process
    counts = Counter(picks)
    assert set(counts) == set(EPS) and min(counts.values()) > 50
    assert lb.pick(None) in EPS  # no key: a random endpoint
    # Removing an endpoint moves the keys it owned and few others (its peers' rings only grow).
    smaller = RingHash(EPS[:2], 1024, random.Random(3))
    kept = [smaller.pick(k) == p for k, p in zip(keys, picks, strict=True) if p != EPS[2]]
    assert sum(kept) > 0.7 * len(kept)
    assert RingHash((), 16, random.Random()).pick(1) is None


def test_request_hash_sources():
    hdrs = {b"x-user": b"alice", b"cookie": b"a=1; session=s42; b=2"}
    path = b"/p?x=1&user=bob"
    ip = b"10.1.2.3"
    assert request_hash((HashPolicy(HashKind.HEADER, b"x-user"),), hdrs, path, ip) == stable_hash(b"alice")
    assert request_hash((HashPolicy(HashKind.COOKIE, b"session"),), hdrs, path, ip) == stable_hash(b"s42")
    assert request_hash((HashPolicy(HashKind.SOURCE_IP),), hdrs, path, ip) == stable_hash(ip)
    assert request_hash((HashPolicy(HashKind.QUERY_PARAMETER, b"user"),), hdrs, path, ip) == stable_hash(b"bob")
    # Absent values give no key (a random pick); the first policy with a value wins.
    assert request_hash((HashPolicy(HashKind.COOKIE, b"nope"),), {}, b"/", ip) is None
    assert request_hash((HashPolicy(HashKind.QUERY_PARAMETER, b"u"),), {}, b"/p", ip) is None
    two = (HashPolicy(HashKind.HEADER, b"missing"), HashPolicy(HashKind.HEADER, b"x-user"))
    assert request_hash(two, hdrs, path, ip) == stable_hash(b"alice")


def _static(policy: int) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(name="c", type=cluster_pb2.Cluster.STATIC, lb_policy=policy)


def test_compile_lb_policies():
    assert _cluster(_static(cluster_pb2.Cluster.LEAST_REQUEST), {}).lb_policy == "LEAST_REQUEST"
    assert _cluster(_static(cluster_pb2.Cluster.RANDOM), {}).lb_policy == "RANDOM"
    c = _static(cluster_pb2.Cluster.RING_HASH)
    assert _cluster(c, {}).ring_size == 1024
    c.ring_hash_lb_config.minimum_ring_size.value = 64
    got = _cluster(c, {})
    assert (got.lb_policy, got.ring_size) == ("RING_HASH", 64)
    c = _static(cluster_pb2.Cluster.LEAST_REQUEST)
    c.least_request_lb_config.choice_count.value = 3
    with pytest.raises(InvalidResource, match="only 2"):
        _cluster(c, {})
    c = _static(cluster_pb2.Cluster.ROUND_ROBIN)
    c.ring_hash_lb_config.minimum_ring_size.value = 64
    with pytest.raises(InvalidResource, match="only used with lb_policy RING_HASH"):
        _cluster(c, {})
    with pytest.raises(InvalidResource, match="MAGLEV is not supported yet"):
        _cluster(_static(cluster_pb2.Cluster.MAGLEV), {})


def test_compile_hash_policies():
    ctx = _Ctx("RouteConfiguration", "r")
    H = rc.RouteAction.HashPolicy
    assert _hash_policy(ctx, H(header=H.Header(header_name="X-User")), "p") == HashPolicy(HashKind.HEADER, b"x-user")
    cookie = H(cookie=H.Cookie(name="s", path="/"))
    cookie.cookie.ttl.seconds = 10
    assert _hash_policy(ctx, cookie, "p") == HashPolicy(HashKind.COOKIE, b"s")
    ip = H(connection_properties=H.ConnectionProperties(source_ip=True))
    assert _hash_policy(ctx, ip, "p") == HashPolicy(HashKind.SOURCE_IP)
    q = H(query_parameter=H.QueryParameter(name="u"))
    assert _hash_policy(ctx, q, "p") == HashPolicy(HashKind.QUERY_PARAMETER, b"u")
    with pytest.raises(InvalidResource, match="filter_state: field is not supported"):
        _hash_policy(ctx, H(filter_state=H.FilterState(key="k")), "p")
    with pytest.raises(InvalidResource, match="not supported by this proxy"):
        _hash_policy(ctx, H(header=H.Header(header_name="x"), terminal=True), "p")
