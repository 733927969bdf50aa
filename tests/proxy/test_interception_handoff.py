"""The capture listeners at run time, on loopback, without iptables.

The translator's capture resources are compiled and applied to a worker, with
the capture listeners moved to 127.0.0.1 and free ports; the original
destination each connection "had" is given by the test (``original_dst`` is
replaced by a table keyed by the client's port), so the hand-off, the chains,
ORIGINAL_DST clusters and the refusals run exactly as they do behind
iptables. One test keeps the real ``original_dst``: a connection that was
not redirected has no original destination of its own and is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

import proxy.listener
from control.translate import NodeInfo, load_text, translate
from proxy.compile import XdsResources, compile_snapshot
from proxy.worker import Worker
from tests.helpers.net import RawClient, free_port
from tests.helpers.upstreams import RecordingUpstream, TcpServer

HOST = "web.default.svc.cluster.local"
VIP = "10.9.9.9"
CLIENT = NodeInfo(labels={"app": "client"}, intercept=True)
SERVER = NodeInfo(labels={"app": "web"}, intercept=True)  # the ServiceEntry selects it


def mesh(port: int, mode: str = "PERMISSIVE") -> str:
    return f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web, namespace: default}}
spec:
  hosts: [{HOST}]
  addresses: [{VIP}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: {port}, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {{app: web}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: web, namespace: default}}
spec:
  address: 127.0.0.1
  labels: {{app: web}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: istio-system}}
spec:
  mtls: {{mode: {mode}}}
"""


@dataclass
class Captured:
    outbound: int  # where virtualOutbound listens (instead of 15001)
    inbound: int  # where virtualInbound listens (instead of 15006)
    worker: Worker
    destinations: dict[int, tuple[str, int]] = field(default_factory=dict)  # client port -> original dst

    async def connect(self, port: int, dst: tuple[str, int]) -> RawClient:
        """A client connection to a capture port, as if it had dialled ``dst``."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.destinations[sock.getsockname()[1]] = dst
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        return RawClient(reader, writer)


@contextlib.asynccontextmanager
async def captured(text: str, node: NodeInfo, monkeypatch: pytest.MonkeyPatch,
                   fake: bool = True) -> AsyncIterator[Captured]:
    res = translate(load_text(text), node)
    outbound = free_port()
    inbound = free_port()
    while inbound == outbound:  # free_port may hand out the same port twice
        inbound = free_port()
    ports = {"virtualOutbound": outbound, "virtualInbound": inbound}
    for ln in res.listeners:
        if ln.name in ports:
            ln.address.socket_address.address = "127.0.0.1"
            ln.address.socket_address.port_value = ports[ln.name]
    snap = compile_snapshot(XdsResources(res.listeners, res.routes, res.clusters, res.endpoints))
    worker = Worker(asyncio.get_running_loop())
    state = Captured(ports["virtualOutbound"], ports["virtualInbound"], worker)
    if fake:
        def original_dst(sock: socket.socket) -> tuple[str, int]:
            try:
                return state.destinations[sock.getpeername()[1]]
            except KeyError:
                raise OSError("not redirected") from None

        monkeypatch.setattr(proxy.listener, "original_dst", original_dst)
    assert await worker.apply(snap) == []
    try:
        yield state
    finally:
        await worker.drain(0.1)


async def get(client: RawClient, host: str, path: str = "/") -> int:
    try:
        return (await client.request("GET", path, host)).status
    finally:
        await client.close()


async def closed(client: RawClient) -> bool:
    """True if the proxy closes the connection without answering a request."""
    try:
        await client.send(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        return await client.reader.read(100) == b""
    except ConnectionError:
        return True
    finally:
        await client.close()


async def test_outbound_hands_off_to_the_listener_of_the_original_port(monkeypatch: pytest.MonkeyPatch) -> None:
    async with (
        RecordingUpstream("web") as web,
        captured(mesh(web.port), CLIENT, monkeypatch) as cap,
    ):
        # Routed by Host to the service's endpoints (the VIP itself does not exist).
        assert await get(await cap.connect(cap.outbound, (VIP, web.port)), f"{VIP}:{web.port}", "/routed") == 200
        assert web.requests[-1].path == "/routed"
        # An unknown Host on that port: the catch-all virtual host, to PassthroughCluster,
        # which dials the connection's original destination.
        assert await get(await cap.connect(cap.outbound, ("127.0.0.1", web.port)), "elsewhere", "/pass") == 200
        assert (web.requests[-1].path, web.requests[-1].header("host")) == ("/pass", "elsewhere")
        stats = cap.worker.export_stats()["clusters"]
        assert stats["PassthroughCluster"]["rq_total"] == 1
        assert stats[f"outbound|{web.port}||{HOST}"]["rq_total"] == 1


async def test_outbound_without_a_listener_passes_tcp_through(monkeypatch: pytest.MonkeyPatch) -> None:
    async with (
        TcpServer() as echo,
        RecordingUpstream("web") as web,
        captured(mesh(web.port), CLIENT, monkeypatch) as cap,
    ):
        client = await cap.connect(cap.outbound, ("127.0.0.1", echo.port))
        try:
            await client.send(b"ping")
            assert await asyncio.wait_for(client.reader.readexactly(4), 5) == b"ping"
        finally:
            await client.close()
        assert cap.worker.export_stats()["clusters"]["PassthroughCluster"]["tcp_opened"] == 1


async def test_registry_only_closes_unknown_tcp(monkeypatch: pytest.MonkeyPatch) -> None:
    registry_only = "---\nkind: MeshConfig\nspec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}\n"
    async with (
        TcpServer() as echo,
        RecordingUpstream("web") as web,
        captured(mesh(web.port) + registry_only, CLIENT, monkeypatch) as cap,
    ):
        assert await closed(await cap.connect(cap.outbound, ("127.0.0.1", echo.port)))
        assert echo.connections == 0


@pytest.mark.parametrize("port", ["outbound", "inbound"])
async def test_an_original_destination_on_a_capture_port_is_refused(
        monkeypatch: pytest.MonkeyPatch, port: str) -> None:
    async with (
        RecordingUpstream("web") as web,
        captured(mesh(web.port), CLIENT, monkeypatch) as cap,
    ):
        own = cap.outbound if port == "outbound" else cap.inbound
        assert await closed(await cap.connect(own, ("127.0.0.1", own)))
        assert await closed(await cap.connect(cap.outbound, ("10.1.2.3", cap.inbound)))
        assert cap.worker.export_stats()["local_replies"]["NR"] == 2


async def test_a_connection_that_was_not_redirected_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real SO_ORIGINAL_DST: without a NAT entry there is no destination to go to."""
    async with (
        RecordingUpstream("web") as web,
        captured(mesh(web.port), CLIENT, monkeypatch, fake=False) as cap,
    ):
        for port in (cap.outbound, cap.inbound):
            assert await closed(await RawClient.connect(port))
        assert web.requests == []


async def test_inbound_chain_by_destination_port_and_passthrough(monkeypatch: pytest.MonkeyPatch) -> None:
    async with (
        RecordingUpstream("web-app") as app,
        TcpServer() as echo,
        captured(mesh(app.port), SERVER, monkeypatch) as cap,
    ):
        # PERMISSIVE: plaintext on the service port reaches the app through inbound|port||.
        assert await get(await cap.connect(cap.inbound, ("10.0.0.5", app.port)), "web", "/in") == 200
        assert app.requests[-1].path == "/in"
        assert cap.worker.export_stats()["clusters"][f"inbound|{app.port}||"]["rq_total"] == 1
        # A port no service declares: the passthrough chain, to the original destination.
        client = await cap.connect(cap.inbound, ("127.0.0.1", echo.port))
        try:
            await client.send(b"raw")
            assert await asyncio.wait_for(client.reader.readexactly(3), 5) == b"raw"
        finally:
            await client.close()


async def test_strict_inbound_refuses_plaintext(monkeypatch: pytest.MonkeyPatch) -> None:
    async with (
        RecordingUpstream("web-app") as app,
        captured(mesh(app.port, "STRICT"), SERVER, monkeypatch) as cap,
    ):
        assert await closed(await cap.connect(cap.inbound, ("10.0.0.5", app.port)))
        assert app.requests == []
