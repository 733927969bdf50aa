"""The proxy process: config source, workers, admin, signals, lifecycle.

``Supervisor.run`` reads as the lifecycle: load the first config (a bad one
is fatal at start: there is nothing good to keep serving), start the workers
(in this process for ``--concurrency 1``, else N processes sharing the
listeners through SO_REUSEPORT), apply the snapshot, open the admin API,
then serve until SIGTERM/SIGINT or ``/quitquitquit``; a config change is
applied without a restart, a bad one is logged with file, resource and field
and the old config keeps serving. Shutdown drains every worker for up to
``--drain-seconds`` and exits 0. Signals are handled only here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

from proxy.admin import AdminServer
from proxy.compile import XdsResources, compile_snapshot, dump_resources
from proxy.model import Snapshot
from proxy.options import ProxyOptions
from proxy.standalone import ConfigLoadError, StandaloneSource
from proxy.stats import merge
from proxy.worker import Worker, recv_msg, send_msg

if TYPE_CHECKING:
    from proxy.ca_client import CertManager
    from proxy.xds_client import XdsClient

log = logging.getLogger("pillion")


class LocalWorker:
    """The worker running on the supervisor's own loop (``--concurrency 1``)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def apply(self, snap: Snapshot) -> list[str]:
        return await self.worker.apply(snap)

    async def stats(self) -> dict[str, Any]:
        return self.worker.export_stats()

    async def drain_listeners(self) -> None:
        self.worker.drain_listeners()

    async def drain(self, seconds: float, exit_on_zero: bool = False) -> None:
        await self.worker.drain(seconds, exit_on_zero)

    def ports(self) -> dict[str, int]:
        return self.worker.listeners.ports()


class ProcessWorker:
    """A worker process, driven over a socket pair."""

    def __init__(self, index: int, opts: ProxyOptions) -> None:
        self.index = index
        self.opts = opts
        self.proc: asyncio.subprocess.Process | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.lock = asyncio.Lock()

    async def start(self) -> None:
        parent, child = socket.socketpair()
        node = ",".join(f"{k}={v}" for k, v in self.opts.node().items())
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy.worker", "--fd", str(child.fileno()), "--index", str(self.index),
            "--node", node, "--tick", str(self.opts.tick_seconds), "--log-level", self.opts.log_level,
            pass_fds=(child.fileno(),),
        )
        child.close()
        self.reader, self.writer = await asyncio.open_unix_connection(sock=parent)

    async def _call(self, *msg: Any) -> Any:
        assert self.reader is not None and self.writer is not None
        async with self.lock:
            await send_msg(self.writer, msg)
            return await recv_msg(self.reader)

    async def apply(self, snap: Snapshot) -> list[str]:
        reply = await self._call("apply", snap)
        return list(reply[1])

    async def stats(self) -> dict[str, Any]:
        return dict((await self._call("stats"))[1])

    async def drain_listeners(self) -> None:
        await self._call("drain_listeners")

    async def drain(self, seconds: float, exit_on_zero: bool = False) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await self._call("drain", seconds, exit_on_zero)
        if self.proc is not None:
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    def ports(self) -> dict[str, int]:
        return {}


class Supervisor:
    def __init__(self, opts: ProxyOptions, *, install_signals: bool = True) -> None:
        self.opts = opts
        self.install_signals = install_signals
        self.source = StandaloneSource(opts.config_dir or ".", namespace=opts.namespace,
                                       labels=opts.labels, name=opts.workload, cert_dir=opts.cert_dir,
                                       intercept=opts.intercept)
        # gRPC and the CA client are imported only when used: a standalone sidecar stays small.
        self.xds: XdsClient | None = None
        if opts.xds:
            from proxy.xds_client import NodeIdentity, XdsClient

            identity = NodeIdentity(namespace=opts.namespace, name=opts.workload, labels=dict(opts.labels),
                                    service_account=opts.service_account, workload_group=opts.workload_group,
                                    ip=opts.instance_ip, intercept=opts.intercept)
            self.xds = XdsClient(opts.xds, identity, self._apply_xds)
        self.certs: CertManager | None = None
        if opts.ca_address:
            from certs.spiffe import SpiffeId
            from proxy.ca_client import CertManager

            spiffe = SpiffeId(opts.trust_domain, opts.namespace, opts.service_account)
            self.certs = CertManager(opts.ca_address, opts.token_file or "", spiffe, self._on_secrets,
                                     validity_seconds=int(opts.cert_validity_hours * 3600))
        self.raw_resources: XdsResources | None = None  # as the config source gave them
        self.workers: list[LocalWorker | ProcessWorker] = []
        self.admin = AdminServer(self)
        self.admin_port = 0
        self.resources = XdsResources()
        self.snapshot: Snapshot | None = None
        self.bind_errors: list[str] = []
        self.last_error: list[str] = []
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.started_at = time.time()
        self.stopping = asyncio.Event()
        self.ready_event = asyncio.Event()
        self.draining = False
        self.reload_attempts = asyncio.Condition()  # notified after every reload, good or bad
        self.draining_event = asyncio.Event()  # SIGTERM/quit handled: listeners stopped accepting
        self.stopped = asyncio.Event()  # drained and closed

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> int:
        opts = self.opts
        loop = asyncio.get_running_loop()
        first: tuple[XdsResources, Snapshot] | None = None
        if self.xds is None:
            try:
                first = self.source.load()
            except ConfigLoadError as e:
                for p in e.problems:
                    log.error("config: %s", p)
                log.error("no valid configuration in %s; not starting", opts.config_dir)
                return 1
        try:
            self.admin_port = await self.admin.start(opts.admin_address, opts.admin_port)
            for port in (opts.status_port, opts.prometheus_port):
                if port is not None:
                    await self.admin.start("0.0.0.0", port)
        except OSError as e:
            log.error("admin: cannot bind %s:%s: %s", opts.admin_address, opts.admin_port, e.strerror or e)
            return 1
        log.info("admin listening on %s:%d", opts.admin_address, self.admin_port)
        if opts.concurrency <= 1:
            self.workers = [LocalWorker(Worker(loop, node=opts.node(), tick_seconds=opts.tick_seconds))]
        else:
            self.workers = [ProcessWorker(i, opts) for i in range(opts.concurrency)]
            await asyncio.gather(*(w.start() for w in self.workers))  # type: ignore[union-attr]
        if self.install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.quit)
        cert_task = loop.create_task(self.certs.run(self.stopping)) if self.certs is not None else None
        if first is not None:
            await self._apply(*first)
            follower = loop.create_task(self._watch()) if opts.watch else None
        else:
            assert self.xds is not None
            log.info("following the control server at %s", self.xds.address)
            follower = loop.create_task(self.xds.run(self.stopping))
        await self.stopping.wait()
        log.info("draining for up to %.1fs", opts.drain_seconds)
        self.draining = True
        for task in (follower, cert_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        drains = [asyncio.ensure_future(w.drain(opts.drain_seconds, opts.exit_on_zero_active_connections))
                  for w in self.workers]
        local = [w.worker.drain_started.wait() for w in self.workers if isinstance(w, LocalWorker)]
        await asyncio.gather(*local)
        self.draining_event.set()
        await asyncio.gather(*drains)
        self.admin.close()
        self.stopped.set()
        log.info("stopped")
        return 0

    async def _apply_xds(self, resources: XdsResources, snap: Snapshot) -> None:
        await self._apply(resources, snap)
        log.info("config version %s from %s applied (%d listener(s))", snap.version,
                 self.xds.address if self.xds else "?", len(snap.listeners))

    async def _on_secrets(self, secrets: tuple[Any, ...]) -> None:
        """A new workload certificate: recompile the current config with it (new handshakes use it)."""
        if self.raw_resources is not None:
            await self._apply(self.raw_resources, None)

    def _with_local_secrets(self, resources: XdsResources) -> XdsResources:
        local = self.certs.secrets if self.certs is not None else ()
        if not local:
            return resources
        names = {sec.name for sec in local}
        return dataclasses.replace(resources, secrets=tuple(
            [sec for sec in resources.secrets if sec.name not in names] + list(local)))

    async def _apply(self, resources: XdsResources, snap: Snapshot | None) -> None:
        self.raw_resources = resources
        merged = self._with_local_secrets(resources)
        if snap is None or merged is not resources:
            snap = compile_snapshot(merged)
        resources = merged
        results = await asyncio.gather(*(w.apply(snap) for w in self.workers))
        errors = sorted({e for r in results for e in r})
        for e in errors:
            log.error("%s", e)
        self.bind_errors = errors
        self.resources = resources
        self.snapshot = snap
        if not self.ready_event.is_set() and (self.certs is None or self.certs.have_cert.is_set()):
            self.ready_event.set()
            _ok, why = self.ready()
            log.info("%s (config version %s, %d listener(s), %d worker(s))", why, snap.version,
                     len(snap.listeners), len(self.workers))

    async def reload(self) -> bool:
        """Re-read the config directory; keep the current config if the new one is bad."""
        try:
            return await self._reload()
        finally:
            async with self.reload_attempts:
                self.reload_attempts.notify_all()

    async def _reload(self) -> bool:
        try:
            resources, snap = self.source.load()
        except ConfigLoadError as e:
            self.reloads_failed += 1
            self.last_error = e.problems
            current = self.snapshot.version if self.snapshot else "none"
            for p in e.problems:
                log.error("config rejected: %s", p)
            log.error("keeping config version %s", current)
            return False
        self.last_error = []
        if self.snapshot is not None and snap.version == self.snapshot.version:
            return True
        await self._apply(resources, snap)
        self.reloads_ok += 1
        log.info("config version %s applied (%d listener(s))", snap.version, len(snap.listeners))
        return True

    async def _watch(self) -> None:
        try:
            await self.source.watch(self.reload, self.stopping)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("config watch failed; changes will not be picked up")

    # ------------------------------------------------------------------ AdminBackend
    def ready(self) -> tuple[bool, str]:
        if self.draining:
            return False, "DRAINING"
        if self.certs is not None and not self.certs.have_cert.is_set():
            return False, f"NOT READY: no workload certificate yet from {self.certs.ca_address}"
        if self.snapshot is None:
            if self.xds is not None:
                return False, f"NOT READY: waiting for the first complete config from {self.xds.address}"
            return False, "NOT READY: no configuration"
        if self.bind_errors:
            return False, "NOT READY: " + "; ".join(self.bind_errors)
        return True, "LIVE"

    async def stats_export(self) -> dict[str, Any]:
        return merge(await asyncio.gather(*(w.stats() for w in self.workers)))

    def prometheus_extra(self) -> dict[str, float]:
        return {
            "pillion_config_reloads_total": float(self.reloads_ok),
            "pillion_config_reload_failures_total": float(self.reloads_failed),
            "pillion_workers": float(len(self.workers)),
            **self._xds_metrics(),
            **(self.certs.metrics() if self.certs is not None else {}),
        }

    def _xds_metrics(self) -> dict[str, float]:
        if self.xds is None:
            return {}
        st = self.xds.status()
        out = {"pillion_xds_connected": float(st["connected"]), "pillion_xds_connects_total": float(st["connects"])}
        for short, t in st["types"].items():
            out[f"pillion_xds_{short.lower()}_acks_total"] = float(t["acks"])
            out[f"pillion_xds_{short.lower()}_nacks_total"] = float(t["nacks"])
        return out

    def node(self) -> dict[str, str]:
        return self.opts.node()

    def config_dump(self) -> dict[str, Any]:
        version = self.snapshot.version if self.snapshot else ""
        dump = dump_resources(self.resources, version)
        dump["pillion"] = {"version": version, "last_rejected_config": self.last_error,
                           "bind_errors": self.bind_errors,
                           "xds": self.xds.status() if self.xds is not None else None,
                           "certificate": self.certs.status() if self.certs is not None else None}
        return dump

    def clusters_text(self, stats: dict[str, Any]) -> str:
        lines = []
        cstats = stats.get("clusters", {})
        for name, c in sorted((self.snapshot.clusters if self.snapshot else {}).items()):
            s = cstats.get(name, {})
            for key in ("rq_total", "rq_active", "cx_active", "cx_connect_fail", "rq_retry", "rq_pending_overflow",
                        "ejections_active"):
                lines.append(f"{name}::{key}::{s.get(key, 0)}")
            ejected = s.get("ejected", {})
            for ep in c.endpoints:
                lines.append(f"{name}::{ep.host}:{ep.port}::weight::{ep.weight}")
                health = "/failed_outlier_check" if ejected.get(ep.address) else "healthy"  # Envoy's spelling
                lines.append(f"{name}::{ep.host}:{ep.port}::health_flags::{health}")
        return "\n".join(lines) + "\n"

    def listeners_info(self) -> list[dict[str, Any]]:
        ports: dict[str, int] = {}
        for w in self.workers:
            ports.update(w.ports())
        out = []
        for ls in self.snapshot.listeners if self.snapshot else ():
            out.append({"name": ls.name, "address": ls.address, "port": ports.get(ls.name, ls.port),
                        "protocol": ls.protocol.value, "direction": ls.direction.value})
        return out

    def server_info(self) -> dict[str, Any]:
        _ok, why = self.ready()
        return {"state": why, "version": self.snapshot.version if self.snapshot else "",
                "uptime_seconds": round(time.time() - self.started_at, 3), "pid": os.getpid(),
                "concurrency": len(self.workers), "node": self.opts.node(),
                "command_line_options": {"config_dir": self.opts.config_dir, "admin_port": self.admin_port,
                                         "drain_seconds": self.opts.drain_seconds}}

    async def drain_listeners(self) -> None:
        await asyncio.gather(*(w.drain_listeners() for w in self.workers))

    def quit(self) -> None:
        self.stopping.set()
