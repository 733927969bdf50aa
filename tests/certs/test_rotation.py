"""certs.rotation: renew at half-life, jitter within bounds, never before now."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from certs.ca import CertificateAuthority
from certs.rotation import renew_at, renew_at_cert
from tests.certs.factory import NOW, issue

START = NOW
END = NOW + dt.timedelta(hours=24)
LIFE = END - START


def test_midpoint_without_rng() -> None:
    assert renew_at(START, END) == START + dt.timedelta(hours=12)
    assert renew_at(START, END, jitter=0.0, rng=random.Random(1)) == START + dt.timedelta(hours=12)


def test_jitter_bounds_with_seeded_rng() -> None:
    rng = random.Random(1234)
    fractions = [(renew_at(START, END, rng=rng) - START) / LIFE for _ in range(2000)]
    assert all(0.4 <= f <= 0.6 for f in fractions)
    assert min(fractions) < 0.41 and max(fractions) > 0.59  # the whole band is used
    assert 0.49 < sum(fractions) / len(fractions) < 0.51


def test_custom_jitter_bounds() -> None:
    rng = random.Random(7)
    fractions = [(renew_at(START, END, jitter=0.25, rng=rng) - START) / LIFE for _ in range(2000)]
    assert all(0.25 <= f <= 0.75 for f in fractions)
    assert min(fractions) < 0.27 and max(fractions) > 0.73


def test_same_seed_same_answer() -> None:
    first = [renew_at(START, END, rng=random.Random(42)) for _ in range(3)]
    assert len(set(first)) == 1
    assert renew_at(START, END, rng=random.Random(43)) != first[0]


class Extreme:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def test_extremes_of_the_rng() -> None:
    assert renew_at(START, END, rng=Extreme(0.0)) == START + LIFE * 0.4
    assert renew_at(START, END, rng=Extreme(0.5)) == START + LIFE * 0.5
    assert START + LIFE * 0.59 < renew_at(START, END, rng=Extreme(0.999999)) <= START + LIFE * 0.6


def test_never_before_now() -> None:
    late = START + dt.timedelta(hours=20)
    assert renew_at(START, END, now=late) == late
    expired = END + dt.timedelta(hours=1)
    assert renew_at(START, END, now=expired, rng=random.Random(0)) == expired
    early = START + dt.timedelta(hours=1)
    assert renew_at(START, END, now=early) == START + dt.timedelta(hours=12)


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="later"):
        renew_at(END, START)
    with pytest.raises(ValueError, match="later"):
        renew_at(START, START)
    for bad in (-0.1, 0.5, 1.0):
        with pytest.raises(ValueError, match="jitter"):
            renew_at(START, END, jitter=bad)
    with pytest.raises(ValueError, match="timezone-aware"):
        renew_at(START.replace(tzinfo=None), END)
    with pytest.raises(ValueError, match="timezone-aware"):
        renew_at(START, END, now=NOW.replace(tzinfo=None))


def test_result_is_utc() -> None:
    tz = dt.timezone(dt.timedelta(hours=2))
    result = renew_at(START.astimezone(tz), END.astimezone(tz))
    assert result.utcoffset() == dt.timedelta(0) and result == START + LIFE / 2


def test_for_an_issued_cert(root_ca: CertificateAuthority) -> None:
    leaf = issue(root_ca)[0][0]
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert renew_at_cert(leaf) == leaf.not_valid_before_utc + life / 2
    at = renew_at_cert(leaf, NOW, rng=random.Random(5))
    assert leaf.not_valid_before_utc + life * 0.4 <= at <= leaf.not_valid_before_utc + life * 0.6
