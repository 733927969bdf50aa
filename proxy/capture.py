"""Transparent interception: a redirected connection's original destination, and where it goes.

iptables REDIRECT (``pillion init-iptables``) rewrites the destination of the
app's outbound TCP to the proxy's 15001 and of inbound TCP to 15006; the
kernel's connection tracking remembers the address the client dialled, and
``SO_ORIGINAL_DST`` reads it back from the accepted socket. This module owns
reading and parsing that address and choosing, from the snapshot's listeners,
the one that serves the connection (``route``). It does no other I/O: the
accept loop that calls it is ``listener.CaptureServerSocket``.

Rules:
- Refuse (the caller closes the connection) when the original destination
  cannot be read, or is one of the proxy's own capture ports. A client that
  dials 15001 itself is not NATed, so its "original" destination is the
  proxy: serving it would make the proxy connect to itself, forever
  (CONTAINERS.md, the readiness-probe lesson).
- Outbound (``use_original_dst``), as Envoy hands off: the listener at exactly
  ip:port, else the wildcard listener of that port (same address family
  first, then the other: Pillion's listeners are 0.0.0.0 ones and serve IPv6
  destinations too), else the capture listener's own chains.
- Then the chain whose destination_port is the original port, else the
  chain without one (passthrough), else refuse.
"""

from __future__ import annotations

import socket
import struct
import sys
from collections.abc import Iterable

from proxy.model import Listener

SO_ORIGINAL_DST = 80  # <linux/netfilter_ipv4.h>, level SOL_IP
IP6T_SO_ORIGINAL_DST = 80  # <linux/netfilter_ipv6/ip6_tables.h>, level SOL_IPV6
SOCKADDR_IN_SIZE = 16
SOCKADDR_IN6_SIZE = 28
_SOL_IP = getattr(socket, "SOL_IP", 0)
_SOL_IPV6 = getattr(socket, "SOL_IPV6", socket.IPPROTO_IPV6)
_WILDCARDS = {socket.AF_INET: ("0.0.0.0", "::"), socket.AF_INET6: ("::", "0.0.0.0")}

Address = tuple[str, int]
HandoffIndex = dict[Address, Listener]


def parse_sockaddr(raw: bytes) -> Address:
    """(ip, port) from a ``struct sockaddr_in`` or ``sockaddr_in6`` as the kernel writes it.

    sa_family is in host byte order; port and address are in network order.
    Raises ValueError for anything else.
    """
    if len(raw) < 2:
        raise ValueError("sockaddr too short")
    family = int.from_bytes(raw[:2], sys.byteorder)
    if family == socket.AF_INET and len(raw) >= 8:
        (port,) = struct.unpack_from("!H", raw, 2)
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6 and len(raw) >= 24:
        (port,) = struct.unpack_from("!H", raw, 2)
        ip = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        if ip.startswith("::ffff:") and "." in ip:  # an IPv4 destination seen through a dual-stack socket
            ip = ip[7:]
        return ip, port
    raise ValueError(f"not an IPv4/IPv6 sockaddr (family {family}, {len(raw)} bytes)")


def original_dst(sock: socket.socket) -> Address:
    """The destination the client dialled before the redirect. Raises OSError or ValueError.

    An IPv4 client on a dual-stack (IPv6) listening socket is an IPv4 connection to
    netfilter, so its address is asked for at the IPv4 level.
    """
    if sock.family == socket.AF_INET6:
        peer = sock.getpeername()[0]
        if not (peer.startswith("::ffff:") and "." in peer):
            return parse_sockaddr(sock.getsockopt(_SOL_IPV6, IP6T_SO_ORIGINAL_DST, SOCKADDR_IN6_SIZE))
    return parse_sockaddr(sock.getsockopt(_SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_SIZE))


def handoff_index(listeners: Iterable[Listener]) -> HandoffIndex:
    """Every listener a capture listener may hand a connection to, by (address, port)."""
    return {(ls.address, ls.port): ls for ls in listeners if ls.capture is None}


def capture_ports(listeners: Iterable[Listener]) -> frozenset[int]:
    return frozenset(ls.port for ls in listeners if ls.capture is not None)


def route(listener: Listener, dst: Address, index: HandoffIndex, own_ports: frozenset[int]) -> Listener | None:
    """The listener that serves a connection ``listener`` captured for ``dst``; None: close it."""
    cap = listener.capture
    ip, port = dst
    if cap is None or port in own_ports or port == listener.port:
        return None
    if cap.use_original_dst:
        target = index.get(dst)
        if target is None:
            first, second = _WILDCARDS[socket.AF_INET6 if ":" in ip else socket.AF_INET]
            target = index.get((first, port)) or index.get((second, port))
        if target is not None:
            return target
    return cap.by_port.get(port) or cap.default
