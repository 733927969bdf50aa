"""A real Envoy accepts the translated resources (as a static bootstrap, `--mode validate`)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)

from control.translate import NodeInfo, load_text, translate
from control.translate.bootstrap import envoy_bootstrap
from tests.control.test_translate_resources import NODE, TEXT
from tests.control.translate_fixtures import write_mesh_certs

ENVOY = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "envoy"
WEIGHTED_VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - name: split
    match:
    - uri: {regex: "/r/[0-9]+"}
      headers: {x-user: {prefix: test-}}
    - uri: {exact: /ping}
    timeout: 2.5s
    route:
    - {destination: {host: ratings, subset: v1}, weight: 75}
    - {destination: {host: ratings, subset: v2}, weight: 25}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings}
spec:
  host: ratings
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings}
spec:
  hosts: [ratings.default.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 9080, name: http}]
  endpoints:
  - {address: 10.0.1.1, labels: {version: v1}}
  - {address: 10.0.1.2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy}
spec:
  hosts: [legacy.internal]
  ports: [{number: 8443, name: tcp}]
"""


def test_bootstrap_inlines_routes_and_endpoints() -> None:
    resources = translate(load_text(TEXT), NODE)
    # The ingress listeners are PERMISSIVE (no PeerAuthentication): their TLS chain names
    # the SDS secrets, which a static bootstrap takes from files.
    secrets = {"default": ("chain.pem", "key.pem"), "ROOTCA": "root.pem"}
    bootstrap = envoy_bootstrap(resources, admin_port=15999, secrets=secrets)
    assert bootstrap["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 15999,
    }
    listeners = {item["name"]: item for item in bootstrap["static_resources"]["listeners"]}
    manager = listeners["127.0.0.1_9080"]["filter_chains"][0]["filters"][0]["typed_config"]
    assert "rds" not in manager
    assert manager["route_config"]["name"] == "9080"
    clusters = {item["name"]: item for item in bootstrap["static_resources"]["clusters"]}
    v2 = clusters["outbound|9080|v2|reviews.default.svc.cluster.local"]
    assert v2["type"] == "STATIC" and "eds_cluster_config" not in v2
    assert v2["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "socket_address": {"address": "10.0.0.2", "port_value": 9081}
    }
    json.dumps(bootstrap)  # JSON-able
    # the xDS resources themselves are untouched
    original = hcm.HttpConnectionManager()
    (listener,) = [item for item in resources.listeners if item.name == "127.0.0.1_9080"]
    listener.filter_chains[0].filters[0].typed_config.Unpack(original)
    assert original.HasField("rds")


@pytest.mark.skipif(not ENVOY.exists(), reason=f"no Envoy binary at {ENVOY}")
@pytest.mark.parametrize("case", ["reviews", "weighted", "access-log-json", "access-log-text",
                                  "tracing",  # [tracing]
                                  "lb-ring-hash", "lb-cookie", "lb-simple"])  # [lb]
def test_envoy_validates_the_translated_config(tmp_path: Path, case: str) -> None:
    if case == "reviews":
        resources = translate(load_text(TEXT), NODE)
    elif case == "tracing":  # [tracing] HCM tracing: OpenTelemetry provider to the collector's cluster
        from tests.control.test_otlp_receiver import TRACING

        resources = translate(load_text(TEXT + TRACING), NODE)
    elif case.startswith("access-log"):  # [accesslog] HCM and tcp_proxy access_log (MeshConfig accessLogFile)
        encoding = "JSON" if case.endswith("json") else "TEXT"
        mesh = f"---\nkind: MeshConfig\nspec: {{accessLogFile: /dev/stdout, accessLogEncoding: {encoding}}}\n"
        resources = translate(load_text(TEXT + mesh), NODE)
        assert any("access_loggers.file" in str(item) for item in resources.listeners)
    elif case.startswith("lb-"):  # [lb] DestinationRule loadBalancer: lb_policy, ring hash config, hash_policy
        from tests.control.test_translate_lb import with_policy

        hashing = {
            "lb-ring-hash": "{consistentHash: {useSourceIp: true, ringHash: {minimumRingSize: 64}}}",
            "lb-cookie": "{consistentHash: {httpCookie: {name: s, path: /, ttl: 10s}}}",
            "lb-simple": "{simple: LEAST_REQUEST}",
        }[case]
        subsets = (
            "  subsets:\n  - {name: v1, labels: {version: v1}, trafficPolicy: {loadBalancer: {simple: RANDOM}}}\n"
            "  - name: v2\n    labels: {version: v2}\n    trafficPolicy: {loadBalancer: "
            "{consistentHash: {httpQueryParameterName: u}}}\n"
        )
        resources = translate(load_text(with_policy(f"  trafficPolicy: {{loadBalancer: {hashing}}}\n", subsets)),
                              NodeInfo())
    else:
        sidecar = (
            "---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: all}\n"
            "spec:\n  egress:\n  - port: {number: 9080, name: http}\n    hosts: ['*/*']\n"
            "  - port: {number: 8443, name: tcp}\n    hosts: ['*/*']\n"
        )
        resources = translate(load_text(WEIGHTED_VS + sidecar), NodeInfo())
    path = tmp_path / "bootstrap.json"
    secrets = write_mesh_certs(tmp_path)
    path.write_text(json.dumps(envoy_bootstrap(resources, admin_port=0, secrets=secrets), indent=1))
    result = subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr
