"""Small constructors for the xDS protobuf pieces every builder repeats.

Owns: how Pillion spells an ADS config source, a socket address, a duration,
a packed `Any` and a network filter. Nothing here knows about Istio.
"""

from __future__ import annotations

from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.config.listener.v3 import listener_components_pb2
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message

CONNECT_TIMEOUT_SECONDS = 10.0


def ads() -> config_source_pb2.ConfigSource:
    """Fetch over the aggregated (ADS) stream, xDS v3."""
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.ApiVersion.V3,
    )


def socket_address(address: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=address, port_value=port)
    )


def duration(seconds: float) -> duration_pb2.Duration:
    """An exact protobuf Duration (nanosecond resolution) for a non-negative number of seconds."""
    total = round(seconds * 1_000_000_000)
    return duration_pb2.Duration(seconds=total // 1_000_000_000, nanos=total % 1_000_000_000)


def packed(message: Message) -> any_pb2.Any:
    wrapper = any_pb2.Any()
    wrapper.Pack(message)
    return wrapper


def network_filter(name: str, config: Message) -> listener_components_pb2.Filter:
    return listener_components_pb2.Filter(name=name, typed_config=packed(config))
