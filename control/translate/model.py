"""Typed, validated Istio objects: what the loader produces and the builders consume.

Owns: the frozen dataclasses for each kind (ServiceEntry, WorkloadEntry,
Sidecar, VirtualService, DestinationRule, ...), `MeshConfig`, `NodeInfo` and
the `ConfigSet` that holds them. No parsing and no xDS here: these are plain
values, built once by `istio.py` and never mutated.

Every object keeps its `Meta` (kind, namespace, name, file) and sub-objects
that later stages may complain about keep their field path, so a problem found
while translating for one node still names the file, resource and field.
Host names in destinations are already resolved to the ServiceEntry host.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any, TypeVar

V = TypeVar("V")

# The DNS suffix of Kubernetes-style service names: "reviews" in namespace "default"
# may name the ServiceEntry host "reviews.default.svc.cluster.local".
DNS_SUFFIX = "cluster.local"
EMPTY: Mapping[str, Any] = MappingProxyType({})


def frozen_map(values: Mapping[str, V] | None) -> Mapping[str, V]:
    """A read-only copy with sorted keys (so iteration order is deterministic)."""
    if not values:
        return EMPTY
    return MappingProxyType({key: values[key] for key in sorted(values)})


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """True when every selector label is present with the same value."""
    return all(labels.get(key) == value for key, value in selector.items())


class Protocol(Enum):
    HTTP = "HTTP"
    TCP = "TCP"


class Resolution(Enum):
    STATIC = "STATIC"
    NONE = "NONE"


class MatchKind(Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    REGEX = "regex"


@dataclass(frozen=True, slots=True)
class Meta:
    kind: str
    namespace: str
    name: str
    file: str
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY)

    @property
    def resource(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class MeshConfig:
    trust_domain: str = "cluster.local"
    root_namespace: str = "istio-system"
    outbound_mode: str = "ALLOW_ANY"
    meta: Meta | None = None


@dataclass(frozen=True)
class NodeInfo:
    """Who the sidecar is: its namespace, its workload labels and (informational) name."""

    namespace: str = "default"
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY)
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", frozen_map(self.labels))

    def __hash__(self) -> int:
        return hash((self.namespace, tuple(self.labels.items()), self.name))


# --- registry ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServicePort:
    number: int
    name: str
    protocol: Protocol
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class Workload:
    """A WorkloadEntry spec, standalone or inline in a ServiceEntry's `endpoints`."""

    address: str
    ports: Mapping[str, int] = field(default_factory=lambda: EMPTY)
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY)
    weight: int = 0
    service_account: str = ""
    network: str = ""
    locality: str = ""
    name: str = ""  # the WorkloadEntry's name; "" for inline endpoints


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    meta: Meta
    hosts: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    resolution: Resolution
    addresses: tuple[str, ...] = ()
    location: str = "MESH_EXTERNAL"
    endpoints: tuple[Workload, ...] = ()
    workload_selector: Mapping[str, str] | None = None
    export_to: tuple[str, ...] = ()

    def port(self, number: int) -> ServicePort | None:
        for port in self.ports:
            if port.number == number:
                return port
        return None


@dataclass(frozen=True, slots=True)
class WorkloadEntry:
    meta: Meta
    workload: Workload


@dataclass(frozen=True, slots=True)
class WorkloadGroup:
    meta: Meta
    labels: Mapping[str, str]
    template: Workload


# --- traffic ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SidecarPort:
    number: int
    protocol: Protocol
    name: str = ""
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class IngressListener:
    port: SidecarPort
    bind: str  # "" means 0.0.0.0
    endpoint_port: int  # the app's port on 127.0.0.1
    path: str  # "spec.ingress[i]"


@dataclass(frozen=True, slots=True)
class EgressListener:
    port: SidecarPort | None  # None: scopes visibility only, no listener
    bind: str  # "" means 127.0.0.1
    hosts: tuple[tuple[str, str], ...]  # (namespace pattern, host pattern)
    path: str  # "spec.egress[i]"


@dataclass(frozen=True, slots=True)
class Sidecar:
    meta: Meta
    selector: Mapping[str, str] | None
    ingress: tuple[IngressListener, ...]
    egress: tuple[EgressListener, ...]


@dataclass(frozen=True, slots=True)
class StringMatch:
    kind: MatchKind
    value: str


@dataclass(frozen=True, slots=True)
class HttpMatch:
    name: str = ""
    uri: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()


@dataclass(frozen=True, slots=True)
class Destination:
    host: str  # resolved to a ServiceEntry host
    subset: str = ""
    port: int | None = None
    weight: int = 0
    path: str = ""  # "spec.http[i].route[j].destination"


@dataclass(frozen=True, slots=True)
class HttpRoute:
    name: str
    matches: tuple[HttpMatch, ...]
    destinations: tuple[Destination, ...]
    timeout: float | None = None  # seconds


@dataclass(frozen=True, slots=True)
class TcpRoute:
    ports: tuple[int, ...]  # () matches every port
    destination: Destination
    path: str  # "spec.tcp[i]"


@dataclass(frozen=True, slots=True)
class VirtualService:
    meta: Meta
    hosts: tuple[str, ...]  # resolved to ServiceEntry hosts
    http: tuple[HttpRoute, ...]
    tcp: tuple[TcpRoute, ...]
    export_to: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Subset:
    name: str
    labels: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class DestinationRule:
    meta: Meta
    host: str  # resolved to a ServiceEntry host
    subsets: tuple[Subset, ...]
    export_to: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class UnenforcedPolicy:
    """A security or telemetry resource whose shape was checked but which is not enforced yet."""

    meta: Meta
    spec: Mapping[str, object]


@dataclass(frozen=True)
class ConfigSet:
    """Every parsed, validated object, sorted by (namespace, name) within each kind."""

    mesh: MeshConfig = field(default_factory=MeshConfig)
    service_entries: tuple[ServiceEntry, ...] = ()
    workload_entries: tuple[WorkloadEntry, ...] = ()
    workload_groups: tuple[WorkloadGroup, ...] = ()
    sidecars: tuple[Sidecar, ...] = ()
    virtual_services: tuple[VirtualService, ...] = ()
    destination_rules: tuple[DestinationRule, ...] = ()
    unenforced: tuple[UnenforcedPolicy, ...] = ()
    files: tuple[str, ...] = ()
