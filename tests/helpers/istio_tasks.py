"""Istio's traffic-management tasks on loopback: their YAML, a registry rewritten for 127.0.0.1, apps, metrics.

Shared by tests/integration/test_istio_tasks.py (a Pillion sidecar follows
`pillion control`) and tests/conformance/test_envoy_tasks.py (the same
scenarios through a real Envoy and through Pillion).

`task(name)` is tests/control/data/tasks-<name>.yaml unchanged;
`loopback(registry, port, apps)` rewrites a registry so its WorkloadEntries
point at real apps on 127.0.0.1 and its services (and the client Sidecar's
egress listener) use ``port``; `apps(*names)` starts a `RecordingUpstream`
per workload; `metric(prometheus_text, name, part)` sums a counter's series
whose labels contain ``part``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml

from tests.helpers.net import free_port
from tests.helpers.upstreams import RecordingUpstream

DATA = Path(__file__).resolve().parent.parent / "control" / "data"

BOOKINFO = ("reviews-v1", "reviews-v2", "reviews-v3", "ratings-v1", "ratings-v2", "details-v1")


def task(name: str) -> str:
    return (DATA / f"tasks-{name}.yaml").read_text()


def loopback(registry: str, port: int, apps: dict[str, int], bind: str = "127.0.0.1") -> str:
    """The registry YAML with WorkloadEntries on ``apps`` (name -> port), services and the
    client Sidecar on ``port`` (bound to ``bind``)."""
    docs = [d for d in yaml.safe_load_all(registry) if d]
    for d in docs:
        kind, spec = d["kind"], d["spec"]
        if kind == "WorkloadEntry":
            name = d["metadata"]["name"]
            spec["address"] = "127.0.0.1"
            spec["ports"] = {spec_port_name(docs, spec): apps[name]} if name in apps else {"http": free_port()}
        elif kind == "ServiceEntry":
            for p in spec["ports"]:
                p["number"] = port
                p.pop("targetPort", None)
        elif kind == "Sidecar":
            for e in spec.get("egress", []):
                e["port"]["number"] = port
                e["bind"] = bind
    return yaml.safe_dump_all(docs, sort_keys=False)


def spec_port_name(docs: list[dict[str, Any]], we: dict[str, Any]) -> str:
    app = we["labels"]["app"]
    for d in docs:
        if d["kind"] == "ServiceEntry" and d["spec"].get("workloadSelector", {}).get("labels", {}).get("app") == app:
            return str(d["spec"]["ports"][0]["name"])
    return "http"


@contextlib.asynccontextmanager
async def apps(*names: str) -> AsyncIterator[dict[str, RecordingUpstream]]:
    async with contextlib.AsyncExitStack() as stack:
        yield {n: await stack.enter_async_context(RecordingUpstream(n)) for n in names}


def metric(text: str, name: str, cluster_part: str) -> float:
    """The sum of the Prometheus series ``name{...}`` whose labels contain ``cluster_part``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and cluster_part in line:
            total += float(line.rsplit(" ", 1)[1])
    return total
