"""One HTTP/1.1 request/response exchange: validate, route, relay.

A ``Stream`` is created per request by ``hcm.HttpConnection``. It checks the
request head, builds the head sent upstream (hop-by-hop headers removed,
x-forwarded-for / x-forwarded-proto / x-request-id added), routes it on the
snapshot current at that moment, picks an endpoint, checks out or opens an
upstream connection, and then relays both bodies, re-framing them where the
two sides disagree (chunked vs. length vs. close-delimited, HTTP/1.0
clients). Failures become a ``ProxyError`` handed to the connection's
``local_reply``, the one rescue point.

It must not write to the downstream transport itself (it queues through the
connection) and must not touch protobuf or YAML: everything it reads is a
``model`` object.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from proxy import tracing  # [tracing]
from proxy.accesslog import HTTP as HTTP_RECORD  # [accesslog]
from proxy.cluster import ClusterRuntime
from proxy.context import Context
from proxy.errors import (
    ClusterNotFoundError,
    DownstreamProtocolError,
    NoHealthyUpstreamError,
    NoRouteError,
    NotImplementedCodingError,
    ProxyError,
    RequestTimeoutError,
    UpstreamResetError,
)
from proxy.lb import request_hash
from proxy.model import AccessLog, Endpoint, TlsClient  # [accesslog]
from proxy.policy import authorize_request
from proxy.router import find_virtual_host, match_route, pick_cluster
from proxy.tls import Peer
from proxy.upstream import UpstreamConnection

if TYPE_CHECKING:
    from proxy.hcm import HttpConnection

HIGH_WATER = 64 * 1024

# Request headers that are not forwarded as received (RFC 9110 section 7.6.1,
# plus the ones this proxy rewrites itself).
_REQ_SPECIAL = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding", b"upgrade",
    b"trailer", b"expect", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-client-cert",
})
_RESP_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding", b"upgrade",
    b"trailer", b"content-length",
})
_REQ_TRACED = _REQ_SPECIAL | tracing.tc.REWRITTEN  # [tracing] the upstream gets our context instead
_KNOWN_TOKENS = frozenset({b"close", b"keep-alive", b"upgrade", b""})
_STATUS_LINES = {code: b"HTTP/1.1 %d " % code for code in range(100, 600)}

_MODE_NONE, _MODE_LENGTH, _MODE_CHUNKED, _MODE_EOF = 0, 1, 2, 3


def _request_id(bits: int) -> bytes:
    """A random (version 4) UUID, formatted without the uuid module's overhead."""
    n = (bits & ~(0xF << 76)) | (0x4 << 76)
    n = (n & ~(0x3 << 62)) | (0x2 << 62)
    h = b"%032x" % n
    return b"-".join((h[:8], h[8:12], h[12:16], h[16:20], h[20:]))


# [accesslog]
def _upstream_identity(tls: TlsClient | None) -> tuple[bool, str]:
    """(mTLS, the server's expected SPIFFE id or "") of an upstream dialled with ``tls``."""
    if tls is None or not (tls.cert_secret or tls.cert_file):
        return False, ""
    for san in tls.peer_sans:
        if san.kind == "URI" and not san.prefix:
            return True, san.value
    return True, ""
# [accesslog] end


class Stream:
    __slots__ = (
        "buffered", "close_after", "cluster", "conn", "connect_task", "ctx", "done", "expect_continue",
        "flags", "hdrs", "host", "http10", "keep_alive", "method", "mode", "out", "path", "raw_headers",
        "req_bytes", "req_chunked", "req_complete", "resp_bytes", "resp_eof_delimited", "response_started",
        "sent_any",
        "span",  # [tracing]
        "status", "t0", "timeout", "timer", "upgrade", "upgrade_rest", "upstream",
        "upstream_host", "upstream_tls",  # [accesslog]
        "url",
    )

    def __init__(self, conn: HttpConnection, ctx: Context) -> None:
        self.conn = conn
        self.ctx = ctx
        # request, as parsed
        self.url = b""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.method = b""
        self.http10 = False
        self.keep_alive = True
        self.upgrade = False
        self.upgrade_rest: bytes | None = None
        self.hdrs: dict[bytes, bytes] = {}
        self.host = b""
        self.path = b""
        self.expect_continue = False
        self.req_chunked = False
        self.req_complete = False
        self.req_bytes = 0
        # upstream side
        self.out: list[bytes] = []
        self.buffered = 0
        self.sent_any = False
        self.cluster: ClusterRuntime | None = None
        self.upstream: UpstreamConnection | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.timeout = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.t0 = 0.0  # loop time when routing began
        self.span: tracing.ActiveSpan | None = None  # [tracing] set when sampled
        self.upstream_host: Endpoint | None = None  # [accesslog] the endpoint picked (formatted off the path)
        self.upstream_tls: TlsClient | None = None  # [accesslog] how it is dialled (Istio metric labels)
        # response
        self.response_started = False
        self.status = 0
        self.flags = ""
        self.mode = _MODE_NONE
        self.resp_eof_delimited = False
        self.resp_bytes = 0
        self.close_after = False
        self.done = False

    # ------------------------------------------------------------------ request head
    def prepare(self) -> None:
        """Validate the head and build the bytes sent upstream. Raises DownstreamProtocolError."""
        url = self.url
        absolute = url[:1] != b"/"
        if absolute:
            url = self._origin_form(url)
        self.path = url
        hdrs = self.hdrs
        parts = [self.method, b" ", url, b" HTTP/1.1\r\n"]
        traced = self.conn.listener.http.tracing  # type: ignore[union-attr]  # [tracing]
        special = _REQ_SPECIAL if traced is None else _REQ_TRACED  # [tracing]
        for name, value in self.raw_headers:
            lname = name.lower()
            prev = hdrs.get(lname)
            if prev is None:
                hdrs[lname] = value
            else:
                if lname == b"host":
                    raise DownstreamProtocolError()  # RFC 9112 section 3.2: exactly one Host
                hdrs[lname] = prev + b"," + value
            if lname not in special:
                parts += (name, b": ", value, b"\r\n")
        host = hdrs.get(b"host")
        if host is None:
            if not self.http10:
                raise DownstreamProtocolError()
            host = b""
        if not self.host:
            self.host = host.lower()
        elif absolute and self.host != b"*":
            # RFC 9112 section 3.2.2: the target's authority replaces the Host header.
            parts = parts[:4] + [p for i in range(4, len(parts), 4)
                                 if parts[i].lower() != b"host" for p in parts[i:i + 4]]
            parts += (b"host: ", self.host, b"\r\n")
        conn_hdr = hdrs.get(b"connection")
        if conn_hdr is not None:
            extra = {t.strip().lower() for t in conn_hdr.split(b",")} - _KNOWN_TOKENS
            if extra:  # headers the client nominated as hop-by-hop (RFC 9110 section 7.6.1)
                parts = parts[:4]
                for name, value in self.raw_headers:
                    lname = name.lower()
                    if lname not in special and lname not in extra:
                        parts += (name, b": ", value, b"\r\n")
        te = hdrs.get(b"transfer-encoding")
        if te is not None:
            if te.strip().lower() != b"chunked":
                raise NotImplementedCodingError()
            self.req_chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
        if self.upgrade:
            if self.method == b"CONNECT":
                raise NoRouteError()
            parts += (b"connection: upgrade\r\nupgrade: ", hdrs.get(b"upgrade", b""), b"\r\n")
        expect = hdrs.get(b"expect")
        if expect is not None and expect.lower() == b"100-continue":
            self.expect_continue = True
        conn = self.conn
        http = conn.listener.http
        assert http is not None
        if http.forward_client_address:
            xff = hdrs.get(b"x-forwarded-for")
            parts += (b"x-forwarded-for: ", conn.client_ip if xff is None else xff + b", " + conn.client_ip, b"\r\n")
        peer = conn.peer
        if peer is not None:
            # Envoy's format; a client-supplied value is never forwarded (it could be forged).
            parts += (b"x-forwarded-client-cert: ", self._xfcc(peer), b"\r\n")
        xfp = hdrs.get(b"x-forwarded-proto")
        parts += (b"x-forwarded-proto: ", b"http" if xfp is None else xfp, b"\r\n")
        if http.generate_request_id and b"x-request-id" not in hdrs:
            rid = _request_id(self.ctx.getrandbits(128))
            hdrs[b"x-request-id"] = rid
            parts += (b"x-request-id: ", rid, b"\r\n")
        if traced is not None:  # [tracing] our span is the upstream's parent; unsampled ones propagate too
            parts += tracing.begin(self, traced)
        parts.append(b"\r\n")
        self.out.append(b"".join(parts))

    def _xfcc(self, peer: Peer) -> bytes:
        tls = self.conn.listener.tls
        own = self.ctx.tls.local_spiffe_id(tls.cert_secret) if tls is not None else ""
        fields = [f"By={own}"] if own else []
        fields += [f"Hash={peer.cert_sha256}", 'Subject=""']
        fields += [f"URI={u}" for u in peer.uris]
        return ";".join(fields).encode()

    def _origin_form(self, url: bytes) -> bytes:
        """Absolute-form targets (RFC 9112 section 3.2.2) route by their authority."""
        low = url[:8].lower()
        if low.startswith(b"http://") or low.startswith(b"https://"):
            rest = url.split(b"://", 1)[1]
            slash = rest.find(b"/")
            authority, path = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
            if not authority:
                raise DownstreamProtocolError()
            self.host = authority.lower()
            return path
        if url == b"*" and self.method == b"OPTIONS":
            return url
        raise DownstreamProtocolError()

    # ------------------------------------------------------------------ routing and upstream
    def start(self) -> None:
        """Route and pick an upstream; raises ProxyError for a local reply."""
        ctx = self.ctx
        self.t0 = ctx.loop.time()
        http = self.conn.listener.http
        assert http is not None
        table = ctx.snapshot.routes.get(http.route_config_name)
        if table is None:
            raise NoRouteError()
        vh = find_virtual_host(table, self.host)
        if vh is None:
            raise NoRouteError()
        route = match_route(vh, self.path, self.hdrs)
        if route is None:
            raise NoRouteError()
        name = pick_cluster(route, ctx.random()) if route.weighted else route.cluster
        rt = ctx.clusters.get(name)
        if rt is None:
            raise ClusterNotFoundError()
        self.cluster = rt
        stats = rt.stats
        stats.rq_total += 1
        stats.rq_active += 1
        # ---- [authz] RequestAuthentication + AuthorizationPolicy: jwt_authn, then RBAC (issue 7).
        # Compiled per listener; None when no policy applies. Raises JwtAuthError / PolicyDeniedError.
        if http.policy is not None:
            authorize_request(self, http.policy, ctx)
        # ---- [authz] end
        # [interception] ORIGINAL_DST clusters dial the connection's original destination
        # (set by listener.CaptureServerSocket; absent on explicit listeners: 503 UH).
        # [lb] a hash key only when the route has hash policies; LEAST_REQUEST counts active requests
        if rt.spec.original_dst:
            ep = rt.pick_original(getattr(self.conn, "original_dst", None))
        else:
            hp = route.hash_policy
            ep = rt.lb.pick(request_hash(hp, self.hdrs, self.path, self.conn.client_ip) if hp else None)
            active = rt.active
            if active is not None and ep is not None:
                active[ep] = active.get(ep, 0) + 1
        # [lb] end
        if ep is None:
            raise NoHealthyUpstreamError()
        self.upstream_host = ep  # [accesslog]
        self.upstream_tls = ep.tls if ep.tls is not None else rt.spec.original_dst_tls  # [accesslog]
        self.timeout = route.timeout
        if self.req_complete:
            self._arm_timer()
        if self.expect_continue and not self.req_complete:
            self.conn.write_now(b"HTTP/1.1 100 Continue\r\n\r\n")
        pool = rt.pool(ep, ctx.loop)
        up = pool.checkout()
        if up is not None:
            self._attach(up)
        else:
            self.connect_task = pool.connect(self._on_connected)

    def _on_connected(self, up: UpstreamConnection | None, err: ProxyError | None) -> None:
        self.connect_task = None
        if self.done:
            if up is not None:
                up.release(True)  # nothing was sent on it: keep it warm for the next request
            return
        if err is not None or up is None:
            self.conn.local_reply(self, err or UpstreamResetError())
            return
        self._attach(up)
        self.flush_upstream()

    def _attach(self, up: UpstreamConnection) -> None:
        self.upstream = up
        up.exchange = self
        up.head_only = self.method == b"HEAD"
        if self.conn.write_paused:
            up.pause_reading()

    def flush_upstream(self) -> None:
        up = self.upstream
        out = self.out
        if up is not None and out and not self.conn._in_feed:
            up.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
            self.sent_any = True
            if self.buffered:
                self.buffered = 0
                self.conn.resume_reading()

    # ------------------------------------------------------------------ request body
    def request_body(self, data: bytes) -> None:
        if self.done:
            return
        self.req_bytes += len(data)
        if self.req_chunked:
            self.out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self.out.append(data)
        if self.upstream is None:
            self.buffered += len(data)
            if self.buffered > HIGH_WATER:
                self.conn.pause_reading()

    def large_body(self) -> bool:
        """True if the unread rest of the request body may be big (chunked or over 64 KiB)."""
        if self.req_chunked:
            return True
        cl = self.hdrs.get(b"content-length")
        try:
            return cl is not None and int(cl) - self.req_bytes > HIGH_WATER
        except ValueError:
            return True

    def request_complete(self) -> None:
        self.req_complete = True
        if self.done:
            return
        if self.req_chunked:
            self.out.append(b"0\r\n\r\n")
        if self.cluster is not None:
            self._arm_timer()

    def _arm_timer(self) -> None:
        if self.timeout > 0 and self.timer is None and not self.done:
            self.timer = self.ctx.loop.call_later(self.timeout, self._on_timeout)

    def _on_timeout(self) -> None:
        self.timer = None
        if self.done:
            return
        if self.cluster is not None:
            self.cluster.stats.rq_timeout += 1
        self.conn.local_reply(self, RequestTimeoutError())

    # ------------------------------------------------------------------ response (upstream callbacks)
    def on_upstream_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        self.status = status
        self.response_started = True
        parts = [_STATUS_LINES.get(status) or b"HTTP/1.1 %d " % status, reason, b"\r\n"]
        length: bytes | None = None
        chunked = False
        for name, value in headers:
            lname = name.lower()
            if lname in _RESP_HOP:
                if lname == b"content-length":
                    length = value
                    parts += (name, b": ", value, b"\r\n")
                elif lname == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                continue
            parts += (name, b": ", value, b"\r\n")
        conn = self.conn
        close = (conn._closing or self.ctx.draining or not self.keep_alive or not self.req_complete
                 or (self.upgrade and status != 101))
        if status == 101:
            mode = _MODE_NONE
            upgrade = next((v for n, v in headers if n.lower() == b"upgrade"), b"")
            parts += (b"connection: upgrade\r\nupgrade: ", upgrade, b"\r\n")
            close = False
        elif self.method == b"HEAD" or status == 204 or status == 304:
            mode = _MODE_NONE
        elif length is not None:
            mode = _MODE_LENGTH
        elif self.http10:
            mode = _MODE_EOF
            close = True
        else:
            mode = _MODE_CHUNKED
            parts.append(b"transfer-encoding: chunked\r\n")
        self.resp_eof_delimited = mode != _MODE_NONE and length is None and not chunked
        self.mode = mode
        if status != 101:
            if close:
                parts.append(b"connection: close\r\n")
            elif self.http10:
                parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        self.close_after = close
        conn.queue_write(b"".join(parts))

    def on_upstream_body(self, data: bytes) -> None:
        if self.done:
            return
        self.resp_bytes += len(data)
        if self.mode == _MODE_CHUNKED:
            if data:
                self.conn.queue_write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.conn.queue_write(data)

    def on_upstream_flush(self) -> None:
        self.conn.flush()

    def on_upstream_complete(self, keep_alive: bool) -> None:
        if self.done or self.status == 101:
            return
        if self.mode == _MODE_CHUNKED:
            self.conn.queue_write(b"0\r\n\r\n")
        self._finish(keep_alive and self.req_complete and not self.buffered_tail())

    def buffered_tail(self) -> bool:
        """True if request bytes are still waiting: the upstream saw a partial request."""
        return bool(self.out)

    def on_upstream_upgrade(self, rest: bytes) -> None:
        """The upstream accepted an Upgrade (101): splice the two connections."""
        up = self.upstream
        if self.done or up is None or self.status != 101:
            return
        self.upstream = None
        self._record(101, "")
        self._stop()
        conn = self.conn
        if rest:
            conn.queue_write(rest)
        conn.flush()
        up.exchange = None
        up.tunnel = conn
        pending = self.upgrade_rest
        if pending:
            up.write(pending)
        conn.start_tunnel(up)

    def on_upstream_error(self, err: ProxyError) -> None:
        if self.done:
            return
        up = self.upstream
        self.upstream = None
        if self.response_started and self.resp_eof_delimited and isinstance(err, UpstreamResetError):
            # EOF is how a close-delimited body ends (RFC 9112 section 6.3).
            if self.mode == _MODE_CHUNKED:
                self.conn.queue_write(b"0\r\n\r\n")
            self.conn.flush()
            if up is not None:
                up.abort()
            self._finish(False)
            return
        if up is not None:
            up.abort()
        if self.cluster is not None:
            self.cluster.stats.rq_reset += 1
        self.conn.local_reply(self, err)

    def pause_downstream(self) -> None:
        self.conn.pause_reading()

    def resume_downstream(self) -> None:
        self.conn.resume_reading()

    # ------------------------------------------------------------------ endings
    def _stop(self) -> None:
        self.done = True
        t = self.timer
        if t is not None:
            self.timer = None
            t.cancel()

    def _record(self, code: int, flags: str) -> None:
        span = self.span  # [tracing]
        if span is not None:
            tracing.end(self, span, code, flags)
        rt = self.cluster
        if rt is not None:
            rt.stats.rq_active -= 1
            active = rt.active  # [lb]
            if active is not None and self.upstream_host is not None:
                active[self.upstream_host] -= 1
            # [accesslog] Istio labels: the request class carries mTLS and the peer identity
            peer = self.conn.peer
            if peer is not None:
                mtls, ident = True, peer.spiffe_id
            else:
                mtls, ident = _upstream_identity(self.upstream_tls)
            rt.stats.record_request(code, flags, (self.ctx.loop.time() - self.t0) * 1000.0,
                                    self.req_bytes, self.resp_bytes, mtls, ident)
        # [accesslog] one queued tuple per request when the listener logs; formatted in the background
        http = self.conn.listener.http
        if http is not None and http.access_log is not None:
            self._access_log(http.access_log, code, flags)
        # [accesslog] end

    def _access_log(self, spec: AccessLog, code: int, flags: str) -> None:  # [accesslog]
        conn = self.conn
        rt = self.cluster
        now = self.ctx.loop.time()
        self.ctx.access_log.push((
            spec, HTTP_RECORD, self.t0 or now, now, self.method, self.path, self.http10, code, flags,
            self.req_bytes, self.resp_bytes, self.hdrs, conn.client_ip, conn.peer, self.upstream_host,
            rt.spec.name if rt is not None else None,
        ))

    def _finish(self, reusable: bool) -> None:
        self._stop()
        up = self.upstream
        if up is not None:
            self.upstream = None
            up.release(reusable)
        self._record(self.status, self.flags)
        self.conn.stream_done(self, self.close_after)

    def finish_local(self, err: ProxyError, body_len: int) -> None:
        """The connection answered (or reset) this request itself."""
        self._stop()
        self.flags = err.flag
        up = self.upstream
        if up is not None:
            self.upstream = None
            up.release(not self.sent_any and not up.closed)
        self.resp_bytes += body_len
        if self.cluster is not None:
            self._record(err.status, err.flag)
        else:
            self.ctx.stats.cluster("BlackHoleCluster", "BlackHoleCluster").record_request(
                err.status, err.flag, 0.0, self.req_bytes, body_len)
            if self.span is not None:  # [tracing] no route: the span ends here
                tracing.end(self, self.span, err.status, err.flag)
            http = self.conn.listener.http  # [accesslog] no cluster: only the access log line
            if http is not None and http.access_log is not None:
                self._access_log(http.access_log, err.status, err.flag)

    def discard_request(self) -> None:
        """A parse error hit this request: none of its bytes may reach the upstream."""
        self.out.clear()
        if self.done:
            return
        self._stop()
        up = self.upstream
        if up is not None:
            self.upstream = None
            up.release(not self.sent_any)
        if self.cluster is not None:
            self._record(400, "DPE")

    def downstream_lost(self) -> None:
        """The client went away mid-request: reset the upstream exchange (Envoy's DC)."""
        if self.done:
            return
        self._stop()
        up = self.upstream
        if up is not None:
            self.upstream = None
            up.release(False)
        if self.cluster is not None:
            self._record(0, "DC")
