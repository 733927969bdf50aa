from __future__ import annotations

import datetime as dt

import pytest

from certs.errors import InvalidSpiffeId, InvalidToken
from certs.tokens import issue_token, verify_token

KEY = b"k" * 32
NOW = dt.datetime(2026, 11, 22, tzinfo=dt.UTC)


def test_round_trip_with_dots_in_names():
    token = issue_token(KEY, "team.a", "svc.v1", NOW + dt.timedelta(hours=1))
    assert verify_token(KEY, token, NOW) == ("team.a", "svc.v1")


@pytest.mark.parametrize("mutate", [
    lambda t: t.replace(":default:", ":other:"),  # claim another namespace
    lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # tampered MAC
    lambda t: t.rsplit(":", 1)[0],  # MAC missing
    lambda t: "v2" + t[2:],  # unknown version
    lambda t: "",
    lambda t: "garbage",
])
def test_forged_or_malformed_tokens_are_refused(mutate):
    token = issue_token(KEY, "default", "reviews", NOW + dt.timedelta(hours=1))
    with pytest.raises(InvalidToken):
        verify_token(KEY, mutate(token), NOW)


def test_wrong_key_and_expiry():
    token = issue_token(KEY, "default", "reviews", NOW + dt.timedelta(hours=1))
    with pytest.raises(InvalidToken, match="signature"):
        verify_token(b"x" * 32, token, NOW)
    with pytest.raises(InvalidToken, match="expired"):
        verify_token(KEY, token, NOW + dt.timedelta(hours=2))
    assert InvalidToken("x").reason == "bad_token"


def test_invalid_identity_cannot_get_a_token():
    with pytest.raises(InvalidSpiffeId):
        issue_token(KEY, "bad:ns", "sa", NOW)
