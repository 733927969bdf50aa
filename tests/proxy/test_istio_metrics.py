"""Istio's standard metric labels: mTLS, principals, apps and versions, rendered at scrape time."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.stats import StatsStore, render_prometheus
from tests.helpers.net import RawClient, free_port, standalone_proxy
from tests.helpers.pki import MeshPki
from tests.helpers.upstreams import RecordingUpstream
from tests.proxy.test_mesh_and_timeouts import two_sidecar_mesh
from tests.proxy.test_mtls_runtime import (
    PRODUCTPAGE_ID,
    REVIEWS_ID,
    TD,
    make_inbound_tls,
    make_outbound_mtls,
)


def _samples(text: str, name: str) -> list[dict[str, str]]:
    """Parse the whole exposition with prometheus_client (it must parse) and return ``name``'s label sets."""
    out = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out.append({**s.labels, "__value__": f"{float(s.value):g}"})
    return out


def test_request_classes_render_principals_and_policy() -> None:
    store = StatsStore()
    inbound = store.cluster("inbound|9080||", "reviews.default.svc.cluster.local", "inbound")
    inbound.record_request(200, "", 1.0, 0, 10, True, PRODUCTPAGE_ID)
    inbound.record_request(200, "", 1.0, 0, 10, True, PRODUCTPAGE_ID)
    inbound.record_request(200, "", 1.0, 0, 10)
    outbound = store.cluster("outbound|9080||reviews", "reviews.default.svc.cluster.local", "outbound")
    outbound.record_request(503, "UF", 1.0, 0, 10, True, REVIEWS_ID)
    text = render_prometheus(store.export(), {"workload": "reviews", "namespace": "default", "app": "reviews",
                                              "version": "v2"})
    rows = _samples(text, "istio_requests_total")
    mtls = next(r for r in rows if r["connection_security_policy"] == "mutual_tls")
    assert mtls["__value__"] == "2" and mtls["source_principal"] == PRODUCTPAGE_ID
    assert (mtls["reporter"], mtls["destination_app"], mtls["destination_version"]) == ("destination", "reviews", "v2")
    assert mtls["destination_principal"] == "unknown" and mtls["grpc_response_status"] == ""
    assert mtls["request_protocol"] == "http" and mtls["source_app"] == "unknown"
    plain = next(r for r in rows if r["reporter"] == "destination" and r["connection_security_policy"] == "none")
    assert plain["source_principal"] == "unknown" and plain["__value__"] == "1"
    out = next(r for r in rows if r["reporter"] == "source")
    assert (out["destination_principal"], out["source_app"], out["source_version"]) == (REVIEWS_ID, "reviews", "v2")
    assert (out["response_code"], out["response_flags"], out["connection_security_policy"]) == ("503", "UF", "none")
    counts = _samples(text, "istio_request_duration_milliseconds_count")
    assert sorted(r["__value__"] for r in counts) == ["1", "1", "2"]
    assert _samples(text, "pillion_access_log_dropped_total") == [{"__value__": "0"}]


@pytest.fixture
def pki() -> MeshPki:
    return MeshPki(TD)


async def test_sidecar_to_sidecar_mtls_labels(tmp_path: Path, pki: MeshPki) -> None:
    async with RecordingUpstream("reviews-app") as app:
        egress, ingress = free_port(), free_port()
        (tmp_path / "cfg").mkdir()
        (tmp_path / "cfg" / "mesh.yaml").write_text(two_sidecar_mesh(egress, ingress, app.port))
        rv_certs = pki.issue(tmp_path / "reviews-certs", "default", "reviews")
        pp_certs = pki.issue(tmp_path / "pp-certs", "default", "productpage")
        async with standalone_proxy(tmp_path / "cfg", labels={"app": "reviews", "version": "v1"},
                                    cert_dir=rv_certs) as rv, \
                standalone_proxy(tmp_path / "cfg", labels={"app": "productpage", "version": "v3"},
                                 cert_dir=pp_certs) as pp:
            await make_inbound_tls(rv, plaintext=False)
            await make_outbound_mtls(pp)
            c = await RawClient.connect(egress)
            for i in range(3):
                r = await c.request("GET", f"/r/{i}", "reviews.default.svc.cluster.local")
                assert r.status == 200
            await c.close()
            _, text = await rv.admin_get("/stats/prometheus")
            (row,) = [r for r in _samples(text.decode(), "istio_requests_total") if r["reporter"] == "destination"]
            assert row["connection_security_policy"] == "mutual_tls" and row["source_principal"] == PRODUCTPAGE_ID
            assert (row["destination_app"], row["destination_version"], row["__value__"]) == ("reviews", "v1", "3")
            _, text = await pp.admin_get("/stats/prometheus")
            (row,) = [r for r in _samples(text.decode(), "istio_requests_total") if r["reporter"] == "source"]
            assert row["destination_principal"] == REVIEWS_ID and row["source_principal"] == "unknown"
            assert (row["source_app"], row["source_version"], row["__value__"]) == ("productpage", "v3", "3")
