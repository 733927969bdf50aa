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
from proxy.tls import TlsProvider
from proxy.upstream import Pool

# ORIGINAL_DST clusters make an endpoint (and a pool) per destination; past this many
# they start over (Envoy instead sweeps unused hosts every cleanup_interval, 5 s).
MAX_ORIGINAL_DST = 256


class ClusterRuntime:
    __slots__ = ("active", "dst_endpoints", "lb", "pools", "spec", "stats", "tls")

    def __init__(self, spec: Cluster, stats: ClusterStats, pools: dict[Endpoint, Pool], tls: TlsProvider) -> None:
        self.spec = spec
        self.stats = stats
        self.tls = tls
        # [lb] LEAST_REQUEST: requests in flight per endpoint, kept by the streams (None: not tracked)
        self.active: dict[Endpoint, int] | None = {} if spec.lb_policy == "LEAST_REQUEST" else None
        self.lb: LoadBalancer = make_lb(spec.lb_policy, spec.endpoints, active=self.active,
                                        ring_size=spec.ring_size)
        self.pools = pools
        self.dst_endpoints: dict[tuple[str, int], Endpoint] = {}

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
                for ep, pool in prev.pools.items():
                    if ep in keep and pool.connect_timeout == spec.connect_timeout:
                        pools[ep] = pool
                    else:
                        _retire(pool)
            new[name] = ClusterRuntime(spec, stats, pools, self.tls)
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
