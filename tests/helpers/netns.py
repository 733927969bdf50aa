"""Network namespaces for interception tests: two namespaces joined by a veth pair.

Addresses (10.250.0.1/24 in A, 10.250.0.2/24 in B) exist only inside the
namespaces this module creates; the host's interfaces and iptables are never
touched. Every namespace is deleted on exit (``finally``), by an ``atexit``
hook should the interpreter stop another way, and at the next start if a
previous run was killed (names carry the creating process id; a namespace
whose creator is gone is stale). Processes started inside are ended by their
process id before the namespaces go, and die with the test process if it is
killed (parent-death signal).

Commands run inside with ``nsenter --net=/run/netns/NAME`` (``ip netns exec``
remounts /sys, which some tools mind; CONTAINERS.md).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "piltest"
PROXY_UID = 1337
A_IP = "10.250.0.1"
B_IP = "10.250.0.2"
A_IP6 = "fd00:250::1"  # unique local addresses, also only inside the namespaces
B_IP6 = "fd00:250::2"


def unavailable() -> str | None:
    """Why namespace tests cannot run here, or None if they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces and iptables need root"
    for tool in ("ip", "nsenter", "setpriv", "iptables", "iptables-save"):
        if shutil.which(tool) is None:
            hint = " (Debian: apt-get install iptables)" if tool.startswith("iptables") else ""
            return f"{tool} is not installed{hint}"
    probe = f"{PREFIX}{os.getpid()}probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    try:
        nat = subprocess.run(["nsenter", f"--net=/run/netns/{probe}", "iptables", "-w", "-t", "nat", "-S"],
                             capture_output=True, text=True)
        if nat.returncode != 0:
            return f"iptables does not work in a network namespace: {nat.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> None:
    """Delete namespaces left by earlier runs of these tests whose process is gone."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{PREFIX}(\d+)[a-z]+", name)
        if m and not _alive(int(m.group(1))):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def _run(argv: Sequence[str]) -> None:
    done = subprocess.run(list(argv), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


@dataclass
class Namespace:
    name: str
    ip: str
    ip6: str = ""  # "" where the kernel has no IPv6
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def argv(self, *cmd: str, uid: int | None = None) -> list[str]:
        """``cmd`` inside this namespace (as ``uid`` if given, with no supplementary groups).

        A process started this way dies with the test process: setpriv sets the parent-death
        signal (after changing uid, which would clear it), so a killed run leaves no servers. No
        Python runs between fork and exec (no preexec_fn), so subprocess can use vfork.
        """
        prefix = ["nsenter", f"--net={self.path}", "setpriv"]
        if uid is not None:
            prefix += [f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        return [*prefix, "--pdeathsig", "KILL", *cmd]

    def run(self, *cmd: str, uid: int | None = None, timeout: float = 30.0,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*cmd, uid=uid), capture_output=True, text=True, timeout=timeout, cwd=cwd)

    def start(self, *cmd: str, uid: int | None = None, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(self.argv(*cmd, uid=uid), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                cwd=cwd, env=env)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def nat_rules(self, tool: str = "iptables") -> str:
        """``iptables-save -t nat`` (or ip6tables-save) without comments and counters (comparable over time)."""
        out = self.run(f"{tool}-save", "-t", "nat").stdout
        lines = [line for line in out.splitlines() if not line.startswith("#")]
        return "\n".join(re.sub(r"\[\d+:\d+\]", "", line) for line in lines)


@contextlib.contextmanager
def veth_pair() -> Iterator[tuple[Namespace, Namespace]]:
    """Namespaces A (10.250.0.1/24, fd00:250::1/64) and B (10.250.0.2/24, fd00:250::2/64)
    joined by a veth pair; deleted on exit."""
    remove_stale()
    base = f"{PREFIX}{os.getpid()}"
    a, b = Namespace(f"{base}a", A_IP), Namespace(f"{base}b", B_IP)

    def cleanup() -> None:
        for ns in (a, b):
            ns.stop_all()
        for ns in (a, b):
            subprocess.run(["ip", "netns", "delete", ns.name], capture_output=True)

    atexit.register(cleanup)
    try:
        for ns in (a, b):
            _run(["ip", "netns", "add", ns.name])
            _run(["ip", "-n", ns.name, "link", "set", "lo", "up"])
        # Created inside A, its peer moved straight into B: the host never holds either end.
        _run(["ip", "-n", a.name, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", b.name])
        for ns, dev, ip6 in ((a, "va", A_IP6), (b, "vb", B_IP6)):
            _run(["ip", "-n", ns.name, "addr", "add", f"{ns.ip}/24", "dev", dev])
            added = subprocess.run(["ip", "-n", ns.name, "addr", "add", f"{ip6}/64", "dev", dev, "nodad"],
                                   capture_output=True)
            ns.ip6 = ip6 if added.returncode == 0 else ""
            _run(["ip", "-n", ns.name, "link", "set", dev, "up"])
        yield a, b
    finally:
        cleanup()
        atexit.unregister(cleanup)
