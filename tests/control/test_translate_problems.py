"""Every kind of configuration mistake names its file, resource, field (and line)."""

from __future__ import annotations

from pathlib import Path

import pytest

from control.translate import ConfigError, NodeInfo, load_dir, load_text, translate
from tests.control.translate_fixtures import (
    REVIEWS_REGISTRY,
    only_problem,
    problems_of,
    seed_reviews,
)

SE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: data}
spec:
  hosts: [db.data.svc.cluster.local]
  resolution: STATIC
  ports:
  - number: 5432
    name: tcp-postgres
  endpoints:
  - address: 10.1.0.1
"""


def test_unknown_nested_field() -> None:
    text = seed_reviews().replace(
        "        subset: v2\n", "        subset: v2\n        sbuset: v3\n"
    )
    problem = only_problem(text + "---\n" + REVIEWS_REGISTRY)
    assert problem.file == "mesh.yaml"
    assert problem.resource == "VirtualService default/reviews"
    assert problem.field == "spec.http[0].route[0].destination.sbuset"
    assert problem.message == "unknown field"
    assert problem.line == 17


def test_unknown_top_level_and_metadata_fields() -> None:
    found = problems_of(
        SE.replace("spec:", "status: {}\nspec:").replace(
            "namespace: data}", "namespace: data, uid: x}"
        )
    )
    assert sorted((p.field, p.message) for p in found) == [
        ("metadata.uid", "unknown field"),
        ("status", "unknown field"),
    ]


def test_wrong_type_port_number() -> None:
    problem = only_problem(SE.replace("number: 5432", 'number: "5432"'))
    assert (problem.resource, problem.field) == ("ServiceEntry data/db", "spec.ports[0].number")
    assert problem.message == "expected an integer, got string '5432'"
    assert problem.line == 8


def test_wrong_type_weight() -> None:
    text = seed_reviews().replace(
        "        subset: v1\n", "        subset: v1\n      weight: heavy\n"
    )
    problem = only_problem(text + "---\n" + REVIEWS_REGISTRY)
    assert problem.field == "spec.http[1].route[0].weight"
    assert problem.message == "expected an integer, got string 'heavy'"


def test_out_of_range_port() -> None:
    problem = only_problem(SE.replace("number: 5432", "number: 70000"))
    assert problem.field == "spec.ports[0].number"
    assert problem.message == "70000 is out of range [1, 65535]"


def test_unknown_kind() -> None:
    problem = only_problem(
        "apiVersion: networking.istio.io/v1\nkind: VirtualServce\nmetadata: {name: x}\n"
    )
    assert (problem.file, problem.resource, problem.field) == (
        "mesh.yaml",
        "VirtualServce default/x",
        "kind",
    )
    assert problem.message.startswith(
        "unknown kind 'VirtualServce'; expected one of AuthorizationPolicy"
    )


def test_known_but_unsupported_kind() -> None:
    problem = only_problem(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\n"
    )
    assert problem.message == "kind Gateway is not supported yet"


def test_document_that_is_not_a_mapping() -> None:
    problem = only_problem("---\n- a\n- b\n")
    assert (problem.resource, problem.field) == ("document 1", "")
    assert (
        problem.message == "expected a mapping with apiVersion, kind, metadata and spec, got list"
    )


def test_wrong_api_version_for_the_kind() -> None:
    problem = only_problem(SE.replace("networking.istio.io/v1", "security.istio.io/v1"))
    assert problem.field == "apiVersion"
    assert problem.message.startswith(
        "'security.istio.io/v1' is not one of networking.istio.io/v1alpha3"
    )


def test_missing_name() -> None:
    problem = only_problem(
        SE.replace("metadata: {name: db, namespace: data}", "metadata: {namespace: data}")
    )
    assert (problem.resource, problem.field) == ("ServiceEntry (document 1)", "metadata.name")
    assert problem.message == "required field is missing"


def test_duplicate_resource(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(SE)
    (tmp_path / "b.yaml").write_text(SE.replace("10.1.0.1", "10.1.0.2"))
    with pytest.raises(ConfigError) as caught:
        load_dir(tmp_path)
    (problem,) = caught.value.problems
    assert problem.file == str(tmp_path / "b.yaml")
    assert (problem.resource, problem.field) == ("ServiceEntry data/db", "metadata.name")
    assert (
        problem.message == f"duplicate ServiceEntry data/db, first defined in {tmp_path / 'a.yaml'}"
    )


def test_duplicate_yaml_key_is_a_syntax_problem() -> None:
    problem = only_problem(
        SE.replace("  resolution: STATIC\n", "  resolution: STATIC\n  resolution: NONE\n")
    )
    assert problem.resource == ""
    assert problem.line == 7
    assert "duplicate key 'resolution'" in problem.message


def test_unknown_host() -> None:
    text = seed_reviews()  # no ServiceEntry declares reviews
    found = problems_of(text)
    assert [(p.resource, p.field) for p in found] == [
        ("DestinationRule default/reviews", "spec.host"),
        ("VirtualService default/reviews", "spec.hosts[0]"),
        ("VirtualService default/reviews", "spec.http[0].route[0].destination.host"),
        ("VirtualService default/reviews", "spec.http[1].route[0].destination.host"),
    ]
    assert found[0].message == (
        "no ServiceEntry declares host 'reviews' (nor reviews.default.svc.cluster.local)"
    )


def test_unknown_destination_host_only() -> None:
    text = seed_reviews().replace(
        "        host: reviews\n        subset: v1", "        host: ratings\n        subset: v1"
    )
    problem = only_problem(text + "---\n" + REVIEWS_REGISTRY)
    assert (problem.resource, problem.field) == (
        "VirtualService default/reviews",
        "spec.http[1].route[0].destination.host",
    )
    assert (
        problem.message
        == "no ServiceEntry declares host 'ratings' (nor ratings.default.svc.cluster.local)"
    )


def test_unknown_subset() -> None:
    text = seed_reviews().replace("subset: v2", "subset: v9")
    problem = only_problem(text + "---\n" + REVIEWS_REGISTRY)
    assert (problem.resource, problem.field) == (
        "VirtualService default/reviews",
        "spec.http[0].route[0].destination.subset",
    )
    assert problem.message == (
        "no DestinationRule for host reviews.default.svc.cluster.local defines subset 'v9'"
    )


def test_yaml_syntax_error_names_file_and_line() -> None:
    problem = only_problem(
        "apiVersion: v1\nkind: ServiceEntry\nspec:\n  hosts: [a, b\n  ports: x\n", "broken.yaml"
    )
    assert problem.file == "broken.yaml"
    assert problem.resource == "" and problem.field == ""
    assert problem.line == 5
    assert problem.message.startswith("invalid YAML: ")
    assert str(problem).startswith("broken.yaml:5: invalid YAML: ")


def test_a_syntax_error_does_not_cause_follow_on_host_problems(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(seed_reviews())
    (tmp_path / "b.yaml").write_text(REVIEWS_REGISTRY + "---\nkind: [\n")
    with pytest.raises(ConfigError) as caught:
        load_dir(tmp_path)
    (problem,) = caught.value.problems
    assert problem.file.endswith("b.yaml")


def test_a_broken_service_entry_does_not_cause_follow_on_host_problems() -> None:
    registry = REVIEWS_REGISTRY.replace("resolution: STATIC", "resolution: STAITC")
    problem = only_problem(seed_reviews() + "---\n" + registry)
    assert (problem.resource, problem.field) == ("ServiceEntry default/reviews", "spec.resolution")


def test_dns_resolution_is_not_supported_yet() -> None:
    problem = only_problem(SE.replace("resolution: STATIC", "resolution: DNS"))
    assert (problem.file, problem.resource, problem.field) == (
        "mesh.yaml",
        "ServiceEntry data/db",
        "spec.resolution",
    )
    assert problem.message == "DNS is not supported yet"


@pytest.mark.parametrize("protocol", ["HTTPS", "TLS", "MONGO", "redis", "HTTP_PROXY"])
def test_unsupported_protocol(protocol: str) -> None:
    problem = only_problem(
        SE.replace("name: tcp-postgres", f"name: tcp-postgres\n    protocol: {protocol}")
    )
    assert (problem.resource, problem.field) == ("ServiceEntry data/db", "spec.ports[0].protocol")
    assert problem.message == f"protocol {protocol} is not supported yet"


def test_unknown_protocol() -> None:
    problem = only_problem(
        SE.replace("name: tcp-postgres", "name: tcp-postgres\n    protocol: QUIC")
    )
    assert problem.message.startswith("unknown protocol 'QUIC'; Istio defines")


def test_unsupported_protocol_on_a_sidecar_port() -> None:
    sidecar = (
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: s}\n"
        "spec:\n  egress:\n  - port: {number: 9080, protocol: TLS}\n    hosts: ['*/*']\n"
    )
    problem = only_problem(sidecar)
    assert (problem.resource, problem.field) == (
        "Sidecar default/s",
        "spec.egress[0].port.protocol",
    )
    assert problem.message == "protocol TLS is not supported yet"


@pytest.mark.parametrize(
    ("field", "yaml"),
    [
        ("retries.retryRemoteLocalities", "retries: {attempts: 3, retryRemoteLocalities: true}"),
        ("fault.delay.exponentialDelay", "fault: {delay: {exponentialDelay: 1s}}"),
        ("fault.abort.http2Error", "fault: {abort: {http2Error: CANCEL}}"),
        ("redirect.derivePort", "redirect: {derivePort: FROM_REQUEST_PORT}"),
        ("corsPolicy", "corsPolicy: {}"),
        ("delegate", "delegate: {name: other}"),
    ],
)
def test_unsupported_http_route_features(field: str, yaml: str) -> None:
    text = seed_reviews().replace("  - route:\n", f"  - {yaml}\n    route:\n")
    found = problems_of(text + "---\n" + REVIEWS_REGISTRY)
    assert any(
        (p.resource, p.field) == ("VirtualService default/reviews", f"spec.http[1].{field}")
        and "not supported yet" in p.message
        for p in found
    ), found


def test_unsupported_match_feature_and_traffic_policy() -> None:
    text = seed_reviews().replace(
        "    - headers:\n", "    - gateways: [mesh]\n      headers:\n"
    )
    text = text.replace(
        "  subsets:\n",
        "  trafficPolicy:\n    tunnel: {}\n    loadBalancer: {simple: PASSTHROUGH}\n  subsets:\n",
    )
    found = problems_of(text + "---\n" + REVIEWS_REGISTRY)
    assert sorted((p.field, p.message) for p in found) == [
        ("spec.http[0].match[0].gateways", "not supported yet"),
        ("spec.trafficPolicy.loadBalancer.simple", "PASSTHROUGH is not supported yet"),
        ("spec.trafficPolicy.tunnel", "not supported yet"),
    ]


def test_round_robin_traffic_policy_is_accepted() -> None:
    text = seed_reviews().replace(
        "  subsets:\n", "  trafficPolicy:\n    loadBalancer: {simple: ROUND_ROBIN}\n  subsets:\n"
    )
    assert load_text(text + "---\n" + REVIEWS_REGISTRY).destination_rules


def test_gateways_other_than_mesh() -> None:
    text = seed_reviews().replace(
        "  hosts:\n  - reviews\n", "  hosts:\n  - reviews\n  gateways: [mesh, web-gw]\n"
    )
    problem = only_problem(text + "---\n" + REVIEWS_REGISTRY)
    assert problem.field == "spec.gateways[1]"
    assert problem.message == "gateway 'web-gw' is not supported yet; only mesh (the sidecars) is"


def test_string_match_needs_exactly_one_kind() -> None:
    text = seed_reviews().replace("exact: jason", "exact: jason\n          prefix: ja")
    problem = only_problem(text + "---\n" + REVIEWS_REGISTRY)
    assert problem.field == "spec.http[0].match[0].headers.end-user"
    assert problem.message == "exactly one of exact, prefix, regex must be set"


def test_bad_timeout() -> None:
    text = seed_reviews().replace("  - route:\n", "  - timeout: soon\n    route:\n")
    problem = only_problem(text + "---\n" + REVIEWS_REGISTRY)
    assert problem.field == "spec.http[1].timeout"
    assert problem.message == (
        'expected a duration string such as "10s", "1.5s" or "100ms", got string \'soon\''
    )


def test_regex_that_re2_would_refuse() -> None:
    text = seed_reviews().replace(
        "  - route:\n", "  - match:\n    - uri: {regex: '/(?=x)'}\n    route:\n"
    )
    problem = only_problem(text + "---\n" + REVIEWS_REGISTRY)
    assert problem.field == "spec.http[1].match[0].uri.regex"
    assert problem.message == "lookaround and backreferences are not RE2 syntax (Envoy uses RE2)"


def test_several_tcp_destinations_need_weights() -> None:
    vs = (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: db, namespace: data}\n"
        "spec:\n  hosts: [db.data.svc.cluster.local]\n  tcp:\n  - route:\n"
        "    - {destination: {host: db.data.svc.cluster.local}}\n"
        "    - {destination: {host: db.data.svc.cluster.local}}\n"
    )
    problem = only_problem(SE + "---\n" + vs)
    assert (problem.resource, problem.field) == ("VirtualService data/db", "spec.tcp[0].route")
    assert problem.message.startswith("several destinations need weights")


def test_service_entry_rules() -> None:
    text = SE.replace("  resolution: STATIC\n", "  resolution: NONE\n").replace(
        "  - address: 10.1.0.1\n", "  - address: db.example.com\n    ports: {grpc: 1}\n"
    )
    found = problems_of(text)
    assert sorted((p.field, p.message) for p in found) == [
        (
            "spec.endpoints",
            "endpoints need resolution STATIC (NONE forwards to the original destination)",
        ),
        (
            "spec.endpoints[0].address",
            "'db.example.com' is not an IP address (hostnames need resolution DNS, which is not supported yet)",
        ),
        ("spec.endpoints[0].ports.grpc", "no port named 'grpc' in spec.ports"),
    ]


def test_host_declared_by_two_service_entries() -> None:
    other = SE.replace("name: db,", "name: db2,")
    problem = only_problem(SE + "---\n" + other)
    assert (problem.resource, problem.field) == ("ServiceEntry data/db2", "spec.hosts[0]")
    assert (
        problem.message
        == "host db.data.svc.cluster.local is already declared by ServiceEntry data/db in mesh.yaml"
    )


def test_sidecar_rules() -> None:
    sidecar = """\
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: s}
spec:
  ingress:
  - port: {number: 9080, name: http}
    defaultEndpoint: unix:///var/run/app.sock
  - port: {number: 9081, name: http}
    defaultEndpoint: 10.0.0.1:8080
    captureMode: IPTABLES
  egress:
  - port: {number: 9080, name: http}
    hosts: ["*/*"]
  - hosts: ["reviews"]
    bind: 127.0.0.9
"""
    found = problems_of(sidecar)
    assert [(p.field, p.message) for p in found] == [
        ("spec.ingress[1].captureMode", "IPTABLES is not supported yet"),
    ]
    found = problems_of(sidecar.replace("    captureMode: IPTABLES\n", ""))
    assert [(p.field, p.message) for p in found] == [
        ("spec.ingress[0].defaultEndpoint", "unix domain socket endpoints are not supported yet"),
        (
            "spec.ingress[1].defaultEndpoint",
            "'10.0.0.1:8080' must be 127.0.0.1:PORT or 0.0.0.0:PORT",
        ),
        (
            "spec.egress[0].port.number",
            "127.0.0.1:9080 conflicts with spec.ingress[0] (0.0.0.0:9080)",
        ),
        ("spec.egress[1].bind", "bind needs a port"),
        ("spec.egress[1].hosts[0]", "'reviews' must be namespace/host, such as ./* or */*"),
    ]


def test_two_selectorless_sidecars_in_one_namespace() -> None:
    sidecar = (
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: NAME}\nspec: {}\n"
    )
    problem = only_problem(sidecar.replace("NAME", "a") + "---\n" + sidecar.replace("NAME", "b"))
    assert (problem.resource, problem.field) == ("Sidecar default/b", "spec.workloadSelector")


def test_all_problems_are_reported_at_once() -> None:
    text = SE.replace("number: 5432", 'number: "5432"') + "---\nkind: Nope\nmetadata: {name: n}\n"
    text += "---\n" + SE.replace("name: db,", "name: db3,").replace(
        "resolution: STATIC", "resolution: DNS"
    )
    found = problems_of(text)
    assert [(p.resource, p.field) for p in found] == [
        ("Nope default/n", "kind"),
        ("ServiceEntry data/db", "spec.ports[0].number"),
        ("ServiceEntry data/db3", "spec.resolution"),
    ]


def test_translate_time_problem_names_the_sidecar_field() -> None:
    sidecar = (
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: s, namespace: data}\n"
        "spec:\n  egress:\n  - port: {number: 3306, name: tcp-mysql}\n    hosts: ['*/*']\n"
    )
    config = load_text(SE + "---\n" + sidecar, "mesh.yaml")
    with pytest.raises(ConfigError) as caught:
        translate(config, NodeInfo(namespace="data"))
    (problem,) = caught.value.problems
    assert (problem.file, problem.resource, problem.field) == (
        "mesh.yaml",
        "Sidecar data/s",
        "spec.egress[0].hosts",
    )
    assert problem.message == "no visible ServiceEntry host has port 3306"
