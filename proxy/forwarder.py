"""The forwarding half of a stream: attempts, retries, timeouts, mirrors (STYLE.md 2.2 step 7).

``Forwarder`` is a mixin of ``stream.Stream`` (it owns no state: the slots
are the stream's). Per attempt: pick an endpoint (another one than before on
a retry, when the policy asks), take a pooled connection under the circuit
breakers or wait for one, arm the per-try timeout, and write what the stream
queued. When an attempt fails before a response head, or its head is
retriable, decide with ``resilience`` whether to try again (replaying the
kept request bytes after a jittered backoff) or to give up with the right
response flags (URX: retries exhausted, UO: the retry budget refused).
"""

from __future__ import annotations

import asyncio
import copy
from typing import TYPE_CHECKING, Any, cast

from proxy import resilience
from proxy.errors import (
    NoHealthyUpstreamError,
    PerTryTimeoutError,
    ProxyError,
    RequestTimeoutError,
    UpstreamResetError,
)
from proxy.lb import request_hash
from proxy.mirror import Shadow
from proxy.model import Endpoint, Route

if TYPE_CHECKING:
    from proxy.cluster import ClusterRuntime
    from proxy.context import Context
    from proxy.hcm import HttpConnection
    from proxy.stream import Stream

KEEP_LIMIT = 1 << 20  # request bytes kept for a retry or a mirror (Envoy's default buffer limit, 1 MiB)


def with_flag(err: ProxyError, extra: str) -> ProxyError:
    """``err`` with another response flag (errors may be shared singletons: copy)."""
    e = copy.copy(err)
    e.flag = f"{err.flag},{extra}" if err.flag else extra
    return e


class Forwarder:
    __slots__ = (
        "attempt", "buffered", "end_sent", "host_open", "in_retry", "keep", "keep_bytes", "out", "pool",
        "response_started", "sent_any", "status", "timeout", "timer", "tried", "try_timer", "up_h2", "upstream",
        "upstream_host", "upstream_tls", "waiting",
    )
    # The state of the whole exchange: the slots above are this half's, the rest are Stream's.
    conn: HttpConnection
    ctx: Context
    route: Route | None
    cluster: ClusterRuntime | None
    upstream: Any
    pool: Any
    waiting: bool
    out: list[bytes]
    keep: list[bytes] | None
    keep_bytes: int
    buffered: int
    sent_any: bool
    end_sent: bool
    up_h2: bool
    req_complete: bool
    req_chunked: bool
    req_trailers: list[tuple[bytes, bytes]] | None
    method: bytes
    path: bytes
    hdrs: dict[bytes, bytes]
    attempt: int
    tried: list[Endpoint] | None
    try_timer: asyncio.TimerHandle | None
    timer: asyncio.TimerHandle | None
    timeout: float
    in_retry: bool
    host_open: bool
    upstream_host: Endpoint | None
    upstream_tls: Any
    response_started: bool
    status: int
    done: bool

    # ------------------------------------------------------------------ attempts
    def _pick(self, rt: ClusterRuntime, route: Route) -> Endpoint | None:
        # [interception] ORIGINAL_DST clusters dial the connection's original destination
        # (set by listener.CaptureServerSocket; absent on explicit listeners: 503 UH).
        if rt.spec.original_dst:
            return rt.pick_original(getattr(self.conn, "original_dst", None))
        # [lb] a hash key only when the route has hash policies
        hp = route.hash_policy
        key = request_hash(hp, self.hdrs, self.path, self.conn.client_ip) if hp else None
        ep = rt.lb.pick(key)
        tried = self.tried
        if tried and ep is not None and route.retry is not None and route.retry.other_host:
            for _ in range(route.retry.host_selection_attempts):  # [traffic] previous_hosts predicate
                if ep not in tried:
                    break
                ep = rt.lb.pick(None)
        return ep

    def _attempt(self) -> None:
        rt = self.cluster
        route = self.route
        assert rt is not None and route is not None
        ep = self._pick(rt, route)
        if ep is None:
            raise NoHealthyUpstreamError()
        self.attempt += 1
        self.upstream_host = ep  # [accesslog]
        self.upstream_tls = ep.tls if ep.tls is not None else rt.spec.original_dst_tls  # [accesslog]
        active = rt.active  # [lb] LEAST_REQUEST counts requests in flight per endpoint
        if active is not None:
            active[ep] = active.get(ep, 0) + 1
        self.host_open = True
        retry = route.retry
        if retry is not None and retry.per_try_timeout and self.req_complete:
            self.try_timer = self.ctx.loop.call_later(retry.per_try_timeout, self._on_try_timeout)
        # [http2] a multiplexed connection of the cluster's HTTP/2 pool, or a keep-alive HTTP/1.1 one
        pool = rt.h2_pool(ep, self.ctx.loop) if self.up_h2 else rt.pool(ep, self.ctx.loop)
        self.pool = pool
        up = pool.acquire(self._on_connected)  # raises UpstreamOverflowError (circuit breaker)
        if up is not None:
            self._attach(up)
        else:
            self.waiting = True

    def _on_connected(self, up: Any, err: ProxyError | None) -> None:
        self.waiting = False
        if self.done:
            if up is not None:
                up.release(True)  # nothing was sent on it: keep it warm for the next request
            return
        if err is not None or up is None:
            self._attempt_failed(err or UpstreamResetError(), resilience.CONNECT_FAILURE)
            return
        self._attach(up)
        self.flush_upstream()

    def _attach(self, up: Any) -> None:
        self.upstream = up
        up.exchange = self
        up.head_only = self.method == b"HEAD"
        if self.conn.write_paused:
            up.pause_reading()

    def flush_upstream(self) -> None:
        up = self.upstream
        if up is None or self.conn._in_feed:
            return
        out = self.out
        if self.up_h2:  # [http2] the head goes as HEADERS (converted once), the rest as DATA
            if out or (self.req_complete and not self.end_sent):
                self._flush_h2(up, out)
            return
        if out:
            if self.keep is not None:
                self._keep(out)
            up.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
            self.sent_any = True
            if self.buffered:
                self.buffered = 0
                self.conn.resume_reading()

    def _flush_h2(self, up: Any, out: list[bytes]) -> None:
        if self.keep is not None:
            self._keep(out)
        end = self.req_complete
        trailers = self.req_trailers if end else None
        fin = end and trailers is None  # END_STREAM on the head or DATA, else on the trailers
        if not self.sent_any:
            head = out[0]
            body = b"".join(out[1:]) if len(out) > 1 else b""
            up.send_head(head, fin and not body)
            if body:
                up.send_data(body, fin)
            self.sent_any = True
        elif out or fin:
            up.send_data(out[0] if len(out) == 1 else b"".join(out), fin)
        if trailers is not None:
            up.send_trailers(trailers)
        self.end_sent = end
        out.clear()
        if self.buffered:
            self.buffered = 0
            self.conn.resume_reading()

    def _keep(self, out: list[bytes]) -> None:
        """Remember what goes upstream, while a retry or a mirror may need it (bounded)."""
        keep = self.keep
        assert keep is not None
        n = self.keep_bytes
        for chunk in out:
            n += len(chunk)
        if n > KEEP_LIMIT:
            self.keep = None  # too big to replay: no more retries, no mirror
            return
        self.keep_bytes = n
        keep += out

    def _mirror(self, route: Route) -> None:
        keep = self.keep
        if keep is None:
            return
        data = keep + self.out
        if route.retry is None:
            self.keep = None  # only the mirror needed it
        ctx = self.ctx
        for m in route.mirrors:
            if m.percent >= 100 or ctx.random() * 100 < m.percent:
                rt = ctx.clusters.get(m.cluster)
                if rt is not None:
                    h2 = cast("Stream", self).speaks_h2(rt)
                    Shadow(data, self.up_h2, self.req_chunked, self.req_trailers).start(rt, ctx, h2)

    def _arm_timer(self) -> None:
        if self.timeout > 0 and self.timer is None and not self.done:
            self.timer = self.ctx.loop.call_later(self.timeout, self._on_timeout)

    def _on_timeout(self) -> None:
        self.timer = None
        if self.done:
            return
        if self.cluster is not None:
            self.cluster.stats.rq_timeout += 1
        self.conn.local_reply(cast("Stream", self), RequestTimeoutError())

    def _on_try_timeout(self) -> None:
        self.try_timer = None
        if self.done or self.response_started:
            return
        rt = self.cluster
        if rt is not None:
            rt.stats.rq_per_try_timeout += 1
        up = self.upstream
        self.upstream = None
        if up is not None:
            up.abort()
        self._attempt_failed(PerTryTimeoutError(), resilience.RESET, outcome=504)

    # ------------------------------------------------------------------ retries
    def _end_attempt(self, outcome: int) -> None:
        """Bookkeeping when an attempt ends without its response being forwarded."""
        t = self.try_timer
        if t is not None:
            self.try_timer = None
            t.cancel()
        if self.waiting and self.pool is not None:
            self.waiting = False
            self.pool.cancel(self._on_connected)
        rt = self.cluster
        ep = self.upstream_host
        if rt is not None and ep is not None and self.host_open:
            self.host_open = False
            rt.record_outcome(ep, outcome)
            active = rt.active
            if active is not None:
                active[ep] -= 1
        if self.in_retry and rt is not None:
            self.in_retry = False
            rt.retries_active -= 1

    def _retry(self, retriable: bool) -> str | None:
        """Try again if the policy, the body and the budget allow: None when retrying, else a
        response flag to add ("" for none)."""
        route = self.route
        rt = self.cluster
        if route is None or rt is None or self.done:
            return ""
        retry = route.retry
        if retry is None or not retriable:
            return ""
        if self.attempt > retry.num_retries:
            return "URX"
        keep = self.keep
        if keep is None:
            return ""  # the body was too big to replay
        if not resilience.retry_allowed(rt.spec.limits, rt.retries_active, rt.stats.rq_active):
            rt.stats.rq_retry_overflow += 1
            return "UO"
        rt.stats.rq_retry += 1
        rt.retries_active += 1
        self.in_retry = True
        tried = self.tried
        if tried is None:
            tried = self.tried = []
        if self.upstream_host is not None:
            tried.append(self.upstream_host)
        # replay: what was sent, then what was still queued
        self.out = keep + self.out
        self.keep = []
        self.keep_bytes = 0
        self.sent_any = False
        self.end_sent = False
        self.response_started = False
        self.status = 0
        self.ctx.loop.call_later(resilience.backoff(retry, self.attempt, self.ctx.random()), self._retry_now)
        return None

    def _retry_now(self) -> None:
        if self.done:
            return
        try:
            self._attempt()
        except ProxyError as err:
            self._give_up(err)
            return
        self.flush_upstream()

    def _attempt_failed(self, err: ProxyError, failure: int, outcome: int = 503) -> None:
        """An attempt ended before a response head: retry it, or reply with ``err``."""
        self._end_attempt(outcome)
        route = self.route
        retry = route.retry if route is not None else None
        retriable = retry is not None and resilience.retriable_failure(retry, failure)
        flag = self._retry(retriable)
        if flag is None:
            return
        self._give_up(with_flag(err, flag) if flag else err)

    def _give_up(self, err: ProxyError) -> None:
        if self.cluster is not None and isinstance(err, UpstreamResetError):
            self.cluster.stats.rq_reset += 1
        self.conn.local_reply(cast("Stream", self), err)

