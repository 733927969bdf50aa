"""The container image, built for real with podman from a Debian base made by debootstrap.

No registry is reachable here, so the base image is built from Debian packages and passed
as BASE_IMAGE, as a user would pass their own. The container runs with no network at all
(--network none: only its own loopback), so nothing touches the host's networks; inside it a
standalone sidecar starts and the image's HEALTHCHECK (15021 /healthz/ready) reports healthy.
Skipped, with the reason, where podman or debootstrap is not installed (.ci/run installs them).
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.helpers.podman import IMAGE, build_image, podman_env
from tests.helpers.podman import run as _run

pytestmark = pytest.mark.skipif(
    shutil.which("podman") is None or shutil.which("debootstrap") is None or os.geteuid() != 0,
    reason="needs root, podman and debootstrap (apt-get install podman runc buildah debootstrap)",
)


def test_image_builds_runs_as_1337_and_reports_healthy(tmp_path_factory):
    work = tmp_path_factory.mktemp("podman")
    env = podman_env(work)
    build_image(work, env)

    uid = _run(["podman", "run", "--rm", "--network", "none", "--entrypoint", "id", IMAGE, "-u"], env)
    assert uid.stdout.strip() == "1337"
    help_ = _run(["podman", "run", "--rm", "--network", "none", IMAGE, "--help"], env)
    assert "proxy" in help_.stdout and "control" in help_.stdout

    cfg = work / "cfg"
    cfg.mkdir()
    (cfg / "mesh.yaml").write_text("""\
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: app, namespace: default}
spec:
  hosts: [app.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.0.1, ports: {http: 8080}}]
---
apiVersion: networking.istio.io/v1beta1
kind: Sidecar
metadata: {name: app, namespace: default}
spec:
  egress:
  - port: {number: 9080, protocol: HTTP, name: http}
    bind: 127.0.0.1
    captureMode: NONE
    hosts: ["./*"]
""")
    cfg.chmod(0o755)
    (cfg / "mesh.yaml").chmod(0o644)
    started = _run(["podman", "run", "-d", "--network", "none", "-v", f"{cfg}:/etc/pillion:ro", IMAGE, "proxy",
                    "--config-dir", "/etc/pillion", "--status-port", "15021", "--no-watch"], env)
    cid = started.stdout.strip()
    try:
        health = None
        for _ in range(50):  # the healthcheck itself polls; bounded attempts, each a real check
            health = _run(["podman", "healthcheck", "run", cid], env, 30, check=False)
            if health.returncode == 0:
                break
        assert health is not None and health.returncode == 0, _run(["podman", "logs", cid], env, check=False).stderr
        stop = _run(["podman", "stop", "-t", "10", cid], env, 60)
        assert stop.returncode == 0
        state = _run(["podman", "inspect", "-f", "{{.State.ExitCode}}", cid], env)
        assert state.stdout.strip() == "0"  # SIGTERM drained and exited 0 (not killed after the timeout)
    finally:
        _run(["podman", "rm", "-f", cid], env, 60, check=False)
