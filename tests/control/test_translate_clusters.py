"""Clusters and ClusterLoadAssignments: EDS shape, subsets, endpoint selection, ports, weights, metadata."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf import json_format

from control.translate import NodeInfo, load_text, translate
from tests.control.translate_fixtures import (
    PRODUCTPAGE_SIDECAR,
    REVIEWS_REGISTRY,
    named,
    seed_reviews,
)

FQDN = "reviews.default.svc.cluster.local"
PRODUCTPAGE = NodeInfo(namespace="default", labels={"app": "productpage"})


def resources_for(text: str):  # type: ignore[no-untyped-def]
    return translate(load_text(text), PRODUCTPAGE)


def endpoints(assignment: object) -> list[tuple[str, int, int]]:
    assert isinstance(assignment, endpoint_pb2.ClusterLoadAssignment)
    (locality,) = assignment.endpoints
    return [
        (
            e.endpoint.address.socket_address.address,
            e.endpoint.address.socket_address.port_value,
            e.load_balancing_weight.value,
        )
        for e in locality.lb_endpoints
    ]


def test_eds_cluster_shape() -> None:
    table = named(resources_for(REVIEWS_REGISTRY))
    cluster = table[f"outbound|9080||{FQDN}"]
    assert isinstance(cluster, cluster_pb2.Cluster)
    assert cluster.type == cluster_pb2.Cluster.EDS
    assert cluster.eds_cluster_config.service_name == f"outbound|9080||{FQDN}"
    assert cluster.eds_cluster_config.eds_config.HasField("ads")
    assert cluster.connect_timeout.seconds == 10
    assert cluster.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN


def test_seed_subsets_get_clusters_with_endpoints_filtered_by_labels() -> None:
    text = seed_reviews() + "---\n" + REVIEWS_REGISTRY + "---\n" + PRODUCTPAGE_SIDECAR
    resources = resources_for(text)
    assert [c.name for c in resources.clusters] == [
        "inbound|9090||",
        f"outbound|9080|v1|{FQDN}",
        f"outbound|9080|v2|{FQDN}",
        f"outbound|9080||{FQDN}",
    ]
    table = named(resources)
    # targetPort 9000 unless the workload names the port; weight 1 unless set.
    assert endpoints(table[f"cla:outbound|9080||{FQDN}"]) == [
        ("10.0.0.1", 9000, 1),
        ("10.0.0.2", 9081, 3),
        ("10.0.0.3", 9000, 1),
    ]
    assert endpoints(table[f"cla:outbound|9080|v1|{FQDN}"]) == [("10.0.0.1", 9000, 1)]
    assert endpoints(table[f"cla:outbound|9080|v2|{FQDN}"]) == [("10.0.0.2", 9081, 3)]


def test_endpoint_metadata_carries_labels_and_workload_name() -> None:
    table = named(resources_for(REVIEWS_REGISTRY))
    assignment = table[f"cla:outbound|9080||{FQDN}"]
    assert isinstance(assignment, endpoint_pb2.ClusterLoadAssignment)
    first = assignment.endpoints[0].lb_endpoints[0]
    istio = json_format.MessageToDict(first.metadata.filter_metadata["istio"])
    assert istio == {"labels": {"app": "reviews", "version": "v1"}, "workload": "reviews-v1"}


def test_inline_endpoints_and_service_port_number() -> None:
    text = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: default}
spec:
  hosts: [api.example.com]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{number: 443, name: tcp-tls}, {number: 80, name: http}]
  endpoints:
  - {address: 192.0.2.2, ports: {http: 8080}, weight: 5, labels: {zone: b}}
  - {address: 192.0.2.1}
"""
    table = named(resources_for(text))
    assert endpoints(table["cla:outbound|80||api.example.com"]) == [
        ("192.0.2.1", 80, 1),
        ("192.0.2.2", 8080, 5),
    ]
    assert endpoints(table["cla:outbound|443||api.example.com"]) == [
        ("192.0.2.1", 443, 1),
        ("192.0.2.2", 443, 5),
    ]
    assignment = table["cla:outbound|80||api.example.com"]
    assert isinstance(assignment, endpoint_pb2.ClusterLoadAssignment)
    second = assignment.endpoints[0].lb_endpoints[1]
    istio = json_format.MessageToDict(second.metadata.filter_metadata["istio"])
    assert istio == {"labels": {"zone": "b"}, "workload": ""}


def test_workload_entries_in_other_namespaces_are_not_selected() -> None:
    elsewhere = REVIEWS_REGISTRY.split("---\n")[1].replace("namespace: default", "namespace: shop")
    registry = REVIEWS_REGISTRY.split("---\n")[0]
    table = named(resources_for(registry + "---\n" + elsewhere))
    assert endpoints(table[f"cla:outbound|9080||{FQDN}"]) == []


def test_resolution_none_is_an_original_destination_cluster() -> None:
    text = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: passthrough}
spec:
  hosts: [legacy.internal]
  ports: [{number: 8443, name: tcp}]
"""
    resources = resources_for(text)
    (cluster,) = resources.clusters
    assert cluster.name == "outbound|8443||legacy.internal"
    assert cluster.type == cluster_pb2.Cluster.ORIGINAL_DST
    assert cluster.lb_policy == cluster_pb2.Cluster.CLUSTER_PROVIDED
    assert resources.endpoints == ()
