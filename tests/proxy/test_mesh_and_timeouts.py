"""Two sidecars in a row (egress -> ingress -> app), and the connect and idle timeouts."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

from tests.helpers.config import HOST, simple_mesh, write
from tests.helpers.net import ProxyHandle, RawClient, free_port, one_request, standalone_proxy
from tests.helpers.upstreams import RecordingUpstream, TcpServer, UnacceptingListener


def two_sidecar_mesh(egress_port: int, ingress_port: int, app_port: int, *, mtls: bool = False) -> str:
    """productpage's sidecar dials reviews (a WorkloadEntry) whose sidecar forwards to the app.

    ``mtls``: the WorkloadEntry carries Istio's tlsMode label (auto mTLS) and a mesh-wide
    PeerAuthentication makes every sidecar STRICT."""
    tls_label = ", security.istio.io/tlsMode: istio" if mtls else ""
    strict = """apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
---
""" if mtls else ""
    return f"""\
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: {egress_port}, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {{app: reviews}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: WorkloadEntry
metadata: {{name: reviews-v1, namespace: default}}
spec:
  address: 127.0.0.1
  ports: {{http: {ingress_port}}}
  labels: {{app: reviews, version: v1{tls_label}}}
  serviceAccount: reviews
---
{strict}apiVersion: networking.istio.io/v1beta1
kind: Sidecar
metadata: {{name: productpage, namespace: default}}
spec:
  workloadSelector: {{labels: {{app: productpage}}}}
  egress:
  - port: {{number: {egress_port}, protocol: HTTP, name: http}}
    bind: 127.0.0.1
    captureMode: NONE
    hosts: ["./*"]
---
apiVersion: networking.istio.io/v1beta1
kind: Sidecar
metadata: {{name: reviews, namespace: default}}
spec:
  workloadSelector: {{labels: {{app: reviews}}}}
  ingress:
  - port: {{number: {ingress_port}, protocol: HTTP, name: http}}
    bind: 127.0.0.1
    defaultEndpoint: 127.0.0.1:{app_port}
"""


async def test_request_crosses_two_sidecars_to_the_app(tmp_path):
    async with RecordingUpstream("reviews-app") as app:
        egress, ingress = free_port(), free_port()
        write(tmp_path, two_sidecar_mesh(egress, ingress, app.port))
        async with standalone_proxy(tmp_path, labels={"app": "reviews", "version": "v1"}) as reviews_px, \
                standalone_proxy(tmp_path, labels={"app": "productpage"}) as pp_px:
            c = await RawClient.connect(egress)
            for i in range(3):
                r = await c.request("GET", f"/reviews/{i}", "reviews.default.svc.cluster.local",
                                    {"x-request-id": f"req-{i}"})
                assert r.status == 200 and r.body == b"hello from reviews-app"
            await c.close()
            seen = app.requests[-1]
            assert seen.path == "/reviews/2"
            assert seen.header("x-request-id") == "req-2"  # carried end to end
            assert seen.header("x-forwarded-for") == "127.0.0.1, 127.0.0.1"  # one hop per sidecar
            # Each sidecar reports its side, as Istio's reporter label says.
            _, pp_metrics = await pp_px.admin_get("/stats/prometheus")
            _, rv_metrics = await reviews_px.admin_get("/stats/prometheus")
            assert 'reporter="source"' in pp_metrics.decode()
            assert f'destination_cluster="outbound|{egress}||reviews.default.svc.cluster.local"' in pp_metrics.decode()
            inbound = [line for line in rv_metrics.decode().splitlines()
                       if line.startswith("istio_requests_total") and f"inbound|{ingress}||" in line]
            assert len(inbound) == 1 and 'reporter="destination"' in inbound[0] and inbound[0].endswith(" 3")
            _, dump = await reviews_px.admin_get("/config_dump")
            listeners = json.loads(dump)["configs"][0]["dynamic_listeners"]
            assert listeners[0]["active_state"]["listener"]["traffic_direction"] == "INBOUND"


async def _shorten(px: ProxyHandle, *, connect: float | None = None, tcp_idle: float | None = None) -> None:
    """Apply the running snapshot with shorter timeouts (their YAML knobs come with DestinationRule
    connectionPool in a later issue; the behaviour is the proxy's and is tested here)."""
    snap = px.supervisor.snapshot
    assert snap is not None
    clusters = {n: replace(c, connect_timeout=connect) if connect else c for n, c in snap.clusters.items()}
    listeners = tuple(
        replace(ls, tcp=replace(ls.tcp, idle_timeout=tcp_idle)) if ls.tcp is not None and tcp_idle else ls
        for ls in snap.listeners)
    await px.supervisor.workers[0].apply(replace(snap, clusters=clusters, listeners=listeners, version="short"))


async def test_http_connect_timeout_is_503_uf_without_hanging(tmp_path):
    with UnacceptingListener() as never:
        port = free_port()
        write(tmp_path, simple_mesh(port, [never.port]))
        async with standalone_proxy(tmp_path) as px:
            await _shorten(px, connect=0.2)
            r = await asyncio.wait_for(one_request(port, f"GET / HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode()), 3)
            assert r.status == 503 and r.header("x-pillion-flags") == "UF,URX"  # Istio's default retries ran out
            assert b"connection timeout" in r.body
            _, text = await px.admin_get("/stats/prometheus")
            assert f'envoy_cluster_upstream_cx_connect_timeout{{envoy_cluster_name="outbound|{port}||{HOST}"}} 3' in text.decode()  # the try and two retries


async def test_tcp_connect_timeout_closes_the_client(tmp_path):
    with UnacceptingListener() as never:
        http_port, tcp_port = free_port(), free_port()
        write(tmp_path, simple_mesh(http_port, [never.port], tcp_port=tcp_port, tcp_upstream=never.port))
        async with standalone_proxy(tmp_path) as px:
            await _shorten(px, connect=0.2)
            reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port)
            writer.write(b"hello")
            assert await asyncio.wait_for(reader.read(), 3) == b""
            writer.close()


async def test_tcp_idle_timeout_closes_a_silent_connection_but_not_a_busy_one(tmp_path):
    async with TcpServer(echo=True) as echo:
        http_port, tcp_port = free_port(), free_port()
        write(tmp_path, simple_mesh(http_port, [echo.port], tcp_port=tcp_port, tcp_upstream=echo.port))
        async with standalone_proxy(tmp_path, tick_seconds=0.05) as px:
            await _shorten(px, tcp_idle=0.3)
            reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port)
            loop = asyncio.get_running_loop()
            start = loop.time()
            # Busy for twice the idle timeout: back-to-back round trips.
            while loop.time() - start < 0.6:
                writer.write(b"ping")
                assert await asyncio.wait_for(reader.readexactly(4), 2) == b"ping"
            # Now silent: the proxy closes it after the idle timeout.
            t0 = loop.time()
            assert await asyncio.wait_for(reader.read(), 3) == b""
            assert loop.time() - t0 >= 0.2
            writer.close()
