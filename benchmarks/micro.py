"""In-process hot-path benchmark: the proxy's own per-request cost, no sockets.

One HTTP/1.1 request goes through the real code: ``HttpConnection.data_received``
(httptools parse) -> ``Stream.prepare``/``start`` (validate, route on a snapshot
compiled from Istio YAML, round-robin pick, pool checkout of a warm upstream
connection, serialize the upstream head) -> ``UpstreamConnection.data_received``
(parse the response, serialize the downstream head and body) -> release to the
pool. The transports are in-memory sinks, so what is measured is Python work
per request, in microseconds (min and median of several runs).

The same path is timed with a route table of 1000 services (host lookup must
stay O(1)). Also timed: route lookup alone on tables of 1 and 1000 virtual hosts, and the
parse of the same request by httptools alone (the floor).

    python -m benchmarks.micro [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httptools

from control.translate import NodeInfo, load_dir, translate
from proxy.compile import XdsResources, compile_snapshot
from proxy.context import Context
from proxy.hcm import HttpConnection
from proxy.router import find_virtual_host, match_route
from proxy.upstream import UpstreamConnection

HOST = "upstream.default.svc.cluster.local"
REQUEST = (b"GET /api/v1/items?id=42 HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\nUser-Agent: bench/1.0\r\n"
           b"Accept: */*\r\nAccept-Encoding: gzip\r\n\r\n")
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\nServer: bench\r\n\r\nhello\n"


class SinkTransport:
    """Enough of an asyncio.Transport for the proxy's Protocols."""

    def __init__(self) -> None:
        self.written = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


def _yaml(n_hosts: int, port: int = 8080) -> str:
    docs = []
    for i in range(n_hosts):
        host = HOST if i == n_hosts - 1 else f"svc{i}.default.svc.cluster.local"
        docs.append(f"""apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: s{i}, namespace: default}}
spec:
  hosts: [{host}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: {port}, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: 9000}}}}]
""")
    docs.append(f"""apiVersion: networking.istio.io/v1beta1
kind: Sidecar
metadata: {{name: bench, namespace: default}}
spec:
  workloadSelector: {{labels: {{app: bench}}}}
  egress:
  - port: {{number: {port}, protocol: HTTP, name: http}}
    bind: 127.0.0.1
    captureMode: NONE
    hosts: ["./*"]
""")
    return "---\n".join(docs)


def _tracing_yaml(sampling: float) -> str:
    """MeshConfig tracing to a collector that is not running: spans are queued, then dropped."""
    collector = "otel-collector.default.svc.cluster.local"
    return f"""---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: otel-collector, namespace: default}}
spec:
  hosts: [{collector}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 4317, name: grpc-otlp, protocol: GRPC}}]
  endpoints: [{{address: 127.0.0.1}}]
---
kind: MeshConfig
spec:
  defaultConfig: {{tracing: {{sampling: {sampling}}}}}
  extensionProviders:
  - name: otel
    opentelemetry: {{service: {collector}, port: 4317}}
  defaultProviders: {{tracing: [otel]}}
"""


def snapshot_for(n_hosts: int, tracing: float | None = None):  # type: ignore[no-untyped-def]
    with tempfile.TemporaryDirectory() as d:
        Path(d, "mesh.yaml").write_text(_yaml(n_hosts) + (_tracing_yaml(tracing) if tracing is not None else ""))
        res = translate(load_dir(d), NodeInfo(namespace="default", labels={"app": "bench"}))
    return compile_snapshot(XdsResources(res.listeners, res.routes, res.clusters, res.endpoints))


def _runs(fn, n: int, repeat: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(n)
        out.append((time.perf_counter() - t0) / n * 1e6)
    return out


def bench_request_path(n: int, repeat: int, tracing: float | None = None, n_hosts: int = 1) -> list[float]:
    import uvloop

    loop = uvloop.new_event_loop()
    try:
        snap = snapshot_for(n_hosts, tracing)
        ctx = Context(loop)
        ctx.swap(snap)
        listener = snap.listeners[0]
        conn = HttpConnection(ctx, listener, ctx.stats.listener(listener.name))
        down = SinkTransport()
        conn.connection_made(down)  # type: ignore[arg-type]
        cluster = ctx.clusters.get(f"outbound|8080||{HOST}")
        assert cluster is not None
        ep = cluster.spec.endpoints[0]
        pool = cluster.pool(ep, loop)
        up = UpstreamConnection(pool)
        up.connection_made(SinkTransport())  # type: ignore[arg-type]
        pool.put(up)

        def one_batch(k: int) -> None:
            for _ in range(k):
                conn.data_received(REQUEST)
                up.data_received(RESPONSE)

        one_batch(100)  # warm up
        before = down.written
        runs = _runs(one_batch, n, repeat)
        assert down.written > before and pool.idle == [up], "the request did not take the full path"
        return runs
    finally:
        loop.close()


def bench_parse_only(n: int, repeat: int) -> list[float]:
    class P:
        def on_header(self, name: bytes, value: bytes) -> None:
            pass

        def on_url(self, url: bytes) -> None:
            pass

    p = httptools.HttpRequestParser(P())

    def batch(k: int) -> None:
        for _ in range(k):
            p.feed_data(REQUEST)

    return _runs(batch, n, repeat)


def bench_route(n_hosts: int, n: int, repeat: int) -> list[float]:
    snap = snapshot_for(n_hosts)
    table = snap.routes["8080"]
    host = HOST.encode()
    path = b"/api/v1/items?id=42"
    hdrs = {b"host": host}

    def batch(k: int) -> None:
        for _ in range(k):
            vh = find_virtual_host(table, host)
            assert vh is not None
            match_route(vh, path, hdrs)

    return _runs(batch, n, repeat)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.micro", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    n, repeat = (5000, 3) if args.quick else (50000, 7)
    rows = {
        "full request path (parse, route, checkout, serialize, response)": bench_request_path(n, repeat),
        "  ... with tracing configured, 1% sampling": bench_request_path(n, repeat, 1.0),
        "  ... with tracing configured, 100% sampling (collector down: spans dropped)": bench_request_path(n, repeat, 100.0),
        "  ... with a 1000-route table (1000 services, one route each)": bench_request_path(n, repeat, n_hosts=1000),
        "httptools parse of the request alone (floor)": bench_parse_only(n, repeat),
        "route lookup, 1 virtual host": bench_route(1, n * 4, repeat),
        "route lookup, 1000 virtual hosts": bench_route(1000, n * 4, repeat),
    }
    print(f"{'hot path, per request':<80} {'min us':>8} {'median us':>10}")
    print("-" * 100)
    for name, runs in rows.items():
        print(f"{name:<80} {min(runs):>8.2f} {statistics.median(runs):>10.2f}")
    full, parse = min(rows[next(iter(rows))]), min(rows["httptools parse of the request alone (floor)"])
    print(f"\nproxy work beyond parsing the request: {full - parse:.2f} us per request")
    if args.json:
        args.json.write_text(json.dumps({k: v for k, v in rows.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
