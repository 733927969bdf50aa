"""The Aggregated Discovery Service, xDS v3 state of the world, over grpc.aio.

Owns: the protocol state of each stream (`AdsStream`: subscriptions per
type, version_info and nonce sent, ACK/NACK accounting, what to push next)
and its asyncio glue (`AdsServer`: one coroutine per stream, wake-ups on
config change, status). It must not translate (`cache.py`) or parse Istio
YAML; it learns who a node is from `registry.node_identity`.

Rules (the xDS protocol's, as Envoy and Istio apply them):

- Per stream and type, a request whose response_nonce is the last nonce sent
  is an ACK of that version, or a NACK if error_detail is set; the NACK's
  message is logged and kept for status. A request with an older nonce is
  stale and ignored (a newer response is in flight and its reply will carry
  the client's current subscription). A request of a type nothing was sent
  for yet is a (re)subscription, whatever nonce it carries.
- Subscriptions: resource_names; empty (or "*") is the wildcard for CDS and
  LDS; for EDS and RDS, no names means nothing to send.
- A type is pushed only when its version for the stream's subscription
  differs from the last one sent, or the subscription changed: an ACK or a
  NACK never causes a resend.
- Order on a change: CDS, EDS, LDS, RDS. Listeners and routes wait while the
  client has not answered the last CDS, or has ACKed it but not yet
  subscribed to the endpoints of its EDS clusters (so new clusters are warm
  before anything routes to them). A cluster that disappears stays in
  CDS (with its endpoints in EDS) until the stream has ACKed listeners and
  routes of the current translation, so a proxy never holds a route to a
  cluster it was told to delete ("stale clusters removed last").
- A request with an unknown type_url, one that does not parse, or a first
  request without node.id closes that stream with INVALID_ARGUMENT.
  DeltaAggregatedResources answers UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError

from control.cache import (
    CDS,
    EDS,
    LDS,
    PUSH_ORDER,
    RDS,
    SDS,
    SHORT,
    Entry,
    NodeResources,
    ResourceCache,
    nonce_field,
)
from control.registry import NodeError, NodeIdentity, Registry, node_identity
from control.translate import NodeInfo

log = logging.getLogger("pillion.control.ads")

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
KNOWN_TYPES = frozenset(PUSH_ORDER)  # SDS serves the public ROOTCA when the server is the CA
WILDCARD_TYPES = frozenset((CDS, LDS))


class StreamError(Exception):
    """The client broke the protocol; its stream is closed with INVALID_ARGUMENT and this message."""


@dataclass(frozen=True)
class Garbage:
    """A request message that did not parse (decoding never raises inside gRPC)."""

    size: int
    error: str


def decode_request(data: bytes) -> discovery_pb2.DiscoveryRequest | Garbage:
    try:
        return discovery_pb2.DiscoveryRequest.FromString(data)
    except DecodeError as exc:
        return Garbage(len(data), str(exc))


@dataclass(frozen=True)
class Nack:
    version: str  # the version the client rejected
    nonce: str
    detail: str
    code: int
    at: float


@dataclass
class TypeState:
    """One resource type on one stream."""

    subscribed: bool = False
    names: tuple[str, ...] | None = None  # None: wildcard
    dirty: bool = False  # subscription changed since the last response
    sent_version: str = ""
    sent_nonce: str = ""
    sent_count: int = 0
    sent_at: float = 0.0
    acked_version: str = ""
    acked_nonce: str = ""
    nack: Nack | None = None
    responses: int = 0
    acks: int = 0
    nacks: int = 0

    def sync(self) -> str:
        """Istio's proxy-status words: SYNCED, NACKED, STALE (sent, no answer yet), NOT SENT, or "-"."""
        if not self.subscribed or self.names == ():
            return "-"
        if not self.sent_nonce:
            return "NOT SENT"
        if self.acked_nonce == self.sent_nonce:
            return "SYNCED"
        if self.nack is not None and self.nack.nonce == self.sent_nonce:
            return "NACKED"
        return "STALE"


@dataclass(frozen=True)
class Outgoing:
    type_url: str
    version: str
    nonce: str
    data: bytes  # a serialized DiscoveryResponse
    count: int


class AdsStream:
    """The protocol state of one ADS stream. No I/O: requests in, serialized responses out."""

    def __init__(self, stream_id: int, peer: str, now: float) -> None:
        self.stream_id = stream_id
        self.peer = peer
        self.connected_at = now
        self.identity: NodeIdentity | None = None
        self.types: dict[str, TypeState] = {t: TypeState() for t in KNOWN_TYPES}
        self.stale_requests = 0
        self._last_nonce = dict.fromkeys(KNOWN_TYPES, 0)  # per type: nonces only grow
        self._last_view: NodeResources | None = None
        self._retained: dict[str, tuple[Entry, Entry | None]] = {}  # cluster -> (Cluster, CLA)
        self._cds_sent_eds: frozenset[str] = frozenset()  # EDS clusters in the last CDS sent
        self._eds_owed = False  # CDS ACKed with EDS clusters the client has not asked endpoints for

    def receive(self, request: discovery_pb2.DiscoveryRequest, now: float) -> bool:
        """Apply one request; True if it told us who the node is (the first request). Raises StreamError."""
        type_url = request.type_url
        if type_url not in KNOWN_TYPES:
            raise StreamError(f"unknown type_url {type_url!r}")
        learned = False
        if self.identity is None:
            if not request.HasField("node") or not request.node.id:
                raise StreamError("the first request on a stream must carry node.id")
            try:
                self.identity = node_identity(request.node, _peer_ip(self.peer))
            except NodeError as exc:
                raise StreamError(str(exc)) from None
            learned = True
        state = self.types[type_url]
        names = _names(type_url, request.resource_names, state.names)
        if state.sent_nonce and request.response_nonce != state.sent_nonce:
            self.stale_requests += 1
            return learned
        if type_url == EDS:
            self._eds_owed = False
        if not state.sent_nonce:  # nothing sent of this type yet: a (re)subscription
            state.subscribed, state.names, state.dirty = True, names, True
            return learned
        if request.HasField("error_detail") and (
            request.error_detail.code or request.error_detail.message
        ):
            detail = request.error_detail.message
            state.nack = Nack(state.sent_version, state.sent_nonce, detail, request.error_detail.code, now)
            state.nacks += 1
            log.warning(
                "%s NACKed %s version %s: %s",
                self.identity.id if self.identity else self.peer,
                SHORT[type_url],
                state.sent_version,
                detail,
            )
        else:
            state.acked_version, state.acked_nonce = request.version_info, state.sent_nonce
            state.acks += 1
            if type_url == CDS:
                eds = self.types[EDS]
                self._eds_owed = eds.subscribed and not self._cds_sent_eds <= frozenset(eds.names or ())
        if names != state.names:
            state.names, state.dirty = names, True
        return learned

    def pending(self, view: NodeResources | None, now: float) -> list[Outgoing]:
        """The responses to send now, in push order (CDS, EDS, LDS, RDS)."""
        if view is None or self.identity is None:
            return []
        self._track_removed(view)
        out: list[Outgoing] = []
        for type_url in PUSH_ORDER:
            state = self.types[type_url]
            if not state.subscribed:
                continue
            if state.names == ():
                state.dirty = False
                continue
            state.names = view.canonical(type_url, state.names)
            rendered = view.render(type_url, state.names, self._extra(type_url))
            if rendered.version == state.sent_version and not state.dirty:
                continue
            if type_url in (LDS, RDS) and self._clusters_warming():
                continue  # sent once the client holds the clusters and endpoints they may use
            if rendered.nonce > self._last_nonce[type_url]:
                number, data = rendered.nonce, rendered.data
            else:  # this rendering was sent before: give it a nonce the stream has not seen
                number = next(view.nonces)
                data = rendered.data + nonce_field(str(number))
            self._last_nonce[type_url] = number
            nonce = str(number)
            state.sent_version, state.sent_nonce, state.sent_at = rendered.version, nonce, now
            state.sent_count, state.dirty = rendered.count, False
            state.responses += 1
            if type_url == CDS:
                self._cds_sent_eds = self._eds_clusters(view, state.names)
            out.append(Outgoing(type_url, rendered.version, nonce, data, rendered.count))
        return out

    def _eds_clusters(self, view: NodeResources, names: tuple[str, ...] | None) -> frozenset[str]:
        """The EDS clusters of a CDS response: the client should subscribe to their endpoints."""
        found = view.eds_clusters  # shared by every stream of the node key
        if self._retained:
            found = found | {n for n, pair in self._retained.items() if pair[1] is not None}
        return found if names is None else found & frozenset(names)

    def _clusters_warming(self) -> bool:
        """True while the client has not answered the last CDS, or has ACKed it with EDS clusters
        it is not subscribed to and has not sent an EDS request since."""
        cds = self.types[CDS]
        return cds.subscribed and (cds.sync() == "STALE" or self._eds_owed)

    def _extra(self, type_url: str) -> dict[str, Entry] | None:
        if not self._retained or type_url not in (CDS, EDS):
            return None
        if type_url == CDS:
            return {name: pair[0] for name, pair in self._retained.items()}
        return {name: pair[1] for name, pair in self._retained.items() if pair[1] is not None}

    def _track_removed(self, view: NodeResources) -> None:
        last = self._last_view
        self._last_view = view
        if last is not None and view is not last and self.types[CDS].sent_nonce:
            for name in view.removed_clusters(last):
                if name not in self._retained:
                    self._retained[name] = (last.entries[CDS][name], last.entries[EDS].get(name))
        if not self._retained:
            return
        clusters = view.entries[CDS]
        self._retained = {n: pair for n, pair in self._retained.items() if n not in clusters}
        if self._retained and self._settled(view):
            log.debug("stream %d: removing %d stale cluster(s)", self.stream_id, len(self._retained))
            self._retained = {}

    def _settled(self, view: NodeResources) -> bool:
        """True when the client has ACKed this translation's listeners and routes."""
        for type_url in (LDS, RDS):
            state = self.types[type_url]
            if not state.subscribed or state.names == ():
                continue
            if state.acked_version != view.render(type_url, state.names).version:
                return False
        return True

    def status(self) -> dict[str, Any]:
        identity = self.identity
        types: dict[str, Any] = {}
        for type_url in PUSH_ORDER:
            state = self.types[type_url]
            if type_url == SDS and not state.subscribed:
                continue
            nack = state.nack
            types[SHORT[type_url]] = {
                "status": state.sync(),
                "subscribed": None if not state.subscribed else ("*" if state.names is None else list(state.names)),
                "sent_version": state.sent_version,
                "sent_nonce": state.sent_nonce,
                "resources": state.sent_count,
                "acked_version": state.acked_version,
                "last_nack": None
                if nack is None
                else {"version": nack.version, "error_detail": nack.detail, "code": nack.code, "at": nack.at},
                "responses": state.responses,
                "acks": state.acks,
                "nacks": state.nacks,
            }
        return {
            "stream": self.stream_id,
            "peer": self.peer,
            "node": identity.id if identity else "",
            "namespace": identity.namespace if identity else "",
            "workload": identity.name if identity else "",
            "labels": dict(identity.labels) if identity else {},
            "workload_group": identity.workload_group if identity else "",
            "address": identity.address if identity else "",
            "connected_since": self.connected_at,
            "stale_requests": self.stale_requests,
            "types": types,
        }


def _names(type_url: str, names: Any, current: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """A request's subscription: sorted unique names, or None for the wildcard.

    Returns `current` itself when unchanged (the usual ACK), so a stream keeps
    the tuple it already shares with others instead of a fresh copy.
    """
    received = tuple(names)
    if received == current:
        return current
    unique = tuple(sorted(set(received)))
    if type_url in WILDCARD_TYPES and (not unique or "*" in unique):
        return None
    return current if unique == current else unique


def _peer_ip(peer: str) -> str:
    """'ipv4:127.0.0.1:5000' / 'ipv6:[::1]:5000' -> the address."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return ""


_WAKE = object()
_END = object()


@dataclass
class _Connection:
    stream: AdsStream
    queue: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    wake_queued: bool = False

    def wake(self) -> None:
        if not self.wake_queued:
            self.wake_queued = True
            self.queue.put_nowait(_WAKE)


class AdsServer:
    """The servicer: runs every stream against the shared cache and registry."""

    def __init__(
        self, cache: ResourceCache, registry: Registry, clock: Callable[[], float] = time.time
    ) -> None:
        self.cache = cache
        self.registry = registry
        self.clock = clock
        self.connections: dict[int, _Connection] = {}
        self.pushes = 0  # responses written (all streams)
        self._ids = itertools.count(1)

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._sotw, request_deserializer=decode_request, response_serializer=bytes
            ),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._delta,
                request_deserializer=decode_request,
                response_serializer=bytes,
            ),
        }
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    def notify_all(self) -> None:
        """The config changed: every stream re-renders (streams coalesce repeated wake-ups)."""
        for connection in self.connections.values():
            connection.wake()

    def status(self) -> list[dict[str, Any]]:
        rows = []
        for connection in self.connections.values():
            row = connection.stream.status()
            identity = connection.stream.identity
            row["problems"] = list(self.cache.problems_for(identity.node_info())) if identity else []
            rows.append(row)
        return sorted(rows, key=lambda row: (row["node"], row["stream"]))

    async def _delta(self, request_iterator: AsyncIterator[Any], context: Any) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "delta xDS is not implemented; use StreamAggregatedResources")

    async def _sotw(self, request_iterator: AsyncIterator[Any], context: Any) -> None:
        stream = AdsStream(next(self._ids), context.peer() or "", self.clock())
        connection = _Connection(stream)
        self.connections[stream.stream_id] = connection
        reader = asyncio.create_task(self._read(request_iterator, connection))
        key: NodeInfo | None = None
        try:
            while True:
                item = await connection.queue.get()
                while True:  # apply everything already queued before rendering once
                    if item is _END:
                        return
                    if isinstance(item, StreamError):
                        raise item
                    if item is _WAKE:
                        connection.wake_queued = False
                    elif stream.receive(item, self.clock()) and stream.identity is not None:
                        key = stream.identity.node_info()
                        self._opened(stream, key)
                    if connection.queue.empty():
                        break
                    item = connection.queue.get_nowait()
                view = self.cache.get(key) if key is not None else None
                for out in stream.pending(view, self.clock()):
                    await context.write(out.data)
                    self.pushes += 1
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug("stream %d: sent %s version %s nonce %s (%d)", stream.stream_id,
                                  SHORT[out.type_url], out.version, out.nonce, out.count)
        except StreamError as exc:
            who = stream.identity.id if stream.identity else stream.peer
            log.warning("closing the ADS stream of %s: %s", who, exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception:
            if context.done():  # the client went away while we wrote: not a bug
                log.debug("stream %d: write after the RPC ended", stream.stream_id)
                return
            log.exception("bug while serving ADS stream %d", stream.stream_id)  # end this stream only
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in the control server")
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            del self.connections[stream.stream_id]
            if key is not None:
                self.cache.release(key)
                self.registry.unregister(stream.stream_id)
            log.info("ADS stream %d of %s closed", stream.stream_id,
                     stream.identity.id if stream.identity else stream.peer)

    def _opened(self, stream: AdsStream, key: NodeInfo) -> None:
        identity = stream.identity
        assert identity is not None
        log.info("ADS stream %d: node %s (%s/%s, labels %s) from %s", stream.stream_id, identity.id,
                 identity.namespace, identity.name, dict(identity.labels), stream.peer)
        self.cache.acquire(key)
        self.registry.register(stream.stream_id, identity)

    async def _read(self, request_iterator: AsyncIterator[Any], connection: _Connection) -> None:
        queue = connection.queue
        try:
            async for request in request_iterator:
                if isinstance(request, Garbage):
                    queue.put_nowait(StreamError(f"malformed DiscoveryRequest ({request.size} bytes): {request.error}"))
                    return
                queue.put_nowait(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the transport failed under us: end the stream
            log.debug("stream %d: reading failed: %r", connection.stream.stream_id, exc)
        queue.put_nowait(_END)
