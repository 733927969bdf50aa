"""`pillion proxy-config` against a running standalone proxy's admin API."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from pathlib import Path

from proxy.cli import main as pillion
from tests.helpers.config import HOST, simple_mesh, write
from tests.helpers.net import free_port, standalone_proxy
from tests.helpers.pki import MeshPki
from tests.helpers.upstreams import RecordingUpstream


async def _run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()

    def call() -> int:
        with contextlib.redirect_stdout(out):
            return pillion(["proxy-config", *argv])

    code = await asyncio.to_thread(call)  # the CLI blocks on HTTP; the proxy runs on this loop
    return code, out.getvalue()


def _rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


async def test_tables_show_listeners_routes_clusters_endpoints(tmp_path: Path) -> None:
    async with RecordingUpstream("u1") as up:
        port, tcp_port = free_port(), free_port()
        write(tmp_path, simple_mesh(port, [up.port], tcp_port=tcp_port, tcp_upstream=up.port))
        async with standalone_proxy(tmp_path) as proxy:
            admin = f"127.0.0.1:{proxy.admin_port}"
            cluster = f"outbound|{port}||{HOST}"

            code, text = await _run("listeners", "--admin", admin)
            assert code == 0
            rows = _rows(text)
            assert rows[0] == ["NAME", "ADDRESS", "PORT", "DIRECTION", "CHAINS", "FILTER/TLS"]
            assert [f"127.0.0.1_{port}", "127.0.0.1", str(port), "outbound", "1", "http_connection_manager/plaintext"] in rows
            assert [f"127.0.0.1_{tcp_port}", "127.0.0.1", str(tcp_port), "outbound", "1", "tcp_proxy/plaintext"] in rows

            code, text = await _run("routes", "--admin", admin)
            assert code == 0 and _rows(text)[0] == ["ROUTE", "DOMAINS", "MATCH", "CLUSTER"]
            assert any(r[0] == str(port) and HOST + "," in r and r[-1] == cluster for r in _rows(text)), text

            code, text = await _run("clusters", "--admin", admin)
            assert code == 0
            assert any(r[0] == cluster and r[2] == "1" for r in _rows(text)[1:]), text

            code, text = await _run("endpoints", "--admin", admin)
            assert code == 0
            assert [cluster, f"127.0.0.1:{up.port}", "HEALTHY", "1"] in _rows(text)

            code, text = await _run("all", "--admin", admin, "-o", "json")
            assert code == 0
            found = json.loads(text)
            assert set(found) == {"listeners", "routes", "clusters", "endpoints", "secrets"}
            assert {"CLUSTER": cluster, "ADDRESS": f"127.0.0.1:{up.port}", "HEALTH": "HEALTHY",
                    "WEIGHT": "1"} in found["endpoints"]


async def test_secrets_show_identity_and_expiry_never_keys(tmp_path: Path) -> None:
    cert_dir = tmp_path / "certs"
    MeshPki().issue(cert_dir, "default", "client")
    async with RecordingUpstream("u1") as up:
        port = free_port()
        write(tmp_path / "cfg", simple_mesh(port, [up.port]))
        async with standalone_proxy(tmp_path / "cfg", cert_dir=cert_dir) as proxy:
            code, text = await _run("secrets", "--admin", f"127.0.0.1:{proxy.admin_port}")
            assert code == 0
            rows = _rows(text)
            assert rows[0] == ["NAME", "TYPE", "IDENTITY", "NOT", "AFTER"]
            default = next(r for r in rows if r[0] == "default")
            assert default[1:3] == ["Cert", "Chain"] and default[3] == "spiffe://cluster.local/ns/default/sa/client"
            assert default[4].endswith("Z")
            assert any(r[1] == "CA" for r in rows[1:])
            assert "PRIVATE KEY" not in text and "redacted" not in text


async def test_unreachable_admin_is_an_error(tmp_path: Path) -> None:
    code, _ = await _run("clusters", "--admin", f"127.0.0.1:{free_port()}")
    assert code == 1
