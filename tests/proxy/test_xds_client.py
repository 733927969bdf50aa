"""The proxy following an ADS server over real gRPC: ACK, NACK, updates, reconnect."""

from __future__ import annotations

import asyncio

from envoy.config.cluster.v3 import cluster_pb2

from tests.helpers.ads import CDS, EDS, LDS, RDS, ScriptedAds, acks, nacks, resources_from_yaml
from tests.helpers.config import HOST, simple_mesh
from tests.helpers.net import RawClient, eventually, free_port, one_request, xds_proxy
from tests.helpers.upstreams import RecordingUpstream

LABELS = {"app": "client"}


def _get(port: int) -> bytes:
    return f"GET / HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode()


async def test_follows_the_server_and_acks_every_type():
    async with RecordingUpstream("one") as one:
        port = free_port()
        ads = ScriptedAds(resources_from_yaml(simple_mesh(port, [one.port]), LABELS))
        await ads.start()
        try:
            async with xds_proxy(f"127.0.0.1:{ads.port}") as px:
                r = await one_request(port, _get(port))
                assert r.status == 200 and r.body == b"hello from one"
                await ads.wait_for(lambda reqs: all(acks(reqs, t, "1") for t in (CDS, EDS, LDS, RDS)))
                first = ads.requests[0]
                assert first.node.metadata.fields["NAMESPACE"].string_value == "default"
                assert first.node.metadata.fields["LABELS"].struct_value.fields["app"].string_value == "client"
                assert first.node.id.startswith("sidecar~127.0.0.1~")
                eds = [r for r in ads.requests if r.type_url == EDS]
                assert list(eds[0].resource_names) == [f"outbound|{port}||{HOST}"]
                rds = [r for r in ads.requests if r.type_url == RDS]
                assert list(rds[0].resource_names) == [str(port)]
                status, body = await px.admin_get("/stats/prometheus")
                assert status == 200 and b"pillion_xds_cds_acks_total 1" in body
        finally:
            await ads.stop()


async def test_update_moves_traffic_without_dropping_the_client_connection():
    async with RecordingUpstream("one") as one, RecordingUpstream("two") as two:
        port = free_port()
        ads = ScriptedAds(resources_from_yaml(simple_mesh(port, [one.port]), LABELS))
        await ads.start()
        try:
            async with xds_proxy(f"127.0.0.1:{ads.port}") as px:
                c = await RawClient.connect(port)
                assert (await c.request("GET", "/", HOST)).body == b"hello from one"
                version = ads.push(resources_from_yaml(simple_mesh(port, [two.port]), LABELS))
                await ads.wait_for(lambda reqs: acks(reqs, EDS, version))
                assert (await c.request("GET", "/", HOST)).body == b"hello from two"
                assert not c.closed
                await c.close()
                assert px.supervisor.xds.status()["types"]["EDS"]["version"] == version
        finally:
            await ads.stop()


async def test_unsupported_resource_is_nacked_precisely_and_old_config_keeps_serving():
    async with RecordingUpstream("one") as one:
        port = free_port()
        good = resources_from_yaml(simple_mesh(port, [one.port]), LABELS)
        ads = ScriptedAds(good)
        await ads.start()
        try:
            async with xds_proxy(f"127.0.0.1:{ads.port}") as px:
                bad_clusters = []
                for c in good[CDS]:
                    c2 = cluster_pb2.Cluster()
                    c2.CopyFrom(c)
                    c2.lb_policy = cluster_pb2.Cluster.MAGLEV
                    bad_clusters.append(c2)
                ads.push({**good, CDS: bad_clusters})
                await ads.wait_for(lambda reqs: nacks(reqs, CDS))
                (detail,) = nacks(ads.requests, CDS)
                assert f"Cluster 'outbound|{port}||{HOST}': lb_policy: MAGLEV is not supported yet" in detail
                # The NACK names the last accepted version; nothing of the bad version was applied.
                nack = next(r for r in ads.requests if r.type_url == CDS and r.HasField("error_detail"))
                assert nack.version_info == "1"
                r = await one_request(port, _get(port))
                assert r.status == 200
                status = px.supervisor.xds.status()["types"]["CDS"]
                assert status["nacks"] == 1 and "MAGLEV" in status["last_error"]
                _, body = await px.admin_get("/stats/prometheus")
                assert b"pillion_xds_cds_nacks_total 1" in body
        finally:
            await ads.stop()


async def test_not_ready_until_first_config_and_keeps_serving_while_the_server_is_down():
    async with RecordingUpstream("one") as one:
        port, ads_port = free_port(), free_port()
        async with xds_proxy(f"127.0.0.1:{ads_port}", wait_ready=False) as px:
            status, body = await px.admin_get("/ready")
            assert status == 503 and b"waiting for the first complete config" in body
            ads = ScriptedAds(resources_from_yaml(simple_mesh(port, [one.port]), LABELS))
            await ads.start(ads_port)
            try:
                await asyncio.wait_for(px.supervisor.ready_event.wait(), 30)
                assert (await px.admin_get("/ready"))[0] == 200
                await ads.stop()
                # Control plane gone: the data plane keeps forwarding with the last good config.
                r = await one_request(port, _get(port))
                assert r.status == 200
                requests_before = len(ads.requests)
                await ads.start(ads_port)
                # Reconnect and resubscribe, telling the server which versions it holds.
                await ads.wait_for(lambda reqs: any(
                    r.type_url == CDS and r.version_info == "1" and not r.response_nonce
                    for r in reqs[requests_before:]), timeout=30)
                assert px.supervisor.xds.connects >= 2
            finally:
                await ads.stop()


async def test_trust_bundle_arrives_as_the_rootca_secret(tmp_path):
    """With the control server as the CA, the mesh roots are served over SDS as ``ROOTCA``."""
    from control.server import ControlOptions, ControlServer

    async with RecordingUpstream("one") as one:
        port = free_port()
        cfg = tmp_path / "cfg"
        cfg.mkdir()
        (cfg / "mesh.yaml").write_text(simple_mesh(port, [one.port]))
        opts = ControlOptions(str(cfg), xds_port=0, debug_port=0, watch=False, ca_state_dir=str(tmp_path / "ca"))
        async with ControlServer(opts) as server, xds_proxy(f"127.0.0.1:{server.xds_port}") as px:
            root = (tmp_path / "ca" / "root-cert.pem").read_bytes()
            sup = px.supervisor
            await eventually(lambda: "ROOTCA" in sup.snapshot.secrets)
            status = px.supervisor.xds.status()["types"]["SDS"]
            assert status["resources"] == 1 and status["acks"] >= 1
            assert px.supervisor.snapshot.secrets["ROOTCA"].roots == root
            assert "default" not in px.supervisor.snapshot.secrets  # never a private key over xDS
