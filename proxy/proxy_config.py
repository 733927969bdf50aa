"""``pillion proxy-config``: what a running sidecar is configured with, as tables.

Like ``istioctl proxy-config``, it reads the sidecar's admin API over HTTP
(``/config_dump``, ``/clusters``, ``/listeners``) and prints listeners,
routes, clusters, endpoints or secrets, as a table or as JSON. Secrets show
the certificate's identity and expiry (parsed with ``cryptography``); a
private key is never printed, not even the redacted placeholder.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

KINDS = ("listeners", "routes", "clusters", "endpoints", "secrets", "all")

Row = list[str]


def _get(admin: str, path: str, timeout: float) -> bytes:
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=timeout) as resp:  # the local admin API
        return bytes(resp.read())


def _dump_section(dump: dict[str, Any], suffix: str) -> dict[str, Any]:
    for cfg in dump.get("configs", []):
        if str(cfg.get("@type", "")).endswith(suffix):
            return dict(cfg)
    return {}


def _filters(chain: dict[str, Any]) -> list[dict[str, Any]]:
    return list(chain.get("filters", []))


def listeners_rows(dump: dict[str, Any], bound: list[dict[str, Any]]) -> tuple[Row, list[Row]]:
    ports = {b.get("name"): b.get("port") for b in bound}
    rows = []
    for item in _dump_section(dump, "ListenersConfigDump").get("dynamic_listeners", []):
        ln = item.get("active_state", {}).get("listener", {})
        sa = ln.get("address", {}).get("socket_address", {})
        chains = ln.get("filter_chains", [])
        kinds = []
        for ch in chains:
            tls = "tls" if "transport_socket" in ch else "plaintext"
            terminal = _filters(ch)[-1]["name"].rsplit(".", 1)[-1] if _filters(ch) else "-"
            kinds.append(f"{terminal}/{tls}")
        port = ports.get(item.get("name")) or sa.get("port_value", 0)
        rows.append([item.get("name", ""), sa.get("address", ""), str(port),
                     str(ln.get("traffic_direction", "UNSPECIFIED")).lower(), str(len(chains)),
                     ", ".join(kinds) or "-"])
    return ["NAME", "ADDRESS", "PORT", "DIRECTION", "CHAINS", "FILTER/TLS"], rows


def _match(m: dict[str, Any]) -> str:
    for key in ("prefix", "path", "safe_regex"):
        if key in m:
            v = m[key]
            return f"{key}={v.get('regex') if isinstance(v, dict) else v}"
    return "*"


def _route_cluster(r: dict[str, Any]) -> str:
    action = r.get("route", {})
    if "cluster" in action:
        return str(action["cluster"])
    weighted = action.get("weighted_clusters", {}).get("clusters", [])
    return ", ".join(f"{w.get('name')}({w.get('weight', 0)})" for w in weighted) or "-"


def routes_rows(dump: dict[str, Any]) -> tuple[Row, list[Row]]:
    configs = [c.get("route_config", {}) for c in _dump_section(dump, "RoutesConfigDump").get("dynamic_route_configs", [])]
    # inline route tables of inbound HTTP listeners
    for item in _dump_section(dump, "ListenersConfigDump").get("dynamic_listeners", []):
        for ch in item.get("active_state", {}).get("listener", {}).get("filter_chains", [])[:1]:
            for f in _filters(ch):
                rc = f.get("typed_config", {}).get("route_config")
                if rc:
                    configs.append({**rc, "name": rc.get("name") or f"{item.get('name')} (inline)"})
    rows = []
    for rc in configs:
        for vh in rc.get("virtual_hosts", []):
            domains = ", ".join(vh.get("domains", []))
            for r in vh.get("routes", []):
                rows.append([rc.get("name", ""), domains, _match(r.get("match", {})), _route_cluster(r)])
    return ["ROUTE", "DOMAINS", "MATCH", "CLUSTER"], rows


def _tls_mode(cluster: dict[str, Any]) -> str:
    if "transport_socket" in cluster:
        return "tls"
    if cluster.get("transport_socket_matches"):
        return "auto (" + "/".join(m.get("name", "?") for m in cluster["transport_socket_matches"]) + ")"
    return "plaintext"


def clusters_rows(dump: dict[str, Any]) -> tuple[Row, list[Row]]:
    rows = []
    for item in _dump_section(dump, "ClustersConfigDump").get("dynamic_active_clusters", []):
        c = item.get("cluster", {})
        n = sum(len(loc.get("lb_endpoints", [])) for loc in c.get("load_assignment", {}).get("endpoints", []))
        eds = _dump_section(dump, "EndpointsConfigDump").get("dynamic_endpoint_configs", [])
        for e in eds:
            cla = e.get("endpoint_config", {})
            if cla.get("cluster_name") == c.get("name"):
                n += sum(len(loc.get("lb_endpoints", [])) for loc in cla.get("endpoints", []))
        rows.append([c.get("name", ""), str(c.get("type", "EDS" if "eds_cluster_config" in c else "STATIC")),
                     str(n), _tls_mode(c)])
    return ["NAME", "TYPE", "ENDPOINTS", "TLS"], rows


def endpoints_rows(clusters_text: str) -> tuple[Row, list[Row]]:
    """From /clusters: ``name::host:port::weight::N`` and ``::health_flags::...`` lines."""
    found: dict[tuple[str, str], dict[str, str]] = {}
    for line in clusters_text.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[2] in ("weight", "health_flags"):
            found.setdefault((parts[0], parts[1]), {})[parts[2]] = parts[3]
    rows = [[name, addr, v.get("health_flags", "-").upper(), v.get("weight", "-")]
            for (name, addr), v in sorted(found.items())]
    return ["CLUSTER", "ADDRESS", "HEALTH", "WEIGHT"], rows


def _cert_info(pem: bytes) -> tuple[str, str]:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return "-", "-"
    ident = "-"
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        ident = uris[0] if uris else (sans.get_values_for_type(x509.DNSName) or ["-"])[0]
    except x509.ExtensionNotFound:
        ident = cert.subject.rfc4514_string() or "-"
    return ident, cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def _inline(ds: dict[str, Any]) -> bytes:
    if "inline_bytes" in ds:
        return base64.b64decode(ds["inline_bytes"])
    if "inline_string" in ds:
        return str(ds["inline_string"]).encode()
    if "filename" in ds:
        try:
            with open(ds["filename"], "rb") as f:
                return f.read()
        except OSError:
            return b""
    return b""


def secrets_rows(dump: dict[str, Any]) -> tuple[Row, list[Row]]:
    rows = []
    for item in _dump_section(dump, "SecretsConfigDump").get("dynamic_active_secrets", []):
        sec = item.get("secret", {})
        if "tls_certificate" in sec:
            kind, pem = "Cert Chain", _inline(sec["tls_certificate"].get("certificate_chain", {}))
        elif "validation_context" in sec:
            kind, pem = "CA", _inline(sec["validation_context"].get("trusted_ca", {}))
        else:
            kind, pem = "other", b""
        ident, not_after = _cert_info(pem) if pem else ("-", "-")
        rows.append([item.get("name", sec.get("name", "")), kind, ident, not_after])
    return ["NAME", "TYPE", "IDENTITY", "NOT AFTER"], rows


def table(header: Row, rows: Sequence[Row]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [header, *rows]) + "\n"


def collect(kind: str, admin: str, timeout: float = 5.0) -> dict[str, tuple[Row, list[Row]]]:
    dump = json.loads(_get(admin, "/config_dump", timeout))
    builders: dict[str, Callable[[], tuple[Row, list[Row]]]] = {
        "listeners": lambda: listeners_rows(dump, json.loads(_get(admin, "/listeners", timeout))),
        "routes": lambda: routes_rows(dump),
        "clusters": lambda: clusters_rows(dump),
        "endpoints": lambda: endpoints_rows(_get(admin, "/clusters", timeout).decode()),
        "secrets": lambda: secrets_rows(dump),
    }
    kinds = [k for k in KINDS if k != "all"] if kind == "all" else [kind]
    return {k: builders[k]() for k in kinds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pillion proxy-config",
                                 description="Show a running sidecar's configuration (from its admin API).")
    ap.add_argument("kind", choices=KINDS)
    ap.add_argument("--admin", default="127.0.0.1:15000", metavar="HOST:PORT", help="the sidecar's admin address")
    ap.add_argument("-o", "--output", choices=("table", "json"), default="table")
    args = ap.parse_args(argv)
    try:
        found = collect(args.kind, args.admin)
    except OSError as exc:
        print(f"pillion proxy-config: cannot read the admin API at {args.admin}: {exc}", file=sys.stderr)
        return 1
    if args.output == "json":
        out = {k: [dict(zip(h, r, strict=True)) for r in rows] for k, (h, rows) in found.items()}
        print(json.dumps(out if args.kind == "all" else out[args.kind], indent=1))
        return 0
    for i, (k, (header, rows)) in enumerate(found.items()):
        if args.kind == "all":
            print(("\n" if i else "") + f"{k.upper()}:")
        sys.stdout.write(table(header, rows))
    return 0
