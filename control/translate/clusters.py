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
- TLS (`security.py` builds the sockets): the DestinationRule's `tls` for the
  cluster's subset and port (subset port level > subset > rule port level >
  rule); without one, auto mTLS when MeshConfig enableAutoMtls is on and an
  endpoint is labelled security.istio.io/tlsMode=istio: such endpoints get
  filter_metadata["envoy.transport_socket_match"] = {"tlsMode": "istio"} and
  the cluster transport_socket_matches (mutual TLS for them, plaintext else).
  ALPN follows the cluster's upstream protocol (`security.alpn`).
- connectionPool, outlierDetection and the port's protocol (HTTP/2 for GRPC,
  HTTP2, GRPC-WEB) set circuit breakers, timeouts, protocol options and
  outlier detection (`cluster_traffic.py`), with the same precedence as tls;
  inbound clusters get the default circuit breakers and HTTP/2 for those
  protocols.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as ec
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf import struct_pb2, wrappers_pb2

from control.translate.cluster_traffic import apply_traffic, speaks_h2, uses_downstream
from control.translate.model import (
    EMPTY,
    LoadBalancer,
    MtlsMode,
    Protocol,
    Resolution,
    ServiceEntry,
    ServicePort,
    Workload,
    labels_match,
)
from control.translate.protos import CONNECT_TIMEOUT_SECONDS, ads, duration, socket_address
from control.translate.scope import Scope, cluster_name
from control.translate.security import (
    TLS_MODE_LABEL,
    alpn,
    auto_mtls_matches,
    client_socket,
    istio_mutual_sni,
    istio_mutual_socket,
    mark_for_auto_mtls,
    spiffe_id,
)


@dataclass(frozen=True, slots=True)
class _Row:
    """One endpoint of a cluster, before it becomes an LbEndpoint."""

    address: str
    port: int
    namespace: str  # the workload's namespace (its identity's)
    workload: Workload
    mutual: bool = False  # auto mTLS dials it with the mesh certificate


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
            rows = _rows(scope, se, port, labels) if se.resolution is Resolution.STATIC else []
            cluster = (
                original_dst_cluster(name)
                if se.resolution is Resolution.NONE
                else _eds_cluster(name)
            )
            if rule is not None and se.resolution is not Resolution.NONE:
                apply_lb(cluster, rule.lb_for(subset, number))
            pool = rule.pool_for(subset, number) if rule is not None else None
            outlier = rule.outlier_for(subset, number) if rule is not None else None
            apply_traffic(cluster, port.protocol, port.h2, pool, outlier)
            protocols = alpn(
                port.protocol, h2=speaks_h2(port.h2, pool), downstream=uses_downstream(pool)
            )
            rows = _secure(scope, cluster, se, port, subset, host, rows, protocols)
            clusters.append(cluster)
            if se.resolution is Resolution.STATIC:
                assignments.append(load_assignment(name, [_lb_endpoint(row) for row in rows]))
    if scope.sidecar is not None:
        for ingress in scope.sidecar.ingress:
            clusters.append(
                inbound_cluster(
                    ingress.port.number, ingress.endpoint_port, ingress.port.protocol, ingress.port.h2
                )
            )
    return clusters, assignments


def inbound_cluster(
    port: int, app_port: int, protocol: Protocol = Protocol.TCP, h2: bool = False
) -> cluster_pb2.Cluster:
    """"inbound|port||": STATIC, the app on 127.0.0.1:app_port (HTTP/2 to it when `h2`)."""
    name = cluster_name("inbound", port, "", "")
    endpoint = ec.LbEndpoint(endpoint=ec.Endpoint(address=socket_address("127.0.0.1", app_port)))
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration(CONNECT_TIMEOUT_SECONDS),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[ec.LocalityLbEndpoints(lb_endpoints=[endpoint])],
        ),
    )
    apply_traffic(cluster, protocol, h2, None, None)
    return cluster


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


def original_dst_cluster(name: str) -> cluster_pb2.Cluster:
    """An ORIGINAL_DST cluster (passthrough), with the default circuit breakers."""
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.ORIGINAL_DST,
        connect_timeout=duration(CONNECT_TIMEOUT_SECONDS),
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
    )
    apply_traffic(cluster, Protocol.TCP, False, None, None)
    return cluster


def _workloads(scope: Scope, se: ServiceEntry) -> list[tuple[str, Workload]]:
    """(namespace, workload) of every endpoint of `se`: inline ones, then selected WorkloadEntries."""
    found = [(se.meta.namespace, workload) for workload in se.endpoints]
    if se.workload_selector is not None:
        selector = se.workload_selector
        found += [
            (we.meta.namespace, we.workload)
            for we in scope.config.workload_entries
            if we.meta.namespace == se.meta.namespace and labels_match(selector, we.workload.labels)
        ]
    return found


def _rows(
    scope: Scope, se: ServiceEntry, port: ServicePort, subset_labels: Mapping[str, str]
) -> list[_Row]:
    rows = []
    for namespace, workload in _workloads(scope, se):
        if not labels_match(subset_labels, workload.labels):
            continue
        number = workload.ports.get(port.name) or port.target_port or port.number
        rows.append(_Row(workload.address, number, namespace, workload))
    rows.sort(key=lambda row: (row.address, row.port, row.workload.name))
    return rows


def _secure(
    scope: Scope,
    cluster: cluster_pb2.Cluster,
    se: ServiceEntry,
    port: ServicePort,
    subset: str,
    host: str,
    rows: list[_Row],
    protocols: list[str],
) -> list[_Row]:
    """Set the cluster's TLS (DestinationRule tls, or auto mTLS); returns rows marked for auto mTLS."""
    trust_domain = scope.config.mesh.trust_domain
    identities = [spiffe_id(trust_domain, r.namespace, r.workload.service_account) for r in rows]
    rule = scope.rules.get(host)
    tls = rule.tls_for(subset, port.number) if rule is not None else None
    if tls is not None:
        found = client_socket(
            tls,
            port=port.number,
            subset=subset,
            host=host,
            alpn_protocols=protocols,
            identities=identities,
            trust_domain=trust_domain,
        )
        if found is not None:
            cluster.transport_socket.CopyFrom(found)
        return rows
    if not scope.config.mesh.enable_auto_mtls:
        return rows
    marked = [
        _Row(r.address, r.port, r.namespace, r.workload, mutual=_dials_mutual(scope, r))
        for r in rows
    ]
    if any(row.mutual for row in marked):
        sni = istio_mutual_sni(port.number, subset, host)
        mutual = istio_mutual_socket(sni, identities, protocols, trust_domain)
        cluster.transport_socket_matches.extend(auto_mtls_matches(mutual))
    return marked


def _dials_mutual(scope: Scope, row: _Row) -> bool:
    """Auto mTLS: the endpoint runs a sidecar, and its policy for the port accepts mutual TLS."""
    labels = row.workload.labels
    if labels.get(TLS_MODE_LABEL) != "istio":
        return False
    return scope.peers.mode(row.namespace, labels, row.port) is not MtlsMode.DISABLE


def _lb_endpoint(row: _Row) -> ec.LbEndpoint:
    istio = struct_pb2.Struct()
    istio.update({"labels": dict(row.workload.labels), "workload": row.workload.name})
    metadata = base_pb2.Metadata(filter_metadata={"istio": istio})
    if row.mutual:
        mark_for_auto_mtls(metadata)
    return ec.LbEndpoint(
        endpoint=ec.Endpoint(address=socket_address(row.address, row.port)),
        load_balancing_weight=wrappers_pb2.UInt32Value(value=row.workload.weight or 1),
        metadata=metadata,
    )


def load_assignment(
    name: str, endpoints: list[ec.LbEndpoint]
) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name, endpoints=[ec.LocalityLbEndpoints(lb_endpoints=endpoints)]
    )


def apply_lb(cluster: cluster_pb2.Cluster, lb: LoadBalancer | None) -> None:
    """A DestinationRule's loadBalancer on its cluster (consistentHash: RING_HASH; the key is on routes)."""
    if lb is None:
        return
    cluster.lb_policy = cluster_pb2.Cluster.LbPolicy.Value(lb.simple)
    if lb.ring_size is not None:
        cluster.ring_hash_lb_config.minimum_ring_size.value = lb.ring_size
