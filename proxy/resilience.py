"""Retry decisions, backoff, retry budgets and outlier detection: pure logic.

Nothing here does I/O or reads a clock: callers pass ``now`` and random
numbers in. ``stream.py`` asks ``retriable_*`` whether an attempt's outcome
may be retried and ``retry_allowed`` whether the cluster's limits let it;
``ClusterRuntime`` owns one ``Outlier`` per cluster and calls ``record`` with
each attempt's outcome.

Envoy's semantics where they exist:
- retry_on names map to the RETRY_* bits of the model; "5xx" also covers
  connect failures and resets, "gateway-error" covers 502/503/504 and connect
  failures, "retriable-status-codes" the route's list, the gRPC names the
  ``grpc-status`` of a trailers-only response.
- Backoff is fully jittered exponential: try n waits a uniform random time in
  [0, base * (2**n - 1)], capped at the policy's maximum.
- Budget: with ``budget_percent`` set, retries in flight may be at most that
  share of the cluster's active requests, but never fewer than
  ``min_retry_concurrency``; otherwise ``max_retries`` bounds them.
- Outlier detection: ``consecutive_5xx`` responses in a row (local-origin
  failures count as 503 unless split) or ``consecutive_gateway`` gateway
  errors eject a host for base_ejection_time x times ejected (capped at
  max_ejection_time), as long as fewer than max_ejection_percent of the hosts
  are ejected. The caller rebuilds its load balancer over the hosts left.
"""

from __future__ import annotations

from proxy.model import (
    RETRY_4XX,
    RETRY_5XX,
    RETRY_CONNECT,
    RETRY_GATEWAY,
    RETRY_GRPC_CANCELLED,
    RETRY_GRPC_DEADLINE,
    RETRY_GRPC_INTERNAL,
    RETRY_GRPC_RESOURCE,
    RETRY_GRPC_UNAVAILABLE,
    RETRY_REFUSED,
    RETRY_RESET,
    RETRY_STATUS,
    CircuitBreakers,
    Endpoint,
    OutlierDetection,
    RetryPolicy,
)

# What failed, for retry_on and outlier detection.
CONNECT_FAILURE = 1  # the connection could not be opened (UF)
RESET = 2  # no complete response head: the upstream closed or reset (UR/UPE), or a per-try timeout
REFUSED = 3  # HTTP/2 REFUSED_STREAM

_CONNECT_BITS = RETRY_5XX | RETRY_GATEWAY | RETRY_CONNECT
_RESET_BITS = RETRY_5XX | RETRY_RESET
_REFUSED_BITS = RETRY_5XX | RETRY_GATEWAY | RETRY_REFUSED
_GRPC_BITS = {1: RETRY_GRPC_CANCELLED, 4: RETRY_GRPC_DEADLINE, 8: RETRY_GRPC_RESOURCE,
              13: RETRY_GRPC_INTERNAL, 14: RETRY_GRPC_UNAVAILABLE}


def retriable_failure(policy: RetryPolicy, failure: int) -> bool:
    """May an attempt that ended in ``failure`` (CONNECT_FAILURE, RESET, REFUSED) be retried?"""
    bits = policy.retry_on
    if failure == CONNECT_FAILURE:
        return bool(bits & _CONNECT_BITS)
    if failure == REFUSED:
        return bool(bits & _REFUSED_BITS)
    return bool(bits & _RESET_BITS)


def retriable_status(policy: RetryPolicy, status: int, grpc_status: int | None) -> bool:
    """May a response head with ``status`` (and a trailers-only ``grpc-status``) be retried?"""
    bits = policy.retry_on
    if status >= 500:
        if bits & RETRY_5XX:
            return True
        if bits & RETRY_GATEWAY and 502 <= status <= 504:
            return True
    if bits & RETRY_4XX and status == 409:
        return True
    if bits & RETRY_STATUS and status in policy.retriable_status:
        return True
    if grpc_status is not None:
        bit = _GRPC_BITS.get(grpc_status)
        if bit is not None and bits & bit:
            return True
    return False


def backoff(policy: RetryPolicy, retry: int, rand: float) -> float:
    """Seconds to wait before retry number ``retry`` (1-based); ``rand`` uniform in [0, 1)."""
    ceiling = policy.backoff_base * ((1 << min(retry, 30)) - 1)
    return rand * min(ceiling, policy.backoff_max)


def retry_allowed(limits: CircuitBreakers, retries_active: int, requests_active: int) -> bool:
    """The retry budget (or max_retries) of a cluster with this many retries and requests in flight."""
    budget = limits.budget_percent
    if budget is None:
        return retries_active < limits.max_retries
    allowed = max(limits.min_retry_concurrency, int(requests_active * budget / 100.0))
    return retries_active < allowed


def parse_grpc_timeout(value: bytes) -> float | None:
    """A ``grpc-timeout`` header ("100m", "5S", ...) in seconds; None when malformed."""
    if len(value) < 2 or len(value) > 9:
        return None
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit():
        return None
    scale = _GRPC_UNITS.get(unit)
    return None if scale is None else int(digits) * scale


_GRPC_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


class HostState:
    __slots__ = ("consecutive_5xx", "consecutive_gateway", "ejected_until", "ejections")

    def __init__(self) -> None:
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.ejections = 0
        self.ejected_until = 0.0


class Outlier:
    """Consecutive-error outlier detection for the hosts of one cluster (one worker).

    ``record`` returns True when the set of ejected hosts changed (the caller
    then rebuilds its load balancer from ``healthy``); ``expire(now)`` returns
    True when ejections ended. The caller schedules ``expire`` at
    ``next_expiry`` (a timer, not a sweep on the request path).
    """

    __slots__ = ("ejected", "hosts", "spec", "total_ejections")

    def __init__(self, spec: OutlierDetection) -> None:
        self.spec = spec
        self.hosts: dict[Endpoint, HostState] = {}
        self.ejected: set[Endpoint] = set()
        self.total_ejections = 0

    def record(self, ep: Endpoint, status: int, host_count: int, now: float, rand: float) -> bool:
        """One attempt's outcome on ``ep``: an HTTP status, or 503 for a local-origin failure."""
        state = self.hosts.get(ep)
        if status < 500:
            if state is not None:
                state.consecutive_5xx = 0
                state.consecutive_gateway = 0
            return False
        if state is None:
            state = self.hosts[ep] = HostState()
        spec = self.spec
        state.consecutive_5xx += 1
        gateway = 502 <= status <= 504
        if gateway:
            state.consecutive_gateway += 1
        else:
            state.consecutive_gateway = 0
        if ep in self.ejected:
            return False
        eject = False
        if spec.consecutive_5xx and state.consecutive_5xx >= spec.consecutive_5xx:
            eject = rand * 100 < spec.enforcing_5xx
        if not eject and gateway and spec.consecutive_gateway and state.consecutive_gateway >= spec.consecutive_gateway:
            eject = rand * 100 < spec.enforcing_gateway
        if not eject:
            return False
        state.consecutive_5xx = 0
        state.consecutive_gateway = 0
        if len(self.ejected) * 100 >= spec.max_ejection_percent * host_count:
            return False  # too many hosts are out already
        state.ejections += 1
        state.ejected_until = now + min(spec.base_ejection_time * state.ejections,
                                        max(spec.max_ejection_time, spec.base_ejection_time))
        self.ejected.add(ep)
        self.total_ejections += 1
        return True

    def next_expiry(self) -> float | None:
        if not self.ejected:
            return None
        return min(self.hosts[ep].ejected_until for ep in self.ejected)

    def expire(self, now: float) -> bool:
        back = [ep for ep in self.ejected if self.hosts[ep].ejected_until <= now]
        for ep in back:
            self.ejected.discard(ep)
        return bool(back)

    def healthy(self, endpoints: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
        ejected = self.ejected
        return tuple(ep for ep in endpoints if ep not in ejected) if ejected else endpoints
