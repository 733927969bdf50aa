"""Startup and shutdown ordering: `pillion wait` holds an app until its sidecar is ready, and
EXIT_ON_ZERO_ACTIVE_CONNECTIONS lets the app call out while it finishes."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from tests.helpers.config import HOST, simple_mesh, write
from tests.helpers.net import REPO, RawClient, free_port, one_request, standalone_proxy
from tests.helpers.upstreams import RecordingUpstream
from tests.proxy.test_mesh_and_timeouts import two_sidecar_mesh


async def test_wait_execs_the_app_once_the_sidecar_is_ready(tmp_path):
    async with RecordingUpstream("one") as one:
        port = free_port()
        write(tmp_path, simple_mesh(port, [one.port]))
        async with standalone_proxy(tmp_path) as px:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "wait", "--url", f"http://127.0.0.1:{px.admin_port}/ready",
                "--timeout", "10", "--", sys.executable, "-c", "print('app started')",
                cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, err
            assert out.decode().strip() == "app started"


def test_wait_gives_up_and_says_why():
    port = free_port()  # nothing listens here
    r = subprocess.run([sys.executable, "-m", "proxy", "wait", "--url", f"http://127.0.0.1:{port}/ready",
                        "--timeout", "0.5", "--", sys.executable, "-c", "print('must not run')"],
                       cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "not ready after 0.5s" in r.stderr and "must not run" not in r.stdout


async def test_exit_on_zero_active_connections_keeps_outbound_open_while_the_app_finishes(tmp_path):
    async with RecordingUpstream("reviews-app") as app:
        egress, ingress = free_port(), free_port()
        write(tmp_path, two_sidecar_mesh(egress, ingress, app.port))
        # productpage's sidecar drains with the flag; reviews' sidecar serves the calls it makes.
        async with standalone_proxy(tmp_path, labels={"app": "reviews"}), \
                standalone_proxy(tmp_path, labels={"app": "productpage"}, drain_seconds=10,
                                 exit_on_zero_active_connections=True) as pp:
            app_conn = await RawClient.connect(egress)  # the app's pooled outbound connection
            assert (await app_conn.request("GET", "/before", "reviews.default.svc.cluster.local")).status == 200
            pp.supervisor.quit()
            # Draining: the app can still open new outbound connections and make calls.
            r = await one_request(egress, b"GET /during HTTP/1.1\r\nhost: reviews.default.svc.cluster.local\r\n\r\n")
            assert r.status == 200
            status, body = await pp.admin_get("/ready")
            assert status == 503 and body == b"DRAINING\n"
            # The proxy exits as soon as the app's last connection is gone, long before --drain-seconds.
            await app_conn.close()
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await asyncio.wait_for(pp.supervisor.stopped.wait(), 8)
            assert loop.time() - t0 < 5
            assert [q.path for q in app.requests] == ["/before", "/during"]


async def test_without_the_flag_drain_closes_outbound_listeners_too(tmp_path):
    async with RecordingUpstream("one") as one:
        port = free_port()
        write(tmp_path, simple_mesh(port, [one.port]))
        async with standalone_proxy(tmp_path, drain_seconds=10) as px:
            keep = await RawClient.connect(port)
            assert (await keep.request("GET", "/", HOST)).status == 200
            px.supervisor.quit()
            await asyncio.wait_for(px.supervisor.draining_event.wait(), 5)
            with pytest.raises(OSError):
                await one_request(port, f"GET / HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode())
            await keep.close()
