"""`pillion validate DIR`: exit status and one precise line per problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

GOOD = """\
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.0.1, labels: {version: v1}}]
"""

BAD = GOOD + """\
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v9}
  - rout: []
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: ratings, namespace: default}
spec:
  hosts: [ratings]
  http:
  - route:
    - destination: {host: ratings}
---
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {name: gw}
spec: {}
"""


def test_a_route_to_an_undefined_subset_is_named(tmp_path):
    (tmp_path / "mesh.yaml").write_text(GOOD + """\
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v9}
""")
    r = run(tmp_path)
    assert r.returncode == 1
    assert "spec.http[0].route[0].destination.subset" in r.stderr and "v9" in r.stderr, r.stderr


def run(d: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "validate", str(d)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_good_directory_passes(tmp_path):
    (tmp_path / "mesh.yaml").write_text(GOOD)
    r = run(tmp_path)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


def test_each_problem_is_named_by_file_resource_and_field(tmp_path):
    path = tmp_path / "mesh.yaml"
    path.write_text(BAD)
    r = run(tmp_path)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert any(str(path) in line and "VirtualService default/reviews" in line and "spec.http[1].rout" in line
               for line in lines), lines
    assert any("Gateway" in line and "kind" in line.lower() for line in lines), lines
    assert any("VirtualService default/ratings: spec.hosts[0]: no ServiceEntry declares host 'ratings'" in line
               for line in lines), lines
    assert lines[-1].endswith(f"problem(s) in {tmp_path}")
