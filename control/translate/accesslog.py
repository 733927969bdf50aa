"""Access logging (MeshConfig accessLogFile / accessLogEncoding, Telemetry) -> HCM and tcp_proxy `access_log`.

Owns: the access logger a listener's HTTP connection manager and TCP proxy
carry when the node's settings ask for one: one `envoy.access_loggers.file`
writing to a path, with Envoy's default text line (TEXT) or Istio's default
JSON fields (JSON). What each direction gets (outbound listeners: CLIENT,
inbound: SERVER) is the node's merged MeshConfig (`accessLogFile`; empty, the
default, means none) and Telemetry settings (`telemetry.node_telemetry`).
It runs after the listener builders, on the finished listeners, so they need
not know about logging. Custom formats (MeshConfig `accessLogFormat`, an
envoyFileAccessLog `logFormat.text` or custom `labels`) are refused by
`kinds.py` / `telemetry.py` (not supported yet).
"""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.core.v3 import substitution_format_string_pb2 as sfs
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import struct_pb2

from control.translate.model_telemetry import INBOUND, OUTBOUND, NodeTelemetry
from control.translate.protos import packed

FILE_LOGGER = "envoy.access_loggers.file"

# Istio's default JSON access log fields (the proxy formats exactly these).
JSON_FORMAT: dict[str, str] = {
    "start_time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration": "%DURATION%",
    "upstream_service_time": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    "x_forwarded_for": "%REQ(X-FORWARDED-FOR)%",
    "user_agent": "%REQ(USER-AGENT)%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "authority": "%REQ(:AUTHORITY)%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "downstream_peer_uri_san": "%DOWNSTREAM_PEER_URI_SAN%",
    "trace_id": "%TRACE_ID%",
}

_HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_TCP_TYPE = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"


def file_access_log(path: str, encoding: str) -> accesslog_pb2.AccessLog:
    config = file_pb2.FileAccessLog(path=path)
    if encoding == "JSON":
        fields = struct_pb2.Struct()
        fields.update(JSON_FORMAT)
        config.log_format.CopyFrom(sfs.SubstitutionFormatString(json_format=fields))
    return accesslog_pb2.AccessLog(name=FILE_LOGGER, typed_config=packed(config))


def add_access_logs(listeners: Iterable[listener_pb2.Listener], telemetry: NodeTelemetry) -> None:
    """Give the HCMs and tcp_proxies of `listeners` their direction's logger (in place); none where off."""
    by_direction = {d: file_access_log(p.path, p.encoding) for d, p in telemetry.access_log.items() if p is not None}
    if not by_direction:
        return
    for listener in listeners:
        logger = by_direction.get(INBOUND if listener.traffic_direction == base_pb2.INBOUND else OUTBOUND)
        if logger is None:
            continue
        chains = [*listener.filter_chains]
        if listener.HasField("default_filter_chain"):
            chains.append(listener.default_filter_chain)
        for chain in chains:
            for f in chain.filters:
                url = f.typed_config.type_url
                if url == _HCM_TYPE:
                    manager = hcm.HttpConnectionManager()
                    f.typed_config.Unpack(manager)
                    manager.access_log.append(logger)
                    f.typed_config.CopyFrom(packed(manager))
                elif url == _TCP_TYPE:
                    proxy = tcp_proxy_pb2.TcpProxy()
                    f.typed_config.Unpack(proxy)
                    proxy.access_log.append(logger)
                    f.typed_config.CopyFrom(packed(proxy))
