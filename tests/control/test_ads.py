"""The ADS server over real gRPC: versions, nonces, ACK/NACK, push order, selection, garbage, registration.

Each test runs a ControlServer on 127.0.0.1 port 0 (config reloads are
triggered with `store.load()` rather than the file watcher, which
test_store.py covers) and real grpc.aio clients from tests/conformance/ads_client.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2

from control.registry import NodeError, node_identity
from control.server import ControlOptions, ControlServer
from tests.conformance.ads_client import (
    CDS,
    EDS,
    LDS,
    RDS,
    AdsClient,
    make_node,
    names_of,
    raw_stream,
    referenced_clusters,
    unpack,
)
from tests.helpers.poll import poll

REVIEWS = "outbound|9080||reviews.default.svc.cluster.local"
DB = "outbound|5432||db.default.svc.cluster.local"

SERVICES = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9080, name: http}]
  workloadSelector: {labels: {app: reviews}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v1, namespace: default}
spec: {address: 10.0.0.1, labels: {app: reviews, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v2, namespace: default}
spec: {address: 10.0.0.2, labels: {app: reviews, version: v2}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: reviews-vm, namespace: default}
spec:
  metadata: {labels: {app: reviews}}
  template: {ports: {http: 9081}, serviceAccount: reviews}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: ratings, namespace: default}
spec:
  workloadSelector: {labels: {app: ratings}}
  egress:
  - port: {number: 9080, name: http}
    bind: 127.0.0.1
    hosts: ["./*"]
"""

VIRTUAL_SERVICE = """\
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: %s}}]
  - route: [{destination: {host: reviews, subset: v1}}]
"""

def static_service(name: str, port: int, port_name: str, address: str) -> str:
    return (
        f"---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
        f"metadata: {{name: {name}, namespace: default}}\nspec:\n"
        f"  hosts: [{name}.default.svc.cluster.local]\n  location: MESH_INTERNAL\n  resolution: STATIC\n"
        f"  ports: [{{number: {port}, name: {port_name}}}]\n  endpoints: [{{address: {address}}}]\n"
    )


DATABASE = static_service("db", 5432, "tcp-db", "10.0.0.9")
RATINGS_SERVICE = static_service("ratings", 9090, "http", "10.0.1.1")


def productpage_sidecar(ports: tuple[tuple[int, str], ...] = ((9080, "http"), (5432, "tcp"))) -> str:
    egress = "".join(
        f"  - port: {{number: {number}, name: {name}}}\n    bind: 127.0.0.1\n    hosts: ['./*']\n"
        for number, name in ports
    )
    return (
        "---\napiVersion: networking.istio.io/v1\nkind: Sidecar\n"
        "metadata: {name: productpage, namespace: default}\nspec:\n"
        f"  workloadSelector: {{labels: {{app: productpage}}}}\n  egress:\n{egress}"
    )


MESH = SERVICES + VIRTUAL_SERVICE % "v2" + DATABASE + productpage_sidecar()


@dataclass
class Control:
    server: ControlServer
    config_dir: Path

    @property
    def port(self) -> int:
        return self.server.xds_port

    def apply(self, text: str) -> bool:
        (self.config_dir / "mesh.yaml").write_text(text)
        return self.server.store.load()  # type: ignore[attr-defined, no-any-return]

    def node_status(self, node_id: str) -> dict[str, Any]:
        rows = [row for row in self.server.ads.status() if row["node"] == node_id]
        assert len(rows) == 1, rows
        return rows[0]


@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[Control]:
    config_dir = tmp_path / "mesh"
    config_dir.mkdir()
    (config_dir / "mesh.yaml").write_text(MESH)
    options = ControlOptions(
        str(config_dir), xds_port=0, debug_port=0, watch=False, registration_grace=0.2
    )
    async with ControlServer(options) as server:
        yield Control(server, config_dir)


async def eventually(check: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Poll `check` with a deadline (for state another task changes)."""
    await poll(check, timeout=timeout, interval=0.01, what=what)


def settled(control: Control, node_id: str) -> Callable[[], bool]:
    """True once every subscribed type of the node was answered and nothing is queued for its stream."""

    def check() -> bool:
        rows = [row for row in control.server.ads.status() if row["node"] == node_id]
        if len(rows) != 1:
            return False
        connection = control.server.ads.connections[rows[0]["stream"]]
        words = {state["status"] for state in rows[0]["types"].values()}
        return words <= {"SYNCED", "NACKED", "-"} and connection.queue.empty()

    return check


def productpage(node_id: str = "productpage-1") -> base_pb2.Node:
    return make_node(node_id, labels={"app": "productpage"}, name="productpage")


# --- the protocol, step by step ------------------------------------------------------------


async def test_first_request_gets_clusters_then_ack(control: Control) -> None:
    async with AdsClient(control.port, productpage()) as client:
        await client.subscribe(CDS)
        response = await client.next()
        assert response.type_url == CDS
        assert response.nonce and response.version_info
        assert response.control_plane.identifier == "pillion"
        assert set(names_of(response)) >= {REVIEWS, DB, REVIEWS.replace("||", "|v1|")}
        assert control.node_status("productpage-1")["types"]["CDS"]["status"] == "STALE"
        await client.ack(response)
        await eventually(lambda: control.node_status("productpage-1")["types"]["CDS"]["status"] == "SYNCED")
        state = control.node_status("productpage-1")["types"]["CDS"]
        assert state["acked_version"] == state["sent_version"] == response.version_info
        # No resend after the ACK: the next response on the stream answers the next request.
        await client.subscribe(LDS)
        assert (await client.next()).type_url == LDS


async def test_eds_lds_rds_follow_subscriptions(control: Control) -> None:
    async with AdsClient(control.port, productpage()) as client:
        await client.subscribe(CDS)
        clusters = await client.next()
        await client.ack(clusters)
        await client.subscribe(EDS, [REVIEWS, "outbound|9080|v2|reviews.default.svc.cluster.local"])
        endpoints = await client.next()
        assert endpoints.type_url == EDS
        assert sorted(names_of(endpoints)) == sorted(client.names[EDS])
        (v2,) = [cla for cla in unpack(endpoints) if "|v2|" in cla.cluster_name]
        address = v2.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
        assert (address.address, address.port_value) == ("10.0.0.2", 9080)
        await client.ack(endpoints)
        await client.subscribe(LDS)
        listeners = await client.next()
        assert sorted(names_of(listeners)) == ["127.0.0.1_5432", "127.0.0.1_9080"]
        await client.ack(listeners)
        await client.subscribe(RDS, ["9080"])
        routes = await client.next()
        assert names_of(routes) == ["9080"]
        await client.ack(routes)
        nonces = [r.nonce for r in (clusters, endpoints, listeners, routes)]
        assert len(set(nonces)) == 4
        await eventually(settled(control, "productpage-1"))
        types = control.node_status("productpage-1")["types"]
        assert {t: s["status"] for t, s in types.items()} == dict.fromkeys(("CDS", "EDS", "LDS", "RDS"), "SYNCED")
        assert types["RDS"]["subscribed"] == ["9080"]

    # Versions are content hashes: another node with the same labels gets the same ones.
    async with AdsClient(control.port, productpage("productpage-2"), auto=True) as other:
        await other.until(lambda c: len(c.log) == 4)
        versions = dict(other.log)
        assert versions == {"CDS": clusters.version_info, "EDS": versions["EDS"],
                            "LDS": listeners.version_info, "RDS": routes.version_info}


async def test_nack_is_recorded_and_not_resent_until_the_config_changes(control: Control) -> None:
    async with AdsClient(control.port, productpage()) as client:
        await client.subscribe(CDS)
        first = await client.next()
        await client.nack(first, "Cluster outbound|9080||reviews: field lb_policy: not implemented")
        await eventually(lambda: control.node_status("productpage-1")["types"]["CDS"]["status"] == "NACKED")
        state = control.node_status("productpage-1")["types"]["CDS"]
        assert state["last_nack"]["version"] == first.version_info
        assert state["last_nack"]["error_detail"].endswith("lb_policy: not implemented")
        assert state["acked_version"] == ""
        # No resend loop: the next response is the answer to a new subscription, not CDS again.
        await client.subscribe(LDS)
        assert (await client.next()).type_url == LDS
        assert client.pending() == 0
        # A config change that touches clusters brings a new CDS version.
        assert control.apply(MESH + RATINGS_SERVICE)
        second = await client.next()
        assert second.type_url == CDS and second.version_info != first.version_info
        await client.ack(second)
        await eventually(lambda: control.node_status("productpage-1")["types"]["CDS"]["status"] == "SYNCED")
        assert control.node_status("productpage-1")["types"]["CDS"]["nacks"] == 1


async def test_stale_nonce_is_ignored_and_reconnect_resyncs(control: Control) -> None:
    async with AdsClient(control.port, productpage()) as client:
        await client.subscribe(CDS)
        response = await client.next()
        await client.ack(response)
        await eventually(lambda: control.node_status("productpage-1")["types"]["CDS"]["status"] == "SYNCED")
        client.nonces[CDS] = "no-such-nonce"
        await client.subscribe(CDS)  # a stale request: ignored
        await eventually(lambda: control.node_status("productpage-1")["stale_requests"] == 1)
    # A new stream that starts with the old stream's version and nonce still gets everything.
    async with AdsClient(control.port, productpage()) as again:
        again.versions[CDS], again.nonces[CDS] = response.version_info, response.nonce
        await again.subscribe(CDS)
        resync = await again.next()
        assert resync.version_info == response.version_info and resync.nonce


# --- pushes on change --------------------------------------------------------------------------


async def test_change_pushes_only_the_changed_types_in_order(control: Control) -> None:
    async with AdsClient(control.port, productpage(), auto=True) as client:
        await client.until(lambda c: len(c.log) == 4)
        await eventually(settled(control, "productpage-1"))
        # A route change: only RDS.
        start = len(client.log)
        assert control.apply(SERVICES + VIRTUAL_SERVICE % "v1" + DATABASE + productpage_sidecar())
        await client.until(lambda c: len(c.log) > start)
        await eventually(settled(control, "productpage-1"))
        assert [t for t, _ in client.log[start:]] == ["RDS"]
        # An endpoint change: only EDS.
        start = len(client.log)
        assert control.apply(SERVICES.replace("10.0.0.2", "10.0.0.22") + VIRTUAL_SERVICE % "v1" + DATABASE + productpage_sidecar())
        await client.until(lambda c: len(c.log) > start)
        await eventually(settled(control, "productpage-1"))
        assert [t for t, _ in client.log[start:]] == ["EDS"]
        # A new service on a new egress port: every type, clusters first, routes last.
        start = len(client.log)
        sidecar = productpage_sidecar(((9080, "http"), (5432, "tcp"), (9090, "http-ratings")))
        assert control.apply(SERVICES.replace("10.0.0.2", "10.0.0.22") + VIRTUAL_SERVICE % "v1" + DATABASE + RATINGS_SERVICE + sidecar)
        await client.until(lambda c: len(c.log) >= start + 4)
        await eventually(settled(control, "productpage-1"))
        assert [t for t, _ in client.log[start:]] == ["CDS", "EDS", "LDS", "RDS"]
        assert "9090" in client.held[RDS] and "127.0.0.1_9090" in client.held[LDS]
        assert client.dangling == [], "a listener or route pointed at a cluster the client did not hold"


async def test_removed_cluster_is_sent_after_listeners_stop_referencing_it(control: Control) -> None:
    async with AdsClient(control.port, productpage(), auto=True) as client:
        await client.until(lambda c: len(c.log) == 4)
        await eventually(settled(control, "productpage-1"))
        assert DB in client.held[CDS] and DB in referenced_clusters(list(client.held[LDS].values()))
        start = len(client.log)
        assert control.apply(SERVICES + VIRTUAL_SERVICE % "v2" + productpage_sidecar(((9080, "http"),)))
        await client.until(lambda c: DB not in c.held[CDS])
        await eventually(settled(control, "productpage-1"))
        kinds = [t for t, _ in client.log[start:]]
        assert kinds.index("LDS") < kinds.index("CDS"), kinds
        assert client.dangling == [], "a listener pointed at a cluster the client no longer held"
        assert DB not in client.held[EDS]


async def test_nodes_with_different_labels_get_different_listeners(control: Control) -> None:
    async with (
        AdsClient(control.port, productpage(), auto=True) as product,
        AdsClient(control.port, make_node("ratings-1", labels={"app": "ratings"}), auto=True) as ratings,
        AdsClient(control.port, make_node("plain-1", labels={"app": "other"})) as plain,
    ):
        await product.until(lambda c: len(c.log) == 4)
        await ratings.until(lambda c: len(c.log) == 4)
        assert sorted(product.held[LDS]) == ["127.0.0.1_5432", "127.0.0.1_9080"]
        assert sorted(ratings.held[LDS]) == ["127.0.0.1_9080"]
        await plain.subscribe(LDS)
        response = await plain.next()
        assert response.type_url == LDS and names_of(response) == []  # no Sidecar selects it
        assert control.server.cache.translations >= 3


# --- bad input ---------------------------------------------------------------------------------------


async def test_garbage_closes_only_that_stream(control: Control) -> None:
    async with AdsClient(control.port, productpage(), auto=True) as good:
        await good.until(lambda c: len(c.log) == 4)
        assert await raw_stream(control.port, [b"\xff\xff\xff\xff"]) == grpc.StatusCode.INVALID_ARGUMENT
        async with AdsClient(control.port, make_node("bad-1")) as bad:
            await bad.send(discovery_pb2.DiscoveryRequest(type_url="type.googleapis.com/not.a.Type"))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await bad.next()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "unknown type_url 'type.googleapis.com/not.a.Type'" in str(info.value.details())
        async with AdsClient(control.port, base_pb2.Node()) as anonymous:
            await anonymous.subscribe(CDS)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await anonymous.next()
            assert "node.id" in str(info.value.details())
        metadata = struct_pb2.Struct(fields={"LABELS": struct_pb2.Value(string_value="app=x")})
        async with AdsClient(control.port, base_pb2.Node(id="n", metadata=metadata)) as malformed:
            await malformed.subscribe(CDS)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await malformed.next()
            assert "node.metadata.LABELS must be a struct" in str(info.value.details())
        # The good stream is untouched and still follows changes.
        start = len(good.log)
        assert control.apply(SERVICES + VIRTUAL_SERVICE % "v1" + DATABASE + productpage_sidecar())
        await good.until(lambda c: len(c.log) > start)
        assert [row["node"] for row in control.server.ads.status()] == ["productpage-1"]


async def test_bad_config_never_reaches_a_proxy(control: Control) -> None:
    async with AdsClient(control.port, productpage(), auto=True) as client:
        await client.until(lambda c: len(c.log) == 4)
        await eventually(settled(control, "productpage-1"))
        start, rebuilds = len(client.log), control.server.rebuilds
        assert not control.apply(MESH.replace("subset: v2", "subset: v9"))
        problems = control.server.config_status()["problems"]
        assert any("spec.http[0].route[0].destination.subset" in p and "v9" in p for p in problems), problems
        assert not control.apply(MESH + "---\nkind: [unclosed\n")
        assert control.server.rebuilds == rebuilds, "a rejected change must not reach the cache"
        assert control.node_status("productpage-1")["types"]["RDS"]["status"] == "SYNCED"
        # The same proxy is still served the last good config; a good change goes through again.
        assert control.apply(MESH + RATINGS_SERVICE)
        await client.until(lambda c: len(c.log) > start)
        assert client.log[start][0] == "CDS"
        assert control.server.config_status()["problems"] == []


async def test_delta_is_unimplemented(control: Control) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{control.port}") as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        call = stub.DeltaAggregatedResources(iter([discovery_pb2.DeltaDiscoveryRequest(type_url=CDS)]))
        assert await call.code() == grpc.StatusCode.UNIMPLEMENTED


# --- node identity and auto-registration ----------------------------------------------------------


def test_node_identity_from_metadata_and_istio_id() -> None:
    node = make_node("sidecar~10.1.2.3~reviews-7d9.prod~prod.svc.cluster.local", namespace=None,
                     labels={"app": "reviews"})
    identity = node_identity(node)
    assert (identity.namespace, identity.name, identity.address) == ("prod", "reviews-7d9", "10.1.2.3")
    node = make_node("vm-1", namespace="web", name="vm", workload_group="g", instance_ips="10.0.0.5,10.0.0.6")
    identity = node_identity(node, peer_ip="127.0.0.1")
    assert (identity.namespace, identity.workload_group, identity.address) == ("web", "g", "10.0.0.5")
    assert node_identity(make_node("x"), peer_ip="127.0.0.9").address == "127.0.0.9"
    with pytest.raises(NodeError, match="INSTANCE_IPS"):
        node_identity(make_node("x", instance_ips="not-an-ip"))


def endpoints_of(client: AdsClient) -> set[tuple[str, int]]:
    cla = client.held[EDS].get(REVIEWS)
    if cla is None:
        return set()
    return {
        (lb.endpoint.address.socket_address.address, lb.endpoint.address.socket_address.port_value)
        for group in cla.endpoints
        for lb in group.lb_endpoints
    }


async def test_auto_registration_appears_and_disappears_after_grace(control: Control) -> None:
    vm = make_node("vm-1", labels={"version": "v3"}, name="reviews-vm-1",
                   workload_group="reviews-vm", instance_ips="10.0.0.33")
    async with AdsClient(control.port, productpage(), auto=True) as client:
        await client.until(lambda c: len(c.log) == 4)
        assert endpoints_of(client) == {("10.0.0.1", 9080), ("10.0.0.2", 9080)}
        loop = asyncio.get_running_loop()
        async with AdsClient(control.port, vm, auto=True) as member:
            await client.until(lambda c: ("10.0.0.33", 9081) in endpoints_of(c))
            (entry,) = control.server.registry.status()
            assert entry["name"] == "reviews-vm-10-0-0-33" and entry["streams"] == 1
            cla = client.held[EDS][REVIEWS]
            metadata = [lb.metadata.filter_metadata["istio"] for lb in cla.endpoints[0].lb_endpoints]
            assert {"app": "reviews", "version": "v3"} in [dict(m["labels"]) for m in metadata]
            await member.until(lambda c: len(c.log) >= 2)
        closed_at = loop.time()
        await client.until(lambda c: ("10.0.0.33", 9081) not in endpoints_of(c))
        assert loop.time() - closed_at >= 0.15, "removed before the grace period"
        assert control.server.registry.status() == []


async def test_registration_with_unknown_group_is_reported(control: Control) -> None:
    vm = make_node("vm-2", workload_group="no-such-group", instance_ips="10.0.0.44")
    async with AdsClient(control.port, vm, auto=True) as member:
        await member.until(lambda c: len(c.log) >= 2)
        problems = control.server.config_status()["registry_problems"]
        assert problems == ["node vm-2: WORKLOAD_GROUP 'no-such-group': no WorkloadGroup default/no-such-group"]


async def test_a_node_whose_translation_fails_keeps_its_last_good_resources(control: Control) -> None:
    second = productpage_sidecar().replace("name: productpage,", "name: productpage-too,")
    async with (
        AdsClient(control.port, productpage(), auto=True) as product,
        AdsClient(control.port, make_node("ratings-1", labels={"app": "ratings"}), auto=True) as ratings,
    ):
        await product.until(lambda c: len(c.log) == 4)
        await ratings.until(lambda c: len(c.log) == 4)
        await eventually(settled(control, "productpage-1"))
        start = len(product.log)
        # Valid as a whole, but two Sidecars now select productpage: only that node cannot be translated.
        assert control.apply(SERVICES + VIRTUAL_SERVICE % "v1" + DATABASE + productpage_sidecar() + second)
        await ratings.until(lambda c: len(c.log) == 5)  # ratings gets the route change
        await eventually(lambda: bool(control.node_status("productpage-1")["problems"]))
        (problem,) = control.node_status("productpage-1")["problems"]
        assert "Sidecar default/productpage-too: spec.workloadSelector" in problem
        assert "exactly one Sidecar may select a workload" in problem
        assert len(product.log) == start
        assert control.server.config_status()["node_problems"] == {"default/{app=productpage}": [problem]}
        # Fixing the config brings the node back.
        assert control.apply(SERVICES + VIRTUAL_SERVICE % "v1" + DATABASE + productpage_sidecar())
        await product.until(lambda c: len(c.log) > start)
        assert control.node_status("productpage-1")["problems"] == []


async def test_a_member_that_reconnects_within_the_grace_period_keeps_its_entry(control: Control) -> None:
    vm = make_node("vm-1", labels={"version": "v3"}, workload_group="reviews-vm", instance_ips="10.0.0.33")
    async with AdsClient(control.port, productpage(), auto=True) as client:
        async with AdsClient(control.port, vm, auto=True) as member:
            await client.until(lambda c: ("10.0.0.33", 9081) in endpoints_of(c))
            await member.until(lambda c: len(c.log) >= 2)
        await eventually(lambda: control.server.registry.status()[0]["expiring"], what="grace period started")
        rebuilds = control.server.rebuilds
        async with AdsClient(control.port, vm, auto=True) as again:
            await again.until(lambda c: len(c.log) >= 2)
            (entry,) = control.server.registry.status()
            assert entry["streams"] == 1 and not entry["expiring"]
            assert control.server.rebuilds == rebuilds, "a reconnect within the grace period is not a change"
        await client.until(lambda c: ("10.0.0.33", 9081) not in endpoints_of(c))


def test_interception_mode_in_node_metadata_selects_capture_translation():
    """A sidecar that says INTERCEPTION_MODE=REDIRECT gets the capture listeners (15001/15006)."""
    from envoy.config.core.v3 import base_pb2
    from google.protobuf import struct_pb2

    from control.registry import node_identity

    md = struct_pb2.Struct()
    md.update({"NAMESPACE": "default", "INTERCEPTION_MODE": "REDIRECT"})
    md.get_or_create_struct("LABELS").update({"app": "a"})
    ident = node_identity(base_pb2.Node(id="sidecar~10.0.0.1~a.default~default.svc.cluster.local", metadata=md), "")
    assert ident.node_info().intercept is True
    md.update({"INTERCEPTION_MODE": "NONE"})
    ident = node_identity(base_pb2.Node(id="sidecar~10.0.0.1~a.default~default.svc.cluster.local", metadata=md), "")
    assert ident.node_info().intercept is False
