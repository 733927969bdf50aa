"""Access logs (MeshConfig accessLogFile): one line per request / TCP connection, written in the background."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from control.translate import NodeInfo, load_text, translate
from control.translate.accesslog import JSON_FORMAT as TRANSLATOR_JSON_FORMAT
from control.translate.errors import ConfigError
from proxy.accesslog import HTTP, AccessLogger, format_batch, text_line
from proxy.compile_accesslog import JSON_FORMAT as PROXY_JSON_FORMAT
from proxy.model import AccessLog
from proxy.tls import Peer
from tests.helpers.config import HOST, service_entry, simple_mesh, write
from tests.helpers.net import RawClient, eventually, free_port, standalone_proxy
from tests.helpers.upstreams import RecordingUpstream, TcpServer

DEAD = "dead.default.svc.cluster.local"


def _mesh(path: Path, encoding: str = "JSON") -> str:
    return f"kind: MeshConfig\nspec: {{accessLogFile: {path}, accessLogEncoding: {encoding}}}\n"


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_translator_and_proxy_agree_on_the_json_fields() -> None:
    assert TRANSLATOR_JSON_FORMAT == PROXY_JSON_FORMAT


def test_custom_format_is_refused() -> None:
    text = simple_mesh(8080, [9000]) + "---\nkind: MeshConfig\nspec: {accessLogFile: /dev/stdout, accessLogFormat: '%START_TIME%'}\n"
    with pytest.raises(ConfigError, match="not supported yet"):
        translate(load_text(text), NodeInfo(labels={"app": "client"}))


def test_text_line_is_envoys_default_format() -> None:
    rec = (AccessLog("/x", "TEXT"), HTTP, 10.0, 10.25, b"GET", b"/a", False, 200, "", 3, 5,
           {b"host": b"h", b"x-request-id": b"rid", b"user-agent": b"ua"}, b"10.0.0.1", None, "1.2.3.4:80", "c",
           10.2, 5555)
    out = format_batch([rec], 1_700_000_000.0, 20.0)
    (line,) = out["/x"]
    assert line.startswith("[2023-11-14T22:")
    assert line.endswith('] "GET /a HTTP/1.1" 200 - 3 5 250 200 "-" "ua" "rid" "h" "1.2.3.4:80"\n')
    peer = Peer(uris=("spiffe://cluster.local/ns/default/sa/client",), dns=(), cert_sha256="00")
    rec = (AccessLog("/x", "JSON"), *rec[1:11],
           {b"traceparent": b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}, b"::1", peer, None, None, 0.0, 443)
    f = json.loads(format_batch([rec], 1_700_000_000.0, 20.0)["/x"][0])
    assert f["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert f["downstream_peer_uri_san"] == "spiffe://cluster.local/ns/default/sa/client"
    assert f["downstream_remote_address"] == "[::1]:443"
    assert f["upstream_host"] is None and f["request_id"] is None and f["upstream_service_time"] is None
    assert text_line(f).count('"') == 12


async def test_full_queue_drops_and_counts() -> None:
    logger = AccessLogger(asyncio.get_running_loop(), limit=2)
    spec = AccessLog("/dev/null", "JSON")
    for _ in range(5):
        logger.push((spec, HTTP, 0.0, 0.0, b"GET", b"/", False, 200, "", 0, 0, {}, b"", None, None, None))
    assert logger.dropped == 3
    await logger.aclose()
    assert not logger.queue


async def test_json_access_log_lines_match_the_requests(tmp_path: Path) -> None:
    log_path = tmp_path / "logs" / "access.log"
    log_path.parent.mkdir()
    dead_port = free_port()  # nothing listens there: 503 UF
    async with RecordingUpstream("u1") as up:
        port = free_port()
        dead = service_entry("dead", DEAD, [("http", port, "HTTP")], [("127.0.0.1", {"http": dead_port}, {})])
        write(tmp_path / "cfg", simple_mesh(port, [up.port], extra=dead + "---\n" + _mesh(log_path)))
        async with standalone_proxy(tmp_path / "cfg") as proxy:
            c = await RawClient.connect(port)
            sent = [
                ("GET", "/hello", HOST, {"x-request-id": "rid-1", "user-agent": "test/1"}, b""),
                ("POST", "/echo", HOST, {"x-request-id": "rid-2"}, b"abcdef"),
                ("GET", "/x", "nope", {"x-request-id": "rid-3"}, b""),
                ("GET", "/down", DEAD, {"x-request-id": "rid-4",
                                        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}, b""),
                ("GET", "/slow?ms=300", HOST, {"x-request-id": "rid-5"}, b""),
            ]
            got = []
            for method, path, host, headers, body in sent:
                got.append(await c.request(method, path, host, headers=headers, body=body))
            await c.close()
            assert [r.status for r in got] == [200, 200, 404, 503, 200]
            await eventually(lambda: len(_lines(log_path)) >= len(sent))
            entries = [json.loads(line) for line in _lines(log_path)]
            assert len(entries) == len(sent)
            by_id = {e["request_id"]: e for e in entries}
            ok = by_id["rid-1"]
            assert (ok["method"], ok["path"], ok["response_code"], ok["response_flags"]) == ("GET", "/hello", 200, "-")
            assert ok["authority"] == HOST and ok["user_agent"] == "test/1" and ok["protocol"] == "HTTP/1.1"
            assert ok["upstream_host"] == f"127.0.0.1:{up.port}"
            assert ok["upstream_cluster"] == f"outbound|{port}||{HOST}"
            assert ok["bytes_received"] == 0 and ok["bytes_sent"] == len(got[0].body)
            assert re.fullmatch(r"127\.0\.0\.1:\d+", ok["downstream_remote_address"]) and ok["trace_id"] is None
            assert ok["start_time"].endswith("Z") and ok["duration"] >= 0
            assert isinstance(ok["upstream_service_time"], int) and 0 <= ok["upstream_service_time"] <= ok["duration"]
            echo = by_id["rid-2"]
            assert (echo["method"], echo["path"], echo["bytes_received"], echo["bytes_sent"]) == ("POST", "/echo", 6, 6)
            nr = by_id["rid-3"]
            assert (nr["response_code"], nr["response_flags"], nr["authority"]) == (404, "NR", "nope")
            assert nr["upstream_host"] is None and nr["upstream_cluster"] is None
            assert nr["upstream_service_time"] is None  # no upstream answered
            uf = by_id["rid-4"]
            assert (uf["response_code"], uf["response_flags"], uf["path"]) == (503, "UF,URX", "/down")  # Istio's default retries ran out
            assert uf["upstream_host"] == f"127.0.0.1:{dead_port}"
            assert uf["upstream_cluster"] == f"outbound|{port}||{DEAD}"
            assert uf["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
            assert uf["bytes_sent"] == len(got[3].body) and uf["upstream_service_time"] is None
            slow = by_id["rid-5"]  # the upstream took 300 ms before its head: that is its service time
            assert 300 <= slow["upstream_service_time"] <= slow["duration"]
            code, text = await proxy.admin_get("/stats/prometheus")
            assert code == 200 and b"\npillion_access_log_dropped_total 0\n" in text


async def test_tcp_connection_logs_one_text_line_at_close(tmp_path: Path) -> None:
    log_path = tmp_path / "access.log"
    async with TcpServer() as tcp_up, RecordingUpstream("u1") as up:
        http_port, tcp_port = free_port(), free_port()
        write(tmp_path / "cfg", simple_mesh(http_port, [up.port], tcp_port=tcp_port, tcp_upstream=tcp_up.port,
                                            extra=_mesh(log_path, "TEXT")))
        async with standalone_proxy(tmp_path / "cfg"):
            reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            writer.close()
            await writer.wait_closed()
            await eventually(lambda: len(_lines(log_path)) >= 1)
            (line,) = _lines(log_path)
            assert '"- - -" 0 - 4 4 ' in line
            assert line.endswith(f'"127.0.0.1:{tcp_up.port}"')
