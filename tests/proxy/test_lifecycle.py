"""Config reload, drain, admin endpoints and worker processes, on real sockets."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.config import HOST, simple_mesh, write
from tests.helpers.net import (
    RawClient,
    free_port,
    http_get,
    one_request,
    standalone_proxy,
    start_proxy_process,
    wait_until,
)
from tests.helpers.upstreams import RecordingUpstream


async def _wait_for(px, pred, timeout: float = 10.0) -> None:
    """Wait until ``pred()`` holds, re-checked after every config reload the proxy attempts."""
    cond = px.supervisor.reload_attempts
    async with cond:
        await asyncio.wait_for(cond.wait_for(pred), timeout)


async def test_config_change_applies_without_dropping_connections(tmp_path):
    async with RecordingUpstream("one") as one, RecordingUpstream("two") as two:
        port = free_port()
        write(tmp_path, simple_mesh(port, [one.port]))
        async with standalone_proxy(tmp_path, watch=True) as px:
            client = await RawClient.connect(port)
            r = await client.request("GET", "/", HOST)
            assert r.body == b"hello from one"
            before = px.supervisor.snapshot.version
            write(tmp_path, simple_mesh(port, [two.port]))
            await _wait_for(px, lambda: px.supervisor.snapshot.version != before)
            # The same client connection is still open and now reaches the new endpoint.
            r = await client.request("GET", "/", HOST)
            assert r.status == 200 and r.body == b"hello from two"
            assert not client.closed
            await client.close()


async def test_bad_config_is_rejected_with_file_resource_field_and_old_config_serves(tmp_path):
    async with RecordingUpstream("one") as one:
        port = free_port()
        write(tmp_path, simple_mesh(port, [one.port]))
        async with standalone_proxy(tmp_path, watch=True) as px:
            good = px.supervisor.snapshot.version
            bad = simple_mesh(port, [one.port]).replace("resolution: STATIC", "resolution: STATIC\n  resolutoin: STATIC")
            path = write(tmp_path, bad)
            await _wait_for(px, lambda: px.supervisor.reloads_failed >= 1)
            assert px.supervisor.snapshot.version == good
            problems = "\n".join(px.supervisor.last_error)
            assert str(path) in problems or path.name in problems
            assert "ServiceEntry default/upstream" in problems
            assert "spec.resolutoin" in problems
            status, body = await px.admin_get("/config_dump")
            assert status == 200
            assert "resolutoin" in json.dumps(json.loads(body)["pillion"]["last_rejected_config"])
            r = await one_request(port, f"GET / HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode())
            assert r.status == 200 and r.body == b"hello from one"


async def test_listener_added_and_removed_on_reload(tmp_path):
    async with RecordingUpstream("one") as one:
        port, port2 = free_port(), free_port()
        write(tmp_path, simple_mesh(port, [one.port]))
        async with standalone_proxy(tmp_path, watch=True) as px:
            two_ports = simple_mesh(port, [one.port]).replace(
                "  egress:\n", f"  egress:\n  - port: {{number: {port2}, protocol: HTTP, name: http-b}}\n"
                "    bind: 127.0.0.1\n    captureMode: NONE\n    hosts: ['./*']\n")
            two_ports = two_ports.replace("  ports:\n", f"  ports:\n  - {{number: {port2}, name: http-b, protocol: HTTP}}\n")
            two_ports = two_ports.replace("ports: {http:", f"ports: {{http-b: {one.port}, http:")
            write(tmp_path, two_ports)
            await _wait_for(px, lambda: len(px.supervisor.snapshot.listeners) == 2)
            r = await one_request(port2, f"GET / HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode())
            assert r.status == 200
            write(tmp_path, simple_mesh(port, [one.port]))
            await _wait_for(px, lambda: len(px.supervisor.snapshot.listeners) == 1)
            with pytest.raises(OSError):
                await one_request(port2, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")


async def test_admin_endpoints(tmp_path):
    async with RecordingUpstream("one") as one:
        port = free_port()
        write(tmp_path, simple_mesh(port, [one.port]))
        async with standalone_proxy(tmp_path) as px:
            for _ in range(3):
                r = await one_request(port, f"GET / HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode())
                assert r.status == 200
            status, body = await px.admin_get("/ready")
            assert (status, body) == (200, b"LIVE\n")
            status, body = await px.admin_get("/config_dump")
            dump = json.loads(body)
            listeners = dump["configs"][0]["dynamic_listeners"]
            assert [ls["name"] for ls in listeners] == [f"127.0.0.1_{port}"]
            cluster = f"outbound|{port}||{HOST}"
            clusters = [c["cluster"]["name"] for c in dump["configs"][1]["dynamic_active_clusters"]]
            assert cluster in clusters
            status, body = await px.admin_get("/clusters")
            assert f"{cluster}::127.0.0.1:{one.port}::health_flags::healthy" in body.decode()
            assert f"{cluster}::rq_total::3" in body.decode()
            status, body = await px.admin_get("/stats/prometheus")
            families = {f.name: f for f in text_string_to_metric_families(body.decode())}
            samples = [s for s in families["istio_requests"].samples
                       if s.labels.get("destination_cluster") == cluster and s.labels.get("response_code") == "200"]
            assert [s.value for s in samples] == [3.0]
            assert samples[0].labels["reporter"] == "source"
            assert samples[0].labels["destination_service"] == HOST
            status, _ = await px.admin_get("/nope")
            assert status == 404
            status, _ = await px.admin_get("/quitquitquit")
            assert status == 405  # GET is refused: it must be a POST, as in Envoy
            status, _ = await px.admin_post("/drain_listeners")
            assert status == 200
            with pytest.raises(OSError):
                await one_request(port, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")


async def test_quitquitquit_stops_the_proxy(tmp_path):
    async with RecordingUpstream("one") as one:
        port = free_port()
        write(tmp_path, simple_mesh(port, [one.port]))
        async with standalone_proxy(tmp_path) as px:
            status, _ = await px.admin_post("/quitquitquit")
            assert status == 200
            await asyncio.wait_for(px.supervisor.stopping.wait(), 5)


async def test_idle_keepalive_connection_is_closed_after_idle_timeout(tmp_path):
    async with RecordingUpstream("one") as one:
        port = free_port()
        text = simple_mesh(port, [one.port])
        write(tmp_path, text)
        async with standalone_proxy(tmp_path, tick_seconds=0.05) as px:
            # The translator leaves Envoy's default (1h); shorten it on the compiled listener for this test.
            from dataclasses import replace

            snap = px.supervisor.snapshot
            ls = snap.listeners[0]
            short = replace(ls, http=replace(ls.http, idle_timeout=0.2))
            new = replace(snap, listeners=(short,), version="short-idle")
            await px.supervisor.workers[0].apply(new)
            c = await RawClient.connect(port)
            r = await c.request("GET", "/", HOST)
            assert r.status == 200
            assert await c.eof(timeout=3.0)


def test_sigterm_drains_in_flight_request_then_exits_zero(tmp_path):
    """A real process: SIGTERM lets the slow in-flight request finish, with connection: close."""

    async def scenario() -> None:
        async with RecordingUpstream("one") as one:
            port, admin = free_port(), free_port()
            write(tmp_path, simple_mesh(port, [one.port]))
            proc = start_proxy_process(tmp_path, admin, "--drain-seconds", "5")
            try:
                ok = await asyncio.to_thread(
                    wait_until, lambda: http_get(f"http://127.0.0.1:{admin}/ready")[0] == 200, 15)
                assert ok, proc.stdout.read1().decode() if proc.stdout else ""
                c = await RawClient.connect(port)
                await c.send(f"GET /slow?ms=600 HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode())
                await asyncio.wait_for(one.state.request_seen.wait(), 5)
                proc.send_signal(signal.SIGTERM)
                r = await c.response(timeout=5)
                assert r.status == 200
                assert r.header("connection") == "close"
                rc = await asyncio.to_thread(proc.wait, 10)
                assert rc == 0
                with pytest.raises(OSError):
                    await one_request(port, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()

    import uvloop

    uvloop.run(scenario())


def test_concurrency_two_workers_share_listeners_and_stats(tmp_path):
    async def scenario() -> None:
        async with RecordingUpstream("one") as one:
            port, admin = free_port(), free_port()
            write(tmp_path, simple_mesh(port, [one.port]))
            proc = start_proxy_process(tmp_path, admin, "--concurrency", "2")
            try:
                ok = await asyncio.to_thread(
                    wait_until, lambda: http_get(f"http://127.0.0.1:{admin}/ready")[0] == 200, 20)
                assert ok
                n = 40
                results = await asyncio.gather(*(
                    one_request(port, f"GET /{i} HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n".encode())
                    for i in range(n)))
                assert all(r.status == 200 for r in results)
                status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{admin}/stats/prometheus")
                assert status == 200
                total = sum(
                    s.value for f in text_string_to_metric_families(body.decode()) if f.name == "istio_requests"
                    for s in f.samples if s.labels.get("response_code") == "200")
                assert total == n
                workers = [line for line in body.decode().splitlines() if line.startswith("pillion_workers ")]
                assert workers == ["pillion_workers 2"]
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(proc.wait, 15) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()

    import uvloop

    uvloop.run(scenario())


def test_bad_initial_config_exits_nonzero_naming_the_problem(tmp_path):
    write(tmp_path, "apiVersion: networking.istio.io/v1beta1\nkind: Sidecar\nmetadata: {name: s}\nspec:\n  egres: []\n")
    proc = start_proxy_process(tmp_path, free_port())
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 1
    text = out.decode()
    assert "Sidecar default/s" in text and "spec.egres" in text, text


def test_cli_help_and_unknown_command():
    import sys

    from tests.helpers.net import REPO

    r = subprocess.run([sys.executable, "-m", "proxy", "nope"], cwd=REPO, capture_output=True, timeout=20)
    assert r.returncode == 2 and b"unknown command" in r.stderr


async def test_drain_closes_idle_keepalives_and_finishes_in_flight(tmp_path):
    async with RecordingUpstream("one") as one:
        port = free_port()
        write(tmp_path, simple_mesh(port, [one.port]))
        async with standalone_proxy(tmp_path, drain_seconds=5) as px:
            idle = await RawClient.connect(port)
            assert (await idle.request("GET", "/", HOST)).status == 200
            busy = await RawClient.connect(port)
            await busy.send(f"GET /slow?ms=300 HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode())
            one.state.request_seen.clear()
            await asyncio.wait_for(one.state.request_seen.wait(), 5)
            px.supervisor.quit()
            assert await idle.eof(timeout=2.0)  # the idle keep-alive is closed at once
            status, body = await px.admin_get("/ready")  # still draining: the slow request is in flight
            assert status == 503 and body == b"DRAINING\n"
            r = await busy.response(timeout=5)
            assert r.status == 200 and r.header("connection") == "close"
            assert await busy.eof(timeout=2.0)
