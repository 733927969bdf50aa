"""Shared pieces of the xDS compilers: the resource context for precise errors,
the "refuse what is not implemented" check, durations, regexes and addresses.

Used by ``compile.py`` and its per-concern helpers (``compile_routes``,
``compile_tls``, ...). Config-in tier: protobuf is allowed here, never on the
hot path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from envoy.config.core.v3 import address_pb2
from google.protobuf import duration_pb2
from google.protobuf.message import Message

from proxy.errors import InvalidResource

ENVOY_DEFAULT_ROUTE_TIMEOUT = 15.0


class _Ctx:
    """Which resource is being compiled, for error messages."""

    __slots__ = ("name", "type_name")

    def __init__(self, type_name: str, name: str) -> None:
        self.type_name = type_name
        self.name = name

    def fail(self, path: str, message: str) -> InvalidResource:
        return InvalidResource(self.type_name, self.name, path, message)


def _only(ctx: _Ctx, msg: Message, allowed: Iterable[str], path: str) -> None:
    allowed = set(allowed)
    for fd, _ in msg.ListFields():
        if fd.name not in allowed:
            where = f"{path}.{fd.name}" if path else fd.name
            raise ctx.fail(where, "field is not supported by this proxy")


def _seconds(d: duration_pb2.Duration) -> float:
    return d.seconds + d.nanos / 1e9


def _regex(ctx: _Ctx, pattern: str, path: str) -> re.Pattern[bytes]:
    try:
        return re.compile(pattern.encode())
    except re.error as e:
        raise ctx.fail(path, f"invalid regex {pattern!r}: {e}") from None


def _socket_address(ctx: _Ctx, addr: address_pb2.Address, path: str) -> tuple[str, int]:
    if addr.WhichOneof("address") != "socket_address":
        raise ctx.fail(path, "only socket_address is supported")
    sa = addr.socket_address
    _only(ctx, sa, {"address", "port_value", "protocol"}, f"{path}.socket_address")
    if sa.protocol != address_pb2.SocketAddress.TCP:
        raise ctx.fail(f"{path}.socket_address.protocol", "only TCP is supported")
    if not sa.address:
        raise ctx.fail(f"{path}.socket_address.address", "required")
    return sa.address, sa.port_value
