"""HCM and tcp_proxy ``access_log`` (xDS) -> ``model.AccessLog``.

Pillion writes access logs itself (``proxy/accesslog.py``), so it accepts only
what it can reproduce exactly: one ``envoy.access_loggers.file`` logger with
a path, and either no format (Envoy's default text line) or a JSON format
whose fields are exactly Envoy/Istio's default JSON fields (``JSON_FORMAT``).
A filter, another logger type or a custom format is refused, not ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from envoy.extensions.access_loggers.file.v3 import file_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from proxy import model
from proxy.errors import InvalidResource

FILE_LOGGER_TYPE = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"

# The JSON fields (and the Envoy command operators producing them) that Pillion formats.
# control/translate/accesslog.py sends the same mapping; a test keeps the two equal.
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


class Ctx(Protocol):
    def fail(self, path: str, message: str) -> InvalidResource: ...


def _only(ctx: Ctx, msg: Message, allowed: Iterable[str], path: str) -> None:
    for fd, _ in msg.ListFields():
        if fd.name not in allowed:
            raise ctx.fail(f"{path}.{fd.name}", "field is not supported by this proxy")


def access_log(ctx: Ctx, loggers: Sequence[Any], path: str) -> model.AccessLog | None:
    """The one file access logger of an HCM or tcp_proxy; None when there is none."""
    if not loggers:
        return None
    if len(loggers) > 1:
        raise ctx.fail(path, "one access logger is supported")
    al = loggers[0]
    p = f"{path}[0]"
    _only(ctx, al, {"name", "typed_config"}, p)
    if al.typed_config.type_url != FILE_LOGGER_TYPE:
        raise ctx.fail(f"{p}.typed_config", f"unsupported access logger {al.typed_config.type_url!r} "
                                            "(only envoy.access_loggers.file)")
    fal = file_pb2.FileAccessLog()
    al.typed_config.Unpack(fal)
    fp = f"{p}.typed_config"
    _only(ctx, fal, {"path", "log_format"}, fp)
    if not fal.path:
        raise ctx.fail(f"{fp}.path", "required")
    if not fal.HasField("log_format"):
        return model.AccessLog(fal.path, "TEXT")
    lf = fal.log_format
    _only(ctx, lf, {"json_format"}, f"{fp}.log_format")
    fields = json_format.MessageToDict(lf.json_format)
    if fields != JSON_FORMAT:
        raise ctx.fail(f"{fp}.log_format.json_format",
                       "custom access log formats are not supported yet (only Envoy's default JSON fields)")
    return model.AccessLog(fal.path, "JSON")
