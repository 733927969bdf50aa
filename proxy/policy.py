"""A listener's compiled policy applied to one request or one connection (the glue of authz and jwt).

Owns: what a request or a connection shows the pure evaluators
(``authz.Attrs``: method, path, headers, peer identity from mutual TLS,
addresses), the wall clock for token lifetimes, the remote key sets
(``ctx.jwks``), the RBAC counters, the changes a verified token makes to the
head sent upstream, and the refusals: ``JwtAuthError`` (401) and
``PolicyDeniedError`` (403), which ``hcm.local_reply`` answers. It is
called only for listeners that carry a policy, so the rest pay nothing.

Order (Envoy's filter chain): jwt_authn first (a bad token is refused
before any RBAC runs), then the RBAC filters with the verified payloads as
dynamic metadata. Headers that only a verified token may set
(``forward_payload_header``, claim headers) are removed from what the
client sent, so they cannot be forged by sending them without a token.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from proxy.authz import Attrs, HttpPolicy, RbacFilter, Verdict, evaluate
from proxy.errors import JwtAuthError, PolicyDeniedError
from proxy.jwt import JwtFailure, authenticate
from proxy.route_edit import rewrite_head
from proxy.tls import peer_of

if TYPE_CHECKING:
    from proxy.context import Context
    from proxy.stream import Stream

JWT_METADATA = "envoy.filters.http.jwt_authn"


def _count(ctx: Context, verdict: Verdict) -> None:
    stats = ctx.stats
    if not verdict.allowed:
        stats.count_rbac("denied", verdict.policy)
    elif verdict.policy:
        stats.count_rbac("allowed", verdict.policy)
    if verdict.audited:
        stats.count_rbac("logged", verdict.audited)


def _remote_ip(headers: dict[bytes, bytes], client_ip: str) -> str:
    """The original client: the last x-forwarded-for entry (use_remote_address false, no trusted hops)."""
    xff = headers.get(b"x-forwarded-for")
    if xff is None:
        return client_ip
    last = xff.rsplit(b",", 1)[-1].strip()
    return last.decode("latin-1") or client_ip


def _destination(transport: asyncio.BaseTransport | None, conn: Any) -> tuple[str, int]:
    original = getattr(conn, "original_dst", None)  # an intercepted connection's real destination
    if original is not None:
        return str(original[0]), int(original[1])
    sock = transport.get_extra_info("sockname") if transport is not None else None
    return (str(sock[0]), int(sock[1])) if sock else ("", 0)


def authorize_request(st: Stream, policy: HttpPolicy, ctx: Context) -> None:
    """Run the listener's jwt_authn and RBAC filters on a parsed request head.

    Raises JwtAuthError or PolicyDeniedError; on success may rewrite the head queued
    for the upstream (``st.out[0]``)."""
    conn = st.conn
    headers = st.hdrs
    metadata: dict[str, dict[str, Any]] | None = None
    authn = policy.jwt
    if authn is not None:
        try:
            result = authenticate(authn, st.path, headers, time.time(), ctx.jwks.keys)
        except JwtFailure as failure:
            raise JwtAuthError(failure.reason, failure.status) from None
        remove = {name for name in authn.payload_headers if name in headers}
        if result is not None:
            metadata = {JWT_METADATA: result.metadata}
            remove |= result.remove
        if remove or (result is not None and result.add):
            st.out[0] = rewrite_head(st.out[0], remove, result.add if result is not None else [])
    if not policy.rbac:
        return
    listener = conn.listener
    peer = conn.peer
    client_ip = conn.client_ip.decode("latin-1")
    dest_ip, dest_port = "", listener.port
    if policy.needs_destination or not dest_port:
        dest_ip, port = _destination(conn.transport, conn)
        dest_port = dest_port or port
    attrs = Attrs(
        method=st.method,
        path=st.path,
        host=st.host,
        headers=headers,
        tls=peer is not None,
        peer_uris=peer.uris if peer is not None else (),
        peer_dns=peer.dns if peer is not None else (),
        sni=peer.sni if peer is not None else "",
        source_ip=client_ip,
        remote_ip=_remote_ip(headers, client_ip),
        dest_ip=dest_ip,
        dest_port=dest_port,
        metadata=metadata,
    )
    verdict = evaluate(policy.rbac, attrs)
    _count(ctx, verdict)
    if not verdict.allowed:
        raise PolicyDeniedError(verdict.policy)


def authorize_connection(ctx: Context, rbac: tuple[RbacFilter, ...], transport: asyncio.BaseTransport,
                         listener_port: int, conn: Any = None) -> bool:
    """Network RBAC for a new TCP connection; False: close it (Envoy closes it without a byte)."""
    peer = peer_of(transport) if transport.get_extra_info("ssl_object") is not None else None
    client = transport.get_extra_info("peername")
    client_ip = str(client[0]) if client else ""
    dest_ip, dest_port = _destination(transport, conn)
    attrs = Attrs(
        http=False,
        tls=peer is not None,
        peer_uris=peer.uris if peer is not None else (),
        peer_dns=peer.dns if peer is not None else (),
        sni=peer.sni if peer is not None else "",
        source_ip=client_ip,
        dest_ip=dest_ip,
        dest_port=listener_port or dest_port,
    )
    verdict = evaluate(rbac, attrs)
    _count(ctx, verdict)
    return verdict.allowed
