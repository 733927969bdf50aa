"""What a route does to a request or response besides choosing a cluster.

Pure functions over the HTTP/1.1 request head that both downstream codecs
build (``Stream.out[0]``: request line, header lines, blank line) and over
response header lists: path and host rewrites, header additions and
removals, the Location of a redirect and the host of a mirrored request.
They run only for routes that carry such settings, never for the plain case.
``last_chunk`` is the one place an HTTP/1.1 chunked body's end (with any
trailers) is written, for requests, responses and mirrors alike.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

from proxy.model import HeaderMutation, Redirect, Rewrite, Route

LAST_CHUNK = b"0\r\n\r\n"


def last_chunk(trailers: Iterable[tuple[bytes, bytes]] | None) -> bytes:
    """The last chunk of a chunked HTTP/1.1 body, with ``trailers`` as its fields (RFC 9112 section 7.1.2)."""
    if not trailers:
        return LAST_CHUNK
    return b"".join([b"0\r\n", *(n + b": " + v + b"\r\n" for n, v in trailers), b"\r\n"])


_HOST_LINE = re.compile(rb"\r\nhost[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE)


@functools.lru_cache(maxsize=256)
def _header_lines(names: frozenset[bytes]) -> re.Pattern[bytes]:
    """The header lines (with their leading CRLF) of any of `names`, case-insensitively."""
    alternatives = b"|".join(re.escape(n) for n in sorted(names))
    return re.compile(rb"\r\n(?:" + alternatives + rb")[ \t]*:[^\r\n]*", re.IGNORECASE)


def rewrite_head(head: bytes, remove: Iterable[bytes], add: Iterable[tuple[bytes, bytes]]) -> bytes:
    """An HTTP/1.1 request head without the headers named in `remove` and with `add` appended."""
    names = frozenset(remove)
    if names:
        head = _header_lines(names).sub(b"", head)
    extra = b"".join(b"\r\n" + name + b": " + value for name, value in add)
    return head[:-4] + extra + b"\r\n\r\n" if extra else head


def new_path(route: Route, path: bytes, rewrite: Rewrite) -> bytes:
    """The request target after prefix_rewrite / regex_rewrite (query string kept)."""
    if rewrite.prefix is not None:
        return rewrite.prefix + path[len(route.path):]
    if rewrite.regex is not None:
        q = path.find(b"?")
        bare, query = (path, b"") if q < 0 else (path[:q], path[q:])
        return rewrite.regex.sub(rewrite.substitution, bare) + query
    return path


def edit_request_head(head: bytes, route: Route, path: bytes) -> bytes:
    """Apply the route's rewrite and request header mutation to an HTTP/1.1 request head."""
    rw = route.rewrite
    if rw is not None:
        if rw.prefix is not None or rw.regex is not None:
            line_end = head.find(b"\r\n")
            method, _, rest = head[:line_end].partition(b" ")
            version = rest.rsplit(b" ", 1)[1]
            head = b"%s %s %s%s" % (method, new_path(route, path, rw), version, head[line_end:])
        if rw.host is not None:
            head = rewrite_head(head, (b"host",), ((b"host", rw.host),))
    mut = route.mutation
    if mut is not None:
        ops = mut.request_add
        # set (append False) replaces existing values, add (append True) keeps them
        head = rewrite_head(head, (*mut.request_remove, *(op.name for op in ops if not op.append)),
                            ((op.name, op.value) for op in ops))
    return head


def edit_response_headers(headers: list[tuple[bytes, bytes]], mut: HeaderMutation) -> list[tuple[bytes, bytes]]:
    drop = set(mut.response_remove)
    drop.update(op.name for op in mut.response_add if not op.append)
    out = [(n, v) for n, v in headers if n.lower() not in drop] if drop else list(headers)
    out += [(op.name, op.value) for op in mut.response_add]
    return out


def redirect_location(r: Redirect, scheme: bytes, host: bytes, path: bytes, route: Route) -> bytes:
    """The Location of a redirect route's reply (Envoy's RedirectAction)."""
    q = path.find(b"?")
    bare, query = (path, b"") if q < 0 else (path[:q], path[q:])
    if r.strip_query:
        query = b""
    if r.path is not None:
        if b"?" in r.path:
            bare, query = r.path, b""
        else:
            bare = r.path
    elif r.prefix is not None:
        bare = r.prefix + bare[len(route.path):]
    authority = r.host if r.host is not None else host
    if r.port:
        name = authority.rsplit(b":", 1)[0] if b":" in authority and not authority.endswith(b"]") else authority
        authority = b"%s:%d" % (name, r.port)
    return (r.scheme or scheme) + b"://" + authority + bare + query


def shadow_head(head: bytes) -> bytes:
    """A mirrored request's head: the Host gets "-shadow" before any port, as Envoy does."""
    m = _HOST_LINE.search(head)
    if m is None:
        return head
    host = m.group(1).strip()
    if b":" in host and not host.endswith(b"]"):
        name, port = host.rsplit(b":", 1)
        shadow = name + b"-shadow:" + port
    else:
        shadow = host + b"-shadow"
    return head[:m.start(1)] + shadow + head[m.end(1):]
