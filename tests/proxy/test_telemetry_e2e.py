"""A namespace's Telemetry, end to end: two standalone sidecars read one config directory; MeshConfig logs
every request and samples every trace, and a Telemetry in namespace `quiet` turns its access logs off and
its sampling down to 0%. The sidecar in `default` logs and exports a span; the one in `quiet` does neither
(its upstream sees an unsampled traceparent)."""

from __future__ import annotations

import json
from pathlib import Path

from control.otlp_receiver import OtlpReceiver
from tests.helpers.config import HOST, service_entry, sidecar, write
from tests.helpers.net import RawClient, eventually, free_port, standalone_proxy
from tests.helpers.poll import poll
from tests.helpers.upstreams import RecordingUpstream

COLLECTOR = "otel-collector.default.svc.cluster.local"


def _config(loud_port: int, quiet_port: int, upstream: int, collector: int, log: Path) -> str:
    quiet_sidecar = f"""\
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: client, namespace: quiet}}
spec:
  workloadSelector: {{labels: {{app: client}}}}
  egress:
  - port: {{number: {quiet_port}, protocol: HTTP, name: http-quiet}}
    bind: 127.0.0.1
    captureMode: NONE
    hosts: ["default/*"]
"""
    collector_entry = service_entry("otel-collector", COLLECTOR, [("grpc-otlp", collector, "GRPC")],
                                    [("127.0.0.1", {}, {})])
    mesh = f"""\
kind: MeshConfig
spec:
  accessLogFile: {log}
  accessLogEncoding: JSON
  defaultConfig: {{tracing: {{sampling: 100}}}}
  extensionProviders: [{{name: otel, opentelemetry: {{service: {COLLECTOR}, port: {collector}}}}}]
  defaultProviders: {{tracing: [otel]}}
"""
    telemetry = """\
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: hush, namespace: quiet}
spec:
  accessLogging: [{disabled: true}]
  tracing: [{randomSamplingPercentage: 0}]
"""
    upstream_entry = service_entry("upstream", HOST, [("http", loud_port, "HTTP"), ("http-quiet", quiet_port, "HTTP")],
                                   [("127.0.0.1", {"http": upstream, "http-quiet": upstream}, {})])
    return "---\n".join([upstream_entry, sidecar([(loud_port, "HTTP")]), quiet_sidecar, collector_entry, mesh,
                          telemetry])


async def test_a_namespace_telemetry_silences_access_logs_and_spans(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    async with OtlpReceiver() as rx, RecordingUpstream("app") as app:
        loud_port, quiet_port = free_port(), free_port()
        write(tmp_path / "cfg", _config(loud_port, quiet_port, app.port, rx.port, log))
        async with standalone_proxy(tmp_path / "cfg", namespace="default"), \
                standalone_proxy(tmp_path / "cfg", namespace="quiet"):
            for port, name in ((quiet_port, "quiet"), (loud_port, "loud")):
                c = await RawClient.connect(port)
                r = await c.request("GET", f"/{name}", HOST, {"x-request-id": name})
                await c.close()
                assert r.status == 200, r.body
            await eventually(lambda: log.exists() and bool(log.read_text()))
            spans = await poll(lambda: [s for t in rx.traces() for s in t["spans"]], timeout=10,
                               what="the loud sidecar's span")
        # Both sidecars have stopped, which writes whatever their loggers still held.
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["request_id"], e["path"]) for e in entries] == [("loud", "/loud")]
    seen = {req.path: req.header("traceparent") or "" for req in app.requests}
    assert seen["/loud"].endswith("-01") and seen["/quiet"].endswith("-00")  # sampled at 100% / at 0%
    assert [(s["service"], s["name"]) for s in spans] == [("client.default", f"{HOST}/loud")]
