"""The Telemetry kind: YAML -> translate -> HCM `tracing` and HCM / tcp_proxy `access_log` per listener.

The node is productpage in namespace default (tests/control/test_translate_resources.py): outbound
listeners 127.0.0.1_9080 (HTTP) and 127.0.0.1_3306 (TCP), inbound 0.0.0.0_9090 (HTTP) and 0.0.0.0_5001
(TCP). The mesh traces to "otel" at 12.5% and logs to /log/mesh.log unless a test says otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import json_format

from control.translate import ConfigError, NodeInfo, Resources, load_text, translate
from control.translate.accesslog import JSON_FORMAT
from control.translate.bootstrap import envoy_bootstrap
from tests.control.test_translate_envoy import ENVOY
from tests.control.test_translate_resources import NODE, TEXT
from tests.control.translate_fixtures import write_mesh_certs

OUT_HTTP, OUT_TCP, IN_HTTP, IN_TCP = "127.0.0.1_9080", "127.0.0.1_3306", "0.0.0.0_9090", "0.0.0.0_5001"
COLLECTORS = """\
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: otel, namespace: istio-system}
spec:
  hosts: [otel.istio-system.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 4317, name: grpc-otlp}]
  endpoints: [{address: 10.9.0.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: tempo, namespace: istio-system}
spec:
  hosts: [tempo.istio-system.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 4317, name: grpc-otlp}, {number: 9411, name: http-zipkin}]
  endpoints: [{address: 10.9.0.2}]
"""
PROVIDERS = """\
  extensionProviders:
  - {name: otel, opentelemetry: {service: otel.istio-system.svc.cluster.local, port: 4317}}
  - {name: tempo, opentelemetry: {service: tempo.istio-system.svc.cluster.local, port: 4317}}
  - {name: zipkin-port, opentelemetry: {service: tempo.istio-system.svc.cluster.local, port: 9411}}
  - {name: json-file, envoyFileAccessLog: {path: /log/json.log, logFormat: {labels: {}}}}
  - {name: text-file, envoyFileAccessLog: {path: /log/text.log}}
"""
MESH = f"""\
---
kind: MeshConfig
spec:
  accessLogFile: /log/mesh.log
  defaultConfig: {{tracing: {{sampling: 12.5}}}}
{PROVIDERS}  defaultProviders: {{tracing: [otel]}}
"""
BARE_MESH = f"---\nkind: MeshConfig\nspec:\n{PROVIDERS}"  # no default tracing, no accessLogFile
ALL = (OUT_HTTP, OUT_TCP, IN_HTTP, IN_TCP)


def telemetry(spec: str, namespace: str = "default", name: str = "t", version: str = "v1") -> str:
    return (f"---\napiVersion: telemetry.istio.io/{version}\nkind: Telemetry\n"
            f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}")


def run(*telemetries: str, mesh: str = MESH, node: NodeInfo = NODE) -> Resources:
    return translate(load_text(TEXT + COLLECTORS + mesh + "".join(telemetries), "mesh.yaml"), node)


def _filters(resources: Resources, name: str) -> list[hcm.HttpConnectionManager | tcp_proxy_pb2.TcpProxy]:
    (listener,) = [item for item in resources.listeners if item.name == name]
    found: list[hcm.HttpConnectionManager | tcp_proxy_pb2.TcpProxy] = []
    for chain in listener.filter_chains:
        for f in chain.filters:
            message = hcm.HttpConnectionManager() if f.typed_config.Is(hcm.HttpConnectionManager.DESCRIPTOR) \
                else tcp_proxy_pb2.TcpProxy()
            assert f.typed_config.Unpack(message)
            found.append(message)
    assert found
    return found


def tracing(resources: Resources, name: str) -> tuple[str, float] | None:
    """(collector cluster, sampling) of every HCM of listener `name` (all the same), or None when off."""
    seen = set()
    for manager in _filters(resources, name):
        if not isinstance(manager, hcm.HttpConnectionManager):
            continue
        if not manager.HasField("tracing"):
            seen.add(None)
            continue
        config = json_format.MessageToDict(manager.tracing.provider.typed_config)
        seen.add((config["grpcService"]["envoyGrpc"]["clusterName"], manager.tracing.random_sampling.value))
    (only,) = seen
    return only


def logs(resources: Resources, name: str) -> tuple[str, str] | None:
    """(path, TEXT or JSON) of every HCM / tcp_proxy of listener `name` (all the same), or None when off."""
    seen = set()
    for message in _filters(resources, name):
        if not message.access_log:
            seen.add(None)
            continue
        (logger,) = message.access_log
        config = file_pb2.FileAccessLog()
        assert logger.typed_config.Unpack(config)
        if config.HasField("log_format"):
            assert json_format.MessageToDict(config.log_format.json_format) == JSON_FORMAT
        seen.add((config.path, "JSON" if config.HasField("log_format") else "TEXT"))
    (only,) = seen
    return only


OTEL = "outbound|4317||otel.istio-system.svc.cluster.local"
TEMPO = "outbound|4317||tempo.istio-system.svc.cluster.local"
MESH_LOG = ("/log/mesh.log", "TEXT")


def test_without_telemetry_the_mesh_config_applies_to_every_listener() -> None:
    resources = run()
    assert {name: tracing(resources, name) for name in (OUT_HTTP, IN_HTTP)} == {
        OUT_HTTP: (OTEL, 12.5), IN_HTTP: (OTEL, 12.5)}
    assert {logs(resources, name) for name in ALL} == {MESH_LOG}
    assert TEMPO not in {c.name for c in resources.clusters}  # no one exports there


def test_root_telemetry_applies_mesh_wide_and_keeps_what_it_does_not_set() -> None:
    resources = run(telemetry("  tracing: [{randomSamplingPercentage: 50}]\n", namespace="istio-system"))
    assert tracing(resources, OUT_HTTP) == tracing(resources, IN_HTTP) == (OTEL, 50.0)
    assert logs(resources, IN_HTTP) == MESH_LOG


def test_v1alpha1_is_read_the_same() -> None:
    resources = run(telemetry("  tracing: [{randomSamplingPercentage: 50}]\n", "istio-system", version="v1alpha1"))
    assert tracing(resources, OUT_HTTP) == (OTEL, 50.0)


def test_namespace_overrides_the_root_field_by_field() -> None:
    root = telemetry("  tracing: [{providers: [{name: tempo}], randomSamplingPercentage: 50}]\n"
                     "  accessLogging: [{providers: [{name: json-file}]}]\n", namespace="istio-system")
    namespace = telemetry("  tracing: [{randomSamplingPercentage: 5}]\n")
    resources = run(root, namespace)
    assert tracing(resources, OUT_HTTP) == tracing(resources, IN_HTTP) == (TEMPO, 5.0)  # root's provider
    assert {logs(resources, name) for name in ALL} == {("/log/json.log", "JSON")}
    assert TEMPO in {c.name for c in resources.clusters}  # the collector the node exports to


def test_a_telemetry_in_another_namespace_does_not_apply() -> None:
    resources = run(telemetry("  tracing: [{disableSpanReporting: true}]\n  accessLogging: [{disabled: true}]\n",
                              namespace="other"))
    assert tracing(resources, OUT_HTTP) == (OTEL, 12.5)
    assert logs(resources, OUT_TCP) == MESH_LOG


@pytest.mark.parametrize(("labels", "applies"), [
    ("{app: productpage}", True), ("{app: productpage, version: v9}", False), ("{app: reviews}", False)])
def test_a_selector_applies_to_matching_workloads_only(labels: str, applies: bool) -> None:
    resources = run(telemetry(f"  selector: {{matchLabels: {labels}}}\n  accessLogging: [{{disabled: true}}]\n"))
    assert {logs(resources, name) for name in ALL} == ({None} if applies else {MESH_LOG})


def test_a_root_namespace_selector_does_not_reach_other_namespaces() -> None:
    spec = "  selector: {matchLabels: {app: productpage}}\n  accessLogging: [{disabled: true}]\n"
    assert logs(run(telemetry(spec, namespace="istio-system")), OUT_HTTP) == MESH_LOG


def test_workload_beats_namespace_beats_root() -> None:
    root = telemetry("  accessLogging: [{disabled: true}]\n  tracing: [{randomSamplingPercentage: 1}]\n",
                     namespace="istio-system")
    namespace = telemetry("  accessLogging: [{providers: [{name: text-file}], disabled: false}]\n"
                          "  tracing: [{randomSamplingPercentage: 2}]\n", name="ns")
    workload = telemetry("  selector: {matchLabels: {app: productpage}}\n"
                         "  accessLogging: [{disabled: true, match: {mode: SERVER}}]\n"
                         "  tracing: [{randomSamplingPercentage: 3, match: {mode: CLIENT}}]\n", name="wl")
    resources = run(root, namespace, workload)
    assert logs(resources, OUT_HTTP) == logs(resources, OUT_TCP) == ("/log/text.log", "TEXT")
    assert logs(resources, IN_HTTP) is None and logs(resources, IN_TCP) is None
    assert tracing(resources, OUT_HTTP) == (OTEL, 3.0)
    assert tracing(resources, IN_HTTP) == (OTEL, 2.0)  # the workload's entry is CLIENT only


def test_match_mode_splits_outbound_and_inbound() -> None:
    resources = run(telemetry(
        "  tracing: [{match: {mode: SERVER}, disableSpanReporting: true}]\n"
        "  accessLogging:\n"
        "  - {match: {mode: CLIENT}, providers: [{name: json-file}]}\n"
        "  - {match: {mode: SERVER}, disabled: true}\n"))
    assert tracing(resources, OUT_HTTP) == (OTEL, 12.5) and tracing(resources, IN_HTTP) is None
    assert logs(resources, OUT_HTTP) == logs(resources, OUT_TCP) == ("/log/json.log", "JSON")
    assert logs(resources, IN_HTTP) is None and logs(resources, IN_TCP) is None


def test_zero_percent_keeps_tracing_and_disable_span_reporting_removes_it() -> None:
    assert tracing(run(telemetry("  tracing: [{randomSamplingPercentage: 0}]\n")), OUT_HTTP) == (OTEL, 0.0)
    resources = run(telemetry("  tracing: [{disableSpanReporting: true}]\n"))
    assert tracing(resources, OUT_HTTP) is None and tracing(resources, IN_HTTP) is None
    assert OTEL not in {c.name for c in resources.clusters}
    again = run(telemetry("  tracing: [{disableSpanReporting: true}]\n", "istio-system"),
                telemetry("  tracing: [{disableSpanReporting: false}]\n"))
    assert tracing(again, IN_HTTP) == (OTEL, 12.5)


def test_telemetry_turns_on_what_the_mesh_config_leaves_off() -> None:
    resources = run(telemetry("  tracing: [{providers: [{name: tempo}]}]\n  accessLogging: [{providers: [{name: envoy}]}]\n",
                              "istio-system"), mesh=BARE_MESH)
    assert tracing(resources, IN_HTTP) == (TEMPO, 1.0)  # Istio's default sampling
    assert {logs(resources, name) for name in ALL} == {("/dev/stdout", "TEXT")}  # "envoy" without accessLogFile
    assert TEMPO in {c.name for c in resources.clusters} and OTEL not in {c.name for c in resources.clusters}
    json_mesh = MESH.replace("accessLogFile: /log/mesh.log", "accessLogFile: /log/m.json\n  accessLogEncoding: JSON")
    resources = run(telemetry("  accessLogging: [{providers: [{name: envoy}]}]\n"), mesh=json_mesh)
    assert logs(resources, IN_TCP) == ("/log/m.json", "JSON")


def test_capture_listeners_follow_their_direction() -> None:
    node = dataclasses.replace(NODE, intercept=True)
    resources = run(telemetry("  tracing: [{match: {mode: CLIENT}, disableSpanReporting: true}]\n"
                              "  accessLogging: [{match: {mode: SERVER}, disabled: true}]\n"), node=node)
    assert tracing(resources, "virtualInbound") == (OTEL, 12.5)
    assert tracing(resources, "0.0.0.0_9080") is None
    assert logs(resources, "virtualInbound") is None
    assert logs(resources, "virtualOutbound") == logs(resources, "0.0.0.0_9080") == MESH_LOG


def test_two_workload_telemetries_selecting_one_workload_are_refused() -> None:
    first = telemetry("  selector: {matchLabels: {app: productpage}}\n  tracing: [{randomSamplingPercentage: 3}]\n",
                      name="a")
    second = telemetry("  selector: {matchLabels: {app: productpage, tier: web}}\n  accessLogging: [{}]\n",
                       name="b")
    assert tracing(run(first, second), OUT_HTTP) == (OTEL, 3.0)  # b does not select productpage
    with pytest.raises(ConfigError) as caught:
        run(first, second, node=NodeInfo(namespace="default", labels={"app": "productpage", "tier": "web"}))
    (problem,) = caught.value.problems
    assert (problem.file, problem.resource, problem.field) == ("mesh.yaml", "Telemetry default/b", "spec.selector")
    assert "Telemetry default/a and this one" in problem.message and "refuses to guess" in problem.message


def test_a_provider_named_by_telemetry_needs_its_collector() -> None:
    with pytest.raises(ConfigError) as caught:
        run(telemetry("  tracing: [{providers: [{name: zipkin-port}]}]\n"))
    (problem,) = caught.value.problems
    assert (problem.resource, problem.field) == ("MeshConfig", "spec.extensionProviders")
    assert "'zipkin-port': port 9411 of tempo.istio-system.svc.cluster.local must be declared protocol GRPC" \
        in problem.message


REFUSED = [
    ("  targetRefs: [{kind: Gateway, name: gw}]\n", "spec.targetRefs", "not supported yet"),
    ("  targetRef: {kind: Gateway, name: gw}\n", "spec.targetRef", "not supported yet"),
    ("  tracing: [{customTags: {a: {literal: {value: b}}}}]\n", "spec.tracing[0].customTags", "not supported yet"),
    ("  tracing: [{useRequestIdForTraceSampling: false}]\n", "spec.tracing[0].useRequestIdForTraceSampling",
     "false is not supported yet (only the default, true)"),
    ("  accessLogging: [{filter: {expression: 'response.code >= 400'}}]\n",
     "spec.accessLogging[0].filter.expression", "not supported yet"),
    ("  metrics: [{providers: [{name: prometheus}]}]\n", "spec.metrics",
     "not supported yet: Pillion always exports Istio's standard metrics; leave metrics out (or empty)"),
    ("  tracing: [{providers: [{name: nope}]}]\n", "spec.tracing[0].providers[0].name",
     "no MeshConfig extensionProviders entry is named 'nope'"),
    ("  tracing: [{providers: [{name: json-file}]}]\n", "spec.tracing[0].providers[0].name",
     "provider 'json-file' is not an opentelemetry provider (this field takes opentelemetry providers only)"),
    ("  accessLogging: [{providers: [{name: otel}]}]\n", "spec.accessLogging[0].providers[0].name",
     "provider 'otel' is not an envoyFileAccessLog provider (this field takes envoyFileAccessLog providers "
     "or the built-in 'envoy' only)"),
    ("  tracing: [{providers: [{name: otel}, {name: tempo}]}]\n", "spec.tracing[0].providers",
     "only one provider per entry is supported yet"),
    ("  tracing: [{sampling: 5}]\n", "spec.tracing[0].sampling", "unknown field"),
    ("  tracing: [{randomSamplingPercentage: 150}]\n", "spec.tracing[0].randomSamplingPercentage",
     "150 is out of range [0.0, 100.0]"),
    ("  accessLogging: [{match: {mode: BOTH}}]\n", "spec.accessLogging[0].match.mode",
     "'BOTH' is not one of CLIENT_AND_SERVER, CLIENT, SERVER"),
    ("  accessLogging: [{match: {mode: CLIENT}}, {disabled: true}]\n", "spec.accessLogging[1].match",
     "spec.accessLogging[0] already applies to CLIENT (outbound) traffic; one entry per direction is supported "
     "(set match.mode to CLIENT or SERVER)"),
    ("  selector: {labels: {app: x}}\n", "spec.selector.labels", "unknown field"),
]


@pytest.mark.parametrize(("spec", "field", "message"), REFUSED, ids=[f for _, f, _ in REFUSED])
def test_refused_fields_name_file_resource_and_field(spec: str, field: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        run(telemetry(spec, name="bad"), telemetry("  tracing: [{randomSamplingPercentage: 9}]\n", name="fine"))
    (problem,) = caught.value.problems
    assert (problem.file, problem.resource, problem.field, problem.message) == (
        "mesh.yaml", "Telemetry default/bad", field, message)
    assert problem.line is not None


@pytest.mark.parametrize(("spec", "field", "what"), [
    ("  tracing: [{randomSamplingPercentage: 10}]\n", "spec.tracing[0].providers",
     "no tracing provider applies to CLIENT (outbound) traffic"),
    ("  accessLogging: [{match: {mode: SERVER}}]\n", "spec.accessLogging[0].providers",
     "no access log provider applies to SERVER (inbound) traffic"),
])
def test_turning_on_without_any_provider_is_refused(spec: str, field: str, what: str) -> None:
    with pytest.raises(ConfigError) as caught:
        run(telemetry(spec), mesh=BARE_MESH)
    (problem,) = caught.value.problems
    assert (problem.resource, problem.field) == ("Telemetry default/t", field)
    assert problem.message.startswith(what)
    # a provider inherited from the root namespace is enough
    root = telemetry("  tracing: [{providers: [{name: otel}], disableSpanReporting: true}]\n"
                     "  accessLogging: [{providers: [{name: text-file}], disabled: true}]\n", "istio-system")
    run(root, telemetry(spec), mesh=BARE_MESH)


@pytest.mark.parametrize(("namespace", "where"), [
    ("default", "every workload in namespace default"), ("istio-system", "the whole mesh (root namespace istio-system)")])
def test_two_telemetries_without_selector_in_one_namespace_are_refused(namespace: str, where: str) -> None:
    with pytest.raises(ConfigError) as caught:
        run(telemetry("  tracing: [{randomSamplingPercentage: 3}]\n", namespace, name="a"),
            telemetry("  accessLogging: [{disabled: true}]\n", namespace, name="b"))
    (problem,) = caught.value.problems
    assert (problem.resource, problem.field) == (f"Telemetry {namespace}/b", "spec.selector")
    assert problem.message.startswith(f"Telemetry {namespace}/a already applies to {where}; only one Telemetry")


@pytest.mark.parametrize(("provider", "field", "message"), [
    ("{name: f, envoyFileAccessLog: {path: /x, logFormat: {text: '%START_TIME%'}}}",
     "spec.extensionProviders[5].envoyFileAccessLog.logFormat.text", "custom access log formats are not supported yet"),
    ("{name: f, envoyFileAccessLog: {path: /x, logFormat: {labels: {code: '%RESPONSE_CODE%'}}}}",
     "spec.extensionProviders[5].envoyFileAccessLog.logFormat.labels", "custom JSON fields are not supported yet"),
    ("{name: f, envoyFileAccessLog: {logFormat: {omitEmptyValues: true}}}",
     "spec.extensionProviders[5].envoyFileAccessLog.logFormat.omitEmptyValues", "not supported yet"),
    ("{name: f}", "spec.extensionProviders[5]", "set exactly one provider kind: opentelemetry or envoyFileAccessLog"),
    ("{name: otel, envoyFileAccessLog: {}}", "spec.extensionProviders[5].name", "provider name 'otel' is listed twice"),
])
def test_bad_access_log_providers_are_refused(provider: str, field: str, message: str) -> None:
    mesh = MESH.replace("  defaultProviders:", f"  - {provider}\n  defaultProviders:")
    with pytest.raises(ConfigError) as caught:
        run(telemetry("  accessLogging: [{providers: [{name: f}]}]\n"), mesh=mesh)
    # the Telemetry naming the broken provider is not reported again
    (problem,) = caught.value.problems
    assert (problem.resource, problem.field) == ("MeshConfig", field)
    assert problem.message.startswith(message)


def test_default_json_labels_spelled_out_are_accepted() -> None:
    labels = json.dumps(JSON_FORMAT)
    mesh = MESH.replace("  defaultProviders:",
                        f"  - {{name: spelled, envoyFileAccessLog: {{path: /x, logFormat: {{labels: {labels}}}}}}}\n"
                        "  defaultProviders:")
    resources = run(telemetry("  accessLogging: [{providers: [{name: spelled}]}]\n"), mesh=mesh)
    assert logs(resources, IN_TCP) == ("/x", "JSON")


@pytest.mark.skipif(not ENVOY.exists(), reason=f"no Envoy binary at {ENVOY}")
def test_envoy_validates_the_translated_telemetry(tmp_path: Path) -> None:
    resources = run(
        telemetry("  tracing: [{providers: [{name: tempo}], randomSamplingPercentage: 40}]\n", "istio-system"),
        telemetry("  tracing: [{match: {mode: SERVER}, disableSpanReporting: true}]\n"
                  "  accessLogging:\n  - {match: {mode: CLIENT}, providers: [{name: json-file}]}\n"
                  "  - {match: {mode: SERVER}, providers: [{name: text-file}]}\n"),
        mesh=MESH.replace("/log/", f"{tmp_path}/"))
    assert tracing(resources, OUT_HTTP) == (TEMPO, 40.0) and tracing(resources, IN_HTTP) is None
    assert logs(resources, IN_TCP) == (f"{tmp_path}/text.log", "TEXT")
    assert logs(resources, OUT_TCP) == (f"{tmp_path}/json.log", "JSON")
    path = tmp_path / "bootstrap.json"
    secrets = write_mesh_certs(tmp_path)
    path.write_text(json.dumps(envoy_bootstrap(resources, admin_port=0, secrets=secrets), indent=1))
    result = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
