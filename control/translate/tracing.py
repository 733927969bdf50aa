"""MeshConfig tracing -> the HCM `tracing` of every HTTP listener, and the collector's cluster.

Owns: reading Istio's tracing settings from a MeshConfig spec
(`defaultProviders.tracing` names an `extensionProviders` entry with an
`opentelemetry: {service, port}`; `defaultConfig.tracing.sampling` is the
percentage, default 1 as in Istio; `enableTracing: false` turns it off), and
adding `tracing` (an `envoy.tracers.opentelemetry` provider whose gRPC
service is the "outbound|port||service" cluster, random_sampling = the
percentage) to the HCMs of a node's listeners. What each direction gets
(outbound listeners: CLIENT, inbound: SERVER) is the node's merged MeshConfig
and Telemetry settings (`telemetry.node_telemetry`); a direction whose
tracing is off gets no `tracing`.

Not implemented yet: a tracing provider other than opentelemetry, several
tracing providers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from envoy.config.core.v3 import base_pb2, grpc_service_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.trace.v3 import http_tracer_pb2, opentelemetry_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.type.v3 import percent_pb2

from control.translate.errors import Problem
from control.translate.model import MeshTracing, NodeInfo
from control.translate.model_telemetry import INBOUND, OUTBOUND, NodeTelemetry, Trace
from control.translate.protos import packed
from control.translate.scope import Scope, cluster_name

OTEL_TRACER = "envoy.tracers.opentelemetry"
_HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
CANONICAL_NAME = "service.istio.io/canonical-name"


def mesh_tracing(spec: dict[str, Any], report: Callable[[str, str], None]) -> MeshTracing | None:
    """The MeshConfig's tracing provider, or None when none is selected (or enableTracing is false)."""
    names = spec.get("defaultProviders", {}).get("tracing", [])
    if not names or spec.get("enableTracing", True) is False:
        return None
    if len(names) > 1:
        report("spec.defaultProviders.tracing", "only one tracing provider is supported yet")
        return None
    providers: dict[str, Any] = {}
    for p in spec.get("extensionProviders", []):
        providers.setdefault(p.get("name"), p)  # a name listed twice is reported by telemetry.py
    provider = providers.get(names[0])
    if provider is None:
        report("spec.defaultProviders.tracing[0]", f"no extensionProviders entry is named {names[0]!r}")
        return None
    otel = provider.get("opentelemetry")
    if otel is None:
        report("spec.defaultProviders.tracing[0]", f"provider {names[0]!r} is not an opentelemetry provider")
        return None
    sampling = spec.get("defaultConfig", {}).get("tracing", {}).get("sampling", 1.0)
    return MeshTracing(names[0], otel["service"], int(otel["port"]), float(sampling))


def collector_reference(scope: Scope, telemetry: NodeTelemetry, problems: list[Problem]) -> set[tuple[str, int]]:
    """The collectors' (host, port) the node exports to, so their clusters are built even if unseen."""
    mesh = scope.config.mesh
    found: set[tuple[str, int]] = set()
    for tr in telemetry.collectors():
        se = scope.registry.get(tr.service)
        if se is None or se.port(tr.port) is None:
            problems.append(Problem(mesh.meta.file if mesh.meta else "", "MeshConfig", "spec.extensionProviders",
                                    f"tracing provider {tr.name!r}: no ServiceEntry host {tr.service!r} "
                                    f"with port {tr.port}"))
        elif not se.port(tr.port).h2:  # type: ignore[union-attr]
            # Envoy exports spans over gRPC through this cluster: it must speak HTTP/2 (Istio's
            # collector Services name the port grpc-otlp for the same reason).
            problems.append(Problem(mesh.meta.file if mesh.meta else "", "MeshConfig", "spec.extensionProviders",
                                    f"tracing provider {tr.name!r}: port {tr.port} of {tr.service} must be "
                                    "declared protocol GRPC (OTLP/gRPC runs over HTTP/2)"))
        else:
            found.add((tr.service, tr.port))
    return found


def service_name(node: NodeInfo) -> str:
    """Istio's: the node's canonical service, dot, namespace."""
    labels = node.labels
    name = labels.get(CANONICAL_NAME) or labels.get("app.kubernetes.io/name") or labels.get("app") or node.name
    return f"{name or 'unknown'}.{node.namespace}"


def http_tracing(trace: Trace, node: NodeInfo) -> hcm.HttpConnectionManager.Tracing:
    provider = trace.provider
    config = opentelemetry_pb2.OpenTelemetryConfig(
        grpc_service=grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(
                cluster_name=cluster_name("outbound", provider.port, "", provider.service),
                authority=provider.service)),
        service_name=service_name(node),
    )
    return hcm.HttpConnectionManager.Tracing(
        random_sampling=percent_pb2.Percent(value=trace.sampling),
        provider=http_tracer_pb2.Tracing.Http(name=OTEL_TRACER, typed_config=packed(config)),
    )


def add_tracing(listeners: Iterable[listener_pb2.Listener], telemetry: NodeTelemetry, node: NodeInfo) -> None:
    """Give the HCMs of `listeners` their direction's tracing (in place); nothing where it is off."""
    by_direction = {d: http_tracing(t, node) for d, t in telemetry.tracing.items() if t is not None}
    if not by_direction:
        return
    for listener in listeners:
        tracing = by_direction.get(INBOUND if listener.traffic_direction == base_pb2.INBOUND else OUTBOUND)
        if tracing is None:
            continue
        chains = [*listener.filter_chains]
        if listener.HasField("default_filter_chain"):
            chains.append(listener.default_filter_chain)
        for chain in chains:
            for f in chain.filters:
                if f.typed_config.type_url == _HCM_TYPE:
                    manager = hcm.HttpConnectionManager()
                    f.typed_config.Unpack(manager)
                    manager.tracing.CopyFrom(tracing)
                    f.typed_config.CopyFrom(packed(manager))
