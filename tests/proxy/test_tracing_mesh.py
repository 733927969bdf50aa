"""Tracing across a mesh: A -> sidecar -> sidecar -> B -> sidecar -> sidecar -> C, one trace at a real
OTLP/gRPC receiver; a down collector drops (and counts) spans; 0% sampling still propagates."""

from __future__ import annotations

import contextlib
from typing import Any

from control.demoapp import DemoApp
from control.otlp_receiver import OtlpReceiver
from tests.helpers.config import HOST, service_entry, simple_mesh, write
from tests.helpers.net import RawClient, free_port, standalone_proxy
from tests.helpers.poll import poll
from tests.helpers.upstreams import RecordingUpstream

COLLECTOR = "otel-collector.default.svc.cluster.local"


def mesh_tracing(collector_port: int, sampling: float) -> str:
    collector = service_entry("otel-collector", COLLECTOR, [("grpc-otlp", collector_port, "GRPC")],
                              [("127.0.0.1", {}, {})])
    return collector + f"""---
kind: MeshConfig
spec:
  defaultConfig: {{tracing: {{sampling: {sampling}}}}}
  extensionProviders:
  - name: otel
    opentelemetry: {{service: {COLLECTOR}, port: {collector_port}}}
  defaultProviders: {{tracing: [otel]}}
"""


def _service(name: str, egress: int, ingress: int) -> str:
    return f"""\
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [{name}.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: {egress}, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {{app: {name}}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: WorkloadEntry
metadata: {{name: {name}-v1, namespace: default}}
spec:
  address: 127.0.0.1
  ports: {{http: {ingress}}}
  labels: {{app: {name}}}
"""


def _sidecar(app: str, egress: list[int], ingress: tuple[int, int] | None) -> str:
    lines = ["apiVersion: networking.istio.io/v1beta1", "kind: Sidecar",
             f"metadata: {{name: {app}, namespace: default}}", "spec:",
             f"  workloadSelector: {{labels: {{app: {app}}}}}"]
    if ingress is not None:
        lines += ["  ingress:", f"  - port: {{number: {ingress[0]}, protocol: HTTP, name: http}}",
                  "    bind: 127.0.0.1", f"    defaultEndpoint: 127.0.0.1:{ingress[1]}"]
    if egress:
        lines.append("  egress:")
        for port in egress:
            lines += [f"  - port: {{number: {port}, protocol: HTTP, name: http-{port}}}", "    bind: 127.0.0.1",
                      "    captureMode: NONE", '    hosts: ["./*"]']
    return "\n".join(lines) + "\n"


async def _trace_with(rx: OtlpReceiver, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    def found() -> list[dict[str, Any]] | None:
        return next((list(t["spans"]) for t in rx.traces() if len(t["spans"]) >= count), None)

    try:
        return await poll(found, timeout=timeout, interval=0.05, what=f"a trace with {count} spans")
    except TimeoutError:
        raise AssertionError(f"no trace with {count} spans: {rx.traces()}") from None


async def test_one_trace_across_two_hops_reaches_the_collector(tmp_path):
    async with OtlpReceiver() as rx, DemoApp("c") as app_c:
        e_b, i_b, e_c, i_c = free_port(), free_port(), free_port(), free_port()
        async with DemoApp("b", calls=(f"127.0.0.1:{e_c}/c.default.svc.cluster.local/hello",)) as app_b:
            write(tmp_path, "---\n".join([
                _service("b", e_b, i_b), _service("c", e_c, i_c),
                _sidecar("a", [e_b], None), _sidecar("b", [e_c], (i_b, app_b.port)), _sidecar("c", [], (i_c, app_c.port)),
                mesh_tracing(rx.port, 100),
            ]))
            async with standalone_proxy(tmp_path, labels={"app": "c"}), \
                    standalone_proxy(tmp_path, labels={"app": "b"}), \
                    standalone_proxy(tmp_path, labels={"app": "a"}):
                c = await RawClient.connect(e_b)
                r = await c.request("GET", "/start?x=1", "b.default.svc.cluster.local")
                await c.close()
                assert r.status == 200, r.body
                spans = await _trace_with(rx, 4)
    by_key = {(s["service"], s["kind"]): s for s in spans}
    a_client = by_key[("a.default", "CLIENT")]
    b_server = by_key[("b.default", "SERVER")]
    b_client = by_key[("b.default", "CLIENT")]
    c_server = by_key[("c.default", "SERVER")]
    assert a_client["parent_span_id"] == ""  # app A sent no context: the trace starts at its sidecar
    assert b_server["parent_span_id"] == a_client["span_id"]
    assert b_client["parent_span_id"] == b_server["span_id"]  # app B forwarded traceparent
    assert c_server["parent_span_id"] == b_client["span_id"]
    assert len({s["trace_id"] for s in spans}) == 1
    attrs = a_client["attributes"]
    assert a_client["name"] == "b.default.svc.cluster.local/start"
    assert attrs["http.request.method"] == "GET" and attrs["url.path"] == "/start"
    assert attrs["server.address"] == "b.default.svc.cluster.local"
    assert attrs["http.response.status_code"] == 200
    assert attrs["network.peer.address"] == "127.0.0.1"
    assert attrs["upstream_cluster"] == f"outbound|{e_b}||b.default.svc.cluster.local"
    assert attrs["istio.canonical_service"] == "a" and attrs["retry_count"] == 0
    assert attrs["response_flags"] == "-"
    assert c_server["attributes"]["upstream_cluster"] == f"inbound|{i_c}||"
    assert c_server["attributes"]["url.path"] == "/hello"
    assert all(s["status"] == "UNSET" for s in spans)


async def test_a_down_collector_drops_and_counts_spans_and_requests_succeed(tmp_path):
    async with RecordingUpstream("app") as app:
        port = free_port()
        write(tmp_path, simple_mesh(port, [app.port], extra=mesh_tracing(free_port(), 100)))
        async with standalone_proxy(tmp_path) as px:
            c = await RawClient.connect(port)
            for i in range(20):
                r = await c.request("GET", f"/r/{i}", HOST)
                assert r.status == 200
            await c.close()
            seen: dict[str, Any] = {}

            async def all_dropped() -> bool:
                _, body = await px.admin_get("/stats/prometheus")
                seen["text"] = body
                seen["dropped"] = next(line for line in body.decode().splitlines()
                                       if line.startswith('pillion_spans_dropped_total{reason="export"}'))
                return bool(seen["dropped"].endswith(" 20"))

            with contextlib.suppress(TimeoutError):
                await poll(all_dropped, timeout=10, interval=0.05)
            dropped, text = seen["dropped"], seen["text"]
            assert dropped.endswith(" 20"), dropped
            assert 'pillion_spans_exported_total 0' in text.decode()
    assert all((req.header("traceparent") or "").endswith("-01") for req in app.requests)


async def test_zero_percent_sampling_still_propagates_the_context(tmp_path):
    async with OtlpReceiver() as rx, RecordingUpstream("app") as app:
        port = free_port()
        write(tmp_path, simple_mesh(port, [app.port], extra=mesh_tracing(rx.port, 0)))
        async with standalone_proxy(tmp_path) as px:
            c = await RawClient.connect(port)
            r = await c.request("GET", "/fresh", HOST)
            assert r.status == 200
            parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
            r = await c.request("GET", "/child", HOST, {"traceparent": parent, "tracestate": "k=v"})
            assert r.status == 200
            forced = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            r = await c.request("GET", "/forced", HOST, {"traceparent": forced})  # parent-based: sampled
            await c.close()
            fresh, child, forced_seen = app.requests[-3:]
            tp = fresh.header("traceparent")
            assert tp is not None and tp.startswith("00-") and tp.endswith("-00") and len(tp) == 55
            tp = child.header("traceparent")
            assert tp is not None and tp.startswith("00-0af7651916cd43dd8448eb211c80319c-") and tp.endswith("-00")
            assert tp.split("-")[2] != "b7ad6b7169203331"  # our span id, not the caller's
            assert child.header("tracestate") == "k=v"
            tp = forced_seen.header("traceparent")
            assert tp is not None and tp.endswith("-01")
            spans = await _trace_with(rx, 1)
            assert [s["name"] for s in spans] == [f"{HOST}/forced"]
            assert spans[0]["parent_span_id"] == "00f067aa0ba902b7"
            _, text = await px.admin_get("/stats/prometheus")
            assert 'pillion_spans_dropped_total{reason="queue_full"} 0' in text.decode()
