"""translate() as a whole: determinism and protobuf round trips of every resource."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message

from control.translate import NodeInfo, Resources, load_text, translate
from tests.control.translate_fixtures import PRODUCTPAGE_SIDECAR, REVIEWS_REGISTRY, seed_reviews

TCP_PARTS = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: mysql, namespace: default}
spec:
  hosts: [mysql.default.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 3306, name: tcp-mysql}]
  endpoints: [{address: 10.3.0.1, labels: {b: "2", a: "1", c: "3"}}]
"""
TEXT = (
    seed_reviews()
    + "---\n"
    + REVIEWS_REGISTRY
    + "---\n"
    + TCP_PARTS
    + "---\n"
    + PRODUCTPAGE_SIDECAR.replace(
        "  egress:\n",
        "  egress:\n  - port: {number: 3306, name: tcp}\n    hosts: ['./mysql.default.svc.cluster.local']\n",
    ).replace(
        "  ingress:\n",
        "  ingress:\n  - port: {number: 5001, name: tcp-x}\n    defaultEndpoint: 127.0.0.1:5000\n",
    )
)
NODE = NodeInfo(namespace="default", labels={"app": "productpage"})


def all_messages(resources: Resources) -> list[Message]:
    return [*resources.listeners, *resources.routes, *resources.clusters, *resources.endpoints]


def serialized(resources: Resources) -> list[bytes]:
    return [message.SerializeToString(deterministic=True) for message in all_messages(resources)]


def test_same_input_gives_byte_identical_output() -> None:
    first = translate(load_text(TEXT), NODE)
    second = translate(load_text(TEXT), NODE)
    assert serialized(first) == serialized(second)
    assert first == second


def test_output_does_not_depend_on_document_order() -> None:
    documents = TEXT.split("---\n")
    shuffled = "---\n".join(reversed(documents))
    assert serialized(translate(load_text(TEXT), NODE)) == serialized(
        translate(load_text(shuffled), NODE)
    )


def test_resources_are_sorted_by_name() -> None:
    resources = translate(load_text(TEXT), NODE)
    for names in (
        [r.name for r in resources.listeners],
        [r.name for r in resources.routes],
        [r.name for r in resources.clusters],
        [r.cluster_name for r in resources.endpoints],
    ):
        assert names == sorted(names)
    assert [r.name for r in resources.listeners] == [
        "0.0.0.0_5001",
        "0.0.0.0_9090",
        "127.0.0.1_3306",
        "127.0.0.1_9080",
    ]


def _unpack_all(any_message: any_pb2.Any) -> Message:
    for cls in (hcm.HttpConnectionManager, tcp_proxy_pb2.TcpProxy, router_pb2.Router, fault_pb2.HTTPFault,
                previous_hosts_pb2.PreviousHostsPredicate):
        if any_message.Is(cls.DESCRIPTOR):
            target = cls()
            assert any_message.Unpack(target)
            return target
    raise AssertionError(f"unexpected Any payload {any_message.type_url}")


def test_every_resource_round_trips_through_json_and_any() -> None:
    resources = translate(load_text(TEXT), NODE)
    for message in all_messages(resources):
        text = json_format.MessageToJson(message)
        again = json_format.Parse(text, type(message)())
        assert again == message
        assert message.IsInitialized()
        # a resource on the wire travels packed in an Any
        packed = any_pb2.Any()
        packed.Pack(message)
        unpacked = type(message)()
        assert packed.Unpack(unpacked) and unpacked == message
    seen: set[str] = set()
    for listener in resources.listeners:
        assert isinstance(listener, listener_pb2.Listener)
        for network_filter in listener.filter_chains[0].filters:
            config = _unpack_all(network_filter.typed_config)
            seen.add(type(config).__name__)
            if isinstance(config, hcm.HttpConnectionManager):
                for http_filter in config.http_filters:
                    seen.add(type(_unpack_all(http_filter.typed_config)).__name__)
    assert seen == {"HttpConnectionManager", "TcpProxy", "Router", "HTTPFault"}


def test_digest_is_stable_across_processes_with_different_hash_seeds() -> None:
    script = (
        "from tests.control.test_translate_resources import TEXT, NODE\n"
        "from control.translate import load_text, translate\n"
        "print(translate(load_text(TEXT), NODE).digest())\n"
    )
    root = Path(__file__).resolve().parents[2]
    digests = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", script],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        digests.add(out.stdout.strip())
    assert digests == {translate(load_text(TEXT), NODE).digest()}
