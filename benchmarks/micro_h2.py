"""In-process HTTP/2 hot-path benchmark: the proxy's own per-request cost, no sockets.

The HTTP/2 counterpart of ``benchmarks.micro``. A client's HTTP/2 frames go
into ``H2ServerConnection.data_received`` (h2 parse, ``H2Stream.prepare``,
route, pool checkout of a warm upstream connection), the upstream's response
goes into the upstream connection's ``data_received`` and comes back out as
HTTP/2 frames, written to an in-memory sink. Rows:

- ``h2 GET -> HTTP/1.1``: a GET (HEADERS with END_STREAM), the upstream a
  keep-alive HTTP/1.1 connection (``200 hello``), as in ``benchmarks.h2bench``'s
  ``h2_get``;
- ``h2 gRPC unary -> HTTP/1.1``: HEADERS + one DATA (a 5-byte gRPC frame header
  and a 64-byte message, END_STREAM), the upstream HTTP/1.1 (chunked request),
  as in ``h2bench``'s ``grpc_unary``;
- ``h2 gRPC unary -> h2``: the same request to a GRPC port (HTTP/2 upstream,
  ``upstream_h2conn.H2UpstreamConnection`` on ``h2wire_client.ClientH2``);
  the upstream answers HEADERS, DATA, trailers (``grpc-status: 0``).

The client's header blocks are HPACK-encoded once (after the first request
every field is in the dynamic table, so each later block is the same bytes),
and the frames for all requests are built before timing. Each request runs
inside one coroutine step plus an ``await asyncio.sleep(0)``, so the
``call_soon`` flush of the HTTP/2 upstream happens as it does in production.
Microseconds per request (min and median of several runs).

    python -m benchmarks.micro_h2 [--quick] [--profile ROW] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpack import Encoder
from hyperframe.frame import DataFrame, HeadersFrame, SettingsFrame, WindowUpdateFrame

from benchmarks.micro import SinkTransport
from control.translate import NodeInfo, load_dir, translate
from proxy.compile import XdsResources, compile_snapshot
from proxy.context import Context
from proxy.h2conn import H2ServerConnection
from proxy.upstream import UpstreamConnection
from proxy.upstream_h2 import H2UpstreamConnection

HOST = "upstream.default.svc.cluster.local"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GRPC_MSG = b"\x00" + (64).to_bytes(4, "big") + b"m" * 64
H1_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\nServer: bench\r\n\r\nhello\n"
H1_GRPC_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/grpc\r\nContent-Length: 69\r\n\r\n" + GRPC_MSG)


def _yaml(protocol: str) -> str:
    return f"""apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: up, namespace: default}}
spec:
  hosts: [{HOST}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: {protocol.lower()}, protocol: {protocol}}}]
  endpoints: [{{address: 127.0.0.1, ports: {{{protocol.lower()}: 9000}}}}]
---
apiVersion: networking.istio.io/v1beta1
kind: Sidecar
metadata: {{name: bench, namespace: default}}
spec:
  workloadSelector: {{labels: {{app: bench}}}}
  egress:
  - port: {{number: 8080, protocol: {protocol}, name: {protocol.lower()}}}
    bind: 127.0.0.1
    captureMode: NONE
    hosts: ["./*"]
"""


def snapshot_for(protocol: str):  # type: ignore[no-untyped-def]
    with tempfile.TemporaryDirectory() as d:
        Path(d, "mesh.yaml").write_text(_yaml(protocol))
        res = translate(load_dir(d), NodeInfo(namespace="default", labels={"app": "bench"}))
    return compile_snapshot(XdsResources(res.listeners, res.routes, res.clusters, res.endpoints))


def _stable_block(headers: list[tuple[bytes, bytes]], enc: Encoder) -> tuple[bytes, bytes]:
    """(the first block, every later block) of ``headers`` from one HPACK encoder."""
    return enc.encode(headers), enc.encode(headers)


def _headers_frame(sid: int, block: bytes, end: bool) -> bytes:
    f = HeadersFrame(sid, data=block)
    f.flags.add("END_HEADERS")
    if end:
        f.flags.add("END_STREAM")
    return f.serialize()


def _data_frame(sid: int, data: bytes, end: bool) -> bytes:
    f = DataFrame(sid, data=data)
    if end:
        f.flags.add("END_STREAM")
    return f.serialize()


def client_frames(count: int, grpc: bool) -> tuple[bytes, list[bytes]]:
    """The client's preface (SETTINGS, a large connection window) and ``count`` requests."""
    hdrs = [(b":method", b"POST" if grpc else b"GET"), (b":scheme", b"http"), (b":authority", HOST.encode()),
            (b":path", b"/bench.Svc/Unary" if grpc else b"/api/v1/items?id=42"), (b"user-agent", b"bench/1.0")]
    if grpc:
        hdrs += [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
    else:
        hdrs += [(b"accept", b"*/*"), (b"accept-encoding", b"gzip")]
    first, later = _stable_block(hdrs, Encoder())
    preface = PREFACE + SettingsFrame(0).serialize() + WindowUpdateFrame(0, window_increment=(1 << 31) - 1 - 65535
                                                                         ).serialize()
    reqs = []
    for i in range(count):
        sid = 2 * i + 1
        block = first if i == 0 else later
        if grpc:
            reqs.append(_headers_frame(sid, block, False) + _data_frame(sid, GRPC_MSG, True))
        else:
            reqs.append(_headers_frame(sid, block, True))
    return preface, reqs


def upstream_frames(count: int) -> tuple[bytes, list[bytes]]:
    """An HTTP/2 gRPC server's preface and ``count`` responses (HEADERS, DATA, trailers) on streams 1, 3, ..."""
    enc = Encoder()
    h_first, h_later = _stable_block([(b":status", b"200"), (b"content-type", b"application/grpc")], enc)
    t_first, t_later = _stable_block([(b"grpc-status", b"0")], enc)
    preface = (SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: (1 << 31) - 1}).serialize()
               + WindowUpdateFrame(0, window_increment=(1 << 31) - 1 - 65535).serialize())
    resps = []
    for i in range(count):
        sid = 2 * i + 1
        resps.append(_headers_frame(sid, h_first if i == 0 else h_later, False) + _data_frame(sid, GRPC_MSG, False)
                     + _headers_frame(sid, t_first if i == 0 else t_later, True))
    return preface, resps


def bench(row: str, n: int, repeat: int, profile: Path | None = None) -> list[float]:
    """Microseconds per request for ``row`` ("get", "grpc_h1" or "grpc_h2")."""
    import uvloop

    loop = uvloop.new_event_loop()
    grpc = row != "get"
    to_h2 = row == "grpc_h2"
    warm = 200
    total = warm + n * repeat
    try:
        snap = snapshot_for("GRPC" if to_h2 else "HTTP")
        ctx = Context(loop)
        ctx.swap(snap)
        listener = snap.listeners[0]
        conn = H2ServerConnection(ctx, listener, ctx.stats.listener(listener.name))
        down = SinkTransport()
        conn.connection_made(down)  # type: ignore[arg-type]
        preface, reqs = client_frames(total, grpc)
        conn.data_received(preface)
        rt = ctx.clusters.get(f"outbound|8080||{HOST}")
        assert rt is not None
        ep = rt.spec.endpoints[0]
        up_sink = SinkTransport()
        up: Any
        if to_h2:
            h2pool = rt.h2_pool(ep, loop)
            up = H2UpstreamConnection(h2pool)
            up.connection_made(up_sink)  # type: ignore[arg-type]
            up_preface, resps = upstream_frames(total)
            up.data_received(up_preface)
            up.ready = True
            h2pool.conns.append(up)
            rt.stats.cx_active += 1
        else:
            pool = rt.pool(ep, loop)
            up = UpstreamConnection(pool)
            up.connection_made(up_sink)  # type: ignore[arg-type]
            pool.put(up)
            resps = [H1_GRPC_RESPONSE if grpc else H1_RESPONSE] * total
        feed, answer = conn.data_received, up.data_received
        pos = 0

        async def batch(k: int) -> None:
            nonlocal pos
            sleep0 = asyncio.sleep
            for i in range(pos, pos + k):
                feed(reqs[i])
                await sleep0(0)
                answer(resps[i])
            pos += k

        def timed(k: int) -> float:
            t0 = time.perf_counter()
            loop.run_until_complete(batch(k))
            return (time.perf_counter() - t0) / k * 1e6

        timed(warm)
        before = down.written
        prof = cProfile.Profile() if profile is not None else None
        runs = []
        for _ in range(repeat):
            if prof is not None:
                prof.enable()
            runs.append(timed(n))
            if prof is not None:
                prof.disable()
        assert down.written > before and not conn.streams, "the requests did not take the full path"
        assert up_sink.written and not down.closed
        if prof is not None and profile is not None:
            prof.dump_stats(str(profile))
            pstats.Stats(str(profile)).sort_stats("tottime").print_stats(30)
        return runs
    finally:
        loop.close()


ROWS: dict[str, str] = {
    "get": "h2 GET -> HTTP/1.1 upstream (h2bench h2_get)",
    "grpc_h1": "h2 gRPC unary POST -> HTTP/1.1 upstream (h2bench grpc_unary)",
    "grpc_h2": "h2 gRPC unary POST -> HTTP/2 upstream, with trailers",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.micro_h2", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--profile", choices=sorted(ROWS), help="cProfile this row (written to /tmp/micro_h2.prof)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    n, repeat = (3000, 3) if args.quick else (20000, 5)
    run: Callable[[str], list[float]] = lambda row: bench(row, n, repeat)  # noqa: E731
    if args.profile:
        bench(args.profile, n, repeat, Path("/tmp/micro_h2.prof"))
        return 0
    rows = {ROWS[r]: run(r) for r in ROWS}
    print(f"{'HTTP/2 hot path, per request':<70} {'min us':>8} {'median us':>10}")
    print("-" * 90)
    for name, runs in rows.items():
        print(f"{name:<70} {min(runs):>8.2f} {statistics.median(runs):>10.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
