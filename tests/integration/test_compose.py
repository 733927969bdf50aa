"""The docker-compose demo mesh (docker-compose.yml + docker-compose.test.yml, deploy/compose/).

1. Static checks, everywhere: the compose file validates against the compose-spec JSON schema
   (check-jsonschema's built-in copy; installed into the venv if missing, else skipped), and
   everything it names exists: build contexts, bind-mounted files, named volumes, the modules
   and scripts the services run, the services that `network_mode: service:X`, depends_on and
   the apps' --call targets refer to. The mesh YAML (with and without the test override's
   tracing file) loads without problems.
2. The mesh for real with podman-compose, inside a network namespace this test creates (no
   bridge or address ever appears on the host): the image is built as test_container.py builds
   it (same tags, so the build is shared), bookinfo comes up with its sidecars, and a plaintext
   client in the namespace calls productpage (PERMISSIVE). The answer's call tree shows details
   and reviews answering, the canary route (jason -> v2 -> ratings), the mTLS identity each hop
   saw, an AuthorizationPolicy refusal, and the trace at the control server's OTLP receiver.
   Skipped, with the reason, without root, podman, debootstrap, nsenter or podman-compose.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.net import REPO, wait_until
from tests.helpers.podman import CONF, IMAGE, build_image
from tests.helpers.podman import run as _run

COMPOSE = REPO / "docker-compose.yml"
OVERRIDE = REPO / "docker-compose.test.yml"
MESH = REPO / "deploy" / "compose" / "mesh"
CONTROL_IP = "172.29.77.10"  # fixed in docker-compose.yml; deploy/compose/test/tracing.yaml sends spans there
BIN = Path(sys.executable).parent
PILLION_COMMANDS = {"proxy", "control", "init-iptables", "status", "traces", "validate", "certs", "proxy-config"}


def _tool(name: str, package: str) -> Path | None:
    """A console script of the venv, installed with pip when missing; None if that fails."""
    path = BIN / name
    if not path.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", package], capture_output=True, timeout=300)
    return path if path.exists() else None


def _load(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), path
    return doc


# ---------------------------------------------------------------- 1. static checks


def test_compose_files_validate_against_the_compose_spec() -> None:
    tool = _tool("check-jsonschema", "check-jsonschema")
    if tool is None:
        pytest.skip("check-jsonschema is not installed and pip could not install it")
    for path in (COMPOSE, OVERRIDE):
        r = subprocess.run([str(tool), "--builtin-schema", "vendor.compose-spec", str(path)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{path.name}:\n{r.stdout}\n{r.stderr}"


def _bind_source(volume: str | dict[str, Any]) -> str:
    return volume.split(":", 1)[0] if isinstance(volume, str) else str(volume.get("source", ""))


def test_everything_the_compose_file_names_exists() -> None:
    doc = _load(COMPOSE)
    services: dict[str, dict[str, Any]] = doc["services"]
    named_volumes = set(doc.get("volumes") or {})
    networks = set(doc.get("networks") or {})
    names = set(services)
    for svc in services.values():  # network aliases are names too (reviews -> reviews-v1/v2/v3)
        nets = svc.get("networks")
        if isinstance(nets, dict):
            for net in nets.values():
                names.update((net or {}).get("aliases", []))
    problems: list[str] = []
    for name, svc in services.items():
        build = svc.get("build")
        if build is not None:
            context = REPO / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
            if not dockerfile.is_file():
                problems.append(f"{name}: build context {context} has no {dockerfile.name}")
        binds: dict[str, Path] = {}
        for volume in svc.get("volumes", []):
            source = _bind_source(volume)
            if source.startswith((".", "/")):
                path = (REPO / source).resolve()
                if not path.exists():
                    problems.append(f"{name}: bind source {source} does not exist")
                target = volume.split(":")[1] if isinstance(volume, str) else volume["target"]
                binds[target] = path
            elif source not in named_volumes:
                problems.append(f"{name}: volume {source!r} is not declared under volumes:")
        mode = svc.get("network_mode", "")
        if mode.startswith("service:") and mode[len("service:"):] not in services:
            problems.append(f"{name}: network_mode {mode} names no service")
        deps = svc.get("depends_on", [])
        for dep in deps if isinstance(deps, list) else list(deps):
            if dep not in services:
                problems.append(f"{name}: depends_on {dep} names no service")
        nets = svc.get("networks", [])
        for net in nets if isinstance(nets, list) else list(nets):
            if net not in networks:
                problems.append(f"{name}: network {net} is not declared under networks:")
        entrypoint = svc.get("entrypoint") or []
        command = [str(c) for c in svc.get("command") or []]
        if entrypoint[:2] == ["python3", "-m"]:
            module = REPO / entrypoint[2].replace(".", "/")
            if not (module.with_suffix(".py").is_file() or (module / "__main__.py").is_file()):
                problems.append(f"{name}: module {entrypoint[2]} is not in the repository")
        elif entrypoint[:1] == ["sh"]:
            if entrypoint[1] not in binds:
                problems.append(f"{name}: script {entrypoint[1]} is not bind-mounted from the repository")
        elif (not entrypoint and str(svc.get("image", "")).startswith("${PILLION_IMAGE") and command
              and command[0] not in PILLION_COMMANDS):
            problems.append(f"{name}: `pillion {command[0]}` is not a pillion command")
        for i, arg in enumerate(command):
            if arg == "--call":
                host = command[i + 1].split(":", 1)[0]
                if host not in names:
                    problems.append(f"{name}: --call {command[i + 1]} names no service or alias")
    override = _load(OVERRIDE)
    for name, svc in override["services"].items():
        if name not in services:
            problems.append(f"override: {name} is not a service of docker-compose.yml")
        for volume in svc.get("volumes", []):
            source = _bind_source(volume)
            if source.startswith(".") and not (REPO / source).exists():
                problems.append(f"override {name}: bind source {source} does not exist")
    prometheus = _load(REPO / "deploy" / "compose" / "prometheus.yml")
    for job in prometheus["scrape_configs"]:
        for group in job["static_configs"]:
            for target in group["targets"]:
                if target.rsplit(":", 1)[0] not in names:
                    problems.append(f"prometheus.yml: target {target} names no service")
    assert not problems, "\n".join(problems)


def test_mesh_yaml_loads_as_shipped_and_with_the_test_tracing(tmp_path: Path) -> None:
    from control.translate import load_dir

    cfg = load_dir(MESH)
    assert {g.meta.name for g in cfg.workload_groups} == {
        "productpage-v1", "details-v1", "reviews-v1", "reviews-v2", "reviews-v3", "ratings-v1"}
    for f in MESH.glob("*.yaml"):
        shutil.copy(f, tmp_path / f.name)
    shutil.copy(REPO / "deploy" / "compose" / "test" / "tracing.yaml", tmp_path / "tracing.yaml")
    load_dir(tmp_path)
    assert CONTROL_IP in (tmp_path / "tracing.yaml").read_text()
    # Each sidecar's group and service account exist in the mesh and in tokens.sh.
    tokens = (REPO / "deploy" / "compose" / "tokens.sh").read_text()
    for name, svc in _load(COMPOSE)["services"].items():
        env = svc.get("environment") or {}
        if "WORKLOAD_GROUP" in env:
            assert env["WORKLOAD_GROUP"] in {g.meta.name for g in cfg.workload_groups}, name
            assert env["SERVICE_ACCOUNT"] in tokens, name


# ---------------------------------------------------------------- 2. the mesh for real


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, podman)"
    for tool in ("podman", "debootstrap", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install podman runc buildah netavark aardvark-dns debootstrap iptables)"
    return None


# A plaintext client outside the mesh (run in the test's namespace): GET productpage, print the answer.
CLIENT = """
import asyncio, json, sys
from control.demoapp import call_upstream
print(json.dumps(asyncio.run(call_upstream(sys.argv[1] + ":9080/productpage/productpage", {"end-user": sys.argv[2]}))))
"""

# Inside the productpage app container (uid 1001, captured): call ratings, which only reviews may call.
FORBIDDEN = """
import asyncio, json
from control.demoapp import call_upstream
print(json.dumps(asyncio.run(call_upstream("ratings:9080/ratings/ratings", {}))))
"""


class Mesh:
    def __init__(self, env: dict[str, str], netns: str, project: str) -> None:
        self.env, self.netns, self.project = env, netns, project

    def compose(self, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(["nsenter", f"--net=/run/netns/{self.netns}", str(BIN / "podman-compose"), "-p", self.project,
                     "-f", str(COMPOSE), "-f", str(OVERRIDE), *args], self.env, timeout, check)

    def in_netns(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return _run(["nsenter", f"--net=/run/netns/{self.netns}", *args], self.env, timeout, check=False)

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def logs(self, *services: str) -> str:
        out = []
        for s in services:
            r = _run(["podman", "logs", "--tail", "30", self.container(s)], self.env, 30, check=False)
            out.append(f"--- {s}\n{r.stdout[-2500:]}{r.stderr[-2500:]}")
        return "\n".join(out)

    def productpage(self, ip: str, user: str) -> dict[str, Any]:
        r = self.in_netns(sys.executable, "-c", CLIENT, ip, user)
        try:
            doc = json.loads(r.stdout)
        except ValueError:
            return {"status": 0, "error": r.stderr[-500:]}
        return doc if isinstance(doc, dict) else {"status": 0}

    def clean(self) -> None:
        self.compose("down", "-v", "-t", "2", timeout=120, check=False)
        label = f"label=io.podman.compose.project={self.project}"
        ids = _run(["podman", "ps", "-a", "-q", "--filter", label], self.env, 60, check=False).stdout.split()
        if ids:
            _run(["podman", "rm", "-f", *ids], self.env, 120, check=False)
        vols = _run(["podman", "volume", "ls", "-q", "--filter", label], self.env, 60, check=False).stdout.split()
        if vols:
            _run(["podman", "volume", "rm", "-f", *vols], self.env, 60, check=False)
        _run(["podman", "network", "rm", "-f", f"{self.project}_mesh"], self.env, 60, check=False)


@pytest.fixture
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    why = _why_not()
    if why is not None:
        pytest.skip(why)
    if _tool("podman-compose", "podman-compose") is None:
        pytest.skip("podman-compose (PyPI; Debian's 1.0.3 fails on network_mode service:) could not be installed")
    work = tmp_path_factory.mktemp("compose")
    (work / "containers.conf").write_text(CONF)
    env = dict(os.environ, CONTAINERS_CONF=str(work / "containers.conf"), PILLION_IMAGE=IMAGE)
    build_image(work, env)
    tag = f"pc{os.getpid()}"
    m = Mesh(env, f"pillion-{tag}", f"pillion{tag}")
    made = subprocess.run(["ip", "netns", "add", m.netns], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
    try:
        subprocess.run(["ip", "-n", m.netns, "link", "set", "lo", "up"], check=True)  # the 127.0.0.1 publishes
        yield m
    finally:
        m.clean()
        subprocess.run(["ip", "netns", "del", m.netns], capture_output=True)


def _call(doc: dict[str, Any], service: str) -> dict[str, Any]:
    return next((c for c in doc.get("calls", []) if c.get("service") == service), {})


def test_bookinfo_comes_up_with_mtls_canary_authz_and_tracing(mesh: Mesh) -> None:
    started = time.monotonic()
    mesh.compose("up", "-d", "--no-build", timeout=180)
    ip = _run(["podman", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
               mesh.container("productpage")], mesh.env).stdout.strip()
    assert ip, "productpage has no address"

    last: dict[str, Any] = {}

    def answered() -> bool:  # the sidecars start, get certificates, register and sync
        last.clear()
        last.update(mesh.productpage(ip, "jason"))
        return last.get("status") == 200 and _call(last, "reviews").get("status") == 200 \
            and _call(last, "details").get("status") == 200

    doc = last
    if not wait_until(answered, timeout=90, interval=0.5):
        raise AssertionError(f"productpage never answered with its upstreams: {doc}\n"
                             + mesh.logs("control", "productpage-proxy", "reviews-v2-proxy", "details-proxy"))
    ready = time.monotonic() - started

    # The user's plaintext call (PERMISSIVE) has no peer; every hop behind it saw its caller's identity.
    sa = "spiffe://cluster.local/ns/default/sa/bookinfo-"
    assert doc["service"] == "productpage" and doc["peer"] == ""
    assert _call(doc, "details")["peer"] == sa + "productpage"
    reviews = _call(doc, "reviews")
    assert reviews["version"] == "v2" and reviews["peer"] == sa + "productpage"  # jason -> v2
    ratings = _call(reviews, "ratings")
    assert ratings["status"] == 200 and ratings["peer"] == sa + "reviews"

    seen = set()
    for _ in range(12):  # everyone else: v1 or v3, never v2
        other = _call(mesh.productpage(ip, "alice"), "reviews")
        assert other.get("status") == 200, other
        seen.add(other["version"])
    assert seen <= {"v1", "v3"} and seen, seen

    # AuthorizationPolicy: only reviews may call ratings (productpage's app is captured: uid 1001).
    refused = _run(["podman", "exec", mesh.container("productpage"), "python3", "-c", FORBIDDEN], mesh.env, 60)
    assert json.loads(refused.stdout)["status"] == 403

    # The trace of a request reached the control server's OTLP receiver.
    shown_box = [""]

    def traced() -> bool:
        r = mesh.in_netns(sys.executable, "-m", "proxy", "traces", "--server", f"{CONTROL_IP}:15014", "--limit", "20")
        shown_box[0] = r.stdout + r.stderr
        return bool(re.search(r"productpage\S* SERVER", shown_box[0]) and re.search(r"reviews\S* SERVER", shown_box[0]))

    shown = ""
    if not wait_until(traced, timeout=30, interval=0.5):
        shown = shown_box[0]
        raise AssertionError(f"no productpage -> reviews trace at the receiver:\n{shown}")

    down_started = time.monotonic()
    mesh.compose("down", "-v", "-t", "5", timeout=120)
    print(f"\ncompose mesh: ready in {ready:.1f}s, down in {time.monotonic() - down_started:.1f}s")
