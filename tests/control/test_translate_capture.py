"""Interception mode (`NodeInfo.intercept`): the capture listeners, their routes and clusters."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from control.translate import ConfigError, NodeInfo, load_text, translate
from control.translate.bootstrap import envoy_bootstrap
from tests.control.translate_fixtures import named, write_mesh_certs

ENVOY = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "envoy"
B_HOST = "b.default.svc.cluster.local"
A = NodeInfo(labels={"app": "a"}, intercept=True)
B = NodeInfo(labels={"app": "b"}, intercept=True)

REGISTRY = f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: b, namespace: default}}
spec:
  hosts: [{B_HOST}]
  addresses: [10.250.0.2]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}, {{number: 9090, name: tcp-admin, protocol: TCP, targetPort: 9091}}]
  workloadSelector: {{labels: {{app: b}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: b, namespace: default}}
spec:
  address: 10.250.0.2
  labels: {{app: b, security.istio.io/tlsMode: istio}}
  serviceAccount: b
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: cache, namespace: default}}
spec:
  hosts: [cache.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 6379, name: tcp-redis, protocol: TCP}}]
  endpoints: [{{address: 10.250.0.7}}]
"""
STRICT = """\
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
"""


def unpack(listener: listener_pb2.Listener, chain: int = 0) -> Any:
    any_config = listener.filter_chains[chain].filters[0].typed_config
    message = hcm.HttpConnectionManager() if "HttpConnectionManager" in any_config.type_url else tcp_proxy_pb2.TcpProxy()
    any_config.Unpack(message)
    return message


def test_without_intercept_nothing_changes() -> None:
    explicit = translate(load_text(REGISTRY + STRICT), NodeInfo(labels={"app": "a"}))
    assert explicit.listeners == ()
    assert "PassthroughCluster" not in named(explicit)


def test_outbound_capture_listener_and_per_port_listeners() -> None:
    found = named(translate(load_text(REGISTRY + STRICT), A))
    outbound = found["virtualOutbound"]
    assert isinstance(outbound, listener_pb2.Listener)
    assert outbound.address.socket_address.address == "0.0.0.0"
    assert outbound.address.socket_address.port_value == 15001
    assert outbound.use_original_dst.value is True
    assert unpack(outbound).cluster == "PassthroughCluster"  # ALLOW_ANY is the default
    http = found["0.0.0.0_8080"]
    assert isinstance(http, listener_pb2.Listener)
    assert http.HasField("bind_to_port") and http.bind_to_port.value is False
    assert unpack(http).rds.route_config_name == "8080"
    # A TCP service with an address: a listener for exactly that address (exact ip:port wins).
    tcp = found["10.250.0.2_9090"]
    assert isinstance(tcp, listener_pb2.Listener) and tcp.bind_to_port.value is False
    assert unpack(tcp).cluster == f"outbound|9090||{B_HOST}"
    # A TCP service without addresses, alone on its port: the wildcard listener.
    assert unpack(found["0.0.0.0_6379"]).cluster == "outbound|6379||cache.default.svc.cluster.local"  # type: ignore[arg-type]
    passthrough = found["PassthroughCluster"]
    assert isinstance(passthrough, cluster_pb2.Cluster)
    assert passthrough.type == cluster_pb2.Cluster.ORIGINAL_DST
    assert passthrough.lb_policy == cluster_pb2.Cluster.CLUSTER_PROVIDED
    blackhole = found["BlackHoleCluster"]
    assert isinstance(blackhole, cluster_pb2.Cluster) and blackhole.type == cluster_pb2.Cluster.STATIC
    assert not blackhole.load_assignment.endpoints


def test_route_table_knows_the_service_address_and_ends_in_the_passthrough() -> None:
    table = named(translate(load_text(REGISTRY), A))["route:8080"]
    assert isinstance(table, route_pb2.RouteConfiguration)
    first, last = table.virtual_hosts
    assert "10.250.0.2:8080" in first.domains and "10.250.0.2" in first.domains
    assert first.routes[0].route.cluster == f"outbound|8080||{B_HOST}"
    assert (last.name, list(last.domains)) == ("allow_any", ["*"])
    assert last.routes[0].route.cluster == "PassthroughCluster"


def test_registry_only_sends_unknown_destinations_to_the_blackhole() -> None:
    mesh = "---\nkind: MeshConfig\nspec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}\n"
    found = named(translate(load_text(REGISTRY + mesh), A))
    assert unpack(found["virtualOutbound"]).cluster == "BlackHoleCluster"  # type: ignore[arg-type]
    table = found["route:8080"]
    assert isinstance(table, route_pb2.RouteConfiguration)
    assert table.virtual_hosts[-1].name == "block_all"
    assert table.virtual_hosts[-1].routes[0].route.cluster == "BlackHoleCluster"


def test_a_sidecars_outbound_policy_wins_over_the_mesh() -> None:
    sidecar = """\
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: a, namespace: default}
spec:
  workloadSelector: {labels: {app: a}}
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
"""
    found = named(translate(load_text(REGISTRY + sidecar), A))
    assert unpack(found["virtualOutbound"]).cluster == "BlackHoleCluster"  # type: ignore[arg-type]
    other = named(translate(load_text(REGISTRY + sidecar), NodeInfo(labels={"app": "c"}, intercept=True)))
    assert unpack(other["virtualOutbound"]).cluster == "PassthroughCluster"  # type: ignore[arg-type]


def _chains(listener: listener_pb2.Listener) -> list[tuple[str, int | None, str]]:
    return [
        (
            fc.name,
            fc.filter_chain_match.destination_port.value if fc.filter_chain_match.HasField("destination_port") else None,
            fc.filter_chain_match.transport_protocol,
        )
        for fc in listener.filter_chains
    ]


def test_inbound_capture_listener_strict() -> None:
    found = named(translate(load_text(REGISTRY + STRICT), B))
    inbound = found["virtualInbound"]
    assert isinstance(inbound, listener_pb2.Listener)
    assert inbound.address.socket_address.port_value == 15006
    assert not inbound.use_original_dst.value  # chains by port; no hand-off to the outbound 0.0.0.0_8080
    assert [f.name for f in inbound.listener_filters] == [
        "envoy.filters.listener.original_dst", "envoy.filters.listener.tls_inspector"]
    assert _chains(inbound) == [
        ("inbound|8080||tls", 8080, "tls"),
        ("inbound|9091||tls", 9091, "tls"),  # the service port's targetPort: where the app listens
        ("InboundPassthroughCluster|tls", None, "tls"),
    ]
    assert unpack(inbound, 0).route_config.virtual_hosts[0].routes[0].route.cluster == "inbound|8080||"
    assert unpack(inbound, 1).cluster == "inbound|9091||"
    assert unpack(inbound, 2).cluster == "InboundPassthroughCluster"
    app = found["inbound|8080||"]
    assert isinstance(app, cluster_pb2.Cluster) and app.type == cluster_pb2.Cluster.STATIC
    address = app.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (address.address, address.port_value) == ("127.0.0.1", 8080)
    assert found["InboundPassthroughCluster"].type == cluster_pb2.Cluster.ORIGINAL_DST  # type: ignore[attr-defined]


def test_inbound_permissive_and_disabled_ports() -> None:
    port_level = """\
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: b, namespace: default}
spec:
  selector: {matchLabels: {app: b}}
  portLevelMtls: {"9091": {mode: DISABLE}}
"""
    inbound = named(translate(load_text(REGISTRY + port_level), B))["virtualInbound"]
    assert isinstance(inbound, listener_pb2.Listener)
    assert _chains(inbound) == [
        ("inbound|8080||tls", 8080, "tls"),
        ("inbound|8080||plaintext", 8080, "raw_buffer"),
        ("inbound|9091||plaintext", 9091, ""),
        ("InboundPassthroughCluster|tls", None, "tls"),
        ("InboundPassthroughCluster|plaintext", None, "raw_buffer"),
    ]


ALLOW_A = """\
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: b, namespace: default}
spec:
  selector: {matchLabels: {app: b}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/a]}}]
"""


def test_inbound_chains_carry_the_nodes_authorization_filters() -> None:
    inbound = named(translate(load_text(REGISTRY + STRICT + ALLOW_A), B))["virtualInbound"]
    assert isinstance(inbound, listener_pb2.Listener)
    filters = [[f.name for f in fc.filters] for fc in inbound.filter_chains]
    assert filters == [
        ["envoy.filters.network.http_connection_manager"],
        ["envoy.filters.network.rbac", "envoy.filters.network.tcp_proxy"],
        ["envoy.filters.network.rbac", "envoy.filters.network.tcp_proxy"],  # the passthrough too
    ]
    assert [f.name for f in unpack(inbound, 0).http_filters] == ["envoy.filters.http.rbac", "envoy.filters.http.router"]


def test_a_node_no_service_selects_gets_only_the_passthrough() -> None:
    inbound = named(translate(load_text(REGISTRY), A))["virtualInbound"]
    assert isinstance(inbound, listener_pb2.Listener)
    assert [port for _, port, _ in _chains(inbound)] == [None, None]


def test_sidecar_ingress_ports_and_explicit_egress_with_interception() -> None:
    sidecar = """\
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: b, namespace: default}
spec:
  workloadSelector: {labels: {app: b}}
  ingress:
  - port: {number: 7000, name: http-web}
    defaultEndpoint: 127.0.0.1:7001
  egress:
  - port: {number: 8080, name: http}
    bind: 127.0.0.1
    captureMode: NONE
    hosts: ["./*"]
"""
    found = named(translate(load_text(REGISTRY + STRICT + sidecar), B))
    inbound = found["virtualInbound"]
    assert isinstance(inbound, listener_pb2.Listener)
    assert [port for _, port, _ in _chains(inbound)] == [7000, None]
    assert "0.0.0.0_7000" not in found  # no explicit ingress listener: it is captured
    app = found["inbound|7000||"]
    assert isinstance(app, cluster_pb2.Cluster)
    assert app.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value == 7001
    # The explicit egress listener stays, and shares route table "8080" with the captured one.
    assert unpack(found["127.0.0.1_8080"]).rds.route_config_name == "8080"  # type: ignore[arg-type]
    assert unpack(found["0.0.0.0_8080"]).rds.route_config_name == "8080"  # type: ignore[arg-type]


def test_two_tcp_services_without_addresses_on_one_port_is_a_problem() -> None:
    other = """\
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: cache2, namespace: default}
spec:
  hosts: [cache2.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 6379, name: tcp-redis, protocol: TCP}]
  endpoints: [{address: 10.250.0.8}]
"""
    with pytest.raises(ConfigError) as caught:
        translate(load_text(REGISTRY + other), A)
    (problem,) = caught.value.problems
    assert problem.resource == "ServiceEntry default/cache"
    assert "port 6379" in problem.message and "give the TCP service addresses" in problem.message


def test_tcp_services_with_address_ranges_are_refused_with_interception() -> None:
    ranged = REGISTRY.replace("endpoints: [{address: 10.250.0.7}]",
                              "addresses: [10.250.1.0/24]\n  endpoints: [{address: 10.250.0.7}]")
    with pytest.raises(ConfigError) as caught:
        translate(load_text(ranged), A)
    (problem,) = caught.value.problems
    assert (problem.resource, problem.field) == ("ServiceEntry default/cache", "spec.addresses")


@pytest.mark.skipif(not ENVOY.exists(), reason=f"no Envoy binary at {ENVOY}")
@pytest.mark.parametrize(("node", "extra"), [(A, ""), (B, ""), (B, ALLOW_A)], ids=["client", "server", "authz"])
def test_envoy_validates_the_capture_listeners(tmp_path: Path, node: NodeInfo, extra: str) -> None:
    resources = translate(load_text(REGISTRY + STRICT + extra), node)
    path = tmp_path / "bootstrap.json"
    secrets = write_mesh_certs(tmp_path)
    path.write_text(json.dumps(envoy_bootstrap(resources, admin_port=0, secrets=secrets), indent=1))
    result = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
