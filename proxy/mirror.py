"""Request mirroring: a fire-and-forget copy of a request to a shadow cluster.

A ``Shadow`` is started by the primary stream once the whole request is in
hand (the bytes it kept, bounded); it checks out a connection (HTTP/1.1) or
a stream (HTTP/2) of the mirror cluster's pool, sends the copy with
"-shadow" added to the Host, and reads and discards the response. It never
reports to the primary, never delays it, and any failure only ends the
shadow.

The kept bytes are the HTTP/1.1 head the core built and the body as the
primary's upstream got it: plain for an HTTP/2 upstream, chunk-framed for an
HTTP/1.1 one when the length was unknown. When the mirror cluster speaks
the other protocol the body is re-framed (a copy, off the primary's path:
mirrored requests are at most the kept 1 MiB).
"""

from __future__ import annotations

from typing import Any

from proxy.cluster import ClusterRuntime
from proxy.context import Context
from proxy.errors import ProxyError
from proxy.route_edit import last_chunk, shadow_head


def dechunk(framed: bytes) -> bytes:
    """The payload of a chunked body the proxy framed itself (sizes, data, CRLFs, a last chunk)."""
    parts: list[bytes] = []
    pos = 0
    while True:
        eol = framed.index(b"\r\n", pos)
        n = int(framed[pos:eol], 16)
        if n == 0:
            return b"".join(parts)
        start = eol + 2
        parts.append(framed[start:start + n])
        pos = start + n + 2


class Shadow:
    __slots__ = ("chunked", "data", "h2", "plain", "trailers", "up")

    def __init__(self, data: list[bytes], plain: bool, chunked: bool,
                 trailers: list[tuple[bytes, bytes]] | None) -> None:
        self.data = data  # [head, body pieces...]
        self.plain = plain  # the body pieces are unframed (the primary went upstream over HTTP/2)
        self.chunked = chunked  # the head says transfer-encoding: chunked
        self.trailers = trailers
        self.h2 = False  # the mirror cluster speaks HTTP/2
        self.up: Any = None

    def start(self, rt: ClusterRuntime, ctx: Context, h2: bool) -> None:
        """Send the copy to ``rt``, over HTTP/2 if ``h2`` (``Stream.speaks_h2``, the primary's rule)."""
        ep = rt.lb.pick(None)
        if ep is None:
            return
        rt.stats.rq_mirrored += 1
        self.h2 = h2
        pool: Any = rt.h2_pool(ep, ctx.loop) if h2 else rt.pool(ep, ctx.loop)
        try:
            up = pool.acquire(self._on_connected)
        except ProxyError:
            return
        if up is not None:
            self._send(up)

    def _on_connected(self, up: Any, err: ProxyError | None) -> None:
        if up is not None:
            self._send(up)

    def _send(self, up: Any) -> None:
        self.up = up
        up.exchange = self
        data = self.data
        self.data = []
        head = shadow_head(data[0])
        body = b"".join(data[1:])
        trailers = self.trailers
        if self.h2:
            if self.chunked and not self.plain:
                body = dechunk(body)
            up.send_head(head, not body and not trailers)
            if body:
                up.send_data(body, not trailers)
            if trailers:
                up.send_trailers(trailers)
        elif self.plain and self.chunked:
            up.write(b"".join([head, b"%x\r\n" % len(body), body, b"\r\n", last_chunk(trailers)]) if body
                     else head + last_chunk(trailers))
        else:
            up.write(head + body)

    # Exchange: everything the shadow's upstream says is dropped.
    def h2_fields(self, head: bytes, scheme: bytes) -> None:
        return None  # the head was edited ("-shadow"): convert it

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
