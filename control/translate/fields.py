"""Field rules the kind builders share: protocols, IP addresses, workloads, regexes.

Owns: what a port's protocol is (its `protocol`, else Istio's port-name
convention, else TCP), which addresses Pillion accepts (IP literals; no
hostnames, no unix sockets yet), how a WorkloadEntry-shaped mapping becomes a
`Workload` (its serviceAccount must fit in a SPIFFE id), and which regexes
Envoy (RE2) would refuse. Reports through the caller's `Build`; never raises.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING, Any

from certs.spiffe import SpiffeId
from control.translate.model import (
    Protocol,
    Workload,
    frozen_map,
)

if TYPE_CHECKING:
    from control.translate.istio import Build

# Istio's protocol names (case-insensitive); HTTP, the HTTP/2 ones and TCP are implemented.
ISTIO_PROTOCOLS = frozenset(
    {
        "HTTP",
        "HTTPS",
        "GRPC",
        "GRPC-WEB",
        "HTTP2",
        "HTTP_PROXY",
        "MONGO",
        "MYSQL",
        "REDIS",
        "TCP",
        "TLS",
        "UDP",
    }
)
WILDCARD_BINDS = frozenset({"0.0.0.0", "::"})
# RE2 (Envoy's regex engine) has no lookaround and no backreferences.
NOT_RE2 = re.compile(r"\(\?<?[=!]|\\[1-9]")


def keep(objects: list[Any], obj: Any) -> None:
    if obj is not None:
        objects.append(obj)


# Routed as HTTP, and spoken to the upstream as HTTP/2 (Istio's IsHTTP2 protocols).
HTTP2_PROTOCOLS = frozenset({"HTTP2", "GRPC", "GRPC-WEB"})
# Istio's port-name convention: "<protocol>[-<suffix>]" (grpc-web-x splits as grpc: HTTP/2 too).
_NAME_PREFIXES = {"http": Protocol.HTTP, "http2": Protocol.HTTP, "grpc": Protocol.HTTP}


def speaks_h2(port: dict[str, Any]) -> bool:
    """Whether a port (already accepted by `protocol`) is GRPC, HTTP2 or GRPC-WEB, by protocol or name."""
    declared = port.get("protocol")
    if declared is not None:
        return str(declared).upper() in HTTP2_PROTOCOLS
    return str(port.get("name", "")).lower().split("-", 1)[0] in ("http2", "grpc")


def protocol(port: dict[str, Any], path: str, b: Build) -> Protocol | None:
    """The port's protocol: its `protocol` field, else Istio's port-name convention, else TCP.

    GRPC, HTTP2 and GRPC-WEB are HTTP for routing (`speaks_h2` tells them apart)."""
    declared = port.get("protocol")
    if declared is not None:
        upper = declared.upper()
        if upper in ("HTTP", "TCP"):
            return Protocol(upper)
        if upper in HTTP2_PROTOCOLS:
            return Protocol.HTTP
        if upper in ISTIO_PROTOCOLS:
            b(f"{path}.protocol", f"protocol {declared} is not supported yet")
        else:
            b(
                f"{path}.protocol",
                f"unknown protocol {declared!r}; Istio defines {', '.join(sorted(ISTIO_PROTOCOLS))}",
            )
        return None
    prefix = str(port.get("name", "")).lower().split("-", 1)[0]
    return _NAME_PREFIXES.get(prefix, Protocol.TCP)


def ip(value: str, path: str, b: Build, hint: str = "") -> bool:
    if value.startswith("unix://"):
        b(path, "unix domain socket addresses are not supported yet")
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        b(path, f"{value!r} is not an IP address{hint}")
        return False
    return True


def workload(raw: dict[str, Any], path: str, b: Build, name: str, need_address: bool) -> Workload:
    address = raw.get("address", "")
    if address:
        ip(
            address,
            f"{path}.address",
            b,
            " (hostnames need resolution DNS, which is not supported yet)",
        )
    elif need_address:
        b(f"{path}.address", "required field is missing")
    account = raw.get("serviceAccount", "")
    if account:
        try:  # the account is part of the workload's SPIFFE id; check it as one
            SpiffeId("cluster.local", "namespace", account)
        except ValueError as exc:  # certs' InvalidSpiffeId
            b(f"{path}.serviceAccount", f"{exc} (it names the workload's SPIFFE identity)")
    return Workload(
        address=address,
        ports=frozen_map(raw.get("ports")),
        labels=frozen_map(raw.get("labels")),
        weight=raw.get("weight", 0),
        service_account=raw.get("serviceAccount", ""),
        network=raw.get("network", ""),
        locality=raw.get("locality", ""),
        name=name,
    )


def regex(value: str, path: str, b: Build) -> None:
    try:
        re.compile(value)
    except re.error as exc:
        b(path, f"invalid regular expression: {exc}")
        return
    if NOT_RE2.search(value):
        b(path, "lookaround and backreferences are not RE2 syntax (Envoy uses RE2)")
