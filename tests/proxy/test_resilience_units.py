"""The pure parts of resilience: retry decisions, backoff bounds, budgets, outlier ejection times."""

from __future__ import annotations

from proxy import model, resilience
from proxy.model import Endpoint, OutlierDetection, RetryPolicy

POLICY = RetryPolicy(model.RETRY_5XX, 5, backoff_base=0.025, backoff_max=0.25)


def test_backoff_is_fully_jittered_exponential_and_capped() -> None:
    assert resilience.backoff(POLICY, 1, 0.0) == 0.0
    assert resilience.backoff(POLICY, 1, 0.999) < 0.025  # retry 1: [0, base)
    assert 0.07 < resilience.backoff(POLICY, 2, 0.999) < 0.075  # retry 2: [0, 3 x base)
    assert resilience.backoff(POLICY, 10, 0.999) < 0.25  # capped at the maximum
    assert resilience.backoff(POLICY, 100, 0.5) == 0.125  # no overflow for large retry numbers


def test_retry_on_classes() -> None:
    gw = RetryPolicy(model.RETRY_GATEWAY)
    assert resilience.retriable_status(gw, 503, None) and not resilience.retriable_status(gw, 500, None)
    assert resilience.retriable_failure(gw, resilience.CONNECT_FAILURE)
    assert not resilience.retriable_failure(gw, resilience.RESET)
    grpc = RetryPolicy(model.RETRY_GRPC_UNAVAILABLE | model.RETRY_GRPC_RESOURCE)
    assert resilience.retriable_status(grpc, 200, 14) and resilience.retriable_status(grpc, 200, 8)
    assert not resilience.retriable_status(grpc, 200, 13)
    codes = RetryPolicy(model.RETRY_STATUS, retriable_status=frozenset({418}))
    assert resilience.retriable_status(codes, 418, None) and not resilience.retriable_status(codes, 503, None)


def test_retry_budget_and_max_retries() -> None:
    budget = model.CircuitBreakers(budget_percent=20.0, min_retry_concurrency=3)
    assert resilience.retry_allowed(budget, 2, 0) and not resilience.retry_allowed(budget, 3, 10)
    assert resilience.retry_allowed(budget, 19, 100) and not resilience.retry_allowed(budget, 20, 100)
    fixed = model.CircuitBreakers(max_retries=2)
    assert resilience.retry_allowed(fixed, 1, 1000) and not resilience.retry_allowed(fixed, 2, 1000)


def test_grpc_timeout_header() -> None:
    assert resilience.parse_grpc_timeout(b"100m") == 0.1
    assert resilience.parse_grpc_timeout(b"2S") == 2.0 and resilience.parse_grpc_timeout(b"1H") == 3600.0
    for bad in (b"", b"m", b"10x", b"-1S", b"123456789S"):
        assert resilience.parse_grpc_timeout(bad) is None


def test_ejection_time_grows_with_each_ejection_and_is_capped() -> None:
    a, b = Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80)
    od = resilience.Outlier(OutlierDetection(consecutive_5xx=2, base_ejection_time=10, max_ejection_time=25,
                                             max_ejection_percent=50))
    assert not od.record(a, 500, 2, 0.0, 0.0)  # one 5xx: not yet
    assert od.record(a, 503, 2, 0.0, 0.0) and od.ejected == {a}  # two in a row: out for 10 s
    assert od.next_expiry() == 10.0
    assert not od.expire(9.9) and od.expire(10.0) and not od.ejected
    od.record(a, 500, 2, 20.0, 0.0)
    assert od.record(a, 500, 2, 20.0, 0.0) and od.next_expiry() == 40.0  # second ejection: 2 x base
    od.expire(40.0)
    od.record(a, 500, 2, 50.0, 0.0)
    od.record(a, 500, 2, 50.0, 0.0)
    assert od.next_expiry() == 75.0  # third: 3 x base, capped at max_ejection_time (25 s)
    assert not od.record(b, 500, 2, 50.0, 0.0) and b not in od.ejected  # b: one 5xx of the two needed
    assert od.total_ejections == 3


def test_a_success_resets_the_consecutive_count() -> None:
    a = Endpoint("10.0.0.1", 80)
    od = resilience.Outlier(OutlierDetection(consecutive_5xx=2, max_ejection_percent=100))
    od.record(a, 500, 1, 0.0, 0.0)
    od.record(a, 200, 1, 0.0, 0.0)
    assert not od.record(a, 500, 1, 0.0, 0.0) and not od.ejected


def test_gateway_errors_are_enforced_only_when_asked() -> None:
    a = Endpoint("10.0.0.1", 80)
    counted = resilience.Outlier(OutlierDetection(consecutive_5xx=0, consecutive_gateway=1, enforcing_gateway=0,
                                                  max_ejection_percent=100))
    assert not counted.record(a, 502, 1, 0.0, 0.0)  # Envoy's default: gateway errors counted, not enforced
    enforced = resilience.Outlier(OutlierDetection(consecutive_5xx=0, consecutive_gateway=1, enforcing_gateway=100,
                                                   max_ejection_percent=100))
    assert enforced.record(a, 502, 1, 0.0, 0.0) and not enforced.record(Endpoint("b", 1), 500, 2, 0.0, 0.0)
