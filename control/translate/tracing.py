"""MeshConfig tracing -> the HCM `tracing` of every HTTP listener, and the collector's cluster.

Owns: reading Istio's tracing settings from a MeshConfig spec
(`defaultProviders.tracing` names an `extensionProviders` entry with an
`opentelemetry: {service, port}`; `defaultConfig.tracing.sampling` is the
percentage, default 1 as in Istio; `enableTracing: false` turns it off), and
adding `tracing` (an `envoy.tracers.opentelemetry` provider whose gRPC
service is the "outbound|port||service" cluster, random_sampling = the
percentage) to every HCM a node gets, inbound and outbound alike.

Not implemented yet: the `Telemetry` kind (still refused as not enforced), a
tracing provider other than opentelemetry, several tracing providers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from envoy.config.core.v3 import grpc_service_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.trace.v3 import http_tracer_pb2, opentelemetry_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.type.v3 import percent_pb2

from control.translate.errors import Problem
from control.translate.model import MeshConfig, MeshTracing, NodeInfo
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
    providers = {p.get("name"): p for p in spec.get("extensionProviders", [])}
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


def collector_reference(scope: Scope, problems: list[Problem]) -> set[tuple[str, int]]:
    """The collector's (host, port), so its cluster is built even if the node does not see it."""
    mesh = scope.config.mesh
    tr = mesh.tracing
    if tr is None:
        return set()
    se = scope.registry.get(tr.service)
    if se is None or se.port(tr.port) is None:
        problems.append(Problem(mesh.meta.file if mesh.meta else "", "MeshConfig", "spec.extensionProviders",
                                f"tracing provider {tr.provider!r}: no ServiceEntry host {tr.service!r} "
                                f"with port {tr.port}"))
        return set()
    if not se.port(tr.port).h2:  # type: ignore[union-attr]
        # Envoy exports spans over gRPC through this cluster: it must speak HTTP/2 (Istio's
        # collector Services name the port grpc-otlp for the same reason).
        problems.append(Problem(mesh.meta.file if mesh.meta else "", "MeshConfig", "spec.extensionProviders",
                                f"tracing provider {tr.provider!r}: port {tr.port} of {tr.service} must be "
                                "declared protocol GRPC (OTLP/gRPC runs over HTTP/2)"))
        return set()
    return {(tr.service, tr.port)}


def service_name(node: NodeInfo) -> str:
    """Istio's: the node's canonical service, dot, namespace."""
    labels = node.labels
    name = labels.get(CANONICAL_NAME) or labels.get("app.kubernetes.io/name") or labels.get("app") or node.name
    return f"{name or 'unknown'}.{node.namespace}"


def http_tracing(tr: MeshTracing, node: NodeInfo) -> hcm.HttpConnectionManager.Tracing:
    config = opentelemetry_pb2.OpenTelemetryConfig(
        grpc_service=grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(
                cluster_name=cluster_name("outbound", tr.port, "", tr.service), authority=tr.service)),
        service_name=service_name(node),
    )
    return hcm.HttpConnectionManager.Tracing(
        random_sampling=percent_pb2.Percent(value=tr.sampling),
        provider=http_tracer_pb2.Tracing.Http(name=OTEL_TRACER, typed_config=packed(config)),
    )


def add_tracing(listeners: Iterable[listener_pb2.Listener], mesh: MeshConfig, node: NodeInfo) -> None:
    """Give every HCM of `listeners` the mesh's tracing (in place); nothing when tracing is off."""
    if mesh.tracing is None:
        return
    tracing = http_tracing(mesh.tracing, node)
    for listener in listeners:
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
