"""Request mirroring: a fire-and-forget copy of a request to a shadow cluster.

A ``Shadow`` is started by the primary stream once the whole request is in
hand (the bytes it kept, bounded); it checks out a connection of the mirror
cluster's pool, writes the copy with "-shadow" added to the Host, and reads
and discards the response. It never reports to the primary, never delays
it, and any failure only ends the shadow. A mirror cluster that speaks
HTTP/2 upstream is not mirrored to (counted nowhere; documented).
"""

from __future__ import annotations

from proxy.cluster import ClusterRuntime
from proxy.context import Context
from proxy.errors import ProxyError
from proxy.route_edit import shadow_head
from proxy.upstream import UpstreamConnection


class Shadow:
    __slots__ = ("data", "up")

    def __init__(self, data: list[bytes]) -> None:
        self.data = data
        self.up: UpstreamConnection | None = None

    def start(self, rt: ClusterRuntime, ctx: Context) -> None:
        ep = rt.lb.pick(None)
        if ep is None or rt.spec.http2:
            return
        rt.stats.rq_mirrored += 1
        pool = rt.pool(ep, ctx.loop)
        try:
            up = pool.acquire(self._on_connected)
        except ProxyError:
            return
        if up is not None:
            self._send(up)

    def _on_connected(self, up: UpstreamConnection | None, err: ProxyError | None) -> None:
        if up is not None:
            self._send(up)

    def _send(self, up: UpstreamConnection) -> None:
        self.up = up
        up.exchange = self
        data = self.data
        data[0] = shadow_head(data[0])
        up.write(b"".join(data))
        self.data = []

    # Exchange: everything the shadow's upstream says is dropped.
    def on_upstream_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        pass

    def on_upstream_body(self, data: bytes) -> None:
        pass

    def on_upstream_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        pass

    def on_upstream_complete(self, keep_alive: bool) -> None:
        up, self.up = self.up, None
        if up is not None:
            up.release(keep_alive)

    def on_upstream_upgrade(self, rest: bytes) -> None:
        self.on_upstream_error(ProxyError())

    def on_upstream_error(self, err: ProxyError) -> None:
        up, self.up = self.up, None
        if up is not None:
            up.abort()

    def on_upstream_flush(self) -> None:
        pass

    def pause_downstream(self) -> None:
        pass

    def resume_downstream(self) -> None:
        pass
