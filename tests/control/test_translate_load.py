"""Loading Istio YAML into a ConfigSet: seeds, directories, defaults, the security flag."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from control.translate import ConfigError, NodeInfo, Problem, load_dir, load_sources, load_text
from control.translate.model import AuthzAction, MatchKind, Protocol, Resolution
from tests.control.translate_fixtures import DATA, REVIEWS_REGISTRY, seed, seed_reviews


def test_seed_virtualservice_and_destinationrule_load_unchanged() -> None:
    config = load_text(seed_reviews() + "---\n" + REVIEWS_REGISTRY)
    (vs,) = config.virtual_services
    (dr,) = config.destination_rules
    fqdn = "reviews.default.svc.cluster.local"
    assert vs.meta.resource == "VirtualService default/reviews"
    assert vs.hosts == (fqdn,)
    first, second = vs.http
    (match,) = first.matches
    assert match.headers[0][0] == "end-user"
    assert match.headers[0][1].kind is MatchKind.EXACT
    assert match.headers[0][1].value == "jason"
    assert [(d.host, d.subset) for d in first.destinations] == [(fqdn, "v2")]
    assert second.matches == ()
    assert [(d.host, d.subset) for d in second.destinations] == [(fqdn, "v1")]
    assert dr.host == fqdn
    assert [(s.name, dict(s.labels)) for s in dr.subsets] == [
        ("v1", {"version": "v1"}),
        ("v2", {"version": "v2"}),
    ]


def test_seed_authorization_policy_loads_unchanged_and_is_enforced() -> None:
    text = seed("seed_authorizationpolicy_allow_get.yaml")
    config = load_text(text, "authz.yaml")
    (policy,) = config.authorization_policies
    assert policy.meta.resource == "AuthorizationPolicy default/allow-get"
    assert policy.action is AuthzAction.ALLOW and policy.selector is None
    (rule,) = policy.rules
    assert rule.sources == () and rule.conditions == ()
    assert [op.methods for op in rule.operations] == [("GET",)]
    assert config.unenforced == ()


def test_security_field_validation_names_the_field() -> None:
    text = seed("seed_authorizationpolicy_allow_get.yaml").replace("methods:", "verbs:")
    with pytest.raises(ConfigError) as caught:
        load_text(text)
    (problem,) = caught.value.problems
    assert problem.field == "spec.rules[0].to[0].operation.verbs"
    assert problem.message == "unknown field"


def test_comment_only_seed_files_are_empty_configs() -> None:
    for name in ("seed_comments_routing.yaml", "seed_comments_sidecar_overhead.yaml"):
        config = load_text(seed(name))
        assert config.service_entries == () and config.sidecars == ()


def test_load_dir_reads_the_seed_files_unchanged(tmp_path: Path) -> None:
    for path in DATA.glob("seed_*.yaml"):
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "registry.yml").write_text(REVIEWS_REGISTRY)
    config = load_dir(tmp_path)
    assert [p.meta.name for p in config.authorization_policies] == ["allow-get"]
    assert len(config.virtual_services) == 1
    assert len(config.workload_entries) == 4
    assert [Path(f).name for f in config.files] == sorted(
        [p.name for p in DATA.glob("seed_*.yaml")] + ["registry.yml"]
    )


def test_load_dir_is_sorted_non_recursive_and_ignores_other_suffixes(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(REVIEWS_REGISTRY)
    (tmp_path / "a.yml").write_text(seed_reviews())
    (tmp_path / "notes.txt").write_text("kind: Nonsense\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.yaml").write_text("kind: Nonsense\n")
    config = load_dir(str(tmp_path))
    assert [Path(f).name for f in config.files] == ["a.yml", "b.yaml"]


def test_load_dir_collects_problems_from_every_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("kind: Nonsense\nmetadata: {name: x}\n")
    (tmp_path / "b.yaml").write_text("kind: Other\nmetadata: {name: y}\n")
    with pytest.raises(ConfigError) as caught:
        load_dir(tmp_path)
    assert [(Path(p.file).name, p.field) for p in caught.value.problems] == [
        ("a.yaml", "kind"),
        ("b.yaml", "kind"),
    ]


def test_load_dir_on_a_missing_directory_is_a_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_dir(tmp_path / "absent")
    (problem,) = caught.value.problems
    assert problem.message == "not a directory"


def test_empty_documents_are_skipped_and_namespace_defaults_to_default() -> None:
    text = "---\n---\n# only a comment\n---\n" + REVIEWS_REGISTRY + "---\n"
    config = load_text(text)
    assert [se.meta.namespace for se in config.service_entries] == ["default"]
    (se,) = config.service_entries
    assert se.resolution is Resolution.STATIC
    assert se.ports[0].protocol is Protocol.HTTP
    assert se.ports[0].target_port == 9000


def test_every_accepted_api_version_loads() -> None:
    for version in ("v1alpha3", "v1beta1", "v1"):
        text = REVIEWS_REGISTRY.replace(
            "networking.istio.io/v1\n", f"networking.istio.io/{version}\n"
        )
        assert len(load_text(text).workload_entries) == 4


def test_mesh_config_defaults_and_values() -> None:
    assert load_text("").mesh.trust_domain == "cluster.local"
    assert load_text("").mesh.root_namespace == "istio-system"
    config = load_text(
        "apiVersion: pillion.io/v1alpha1\nkind: MeshConfig\n"
        "spec:\n  trustDomain: example.org\n  rootNamespace: mesh-root\n"
        "  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n"
    )
    assert config.mesh.trust_domain == "example.org"
    assert config.mesh.root_namespace == "mesh-root"
    assert config.mesh.outbound_mode == "REGISTRY_ONLY"


def test_load_sources_merges_texts_as_one_configuration() -> None:
    config = load_sources([("vs.yaml", seed_reviews()), ("registry.yaml", REVIEWS_REGISTRY)])
    assert config.virtual_services[0].meta.file == "vs.yaml"
    assert config.files == ("vs.yaml", "registry.yaml")


def test_problem_and_config_error_formatting() -> None:
    problem = Problem("a.yaml", "VirtualService default/reviews", "spec.hosts[0]", "bad", line=7)
    assert str(problem) == "a.yaml:7: VirtualService default/reviews: spec.hosts[0]: bad"
    bare = Problem("a.yaml", "", "", "not a directory")
    assert str(bare) == "a.yaml: not a directory"
    error = ConfigError([problem, bare])
    assert str(error).splitlines() == [str(problem), str(bare)]


def test_node_info_labels_are_frozen_and_hashable() -> None:
    labels = {"app": "web"}
    node = NodeInfo(namespace="shop", labels=labels, name="web-1")
    labels["app"] = "changed"
    assert node.labels["app"] == "web"
    with pytest.raises(TypeError):
        node.labels["app"] = "x"  # type: ignore[index]
    assert hash(node) == hash(NodeInfo(namespace="shop", labels={"app": "web"}, name="web-1"))
    assert dict(NodeInfo().labels) == {}


def test_mesh_config_needs_no_api_version_or_metadata() -> None:
    config = load_text("kind: MeshConfig\nspec: {trustDomain: corp.example}\n")
    assert config.mesh.trust_domain == "corp.example"
    assert config.mesh.meta is None


def test_workload_group_parses_template_and_probe() -> None:
    text = """\
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: ratings, namespace: default}
spec:
  metadata:
    labels: {app: ratings}
  template:
    serviceAccount: ratings
    ports: {http: 9080}
  probe:
    periodSeconds: 5
    httpGet: {path: /ready, port: 9080}
"""
    (group,) = load_text(text).workload_groups
    assert dict(group.labels) == {"app": "ratings"}
    assert group.template.service_account == "ratings"
    assert dict(group.template.ports) == {"http": 9080}


def test_telemetry_is_loaded_and_enforced() -> None:
    # Once refused as "not enforced yet"; tests/control/test_translate_telemetry.py covers it.
    text = ("apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: p, namespace: ns}\n"
            "spec: {tracing: [{disableSpanReporting: true}]}\n")
    config = load_text(text)
    assert config.unenforced == () and config.telemetries[0].meta.resource == "Telemetry ns/p"


def test_only_one_mesh_config() -> None:
    text = "kind: MeshConfig\nspec: {}\n---\nkind: MeshConfig\nspec: {rootNamespace: x}\n"
    with pytest.raises(ConfigError) as caught:
        load_text(text, "mesh.yaml")
    (problem,) = caught.value.problems
    assert (problem.resource, problem.field) == ("MeshConfig", "")
    assert problem.message == "only one MeshConfig is allowed; the first is in mesh.yaml"
