"""`pillion control`: wiring and lifecycle of the control server.

Owns: `ControlOptions`, `ControlServer` (store -> registry merge -> cache ->
ADS push; the gRPC server on the xDS port and the debug server on the debug
port) and `run()` for the command line, which stops cleanly on SIGTERM or
SIGINT. It owns no protocol or translation logic.

    async with ControlServer(ControlOptions(config_dir="mesh/", xds_port=0, debug_port=0)) as server:
        ...  # server.xds_port, server.debug_port are the bound ports

Lifecycle: `start()` loads the config (a bad one is reported and waited out:
nothing is served until a good config exists, so a restarted server never
pushes an empty world over proxies that hold a good one), binds both ports,
then sets `ready`. With `ca_state_dir` the mesh CA (`control.ca_service`)
answers CreateCertificate on the xDS port too, as istiod does on 15012 (a
proxy's `--ca-address` defaults to its `--xds` address). `stop()` closes the ADS streams (grace period), the debug
server and the store watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import grpc

from certs.errors import CertError
from control.ads import AdsServer
from control.ca_service import CaService, load_or_create_ca, load_or_create_token_key
from control.cache import ResourceCache
from control.otlp_receiver import OtlpReceiver  # [tracing]
from control.registry import DEFAULT_GRACE_SECONDS, Registry
from control.status import DebugServer
from control.store import ConfigStore, FileStore
from control.translate import ConfigSet

log = logging.getLogger("pillion.control")


@dataclass(frozen=True)
class ControlOptions:
    config_dir: str
    address: str = "127.0.0.1"
    xds_port: int = 15010  # 0: any free port
    debug_port: int = 15014  # 0: any free port
    registration_grace: float = DEFAULT_GRACE_SECONDS  # seconds an auto-registered entry outlives its stream
    debounce: float = 0.1  # seconds of quiet before a changed config dir is reloaded
    watch: bool = True
    stop_grace: float = 1.0  # seconds streams get to finish on stop
    ca_state_dir: str | None = None  # also serve the mesh CA (IstioCertificateService) on the xDS port
    trust_domain: str = "cluster.local"  # of the CA created in ca_state_dir
    otlp_port: int | None = None  # [tracing] also receive OTLP/gRPC traces here (0: any free port)


class ControlServer:
    def __init__(self, options: ControlOptions, store: ConfigStore | None = None) -> None:
        self.options = options
        self.store: ConfigStore = store or FileStore(
            options.config_dir, debounce=options.debounce, watch=options.watch
        )
        self.cache = ResourceCache()
        self.registry = Registry(self._rebuild, grace=options.registration_grace)
        self.ads = AdsServer(self.cache, self.registry)
        self.debug = DebugServer(
            {
                "/debug/syncz": self.ads.status,
                "/debug/config": self.config_status,
                "/debug/registry": self.registry.status,
            },
            ready=self.is_ready,
        )
        # [tracing] the embedded OTLP receiver and its /debug/traces view
        self.otlp: OtlpReceiver | None = None
        self.otlp_port = 0
        if options.otlp_port is not None:
            self.otlp = OtlpReceiver()
            self.debug.views["/debug/traces"] = self.otlp.status
        # [tracing] end
        self.ready = asyncio.Event()
        self.xds_port = 0
        self.debug_port = 0
        self.rebuilds = 0
        self.registry_problems: tuple[str, ...] = ()
        self.started_at = 0.0
        self.ca: CaService | None = None
        self._grpc: grpc.aio.Server | None = None

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        self.started_at = time.time()
        self.store.subscribe(lambda _config: self._rebuild())
        await self.store.start()
        self._rebuild()
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", -1),
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ]
        )
        server.add_generic_rpc_handlers((self.ads.handler(),))
        if self.options.ca_state_dir:
            state = self.options.ca_state_dir
            self.ca = CaService(
                load_or_create_ca(state, self.options.trust_domain), load_or_create_token_key(state)
            )
            self.ca.add_to_server(server)
            self.cache.secrets = (self.ca.trust_bundle_secret(),)
        bound = server.add_insecure_port(f"{_host(self.options.address)}:{self.options.xds_port}")
        if bound == 0:
            raise OSError(f"cannot bind the xDS port {self.options.address}:{self.options.xds_port}")
        await server.start()
        self._grpc, self.xds_port = server, bound
        self.debug_port = await self.debug.start(self.options.address, self.options.debug_port)
        if self.otlp is not None and self.options.otlp_port is not None:  # [tracing]
            self.otlp_port = await self.otlp.start(_host(self.options.address), self.options.otlp_port)
        log.info("pillion control: xDS (ADS) on %s:%d, debug on %s:%d, config %s",
                 self.options.address, self.xds_port, self.options.address, self.debug_port,
                 self.options.config_dir)
        self.ready.set()

    async def stop(self) -> None:
        self.ready.clear()
        if self._grpc is not None:
            await self._grpc.stop(self.options.stop_grace)
            self._grpc = None
        await self.debug.stop()
        if self.otlp is not None:  # [tracing]
            await self.otlp.stop()
        await self.store.stop()
        self.registry.close()

    async def __aenter__(self) -> ControlServer:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- the push path ------------------------------------------------------------------

    def _rebuild(self) -> None:
        """The store or the registry changed: re-merge, and have every stream re-render."""
        config: ConfigSet | None = self.store.current
        if config is None:
            return
        merged, problems = self.registry.merge(config)
        if tuple(problems) != self.registry_problems:
            for problem in problems:
                log.error("registry: %s", problem)
        self.registry_problems = tuple(problems)
        self.cache.update(merged)
        self.rebuilds += 1
        self.ads.notify_all()

    # --- status ---------------------------------------------------------------------

    def is_ready(self) -> bool:
        return self.ready.is_set() and self.store.current is not None

    def config_status(self) -> dict[str, Any]:
        status = self.store.status()
        return {
            "source": status.source,
            "version": status.version,
            "loaded_at": status.loaded_at,
            "files": list(status.files),
            "problems": list(status.problems),
            "rejected_version": status.rejected_version,
            "rejected_at": status.rejected_at,
            "reloads": status.reloads,
            "generation": self.cache.generation,
            "node_problems": self.cache.problems(),
            "registry_problems": list(self.registry_problems),
            "streams": len(self.ads.connections),
            "ca": self.ca.stats() if self.ca is not None else None,
        }


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


async def serve(options: ControlOptions) -> int:
    """Run until SIGTERM/SIGINT; print the bound ports on stdout first."""
    server = ControlServer(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
    except (OSError, CertError, ValueError) as exc:
        print(f"pillion control: {exc}", file=sys.stderr)
        await server.stop()
        return 2
    print(f"pillion control: xds={options.address}:{server.xds_port} "
          f"debug={options.address}:{server.debug_port}", flush=True)
    try:
        await stop.wait()
        log.info("pillion control: stopping")
    finally:
        await server.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
    return 0


def run(options: ControlOptions, log_level: str = "info") -> int:
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(serve(options))
    return int(uvloop.run(serve(options)))

