"""Istio YAML for tests: one sidecar (app=client) with explicit listeners."""

from __future__ import annotations

from pathlib import Path

HOST = "upstream.default.svc.cluster.local"


def service_entry(name: str, host: str, ports: list[tuple[str, int, str]], endpoints: list[tuple[str, dict[str, int], dict[str, str]]]) -> str:
    """``ports``: (name, number, protocol); ``endpoints``: (address, {port name: port}, labels)."""
    lines = [
        "apiVersion: networking.istio.io/v1beta1", "kind: ServiceEntry",
        f"metadata: {{name: {name}, namespace: default}}", "spec:", f"  hosts: [{host}]",
        "  location: MESH_INTERNAL", "  resolution: STATIC", "  ports:",
    ]
    for pname, num, proto in ports:
        lines.append(f"  - {{number: {num}, name: {pname}, protocol: {proto}}}")
    lines.append("  endpoints:")
    for addr, eports, labels in endpoints:
        ep = ", ".join(f"{k}: {v}" for k, v in eports.items())
        lab = ", ".join(f"{k}: {v}" for k, v in labels.items())
        lines.append(f"  - {{address: {addr}, ports: {{{ep}}}" + (f", labels: {{{lab}}}" if lab else "") + "}")
    return "\n".join(lines) + "\n"


def sidecar(egress: list[tuple[int, str]], ingress: list[tuple[int, str, str]] | None = None, app: str = "client") -> str:
    """``egress``: (port, protocol); ``ingress``: (port, protocol, defaultEndpoint)."""
    lines = [
        "apiVersion: networking.istio.io/v1beta1", "kind: Sidecar",
        f"metadata: {{name: {app}, namespace: default}}", "spec:",
        f"  workloadSelector: {{labels: {{app: {app}}}}}",
    ]
    if ingress:
        lines.append("  ingress:")
        for port, proto, ep in ingress:
            lines.append(f"  - port: {{number: {port}, protocol: {proto}, name: {proto.lower()}-{port}}}")
            lines.append(f"    defaultEndpoint: {ep}")
    if egress:
        lines.append("  egress:")
        for port, proto in egress:
            lines.append(f"  - port: {{number: {port}, protocol: {proto}, name: {proto.lower()}-{port}}}")
            lines.append("    bind: 127.0.0.1")
            lines.append("    captureMode: NONE")
            lines.append('    hosts: ["./*"]')
    return "\n".join(lines) + "\n"


def simple_mesh(http_port: int, upstream_ports: list[int], tcp_port: int | None = None,
                tcp_upstream: int | None = None, extra: str = "") -> str:
    """An HTTP egress listener on ``http_port`` to HOST (endpoints ``upstream_ports``), optionally TCP too."""
    ports = [("http", http_port, "HTTP")]
    if tcp_port is not None:
        ports.append(("tcp", tcp_port, "TCP"))
    eps = []
    for i, p in enumerate(upstream_ports):
        e = {"http": p}
        if tcp_upstream is not None:
            e["tcp"] = tcp_upstream
        eps.append(("127.0.0.1", e, {"version": f"v{i + 1}"}))
    if not eps and tcp_upstream is not None:
        eps.append(("127.0.0.1", {"tcp": tcp_upstream}, {}))
    egress = [(http_port, "HTTP")] + ([(tcp_port, "TCP")] if tcp_port is not None else [])
    docs = [service_entry("upstream", HOST, ports, eps), sidecar(egress)]
    if extra:
        docs.append(extra)
    return "---\n".join(docs)


def write(config_dir: Path, text: str, name: str = "mesh.yaml") -> Path:
    config_dir.mkdir(parents=True, exist_ok=True)
    path = config_dir / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
