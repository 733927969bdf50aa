"""The embedded OTLP/gRPC receiver, its /debug/traces view, `pillion traces`, and MeshConfig tracing
translated to HCM `tracing` (the collector's cluster included)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import grpc
import pytest
from envoy.config.trace.v3 import opentelemetry_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from control.otlp_receiver import OtlpReceiver
from control.server import ControlOptions, ControlServer
from control.traces_cli import format_traces
from control.translate import ConfigError, load_text, translate
from tests.control.test_translate_resources import NODE, TEXT

TRACING = """\
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
kind: MeshConfig
spec:
  defaultConfig: {tracing: {sampling: 12.5}}
  extensionProviders: [{name: otel, opentelemetry: {service: otel.istio-system.svc.cluster.local, port: 4317}}]
  defaultProviders: {tracing: [otel]}
"""


def _request(service: str, spans: list[tuple[bytes, bytes, bytes, str]]) -> trace_service_pb2.ExportTraceServiceRequest:
    return trace_service_pb2.ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(
        resource=resource_pb2.Resource(attributes=[common_pb2.KeyValue(
            key="service.name", value=common_pb2.AnyValue(string_value=service))]),
        scope_spans=[trace_pb2.ScopeSpans(spans=[
            trace_pb2.Span(trace_id=t, span_id=s, parent_span_id=p, name=name, kind=trace_pb2.Span.SPAN_KIND_SERVER,
                           start_time_unix_nano=1_000_000, end_time_unix_nano=3_500_000,
                           attributes=[common_pb2.KeyValue(key="http.response.status_code",
                                                           value=common_pb2.AnyValue(int_value=200))])
            for t, s, p, name in spans])],
    )])


async def test_receiver_keeps_the_last_traces_and_serves_them(tmp_path: Path) -> None:
    (tmp_path / "mesh").mkdir()
    options = ControlOptions(config_dir=str(tmp_path / "mesh"), xds_port=0, debug_port=0, otlp_port=0, watch=False)
    async with ControlServer(options) as server:
        server.otlp.limit = 2  # type: ignore[union-attr]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.otlp_port}") as channel:
            stub = trace_service_pb2_grpc.TraceServiceStub(channel)
            t1, t2, t3 = b"\x01" * 16, b"\x02" * 16, b"\x03" * 16
            await stub.Export(_request("a.default", [(t1, b"\x0a" * 8, b"", "old")]))
            await stub.Export(_request("b.default", [(t2, b"\x0b" * 8, b"", "root"),
                                                     (t2, b"\x0c" * 8, b"\x0b" * 8, "child")]))
            await stub.Export(_request("c.default", [(t3, b"\x0d" * 8, b"", "new")]))
        url = f"http://127.0.0.1:{server.debug_port}/debug/traces"
        doc = await asyncio.to_thread(lambda: json.load(urllib.request.urlopen(url, timeout=5)))
    assert doc["spans_received"] == 4
    assert [t["trace_id"] for t in doc["traces"]] == [(b"\x03" * 16).hex(), (b"\x02" * 16).hex()]  # t1 forgotten
    text = format_traces(doc["traces"])
    assert "  b.default SERVER root 2.50ms UNSET 200\n    b.default SERVER child 2.50ms UNSET 200" in text
    assert format_traces([]) == "no traces received yet"


async def test_receiver_on_its_own() -> None:
    async with OtlpReceiver() as rx:
        assert rx.port > 0 and rx.traces() == []


def _tracing_of(resources: object, name: str) -> hcm.HttpConnectionManager.Tracing:
    (listener,) = [item for item in resources.listeners if item.name == name]  # type: ignore[attr-defined]
    manager = hcm.HttpConnectionManager()
    listener.filter_chains[0].filters[-1].typed_config.Unpack(manager)
    return manager.tracing


def test_mesh_config_tracing_sets_hcm_tracing_and_the_collector_cluster() -> None:
    resources = translate(load_text(TEXT + TRACING), NODE)
    cluster = "outbound|4317||otel.istio-system.svc.cluster.local"
    assert cluster in {c.name for c in resources.clusters}  # not exported to default: referenced anyway
    names = [item.name for item in resources.listeners]
    assert names
    for name in names:
        manager = hcm.HttpConnectionManager()
        listener = next(item for item in resources.listeners if item.name == name)
        listener.filter_chains[0].filters[-1].typed_config.Unpack(manager)
        if listener.filter_chains[0].filters[-1].name != "envoy.filters.network.http_connection_manager":
            continue
        tracing = manager.tracing
        assert tracing.random_sampling.value == 12.5
        assert tracing.provider.name == "envoy.tracers.opentelemetry"
        cfg = opentelemetry_pb2.OpenTelemetryConfig()
        tracing.provider.typed_config.Unpack(cfg)
        assert cfg.grpc_service.envoy_grpc.cluster_name == cluster
        assert cfg.service_name == "productpage.default"


def test_no_tracing_without_a_default_provider() -> None:
    text = TEXT + TRACING.replace("  defaultProviders: {tracing: [otel]}\n", "")
    resources = translate(load_text(text), NODE)
    assert not _tracing_of(resources, "127.0.0.1_9080").HasField("provider")


@pytest.mark.parametrize(("change", "message"), [
    ("[otel]}", "no extensionProviders entry"),
    ("port: 4317}}]", "no ServiceEntry host"),
    ("grpc-otlp", "must be declared protocol GRPC"),
])
def test_tracing_problems(change: str, message: str) -> None:
    text = TRACING
    if change == "[otel]}":
        text = text.replace("tracing: [otel]}", "tracing: [missing]}")
    elif change == "grpc-otlp":  # Envoy exports through this cluster over gRPC: HTTP/2 is required
        text = text.replace("name: grpc-otlp", "name: tcp-otlp, protocol: TCP")
    else:
        text = text.replace("port: 4317}}]", "port: 4318}}]")
    with pytest.raises(ConfigError, match=message):
        translate(load_text(TEXT + text), NODE)


def test_unsupported_tracing_fields_are_refused() -> None:
    text = TRACING.replace("{sampling: 12.5}", "{sampling: 12.5, zipkin: {address: z:9411}}")
    with pytest.raises(ConfigError, match="not supported yet"):
        load_text(TEXT + text)
