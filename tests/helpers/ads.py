"""A small scripted ADS server for testing the proxy's xDS client over real gRPC.

It serves one resource set (translated from Istio YAML by the real
translator) to every stream, state-of-the-world, records every request (so a
test can see ACKs and NACKs with their error_detail), and lets a test push a
new set or stop and restart the server on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from control.translate import NodeInfo, load_text, translate

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
ORDER = (CDS, EDS, LDS, RDS)


def resources_from_yaml(text: str, labels: dict[str, str]) -> dict[str, list[Any]]:
    res = translate(load_text(text), NodeInfo(namespace="default", labels=labels))
    return {CDS: list(res.clusters), EDS: list(res.endpoints), LDS: list(res.listeners), RDS: list(res.routes)}


def _name(msg: Any) -> str:
    return str(getattr(msg, "cluster_name", "") or msg.name)


@dataclass
class _Stream:
    queue: asyncio.Queue[discovery_pb2.DiscoveryResponse | None] = field(default_factory=asyncio.Queue)
    names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    sent: dict[str, str] = field(default_factory=dict)  # type -> version sent
    nonce: int = 0


class ScriptedAds(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, resources: dict[str, list[Any]]) -> None:
        self.resources = resources
        self.version = 1
        self.requests: list[discovery_pb2.DiscoveryRequest] = []
        self.seen = asyncio.Condition()
        self.streams: list[_Stream] = []
        self.server: grpc.aio.Server | None = None
        self.port = 0

    # -- control from the test
    async def start(self, port: int = 0) -> int:
        self.server = grpc.aio.server()
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        await self.server.start()
        return self.port

    async def stop(self) -> None:
        for st in self.streams:
            st.queue.put_nowait(None)
        self.streams.clear()
        if self.server is not None:
            await self.server.stop(0)
            self.server = None

    def push(self, resources: dict[str, list[Any]]) -> str:
        self.resources = resources
        self.version += 1
        for st in self.streams:
            for t in ORDER:
                if t in st.names:
                    self._respond(st, t)
        return str(self.version)

    async def wait_for(self, pred: Any, timeout: float = 10.0) -> None:
        async with self.seen:
            await asyncio.wait_for(self.seen.wait_for(lambda: pred(self.requests)), timeout)

    # -- the service
    def _respond(self, st: _Stream, t: str) -> None:
        names = st.names.get(t, ())
        msgs = [m for m in self.resources.get(t, []) if not names or _name(m) in names]
        st.nonce += 1
        resp = discovery_pb2.DiscoveryResponse(type_url=t, version_info=str(self.version), nonce=str(st.nonce))
        for m in msgs:
            a = any_pb2.Any()
            a.Pack(m)
            resp.resources.append(a)
        st.sent[t] = str(self.version)
        st.queue.put_nowait(resp)

    async def StreamAggregatedResources(self, request_iterator: Any, context: Any) -> Any:
        st = _Stream()
        self.streams.append(st)

        async def reader() -> None:
            async for req in request_iterator:
                async with self.seen:
                    self.requests.append(req)
                    self.seen.notify_all()
                names = tuple(req.resource_names)
                changed = st.names.get(req.type_url) != names
                st.names[req.type_url] = names
                # A new or changed subscription is answered; an ACK/NACK of what was sent is not.
                if changed or (not req.response_nonce and st.sent.get(req.type_url) != str(self.version)):
                    self._respond(st, req.type_url)
            st.queue.put_nowait(None)

        task = asyncio.ensure_future(reader())
        try:
            while True:
                resp = await st.queue.get()
                if resp is None:
                    return
                yield resp
        finally:
            task.cancel()
            with contextlib.suppress(ValueError):
                self.streams.remove(st)


def acks(requests: list[discovery_pb2.DiscoveryRequest], type_url: str, version: str) -> bool:
    return any(r.type_url == type_url and r.version_info == version and r.response_nonce and not r.HasField("error_detail")
               for r in requests)


def nacks(requests: list[discovery_pb2.DiscoveryRequest], type_url: str) -> list[str]:
    return [r.error_detail.message for r in requests if r.type_url == type_url and r.HasField("error_detail")]
