"""Push latency and memory of `pillion control`: a YAML change -> every sidecar has ACKed it.

The control server runs as its own process (so its RSS is its own) with a
config directory it watches. The simulated sidecars are lightweight grpc.aio
ADS clients in this process, one channel each: they subscribe like a proxy
(CDS and LDS wildcard, EDS and RDS by the names those reference), ACK every
response at once, and note when they ACKed a new version of each type.

A case: start the server, connect N sidecars and wait until all hold every
type, then change one endpoint address in the YAML (an EDS-only change) and
measure from just before the file write until every sidecar has ACKed the new
EDS version (and the median sidecar). This includes the file watch, the
debounce (set to 20 ms here), reading and validating the whole directory,
translation, and the push to every stream; "change loaded" is when the
server had the new config (from /debug/config), the rest is translation and push.

    .venv/bin/python -m benchmarks.push                  # 10/100/1000 streams + the large config
    .venv/bin/python -m benchmarks.push --quick          # 10/100 streams, 100 services
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2

REPO = Path(__file__).resolve().parents[1]
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
MIB = 1024 * 1024


def _lite_response_class() -> Any:
    """DiscoveryResponse with only version_info, type_url and nonce: the resources stay unparsed bytes."""
    file = descriptor_pb2.FileDescriptorProto(name="pillion_bench_lite.proto", package="pillion.bench", syntax="proto3")
    message = file.message_type.add(name="LiteResponse")
    for name, number in (("version_info", 1), ("type_url", 4), ("nonce", 5)):
        message.field.add(name=name, number=number, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                          label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("pillion.bench.LiteResponse"))


LiteResponse = _lite_response_class()


def mesh(services: int, *, moved: bool = False) -> str:
    """`services` ServiceEntries (3 versions each, as subsets) and one Sidecar for app=bench."""
    docs = []
    for i in range(services):
        last = "9" if moved and i == 0 else "3"
        docs.append(f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: svc-{i}, namespace: default}}
spec:
  hosts: [svc-{i}.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9080, name: http}}]
  endpoints:
  - {{address: 10.{i // 250}.{i % 250}.1, labels: {{version: v1}}}}
  - {{address: 10.{i // 250}.{i % 250}.2, labels: {{version: v2}}}}
  - {{address: 10.{i // 250}.{i % 250}.{last}, labels: {{version: v3}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: svc-{i}, namespace: default}}
spec:
  host: svc-{i}.default.svc.cluster.local
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}, {{name: v3, labels: {{version: v3}}}}]
""")
    docs.append("""\
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: bench, namespace: default}
spec:
  workloadSelector: {labels: {app: bench}}
  egress:
  - port: {number: 9080, name: http}
    bind: 127.0.0.1
    hosts: ["./*"]
""")
    return "---\n".join(docs)


class Names:
    """EDS names of a CDS version and RDS names of an LDS version, parsed once for all sidecars."""

    def __init__(self) -> None:
        self.cache: dict[tuple[str, str], list[str]] = {}

    def of(self, type_url: str, version: str, data: bytes) -> list[str]:
        key = (type_url, version)
        if key not in self.cache:
            response = discovery_pb2.DiscoveryResponse.FromString(data)
            names: set[str] = set()
            for packed in response.resources:
                if type_url == CDS:
                    cluster = cluster_pb2.Cluster()
                    packed.Unpack(cluster)
                    if cluster.type == cluster_pb2.Cluster.EDS:
                        names.add(cluster.eds_cluster_config.service_name or cluster.name)
                else:
                    listener = listener_pb2.Listener()
                    packed.Unpack(listener)
                    for chain in listener.filter_chains:
                        for f in chain.filters:
                            if f.typed_config.Is(hcm_pb2.HttpConnectionManager.DESCRIPTOR):
                                manager = hcm_pb2.HttpConnectionManager()
                                f.typed_config.Unpack(manager)
                                if manager.HasField("rds"):
                                    names.add(manager.rds.route_config_name)
            self.cache[key] = sorted(names)
        return self.cache[key]


@dataclass
class Sidecar:
    index: int
    names: Names
    versions: dict[str, str] = field(default_factory=dict)
    acked_at: dict[str, float] = field(default_factory=dict)  # type -> when a new version was ACKed
    queue: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = field(default_factory=asyncio.Queue)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def node(self) -> base_pb2.Node:
        metadata = struct_pb2.Struct()
        metadata.update({"NAMESPACE": "default", "NAME": f"bench-{self.index}"})
        metadata.get_or_create_struct("LABELS").update({"app": "bench"})
        return base_pb2.Node(id=f"sidecar~127.0.0.1~bench-{self.index}.default~default.svc.cluster.local",
                             metadata=metadata)

    async def requests(self) -> Any:
        while (request := await self.queue.get()) is not None:
            yield request.SerializeToString()

    async def run(self, port: int) -> None:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 256 * MIB)]
        ) as channel:
            call = channel.stream_stream(METHOD)(self.requests())
            self.queue.put_nowait(discovery_pb2.DiscoveryRequest(type_url=CDS, node=self.node()))
            self.queue.put_nowait(discovery_pb2.DiscoveryRequest(type_url=LDS))
            subscribed: dict[str, list[str]] = {CDS: [], LDS: [], EDS: [], RDS: []}
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
                async for data in call:
                    response = LiteResponse.FromString(data)
                    t, version = response.type_url, response.version_info
                    self.queue.put_nowait(discovery_pb2.DiscoveryRequest(
                        type_url=t, version_info=version, response_nonce=response.nonce,
                        resource_names=subscribed[t]))
                    if self.versions.get(t) != version:
                        self.versions[t] = version
                        self.acked_at[t] = time.perf_counter()
                    follow = {CDS: EDS, LDS: RDS}.get(t)
                    if follow is not None:
                        wanted = self.names.of(t, version, data)
                        if wanted != subscribed[follow]:
                            subscribed[follow] = wanted
                            self.queue.put_nowait(discovery_pb2.DiscoveryRequest(
                                type_url=follow, version_info=self.versions.get(follow, ""),
                                resource_names=wanted))
                    self.changed.set()
            self.queue.put_nowait(None)


@dataclass
class Server:
    process: subprocess.Popen[str]
    xds_port: int
    debug_port: int

    @classmethod
    async def start(cls, config_dir: Path) -> Server:
        call = (f"import sys; from control.cli import main; sys.exit(main(['control', '--config-dir', {str(config_dir)!r}, "
                "'--xds-port', '0', '--debug-port', '0', '--debounce', '0.02', '--log-level', 'warning']))")
        process = subprocess.Popen([sys.executable, "-c", call], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 120)
        if not line.startswith("pillion control: xds="):
            raise RuntimeError(f"control server did not start: {line!r}")
        ports = dict(part.split("=", 1) for part in line.split()[2:])
        return cls(process, int(ports["xds"].rsplit(":", 1)[1]), int(ports["debug"].rsplit(":", 1)[1]))

    def config(self) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.debug_port}/debug/config", timeout=10) as response:
            return json.load(response)

    def rss(self) -> int:
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def wait_all(sidecars: list[Sidecar], check: Any, timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    for sidecar in sidecars:
        while not check(sidecar):
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError(f"sidecar {sidecar.index} did not get there in {timeout}s: {sidecar.versions}")
            sidecar.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sidecar.changed.wait(), left)


@dataclass
class Result:
    streams: int
    services: int
    sync_s: float
    loaded_ms: float
    push_all_ms: float
    push_p50_ms: float
    rss_idle_mib: float
    rss_mib: float


async def run_case(streams: int, services: int, timeout: float) -> Result:
    with tempfile.TemporaryDirectory(prefix="pillion-push-") as tmp:
        config_dir = Path(tmp)
        (config_dir / "mesh.yaml").write_text(mesh(services))
        server = await Server.start(config_dir)
        names = Names()
        sidecars = [Sidecar(i, names) for i in range(streams)]
        tasks: list[asyncio.Task[None]] = []
        try:
            rss_idle = server.rss()
            began = time.perf_counter()
            tasks = [asyncio.create_task(s.run(server.xds_port)) for s in sidecars]
            await wait_all(sidecars, lambda s: len(s.versions) == 4, timeout)
            sync_s = time.perf_counter() - began
            before = {s.index: s.versions[EDS] for s in sidecars}
            start, wall = time.perf_counter(), time.time()
            (config_dir / "mesh.yaml").write_text(mesh(services, moved=True))
            await wait_all(sidecars, lambda s: s.versions[EDS] != before[s.index], timeout)
            done = [s.acked_at[EDS] - start for s in sidecars]
            loaded = (await asyncio.to_thread(server.config))["loaded_at"] - wall
            return Result(streams, services, sync_s, loaded * 1000, max(done) * 1000,
                          statistics.median(done) * 1000, rss_idle / MIB, server.rss() / MIB)
        finally:
            for task in tasks:
                task.cancel()
            for sidecar in sidecars:
                sidecar.queue.put_nowait(None)
            await asyncio.gather(*tasks, return_exceptions=True)
            server.stop()


def table(results: list[Result]) -> str:
    header = ("streams", "services", "initial sync s", "change loaded ms", "all ACKed ms", "median ACK ms",
              "RSS no streams MiB", "RSS after push MiB")
    rows = [header] + [
        (str(r.streams), f"{r.services} x 3", f"{r.sync_s:.2f}", f"{r.loaded_ms:.0f}", f"{r.push_all_ms:.0f}",
         f"{r.push_p50_ms:.0f}",
         f"{r.rss_idle_mib:.0f}", f"{r.rss_mib:.0f}")
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


async def main_async(args: argparse.Namespace) -> int:
    plan = [(n, args.services) for n in args.streams] + [(n, args.large_services) for n in args.large_streams]
    results = []
    for streams, services in plan:
        print(f"case: {streams} streams, {services} services x 3 versions ...", file=sys.stderr, flush=True)
        results.append(await run_case(streams, services, args.timeout))
    print(table(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.push", description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--services", type=int, default=10, help="services (x 3 versions) for the latency cases")
    ap.add_argument("--large-services", type=int, default=1000)
    ap.add_argument("--large-streams", type=int, nargs="*", default=[1000])
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--quick", action="store_true", help="10 and 100 streams; the large case with 100 services")
    args = ap.parse_args(argv)
    if args.quick:
        args.streams, args.large_services, args.large_streams = [10, 100], 100, [100]
    import uvloop

    return int(uvloop.run(main_async(args)))


if __name__ == "__main__":
    sys.exit(main())
