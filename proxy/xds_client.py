"""The proxy's xDS client: one ADS stream (state of the world) to a control server.

Subscribes to clusters and listeners (wildcard), then to the endpoints of the
EDS clusters and the route configurations the listeners name. Each response
is checked resource by resource with ``compile`` before it is ACKed; a
resource the proxy cannot serve is NACKed with the compiler's precise
``error_detail`` and the last good state of that type is kept. When every
referenced resource is present the whole set is compiled into a snapshot and
handed to ``on_config`` (the supervisor fans it out to the workers).

The stream is re-opened with jittered exponential backoff when it fails;
meanwhile the last good snapshot keeps serving, and on reconnect the client
re-subscribes with the versions it holds, so the server can resync it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
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
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from proxy.compile import HCM_TYPE, XdsResources, compile_snapshot, validate_resource
from proxy.errors import InvalidResource
from proxy.model import Snapshot

log = logging.getLogger("pillion.xds")

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SDS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
_MESSAGES: dict[str, Any] = {
    CDS: cluster_pb2.Cluster, EDS: endpoint_pb2.ClusterLoadAssignment,
    LDS: listener_pb2.Listener, RDS: route_pb2.RouteConfiguration, SDS: secret_pb2.Secret,
}
SHORT = {CDS: "CDS", EDS: "EDS", LDS: "LDS", RDS: "RDS", SDS: "SDS"}
# The secrets Istio's resources name: the mesh roots (served by the control server when it is
# the CA) and the workload certificate (made locally by the CertManager; never sent by a server).
SECRET_NAMES = ("ROOTCA", "default")
INVALID_ARGUMENT = 3


@dataclass(frozen=True)
class NodeIdentity:
    """Who this proxy is, as sent in DiscoveryRequest.node (Istio's metadata keys)."""

    namespace: str = "default"
    name: str = "sidecar"
    labels: dict[str, str] = field(default_factory=dict)
    service_account: str = "default"
    workload_group: str = ""
    ip: str = "127.0.0.1"
    intercept: bool = False  # sent as Istio's INTERCEPTION_MODE: REDIRECT (iptables) or NONE

    def node(self) -> base_pb2.Node:
        md = struct_pb2.Struct()
        md.update({"NAMESPACE": self.namespace, "NAME": self.name, "SERVICE_ACCOUNT": self.service_account,
                   "INSTANCE_IPS": self.ip, "INTERCEPTION_MODE": "REDIRECT" if self.intercept else "NONE"})
        md.get_or_create_struct("LABELS").update(self.labels)
        if self.workload_group:
            md.update({"WORKLOAD_GROUP": self.workload_group})
        return base_pb2.Node(
            id=f"sidecar~{self.ip}~{self.name}.{self.namespace}~{self.namespace}.svc.cluster.local",
            cluster=self.name, metadata=md, user_agent_name="pillion")


@dataclass
class TypeState:
    """What the client holds of one resource type."""

    resources: dict[str, Any] = field(default_factory=dict)
    version: str = ""  # last accepted version_info
    nonce: str = ""  # nonce of the last response seen
    names: tuple[str, ...] = ()  # subscription; () = wildcard (LDS/CDS)
    acks: int = 0
    nacks: int = 0
    last_error: str = ""


ConfigCallback = Callable[[XdsResources, Snapshot], Awaitable[None]]


class XdsClient:
    def __init__(self, address: str, identity: NodeIdentity, on_config: ConfigCallback, *,
                 rng: random.Random | None = None, backoff_base: float = 0.25, backoff_max: float = 30.0) -> None:
        self.address = address
        self.identity = identity
        self.on_config = on_config
        self.rng = rng or random.Random()
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.types: dict[str, TypeState] = {t: TypeState() for t in (CDS, EDS, LDS, RDS, SDS)}
        self.connected = False
        self.connects = 0
        self.applied_version = ""
        self._queue: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()
        self._sent_node = False

    # ------------------------------------------------------------------ stream lifecycle
    async def run(self, stop: asyncio.Event) -> None:
        attempt = 0
        while not stop.is_set():
            try:
                await self._stream_once(stop)
                attempt = 0
            except (grpc.aio.AioRpcError, OSError) as e:
                code = e.code() if isinstance(e, grpc.aio.AioRpcError) else None
                log.warning("ADS stream to %s failed (%s); keeping the last good config", self.address,
                            code.name if code else e)
            self.connected = False
            if stop.is_set():
                return
            attempt += 1
            delay = min(self.backoff_max, self.backoff_base * 2 ** min(attempt, 10))
            delay *= 0.5 + self.rng.random()  # full jitter around the exponential step
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def _stream_once(self, stop: asyncio.Event) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            self._queue = asyncio.Queue()
            self._sent_node = False
            for st in self.types.values():
                st.nonce = ""  # nonces belong to a stream; versions carry over (resync)
            call = stub.StreamAggregatedResources(self._requests())
            self.connects += 1
            # (Re)subscribe, telling the server what we already hold (resync).
            for t in (CDS, LDS):
                self._subscribe(t)
            for t in (EDS, RDS, SDS):
                if self.types[t].names:
                    self._subscribe(t)
            stopper = asyncio.ensure_future(stop.wait())
            try:
                while True:
                    reader = asyncio.ensure_future(call.read())
                    done, _ = await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    if stopper in done:
                        reader.cancel()
                        call.cancel()
                        return
                    resp = reader.result()
                    if resp is grpc.aio.EOF:
                        raise OSError("control server closed the stream")
                    self.connected = True
                    await self._handle(resp)
            finally:
                stopper.cancel()
                self._queue.put_nowait(None)

    async def _requests(self) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        queue = self._queue
        while True:
            req = await queue.get()
            if req is None:
                return
            yield req

    def _send(self, type_url: str, *, error: str = "") -> None:
        st = self.types[type_url]
        req = discovery_pb2.DiscoveryRequest(type_url=type_url, version_info=st.version,
                                             response_nonce=st.nonce, resource_names=list(st.names))
        if not self._sent_node:
            req.node.CopyFrom(self.identity.node())
            self._sent_node = True
        if error:
            req.error_detail.CopyFrom(status_pb2.Status(code=INVALID_ARGUMENT, message=error))
        self._queue.put_nowait(req)

    def _subscribe(self, type_url: str) -> None:
        self._send(type_url)

    # ------------------------------------------------------------------ responses
    async def _handle(self, resp: discovery_pb2.DiscoveryResponse) -> None:
        t = resp.type_url
        if t not in self.types:
            log.warning("ignoring a response of unsupported type %s", t)
            return
        st = self.types[t]
        st.nonce = resp.nonce
        cls = _MESSAGES[t]
        fresh: dict[str, Any] = {}
        try:
            for any_msg in resp.resources:
                msg = cls()
                if not any_msg.Unpack(msg):
                    raise InvalidResource(SHORT[t], "", "resources", f"expected {t}, got {any_msg.type_url}")
                validate_resource(msg)
                fresh[_name(msg)] = msg
        except InvalidResource as e:
            self._nack(t, resp.version_info, str(e))
            return
        previous = st.resources
        st.resources = fresh  # state of the world: each response is the whole set
        try:
            await self._maybe_apply()
        except InvalidResource as e:
            st.resources = previous
            self._nack(t, resp.version_info, str(e))
            return
        st.version = resp.version_info
        st.acks += 1
        st.last_error = ""
        self._send(t)  # ACK
        if t == CDS:
            self._resubscribe(EDS, sorted(_eds_names(fresh.values())))
        elif t == LDS:
            self._resubscribe(RDS, sorted(_rds_names(fresh.values())))
        if t in (CDS, LDS) and not self.types[SDS].names:
            self._resubscribe(SDS, list(SECRET_NAMES))

    def _nack(self, type_url: str, version: str, error: str) -> None:
        st = self.types[type_url]
        st.nacks += 1
        st.last_error = error
        log.error("rejecting %s version %s: %s", SHORT[type_url], version, error)
        self._send(type_url, error=error)

    def _resubscribe(self, type_url: str, names: list[str]) -> None:
        st = self.types[type_url]
        if tuple(names) != st.names:
            st.names = tuple(names)
            keep = set(names)
            st.resources = {n: m for n, m in st.resources.items() if n in keep}
            self._subscribe(type_url)

    async def _maybe_apply(self) -> None:
        """Compile and apply once every referenced resource is here (else keep warming)."""
        ty = self.types
        if not (ty[CDS].acks or ty[CDS].nonce) or not (ty[LDS].acks or ty[LDS].nonce):
            return
        eds_needed = _eds_names(ty[CDS].resources.values())
        rds_needed = _rds_names(ty[LDS].resources.values())
        if not eds_needed <= ty[EDS].resources.keys() or not rds_needed <= ty[RDS].resources.keys():
            return
        res = XdsResources(
            listeners=tuple(ty[LDS].resources.values()),
            routes=tuple(ty[RDS].resources[n] for n in sorted(rds_needed)),
            clusters=tuple(ty[CDS].resources.values()),
            endpoints=tuple(ty[EDS].resources[n] for n in sorted(eds_needed)),
            secrets=tuple(ty[SDS].resources[n] for n in sorted(ty[SDS].resources)),
        )
        snap = compile_snapshot(res)
        if snap.version == self.applied_version:
            return
        await self.on_config(res, snap)
        self.applied_version = snap.version

    def status(self) -> dict[str, Any]:
        return {
            "server": self.address, "connected": self.connected, "connects": self.connects,
            "types": {SHORT[t]: {"version": s.version, "acks": s.acks, "nacks": s.nacks,
                                 "last_error": s.last_error, "resources": len(s.resources)}
                      for t, s in self.types.items()},
        }


def _name(msg: Any) -> str:
    return str(getattr(msg, "cluster_name", "") or msg.name)


def _eds_names(clusters: Any) -> set[str]:
    return {c.eds_cluster_config.service_name or c.name for c in clusters if c.type == cluster_pb2.Cluster.EDS}


def _rds_names(listeners: Any) -> set[str]:
    out = set()
    for ln in listeners:
        for fc in ln.filter_chains:
            for f in fc.filters:
                if f.typed_config.type_url == HCM_TYPE:
                    hcm = hcm_pb2.HttpConnectionManager()
                    f.typed_config.Unpack(hcm)
                    if hcm.HasField("rds"):
                        out.add(hcm.rds.route_config_name)
    return out
