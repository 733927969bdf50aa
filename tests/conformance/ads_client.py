"""A scripted ADS client (real grpc.aio, the xds-protos stubs) for testing `pillion control`.

`AdsClient` keeps one StreamAggregatedResources call open. In manual mode a
test sends each request itself (`subscribe`, `ack`, `nack`) and reads each
response (`next`). In auto mode it behaves like a proxy: it ACKs every
response and follows the references (EDS names from clusters, RDS names from
listeners), and every response is also recorded in `log` in arrival order.
Nothing here sleeps: reads wait on a queue with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SHORT = {CDS: "CDS", EDS: "EDS", LDS: "LDS", RDS: "RDS"}
MESSAGES: dict[str, Any] = {
    CDS: cluster_pb2.Cluster,
    EDS: endpoint_pb2.ClusterLoadAssignment,
    LDS: listener_pb2.Listener,
    RDS: route_pb2.RouteConfiguration,
}


def make_node(
    node_id: str,
    *,
    namespace: str | None = "default",
    labels: Mapping[str, str] | None = None,
    name: str = "",
    workload_group: str = "",
    instance_ips: str = "",
) -> base_pb2.Node:
    metadata = struct_pb2.Struct()
    if namespace is not None:
        metadata.update({"NAMESPACE": namespace})
    if name:
        metadata.update({"NAME": name})
    if workload_group:
        metadata.update({"WORKLOAD_GROUP": workload_group})
    if instance_ips:
        metadata.update({"INSTANCE_IPS": instance_ips})
    metadata.get_or_create_struct("LABELS").update(dict(labels or {}))
    return base_pb2.Node(id=node_id, cluster=name or node_id, metadata=metadata)


def unpack(response: discovery_pb2.DiscoveryResponse) -> list[Any]:
    out = []
    for packed in response.resources:
        message = MESSAGES[response.type_url]()
        assert packed.Unpack(message), packed.type_url
        out.append(message)
    return out


def names_of(response: discovery_pb2.DiscoveryResponse) -> list[str]:
    return [getattr(m, "cluster_name", "") or m.name for m in unpack(response)]


def eds_names(clusters: list[cluster_pb2.Cluster]) -> list[str]:
    return sorted(
        c.eds_cluster_config.service_name or c.name for c in clusters if c.type == cluster_pb2.Cluster.EDS
    )


def rds_names(listeners: list[listener_pb2.Listener]) -> list[str]:
    found = set()
    for listener in listeners:
        for chain in listener.filter_chains:
            for network_filter in chain.filters:
                if network_filter.typed_config.Is(hcm_pb2.HttpConnectionManager.DESCRIPTOR):
                    manager = hcm_pb2.HttpConnectionManager()
                    network_filter.typed_config.Unpack(manager)
                    if manager.HasField("rds"):
                        found.add(manager.rds.route_config_name)
    return sorted(found)


def referenced_clusters(resources: list[Any]) -> set[str]:
    """Every cluster name that listeners (TCP proxy, inline routes) and route configurations point at."""
    found: set[str] = set()

    def tables(table: route_pb2.RouteConfiguration) -> None:
        for vhost in table.virtual_hosts:
            for route in vhost.routes:
                if route.route.cluster:
                    found.add(route.route.cluster)
                found.update(c.name for c in route.route.weighted_clusters.clusters)

    for resource in resources:
        if isinstance(resource, route_pb2.RouteConfiguration):
            tables(resource)
            continue
        for chain in resource.filter_chains:
            for network_filter in chain.filters:
                config = network_filter.typed_config
                if config.Is(tcp_proxy_pb2.TcpProxy.DESCRIPTOR):
                    proxy = tcp_proxy_pb2.TcpProxy()
                    config.Unpack(proxy)
                    found.add(proxy.cluster)
                elif config.Is(hcm_pb2.HttpConnectionManager.DESCRIPTOR):
                    manager = hcm_pb2.HttpConnectionManager()
                    config.Unpack(manager)
                    if manager.HasField("route_config"):
                        tables(manager.route_config)
    return found


async def raw_stream(port: int, chunks: list[bytes]) -> grpc.StatusCode:
    """Open an ADS stream, write `chunks` as raw messages, and return the status it ends with."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        method = channel.stream_stream(
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
        )
        call = method(iter(chunks))
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for _ in call:
                pass
        return await call.code()


class AdsClient:
    """One ADS stream. Use as `async with AdsClient(port, node) as client:`."""

    def __init__(self, port: int, node: base_pb2.Node, *, auto: bool = False, node_on_every_request: bool = False) -> None:
        self.address = f"127.0.0.1:{port}"
        self.node = node
        self.auto = auto
        self.node_on_every_request = node_on_every_request
        self.responses: asyncio.Queue[discovery_pb2.DiscoveryResponse | BaseException] = asyncio.Queue()
        self.log: list[tuple[str, str]] = []  # (short type, version) in arrival order (auto mode)
        self.held: dict[str, dict[str, Any]] = {t: {} for t in MESSAGES}
        self.versions: dict[str, str] = {t: "" for t in MESSAGES}
        self.nonces: dict[str, str] = {t: "" for t in MESSAGES}
        self.names: dict[str, list[str]] = {t: [] for t in MESSAGES}
        self.changed = asyncio.Event()
        self.dangling: list[tuple[int, list[str]]] = []  # (log index, clusters referenced but not held)
        self._sent_node = False
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AdsClient:
        self._channel = grpc.aio.insecure_channel(
            self.address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        )
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel)
        self._call = stub.StreamAggregatedResources()
        self._reader = asyncio.create_task(self._read())
        if self.auto:
            await self.subscribe(CDS)
            await self.subscribe(LDS)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def code(self) -> grpc.StatusCode:
        return await self._call.code()

    async def details(self) -> str:
        return str(await self._call.details())

    async def send(self, request: discovery_pb2.DiscoveryRequest) -> None:
        if not self._sent_node or self.node_on_every_request:
            request.node.CopyFrom(self.node)
            self._sent_node = True
        await self._call.write(request)

    async def subscribe(self, type_url: str, names: list[str] | None = None) -> None:
        if names is not None:
            self.names[type_url] = sorted(names)
        await self.send(
            discovery_pb2.DiscoveryRequest(
                type_url=type_url,
                version_info=self.versions[type_url],
                response_nonce=self.nonces[type_url],
                resource_names=self.names[type_url],
            )
        )

    async def ack(self, response: discovery_pb2.DiscoveryResponse, names: list[str] | None = None) -> None:
        t = response.type_url
        self.versions[t], self.nonces[t] = response.version_info, response.nonce
        await self.subscribe(t, names)

    async def nack(self, response: discovery_pb2.DiscoveryResponse, detail: str) -> None:
        t = response.type_url
        self.nonces[t] = response.nonce
        await self.send(
            discovery_pb2.DiscoveryRequest(
                type_url=t,
                version_info=self.versions[t],
                response_nonce=response.nonce,
                resource_names=self.names[t],
                error_detail=status_pb2.Status(code=3, message=detail),
            )
        )

    async def next(self, timeout: float = 5.0) -> discovery_pb2.DiscoveryResponse:
        item = await asyncio.wait_for(self.responses.get(), timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    def pending(self) -> int:
        return self.responses.qsize()

    async def until(self, predicate: Any, timeout: float = 5.0) -> None:
        """Wait (auto mode) until `predicate(self)` holds, re-checking after every response."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate(self):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError(f"condition not met; log={self.log}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)

    async def _read(self) -> None:
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    self.responses.put_nowait(EOFError("stream ended"))
                    return
                if self.auto:
                    await self._follow(response)
                else:
                    self.responses.put_nowait(response)
                self.changed.set()
        except grpc.aio.AioRpcError as exc:
            self.responses.put_nowait(exc)
            self.changed.set()

    async def _follow(self, response: discovery_pb2.DiscoveryResponse) -> None:
        t = response.type_url
        self.log.append((SHORT[t], response.version_info))
        resources = unpack(response)
        self.held[t] = {getattr(m, "cluster_name", "") or m.name: m for m in resources}
        used = referenced_clusters([*self.held[LDS].values(), *self.held[RDS].values()])
        missing = sorted(used - self.held[CDS].keys())
        if missing:
            self.dangling.append((len(self.log) - 1, missing))
        await self.ack(response)
        if t == CDS and eds_names(resources) != self.names[EDS]:
            await self.subscribe(EDS, eds_names(resources))
        elif t == LDS and rds_names(resources) != self.names[RDS]:
            await self.subscribe(RDS, rds_names(resources))
