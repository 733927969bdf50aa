"""VirtualService -> RouteConfiguration: the seed's header routing, domains, weights, timeouts."""

from __future__ import annotations

from envoy.config.route.v3 import route_pb2
from google.protobuf import duration_pb2

from control.translate import ConfigError, NodeInfo, load_text, translate
from tests.control.translate_fixtures import (
    PRODUCTPAGE_SIDECAR,
    REVIEWS_REGISTRY,
    seed_reviews,
)

FQDN = "reviews.default.svc.cluster.local"
PRODUCTPAGE = NodeInfo(namespace="default", labels={"app": "productpage"}, name="productpage-1")


def route_table(text: str, node: NodeInfo = PRODUCTPAGE) -> route_pb2.RouteConfiguration:
    resources = translate(load_text(text), node)
    (table,) = resources.routes
    return table


def test_seed_header_match_goes_to_v2_and_everything_else_to_v1() -> None:
    table = route_table(seed_reviews() + "---\n" + REVIEWS_REGISTRY + "---\n" + PRODUCTPAGE_SIDECAR)
    assert table.name == "9080"
    (vhost,) = table.virtual_hosts
    assert vhost.name == f"{FQDN}:9080"
    jason, default = vhost.routes
    assert jason.name == "reviews.0"
    assert jason.match.prefix == "/"
    (header,) = jason.match.headers
    assert header.name == "end-user"
    assert header.string_match.exact == "jason"
    assert jason.route.cluster == f"outbound|9080|v2|{FQDN}"
    assert default.name == "reviews.1"
    assert default.match.prefix == "/" and not default.match.headers
    assert default.route.cluster == f"outbound|9080|v1|{FQDN}"


def test_domains_include_short_names_in_the_same_namespace() -> None:
    table = route_table(seed_reviews() + "---\n" + REVIEWS_REGISTRY + "---\n" + PRODUCTPAGE_SIDECAR)
    assert list(table.virtual_hosts[0].domains) == [
        FQDN,
        f"{FQDN}:9080",
        "reviews",
        "reviews:9080",
        "reviews.default",
        "reviews.default:9080",
        "reviews.default.svc",
        "reviews.default.svc:9080",
    ]


def test_domains_from_another_namespace_omit_the_bare_name() -> None:
    sidecar = PRODUCTPAGE_SIDECAR.replace("namespace: default", "namespace: shop").replace(
        '"./*"', '"*/*"'
    )
    table = route_table(
        REVIEWS_REGISTRY + "---\n" + sidecar,
        NodeInfo(namespace="shop", labels={"app": "productpage"}),
    )
    assert list(table.virtual_hosts[0].domains) == [
        FQDN,
        f"{FQDN}:9080",
        "reviews.default",
        "reviews.default:9080",
        "reviews.default.svc",
        "reviews.default.svc:9080",
    ]


def test_a_literal_short_host_keeps_its_domain() -> None:
    literal = (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: short}\n"
        "spec:\n  hosts: [reviews]\n  resolution: STATIC\n  ports: [{number: 9080, name: http}]\n"
        "  endpoints: [{address: 10.9.9.9}]\n"
    )
    table = route_table(REVIEWS_REGISTRY + "---\n" + literal + "---\n" + PRODUCTPAGE_SIDECAR)
    domains = {vhost.name: list(vhost.domains) for vhost in table.virtual_hosts}
    assert domains["reviews:9080"] == ["reviews", "reviews:9080"]
    assert "reviews" not in domains[f"{FQDN}:9080"]
    assert "reviews.default" in domains[f"{FQDN}:9080"]


def test_without_a_virtual_service_one_default_route() -> None:
    table = route_table(REVIEWS_REGISTRY + "---\n" + PRODUCTPAGE_SIDECAR)
    (route,) = table.virtual_hosts[0].routes
    assert route.name == "default"
    assert route.match.prefix == "/"
    assert route.route.cluster == f"outbound|9080||{FQDN}"
    # Istio disables the route timeout unless a VirtualService sets one (Envoy's default is 15 s).
    assert route.route.HasField("timeout") and route.route.timeout.ToNanoseconds() == 0


VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews-split}
spec:
  hosts: [reviews]
  http:
  - name: api
    match:
    - uri: {prefix: /api}
    - uri: {exact: /health}
      headers:
        x-canary: {regex: "yes|true"}
    timeout: 1.5s
    route:
    - destination: {host: reviews, subset: v1}
      weight: 90
    - destination: {host: reviews, subset: v2}
      weight: 10
    - destination: {host: reviews, subset: v3}
      weight: 0
  - match:
    - uri: {regex: "/items/[0-9]+"}
    timeout: 100ms
    route:
    - destination: {host: reviews.default.svc.cluster.local, port: {number: 9080}}
"""
DR = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews.default.svc.cluster.local
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
"""


def test_matches_weights_and_timeouts() -> None:
    table = route_table(
        VS + "---\n" + DR + "---\n" + REVIEWS_REGISTRY + "---\n" + PRODUCTPAGE_SIDECAR
    )
    prefix, exact, regex = table.virtual_hosts[0].routes
    assert [prefix.name, exact.name, regex.name] == [
        "reviews-split.api",
        "reviews-split.api",
        "reviews-split.1",
    ]
    assert prefix.match.prefix == "/api"
    assert exact.match.path == "/health"
    assert exact.match.headers[0].name == "x-canary"
    assert exact.match.headers[0].string_match.safe_regex.regex == "yes|true"
    assert regex.match.safe_regex.regex == "/items/[0-9]+"
    weighted = prefix.route.weighted_clusters.clusters
    assert [(c.name, c.weight.value) for c in weighted] == [
        (f"outbound|9080|v1|{FQDN}", 90),
        (f"outbound|9080|v2|{FQDN}", 10),
    ]
    assert prefix.route.timeout == duration_pb2.Duration(seconds=1, nanos=500_000_000)
    assert exact.route == prefix.route
    assert regex.route.cluster == f"outbound|9080||{FQDN}"
    assert regex.route.timeout == duration_pb2.Duration(nanos=100_000_000)


def test_no_catch_all_route_is_added_after_a_virtual_service() -> None:
    vs = VS.split("  - match:\n    - uri: {regex")[0]
    table = route_table(
        vs + "---\n" + DR + "---\n" + REVIEWS_REGISTRY + "---\n" + PRODUCTPAGE_SIDECAR
    )
    assert [r.match.prefix or r.match.path for r in table.virtual_hosts[0].routes] == [
        "/api",
        "/health",
    ]


def test_durations_in_minutes_and_combined() -> None:
    for text, expected in (
        ("1m", (60, 0)),
        ("10s", (10, 0)),
        ("1m30s", (90, 0)),
        ("250ms", (0, 250_000_000)),
    ):
        vs = VS.replace("timeout: 1.5s", f"timeout: {text}")
        table = route_table(
            vs + "---\n" + DR + "---\n" + REVIEWS_REGISTRY + "---\n" + PRODUCTPAGE_SIDECAR
        )
        timeout = table.virtual_hosts[0].routes[0].route.timeout
        assert (timeout.seconds, timeout.nanos) == expected


def test_route_to_a_port_the_host_lacks_is_a_translate_problem() -> None:
    sidecar = PRODUCTPAGE_SIDECAR.replace("number: 9080", "number: 9080").replace(
        "  egress:\n", "  egress:\n  - port: {number: 7000, name: http-alt}\n    hosts: ['./*']\n"
    )
    other = (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: alt}\n"
        "spec:\n  hosts: [alt.default.svc.cluster.local]\n  resolution: STATIC\n"
        "  ports: [{number: 7000, name: http}]\n  endpoints: [{address: 10.7.0.1}]\n"
    )
    vs = (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: alt}\n"
        "spec:\n  hosts: [alt]\n  http:\n  - route:\n    - destination: {host: reviews}\n"
    )
    config = load_text(
        REVIEWS_REGISTRY + "---\n" + other + "---\n" + vs + "---\n" + sidecar, "m.yaml"
    )
    try:
        translate(config, PRODUCTPAGE)
    except ConfigError as error:
        (problem,) = error.problems
    else:
        raise AssertionError("expected a ConfigError")
    assert (problem.file, problem.resource, problem.field) == (
        "m.yaml",
        "VirtualService default/alt",
        "spec.http[0].route[0].destination.host",
    )
    assert problem.message.startswith(f"host {FQDN} has no port 7000")


def test_egress_listeners_on_one_port_share_a_route_table_with_merged_hosts() -> None:
    ratings = (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: ratings, namespace: shop}\n"
        "spec:\n  hosts: [ratings.shop.svc.cluster.local]\n  resolution: STATIC\n"
        "  ports: [{number: 9080, name: http}]\n  endpoints: [{address: 10.8.0.1}]\n"
    )
    sidecar = PRODUCTPAGE_SIDECAR.replace(
        "  egress:\n",
        "  egress:\n  - port: {number: 9080, name: http}\n    bind: 127.0.0.2\n    hosts: ['shop/*']\n",
    )
    resources = translate(
        load_text(REVIEWS_REGISTRY + "---\n" + ratings + "---\n" + sidecar), PRODUCTPAGE
    )
    assert [listener.name for listener in resources.listeners] == [
        "0.0.0.0_9090",
        "127.0.0.1_9080",
        "127.0.0.2_9080",
    ]
    (table,) = resources.routes
    assert [vhost.name for vhost in table.virtual_hosts] == [
        "ratings.shop.svc.cluster.local:9080",
        f"{FQDN}:9080",
    ]
