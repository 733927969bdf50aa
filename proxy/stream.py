"""One request/response exchange, whatever the codecs: route, try, retry, relay.

A ``Stream`` is the protocol-neutral core of a request (STYLE.md 2.2 steps
4-10). The downstream codec's subclass (``stream_h1.H1Stream``, the HTTP/2
one) parses the head into ``method``/``host``/``path``/``hdrs`` and builds the
HTTP/1.1 request head in ``out[0]``, the one form of the forwarded request
(rewrites, policy and header mutations edit it; an HTTP/2 upstream converts
it). The subclass also writes the response in its own framing through the
``emit_*`` hooks. This class does the rest: routing on the snapshot current
at that moment, local answers (redirect, direct response, fault abort), the
fault delay, circuit breakers, endpoint choice, the attempt on a pooled
upstream connection, per-try and route timeouts, retries with backoff and a
budget, mirroring, outlier-detection outcomes, and the records (stats, span,
access log).

Failures become a ``ProxyError`` handed to the connection's ``local_reply``,
the one rescue point. Nothing here touches protobuf or YAML.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from proxy import resilience, tracing  # [tracing]
from proxy.accesslog import HTTP as HTTP_RECORD  # [accesslog]
from proxy.cluster import ClusterRuntime
from proxy.context import Context
from proxy.errors import (
    ClusterNotFoundError,
    FaultAbortError,
    LocalAnswer,
    NoRouteError,
    ProxyError,
    RefusedStreamError,
    UpstreamOverflowError,
)
from proxy.forwarder import Forwarder
from proxy.model import AccessLog, Endpoint, Route, TlsClient  # [accesslog]
from proxy.policy import authorize_request
from proxy.route_edit import edit_request_head, edit_response_headers, last_chunk, redirect_location
from proxy.router import find_virtual_host, match_route, pick_cluster

if TYPE_CHECKING:
    from proxy.hcm import HttpConnection

HIGH_WATER = 64 * 1024
# Request trailer fields never forwarded: framing, routing and connection-specific ones (RFC 9110 section 6.5.1).
_TRAILER_DROP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
                           b"te", b"trailer", b"content-length", b"host"})


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


class Stream(Forwarder):
    __slots__ = (
        "close_after", "cluster", "conn", "ctx", "done", "expect_continue", "flags", "grpc", "grpc_status",
        "hdrs", "host", "http10", "keep_alive", "method", "path", "raw_headers", "req_bytes", "req_chunked",
        "req_complete", "req_trailers", "resp_bytes", "route", "scheme", "span", "t0", "t_head", "url",
    )

    def __init__(self, conn: HttpConnection, ctx: Context) -> None:
        self.conn = conn
        self.ctx = ctx
        # request, as parsed
        self.url = b""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.method = b""
        self.scheme = b"http"
        self.http10 = False
        self.keep_alive = True
        self.hdrs: dict[bytes, bytes] = {}
        self.host = b""
        self.path = b""
        self.grpc = False  # content-type application/grpc: local replies are gRPC trailers-only
        self.grpc_status = -1  # the gRPC status the client got (for Istio's grpc_response_status); -1: none
        self.expect_continue = False
        self.req_chunked = False  # the HTTP/1.1 upstream gets a chunked body
        self.req_complete = False
        self.req_bytes = 0
        self.req_trailers: list[tuple[bytes, bytes]] | None = None  # forwarded after the body (see request_trailers)
        # upstream side
        self.out: list[bytes] = []  # bytes for the upstream not yet written; out[0] is the head until sent
        self.buffered = 0
        self.sent_any = False
        self.end_sent = False  # [http2] END_STREAM sent on an HTTP/2 upstream stream
        self.up_h2 = False  # [http2] this request goes upstream over HTTP/2
        self.route: Route | None = None
        self.cluster: ClusterRuntime | None = None
        self.upstream: Any = None  # UpstreamConnection, or an HTTP/2 upstream stream
        self.pool: Any = None
        self.waiting = False  # waiting for a pooled connection (a pending request)
        self.timeout = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.t0 = 0.0  # loop time when routing began
        self.t_head = 0.0  # [accesslog] loop time when the upstream's response head arrived (0: none did)
        self.span: tracing.ActiveSpan | None = None  # [tracing] set when sampled
        self.upstream_host: Endpoint | None = None  # [accesslog] the endpoint picked (formatted off the path)
        self.upstream_tls: TlsClient | None = None  # [accesslog] how it is dialled (Istio metric labels)
        # [traffic] retries and mirrors
        self.attempt = 0
        self.keep: list[bytes] | None = None  # everything written upstream, while a retry or mirror may need it
        self.keep_bytes = 0
        self.tried: list[Endpoint] | None = None
        self.try_timer: asyncio.TimerHandle | None = None
        self.in_retry = False  # this attempt is a retry (counted in the cluster's retries in flight)
        self.host_open = False  # an attempt on ``upstream_host`` is in flight (LEAST_REQUEST counts it)
        # response
        self.response_started = False
        self.status = 0
        self.flags = ""
        self.resp_bytes = 0
        self.close_after = False
        self.done = False

    # ------------------------------------------------------------------ hooks of the downstream codec
    def emit_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        raise NotImplementedError

    def emit_body(self, data: bytes) -> None:
        raise NotImplementedError

    def emit_end(self, trailers: list[tuple[bytes, bytes]] | None) -> None:
        raise NotImplementedError

    def upstream_headers(self) -> list[bytes]:
        """Header lines the proxy adds to every forwarded request (x-forwarded-*, x-request-id, tracing)."""
        conn = self.conn
        http = conn.listener.http
        assert http is not None
        hdrs = self.hdrs
        parts: list[bytes] = []
        if http.forward_client_address:
            xff = hdrs.get(b"x-forwarded-for")
            parts += (b"x-forwarded-for: ", conn.client_ip if xff is None else xff + b", " + conn.client_ip, b"\r\n")
        peer = conn.peer
        if peer is not None:
            # Envoy's format; a client-supplied value is never forwarded (it could be forged).
            tls = conn.listener.tls
            own = self.ctx.tls.local_spiffe_id(tls.cert_secret) if tls is not None else ""
            fields = [f"By={own}"] if own else []
            fields += [f"Hash={peer.cert_sha256}", 'Subject=""']
            fields += [f"URI={u}" for u in peer.uris]
            parts += (b"x-forwarded-client-cert: ", ";".join(fields).encode(), b"\r\n")
        xfp = hdrs.get(b"x-forwarded-proto")
        parts += (b"x-forwarded-proto: ", self.scheme if xfp is None else xfp, b"\r\n")
        if http.generate_request_id and b"x-request-id" not in hdrs:
            rid = _request_id(self.ctx.getrandbits(128))
            hdrs[b"x-request-id"] = rid
            parts += (b"x-request-id: ", rid, b"\r\n")
        traced = http.tracing  # [tracing] our span is the upstream's parent; unsampled ones propagate too
        if traced is not None:
            tracing.begin(self, traced, parts)
        return parts

    # ------------------------------------------------------------------ routing
    def start(self) -> None:
        """Route and start the first attempt; raises ProxyError for a local reply."""
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
        route = match_route(vh, self.path, self.hdrs, self.method, self.host, self.scheme)
        if route is None:
            raise NoRouteError()
        self.route = route
        if route.direct is not None or route.redirect is not None:  # [traffic] answered here
            if http.policy is not None:
                authorize_request(self, http.policy, ctx)
            raise self._local_answer(route)
        name = pick_cluster(route, ctx.random()) if route.weighted else route.cluster
        rt = ctx.clusters.get(name)
        if rt is None:
            raise ClusterNotFoundError()
        stats = rt.stats
        if stats.rq_active >= rt.spec.limits.max_requests:  # [traffic] circuit breaker
            stats.rq_overflow += 1
            raise UpstreamOverflowError()
        self.cluster = rt
        stats.rq_total += 1
        stats.rq_active += 1
        # ---- [authz] RequestAuthentication + AuthorizationPolicy: jwt_authn, then RBAC (issue 7).
        # Compiled per listener; None when no policy applies. Raises JwtAuthError / PolicyDeniedError.
        if http.policy is not None:
            authorize_request(self, http.policy, ctx)
        # ---- [authz] end
        if route.rewrite is not None or route.mutation is not None:  # [traffic]
            self.out[0] = edit_request_head(self.out[0], route, self.path)
        self.up_h2 = self.speaks_h2(rt)  # [http2]
        if route.retry is not None or route.mirrors:
            self.keep = []
        fault = route.fault  # [traffic] envoy.filters.http.fault, after the policy filters (Istio's order)
        if fault is not None:
            rand = ctx.random
            if fault.abort_percent and rand() * 100 < fault.abort_percent:
                stats.fault_aborts += 1
                raise FaultAbortError(fault.abort_status, fault.abort_grpc)
            if fault.delay and rand() * 100 < fault.delay_percent:
                stats.fault_delays += 1
                self.flags = "DI"
                ctx.loop.call_later(fault.delay, self._after_delay)
                return
        self._routed()

    def downstream_h2(self) -> bool:
        return False

    def speaks_h2(self, rt: ClusterRuntime) -> bool:  # [http2]
        """Whether this request goes to ``rt`` over HTTP/2: the cluster's protocol, or the client's
        when the cluster says use_downstream_protocol (Istio's useClientProtocol). Mirrors too."""
        return rt.spec.http2 or (rt.spec.use_downstream_protocol and self.downstream_h2())

    def h2_fields(self, head: bytes, scheme: bytes) -> list[tuple[bytes, bytes]] | None:  # [http2]
        """``head`` (``out[0]``) as HTTP/2 request fields when the stream still has them unedited, else None."""
        return None

    def _local_answer(self, route: Route) -> ProxyError:
        d = route.direct
        if d is not None:
            return LocalAnswer(d.status, d.body)
        r = route.redirect
        assert r is not None
        return LocalAnswer(r.status, b"", ((b"location", redirect_location(r, self.scheme, self.host, self.path,
                                                                           route)),))

    def _after_delay(self) -> None:
        if self.done:
            return
        try:
            self._routed()
        except ProxyError as err:
            self.conn.local_reply(self, err)
            return
        self.flush_upstream()

    def _routed(self) -> None:
        """The request goes upstream: timeouts, expect-continue, the first attempt."""
        route = self.route
        assert route is not None
        timeout = route.timeout
        if route.grpc_timeout and self.grpc:  # [traffic] the client's grpc-timeout replaces the route's
            value = self.hdrs.get(b"grpc-timeout")
            if value is not None:
                t = resilience.parse_grpc_timeout(value)
                if t is not None:
                    cap = route.grpc_timeout_max
                    timeout = min(t, cap) if cap else t
        self.timeout = timeout
        if self.req_complete:
            self._arm_timer()
        if self.expect_continue and not self.req_complete:
            self.conn.write_now(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._attempt()

    # ------------------------------------------------------------------ request body
    def request_body(self, data: bytes) -> None:
        if self.done:
            return
        self.req_bytes += len(data)
        if self.req_chunked and not self.up_h2:
            self.out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self.out.append(data)
        if self.upstream is None:
            self.buffered += len(data)
            if self.buffered > HIGH_WATER:
                self.conn.pause_reading()

    def request_trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        """The request's trailers (before ``request_complete``). They go in the last chunk of a
        chunked HTTP/1.1 body or as a HEADERS frame to HTTP/2; an HTTP/1.1 body sent with a
        content-length cannot carry them, and there they are dropped (as Envoy does). Fields
        about framing or the connection never pass."""
        kept = [(n.lower(), v) for n, v in fields if n.lower() not in _TRAILER_DROP]
        if kept:
            self.req_trailers = kept

    def request_complete(self) -> None:
        self.req_complete = True
        if self.done:
            return
        if self.req_chunked and not self.up_h2:
            self.out.append(last_chunk(self.req_trailers))
        route = self.route
        if self.cluster is not None and route is not None:
            self._arm_timer()
            retry = route.retry
            if retry is not None and retry.per_try_timeout and self.try_timer is None and self.host_open:
                self.try_timer = self.ctx.loop.call_later(retry.per_try_timeout, self._on_try_timeout)
            if route.mirrors:
                self._mirror(route)

    # ------------------------------------------------------------------ response (upstream callbacks)
    def on_upstream_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        if self.done:
            return
        route = self.route
        retry = route.retry if route is not None else None
        # [traffic] a retriable response? [http2] gRPC failures come as 200 with grpc-status (trailers-only)
        if retry is not None and self.keep is not None and (status >= 400 or self.grpc):
            grpc_status = None
            if self.grpc:
                for n, v in headers:
                    if n.lower() == b"grpc-status" and v.isdigit():
                        grpc_status = int(v)
            if resilience.retriable_status(retry, status, grpc_status):
                up = self.upstream
                self.upstream = None
                self._end_attempt(status)
                flag = self._retry(True)
                if flag is None:
                    if up is not None:
                        up.abort()  # its body is not wanted (h1: the connection cannot be reused)
                    return
                self.upstream = up  # no retry left: this response goes to the client
                if flag:
                    self.flags = f"{self.flags},{flag}" if self.flags else flag
                self._forward_head(status, reason, headers, outcome_recorded=True)
                return
        self._forward_head(status, reason, headers, outcome_recorded=False)

    def _forward_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                      outcome_recorded: bool) -> None:
        self.status = status
        self.response_started = True
        if self.conn.listener.http.access_log is not None:  # type: ignore[union-attr]  # [accesslog]
            self.t_head = self.ctx.loop.time()  # upstream_service_time
        t = self.try_timer
        if t is not None:
            self.try_timer = None
            t.cancel()
        rt = self.cluster
        if not outcome_recorded and rt is not None and self.upstream_host is not None and rt.outlier is not None:
            rt.record_outcome(self.upstream_host, status)
        if self.in_retry and rt is not None:
            rt.stats.rq_retry_success += 1
        route = self.route
        if self.keep is not None and (route is None or not route.mirrors or self.req_complete):
            self.keep = None  # committed: nothing left to replay
        if self.grpc:  # a trailers-only response carries grpc-status in its head
            self._grpc_status(headers)
        if route is not None and route.mutation is not None and (route.mutation.response_add
                                                                  or route.mutation.response_remove):
            headers = edit_response_headers(headers, route.mutation)
        self.emit_head(status, reason, headers)

    def on_upstream_body(self, data: bytes) -> None:
        if self.done:
            return
        self.resp_bytes += len(data)
        self.emit_body(data)

    def _grpc_status(self, fields: list[tuple[bytes, bytes]]) -> None:
        for n, v in fields:
            if n.lower() == b"grpc-status" and v.isdigit():
                self.grpc_status = int(v)

    def on_upstream_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        if not self.done:
            if self.grpc:
                self._grpc_status(trailers)
            self.emit_end(trailers)
            self._complete(True)

    def on_upstream_flush(self) -> None:
        self.conn.flush()

    def on_upstream_complete(self, keep_alive: bool) -> None:
        if self.done or self.status == 101:
            return
        self.emit_end(None)
        self._complete(keep_alive)

    def _complete(self, keep_alive: bool) -> None:
        self._finish(keep_alive and self.req_complete and not self.buffered_tail())

    def buffered_tail(self) -> bool:
        """True if request bytes are still waiting: the upstream saw a partial request."""
        return bool(self.out)

    def on_upstream_error(self, err: ProxyError) -> None:
        if self.done:
            return
        up = self.upstream
        self.upstream = None
        if self.response_started:
            if self.eof_ends_response(err):
                if up is not None:
                    up.abort()
                self._finish(False)
                return
            if up is not None:
                up.abort()
            if self.cluster is not None:
                self.cluster.stats.rq_reset += 1
            self.conn.local_reply(self, err)  # too late for a reply: the codec resets the stream
            return
        if up is not None:
            up.abort()
        self._attempt_failed(err, resilience.REFUSED if isinstance(err, RefusedStreamError) else resilience.RESET)

    def eof_ends_response(self, err: ProxyError) -> bool:
        """HTTP/1.1: EOF is how a close-delimited body ends; the codec subclass decides."""
        return False

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
        t = self.try_timer
        if t is not None:
            self.try_timer = None
            t.cancel()
        if self.waiting and self.pool is not None:
            self.waiting = False
            self.pool.cancel(self._on_connected)
        self.keep = None

    def _record(self, code: int, flags: str) -> None:
        span = self.span  # [tracing]
        if span is not None:
            tracing.end(self, span, code, flags)
        rt = self.cluster
        if rt is not None:
            rt.stats.rq_active -= 1
            if self.in_retry:
                self.in_retry = False
                rt.retries_active -= 1
            if self.host_open:
                self.host_open = False
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
                                    self.req_bytes, self.resp_bytes, mtls, ident,
                                    self.grpc_status if self.grpc else None)
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
            rt.spec.name if rt is not None else None, self.t_head, conn.client_port,
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
        self.flags = f"{self.flags},{err.flag}" if self.flags and err.flag else (err.flag or self.flags)
        if self.grpc and not self.response_started:
            self.grpc_status = err.grpc_status  # the trailers-only reply the codec sends
        up = self.upstream
        if up is not None:
            self.upstream = None
            up.release(not self.sent_any and not up.closed)
        self.resp_bytes += body_len
        if self.cluster is not None:
            self._record(err.status, self.flags)
        else:
            self.ctx.stats.cluster("BlackHoleCluster", "BlackHoleCluster").record_request(
                err.status, err.flag, 0.0, self.req_bytes, body_len, grpc=self.grpc_status if self.grpc else None)
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
            self._record(0, f"{self.flags},DC" if self.flags else "DC")  # e.g. DI,DC: gone during a fault delay

