"""Mutual TLS: PeerAuthentication modes and inbound listeners, DestinationRule tls, auto mTLS."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from google.protobuf import json_format

from control.translate import ConfigError, NodeInfo, Resources, load_text, translate
from control.translate.model import MtlsMode
from control.translate.security import PeerPolicies
from tests.control.translate_fixtures import named

SERVER = NodeInfo(namespace="shop", labels={"app": "ratings", "version": "v1"}, name="ratings-a")
CLIENT = NodeInfo(namespace="default", labels={"app": "web"})
HOST = "ratings.shop.svc.cluster.local"
URI = common_pb2.SubjectAltNameMatcher.URI
DNS = common_pb2.SubjectAltNameMatcher.DNS

REGISTRY = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {number: 9080, name: http}
  - {number: 3306, name: tcp-db}
  workloadSelector:
    labels: {app: ratings}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ratings-a, namespace: shop}
spec:
  address: 10.1.0.1
  serviceAccount: ratings
  labels: {app: ratings, version: v1, security.istio.io/tlsMode: istio}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ratings-b, namespace: shop}
spec:
  address: 10.1.0.2
  serviceAccount: ratings-v2
  labels: {app: ratings, version: v2, security.istio.io/tlsMode: istio}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ratings-c, namespace: shop}
spec:
  address: 10.1.0.3
  labels: {app: ratings, version: v1}
"""
SERVER_SIDECAR = """\
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: ratings, namespace: shop}
spec:
  workloadSelector:
    labels: {app: ratings}
  ingress:
  - port: {number: 9080, name: http}
    defaultEndpoint: 127.0.0.1:8080
  - port: {number: 3306, name: tcp-db}
    defaultEndpoint: 127.0.0.1:3307
"""
IDENTITIES = [
    "spiffe://cluster.local/ns/shop/sa/default",
    "spiffe://cluster.local/ns/shop/sa/ratings",
    "spiffe://cluster.local/ns/shop/sa/ratings-v2",
]


def peer_auth(
    name: str, namespace: str, mode: str = "", selector: str = "", ports: str = ""
) -> str:
    text = (
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n"
    )
    if selector:
        text += f"  selector:\n    matchLabels: {{{selector}}}\n"
    if mode:
        text += f"  mtls: {{mode: {mode}}}\n"
    if ports:
        text += f"  portLevelMtls: {{{ports}}}\n"
    return text if (selector or mode or ports) else text.replace("spec:\n", "spec: {}\n")


def join(*docs: str) -> str:
    return "---\n".join(docs)


def server_resources(*docs: str) -> Resources:
    return translate(load_text(join(REGISTRY, SERVER_SIDECAR, *docs)), SERVER)


def listener(resources: Resources, port: int) -> listener_pb2.Listener:
    found = named(resources)[f"0.0.0.0_{port}"]
    assert isinstance(found, listener_pb2.Listener)
    return found


def mode_of(resources: Resources, port: int) -> str:
    """The mode an inbound listener's shape says."""
    names = [chain.name for chain in listener(resources, port).filter_chains]
    return {
        ("",): "DISABLE",
        ("tls",): "STRICT",
        ("tls", "plaintext"): "PERMISSIVE",
    }[tuple(names)]


def downstream(chain: object) -> tls_pb2.DownstreamTlsContext:
    context = tls_pb2.DownstreamTlsContext()
    assert chain.transport_socket.name == "envoy.transport_sockets.tls"  # type: ignore[attr-defined]
    assert chain.transport_socket.typed_config.Unpack(context)  # type: ignore[attr-defined]
    return context


def upstream(socket: base_pb2.TransportSocket) -> tls_pb2.UpstreamTlsContext:
    context = tls_pb2.UpstreamTlsContext()
    assert socket.name == "envoy.transport_sockets.tls"
    assert socket.typed_config.Unpack(context)
    return context


def sans(context: tls_pb2.CommonTlsContext) -> list[tuple[int, str, str]]:
    which = context.WhichOneof("validation_context_type")
    if which == "combined_validation_context":
        matchers = context.combined_validation_context.default_validation_context
    else:
        matchers = context.validation_context
    return [
        (
            m.san_type,
            m.matcher.WhichOneof("match_pattern") or "",
            m.matcher.exact or m.matcher.prefix,
        )
        for m in matchers.match_typed_subject_alt_names
    ]


# --- which mode -------------------------------------------------------------------


def test_no_peer_authentication_means_permissive() -> None:
    resources = server_resources()
    assert mode_of(resources, 9080) == mode_of(resources, 3306) == "PERMISSIVE"


@pytest.mark.parametrize(
    ("docs", "expected"),
    [
        # mesh-wide (root namespace, no selector)
        ([peer_auth("mesh", "istio-system", "STRICT")], ("STRICT", "STRICT")),
        # namespace-wide beats mesh-wide
        (
            [peer_auth("mesh", "istio-system", "STRICT"), peer_auth("ns", "shop", "DISABLE")],
            ("DISABLE", "DISABLE"),
        ),
        # a namespace-wide policy of another namespace does not apply
        ([peer_auth("ns", "default", "STRICT")], ("PERMISSIVE", "PERMISSIVE")),
        # workload beats namespace
        (
            [peer_auth("ns", "shop", "DISABLE"), peer_auth("w", "shop", "STRICT", "app: ratings")],
            ("STRICT", "STRICT"),
        ),
        # a selector that does not match the node's labels does not apply
        (
            [peer_auth("ns", "shop", "DISABLE"), peer_auth("w", "shop", "STRICT", "version: v2")],
            ("DISABLE", "DISABLE"),
        ),
        # a selector in another namespace does not apply
        ([peer_auth("w", "default", "STRICT", "app: ratings")], ("PERMISSIVE", "PERMISSIVE")),
        # UNSET at workload level inherits the namespace; UNSET there inherits the mesh
        (
            [
                peer_auth("mesh", "istio-system", "STRICT"),
                peer_auth("ns", "shop", "DISABLE"),
                peer_auth("w", "shop", "UNSET", "app: ratings"),
            ],
            ("DISABLE", "DISABLE"),
        ),
        (
            [
                peer_auth("mesh", "istio-system", "DISABLE"),
                peer_auth("ns", "shop", "UNSET"),
                peer_auth("w", "shop", "", "app: ratings"),
            ],
            ("DISABLE", "DISABLE"),
        ),
        # every level UNSET: PERMISSIVE
        (
            [
                peer_auth("mesh", "istio-system", "UNSET"),
                peer_auth("ns", "shop"),
                peer_auth("w", "shop", "UNSET", "app: ratings"),
            ],
            ("PERMISSIVE", "PERMISSIVE"),
        ),
        # port level overrides the workload's mode for that port only
        (
            [peer_auth("w", "shop", "STRICT", "app: ratings", "9080: {mode: DISABLE}")],
            ("DISABLE", "STRICT"),
        ),
        # port level UNSET inherits the workload's mode, then the namespace's
        (
            [
                peer_auth("ns", "shop", "STRICT"),
                peer_auth("w", "shop", "", "app: ratings", "9080: {mode: UNSET}, '3306': {}"),
            ],
            ("STRICT", "STRICT"),
        ),
        (
            [
                peer_auth("ns", "shop", "STRICT"),
                peer_auth("w", "shop", "", "app: ratings", "'3306': {mode: PERMISSIVE}"),
            ],
            ("STRICT", "PERMISSIVE"),
        ),
    ],
)
def test_mode_precedence(docs: list[str], expected: tuple[str, str]) -> None:
    resources = server_resources(*docs)
    assert (mode_of(resources, 9080), mode_of(resources, 3306)) == expected


def test_mesh_wide_policy_lives_in_the_mesh_config_root_namespace() -> None:
    mesh = "kind: MeshConfig\nspec: {rootNamespace: mesh-root}\n"
    docs = [mesh, peer_auth("old-root", "istio-system", "DISABLE")]
    assert mode_of(server_resources(*docs), 9080) == "PERMISSIVE"
    docs.append(peer_auth("mesh", "mesh-root", "STRICT"))
    assert mode_of(server_resources(*docs), 9080) == "STRICT"


def test_peer_policies_resolve_for_any_workload() -> None:
    config = load_text(
        join(
            peer_auth("mesh", "istio-system", "STRICT"),
            peer_auth("w", "shop", "DISABLE", "app: db", "5432: {mode: PERMISSIVE}"),
        )
    )
    policies = PeerPolicies(config)
    assert policies.mode("shop", {"app": "db"}, 5432) is MtlsMode.PERMISSIVE
    assert policies.mode("shop", {"app": "db"}, 80) is MtlsMode.DISABLE
    assert policies.mode("shop", {"app": "web"}, 5432) is MtlsMode.STRICT
    assert policies.mode("other", {"app": "db"}, 5432) is MtlsMode.STRICT


def test_peer_authentication_is_enforced_not_refused() -> None:
    config = load_text(peer_auth("mesh", "istio-system", "STRICT"))
    (policy,) = config.peer_authentications
    assert (policy.meta.resource, policy.selector, policy.mode) == (
        "PeerAuthentication istio-system/mesh",
        None,
        MtlsMode.STRICT,
    )
    assert config.unenforced == ()


# --- listener shapes --------------------------------------------------------------


def test_strict_listener_shape() -> None:
    mesh = "kind: MeshConfig\nspec: {trustDomain: corp.example}\n"
    resources = server_resources(mesh, peer_auth("mesh", "istio-system", "STRICT"))
    http = listener(resources, 9080)
    (inspector,) = http.listener_filters
    assert inspector.name == "envoy.filters.listener.tls_inspector"
    assert inspector.typed_config.Is(tls_inspector_pb2.TlsInspector.DESCRIPTOR)
    (chain,) = http.filter_chains
    assert chain.name == "tls"
    assert chain.filter_chain_match.transport_protocol == "tls"
    assert list(chain.filter_chain_match.ListFields()) == [
        (chain.filter_chain_match.DESCRIPTOR.fields_by_name["transport_protocol"], "tls")
    ]
    assert [f.name for f in chain.filters] == ["envoy.filters.network.http_connection_manager"]
    context = downstream(chain)
    assert context.require_client_certificate.value is True
    common = context.common_tls_context
    assert list(common.alpn_protocols) == ["h2", "http/1.1"]  # inbound HTTP: both, as Istio
    (cert,) = common.tls_certificate_sds_secret_configs
    assert cert.name == "default" and cert.sds_config.HasField("ads")
    roots = common.combined_validation_context.validation_context_sds_secret_config
    assert roots.name == "ROOTCA" and roots.sds_config.HasField("ads")
    assert sans(common) == [(URI, "prefix", "spiffe://corp.example/")]
    tcp = listener(resources, 3306)
    (tcp_chain,) = tcp.filter_chains
    assert [f.name for f in tcp_chain.filters] == ["envoy.filters.network.tcp_proxy"]
    assert list(downstream(tcp_chain).common_tls_context.alpn_protocols) == []


def test_permissive_listener_shape() -> None:
    resources = server_resources(peer_auth("ns", "shop", "PERMISSIVE"))
    http = listener(resources, 9080)
    assert [f.name for f in http.listener_filters] == ["envoy.filters.listener.tls_inspector"]
    tls, plaintext = http.filter_chains
    assert (tls.name, tls.filter_chain_match.transport_protocol) == ("tls", "tls")
    assert (plaintext.name, plaintext.filter_chain_match.transport_protocol) == (
        "plaintext",
        "raw_buffer",
    )
    assert not plaintext.HasField("transport_socket")
    assert list(tls.filters) == list(plaintext.filters)
    assert sans(downstream(tls).common_tls_context) == [(URI, "prefix", "spiffe://cluster.local/")]


def test_disable_listener_is_unchanged_plaintext() -> None:
    resources = server_resources(peer_auth("ns", "shop", "DISABLE"))
    http = listener(resources, 9080)
    assert len(http.listener_filters) == 0
    (chain,) = http.filter_chains
    assert not chain.name and not chain.HasField("filter_chain_match")
    assert not chain.HasField("transport_socket")
    assert [f.name for f in chain.filters] == ["envoy.filters.network.http_connection_manager"]


# --- problems ------------------------------------------------------------------------


def only_problem(text: str) -> tuple[str, str, str, str]:
    with pytest.raises(ConfigError) as caught:
        load_text(text, "pa.yaml")
    (problem,) = caught.value.problems
    return problem.file, problem.resource, problem.field, problem.message


def test_port_level_mtls_needs_a_selector() -> None:
    assert only_problem(peer_auth("ns", "shop", "STRICT", ports="8080: {mode: DISABLE}")) == (
        "pa.yaml",
        "PeerAuthentication shop/ns",
        "spec.portLevelMtls",
        "portLevelMtls needs a selector with matchLabels (port-level modes apply to one "
        "workload's ports, not to a whole namespace or the mesh)",
    )


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ("{mtls: {mode: STRICT, strict: true}}", "spec.mtls.strict", "unknown field"),
        (
            "{mtls: {mode: strict}}",
            "spec.mtls.mode",
            "'strict' is not one of UNSET, DISABLE, PERMISSIVE, STRICT",
        ),
        (
            "{mtls: {mode: STRICT}, targetRef: {kind: Service, name: x}}",
            "spec.targetRef",
            "unknown field",
        ),
        (
            "{selector: {matchLabels: {app: a}}, portLevelMtls: {http: {mode: STRICT}}}",
            "spec.portLevelMtls.http",
            "expected a port number (1-65535) as key, got string 'http'",
        ),
        (
            "{selector: {matchLabels: {app: a}}, portLevelMtls: {70000: {mode: STRICT}}}",
            "spec.portLevelMtls.70000",
            "expected a port number (1-65535) as key, got integer 70000",
        ),
        (
            "{selector: {matchLabels: {app: a}}, portLevelMtls: {80: {mode: STRICT}, '80': {}}}",
            "spec.portLevelMtls.80",
            "port 80 is listed twice",
        ),
    ],
)
def test_peer_authentication_field_problems(spec: str, field: str, message: str) -> None:
    text = (
        "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\n"
        f"metadata: {{name: p, namespace: shop}}\nspec: {spec}\n"
    )
    assert only_problem(text) == ("pa.yaml", "PeerAuthentication shop/p", field, message)


def test_one_namespace_wide_peer_authentication_per_namespace() -> None:
    text = join(peer_auth("a", "shop", "STRICT"), peer_auth("b", "shop", "DISABLE"))
    assert only_problem(text)[1:] == (
        "PeerAuthentication shop/b",
        "spec.selector",
        "PeerAuthentication shop/a already applies to every workload in namespace shop; "
        "only one PeerAuthentication without selector is allowed per namespace",
    )


def test_several_peer_authentications_selecting_a_workload() -> None:
    config = load_text(
        join(
            REGISTRY,
            SERVER_SIDECAR,
            peer_auth("by-app", "shop", "STRICT", "app: ratings"),
            peer_auth("by-version", "shop", "DISABLE", "version: v1"),
        ),
        "mesh.yaml",
    )
    with pytest.raises(ConfigError) as caught:
        translate(config, SERVER)
    (problem,) = caught.value.problems
    assert (problem.file, problem.resource, problem.field) == (
        "mesh.yaml",
        "PeerAuthentication shop/by-version",
        "spec.selector",
    )
    assert problem.message.startswith(
        "several PeerAuthentications select this workload (ratings-a in shop): "
        "PeerAuthentication shop/by-app and this one"
    )
    # a workload only one of them selects is fine
    translate(config, NodeInfo(namespace="shop", labels={"app": "ratings", "version": "v2"}))


# --- outbound: auto mTLS -----------------------------------------------------------


def client_table(*docs: str) -> dict[str, object]:
    return named(translate(load_text(join(REGISTRY, *docs)), CLIENT))


def cluster_of(table: dict[str, object], port: int = 9080, subset: str = "") -> cluster_pb2.Cluster:
    found = table[f"outbound|{port}|{subset}|{HOST}"]
    assert isinstance(found, cluster_pb2.Cluster)
    return found


def socket_metadata(
    table: dict[str, object], port: int = 9080, subset: str = ""
) -> dict[str, object]:
    """Endpoint address -> its envoy.transport_socket_match metadata (None when absent)."""
    assignment = table[f"cla:outbound|{port}|{subset}|{HOST}"]
    assert isinstance(assignment, endpoint_pb2.ClusterLoadAssignment)
    result: dict[str, object] = {}
    for endpoint in assignment.endpoints[0].lb_endpoints:
        metadata = endpoint.metadata.filter_metadata
        assert "istio" in metadata
        match = metadata.get("envoy.transport_socket_match")
        address = endpoint.endpoint.address.socket_address.address
        result[address] = json_format.MessageToDict(match) if match is not None else None
    return result


def test_auto_mtls_socket_matches_and_endpoint_metadata() -> None:
    table = client_table()
    cluster = cluster_of(table)
    assert not cluster.HasField("transport_socket")
    istio, disabled = cluster.transport_socket_matches
    assert (istio.name, json_format.MessageToDict(istio.match)) == (
        "tlsMode-istio",
        {"tlsMode": "istio"},
    )
    assert (disabled.name, json_format.MessageToDict(disabled.match)) == ("tlsMode-disabled", {})
    assert disabled.transport_socket.name == "envoy.transport_sockets.raw_buffer"
    assert disabled.transport_socket.typed_config.Is(raw_buffer_pb2.RawBuffer.DESCRIPTOR)
    context = upstream(istio.transport_socket)
    assert context.sni == f"outbound_.9080_._.{HOST}"
    assert sans(context.common_tls_context) == [(URI, "exact", i) for i in IDENTITIES]
    assert list(context.common_tls_context.alpn_protocols) == ["http/1.1"]
    assert socket_metadata(table) == {
        "10.1.0.1": {"tlsMode": "istio"},
        "10.1.0.2": {"tlsMode": "istio"},
        "10.1.0.3": None,
    }
    tcp = upstream(cluster_of(table, 3306).transport_socket_matches[0].transport_socket)
    assert list(tcp.common_tls_context.alpn_protocols) == []
    assert tcp.sni == f"outbound_.3306_._.{HOST}"


def test_auto_mtls_needs_a_labelled_endpoint_and_the_mesh_switch() -> None:
    unlabelled = REGISTRY.replace(", security.istio.io/tlsMode: istio", "")
    table = named(translate(load_text(unlabelled), CLIENT))
    assert len(cluster_of(table).transport_socket_matches) == 0
    assert set(socket_metadata(table).values()) == {None}
    off = "kind: MeshConfig\nspec: {enableAutoMtls: false}\n"
    table = client_table(off)
    assert len(cluster_of(table).transport_socket_matches) == 0
    assert set(socket_metadata(table).values()) == {None}


def test_auto_mtls_sends_plaintext_to_workloads_whose_policy_disables_mtls() -> None:
    table = client_table(peer_auth("b", "shop", "DISABLE", "version: v2"))
    assert socket_metadata(table) == {
        "10.1.0.1": {"tlsMode": "istio"},
        "10.1.0.2": None,
        "10.1.0.3": None,
    }
    port_level = peer_auth("all", "shop", "", "app: ratings", "9080: {mode: DISABLE}")
    table = client_table(port_level)
    assert len(cluster_of(table, 9080).transport_socket_matches) == 0
    assert len(cluster_of(table, 3306).transport_socket_matches) == 2
