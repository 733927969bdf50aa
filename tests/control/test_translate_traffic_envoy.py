"""A real Envoy accepts the traffic-management output (`--mode validate` on a static bootstrap):
Istio's task configs and one config using every translated field."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from control.translate import NodeInfo, Resources, load_text, translate
from control.translate.bootstrap import envoy_bootstrap
from tests.control.test_translate_envoy import ENVOY
from tests.control.traffic_fixtures import EVERYTHING, PRODUCTPAGE, TASKS, task_resources
from tests.control.translate_fixtures import write_mesh_certs

STRICT = (
    "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict}\n"
    "spec: {mtls: {mode: STRICT}}\n"
)


def validate(resources: Resources, tmp_path: Path) -> None:
    path = tmp_path / "bootstrap.json"
    secrets = write_mesh_certs(tmp_path)
    path.write_text(json.dumps(envoy_bootstrap(resources, admin_port=0, secrets=secrets), indent=1))
    result = subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


@pytest.mark.skipif(not ENVOY.exists(), reason=f"no Envoy binary at {ENVOY}")
@pytest.mark.parametrize("name", sorted(TASKS))
def test_envoy_validates_istio_task_configs(tmp_path: Path, name: str) -> None:
    validate(task_resources(name, intercept=name == "tasks-tcp-traffic-shifting.yaml"), tmp_path)


@pytest.mark.skipif(not ENVOY.exists(), reason=f"no Envoy binary at {ENVOY}")
@pytest.mark.parametrize("intercept", [False, True])
def test_envoy_validates_every_traffic_field(tmp_path: Path, intercept: bool) -> None:
    node = NodeInfo(PRODUCTPAGE.namespace, PRODUCTPAGE.labels, PRODUCTPAGE.name, intercept)
    validate(translate(load_text(EVERYTHING + STRICT), node), tmp_path)
