"""Capture listeners (xDS) -> ``model.Listener`` with a ``model.Capture``.

A helper of ``compile.py`` (same rules: accept exactly what is implemented,
refuse the rest with the field's path). A capture listener is one that
receives connections redirected by iptables and needs their original
destination: Envoy's ``use_original_dst: true`` (Istio's virtualOutbound on
15001: hand the connection off to the listener for the original address) or
the ``original_dst`` listener filter (Istio's virtualInbound on 15006: pick a
filter chain by ``destination_port``).

Accepted shape: listener filters ``original_dst`` and ``tls_inspector`` (and
nothing else); filter chains matched on ``destination_port`` and
``transport_protocol`` only. The chains of one destination port follow the
usual rule (one plaintext chain, one TLS chain, or one of each, carrying the
same network filter) and become one never-bound listener named
``<listener>_<port>``; the chains without a destination port become the
default (passthrough) one. A capture listener must be bound.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from envoy.config.listener.v3 import listener_pb2
from google.protobuf.message import Message

from proxy import model
from proxy.compile_tls import TLS_INSPECTOR
from proxy.errors import InvalidResource

ORIGINAL_DST = "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
CAPTURE_MATCH_FIELDS = ("destination_port", "transport_protocol")

ChainListener = Callable[[str, int, list[tuple[int, Any]], bool], model.Listener]


class Failer(Protocol):
    name: str

    def fail(self, path: str, message: str) -> InvalidResource: ...


def _only(ctx: Failer, msg: Message, allowed: Iterable[str], path: str) -> None:
    allowed = set(allowed)
    for fd, _ in msg.ListFields():
        if fd.name not in allowed:
            raise ctx.fail(f"{path}.{fd.name}", "field is not supported by this proxy")


def is_capture(ln: listener_pb2.Listener) -> bool:
    """True for a listener that routes by original destination (use_original_dst or the original_dst filter)."""
    if ln.use_original_dst.value:
        return True
    return any(lf.typed_config.type_url == ORIGINAL_DST for lf in ln.listener_filters)


def listener_filters(ctx: Failer, ln: listener_pb2.Listener, allowed: tuple[str, ...]) -> set[str]:
    """The type URLs of the listener's filters; refuses any not in ``allowed``."""
    found: set[str] = set()
    for i, lf in enumerate(ln.listener_filters):
        _only(ctx, lf, {"name", "typed_config"}, f"listener_filters[{i}]")
        url = lf.typed_config.type_url
        if url not in allowed:
            names = " and ".join(u.rsplit(".", 1)[-1] for u in allowed)
            raise ctx.fail(f"listener_filters[{i}]", f"only {names} listener filters are supported here, got {lf.name!r}")
        found.add(url)
    return found


def capture_listener(ctx: Failer, ln: listener_pb2.Listener, address: str, port: int,
                     direction: model.Direction, bind: bool, chain_listener: ChainListener) -> model.Listener:
    if not bind:
        raise ctx.fail("bind_to_port", "a listener that captures redirected connections must be bound")
    inspector = TLS_INSPECTOR in listener_filters(ctx, ln, (ORIGINAL_DST, TLS_INSPECTOR))
    groups: dict[int | None, list[tuple[int, Any]]] = {}
    for i, fc in enumerate(ln.filter_chains):
        match = fc.filter_chain_match
        _only(ctx, match, CAPTURE_MATCH_FIELDS, f"filter_chains[{i}].filter_chain_match")
        key = match.destination_port.value if match.HasField("destination_port") else None
        if key is not None and not 1 <= key <= 65535:
            raise ctx.fail(f"filter_chains[{i}].filter_chain_match.destination_port", "must be a port (1-65535)")
        groups.setdefault(key, []).append((i, fc))
    if not groups:
        raise ctx.fail("filter_chains", "at least one filter chain is required")
    by_port = {
        p: chain_listener(f"{ctx.name}_{p}", p, chains, inspector)
        for p, chains in sorted(groups.items(), key=lambda kv: kv[0] or 0) if p is not None
    }
    default = chain_listener(ctx.name, port, groups[None], inspector) if None in groups else None
    capture = model.Capture(use_original_dst=ln.use_original_dst.value, by_port=by_port, default=default)
    return model.Listener(ctx.name, address, port, direction, model.Protocol.TCP, capture=capture)


def served(ls: model.Listener) -> Iterator[tuple[str, model.Listener]]:
    """(field path of its network filter, listener) for ``ls`` or, if it captures, for each of its chains."""
    cap = ls.capture
    if cap is None:
        yield "filter_chains[0].filters[0]", ls
        return
    for p, chain in cap.by_port.items():
        yield f"filter_chains[destination_port={p}].filters[0]", chain
    if cap.default is not None:
        yield "filter_chains[no destination_port].filters[0]", cap.default
