"""`pillion control` as a process: ports, /debug/syncz, /debug/config, `pillion control status`, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from control.server import ControlOptions, ControlServer
from control.status import format_syncz
from tests.conformance.ads_client import CDS, AdsClient
from tests.control.test_ads import MESH, productpage
from tests.helpers.poll import poll

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def cli(*args: str) -> list[str]:
    call = f"import sys; from control.cli import main; sys.exit(main({list(args)!r}))"
    return [sys.executable, "-c", call]


def get(port: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


async def until(check: Any, timeout: float = 10.0, what: str = "") -> Any:
    """Poll a blocking `check` (in a thread) with a deadline until it returns something truthy."""
    return await poll(lambda: asyncio.to_thread(check), timeout=timeout, what=what)


async def read_ports(process: subprocess.Popen[str], timeout: float = 15.0) -> tuple[int, int]:
    assert process.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), timeout)
    assert line.startswith("pillion control: xds="), line
    fields = dict(part.split("=", 1) for part in line.split()[2:])
    return int(fields["xds"].rsplit(":", 1)[1]), int(fields["debug"].rsplit(":", 1)[1])


async def test_control_process_syncz_status_and_sigterm(tmp_path: Path) -> None:
    config_dir = tmp_path / "mesh"
    config_dir.mkdir()
    (config_dir / "mesh.yaml").write_text(MESH)
    process = subprocess.Popen(
        cli("control", "--config-dir", str(config_dir), "--xds-port", "0", "--debug-port", "0",
            "--debounce", "0.05", "--log-level", "info"),
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        xds_port, debug_port = await read_ports(process)
        assert get(debug_port, "/ready") == (200, {"ready": True})
        assert get(debug_port, "/nope")[0] == 404
        async with AdsClient(xds_port, productpage(), auto=True) as client:
            await client.until(lambda c: len(c.log) == 4)

            def synced() -> list[dict[str, Any]] | None:
                rows = get(debug_port, "/debug/syncz")[1]
                ok = len(rows) == 1 and all(s["status"] == "SYNCED" for s in rows[0]["types"].values())
                return rows if ok else None

            (row,) = await until(synced, what="the proxy is SYNCED in /debug/syncz")
            assert (row["node"], row["namespace"], row["workload"]) == ("productpage-1", "default", "productpage")
            assert row["types"]["CDS"]["acked_version"] == dict(client.log)["CDS"]
            assert row["connected_since"] > 0

            status = subprocess.run(cli("control", "status", "--server", f"127.0.0.1:{debug_port}"),
                                    cwd=REPO, env=ENV, capture_output=True, text=True, timeout=30)
            assert status.returncode == 0, status.stderr
            header, line = status.stdout.splitlines()[:2]
            assert header.split() == ["NODE", "NAMESPACE", "WORKLOAD", "CONNECTED", "CDS", "EDS", "LDS", "RDS"]
            assert line.split()[:3] == ["productpage-1", "default", "productpage"]
            assert line.count("SYNCED") == 4

            # A bad change is reported by /debug/config and the status command; the proxy keeps its config.
            before = len(client.log)
            (config_dir / "mesh.yaml").write_text(MESH.replace("name: http}]", "name: http, protocl: HTTP}]"))

            def rejected() -> list[str]:
                return list(get(debug_port, "/debug/config")[1]["problems"])

            (problem,) = await until(rejected, what="the bad change is reported")
            assert problem.endswith("ServiceEntry default/reviews: spec.ports[0].protocl: unknown field"), problem
            status = subprocess.run(cli("control", "status", "--server", f"127.0.0.1:{debug_port}"),
                                    cwd=REPO, env=ENV, capture_output=True, text=True, timeout=30)
            assert "rejected change:" in status.stdout and "protocl: unknown field" in status.stdout
            assert len(client.log) == before
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 15) == 0
        assert "stopping" in (process.stderr.read() if process.stderr else "")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_status_of_an_unreachable_server_fails_clearly() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run(cli("control", "status", "--server", f"127.0.0.1:{port}"),
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"cannot reach 127.0.0.1:{port}" in result.stderr


def test_control_needs_an_existing_config_dir(tmp_path: Path) -> None:
    result = subprocess.run(cli("control", "--config-dir", str(tmp_path / "missing"), "--xds-port", "0",
                                "--debug-port", "0"), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "missing does not exist" in result.stderr


async def test_nothing_is_served_before_a_good_config(tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text("kind: [broken\n")
    options = ControlOptions(str(tmp_path), xds_port=0, debug_port=0, watch=False)
    async with ControlServer(options) as server:
        status, body = await asyncio.to_thread(get, server.debug_port, "/ready")
        assert (status, body) == (503, {"ready": False})
        config = (await asyncio.to_thread(get, server.debug_port, "/debug/config"))[1]
        assert config["version"] == "" and "invalid YAML" in config["problems"][0]
        async with AdsClient(server.xds_port, productpage()) as client:
            await client.subscribe(CDS)
            (tmp_path / "mesh.yaml").write_text(MESH)
            assert server.store.load()  # type: ignore[attr-defined]
            response = await client.next()  # the first response carries the first good config
            assert response.type_url == CDS and len(response.resources) > 0
        assert (await asyncio.to_thread(get, server.debug_port, "/ready"))[0] == 200


def test_status_table_shows_nacks_and_problems() -> None:
    row = {
        "node": "n1", "namespace": "web", "workload": "front", "connected_since": 100.0,
        "types": {
            "CDS": {"status": "SYNCED", "sent_version": "aaaaaaaaaaaa"},
            "EDS": {"status": "STALE", "sent_version": "bbbbbbbbbbbb"},
            "LDS": {"status": "NACKED", "sent_version": "cccccccccccc",
                    "last_nack": {"version": "cccccccccccc", "error_detail": "Listener x: bind: refused"}},
            "RDS": {"status": "-", "sent_version": ""},
        },
        "problems": ["mesh.yaml: Sidecar web/a: spec.workloadSelector: selects the workload twice"],
    }
    text = format_syncz([row], {"source": "mesh/", "version": "v1", "problems": []}, now=160.0)
    lines = text.splitlines()
    assert lines[1].split() == ["n1", "web", "front", "60s", "SYNCED", "(aaaaaaaa)", "STALE", "(bbbbbbbb)",
                                "NACKED", "(cccccccc)", "-"]
    assert "NACK n1 LDS version cccccccccccc: Listener x: bind: refused" in lines
    assert any(line.startswith("PROBLEM n1: mesh.yaml: Sidecar web/a") for line in lines)
    assert format_syncz([], None).endswith("(no proxies connected)")


async def test_ca_is_served_on_the_xds_port_with_tokens_from_the_cli(tmp_path: Path) -> None:
    from certs.ca_api import CertificateRequest, CertificateResponse
    from certs.csr import build_csr, csr_to_pem, generate_key
    from certs.spiffe import SpiffeId

    (tmp_path / "mesh").mkdir()
    (tmp_path / "mesh" / "mesh.yaml").write_text(MESH)
    state = tmp_path / "ca"
    options = ControlOptions(str(tmp_path / "mesh"), xds_port=0, debug_port=0, watch=False, ca_state_dir=str(state))
    async with ControlServer(options) as server:
        token = subprocess.run(
            cli("control", "token", "--state-dir", str(state), "--namespace", "default", "--service-account", "web"),
            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=30,
        )
        assert token.returncode == 0, token.stderr
        identity = SpiffeId("cluster.local", "default", "web")
        csr = csr_to_pem(build_csr(generate_key(), identity)).decode()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.xds_port}") as channel:
            create = channel.unary_unary(
                "/istio.v1.auth.IstioCertificateService/CreateCertificate",
                request_serializer=CertificateRequest.SerializeToString,
                response_deserializer=CertificateResponse.FromString,
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await create(CertificateRequest(csr=csr))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            response = await create(CertificateRequest(csr=csr),
                                    metadata=(("authorization", f"Bearer {token.stdout.strip()}"),))
            assert len(response.cert_chain) >= 2
        assert server.config_status()["ca"]["issued"] == 1
