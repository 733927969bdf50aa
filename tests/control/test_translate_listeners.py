"""Sidecar selection, egress listeners (HTTP and TCP), ingress listeners and their clusters."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from control.translate import ConfigError, NodeInfo, load_text, translate
from tests.control.translate_fixtures import PRODUCTPAGE_SIDECAR, REVIEWS_REGISTRY, named

PRODUCTPAGE = NodeInfo(namespace="default", labels={"app": "productpage", "version": "v1"})


def sidecar(name: str, namespace: str, selector: str = "", body: str = "") -> str:
    text = f"apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n"
    if selector:
        text += f"  workloadSelector:\n    labels: {{{selector}}}\n"
    return text + (
        body
        or f"  egress:\n  - port: {{number: 9080, name: http}}\n    bind: 127.0.0.{len(name)}\n    hosts: ['*/*']\n"
    )


def listener_names(text: str, node: NodeInfo) -> list[str]:
    return [listener.name for listener in translate(load_text(text), node).listeners]


def only_filter(listener: listener_pb2.Listener) -> listener_components_pb2.Filter:
    """The network filter every chain carries (ingress listeners have a TLS and a plaintext chain
    by default: PERMISSIVE mutual TLS)."""
    filters = [chain.filters for chain in listener.filter_chains]
    (network_filter,) = filters[0]
    assert all(list(other) == [network_filter] for other in filters)
    return network_filter


def hcm_of(listener: listener_pb2.Listener) -> hcm.HttpConnectionManager:
    network_filter = only_filter(listener)
    assert network_filter.name == "envoy.filters.network.http_connection_manager"
    config = hcm.HttpConnectionManager()
    assert network_filter.typed_config.Unpack(config)
    return config


def tcp_of(listener: listener_pb2.Listener) -> tcp_proxy_pb2.TcpProxy:
    network_filter = only_filter(listener)
    assert network_filter.name == "envoy.filters.network.tcp_proxy"
    config = tcp_proxy_pb2.TcpProxy()
    assert network_filter.typed_config.Unpack(config)
    return config


def test_sidecar_selection_precedence() -> None:
    registry = REVIEWS_REGISTRY
    selecting = sidecar("pp", "default", "app: productpage")  # binds 127.0.0.2
    fallback = sidecar("ns-default", "default")  # 127.0.0.10
    root = sidecar("root", "istio-system")  # 127.0.0.4
    other_ns = sidecar("elsewhere", "shop", "app: productpage")  # 127.0.0.9
    everything = "---\n".join([registry, selecting, fallback, root, other_ns])
    assert listener_names(everything, PRODUCTPAGE) == ["127.0.0.2_9080"]
    assert listener_names(everything, NodeInfo(namespace="default", labels={"app": "reviews"})) == [
        "127.0.0.10_9080"
    ]
    assert listener_names(everything, NodeInfo(namespace="other")) == ["127.0.0.4_9080"]
    assert listener_names(
        everything, NodeInfo(namespace="shop", labels={"app": "productpage"})
    ) == ["127.0.0.9_9080"]
    assert listener_names(everything, NodeInfo(namespace="shop")) == ["127.0.0.4_9080"]


def test_root_namespace_comes_from_mesh_config() -> None:
    mesh = "apiVersion: pillion.io/v1alpha1\nkind: MeshConfig\nspec: {rootNamespace: mesh-root}\n"
    text = "---\n".join(
        [REVIEWS_REGISTRY, sidecar("root", "istio-system"), sidecar("rootx", "mesh-root"), mesh]
    )
    assert listener_names(text, NodeInfo(namespace="other")) == ["127.0.0.5_9080"]


def test_no_sidecar_means_no_listeners_but_clusters_for_exported_services() -> None:
    resources = translate(load_text(REVIEWS_REGISTRY), PRODUCTPAGE)
    assert resources.listeners == () and resources.routes == ()
    assert [c.name for c in resources.clusters] == [
        "outbound|9080||reviews.default.svc.cluster.local"
    ]


def test_two_selecting_sidecars_is_a_problem() -> None:
    text = "---\n".join(
        [
            REVIEWS_REGISTRY,
            sidecar("a", "default", "app: productpage"),
            sidecar("bb", "default", "version: v1"),
        ]
    )
    with pytest.raises(ConfigError) as caught:
        translate(load_text(text, "s.yaml"), PRODUCTPAGE)
    (problem,) = caught.value.problems
    assert (problem.file, problem.resource, problem.field) == (
        "s.yaml",
        "Sidecar default/bb",
        "spec.workloadSelector",
    )


def test_http_egress_listener_shape() -> None:
    resources = translate(load_text(REVIEWS_REGISTRY + "---\n" + PRODUCTPAGE_SIDECAR), PRODUCTPAGE)
    listener = named(resources)["127.0.0.1_9080"]
    assert isinstance(listener, listener_pb2.Listener)
    assert listener.address.socket_address.address == "127.0.0.1"
    assert listener.address.socket_address.port_value == 9080
    assert listener.traffic_direction == base_pb2.OUTBOUND
    config = hcm_of(listener)
    assert config.stat_prefix == "outbound_127.0.0.1_9080"
    assert config.codec_type == hcm.HttpConnectionManager.AUTO
    assert config.rds.route_config_name == "9080"
    assert config.rds.config_source.HasField("ads")
    assert config.rds.config_source.resource_api_version == 2  # V3
    # Outbound HCMs carry the fault filter (empty; routes carry the faults), as Istio's do.
    assert [f.name for f in config.http_filters] == ["envoy.filters.http.fault", "envoy.filters.http.router"]
    assert config.http_filters[-1].typed_config.type_url.endswith(
        "envoy.extensions.filters.http.router.v3.Router"
    )
    assert config.use_remote_address.value is False and config.HasField("use_remote_address")
    assert config.generate_request_id.value is True
    assert config.normalize_path.value is True


def test_ingress_listener_and_cluster() -> None:
    resources = translate(load_text(REVIEWS_REGISTRY + "---\n" + PRODUCTPAGE_SIDECAR), PRODUCTPAGE)
    table = named(resources)
    listener = table["0.0.0.0_9090"]
    assert isinstance(listener, listener_pb2.Listener)
    assert listener.traffic_direction == base_pb2.INBOUND
    assert listener.address.socket_address.address == "0.0.0.0"
    # No PeerAuthentication: Istio's default, PERMISSIVE (security tests cover the modes).
    assert [chain.name for chain in listener.filter_chains] == ["tls", "plaintext"]
    config = hcm_of(listener)
    assert config.stat_prefix == "inbound_0.0.0.0_9090"
    assert not config.HasField("rds")
    assert config.route_config.name == "inbound|9090||"
    (vhost,) = config.route_config.virtual_hosts
    assert (vhost.name, list(vhost.domains)) == ("inbound|http|9090", ["*"])
    (route,) = vhost.routes
    assert route.match.prefix == "/"
    assert route.route.cluster == "inbound|9090||"
    assert route.route.HasField("timeout") and route.route.timeout.seconds == 0
    cluster = table["inbound|9090||"]
    assert cluster.type == cluster.STATIC  # type: ignore[attr-defined]
    assert cluster.connect_timeout.seconds == 10  # type: ignore[attr-defined]
    (locality,) = cluster.load_assignment.endpoints  # type: ignore[attr-defined]
    address = locality.lb_endpoints[0].endpoint.address.socket_address
    assert (address.address, address.port_value) == ("127.0.0.1", 8080)


@pytest.mark.parametrize(
    ("endpoint", "port"),
    [("0.0.0.0:8181", 8181), ("127.0.0.1:8182", 8182), (None, 9090)],
)
def test_ingress_default_endpoint_forms(endpoint: str | None, port: int) -> None:
    line = "    defaultEndpoint: 127.0.0.1:8080\n"
    text = PRODUCTPAGE_SIDECAR.replace(
        line, f"    defaultEndpoint: {endpoint}\n" if endpoint else ""
    )
    cluster = named(translate(load_text(REVIEWS_REGISTRY + "---\n" + text), PRODUCTPAGE))[
        "inbound|9090||"
    ]
    address = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address  # type: ignore[attr-defined]
    assert (address.address, address.port_value) == ("127.0.0.1", port)


def test_tcp_ingress_listener() -> None:
    body = "  ingress:\n  - port: {number: 5000, name: tcp-db}\n    bind: 127.0.0.1\n    defaultEndpoint: 127.0.0.1:5432\n"
    resources = translate(load_text(sidecar("db", "default", body=body)), NodeInfo())
    (listener,) = resources.listeners
    assert listener.name == "127.0.0.1_5000"
    proxy = tcp_of(listener)
    assert (proxy.stat_prefix, proxy.cluster) == ("inbound|5000||", "inbound|5000||")


DB = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: NAME, namespace: data}
spec:
  hosts: [NAME.data.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 3306, name: tcp-mysql}]
  endpoints: [{address: 10.3.0.1}]
"""
TCP_EGRESS = "  egress:\n  - port: {number: 3306, name: tcp}\n    hosts: [HOSTS]\n"


def tcp_cluster(text: str, hosts: str = "'*/*'") -> str:
    client = sidecar("client", "default", body=TCP_EGRESS.replace("HOSTS", hosts))
    resources = translate(load_text(text + "---\n" + client, "m.yaml"), NodeInfo())
    (listener,) = resources.listeners
    assert listener.name == "127.0.0.1_3306"
    proxy = tcp_of(listener)
    assert proxy.stat_prefix == proxy.cluster
    assert proxy.cluster in [c.name for c in resources.clusters]
    return proxy.cluster


def test_tcp_egress_to_the_single_service_with_the_port() -> None:
    assert tcp_cluster(DB.replace("NAME", "mysql")) == "outbound|3306||mysql.data.svc.cluster.local"


def test_tcp_egress_visibility_narrows_candidates() -> None:
    two = (
        DB.replace("NAME", "mysql")
        + "---\n"
        + DB.replace("NAME", "maria")
        .replace("namespace: data", "namespace: other")
        .replace(".data.", ".other.")
    )
    assert tcp_cluster(two, "'data/*'") == "outbound|3306||mysql.data.svc.cluster.local"
    assert (
        tcp_cluster(two, "other/maria.other.svc.cluster.local")
        == "outbound|3306||maria.other.svc.cluster.local"
    )


def test_tcp_egress_ambiguous_or_missing_is_a_problem() -> None:
    two = DB.replace("NAME", "mysql") + "---\n" + DB.replace("NAME", "maria")
    with pytest.raises(ConfigError) as caught:
        tcp_cluster(two)
    (problem,) = caught.value.problems
    assert (problem.file, problem.resource, problem.field) == (
        "m.yaml",
        "Sidecar default/client",
        "spec.egress[0].hosts",
    )
    assert problem.message == (
        "port 3306 is ambiguous: visible hosts maria.data.svc.cluster.local, "
        "mysql.data.svc.cluster.local all have it; narrow hosts or add a VirtualService tcp route"
    )
    with pytest.raises(ConfigError) as caught:
        tcp_cluster(two, "'./*'")
    assert caught.value.problems[0].message == "no visible ServiceEntry host has port 3306"


def test_tcp_egress_follows_a_virtual_service_tcp_route() -> None:
    two = DB.replace("NAME", "mysql") + "---\n" + DB.replace("NAME", "maria")
    vs = (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: db, namespace: data}\n"
        "spec:\n  hosts: [mysql]\n  tcp:\n  - match: [{port: 3306}]\n    route:\n"
        "    - destination: {host: maria, port: {number: 3306}}\n"
    )
    assert tcp_cluster(two + "---\n" + vs) == "outbound|3306||maria.data.svc.cluster.local"


def test_egress_without_port_only_scopes_clusters() -> None:
    body = "  egress:\n  - hosts: ['data/*']\n"
    text = (
        REVIEWS_REGISTRY
        + "---\n"
        + DB.replace("NAME", "mysql")
        + "---\n"
        + sidecar("scope", "default", body=body)
    )
    resources = translate(load_text(text), NodeInfo())
    assert resources.listeners == ()
    assert [c.name for c in resources.clusters] == ["outbound|3306||mysql.data.svc.cluster.local"]


def test_export_to_hides_a_service_from_other_namespaces() -> None:
    hidden = DB.replace("NAME", "mysql").replace(
        "  resolution: STATIC\n", "  resolution: STATIC\n  exportTo: ['.']\n"
    )
    assert translate(load_text(hidden), NodeInfo(namespace="default")).clusters == ()
    assert len(translate(load_text(hidden), NodeInfo(namespace="data")).clusters) == 1
