"""Interception, the pure parts: iptables rules, SO_ORIGINAL_DST parsing, picking a listener, compiling.

No root, no namespaces: the rules are argv lists, the sockaddr is bytes, the
listeners are model objects, the xDS is protobuf.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
from collections.abc import Sequence

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2
from google.protobuf import wrappers_pb2

from control.translate import NodeInfo, load_text, translate
from proxy import iptables
from proxy.capture import handoff_index, parse_sockaddr, route
from proxy.compile import XdsResources, _cluster, compile_snapshot, validate_resource
from proxy.errors import InvalidResource
from proxy.iptables import CaptureRules, clean_rules, install_rules
from proxy.model import Capture, Direction, Listener, Protocol, TcpSettings
from tests.control.test_translate_capture import REGISTRY, STRICT

# ---------------------------------------------------------------- iptables


def rule_specs(rules: list[list[str]]) -> list[str]:
    """The commands without the common "iptables -w -t nat" prefix, as text."""
    assert all(argv[1:4] == ["-w", "-t", "nat"] for argv in rules)
    return [" ".join(argv[4:]) for argv in rules]


def test_default_rules() -> None:
    assert rule_specs(install_rules(CaptureRules())) == [
        "-N PILLION_IN_REDIRECT",
        "-A PILLION_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-N PILLION_INBOUND",
        "-A PILLION_INBOUND -p tcp --dport 15090 -j RETURN",
        "-A PILLION_INBOUND -p tcp --dport 15021 -j RETURN",
        "-A PILLION_INBOUND -p tcp --dport 15020 -j RETURN",
        "-A PILLION_INBOUND -p tcp -j PILLION_IN_REDIRECT",
        "-N PILLION_REDIRECT",
        "-A PILLION_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-N PILLION_OUTPUT",
        "-A PILLION_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A PILLION_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "-A PILLION_OUTPUT -o lo -j RETURN",
        "-A PILLION_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "-A PILLION_OUTPUT -j PILLION_REDIRECT",
        # The jumps come last: no packet meets a half-built chain.
        "-A PREROUTING -p tcp -j PILLION_INBOUND",
        "-A OUTPUT -p tcp -j PILLION_OUTPUT",
    ]
    assert {argv[0] for argv in install_rules(CaptureRules())} == {"iptables"}


def test_included_and_excluded_ports_and_cidrs() -> None:
    rules = CaptureRules(
        proxy_uid=2000, proxy_gid=3000, inbound_port=16006, outbound_port=16001,
        include_inbound_ports=(8080, 15020, 9090), exclude_inbound_ports=(15020,),
        include_outbound_cidrs=("10.0.0.0/8", "fd00::/8"), exclude_outbound_cidrs=("10.1.0.0/16", "fd00:1::/32"),
        exclude_outbound_ports=(5432,),
    )
    v4 = rule_specs(install_rules(rules, 4))
    assert "-A PILLION_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006" in v4
    assert [r for r in v4 if r.startswith("-A PILLION_INBOUND")] == [
        "-A PILLION_INBOUND -p tcp --dport 8080 -j PILLION_IN_REDIRECT",
        "-A PILLION_INBOUND -p tcp --dport 9090 -j PILLION_IN_REDIRECT",
    ]
    assert [r for r in v4 if r.startswith("-A PILLION_OUTPUT")] == [
        "-A PILLION_OUTPUT -m owner --uid-owner 2000 -j RETURN",
        "-A PILLION_OUTPUT -m owner --gid-owner 3000 -j RETURN",
        "-A PILLION_OUTPUT -o lo -j RETURN",
        "-A PILLION_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "-A PILLION_OUTPUT -d 10.1.0.0/16 -j RETURN",
        "-A PILLION_OUTPUT -p tcp --dport 5432 -j RETURN",
        "-A PILLION_OUTPUT -d 10.0.0.0/8 -j PILLION_REDIRECT",
    ]
    v6 = install_rules(rules, 6)
    assert {argv[0] for argv in v6} == {"ip6tables"}
    v6_specs = rule_specs(v6)
    assert "-A PILLION_OUTPUT -d ::1/128 -j RETURN" in v6_specs
    assert "-A PILLION_OUTPUT -d fd00:1::/32 -j RETURN" in v6_specs
    assert "-A PILLION_OUTPUT -d fd00::/8 -j PILLION_REDIRECT" in v6_specs
    assert not any("10." in r for r in v6_specs)


def test_no_inbound_ports_means_no_inbound_chains() -> None:
    specs = rule_specs(install_rules(CaptureRules(include_inbound_ports=())))
    assert not any("INBOUND" in r or "IN_REDIRECT" in r or "PREROUTING" in r for r in specs)
    assert specs[-1] == "-A OUTPUT -p tcp -j PILLION_OUTPUT"


def test_clean_touches_only_pillion_rules() -> None:
    assert rule_specs(clean_rules()) == [
        "-D PREROUTING -p tcp -j PILLION_INBOUND",
        "-D OUTPUT -p tcp -j PILLION_OUTPUT",
        "-F PILLION_INBOUND", "-F PILLION_IN_REDIRECT", "-F PILLION_OUTPUT", "-F PILLION_REDIRECT",
        "-X PILLION_INBOUND", "-X PILLION_IN_REDIRECT", "-X PILLION_OUTPUT", "-X PILLION_REDIRECT",
    ]


class FakeIptables:
    """Records commands; a jump rule is present ``copies`` times; ``fail_on`` fails a command."""

    def __init__(self, copies: int = 0, fail_on: str = "") -> None:
        self.copies = copies
        self.fail_on = fail_on
        self.ran: list[str] = []

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        text = " ".join(argv[4:])
        self.ran.append(text)
        rc = 0
        if text.startswith("-D OUTPUT"):
            rc = 0 if self.copies > 0 else 1
            self.copies -= 1 if self.copies > 0 else 0
        elif text.startswith("-D") or (self.fail_on and self.fail_on in text):
            rc = 1
        return subprocess.CompletedProcess(list(argv), rc, "", "boom" if rc else "")


def test_install_cleans_first_and_removes_every_copy_of_a_jump() -> None:
    fake = FakeIptables(copies=2)
    iptables.install(CaptureRules(), 4, fake)
    assert fake.ran.count("-D OUTPUT -p tcp -j PILLION_OUTPUT") == 3  # two copies, then "not there"
    assert fake.ran.index("-X PILLION_REDIRECT") < fake.ran.index("-N PILLION_IN_REDIRECT")


def test_a_failed_install_cleans_up_and_says_which_command() -> None:
    fake = FakeIptables(fail_on="--uid-owner")
    with pytest.raises(iptables.IptablesError, match=r"iptables -w -t nat -A PILLION_OUTPUT -m owner --uid-owner 1337 .*: boom"):
        iptables.install(CaptureRules(), 4, fake)
    assert fake.ran[-1] == "-X PILLION_REDIRECT"


def test_cli_dry_run_and_bad_arguments() -> None:
    run = [sys.executable, "-m", "proxy", "init-iptables", "--dry-run", "--exclude-outbound-ports", "22"]
    done = subprocess.run(run, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "iptables -w -t nat -A PILLION_OUTPUT -p tcp --dport 22 -j RETURN" in lines
    assert "ip6tables -w -t nat -A OUTPUT -p tcp -j PILLION_OUTPUT" in lines
    clean = subprocess.run([*run[:4], "--clean", "--dry-run", "--no-ipv6"], capture_output=True, text=True, timeout=30)
    assert clean.stdout.splitlines()[0] == "iptables -w -t nat -D PREROUTING -p tcp -j PILLION_INBOUND"
    assert not any(line.startswith("ip6tables") for line in clean.stdout.splitlines())
    bad = subprocess.run([*run[:4], "--exclude-outbound-cidrs", "10.0.0.300/8"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and "not an IP address or CIDR" in bad.stderr


# ---------------------------------------------------------------- SO_ORIGINAL_DST


def sockaddr_in(ip: str, port: int) -> bytes:
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(ip) + bytes(8)


def sockaddr_in6(ip: str, port: int) -> bytes:
    return (struct.pack("=H", socket.AF_INET6) + struct.pack("!H", port) + bytes(4)
            + socket.inet_pton(socket.AF_INET6, ip) + bytes(4))


def test_parse_ipv4_sockaddr() -> None:
    assert parse_sockaddr(sockaddr_in("10.250.0.2", 8080)) == ("10.250.0.2", 8080)
    assert parse_sockaddr(sockaddr_in("255.1.2.3", 65535)) == ("255.1.2.3", 65535)


def test_parse_ipv6_sockaddr() -> None:
    raw = sockaddr_in6("fd00:250::2", 443)
    assert len(raw) == 28
    assert parse_sockaddr(raw) == ("fd00:250::2", 443)
    assert parse_sockaddr(sockaddr_in6("::ffff:10.1.2.3", 80)) == ("10.1.2.3", 80)  # v4-mapped


@pytest.mark.parametrize("raw", [b"", b"\x02", struct.pack("=H", socket.AF_UNIX) + bytes(14),
                                 struct.pack("=H", socket.AF_INET) + bytes(3), sockaddr_in6("::1", 1)[:20]])
def test_parse_refuses_anything_else(raw: bytes) -> None:
    with pytest.raises(ValueError):
        parse_sockaddr(raw)


# ---------------------------------------------------------------- picking the listener


def tcp(name: str, address: str, port: int, bind: bool = False) -> Listener:
    return Listener(name, address, port, Direction.OUTBOUND, Protocol.TCP, tcp=TcpSettings(name, name),
                    bind_to_port=bind)


def capture(name: str, port: int, *, handoff: bool, by_port: dict[int, Listener] | None = None,
            default: Listener | None = None) -> Listener:
    return Listener(name, "0.0.0.0", port, Direction.OUTBOUND, Protocol.TCP,
                    capture=Capture(handoff, by_port or {}, default))


def test_outbound_hand_off_prefers_the_exact_address_then_the_wildcard() -> None:
    exact, wild, wild6 = tcp("10.0.0.5_80", "10.0.0.5", 80), tcp("0.0.0.0_80", "0.0.0.0", 80), tcp("::_443", "::", 443)
    fallback = tcp("pass", "0.0.0.0", 15001)
    outbound = capture("out", 15001, handoff=True, default=fallback)
    index = handoff_index([exact, wild, wild6, outbound])
    assert "out" not in {ls.name for ls in index.values()}
    own = frozenset({15001, 15006})
    assert route(outbound, ("10.0.0.5", 80), index, own) is exact
    assert route(outbound, ("10.0.0.6", 80), index, own) is wild
    assert route(outbound, ("fd00::1", 80), index, own) is wild  # no "::" listener: the IPv4 wildcard
    assert route(outbound, ("fd00::1", 443), index, own) is wild6
    assert route(outbound, ("10.0.0.6", 81), index, own) is fallback
    assert route(outbound, ("10.0.0.6", 15006), index, own) is None  # a capture port: never served
    assert route(outbound, ("127.0.0.1", 15001), index, own) is None
    assert route(capture("bare", 15001, handoff=True), ("10.0.0.6", 81), index, own) is None


def test_inbound_picks_the_chain_by_destination_port_and_never_hands_off() -> None:
    chain, passthrough = tcp("in_8080", "0.0.0.0", 8080), tcp("in", "0.0.0.0", 15006)
    inbound = capture("in", 15006, handoff=False, by_port={8080: chain}, default=passthrough)
    index = handoff_index([tcp("0.0.0.0_8080", "0.0.0.0", 8080), inbound])
    own = frozenset({15001, 15006})
    assert route(inbound, ("10.0.0.2", 8080), index, own) is chain  # not the outbound 0.0.0.0_8080
    assert route(inbound, ("10.0.0.2", 9999), index, own) is passthrough
    assert route(capture("strict", 15006, handoff=False, by_port={8080: chain}), ("10.0.0.2", 9999), index, own) is None


# ---------------------------------------------------------------- compiling the shapes


def compiled(node: NodeInfo) -> dict[str, Listener]:
    res = translate(load_text(REGISTRY + STRICT), node)
    snap = compile_snapshot(XdsResources(res.listeners, res.routes, res.clusters, res.endpoints))
    return {ls.name: ls for ls in snap.listeners}


def test_compiled_capture_listeners() -> None:
    client = compiled(NodeInfo(labels={"app": "a"}, intercept=True))
    out = client["virtualOutbound"]
    assert out.capture is not None and out.capture.use_original_dst and out.capture.by_port == {}
    assert out.capture.default is not None and out.capture.default.tcp is not None
    assert out.capture.default.tcp.cluster == "PassthroughCluster"
    http = client["0.0.0.0_8080"]
    assert (http.bind_to_port, http.protocol, http.capture) == (False, Protocol.HTTP, None)
    assert http.http is not None and http.http.route_config_name == "8080"
    server = compiled(NodeInfo(labels={"app": "b"}, intercept=True))
    inbound = server["virtualInbound"]
    assert inbound.capture is not None and not inbound.capture.use_original_dst
    chain = inbound.capture.by_port[8080]
    assert (chain.name, chain.protocol, chain.plaintext, chain.bind_to_port) == (
        "virtualInbound_8080", Protocol.HTTP, False, False)
    assert chain.tls is not None and chain.tls.require_client_cert
    assert chain.http is not None and chain.http.route_config_name == "virtualInbound_8080#inline"
    assert inbound.capture.by_port[9091].tcp is not None
    passthrough = inbound.capture.default
    assert passthrough is not None and passthrough.tls is not None and not passthrough.plaintext


def xds_listener(node: NodeInfo, name: str) -> listener_pb2.Listener:
    res = translate(load_text(REGISTRY + STRICT), node)
    (found,) = [ln for ln in res.listeners if ln.name == name]
    return found


def refused(ln: listener_pb2.Listener) -> InvalidResource:
    with pytest.raises(InvalidResource) as caught:
        validate_resource(ln)
    return caught.value


def test_compile_refuses_what_capture_listeners_do_not_implement() -> None:
    server = NodeInfo(labels={"app": "b"}, intercept=True)
    ln = xds_listener(server, "virtualInbound")
    ln.listener_filters.append(lc.ListenerFilter(name="envoy.filters.listener.http_inspector"))
    ln.listener_filters[-1].typed_config.type_url = (
        "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector")
    err = refused(ln)
    assert (err.name, err.field) == ("virtualInbound", "listener_filters[2]")

    ln = xds_listener(server, "virtualInbound")
    ln.filter_chains[0].filter_chain_match.server_names.append("b.example")
    assert refused(ln).field == "filter_chains[0].filter_chain_match.server_names"

    ln = xds_listener(server, "virtualInbound")  # a second TLS chain for port 8080
    ln.filter_chains.append(ln.filter_chains[0])
    assert refused(ln).field == "filter_chains[3].filter_chain_match.transport_protocol"

    ln = xds_listener(server, "virtualInbound")
    ln.filter_chains[0].filter_chain_match.destination_port.value = 0
    assert refused(ln).field == "filter_chains[0].filter_chain_match.destination_port"

    ln = xds_listener(NodeInfo(labels={"app": "a"}, intercept=True), "virtualOutbound")
    ln.bind_to_port.CopyFrom(wrappers_pb2.BoolValue(value=False))
    assert refused(ln).field == "bind_to_port"

    ln = xds_listener(NodeInfo(labels={"app": "a"}, intercept=True), "0.0.0.0_8080")
    ln.filter_chains[0].filter_chain_match.destination_port.value = 8080  # only capture listeners match ports
    assert refused(ln).field == "filter_chains[0].filter_chain_match.destination_port"


def test_compile_checks_the_references_of_every_chain() -> None:
    res = translate(load_text(REGISTRY + STRICT), NodeInfo(labels={"app": "b"}, intercept=True))
    clusters = [c for c in res.clusters if c.name != "inbound|9091||"]
    with pytest.raises(InvalidResource) as caught:
        compile_snapshot(XdsResources(res.listeners, res.routes, clusters, res.endpoints))
    assert caught.value.name == "virtualInbound"
    assert caught.value.field == "filter_chains[destination_port=9091].filters[0].typed_config.cluster"


def test_original_dst_cluster_keeps_its_tls_for_the_destination() -> None:
    res = translate(load_text(REGISTRY), NodeInfo(labels={"app": "a"}, intercept=True))
    (passthrough,) = [c for c in res.clusters if c.name == "PassthroughCluster"]
    assert _cluster(passthrough, {}).original_dst_tls is None
    (mutual,) = [c for c in res.clusters if c.name == "outbound|8080||b.default.svc.cluster.local"]
    mtls = cluster_pb2.Cluster(name="x", type=cluster_pb2.Cluster.ORIGINAL_DST,
                               lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED)
    mtls.transport_socket.CopyFrom(mutual.transport_socket_matches[0].transport_socket)
    compiled_tls = _cluster(mtls, {}).original_dst_tls
    assert compiled_tls is not None and compiled_tls.cert_secret == "default"
    # Auto mTLS socket matches: the original destination has no metadata, so the catch-all (plaintext).
    matches = cluster_pb2.Cluster(name="y", type=cluster_pb2.Cluster.ORIGINAL_DST,
                                  lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED)
    matches.transport_socket_matches.extend(mutual.transport_socket_matches)
    assert _cluster(matches, {}).original_dst_tls is None
