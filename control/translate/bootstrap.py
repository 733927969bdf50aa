"""The translated resources as a static Envoy bootstrap (JSON-able dict).

Owns: the conversion from xDS-shaped `Resources` (RDS listeners, EDS
clusters) to an equivalent bootstrap that a real Envoy can run or validate
without a control server: each HCM's `rds` is replaced by the named
RouteConfiguration inline, and each EDS cluster becomes STATIC with its
ClusterLoadAssignment inline. Used by the conformance test (`envoy --mode
validate`) and by benchmarks that run Envoy with the same config as Pillion.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from google.protobuf import json_format

from control.translate.resources import Resources


def envoy_bootstrap(
    resources: Resources,
    admin_port: int,
    *,
    admin_address: str = "127.0.0.1",
    node_id: str = "pillion-bootstrap",
    node_cluster: str = "pillion",
) -> dict[str, Any]:
    """A bootstrap dict (json.dumps-able) with the same listeners, routes and endpoints, all static.

    Raises ValueError if a listener names a route table that `resources` lacks.
    """
    routes = {table.name: table for table in resources.routes}
    assignments = {cla.cluster_name: cla for cla in resources.endpoints}
    return {
        "node": {"id": node_id, "cluster": node_cluster},
        "admin": {
            "address": {"socket_address": {"address": admin_address, "port_value": admin_port}}
        },
        "static_resources": {
            "listeners": [
                _to_dict(_inline_routes(listener, routes)) for listener in resources.listeners
            ],
            "clusters": [_to_dict(_static(cluster, assignments)) for cluster in resources.clusters],
        },
    }


def _to_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _inline_routes(
    listener: listener_pb2.Listener, routes: Mapping[str, route_pb2.RouteConfiguration]
) -> listener_pb2.Listener:
    result = listener_pb2.Listener()
    result.CopyFrom(listener)
    for chain in result.filter_chains:
        for network_filter in chain.filters:
            if not network_filter.typed_config.Is(hcm.HttpConnectionManager.DESCRIPTOR):
                continue
            manager = hcm.HttpConnectionManager()
            network_filter.typed_config.Unpack(manager)
            if not manager.HasField("rds"):
                continue
            name = manager.rds.route_config_name
            if name not in routes:
                raise ValueError(
                    f"listener {listener.name} uses route table {name!r}, which is missing"
                )
            manager.route_config.CopyFrom(routes[name])  # replaces the rds oneof member
            network_filter.typed_config.Pack(manager)
    return result


def _static(
    cluster: cluster_pb2.Cluster, assignments: Mapping[str, endpoint_pb2.ClusterLoadAssignment]
) -> cluster_pb2.Cluster:
    result = cluster_pb2.Cluster()
    result.CopyFrom(cluster)
    if result.type != cluster_pb2.Cluster.EDS:
        return result
    result.type = cluster_pb2.Cluster.STATIC
    result.ClearField("eds_cluster_config")
    assignment = assignments.get(cluster.name) or endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster.name
    )
    result.load_assignment.CopyFrom(assignment)
    return result
