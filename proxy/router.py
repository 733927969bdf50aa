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

from proxy.model import PathKind, QueryMatch, Route, RouteTable, VirtualHost, WeightedCluster


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
    vh: VirtualHost, path: bytes, headers: Mapping[bytes, bytes], method: bytes = b"GET", host: bytes = b"",
    scheme: bytes = b"http",
) -> Route | None:
    """``path`` is the raw request target; ``headers`` maps lowercased names to values.

    Header matchers may name the pseudo-headers ``:method``, ``:authority`` and
    ``:scheme`` (as Envoy's do); they read ``method``, ``host`` and ``scheme``."""
    bare: bytes | None = None
    for route in vh.routes:
        kind = route.path_kind
        if kind is PathKind.PREFIX:
            if not path.startswith(route.path) and (
                    route.case_sensitive or not path.lower().startswith(route.path.lower())):
                continue
        else:
            if bare is None:
                q = path.find(b"?")
                bare = path if q < 0 else path[:q]
            if kind is PathKind.EXACT:
                if bare != route.path and (route.case_sensitive or bare.lower() != route.path.lower()):
                    continue
            else:
                assert route.path_regex is not None
                if route.path_regex.fullmatch(bare) is None:
                    continue
        if route.headers:
            ok = True
            for hm in route.headers:
                name = hm.name
                if name[:1] == b":":
                    value: bytes | None = (method if name == b":method" else host if name == b":authority"
                                           else scheme if name == b":scheme" else headers.get(name))
                else:
                    value = headers.get(name)
                if not hm.matches(value):
                    ok = False
                    break
            if not ok:
                continue
        if route.query and not _query_matches(route.query, path):
            continue
        return route
    return None


def _query_matches(conditions: tuple[QueryMatch, ...], path: bytes) -> bool:
    q = path.find(b"?")
    params: dict[bytes, bytes] = {}
    if q >= 0:
        for pair in path[q + 1:].split(b"&"):
            name, _, value = pair.partition(b"=")
            params.setdefault(name, value)  # the first occurrence, as Envoy
    return all(cond.matches(params.get(cond.name)) for cond in conditions)


def pick_weighted(weighted: tuple[WeightedCluster, ...], total: int, rand: float) -> str:
    """One of ``weighted`` in proportion to its weight; ``rand`` is uniform in [0, 1)."""
    point = rand * total
    acc = 0
    for wc in weighted:
        acc += wc.weight
        if point < acc:
            return wc.name
    return weighted[-1].name


def pick_cluster(route: Route, rand: float) -> str:
    """The cluster for one request; ``rand`` is uniform in [0, 1)."""
    if not route.weighted:
        return route.cluster
    return pick_weighted(route.weighted, route.total_weight, rand)
