"""Standalone mode: a directory of Istio YAML, translated in-process.

The same pipeline the control server will feed: ``control.translate`` turns
the YAML into xDS v3 resources, ``compile`` turns those into a snapshot. This
is the only proxy module that imports ``control`` (and only its translator).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from control.translate import ConfigError, NodeInfo, load_dir, translate
from proxy.compile import XdsResources, compile_snapshot
from proxy.errors import InvalidResource
from proxy.model import Snapshot

log = logging.getLogger("pillion.standalone")


class ConfigLoadError(Exception):
    """The directory cannot be served; ``problems`` says where and why, one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class StandaloneSource:
    def __init__(self, config_dir: str, *, namespace: str, labels: Mapping[str, str], name: str = "",
                 cert_dir: str | None = None, intercept: bool = False) -> None:
        self.config_dir = config_dir
        self.cert_dir = cert_dir
        self.node = NodeInfo(namespace=namespace, labels=dict(labels), name=name, intercept=intercept)

    def load(self) -> tuple[XdsResources, Snapshot]:
        """Read, translate and compile the directory. Raises ConfigLoadError."""
        try:
            cfg = load_dir(self.config_dir)
            res = translate(cfg, self.node)
        except ConfigError as e:
            raise ConfigLoadError([str(p) for p in e.problems] or [str(e)]) from None
        except OSError as e:
            raise ConfigLoadError([f"{self.config_dir}: {e.strerror or e}"]) from None
        xr = XdsResources(tuple(res.listeners), tuple(res.routes), tuple(res.clusters), tuple(res.endpoints),
                          self._secrets())
        try:
            snap = compile_snapshot(xr)
        except InvalidResource as e:
            raise ConfigLoadError([f"{self.config_dir}: translated resource rejected by the proxy: {e}"]) from None
        return xr, snap

    def _secrets(self) -> tuple[secret_pb2.Secret, ...]:
        """The workload certificate and mesh roots from files, as the SDS secrets Istio names
        ``default`` and ``ROOTCA`` (files as Istio mounts them: cert-chain.pem, key.pem, root-cert.pem)."""
        if not self.cert_dir:
            return ()
        d = Path(self.cert_dir)
        try:
            chain, key, roots = ((d / n).read_bytes() for n in ("cert-chain.pem", "key.pem", "root-cert.pem"))
        except OSError as e:
            raise ConfigLoadError([f"{self.cert_dir}: {e.strerror or e}: {getattr(e, 'filename', '')}"]) from None
        default = secret_pb2.Secret(name="default")
        default.tls_certificate.certificate_chain.inline_bytes = chain
        default.tls_certificate.private_key.inline_bytes = key
        rootca = secret_pb2.Secret(name="ROOTCA")
        rootca.validation_context.trusted_ca.inline_bytes = roots
        return (default, rootca)

    async def watch(self, on_change: Callable[[], Awaitable[object]], stop: asyncio.Event) -> None:
        """Call ``on_change`` after each burst of edits in the directory (debounced)."""
        import watchfiles

        paths = [self.config_dir] + ([self.cert_dir] if self.cert_dir else [])
        async for _changes in watchfiles.awatch(*paths, stop_event=stop, debounce=300, step=50,
                                                 recursive=False, rust_timeout=1000):
            await on_change()
