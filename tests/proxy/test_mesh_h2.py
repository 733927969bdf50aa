"""Sidecar to sidecar over mutual TLS, with ALPN choosing the protocol.

The two-sidecar STRICT mesh of test_mesh_mtls.py (certificates from the CA
service), once with a GRPC port and once with an HTTP port: on the GRPC port
the client sidecar offers "h2" and the server sidecar (offering "h2" and
"http/1.1") picks it, so a grpcio client reaches a grpcio server across two
sidecars over HTTP/2 end to end; on the HTTP port the hop stays HTTP/1.1. The
server sidecar's access log says which protocol each hop spoke.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc

from tests.helpers.net import free_port, one_request, standalone_proxy
from tests.helpers.poll import poll
from tests.helpers.upstreams import RecordingUpstream
from tests.proxy.test_mesh_mtls import HOST, ca, mesh_yaml

__all__ = ["ca"]  # the CA service fixture


def grpc_mesh_yaml(egress: int, ingress: int, app_port: int) -> str:
    return (mesh_yaml(egress, ingress, app_port).replace("protocol: HTTP, name: http", "protocol: GRPC, name: grpc")
            .replace("name: http, protocol: HTTP", "name: grpc, protocol: GRPC").replace("ports: {http:", "ports: {grpc:"))


def access_log(path: Path) -> str:
    return f"---\nkind: MeshConfig\nspec: {{accessLogFile: {path}, accessLogEncoding: JSON}}\n"


def inbound_lines(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def test_grpc_crosses_two_sidecars_over_mtls_negotiating_h2(tmp_path: Path, ca) -> None:  # type: ignore[no-untyped-def]
    _service, address, _ = ca
    seen: list[dict[str, str]] = []

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        seen.append(dict(context.invocation_metadata() or ()))
        return b"echo:" + request

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Svc", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))
    app_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        egress, ingress = free_port(), free_port()
        cfg = tmp_path / "cfg"
        cfg.mkdir()
        log = tmp_path / "reviews-access.log"
        yaml = grpc_mesh_yaml(egress, ingress, app_port)
        assert "protocol: GRPC" in yaml and "protocol: HTTP" not in yaml
        (cfg / "mesh.yaml").write_text(yaml)
        rv_cfg = tmp_path / "rv"
        rv_cfg.mkdir()
        (rv_cfg / "mesh.yaml").write_text(yaml + access_log(log))
        async with standalone_proxy(rv_cfg, labels={"app": "reviews"}, service_account="reviews", ca_address=address,
                                    token_file=str(tmp_path / "reviews.token")), \
                standalone_proxy(cfg, labels={"app": "productpage"}, service_account="productpage",
                                 ca_address=address, token_file=str(tmp_path / "productpage.token")):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{egress}",
                                                 options=[("grpc.default_authority", HOST)]) as ch:
                echo_call = ch.unary_unary("/test.Svc/Echo")
                got = await asyncio.gather(*(echo_call(b"%d" % i, timeout=10) for i in range(20)))
                assert got == [b"echo:%d" % i for i in range(20)]
            xfcc = seen[-1].get("x-forwarded-client-cert", "")
            assert "URI=spiffe://cluster.local/ns/default/sa/productpage" in xfcc  # the mTLS peer, seen inbound
            await poll(lambda: len(inbound_lines(log)) >= 20, timeout=10, what="reviews' access log lines")
            assert {line["protocol"] for line in inbound_lines(log)} == {"HTTP/2"}  # ALPN picked h2 on the mTLS hop
            # the other sidecar's address, with its port (Envoy's %DOWNSTREAM_REMOTE_ADDRESS%)
            assert all(line["downstream_remote_address"].rsplit(":", 1)[1].isdigit() for line in inbound_lines(log))
    finally:
        await server.stop(0)


async def test_http_port_stays_http11_between_sidecars(tmp_path: Path, ca) -> None:  # type: ignore[no-untyped-def]
    _service, address, _ = ca
    async with RecordingUpstream("reviews-app") as app:
        egress, ingress = free_port(), free_port()
        log = tmp_path / "reviews-access.log"
        cfg, rv_cfg = tmp_path / "cfg", tmp_path / "rv"
        for d in (cfg, rv_cfg):
            d.mkdir()
        (cfg / "mesh.yaml").write_text(mesh_yaml(egress, ingress, app.port))
        (rv_cfg / "mesh.yaml").write_text(mesh_yaml(egress, ingress, app.port) + access_log(log))
        async with standalone_proxy(rv_cfg, labels={"app": "reviews"}, service_account="reviews", ca_address=address,
                                    token_file=str(tmp_path / "reviews.token")), \
                standalone_proxy(cfg, labels={"app": "productpage"}, service_account="productpage",
                                 ca_address=address, token_file=str(tmp_path / "productpage.token")):
            r = await one_request(egress, f"GET /x HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode())
            assert r.status == 200
            await poll(lambda: len(inbound_lines(log)) == 1, timeout=10, what="reviews' access log line")
            assert [line["protocol"] for line in inbound_lines(log)] == ["HTTP/1.1"]
