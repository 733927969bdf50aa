"""Per-node xDS resources, prepared for the wire and versioned by their content.

Owns: translating the current config (the store's, merged with the
registry's WorkloadEntries) for each distinct node (`NodeInfo`: namespace and
labels), keeping the last good translation of a node whose new one fails,
and rendering one resource type for a subscription as a DiscoveryResponse
body with a content-hash version. It must not know about streams, nonces or
ACKs (`ads.py`) or read files (`store.py`).

Strategy: work is shared, not repeated per stream. Translation is lazy and
memoized per (node key, config generation), so a thousand identical sidecars
cost one translation per change. Each resource is packed and serialized once
(deterministically: protobuf maps would otherwise hash differently between
runs) into the bytes of a DiscoveryResponse `resources` field; a response
body is those bytes concatenated after a header, memoized per
(type, subscription) with a nonce from a shared counter, so a thousand streams
send the same bytes object (see `Rendered`). A type's version is a hash of the names and digests
of exactly the resources it carries, so an unchanged type keeps its version
and is not pushed again.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from control.translate import ConfigError, ConfigSet, NodeInfo, Resources, translate

log = logging.getLogger("pillion.control.cache")

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SDS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
PUSH_ORDER = (SDS, CDS, EDS, LDS, RDS)  # secrets first: clusters and listeners name them
SHORT = {CDS: "CDS", EDS: "EDS", LDS: "LDS", RDS: "RDS", SDS: "SDS"}
CONTROL_PLANE_ID = "pillion"
_RESOURCES_FIELD = 2  # DiscoveryResponse.resources


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def nonce_field(nonce: str) -> bytes:
    """DiscoveryResponse.nonce (field 5) on its own, to append to a rendered body."""
    return discovery_pb2.DiscoveryResponse(nonce=nonce).SerializeToString()


@dataclass(frozen=True, slots=True)
class Entry:
    """One resource: its bytes as a DiscoveryResponse `resources` element, and a content digest."""

    wire: bytes
    digest: bytes

    @classmethod
    def of(cls, message: Message) -> Entry:
        packed = any_pb2.Any()
        packed.Pack(message, deterministic=True)
        data = packed.SerializeToString(deterministic=True)
        tag = bytes([_RESOURCES_FIELD << 3 | 2])
        return cls(tag + _varint(len(data)) + data, hashlib.sha256(data).digest())


@dataclass(frozen=True, slots=True)
class Rendered:
    """A serialized DiscoveryResponse, nonce included, that every stream with this subscription can send.

    `nonce` comes from a counter shared by all renderings, so a rendering newer
    than the last one a stream got of a type has a nonce that stream never
    saw. A stream that must resend an older rendering appends a fresh
    `nonce_field` to `data` (the last occurrence of a field wins).
    """

    version: str
    nonce: int
    data: bytes
    count: int


def _version(items: Iterable[tuple[str, Entry]]) -> str:
    hasher = hashlib.sha256()
    for name, entry in items:
        hasher.update(name.encode())
        hasher.update(b"\0")
        hasher.update(entry.digest)
    return hasher.hexdigest()[:16]


class NodeResources:
    """One node key's translation, prepared for rendering. Immutable once built; shared by streams."""

    def __init__(self, resources: Resources, nonces: Iterator[int], secrets: Iterable[Message] = ()) -> None:
        self.nonces = nonces
        self.entries: dict[str, dict[str, Entry]] = {
            SDS: {s.name: Entry.of(s) for s in secrets},  # public ones only: the mesh's ROOTCA
            CDS: {c.name: Entry.of(c) for c in resources.clusters},
            EDS: {e.cluster_name: Entry.of(e) for e in resources.endpoints},
            LDS: {li.name: Entry.of(li) for li in resources.listeners},
            RDS: {r.name: Entry.of(r) for r in resources.routes},
        }
        self.eds_clusters = frozenset(self.entries[EDS])
        self.digest = _version(
            (f"{type_url}/{name}", entry)
            for type_url in PUSH_ORDER
            for name, entry in sorted(self.entries[type_url].items())
        )
        self._rendered: dict[tuple[str, tuple[str, ...] | None], Rendered] = {}
        self._names: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._removed: tuple[NodeResources | None, frozenset[str]] = (None, frozenset())

    def canonical(self, type_url: str, names: tuple[str, ...] | None) -> tuple[str, ...] | None:
        """One shared tuple per distinct subscription (a thousand streams, one list of 4000 names)."""
        if names is None or len(names) < 8:
            return names
        return self._names.setdefault(names, names)

    def render(
        self,
        type_url: str,
        names: tuple[str, ...] | None,
        extra: Mapping[str, Entry] | None = None,
    ) -> Rendered:
        """The response for `names` (sorted; None: every resource), plus `extra` entries kept for the stream."""
        if not extra:
            key = (type_url, names)
            found = self._rendered.get(key)
            if found is None:
                found = self._rendered[key] = self._render(type_url, names, {})
            return found
        return self._render(type_url, names, extra)

    def _render(
        self, type_url: str, names: tuple[str, ...] | None, extra: Mapping[str, Entry]
    ) -> Rendered:
        own = self.entries.get(type_url, {})
        chosen: list[tuple[str, Entry]] = []
        wanted = sorted({*own, *extra}) if names is None else names
        for name in wanted:
            entry = own.get(name) or extra.get(name)
            if entry is not None:
                chosen.append((name, entry))
        version = _version(chosen)
        header = discovery_pb2.DiscoveryResponse(
            version_info=version,
            type_url=type_url,
            control_plane=base_pb2.ControlPlane(identifier=CONTROL_PLANE_ID),
        ).SerializeToString()
        nonce = next(self.nonces)
        data = b"".join([header, *(entry.wire for _, entry in chosen), nonce_field(str(nonce))])
        return Rendered(version, nonce, data, len(chosen))

    def removed_clusters(self, previous: NodeResources) -> frozenset[str]:
        """Cluster names `previous` had and this translation does not (memoized for the last `previous`)."""
        if self._removed[0] is not previous:
            gone = frozenset(previous.entries[CDS].keys() - self.entries[CDS].keys())
            self._removed = (previous, gone)
        return self._removed[1]


@dataclass
class _Slot:
    """The cache line of one node key."""

    users: int = 0
    generation: int = -1
    good: NodeResources | None = None
    problems: tuple[str, ...] = ()


@dataclass
class ResourceCache:
    """Translations per node key for the current config generation."""

    config: ConfigSet | None = None
    generation: int = 0
    translations: int = 0  # how many times translate() ran (tests and benchmarks read it)
    nonces: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    # Secrets every node may ask for by name over SDS: the CA's trust bundle as "ROOTCA".
    # Never a private key: a workload's "default" certificate comes from its own CSR.
    secrets: tuple[Message, ...] = ()
    _slots: dict[NodeInfo, _Slot] = field(default_factory=dict)

    def update(self, config: ConfigSet) -> None:
        """A new config (store + registry): every node is translated again when next asked."""
        self.config = config
        self.generation += 1

    def acquire(self, key: NodeInfo) -> None:
        self._slots.setdefault(key, _Slot()).users += 1

    def release(self, key: NodeInfo) -> None:
        slot = self._slots.get(key)
        if slot is not None:
            slot.users -= 1
            if slot.users <= 0:
                del self._slots[key]

    def get(self, key: NodeInfo) -> NodeResources | None:
        """The node key's resources for the current config; the last good ones if translation fails.

        None before any good config, or if this node has never translated cleanly.
        """
        slot = self._slots.setdefault(key, _Slot())
        if self.config is None or slot.generation == self.generation:
            return slot.good
        slot.generation = self.generation
        self.translations += 1
        try:
            fresh = NodeResources(translate(self.config, key), self.nonces, self.secrets)
        except Exception as exc:  # ConfigError; anything else is a translator bug, kept from proxies too
            if isinstance(exc, ConfigError):
                problems = tuple(str(problem) for problem in exc.problems)
            else:
                log.exception("translating for %s failed", describe(key))
                problems = (f"internal error while translating: {exc!r}",)
            if problems != slot.problems:
                log.error(
                    "cannot translate for %s; keeping its last good resources:\n  %s",
                    describe(key),
                    "\n  ".join(problems),
                )
            slot.problems = problems
            return slot.good
        slot.problems = ()
        if slot.good is None or fresh.digest != slot.good.digest:
            slot.good = fresh
        return slot.good

    def problems(self) -> dict[str, list[str]]:
        """Translation problems per node key, for status."""
        return {describe(key): list(slot.problems) for key, slot in self._slots.items() if slot.problems}

    def problems_for(self, key: NodeInfo) -> tuple[str, ...]:
        slot = self._slots.get(key)
        return slot.problems if slot is not None else ()


def describe(key: NodeInfo) -> str:
    labels = ",".join(f"{k}={v}" for k, v in key.labels.items())
    return f"{key.namespace}/{{{labels}}}"
