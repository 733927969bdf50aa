"""Typed, validated telemetry settings: MeshConfig's providers and the `Telemetry` kind.

Owns: the frozen values `telemetry.py` builds from a MeshConfig's
`extensionProviders` (OpenTelemetry tracers and envoyFileAccessLog loggers)
and from each Telemetry resource's `tracing[]` and `accessLogging[]`
entries. Plain values only: no parsing, no xDS. `model.py` puts them into
MeshConfig and ConfigSet; `telemetry.py` merges them per node.

A rule's `None` fields are unset: they inherit the broader level's value
(workload -> namespace -> root namespace -> MeshConfig).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from control.translate.model import Meta

OUTBOUND = "outbound"  # Istio's CLIENT side: the listeners the app dials
INBOUND = "inbound"  # Istio's SERVER side: the listeners other workloads reach
DIRECTIONS = (OUTBOUND, INBOUND)
# Telemetry `match.mode` -> the directions it covers.
MODES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"CLIENT_AND_SERVER": DIRECTIONS, "CLIENT": (OUTBOUND,), "SERVER": (INBOUND,)}
)
ENVOY_PROVIDER = "envoy"  # Istio's built-in access log provider: MeshConfig accessLogFile
DEFAULT_LOG_PATH = "/dev/stdout"


@dataclass(frozen=True, slots=True)
class OtelProvider:
    """An `extensionProviders[]` entry with `opentelemetry: {service, port}`."""

    name: str
    service: str  # the collector's host (a ServiceEntry host)
    port: int


@dataclass(frozen=True, slots=True)
class FileLogProvider:
    """An `extensionProviders[]` entry with `envoyFileAccessLog`, or the built-in "envoy"."""

    name: str
    path: str
    encoding: str  # "TEXT" (Envoy's default line) or "JSON" (the default JSON fields)


@dataclass(frozen=True, slots=True)
class MeshTelemetry:
    """What Telemetry resources may name and inherit from the MeshConfig."""

    providers: Mapping[str, OtelProvider | FileLogProvider] = field(
        default_factory=lambda: MappingProxyType({})
    )
    sampling: float = 1.0  # defaultConfig.tracing.sampling, percent (Istio's default: 1)


@dataclass(frozen=True, slots=True)
class TracingRule:
    """One Telemetry `tracing[i]`."""

    path: str  # "spec.tracing[0]"
    directions: tuple[str, ...]
    provider: OtelProvider | None = None
    sampling: float | None = None  # randomSamplingPercentage
    disabled: bool | None = None  # disableSpanReporting


@dataclass(frozen=True, slots=True)
class AccessLogRule:
    """One Telemetry `accessLogging[i]`."""

    path: str  # "spec.accessLogging[0]"
    directions: tuple[str, ...]
    provider: FileLogProvider | None = None
    disabled: bool | None = None


@dataclass(frozen=True, slots=True)
class Telemetry:
    meta: Meta
    selector: Mapping[str, str] | None  # None: every workload of the namespace (or the mesh)
    tracing: tuple[TracingRule, ...] = ()
    access_logging: tuple[AccessLogRule, ...] = ()

    def tracing_for(self, direction: str) -> TracingRule | None:
        return next((rule for rule in self.tracing if direction in rule.directions), None)

    def access_logging_for(self, direction: str) -> AccessLogRule | None:
        return next((rule for rule in self.access_logging if direction in rule.directions), None)


@dataclass(frozen=True, slots=True)
class Trace:
    """The tracing one direction of a node gets."""

    provider: OtelProvider
    sampling: float  # percent


@dataclass(frozen=True, slots=True)
class NodeTelemetry:
    """A node's effective tracing and access logging, per direction (None: off)."""

    tracing: Mapping[str, Trace | None] = field(default_factory=lambda: MappingProxyType({}))
    access_log: Mapping[str, FileLogProvider | None] = field(default_factory=lambda: MappingProxyType({}))

    def collectors(self) -> list[OtelProvider]:
        """The tracing providers in use, each once, sorted by name."""
        used = {trace.provider.name: trace.provider for trace in self.tracing.values() if trace is not None}
        return [used[name] for name in sorted(used)]
