"""`translate(config, node)`: one node's xDS resources from a validated ConfigSet.

Owns: the `Resources` value and the order in which the builders run
(scope -> listeners -> routes -> clusters and endpoints), and the final sort
that makes the output deterministic (byte-for-byte under deterministic
serialization; see `Resources.digest`). It is a pure function: no
I/O, no clock, no randomness; a problem that only shows for this node raises
one ConfigError listing all of them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2

from control.translate.accesslog import add_access_logs  # [accesslog]
from control.translate.capture import build_capture
from control.translate.clusters import build_clusters
from control.translate.errors import ConfigError, Problem
from control.translate.listeners import build_listeners
from control.translate.model import ConfigSet, NodeInfo
from control.translate.routes import build_routes
from control.translate.scope import Scope
from control.translate.telemetry import node_telemetry  # [telemetry]
from control.translate.tracing import add_tracing, collector_reference  # [tracing]


@dataclass(frozen=True)
class Resources:
    """The xDS v3 resources for one node, each tuple sorted by resource name."""

    listeners: tuple[listener_pb2.Listener, ...] = ()
    routes: tuple[route_pb2.RouteConfiguration, ...] = ()
    clusters: tuple[cluster_pb2.Cluster, ...] = ()
    endpoints: tuple[endpoint_pb2.ClusterLoadAssignment, ...] = ()

    def digest(self) -> str:
        """A SHA-256 of every resource, stable across processes (usable as an xDS version).

        Endpoint metadata holds protobuf maps, whose default serialization order
        varies between processes; this uses deterministic serialization, and so
        must anyone else who hashes or compares these resources as bytes.
        """
        hasher = hashlib.sha256()
        for group in (self.listeners, self.routes, self.clusters, self.endpoints):
            for message in group:
                data = message.SerializeToString(deterministic=True)
                hasher.update(len(data).to_bytes(8, "big"))
                hasher.update(data)
            hasher.update(b"|")
        return hasher.hexdigest()


def translate(config: ConfigSet, node: NodeInfo) -> Resources:
    """Listeners, routes, clusters and endpoints for `node`.

    No Sidecar selecting the node is not an error: the node then gets no
    listeners (and clusters for every service exported to its namespace).
    An intercepted node (`node.intercept`) gets the capture listeners of
    `capture.py` instead of the Sidecar's explicit ingress listeners.
    """
    problems: list[Problem] = []
    scope = Scope.of(config, node, problems)
    telemetry = node_telemetry(config, node, problems)  # [telemetry] MeshConfig + Telemetry, per direction
    traced = collector_reference(scope, telemetry, problems)  # [tracing] the collectors' clusters
    if node.intercept:
        captured = build_capture(scope, problems)
        listeners, routes = captured.listeners, captured.routes
        clusters, endpoints = build_clusters(scope, captured.referenced | traced)  # [tracing] | traced
        clusters += captured.clusters
    else:
        listeners, tcp_targets = build_listeners(scope, problems)
        routes, route_targets = build_routes(scope, problems)
        clusters, endpoints = build_clusters(scope, tcp_targets | route_targets | traced)  # [tracing] | traced
    add_access_logs(listeners, telemetry)  # [accesslog] MeshConfig accessLogFile, Telemetry accessLogging
    add_tracing(listeners, telemetry, node)  # [tracing] MeshConfig defaultProviders.tracing, Telemetry tracing
    if problems:
        raise ConfigError(problems)
    return Resources(
        listeners=tuple(sorted(listeners, key=lambda r: r.name)),
        routes=tuple(sorted(routes, key=lambda r: r.name)),
        clusters=tuple(sorted(clusters, key=lambda r: r.name)),
        endpoints=tuple(sorted(endpoints, key=lambda r: r.cluster_name)),
    )
