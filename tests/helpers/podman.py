"""Building the Pillion image with podman for tests (shared by the container and compose tests).

podman here needs runc and bounded ulimits (shared/CONTAINERS.md); no registry is
reachable, so the base is a Debian rootfs made with debootstrap and imported once,
and the image is built on it with BASE_IMAGE, as a user passes their own base.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.helpers.net import REPO

BASE = "localhost/pillion-test-base:bookworm"
IMAGE = "localhost/pillion:test"
CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


def run(args: list[str], env: dict[str, str], timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def podman_env(work: Path) -> dict[str, str]:
    """The environment for podman with this machine's working settings."""
    (work / "containers.conf").write_text(CONF)
    return dict(os.environ, CONTAINERS_CONF=str(work / "containers.conf"))


def build_image(work: Path, env: dict[str, str]) -> None:
    """The base (once) and the image (``podman build --format docker`` keeps the HEALTHCHECK)."""
    if run(["podman", "image", "exists", BASE], env, check=False).returncode != 0:
        rootfs = work / "rootfs"
        run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), "http://deb.debian.org/debian"], env, 900)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run(["podman", "import", "-", BASE], stdin=tar.stdout, env=env, capture_output=True, timeout=300)
        tar.wait()
        assert imp.returncode == 0, imp.stderr
        shutil.rmtree(rootfs, ignore_errors=True)
    build = ["podman", "build", "--format", "docker", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE}", "-t", IMAGE]
    ca = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    if ca and Path(ca).is_file():  # a network behind a TLS-inspecting proxy: hand pip its CA bundle
        build += ["-v", f"{ca}:/etc/pillion-build-ca.crt:ro", "--build-arg", "PIP_CERT_FILE=/etc/pillion-build-ca.crt"]
    run([*build, str(REPO)], env, 900)
