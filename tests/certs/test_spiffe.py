"""SpiffeId: parse/format round trips and a corpus of ids that must be refused."""

from __future__ import annotations

import dataclasses

import pytest

from certs.errors import CertError, InvalidSpiffeId
from certs.spiffe import SpiffeId, parse_trust_domain_id, trust_domain_id, validate_trust_domain


@pytest.mark.parametrize(
    ("text", "td", "ns", "sa"),
    [
        ("spiffe://cluster.local/ns/default/sa/web", "cluster.local", "default", "web"),
        ("spiffe://td/ns/a/sa/b", "td", "a", "b"),
        ("spiffe://my-mesh_1.example.com/ns/kube-system/sa/coredns", "my-mesh_1.example.com", "kube-system", "coredns"),
        ("spiffe://cluster.local/ns/Prod/sa/Svc.v2_x-y", "cluster.local", "Prod", "Svc.v2_x-y"),
        ("spiffe://1.2.3.4/ns/n/sa/s", "1.2.3.4", "n", "s"),
        ("spiffe://cluster.local/ns/ns/sa/sa", "cluster.local", "ns", "sa"),
    ],
)
def test_parse_valid(text: str, td: str, ns: str, sa: str) -> None:
    sid = SpiffeId.parse(text)
    assert (sid.trust_domain, sid.namespace, sid.service_account) == (td, ns, sa)
    assert str(sid) == text
    assert SpiffeId.parse(str(sid)) == sid


INVALID = [
    "",
    "cluster.local/ns/a/sa/b",
    "spiffe:/cluster.local/ns/a/sa/b",
    "spiffe:cluster.local/ns/a/sa/b",
    "SPIFFE://cluster.local/ns/a/sa/b",  # scheme is exactly lowercase
    "Spiffe://cluster.local/ns/a/sa/b",
    "https://cluster.local/ns/a/sa/b",
    " spiffe://cluster.local/ns/a/sa/b",
    "spiffe://cluster.local/ns/a/sa/b ",
    "spiffe://cluster.local/ns/a/sa/b\n",
    "spiffe://",
    "spiffe:///ns/a/sa/b",  # empty trust domain
    "spiffe://Cluster.local/ns/a/sa/b",  # uppercase trust domain
    "spiffe://cluster.local:8080/ns/a/sa/b",  # port
    "spiffe://user@cluster.local/ns/a/sa/b",  # userinfo
    "spiffe://user:pw@cluster.local/ns/a/sa/b",
    "spiffe://cluster.local/ns/a/sa/b?x=1",  # query
    "spiffe://cluster.local/ns/a/sa/b#frag",  # fragment
    "spiffe://cluster.local/ns/a/sa/b?",
    "spiffe://cluster.local/ns/a/sa/b#",
    "spiffe://cluster.local/ns/a/sa/b/",  # trailing slash
    "spiffe://cluster.local//ns/a/sa/b",  # empty segment
    "spiffe://cluster.local/ns//sa/b",
    "spiffe://cluster.local/ns/a/sa/",
    "spiffe://cluster.local/ns/a/sa",
    "spiffe://cluster.local/ns/a",
    "spiffe://cluster.local",  # a trust domain id is not a workload id
    "spiffe://cluster.local/",
    "spiffe://cluster.local/sa/b/ns/a",  # wrong order
    "spiffe://cluster.local/NS/a/SA/b",
    "spiffe://cluster.local/ns/a/sa/b/extra",
    "spiffe://cluster.local/workload/a",
    "spiffe://cluster.local/ns/./sa/b",  # dot segments
    "spiffe://cluster.local/ns/../sa/b",
    "spiffe://cluster.local/ns/a/sa/..",
    "spiffe://cluster.local/ns/a%20b/sa/b",  # percent-encoding
    "spiffe://cluster%2elocal/ns/a/sa/b",
    "spiffe://cluster.local/ns/a b/sa/b",
    "spiffe://cluster.local/ns/a/sa/b\x00",
    "spiffe://clüster.local/ns/a/sa/b",  # non-ASCII
    "spiffe://cluster.local/ns/ä/sa/b",
    "spiffe://[::1]/ns/a/sa/b",
    "spiffe://cluster.local\\ns\\a\\sa\\b",
    "spiffe://" + "a" * 256 + "/ns/a/sa/b",  # trust domain over 255
    "spiffe://cluster.local/ns/" + "a" * 2048 + "/sa/b",  # id over 2048 bytes
]


@pytest.mark.parametrize("text", INVALID)
def test_parse_invalid(text: str) -> None:
    with pytest.raises(InvalidSpiffeId) as info:
        SpiffeId.parse(text)
    assert info.value.reason == "bad_spiffe_id"
    assert isinstance(info.value, CertError)
    assert isinstance(info.value, ValueError)


def test_non_strings_rejected() -> None:
    with pytest.raises(InvalidSpiffeId):
        SpiffeId.parse(b"spiffe://cluster.local/ns/a/sa/b")  # type: ignore[arg-type]
    for bad in (None, 42, ["cluster.local"]):  # e.g. a YAML value of the wrong type
        with pytest.raises(InvalidSpiffeId):
            validate_trust_domain(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidSpiffeId):
        SpiffeId("cluster.local", 7, "b")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("td", "ns", "sa"),
    [("Cluster.local", "a", "b"), ("cluster.local", "", "b"), ("cluster.local", "a/b", "c"), ("cluster.local", "a", "..")],
)
def test_constructor_validates(td: str, ns: str, sa: str) -> None:
    with pytest.raises(InvalidSpiffeId):
        SpiffeId(td, ns, sa)


def test_frozen_and_hashable() -> None:
    sid = SpiffeId("cluster.local", "default", "web")
    with pytest.raises(dataclasses.FrozenInstanceError):
        sid.namespace = "other"  # type: ignore[misc]
    assert {sid: 1}[SpiffeId.parse("spiffe://cluster.local/ns/default/sa/web")] == 1
    assert sid != SpiffeId("cluster.local", "default", "api")


def test_trust_domain_ids() -> None:
    sid = SpiffeId("cluster.local", "default", "web")
    assert sid.trust_domain_id == "spiffe://cluster.local"
    assert trust_domain_id("cluster.local") == "spiffe://cluster.local"
    assert parse_trust_domain_id("spiffe://cluster.local") == "cluster.local"
    for bad in ("spiffe://cluster.local/", "spiffe://cluster.local/ns/a/sa/b", "spiffe://", "https://x"):
        with pytest.raises(InvalidSpiffeId):
            parse_trust_domain_id(bad)
    with pytest.raises(InvalidSpiffeId):
        trust_domain_id("UPPER")
    assert validate_trust_domain("a_b-c.d") == "a_b-c.d"
