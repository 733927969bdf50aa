"""Clusters at run time: endpoints, load balancer, pools and stats, per worker.

``ClusterManager.update`` is called with each new snapshot's clusters. A
cluster whose spec did not change is kept as is; a changed one gets a new
load balancer but keeps the pools (and their warm connections) of endpoints
that are still there. Pools of endpoints that disappeared are closed once
their in-flight exchanges finish (idle connections are closed now).
"""

from __future__ import annotations

import asyncio

from proxy.lb import LoadBalancer, make_lb
from proxy.model import Cluster, Endpoint
from proxy.stats import ClusterStats, StatsStore
from proxy.upstream import Pool


class ClusterRuntime:
    __slots__ = ("lb", "pools", "spec", "stats")

    def __init__(self, spec: Cluster, stats: ClusterStats, pools: dict[tuple[str, int], Pool]) -> None:
        self.spec = spec
        self.stats = stats
        self.lb: LoadBalancer = make_lb(spec.lb_policy, spec.endpoints)
        self.pools = pools

    def pool(self, ep: Endpoint, loop: asyncio.AbstractEventLoop) -> Pool:
        key = (ep.host, ep.port)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = Pool(loop, ep.host, ep.port, self.spec.connect_timeout, self.stats)
        return pool


class ClusterManager:
    def __init__(self, loop: asyncio.AbstractEventLoop, stats: StatsStore) -> None:
        self.loop = loop
        self.stats = stats
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
            keep = {(ep.host, ep.port) for ep in spec.endpoints}
            pools: dict[tuple[str, int], Pool] = {}
            if prev is not None:
                for key, pool in prev.pools.items():
                    if key in keep and pool.connect_timeout == spec.connect_timeout:
                        pools[key] = pool
                    else:
                        _retire(pool)
            new[name] = ClusterRuntime(spec, stats, pools)
        for name, prev in old.items():
            if name not in new:
                for pool in prev.pools.values():
                    _retire(pool)
        self.clusters = new

    def close(self) -> None:
        for rt in self.clusters.values():
            for pool in rt.pools.values():
                pool.close()


def _retire(pool: Pool) -> None:
    pool.retire()
