"""DestinationRule loadBalancer -> Cluster.lb_policy / ring_hash_lb_config and RouteAction.hash_policy."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf import text_format

from control.translate import NodeInfo, load_text, translate
from tests.control.test_translate_envoy import WEIGHTED_VS
from tests.control.translate_fixtures import named, problems_of

RATINGS = "ratings.default.svc.cluster.local"
SIDECAR = (
    "---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: all}\n"
    "spec:\n  egress:\n  - port: {number: 9080, name: http}\n    hosts: ['*/*']\n"
)
ROUND_ROBIN = "  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}\n"


def with_policy(policy: str, subsets: str | None = None, vs: bool = True) -> str:
    text = WEIGHTED_VS.replace(ROUND_ROBIN, policy)
    if subsets is not None:
        text = text.replace(
            "  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]\n", subsets
        )
    if not vs:
        text = text.split("---\n", 1)[1]
    return text + SIDECAR


def build(text: str) -> dict[str, object]:
    return named(translate(load_text(text), NodeInfo()))


def cluster(table: dict[str, object], subset: str = "") -> cluster_pb2.Cluster:
    c = table[f"outbound|9080|{subset}|{RATINGS}"]
    assert isinstance(c, cluster_pb2.Cluster)
    return c


def hash_policies(table: dict[str, object]) -> list[str]:
    rc = table["route:9080"]
    assert isinstance(rc, route_pb2.RouteConfiguration)
    (vh,) = [v for v in rc.virtual_hosts if v.name == f"{RATINGS}:9080"]
    return [text_format.MessageToString(h, as_one_line=True) for r in vh.routes for h in r.route.hash_policy]


@pytest.mark.parametrize(
    ("simple", "expected"),
    [
        ("ROUND_ROBIN", cluster_pb2.Cluster.ROUND_ROBIN),
        ("LEAST_REQUEST", cluster_pb2.Cluster.LEAST_REQUEST),
        ("LEAST_CONN", cluster_pb2.Cluster.LEAST_REQUEST),
        ("RANDOM", cluster_pb2.Cluster.RANDOM),
    ],
)
def test_simple_policies(simple: str, expected: int) -> None:
    table = build(with_policy(f"  trafficPolicy: {{loadBalancer: {{simple: {simple}}}}}\n"))
    for subset in ("", "v1", "v2"):
        assert cluster(table, subset).lb_policy == expected
    assert hash_policies(table) == []


def test_passthrough_and_maglev_are_refused() -> None:
    found = problems_of(with_policy("  trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}\n"))
    assert [(p.field, p.message) for p in found] == [
        ("spec.trafficPolicy.loadBalancer.simple", "PASSTHROUGH is not supported yet")
    ]
    found = problems_of(
        with_policy("  trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true, maglev: {}}}}\n")
    )
    assert [(p.field, p.message) for p in found] == [
        ("spec.trafficPolicy.loadBalancer.consistentHash.maglev", "not supported yet")
    ]


@pytest.mark.parametrize(
    ("hash_yaml", "expected"),
    [
        ("{httpHeaderName: x-user}", 'header { header_name: "x-user" }'),
        ("{useSourceIp: true}", "connection_properties { source_ip: true }"),
        ("{httpQueryParameterName: user}", 'query_parameter { name: "user" }'),
        (
            "{httpCookie: {name: session, path: /, ttl: 10s}}",
            'cookie { name: "session" ttl { seconds: 10 } path: "/" }',
        ),
    ],
)
def test_consistent_hash_sources(hash_yaml: str, expected: str) -> None:
    table = build(with_policy(f"  trafficPolicy: {{loadBalancer: {{consistentHash: {hash_yaml}}}}}\n"))
    assert cluster(table).lb_policy == cluster_pb2.Cluster.RING_HASH
    assert not cluster(table).HasField("ring_hash_lb_config")
    # The weighted route (two matches) to v1/v2 carries the hash policy.
    assert hash_policies(table) == [expected, expected]


def test_minimum_ring_size_and_default_route() -> None:
    policy = "  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-u, ringHash: {minimumRingSize: 64}}}}\n"
    table = build(with_policy(policy, vs=False))
    assert cluster(table).ring_hash_lb_config.minimum_ring_size.value == 64
    assert hash_policies(table) == ['header { header_name: "x-u" }']  # the default "/" route
    policy = "  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-u, minimumRingSize: 32}}}\n"
    assert cluster(build(with_policy(policy, vs=False))).ring_hash_lb_config.minimum_ring_size.value == 32


def test_subset_and_port_level_override() -> None:
    subsets = (
        "  subsets:\n"
        "  - {name: v1, labels: {version: v1}, trafficPolicy: {loadBalancer: {simple: RANDOM}}}\n"
        "  - name: v2\n    labels: {version: v2}\n"
        "    trafficPolicy:\n      portLevelSettings:\n"
        "      - {port: {number: 9080}, loadBalancer: {consistentHash: {httpHeaderName: x-v2}}}\n"
    )
    table = build(with_policy("  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}\n", subsets))
    assert cluster(table).lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    assert cluster(table, "v1").lb_policy == cluster_pb2.Cluster.RANDOM
    assert cluster(table, "v2").lb_policy == cluster_pb2.Cluster.RING_HASH
    # The weighted route mixes v1 (no hash) and v2 (hash): the first hash policy found is used.
    assert hash_policies(table) == ['header { header_name: "x-v2" }'] * 2


def test_bad_consistent_hash() -> None:
    found = problems_of(with_policy("  trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: false}}}\n"))
    assert [p.field for p in found] == ["spec.trafficPolicy.loadBalancer.consistentHash.useSourceIp"]
    found = problems_of(
        with_policy("  trafficPolicy: {loadBalancer: {simple: RANDOM, consistentHash: {useSourceIp: true}}}\n")
    )
    assert [p.field for p in found] == ["spec.trafficPolicy.loadBalancer"]
