"""Rotation timing: when a workload should renew its certificate.

Owns: the renewal rule. Renew at half the certificate's lifetime, moved by a
random jitter (by default up to 10% of the lifetime either way) so that a fleet
whose certs were issued together does not renew together, and never earlier than
``now`` (a cert found late, or already expired, is renewed at once).

Must not: read the clock, sleep, schedule, or draw from the global ``random``
module. It is a pure function of its arguments: the caller passes ``now`` and the
random source, and arms its own timer (``loop.call_at``) for the result.
"""

from __future__ import annotations

import datetime as dt
from typing import Protocol

from cryptography import x509

from certs._time import as_utc

RENEW_FRACTION = 0.5
DEFAULT_JITTER = 0.1


class RandomSource(Protocol):
    """What ``renew_at`` needs from a random generator; ``random.Random`` fits."""

    def random(self) -> float:
        """A float uniformly drawn from [0.0, 1.0)."""
        ...


def renew_at(
    not_before: dt.datetime,
    not_after: dt.datetime,
    now: dt.datetime | None = None,
    *,
    jitter: float = DEFAULT_JITTER,
    rng: RandomSource | None = None,
) -> dt.datetime:
    """The UTC time at which to renew a cert valid from ``not_before`` to ``not_after``.

    ``not_before + lifetime * (0.5 + u * jitter)`` with ``u`` uniform in [-1, 1)
    drawn from ``rng``; with ``rng=None`` there is no jitter and the result is the
    exact midpoint. ``jitter`` is a fraction of the lifetime, 0 <= jitter < 0.5, so the
    result always lies strictly inside the validity period. If ``now`` is given, the
    result is never before it. All datetimes must be timezone-aware.
    """
    start = as_utc(not_before, "not_before")
    end = as_utc(not_after, "not_after")
    lifetime = end - start
    if lifetime <= dt.timedelta(0):
        raise ValueError("not_after must be later than not_before")
    if not 0.0 <= jitter < 0.5:
        raise ValueError("jitter must be a fraction in [0, 0.5)")
    fraction = RENEW_FRACTION
    if rng is not None and jitter > 0.0:
        fraction += (2.0 * rng.random() - 1.0) * jitter
    when = start + lifetime * fraction
    if now is not None:
        when = max(when, as_utc(now))
    return when


def renew_at_cert(
    cert: x509.Certificate,
    now: dt.datetime | None = None,
    *,
    jitter: float = DEFAULT_JITTER,
    rng: RandomSource | None = None,
) -> dt.datetime:
    """``renew_at`` for a certificate's own validity period (the leaf of a chain)."""
    return renew_at(cert.not_valid_before_utc, cert.not_valid_after_utc, now, jitter=jitter, rng=rng)


__all__ = ["DEFAULT_JITTER", "RENEW_FRACTION", "RandomSource", "renew_at", "renew_at_cert"]
