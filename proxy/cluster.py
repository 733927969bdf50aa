"""Clusters at run time: endpoints, load balancer, pools and stats, per worker.

``ClusterManager.update`` is called with each new snapshot's clusters. A
cluster whose spec did not change is kept as is; a changed one gets a new
load balancer but keeps the pools (and their warm connections) of endpoints
that are still there. Pools of endpoints that disappeared are closed once
their in-flight exchanges finish (idle connections are closed now).

[traffic] A runtime also holds the cluster's circuit-breaker counters
(retries in flight; requests and connections are counted in its stats) and
its outlier detection: an ejection rebuilds the load balancer over the hosts
left, and a timer (not the request path) brings ejected hosts back.
"""

from __future__ import annotations

import asyncio
import random

from proxy.lb import LoadBalancer, make_lb
from proxy.model import Cluster, Endpoint
from proxy.resilience import Outlier
from proxy.stats import ClusterStats, StatsStore
from proxy.tls import TlsProvider
from proxy.upstream import Pool
from proxy.upstream_h2 import H2Pool

# ORIGINAL_DST clusters make an endpoint (and a pool) per destination; past this many
# they start over (Envoy instead sweeps unused hosts every cleanup_interval, 5 s).
MAX_ORIGINAL_DST = 256


class ClusterRuntime:
    __slots__ = ("_outlier_timer", "active", "dst_endpoints", "h2_pools", "lb", "loop", "outlier", "pools",
                 "retries_active", "spec", "stats", "tls")

    def __init__(self, spec: Cluster, stats: ClusterStats, pools: dict[Endpoint, Pool], tls: TlsProvider,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.spec = spec
        self.stats = stats
        self.tls = tls
        self.loop = loop
        # [lb] LEAST_REQUEST: requests in flight per endpoint, kept by the streams (None: not tracked)
        self.active: dict[Endpoint, int] | None = {} if spec.lb_policy == "LEAST_REQUEST" else None
        self.lb: LoadBalancer = make_lb(spec.lb_policy, spec.endpoints, active=self.active,
                                        ring_size=spec.ring_size)
        self.pools = pools
        self.h2_pools: dict[Endpoint, H2Pool] = {}  # [http2] multiplexed connections per endpoint
        self.dst_endpoints: dict[tuple[str, int], Endpoint] = {}
        self.retries_active = 0  # [traffic] retries in flight (the retry budget / max_retries)
        self.outlier: Outlier | None = Outlier(spec.outlier) if spec.outlier is not None else None
        self._outlier_timer: asyncio.TimerHandle | None = None

    def h2_pool(self, ep: Endpoint, loop: asyncio.AbstractEventLoop) -> H2Pool:
        """[http2] The multiplexed HTTP/2 pool of ``ep``."""
        pool = self.h2_pools.get(ep)
        if pool is None:
            spec = self.spec
            pool = self.h2_pools[ep] = H2Pool(loop, ep.host, ep.port, spec.connect_timeout, self.stats, ep.tls,
                                              self.tls, spec.h2_max_concurrent_streams)
            pool.limits = spec.limits
            pool.max_uses = spec.max_requests_per_connection
        return pool

    # ---- [traffic] outlier detection
    def record_outcome(self, ep: Endpoint, status: int) -> None:
        """An attempt on ``ep`` ended with ``status`` (503 for a local-origin failure)."""
        outlier = self.outlier
        if outlier is None or self.loop is None:
            return
        now = self.loop.time()
        if outlier.record(ep, status, len(self.spec.endpoints), now, _rand()):
            self.stats.ejections_total += 1
            self._rebuild()

    def _rebuild(self) -> None:
        outlier = self.outlier
        assert outlier is not None and self.loop is not None
        spec = self.spec
        self.stats.ejections_active = len(outlier.ejected)
        self.stats.ejected = {ep.address: 1 for ep in outlier.ejected}
        self.lb = make_lb(spec.lb_policy, outlier.healthy(spec.endpoints), active=self.active,
                          ring_size=spec.ring_size)
        if self._outlier_timer is not None:
            self._outlier_timer.cancel()
            self._outlier_timer = None
        when = outlier.next_expiry()
        if when is not None:
            self._outlier_timer = self.loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self._outlier_timer = None
        outlier = self.outlier
        if outlier is not None and self.loop is not None:
            outlier.expire(self.loop.time())
            self._rebuild()

    def stop(self) -> None:
        if self._outlier_timer is not None:
            self._outlier_timer.cancel()
            self._outlier_timer = None
    # ---- [traffic] end

    def pick_original(self, dst: tuple[str, int] | None) -> Endpoint | None:
        """ORIGINAL_DST: the intercepted connection's original destination (None: there is none)."""
        if dst is None:
            return None
        ep = self.dst_endpoints.get(dst)
        if ep is None:
            if len(self.dst_endpoints) >= MAX_ORIGINAL_DST:
                self.dst_endpoints.clear()
                for pool in self.pools.values():
                    _retire(pool)
                self.pools = {}
            ep = self.dst_endpoints[dst] = Endpoint(dst[0], dst[1], tls=self.spec.original_dst_tls)
        return ep

    def pool(self, ep: Endpoint, loop: asyncio.AbstractEventLoop) -> Pool:
        pool = self.pools.get(ep)
        if pool is None:
            pool = self.pools[ep] = Pool(loop, ep.host, ep.port, self.spec.connect_timeout, self.stats,
                                         ep.tls, self.tls)
            pool.limits = self.spec.limits
            pool.max_uses = self.spec.max_requests_per_connection
        return pool


class ClusterManager:
    def __init__(self, loop: asyncio.AbstractEventLoop, stats: StatsStore, tls: TlsProvider) -> None:
        self.loop = loop
        self.stats = stats
        self.tls = tls
        self.clusters: dict[str, ClusterRuntime] = {}

    def get(self, name: str) -> ClusterRuntime | None:
        return self.clusters.get(name)

    def update(self, specs: dict[str, Cluster]) -> None:
        old = self.clusters
        new: dict[str, ClusterRuntime] = {}
        for name, spec in specs.items():
            prev = old.get(name)
            if prev is not None and prev.spec == spec:
                new[name] = prev
                continue
            stats = self.stats.cluster(name, spec.service, spec.direction.value)
            keep = set(spec.endpoints)  # an endpoint whose address or TLS changed gets a new pool
            pools: dict[Endpoint, Pool] = {}
            if prev is not None:
                prev.stop()
                for ep, pool in prev.pools.items():
                    if ep in keep and pool.connect_timeout == spec.connect_timeout:
                        pool.limits = spec.limits
                        pool.max_uses = spec.max_requests_per_connection
                        pools[ep] = pool
                    else:
                        _retire(pool)
            new[name] = ClusterRuntime(spec, stats, pools, self.tls, self.loop)
            if prev is not None:  # [http2] HTTP/2 pools: kept (with new limits) or retired like the others
                for ep, h2p in prev.h2_pools.items():
                    if ep in keep and h2p.connect_timeout == spec.connect_timeout and spec.http2 == prev.spec.http2:
                        h2p.limits = spec.limits
                        h2p.max_uses = spec.max_requests_per_connection
                        new[name].h2_pools[ep] = h2p
                    else:
                        h2p.retire()
        for name, prev in old.items():
            if name not in new:
                prev.stop()
                for pool in prev.pools.values():
                    _retire(pool)
                for h2p in prev.h2_pools.values():  # [http2]
                    h2p.retire()
        self.clusters = new

    def sweep(self, now: float) -> None:
        """Called once a tick by the worker: close upstream connections past their cluster's idle_timeout."""
        for rt in self.clusters.values():
            timeout = rt.spec.idle_timeout
            if timeout > 0:
                for pool in rt.pools.values():
                    if pool.idle:
                        pool.close_idle(now, timeout)
                for h2p in rt.h2_pools.values():  # [http2]
                    if h2p.conns:
                        h2p.close_idle(now, timeout)

    def close(self) -> None:
        for rt in self.clusters.values():
            for pool in rt.pools.values():
                pool.close()
            for h2p in rt.h2_pools.values():  # [http2]
                h2p.close()


_rng = random.Random()
_rand = _rng.random


def _retire(pool: Pool) -> None:
    pool.retire()
