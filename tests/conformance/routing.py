"""The routing conformance case, reusable against any sidecar: a mesh, its upstream apps, and the assertions.

`routing_mesh(listen_port, apps)` is the Istio YAML: a ServiceEntry
"reviews" with three workloads (version v1, v2, v3, each a `NamedApp` on
127.0.0.1), a DestinationRule with their subsets, a VirtualService routing
`end-user: jason` to v2, `/split` 80/20 to v1/v3 and everything else to v1,
and a Sidecar giving workloads labelled app=client an HTTP egress listener
on 127.0.0.1:<listen_port>. `assert_routing(port)` sends requests through
that listener and checks where they landed: any proxy given this config
(Envoy fed by `pillion control`, `pillion proxy --xds`, `pillion proxy
--config-dir`) must pass it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from dataclasses import dataclass, field

from tests.helpers.poll import poll

REQUESTS_FOR_SPLIT = 200
SPLIT_V1 = 0.8


@dataclass
class NamedApp:
    """A tiny HTTP/1.1 server on 127.0.0.1 whose every response body is its name."""

    name: str
    port: int = 0
    requests: int = 0
    _server: asyncio.Server | None = field(default=None, repr=False)

    async def start(self) -> NamedApp:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = self.name.encode()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = _content_length(head)
                if length:
                    await reader.readexactly(length)
                self.requests += 1
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                    + f"content-length: {len(body)}\r\nx-app: {self.name}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


async def start_apps() -> dict[str, NamedApp]:
    apps = {version: NamedApp(f"reviews-{version}") for version in ("v1", "v2", "v3")}
    for app in apps.values():
        await app.start()
    return apps


def routing_mesh(listen_port: int, apps: dict[str, NamedApp], *, client_app: str = "client") -> str:
    endpoints = "\n".join(
        f"  - {{address: 127.0.0.1, ports: {{http: {app.port}}}, labels: {{app: reviews, version: {version}}}}}"
        for version, app in sorted(apps.items())
    )
    return f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: {listen_port}, name: http, protocol: HTTP}}]
  endpoints:
{endpoints}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: default}}
spec:
  host: reviews
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
  - {{name: v3, labels: {{version: v3}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews]
  http:
  - name: jason
    match:
    - headers: {{end-user: {{exact: jason}}}}
    route:
    - destination: {{host: reviews, subset: v2}}
  - name: split
    match:
    - uri: {{prefix: /split}}
    route:
    - {{destination: {{host: reviews, subset: v1}}, weight: {round(SPLIT_V1 * 100)}}}
    - {{destination: {{host: reviews, subset: v3}}, weight: {round((1 - SPLIT_V1) * 100)}}}
  - name: default
    route:
    - destination: {{host: reviews, subset: v1}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: {client_app}, namespace: default}}
spec:
  workloadSelector: {{labels: {{app: {client_app}}}}}
  egress:
  - port: {{number: {listen_port}, name: http, protocol: HTTP}}
    bind: 127.0.0.1
    captureMode: NONE
    hosts: ["./*"]
"""


class HttpClient:
    """One keep-alive HTTP/1.1 connection (reconnects if the peer closes it)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def get(self, path: str, host: str, headers: dict[str, str] | None = None,
                  timeout: float = 5.0) -> tuple[int, bytes]:
        return await asyncio.wait_for(self._get(path, host, headers or {}), timeout)

    async def _get(self, path: str, host: str, headers: dict[str, str]) -> tuple[int, bytes]:
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self._reader is not None
        lines = [f"GET {path} HTTP/1.1", f"host: {host}", *(f"{k}: {v}" for k, v in headers.items())]
        self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await self._writer.drain()
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        fields = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip().lower()
        if b"content-length" in fields:
            body = await self._reader.readexactly(int(fields[b"content-length"]))
        elif fields.get(b"transfer-encoding") == b"chunked":
            body = await self._chunked()
        else:
            body = await self._reader.read()
            await self.close()
        if fields.get(b"connection") == b"close":
            await self.close()
        return status, body

    async def _chunked(self) -> bytes:
        assert self._reader is not None
        out = b""
        while True:
            size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self._reader.readuntil(b"\r\n")
                return out
            out += await self._reader.readexactly(size)
            await self._reader.readexactly(2)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
            self._writer = None


def binomial_bounds(n: int, p: float, sigmas: float = 5.0) -> tuple[float, float]:
    spread = sigmas * math.sqrt(n * p * (1 - p))
    return n * p - spread, n * p + spread


async def wait_routable(port: int, host: str = "reviews", timeout: float = 10.0) -> None:
    """Poll (with a deadline) until a request through the listener reaches an app."""
    last: list[object] = [None]

    async def routes() -> bool:
        client = HttpClient(port)
        try:
            status, body = await client.get("/", host, timeout=1.0)
            last[0] = (status, body)
            return status == 200 and body.startswith(b"reviews-")
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            last[0] = exc
            return False
        finally:
            await client.close()

    try:
        await poll(routes, timeout=timeout, interval=0.05)
    except TimeoutError:
        raise TimeoutError(f"listener on {port} did not route to an app in {timeout}s (last: {last[0]!r})") from None


async def assert_routing(port: int, host: str = "reviews") -> None:
    """Through the egress listener on 127.0.0.1:`port`: header match, default, 80/20 split, unknown host."""
    client = HttpClient(port)
    try:
        status, body = await client.get("/", host, {"end-user": "jason"})
        assert (status, body) == (200, b"reviews-v2"), "end-user: jason must go to subset v2"
        status, body = await client.get("/", f"{host}:{port}", {"end-user": "someone-else"})
        assert (status, body) == (200, b"reviews-v1"), "a non-matching header must go to the default (v1)"
        status, body = await client.get("/", "reviews.default.svc.cluster.local")
        assert (status, body) == (200, b"reviews-v1"), "the full host name must route like the short one"
        counts: dict[bytes, int] = {}
        for _ in range(REQUESTS_FOR_SPLIT):
            status, body = await client.get("/split", host)
            assert status == 200, (status, body)
            counts[body] = counts.get(body, 0) + 1
        assert set(counts) <= {b"reviews-v1", b"reviews-v3"}, counts
        low, high = binomial_bounds(REQUESTS_FOR_SPLIT, SPLIT_V1)
        v1 = counts.get(b"reviews-v1", 0)
        assert low <= v1 <= high, f"80/20 split: {v1}/{REQUESTS_FOR_SPLIT} to v1, expected {low:.0f}..{high:.0f}"
        status, _ = await client.get("/", "unknown.example.com")
        assert status == 404, f"an unknown host must get 404, got {status}"
    finally:
        await client.close()
