"""Hand-built snapshots served by an in-process worker, for data-plane tests of one behaviour.

The config pipeline (Istio YAML -> xDS -> compile) has its own tests; these
start a real ``Worker`` on the test's loop with a ``model.Snapshot`` built
here, so a runtime behaviour (a retry, a breaker, a fault) is tested without
depending on how the translator spells it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from proxy import model
from proxy.stats import ClusterStats
from proxy.worker import Worker


def cluster(name: str, *ports: int, **kw: object) -> model.Cluster:
    eps = tuple(model.Endpoint("127.0.0.1", p) for p in ports)
    return model.Cluster(name, eps, connect_timeout=2.0, **kw)  # type: ignore[arg-type]


def route(cluster_name: str = "c", *, prefix: bytes = b"/", **kw: object) -> model.Route:
    return model.Route(kw.pop("name", "r"), model.PathKind.PREFIX, prefix, None,  # type: ignore[arg-type]
                       kw.pop("headers", ()), cluster_name, timeout=kw.pop("timeout", 5.0), **kw)  # type: ignore[arg-type]


def snapshot(routes: list[model.Route], clusters: list[model.Cluster], *, domains: tuple[str, ...] = ("*",),
             http: dict[str, object] | None = None) -> model.Snapshot:
    vh = model.VirtualHost("vh", domains, tuple(routes))
    exact = {d.encode(): vh for d in domains if d != "*"}
    table = model.RouteTable("rt", exact, wildcard=vh if "*" in domains else None, virtual_hosts=(vh,))
    settings = model.HttpSettings("test", "rt", **(http or {}))  # type: ignore[arg-type]
    listener = model.Listener("l", "127.0.0.1", 0, model.Direction.OUTBOUND, model.Protocol.HTTP, http=settings)
    return model.Snapshot("v1", (listener,), {"rt": table}, {c.name: c for c in clusters})


@dataclass
class Served:
    worker: Worker
    port: int

    def stats(self, cluster_name: str = "c") -> ClusterStats:
        return self.worker.ctx.stats.cluster(cluster_name, "", "outbound")

    def flags(self, cluster_name: str = "c") -> dict[tuple[int, str], int]:
        out: dict[tuple[int, str], int] = {}
        for (code, flags, _m, _p, _g), cls in self.stats(cluster_name).classes.items():
            out[(code, flags)] = out.get((code, flags), 0) + cls.count
        return out


@contextlib.asynccontextmanager
async def serve(snap: model.Snapshot) -> AsyncIterator[Served]:
    w = Worker(asyncio.get_running_loop())
    errors = await w.apply(snap)
    assert not errors, errors
    try:
        yield Served(w, w.listeners.ports()["l"])
    finally:
        await w.drain(0.5)


@dataclass
class FixedUpstream:
    """An HTTP/1.1 server whose every answer is decided by ``behave(n)`` (n counts requests from 0):
    a status code, "reset" (abort the connection), or "hang" (never answer)."""

    behave: Callable[[int], int | str]
    seen: list[bytes] = field(default_factory=list)  # each request's head and body, as received
    port: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    server: asyncio.AbstractServer | None = None
    transports: list[asyncio.Transport] = field(default_factory=list)
    closed: int = 0  # connections the proxy (or the test) closed

    async def __aenter__(self) -> FixedUpstream:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Fixed(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in self.transports:
            t.abort()
        assert self.server is not None
        self.server.close()

    async def wait_for(self, pred: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not pred():
                self.changed.clear()
                await self.changed.wait()


class _Fixed(asyncio.Protocol):
    def __init__(self, up: FixedUpstream) -> None:
        self.up = up
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.up.transports.append(self.transport)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self.up.closed += 1
        self.up.changed.set()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, rest = self.buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            body, self.buf = rest[:length], rest[length:]
            n = len(self.up.seen)
            self.up.seen.append(head + b"\r\n\r\n" + body)
            self.up.changed.set()
            what = self.up.behave(n)
            t = self.transport
            assert t is not None
            if what == "reset":
                t.abort()
                return
            if what == "hang":
                return
            text = b"from %d" % self.up.port
            t.write(b"HTTP/1.1 %d X\r\ncontent-length: %d\r\nx-served-by: %d\r\n\r\n%s"
                    % (int(what), len(text), self.up.port, text))
