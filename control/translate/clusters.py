"""ServiceEntry + DestinationRule + WorkloadEntry -> Clusters and ClusterLoadAssignments.

Owns: outbound cluster names and types, subset clusters, endpoint selection
(inline endpoints, WorkloadEntries picked by workloadSelector, subset label
filtering), endpoint ports and weights, and the inbound STATIC clusters of
the Sidecar's ingress entries. It decides nothing about visibility; the
caller passes the (host, port) pairs to cover.

Rules:
- resolution STATIC -> EDS cluster "outbound|port||host" (service_name = the
  cluster name, over ADS), plus "outbound|port|subset|host" per subset of the
  DestinationRule visible to the node; one ClusterLoadAssignment each.
- resolution NONE -> ORIGINAL_DST cluster (lb CLUSTER_PROVIDED), no endpoints:
  traffic goes where the app sent it, as in Istio.
- Endpoint port: the workload's ports[<service port name>], else the service
  port's targetPort, else its number. Weight: the workload's weight, or 1.
- Each endpoint carries filter_metadata["istio"] = {"labels": ..., "workload": name}.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as ec
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf import struct_pb2, wrappers_pb2

from control.translate.model import (
    EMPTY,
    Resolution,
    ServiceEntry,
    ServicePort,
    Workload,
    labels_match,
)
from control.translate.protos import CONNECT_TIMEOUT_SECONDS, ads, duration, socket_address
from control.translate.scope import Scope, cluster_name


def build_clusters(
    scope: Scope, referenced: Iterable[tuple[str, int]]
) -> tuple[list[cluster_pb2.Cluster], list[endpoint_pb2.ClusterLoadAssignment]]:
    """Outbound clusters for every visible (host, port) and every referenced one, plus inbound ones."""
    pairs = {
        (host, port.number) for host in scope.cluster_hosts() for port in scope.registry[host].ports
    }
    pairs.update(referenced)
    clusters: list[cluster_pb2.Cluster] = []
    assignments: list[endpoint_pb2.ClusterLoadAssignment] = []
    for host, number in sorted(pairs):
        se = scope.registry[host]
        port = se.port(number)
        if port is None:  # callers only reference ports the host has
            continue
        rule = scope.rules.get(host)
        subsets: list[tuple[str, Mapping[str, str]]] = [("", EMPTY)]
        subsets += [(s.name, s.labels) for s in rule.subsets] if rule is not None else []
        for subset, labels in subsets:
            name = cluster_name("outbound", number, subset, host)
            if se.resolution is Resolution.NONE:
                clusters.append(_original_dst_cluster(name))
                continue
            clusters.append(_eds_cluster(name))
            assignments.append(load_assignment(name, _endpoints(scope, se, port, labels)))
    if scope.sidecar is not None:
        for ingress in scope.sidecar.ingress:
            name = cluster_name("inbound", ingress.port.number, "", "")
            endpoint = ec.LbEndpoint(
                endpoint=ec.Endpoint(address=socket_address("127.0.0.1", ingress.endpoint_port))
            )
            clusters.append(
                cluster_pb2.Cluster(
                    name=name,
                    type=cluster_pb2.Cluster.STATIC,
                    connect_timeout=duration(CONNECT_TIMEOUT_SECONDS),
                    lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
                    load_assignment=endpoint_pb2.ClusterLoadAssignment(
                        cluster_name=name,
                        endpoints=[ec.LocalityLbEndpoints(lb_endpoints=[endpoint])],
                    ),
                )
            )
    return clusters, assignments


def _eds_cluster(name: str) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
            eds_config=ads(), service_name=name
        ),
        connect_timeout=duration(CONNECT_TIMEOUT_SECONDS),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
    )


def _original_dst_cluster(name: str) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.ORIGINAL_DST,
        connect_timeout=duration(CONNECT_TIMEOUT_SECONDS),
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
    )


def _workloads(scope: Scope, se: ServiceEntry) -> list[Workload]:
    found = list(se.endpoints)
    if se.workload_selector is not None:
        selector = se.workload_selector
        found += [
            we.workload
            for we in scope.config.workload_entries
            if we.meta.namespace == se.meta.namespace and labels_match(selector, we.workload.labels)
        ]
    return found


def _endpoints(
    scope: Scope, se: ServiceEntry, port: ServicePort, subset_labels: Mapping[str, str]
) -> list[ec.LbEndpoint]:
    rows = []
    for workload in _workloads(scope, se):
        if not labels_match(subset_labels, workload.labels):
            continue
        number = workload.ports.get(port.name) or port.target_port or port.number
        rows.append((workload.address, number, workload.name, workload))
    rows.sort(key=lambda row: row[:3])
    return [_lb_endpoint(address, number, workload) for address, number, _, workload in rows]


def _lb_endpoint(address: str, port: int, workload: Workload) -> ec.LbEndpoint:
    istio = struct_pb2.Struct()
    istio.update({"labels": dict(workload.labels), "workload": workload.name})
    return ec.LbEndpoint(
        endpoint=ec.Endpoint(address=socket_address(address, port)),
        load_balancing_weight=wrappers_pb2.UInt32Value(value=workload.weight or 1),
        metadata=base_pb2.Metadata(filter_metadata={"istio": istio}),
    )


def load_assignment(
    name: str, endpoints: list[ec.LbEndpoint]
) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name, endpoints=[ec.LocalityLbEndpoints(lb_endpoints=endpoints)]
    )
