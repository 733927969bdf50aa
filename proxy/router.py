"""Route selection: Host -> virtual host -> first matching route -> cluster.

Pure functions over ``model.RouteTable``; no I/O, no clock, no randomness
(the weighted pick takes its random number as an argument).

Strategy: the Host lookup is one dict probe on the lowercased header value
(the table holds both ``name`` and ``name:port`` forms), then ``*.suffix`` and
``prefix.*`` domains longest first, then ``*``. Routes are tried in order,
first match wins, as in Envoy and Istio.
"""

from __future__ import annotations

from collections.abc import Mapping

from proxy.model import PathKind, Route, RouteTable, VirtualHost


def find_virtual_host(table: RouteTable, host: bytes) -> VirtualHost | None:
    vh = table.exact.get(host)
    if vh is not None:
        return vh
    if table.suffixes or table.prefixes:
        bare = host.rsplit(b":", 1)[0] if b":" in host and not host.endswith(b"]") else host
        for suffix, cand in table.suffixes:
            if host.endswith(suffix) or bare.endswith(suffix):
                return cand
        for prefix, cand in table.prefixes:
            if host.startswith(prefix):
                return cand
    if b":" in host:
        vh = table.exact.get(host.rsplit(b":", 1)[0])
        if vh is not None:
            return vh
    return table.wildcard


def match_route(
    vh: VirtualHost, path: bytes, headers: Mapping[bytes, bytes]
) -> Route | None:
    """``path`` is the raw request target; ``headers`` maps lowercased names to values."""
    bare: bytes | None = None
    for route in vh.routes:
        kind = route.path_kind
        if kind is PathKind.PREFIX:
            if not path.startswith(route.path):
                continue
        else:
            if bare is None:
                q = path.find(b"?")
                bare = path if q < 0 else path[:q]
            if kind is PathKind.EXACT:
                if bare != route.path:
                    continue
            else:
                assert route.path_regex is not None
                if route.path_regex.fullmatch(bare) is None:
                    continue
        if route.headers:
            ok = True
            for hm in route.headers:
                if not hm.matches(headers.get(hm.name)):
                    ok = False
                    break
            if not ok:
                continue
        return route
    return None


def pick_cluster(route: Route, rand: float) -> str:
    """The cluster for one request; ``rand`` is uniform in [0, 1)."""
    if not route.weighted:
        return route.cluster
    point = rand * route.total_weight
    acc = 0
    for wc in route.weighted:
        acc += wc.weight
        if point < acc:
            return wc.name
    return route.weighted[-1].name
