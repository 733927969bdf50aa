"""Who is connected, and the workloads that register themselves by connecting.

Owns: the node identity contract (`NodeIdentity`, read from an xDS `Node`:
its id and the Istio metadata keys below) and WorkloadGroup auto-registration
(`Registry`): a proxy whose metadata names a WorkloadGroup of its namespace
appears as a WorkloadEntry while its ADS stream lives, and disappears a grace
period after the last stream of that workload closes. It must not translate
or push; the server merges `Registry.merge(config)` into what the cache
translates and pushes when `on_change` fires.

Node metadata keys (google.protobuf.Struct), as the proxy's client and Istio send them:

    NAMESPACE        string, default "default" (else parsed from an Istio node id
                     "sidecar~IP~name.namespace~namespace.svc.cluster.local")
    LABELS           struct of strings: the workload's labels
    NAME             string: the workload name (default: the node id's name part)
    SERVICE_ACCOUNT  string (default "default")
    WORKLOAD_GROUP   string, optional: register as a member of this WorkloadGroup
    INSTANCE_IPS     string, optional, comma separated: the first is the address

An auto-registered WorkloadEntry is named "<group>-<address>" (dots and colons
become dashes), in the group's namespace. Its labels are the group's template
labels, then the group's metadata labels, then the node's LABELS (later wins);
its ports, weight, network and locality come from the template and its
serviceAccount from the template (else the node's). Its address is the first
INSTANCE_IPS entry, else the IP of the node id, else the stream's peer address.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from control.translate.model import (
    ConfigSet,
    Meta,
    NodeInfo,
    Workload,
    WorkloadEntry,
    WorkloadGroup,
    frozen_map,
)

log = logging.getLogger("pillion.control.registry")

AUTO_FILE = "<auto-registered>"
DEFAULT_GRACE_SECONDS = 10.0


class NodeError(ValueError):
    """The node sent metadata this server cannot read (the stream is closed with this message)."""


@dataclass(frozen=True)
class NodeIdentity:
    """A connected proxy as its DiscoveryRequest.node describes it."""

    id: str
    namespace: str = "default"
    name: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    service_account: str = "default"
    workload_group: str = ""
    address: str = ""  # first INSTANCE_IPS entry, else the node id's IP, else the peer's
    intercept: bool = False  # INTERCEPTION_MODE REDIRECT: iptables capture (virtual 15001/15006 listeners)

    def node_info(self) -> NodeInfo:
        """What translation depends on. The name is left out so that identical workloads share one translation."""
        return NodeInfo(namespace=self.namespace, labels=self.labels, intercept=self.intercept)


def _string(fields: Mapping[str, struct_pb2.Value], key: str) -> str:
    if key not in fields:
        return ""
    value = fields[key]
    if value.WhichOneof("kind") != "string_value":
        raise NodeError(f"node.metadata.{key} must be a string, got {value.WhichOneof('kind')}")
    return value.string_value


def _labels(fields: Mapping[str, struct_pb2.Value]) -> dict[str, str]:
    if "LABELS" not in fields:
        return {}
    value = fields["LABELS"]
    if value.WhichOneof("kind") != "struct_value":
        raise NodeError(f"node.metadata.LABELS must be a struct of strings, got {value.WhichOneof('kind')}")
    labels: dict[str, str] = {}
    for key, item in value.struct_value.fields.items():
        if item.WhichOneof("kind") != "string_value":
            raise NodeError(f"node.metadata.LABELS.{key} must be a string, got {item.WhichOneof('kind')}")
        labels[key] = item.string_value
    return labels


def _istio_id(node_id: str) -> tuple[str, str, str]:
    """(ip, name, namespace) from "sidecar~IP~name.namespace~namespace.svc.cluster.local", else empty strings."""
    parts = node_id.split("~")
    if len(parts) != 4 or not parts[2]:
        return "", "", ""
    namespace = parts[3].split(".", 1)[0]
    name = parts[2]
    if namespace and name.endswith(f".{namespace}"):
        name = name[: -len(namespace) - 1]
    return parts[1], name, namespace


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        return ""


def node_identity(node: base_pb2.Node, peer_ip: str = "") -> NodeIdentity:
    """Read a node's identity; raises NodeError naming the metadata key that is malformed."""
    if not node.id:
        raise NodeError("node.id is empty")
    fields = node.metadata.fields
    id_ip, id_name, id_namespace = _istio_id(node.id)
    ips = _string(fields, "INSTANCE_IPS")
    first = ips.split(",", 1)[0] if ips else ""
    address = _ip(first) if first else ""
    if first and not address:
        raise NodeError(f"node.metadata.INSTANCE_IPS {ips!r} does not start with an IP address")
    return NodeIdentity(
        id=node.id,
        namespace=_string(fields, "NAMESPACE") or id_namespace or "default",
        name=_string(fields, "NAME") or id_name or node.cluster,
        labels=_labels(fields),
        service_account=_string(fields, "SERVICE_ACCOUNT") or "default",
        workload_group=_string(fields, "WORKLOAD_GROUP"),
        intercept=_string(fields, "INTERCEPTION_MODE") == "REDIRECT",
        address=address or _ip(id_ip) or _ip(peer_ip),
    )


@dataclass
class _Registration:
    """One workload registered through one or more streams (a proxy may reconnect)."""

    identity: NodeIdentity
    streams: set[int] = field(default_factory=set)
    expiry: asyncio.TimerHandle | None = None

    @property
    def entry_name(self) -> str:
        address = self.identity.address.replace(".", "-").replace(":", "-")
        return f"{self.identity.workload_group}-{address}"


class Registry:
    """Auto-registered WorkloadEntries, keyed by (namespace, WorkloadGroup, address).

    `grace` is how long an entry outlives the last stream of its workload (a
    proxy that reconnects within it keeps its entry without a push).
    `on_change` is called (synchronously) when the set of entries changes.
    """

    def __init__(self, on_change: Callable[[], None], grace: float = DEFAULT_GRACE_SECONDS) -> None:
        self.grace = grace
        self.on_change = on_change
        self._entries: dict[tuple[str, str, str], _Registration] = {}
        self._by_stream: dict[int, tuple[str, str, str]] = {}

    def register(self, stream_id: int, identity: NodeIdentity) -> bool:
        """Record that `stream_id` serves `identity`; False if it names no WorkloadGroup or no address."""
        if not identity.workload_group or not identity.address:
            return False
        key = (identity.namespace, identity.workload_group, identity.address)
        registration = self._entries.get(key)
        created = registration is None
        if registration is None:
            registration = self._entries[key] = _Registration(identity)
        elif registration.expiry is not None:
            registration.expiry.cancel()
            registration.expiry = None
        changed = created or registration.identity != identity
        registration.identity = identity
        registration.streams.add(stream_id)
        self._by_stream[stream_id] = key
        if changed:
            log.info("registered %s in WorkloadGroup %s/%s at %s", identity.id, key[0], key[1], key[2])
            self.on_change()
        return True

    def unregister(self, stream_id: int) -> None:
        """The stream closed: remove its entry after the grace period, unless another stream keeps it."""
        key = self._by_stream.pop(stream_id, None)
        if key is None:
            return
        registration = self._entries[key]
        registration.streams.discard(stream_id)
        if registration.streams:
            return
        if self.grace <= 0:
            self._expire(key)
            return
        loop = asyncio.get_running_loop()
        registration.expiry = loop.call_later(self.grace, self._expire, key)

    def _expire(self, key: tuple[str, str, str]) -> None:
        registration = self._entries.get(key)
        if registration is None or registration.streams:
            return
        del self._entries[key]
        log.info("unregistered %s from WorkloadGroup %s/%s", registration.identity.id, key[0], key[1])
        self.on_change()

    def close(self) -> None:
        for registration in self._entries.values():
            if registration.expiry is not None:
                registration.expiry.cancel()
        self._entries.clear()
        self._by_stream.clear()

    def merge(self, config: ConfigSet) -> tuple[ConfigSet, list[str]]:
        """`config` plus the registered WorkloadEntries, and a problem per registration it cannot honour."""
        if not self._entries:
            return config, []
        groups = {(g.meta.namespace, g.meta.name): g for g in config.workload_groups}
        taken = {(we.meta.namespace, we.meta.name) for we in config.workload_entries}
        added: list[WorkloadEntry] = []
        problems: list[str] = []
        for key, registration in sorted(self._entries.items()):
            namespace, group_name, _ = key
            group = groups.get((namespace, group_name))
            who = f"node {registration.identity.id}"
            if group is None:
                problems.append(
                    f"{who}: WORKLOAD_GROUP {group_name!r}: no WorkloadGroup {namespace}/{group_name}"
                )
                continue
            entry = _workload_entry(group, registration)
            if (namespace, entry.meta.name) in taken:
                problems.append(
                    f"{who}: WorkloadEntry {namespace}/{entry.meta.name} already exists; not registered"
                )
                continue
            taken.add((namespace, entry.meta.name))
            added.append(entry)
        entries = sorted(
            (*config.workload_entries, *added), key=lambda we: (we.meta.namespace, we.meta.name)
        )
        return dataclasses.replace(config, workload_entries=tuple(entries)), problems

    def status(self) -> list[dict[str, object]]:
        return [
            {
                "namespace": namespace,
                "workload_group": group,
                "address": address,
                "name": registration.entry_name,
                "node": registration.identity.id,
                "streams": len(registration.streams),
                "expiring": registration.expiry is not None,
            }
            for (namespace, group, address), registration in sorted(self._entries.items())
        ]


def _workload_entry(group: WorkloadGroup, registration: _Registration) -> WorkloadEntry:
    identity = registration.identity
    template = group.template
    labels = {**template.labels, **group.labels, **identity.labels}
    name = registration.entry_name
    workload = Workload(
        address=identity.address,
        ports=template.ports,
        labels=frozen_map(labels),
        weight=template.weight,
        service_account=template.service_account or identity.service_account,
        network=template.network,
        locality=template.locality,
        name=name,
    )
    meta = Meta("WorkloadEntry", group.meta.namespace, name, AUTO_FILE, frozen_map(labels))
    return WorkloadEntry(meta, workload)
