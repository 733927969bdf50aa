"""The per-worker state shared by listeners and connections.

One ``Context`` per worker process (one event loop). It holds the current
snapshot (replaced by one reference assignment on swap), the cluster manager,
the stats store and the set of live connections (for drain and the idle
sweep). Connections read ``ctx.snapshot`` once per request, so a request keeps
the config it started with.
"""

from __future__ import annotations

import asyncio
import random
from typing import Protocol

from proxy.accesslog import AccessLogger  # [accesslog]
from proxy.cluster import ClusterManager
from proxy.jwks_fetch import JwksFetcher
from proxy.model import EMPTY, Snapshot
from proxy.stats import StatsStore
from proxy.tls import TlsProvider
from proxy.tracing import Tracer  # [tracing]


class Connection(Protocol):
    def on_tick(self, tick: int) -> None: ...
    def drain(self) -> None: ...
    def abort(self) -> None: ...


class Context:
    def __init__(self, loop: asyncio.AbstractEventLoop, *, node: dict[str, str] | None = None, rng: random.Random | None = None) -> None:
        self.loop = loop
        self.stats = StatsStore()
        self.tls = TlsProvider()
        self.clusters = ClusterManager(loop, self.stats, self.tls)
        self.jwks = JwksFetcher(loop)  # remote JWKS of RequestAuthentication jwksUri, kept fresh
        self.snapshot: Snapshot = EMPTY
        self.tracer = Tracer()  # [tracing] spans queued per worker, exported by a background thread
        self.access_log = AccessLogger(loop)  # [accesslog] records queued per worker, written in the background
        self.connections: set[Connection] = set()
        self.draining = False
        self.drained = asyncio.Event()  # set when draining and the last connection closed
        self.tick = 0  # advanced by the worker's sweeper; connections stamp it when they go idle
        self.tick_seconds = 1.0
        self.node = node or {}
        self.random = (rng or random.Random()).random
        self.getrandbits = (rng or random.Random()).getrandbits
        self.trace_lines: list[bytes] = []  # [tracing] ready-made traceparent lines of new traces

    def forget(self, conn: Connection) -> None:
        """Called by a connection when it closes."""
        conns = self.connections
        conns.discard(conn)
        if not conns and self.draining:
            self.drained.set()

    def swap(self, snapshot: Snapshot) -> None:
        """Install a new snapshot: secrets, then clusters, then the reference the hot path reads."""
        self.tls.update(snapshot.secrets)
        self.clusters.update(snapshot.clusters)
        self.jwks.update(snapshot)
        self.tracer.update(snapshot)  # [tracing] the collector's address; starts the exporter once
        self.snapshot = snapshot
