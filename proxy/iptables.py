"""``pillion init-iptables``: the interception rules of one network namespace.

What istio-init does for a pod, done by Pillion for its own namespace: in
the ``nat`` table, inbound TCP is redirected to the proxy's inbound capture
port (15006) and the app's outbound TCP to the outbound capture port
(15001); the proxy's own traffic (its uid, and its gid) is exempt, so what it
sends on to the real destination is not captured again.

Owns: the rule set (as argv lists, from a pure function of ``CaptureRules``)
and running it. It must not touch any table but ``nat``, any chain it did not
create, or any rule but its own two jumps: ``--clean`` removes exactly those
and nothing else, and installing twice leaves one copy (install = clean,
then add).

Strategy: four chains named like Istio's, with Pillion's prefix::

    PREROUTING -p tcp -> PILLION_INBOUND:
        excluded inbound ports          RETURN
        included ports (or all: "*")    -> PILLION_IN_REDIRECT (REDIRECT --to-ports 15006)
    OUTPUT -p tcp -> PILLION_OUTPUT:
        -m owner --uid-owner UID        RETURN    (the proxy itself)
        -m owner --gid-owner GID        RETURN
        -o lo                           RETURN    (the app talking to itself or to localhost)
        -d 127.0.0.1/32 (::1/128)       RETURN
        excluded cidrs, excluded ports  RETURN
        included cidrs (or all: "*")    -> PILLION_REDIRECT (REDIRECT --to-ports 15001)

The same rules go to ip6tables (with the IPv6 loopback and only the IPv6
CIDRs), when ip6tables exists. Rules are added chain body first and the
jumps from PREROUTING/OUTPUT last, so no packet ever meets a half-built chain.
"""

from __future__ import annotations

import argparse
import ipaddress
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

INBOUND = "PILLION_INBOUND"
IN_REDIRECT = "PILLION_IN_REDIRECT"
OUTPUT = "PILLION_OUTPUT"
REDIRECT = "PILLION_REDIRECT"
CHAINS = (INBOUND, IN_REDIRECT, OUTPUT, REDIRECT)
# The only two rules Pillion adds to built-in chains (the spec after "-A/-D <chain>").
JUMPS = (("PREROUTING", ("-p", "tcp", "-j", INBOUND)), ("OUTPUT", ("-p", "tcp", "-j", OUTPUT)))

ALL = "*"
DEFAULT_EXCLUDED_INBOUND = (15090, 15021, 15020)


@dataclass(frozen=True)
class CaptureRules:
    """What to capture. ``None`` in an include field means everything ("*"); () means nothing."""

    proxy_uid: int = 1337
    proxy_gid: int | None = None  # default: the same number as proxy_uid
    inbound_port: int = 15006
    outbound_port: int = 15001
    include_inbound_ports: tuple[int, ...] | None = None
    exclude_inbound_ports: tuple[int, ...] = DEFAULT_EXCLUDED_INBOUND
    include_outbound_cidrs: tuple[str, ...] | None = None
    exclude_outbound_cidrs: tuple[str, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()


def _family(cidr: str) -> int:
    return ipaddress.ip_network(cidr, strict=False).version


def install_rules(rules: CaptureRules, family: int = 4) -> list[list[str]]:
    """Every command that installs ``rules`` for IPv4 (``family=4``) or IPv6, in order. Pure."""
    tool = "iptables" if family == 4 else "ip6tables"
    loopback = "127.0.0.1/32" if family == 4 else "::1/128"
    gid = rules.proxy_uid if rules.proxy_gid is None else rules.proxy_gid

    def nat(*args: str) -> list[str]:
        return [tool, "-w", "-t", "nat", *args]

    out: list[list[str]] = []
    inbound = rules.include_inbound_ports is None or bool(rules.include_inbound_ports)
    if inbound:
        out.append(nat("-N", IN_REDIRECT))
        out.append(nat("-A", IN_REDIRECT, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(rules.inbound_port)))
        out.append(nat("-N", INBOUND))
        if rules.include_inbound_ports is None:
            for port in rules.exclude_inbound_ports:
                out.append(nat("-A", INBOUND, "-p", "tcp", "--dport", str(port), "-j", "RETURN"))
            out.append(nat("-A", INBOUND, "-p", "tcp", "-j", IN_REDIRECT))
        else:
            excluded = set(rules.exclude_inbound_ports)
            for port in rules.include_inbound_ports:
                if port not in excluded:
                    out.append(nat("-A", INBOUND, "-p", "tcp", "--dport", str(port), "-j", IN_REDIRECT))
    out.append(nat("-N", REDIRECT))
    out.append(nat("-A", REDIRECT, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(rules.outbound_port)))
    out.append(nat("-N", OUTPUT))
    out.append(nat("-A", OUTPUT, "-m", "owner", "--uid-owner", str(rules.proxy_uid), "-j", "RETURN"))
    out.append(nat("-A", OUTPUT, "-m", "owner", "--gid-owner", str(gid), "-j", "RETURN"))
    out.append(nat("-A", OUTPUT, "-o", "lo", "-j", "RETURN"))
    out.append(nat("-A", OUTPUT, "-d", loopback, "-j", "RETURN"))
    for cidr in rules.exclude_outbound_cidrs:
        if _family(cidr) == family:
            out.append(nat("-A", OUTPUT, "-d", cidr, "-j", "RETURN"))
    for port in rules.exclude_outbound_ports:
        out.append(nat("-A", OUTPUT, "-p", "tcp", "--dport", str(port), "-j", "RETURN"))
    if rules.include_outbound_cidrs is None:
        out.append(nat("-A", OUTPUT, "-j", REDIRECT))
    else:
        for cidr in rules.include_outbound_cidrs:
            if _family(cidr) == family:
                out.append(nat("-A", OUTPUT, "-d", cidr, "-j", REDIRECT))
    for chain, spec in JUMPS:
        if chain == "PREROUTING" and not inbound:
            continue
        out.append(nat("-A", chain, *spec))
    return out


def clean_rules(family: int = 4) -> list[list[str]]:
    """The commands that remove Pillion's rules: delete each jump, then flush and delete each chain.

    Pure. Each command may fail harmlessly (nothing to remove); a jump delete is
    meant to be repeated until it fails (``run`` does), in case it was added twice.
    """
    tool = "iptables" if family == 4 else "ip6tables"
    out = [[tool, "-w", "-t", "nat", "-D", chain, *spec] for chain, spec in JUMPS]
    out += [[tool, "-w", "-t", "nat", "-F", chain] for chain in CHAINS]
    out += [[tool, "-w", "-t", "nat", "-X", chain] for chain in CHAINS]
    return out


# ------------------------------------------------------------------ execution

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False)


class IptablesError(Exception):
    """A rule could not be installed; the message names the command and iptables' own words."""


def clean(family: int, runner: Runner = _run) -> None:
    """Remove Pillion's rules for one family; absent rules and chains are not an error."""
    for argv in clean_rules(family):
        if "-D" in argv:
            for _ in range(100):  # every copy, should an older install have left several
                if runner(argv).returncode != 0:
                    break
        else:
            runner(argv)


def install(rules: CaptureRules, family: int, runner: Runner = _run) -> None:
    """Clean, then add every rule; on a failure, clean again and raise IptablesError."""
    clean(family, runner)
    for argv in install_rules(rules, family):
        done = runner(argv)
        if done.returncode != 0:
            clean(family, runner)
            raise IptablesError(f"{shlex.join(argv)}: {(done.stderr or done.stdout).strip()}")


# ------------------------------------------------------------------ command line

def _ports(text: str) -> tuple[int, ...]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise argparse.ArgumentTypeError(f"{item!r} is not a port (1-65535)")
        out.append(int(item))
    return tuple(out)


def _ports_or_all(text: str) -> tuple[int, ...] | None:
    return None if text.strip() == ALL else _ports(text)


def _cidrs(text: str) -> tuple[str, ...]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not an IP address or CIDR") from None
    return tuple(out)


def _cidrs_or_all(text: str) -> tuple[str, ...] | None:
    return None if text.strip() == ALL else _cidrs(text)


def parser(prog: str = "pillion init-iptables") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Install (or --clean) the nat rules that send this network namespace's TCP "
                    "traffic through the sidecar (run as root, in the app's namespace).")
    ap.add_argument("--clean", action="store_true", help="remove Pillion's chains and jump rules, nothing else")
    ap.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    ap.add_argument("--proxy-uid", type=int, default=1337, help="the proxy's uid, exempt from capture (1337)")
    ap.add_argument("--proxy-gid", type=int, default=None, help="the proxy's gid, exempt too (default: the uid)")
    ap.add_argument("--inbound-port", type=int, default=15006, help="inbound capture port (15006)")
    ap.add_argument("--outbound-port", type=int, default=15001, help="outbound capture port (15001)")
    ap.add_argument("--include-inbound-ports", type=_ports_or_all, default=None, metavar="'*'|P,P",
                    help="inbound ports to capture: '*' (default) for all, '' for none")
    ap.add_argument("--exclude-inbound-ports", type=_ports, default=DEFAULT_EXCLUDED_INBOUND, metavar="P,P",
                    help="inbound ports never captured (default 15090,15021,15020)")
    ap.add_argument("--include-outbound-cidrs", type=_cidrs_or_all, default=None, metavar="'*'|CIDR,CIDR",
                    help="outbound destinations to capture: '*' (default) for all, '' for none")
    ap.add_argument("--exclude-outbound-cidrs", type=_cidrs, default=(), metavar="CIDR,CIDR")
    ap.add_argument("--exclude-outbound-ports", type=_ports, default=(), metavar="P,P")
    ap.add_argument("--no-ipv6", action="store_true", help="leave ip6tables alone")
    return ap


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    rules = CaptureRules(
        proxy_uid=args.proxy_uid, proxy_gid=args.proxy_gid, inbound_port=args.inbound_port,
        outbound_port=args.outbound_port, include_inbound_ports=args.include_inbound_ports,
        exclude_inbound_ports=args.exclude_inbound_ports, include_outbound_cidrs=args.include_outbound_cidrs,
        exclude_outbound_cidrs=args.exclude_outbound_cidrs, exclude_outbound_ports=args.exclude_outbound_ports,
    )
    families = [4] if args.no_ipv6 else [4, 6]
    done: list[str] = []
    for family in families:
        tool = "iptables" if family == 4 else "ip6tables"
        commands = clean_rules(family) if args.clean else install_rules(rules, family)
        if args.dry_run:
            for command in commands:
                print(shlex.join(command))
            continue
        if shutil.which(tool) is None:
            if family == 4:
                print("pillion init-iptables: iptables not found (Debian: apt-get install iptables)", file=sys.stderr)
                return 1
            print("pillion init-iptables: ip6tables not found; IPv6 traffic is left alone", file=sys.stderr)
            continue
        try:
            if args.clean:
                clean(family)
            else:
                install(rules, family)
        except (IptablesError, OSError) as e:
            if family == 4:
                print(f"pillion init-iptables: {e}", file=sys.stderr)
                return 1
            # A kernel without IPv6 NAT (or with IPv6 off) must not stop IPv4 capture.
            print(f"pillion init-iptables: IPv6 rules not installed, IPv6 traffic is left alone: {e}",
                  file=sys.stderr)
            continue
        done.append(tool)
    if not args.dry_run:
        what = "removed" if args.clean else "installed"
        print(f"pillion init-iptables: {what} ({', '.join(done)})", file=sys.stderr)
    return 0
