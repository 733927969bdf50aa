"""The proxies' input for the macro benchmark: Istio YAML for one sidecar, written to a dir.

The sidecar is ``app=bench`` in namespace ``default``. Its Sidecar resource opens two
egress listeners on 127.0.0.1 without capture: an HTTP port and a TCP port. An HTTP
egress port's routes are built per port number from the services that have a port with
that number, so the ServiceEntry's service ports are the listen ports, and the endpoint
maps each port name to the real upstream port.

Clients reach the HTTP port with ``Host: upstream.default.svc.cluster.local``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

NAMESPACE = "default"
LABELS = {"app": "bench"}
SERVICE_HOST = "upstream.default.svc.cluster.local"

TEMPLATE = """\
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: upstream, namespace: default}}
spec:
  hosts: [{host}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: {http_listen}, name: http, protocol: HTTP}}
  - {{number: {tcp_listen}, name: tcp, protocol: TCP}}
  endpoints:
  - address: 127.0.0.1
    ports: {{http: {http_upstream}, tcp: {tcp_upstream}}}
---
apiVersion: networking.istio.io/v1beta1
kind: Sidecar
metadata: {{name: bench, namespace: default}}
spec:
  workloadSelector: {{labels: {{app: bench}}}}
  egress:
  - port: {{number: {http_listen}, protocol: HTTP, name: http}}
    bind: 127.0.0.1
    captureMode: NONE
    hosts: ["./*"]
  - port: {{number: {tcp_listen}, protocol: TCP, name: tcp}}
    bind: 127.0.0.1
    captureMode: NONE
    hosts: ["./*"]
"""


@dataclass(frozen=True, slots=True)
class BenchPorts:
    """Where the sidecar listens and where the upstream apps really are."""

    http_listen: int
    tcp_listen: int
    http_upstream: int
    tcp_upstream: int


def render(ports: BenchPorts) -> str:
    return TEMPLATE.format(
        host=SERVICE_HOST,
        http_listen=ports.http_listen,
        tcp_listen=ports.tcp_listen,
        http_upstream=ports.http_upstream,
        tcp_upstream=ports.tcp_upstream,
    )


def write_config_dir(directory: Path, ports: BenchPorts) -> Path:
    """Write ``bench.yaml`` into ``directory`` (created if missing) and return the dir."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bench.yaml").write_text(render(ports))
    return directory
