"""Time values at the library's edge: every ``now`` is an aware datetime, kept in UTC.

Owns: the one rule for datetimes passed into ``certs`` (naive values are refused,
aware ones are converted to UTC), truncation to the whole seconds X.509 can encode,
and ``utc_now()`` for the command line.

Must not: be called for the current time by library code. Only ``cli.py`` reads
the clock; everything else takes ``now`` as an argument.
"""

from __future__ import annotations

import datetime as dt


def as_utc(value: dt.datetime, what: str = "now") -> dt.datetime:
    """Return ``value`` converted to UTC; refuse naive datetimes.

    A naive datetime is ambiguous (``datetime.now()`` is local time), and a clock
    error of a few hours would make fresh certificates look expired or not yet valid.
    """
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware (use datetime.timezone.utc)")
    return value.astimezone(dt.UTC)


def whole_seconds(value: dt.datetime) -> dt.datetime:
    """``value`` without its microseconds (X.509 times have one-second resolution)."""
    return value.replace(microsecond=0)


def utc_now() -> dt.datetime:
    """The current time in UTC. For the CLI only (see module docstring)."""
    return dt.datetime.now(dt.UTC)
