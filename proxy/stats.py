"""Counters and histograms, bumped on the hot path, rendered only on scrape.

Hot-path cost is attribute and dict increments on objects pre-bound per
cluster and listener (STYLE.md 2.3). ``export()`` turns a worker's numbers
into plain nested dicts (they cross process boundaries with ``--concurrency``);
``merge()`` sums several exports; ``render_prometheus()`` writes the text
exposition with Istio's metric and label names. No I/O here.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Mapping
from typing import Any

# Istio's default bucket boundaries.
DURATION_BUCKETS_MS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000, 3600000)
SIZE_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000, 1000000000)


class _Histogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def export(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum": self.sum}


class RequestClass:
    """Numbers for one (response code, response flags, mTLS, peer identity) class of one cluster."""

    __slots__ = ("count", "duration", "request_size", "response_size")

    def __init__(self) -> None:
        self.count = 0
        self.duration = _Histogram(DURATION_BUCKETS_MS)
        self.request_size = _Histogram(SIZE_BUCKETS)
        self.response_size = _Histogram(SIZE_BUCKETS)


class ClusterStats:
    """Everything counted about one upstream cluster in one worker."""

    __slots__ = (
        "classes",
        "cx_active",
        "cx_connect_fail",
        "cx_connect_timeout",
        # [traffic] retries, circuit breakers, outlier detection, faults, mirrors
        "cx_connecting",
        "cx_overflow",
        "cx_total",
        "direction",
        "ejected",
        "ejections_active",
        "ejections_total",
        "fault_aborts",
        "fault_delays",
        "name",
        "rq_active",
        "rq_mirrored",
        "rq_overflow",
        "rq_pending_active",
        "rq_pending_overflow",
        "rq_per_try_timeout",
        "rq_reset",
        "rq_retry",
        "rq_retry_overflow",
        "rq_retry_success",
        "rq_timeout",
        "rq_total",
        "service",
        "tcp_closed",
        "tcp_opened",
        "tcp_received",
        "tcp_sent",
    )

    def __init__(self, name: str, service: str, direction: str) -> None:
        self.name = name
        self.service = service
        self.direction = direction
        # (code, flags, mtls, peer identity, gRPC status or None): the peer's SPIFFE id inbound, the server's expected one
        # outbound ("" unknown). Bounded: identities are the mesh's service accounts.
        self.classes: dict[tuple[int, str, bool, str, int | None], RequestClass] = {}
        self.rq_total = 0
        self.rq_active = 0
        self.rq_timeout = 0
        self.rq_reset = 0
        self.cx_total = 0
        self.cx_active = 0
        self.cx_connect_fail = 0
        self.cx_connect_timeout = 0
        self.tcp_opened = 0
        self.tcp_closed = 0
        self.tcp_sent = 0  # bytes sent to the downstream client (Istio: response direction)
        self.tcp_received = 0  # bytes received from the downstream client
        # [traffic]
        self.cx_connecting = 0  # connections being opened (count against max_connections)
        self.cx_overflow = 0  # max_connections reached: a request had to wait (upstream_cx_overflow)
        self.rq_pending_active = 0  # requests waiting for a connection
        self.rq_pending_overflow = 0  # max_pending_requests reached: 503 UO
        self.rq_overflow = 0  # max_requests reached: 503 UO
        self.rq_retry = 0
        self.rq_retry_success = 0
        self.rq_retry_overflow = 0  # a retry the budget / max_retries refused
        self.rq_per_try_timeout = 0
        self.ejections_total = 0  # outlier_detection.ejections_enforced_total
        self.ejections_active = 0
        self.ejected: dict[str, int] = {}  # "host:port" -> 1 while outlier detection has it out
        self.fault_delays = 0
        self.fault_aborts = 0
        self.rq_mirrored = 0

    def record_request(self, code: int, flags: str, duration_ms: float, req_bytes: int, resp_bytes: int,
                       mtls: bool = False, peer: str = "", grpc: int | None = None) -> None:
        """``grpc``: the gRPC status of a gRPC request (-1: none seen), None for plain HTTP."""
        key = (code, flags, mtls, peer, grpc)
        cls = self.classes.get(key)
        if cls is None:
            cls = self.classes[key] = RequestClass()
        cls.count += 1
        cls.duration.observe(duration_ms)
        cls.request_size.observe(req_bytes)
        cls.response_size.observe(resp_bytes)

    def export(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            k: getattr(self, k)
            for k in ("rq_total", "rq_active", "rq_timeout", "rq_reset", "cx_total", "cx_active",
                      "cx_connect_fail", "cx_connect_timeout", "tcp_opened", "tcp_closed",
                      "tcp_sent", "tcp_received",
                      "cx_overflow", "rq_pending_active", "rq_pending_overflow", "rq_overflow", "rq_retry",
                      "rq_retry_success", "rq_retry_overflow", "rq_per_try_timeout", "ejections_total",
                      "ejections_active", "fault_delays", "fault_aborts", "rq_mirrored")
        }
        out["service"] = self.service
        out["direction"] = self.direction
        out["ejected"] = dict(self.ejected)
        out["classes"] = {
            f"{code}|{flags}|{int(mtls)}|{'' if grpc is None else grpc}|{peer}": {
                "count": c.count,
                "duration": c.duration.export(),
                "request_size": c.request_size.export(),
                "response_size": c.response_size.export(),
            }
            for (code, flags, mtls, peer, grpc), c in self.classes.items()
        }
        return out


class ListenerStats:
    __slots__ = ("cx_active", "cx_destroy", "cx_total", "name", "protocol_errors", "rq_total")

    def __init__(self, name: str) -> None:
        self.name = name
        self.cx_total = 0
        self.cx_active = 0
        self.cx_destroy = 0
        self.rq_total = 0
        self.protocol_errors = 0

    def export(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("cx_total", "cx_active", "cx_destroy", "rq_total", "protocol_errors")}


class StatsStore:
    """One worker's stats, keyed by name so counters survive config swaps."""

    def __init__(self) -> None:
        self.clusters: dict[str, ClusterStats] = {}
        self.listeners: dict[str, ListenerStats] = {}
        self.local_replies: dict[str, int] = {}
        self.rbac: dict[str, int] = {}  # "allowed|policy", "denied|policy", "logged|policy" -> count

    def cluster(self, name: str, service: str = "", direction: str = "outbound") -> ClusterStats:
        cs = self.clusters.get(name)
        if cs is None:
            cs = self.clusters[name] = ClusterStats(name, service, direction)
        return cs

    def listener(self, name: str) -> ListenerStats:
        ls = self.listeners.get(name)
        if ls is None:
            ls = self.listeners[name] = ListenerStats(name)
        return ls

    def count_local_reply(self, flag: str) -> None:
        self.local_replies[flag] = self.local_replies.get(flag, 0) + 1

    def count_rbac(self, outcome: str, policy: str) -> None:
        """An RBAC decision: outcome "allowed", "denied" or "logged"; policy "" when none matched."""
        key = f"{outcome}|{policy}"
        self.rbac[key] = self.rbac.get(key, 0) + 1

    def export(self) -> dict[str, Any]:
        return {
            "clusters": {n: c.export() for n, c in self.clusters.items()},
            "listeners": {n: ls.export() for n, ls in self.listeners.items()},
            "local_replies": dict(self.local_replies),
            "rbac": dict(self.rbac),
        }


def merge(exports: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum several workers' exports; strings (labels) are taken from the first."""
    out: dict[str, Any] = {}
    for e in exports:
        _merge_into(out, e)
    return out


def _merge_into(dst: dict[str, Any], src: Mapping[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, Mapping):
            _merge_into(dst.setdefault(k, {}), v)
        elif isinstance(v, list):
            cur = dst.get(k)
            dst[k] = list(v) if cur is None else [a + b for a, b in zip(cur, v, strict=True)]
        elif isinstance(v, str):
            dst.setdefault(k, v)
        else:
            dst[k] = dst.get(k, 0) + v


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in pairs) + "}"


def _fmt(v: float) -> str:
    if isinstance(v, float) and not v.is_integer():
        return repr(v)
    return str(int(v))


def render_prometheus(merged: Mapping[str, Any], node: Mapping[str, str], extra: Mapping[str, float] | None = None) -> str:
    """Prometheus text exposition (version 0.0.4) of a merged export.

    ``node`` gives the reporting workload: keys ``workload``, ``namespace``.
    """
    workload = node.get("workload", "unknown") or "unknown"
    namespace = node.get("namespace", "unknown") or "unknown"
    lines: list[str] = []
    clusters: Mapping[str, Any] = merged.get("clusters", {})

    app = node.get("app", "") or "unknown"
    version = node.get("version", "") or "unknown"

    def istio_base(cname: str, c: Mapping[str, Any]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """The labels of a cluster before and after the principals (Istio's label order)."""
        inbound = c.get("direction") == "inbound"
        service = c.get("service") or "unknown"
        svc_name, _, rest = service.partition(".")
        svc_ns = rest.split(".", 1)[0] if rest else "unknown"
        if inbound:
            src = ("unknown", "unknown", "unknown", "unknown")
            dst = (workload, namespace, app, version)
        else:
            src = (workload, namespace, app, version)
            dst = ("unknown", svc_ns, "unknown", "unknown")
        return [
            ("reporter", "destination" if inbound else "source"),
            ("source_workload", src[0]),
            ("source_workload_namespace", src[1]),
        ], [
            ("source_app", src[2]),
            ("source_version", src[3]),
            ("destination_workload", dst[0]),
            ("destination_workload_namespace", dst[1]),
            ("destination_app", dst[2]),
            ("destination_version", dst[3]),
            ("destination_service", service),
            ("destination_service_name", svc_name or "unknown"),
            ("destination_service_namespace", svc_ns),
            ("destination_cluster", cname),
        ]

    def request_labels(cname: str, c: Mapping[str, Any], key: str, with_policy: bool) -> list[tuple[str, str]]:
        """Labels of one request class: key "code|flags|mtls|grpc status|peer" (peer last: it may be long)."""
        head, tail = istio_base(cname, c)
        code, flags, mtls, grpc, peer = [*key.split("|", 4), "0", "", ""][:5]
        inbound = c.get("direction") == "inbound"
        # inbound: peer = the client's SPIFFE id; outbound: the server's expected identity
        src_p, dst_p = (peer or "unknown", "unknown") if inbound else ("unknown", peer or "unknown")
        lab = [*head, ("source_principal", src_p), *tail[:6], ("destination_principal", dst_p), *tail[6:],
               ("request_protocol", "grpc" if grpc else "http"), ("response_code", code),
               ("response_flags", flags or "-")]
        if with_policy:
            lab.append(("connection_security_policy", "mutual_tls" if inbound and mtls == "1" else "none"))
        lab.append(("grpc_response_status", grpc if grpc and grpc != "-1" else ""))
        return lab

    def family(name: str, kind: str, help_: str) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")

    # --- Istio standard HTTP metrics
    family("istio_requests_total", "counter", "Requests handled, by response code and flags.")
    for cname, c in sorted(clusters.items()):
        for key, cls in sorted(c.get("classes", {}).items()):
            lines.append(f"istio_requests_total{_labels(request_labels(cname, c, key, True))} {cls['count']}")
    for metric, field, bounds in (
        ("istio_request_duration_milliseconds", "duration", DURATION_BUCKETS_MS),
        ("istio_request_bytes", "request_size", SIZE_BUCKETS),
        ("istio_response_bytes", "response_size", SIZE_BUCKETS),
    ):
        family(metric, "histogram", f"{metric.replace('_', ' ')} of requests.")
        for cname, c in sorted(clusters.items()):
            for key, cls in sorted(c.get("classes", {}).items()):
                lab = request_labels(cname, c, key, True)
                h = cls[field]
                acc = 0
                for bound, n in zip((*bounds, float("inf")), h["counts"], strict=True):
                    acc += n
                    le = "+Inf" if bound == float("inf") else _fmt(bound)
                    lines.append(f"{metric}_bucket{_labels([*lab, ('le', le)])} {acc}")
                lines.append(f"{metric}_sum{_labels(lab)} {_fmt(h['sum'])}")
                lines.append(f"{metric}_count{_labels(lab)} {acc}")

    # --- Istio standard TCP metrics
    for metric, field, help_ in (
        ("istio_tcp_sent_bytes_total", "tcp_sent", "Bytes sent to the downstream during TCP connections."),
        ("istio_tcp_received_bytes_total", "tcp_received", "Bytes received from the downstream during TCP connections."),
        ("istio_tcp_connections_opened_total", "tcp_opened", "TCP connections opened."),
        ("istio_tcp_connections_closed_total", "tcp_closed", "TCP connections closed."),
    ):
        family(metric, "counter", help_)
        for cname, c in sorted(clusters.items()):
            if c.get("tcp_opened"):
                head, tail = istio_base(cname, c)
                lab = [*head, ("source_principal", "unknown"), *tail[:6], ("destination_principal", "unknown"),
                       *tail[6:], ("request_protocol", "tcp"), ("response_flags", "-"),
                       ("connection_security_policy", "none")]
                lines.append(f"{metric}{_labels(lab)} {c.get(field, 0)}")

    # --- Envoy-style internals, per cluster and listener
    for metric, field, kind in (
        ("envoy_cluster_upstream_rq_total", "rq_total", "counter"),
        ("envoy_cluster_upstream_rq_active", "rq_active", "gauge"),
        ("envoy_cluster_upstream_rq_timeout", "rq_timeout", "counter"),
        ("envoy_cluster_upstream_rq_rx_reset", "rq_reset", "counter"),
        ("envoy_cluster_upstream_cx_total", "cx_total", "counter"),
        ("envoy_cluster_upstream_cx_active", "cx_active", "gauge"),
        ("envoy_cluster_upstream_cx_connect_fail", "cx_connect_fail", "counter"),
        ("envoy_cluster_upstream_cx_connect_timeout", "cx_connect_timeout", "counter"),
        ("envoy_cluster_upstream_cx_overflow", "cx_overflow", "counter"),
        ("envoy_cluster_upstream_rq_pending_active", "rq_pending_active", "gauge"),
        ("envoy_cluster_upstream_rq_pending_overflow", "rq_pending_overflow", "counter"),
        ("envoy_cluster_upstream_rq_overflow", "rq_overflow", "counter"),
        ("envoy_cluster_upstream_rq_retry", "rq_retry", "counter"),
        ("envoy_cluster_upstream_rq_retry_success", "rq_retry_success", "counter"),
        ("envoy_cluster_upstream_rq_retry_overflow", "rq_retry_overflow", "counter"),
        ("envoy_cluster_upstream_rq_per_try_timeout", "rq_per_try_timeout", "counter"),
        ("envoy_cluster_outlier_detection_ejections_enforced_total", "ejections_total", "counter"),
        ("envoy_cluster_outlier_detection_ejections_active", "ejections_active", "gauge"),
        ("envoy_cluster_fault_delays_injected", "fault_delays", "counter"),
        ("envoy_cluster_fault_aborts_injected", "fault_aborts", "counter"),
        ("envoy_cluster_upstream_rq_mirrored", "rq_mirrored", "counter"),
    ):
        family(metric, kind, f"Envoy-compatible cluster statistic {field}.")
        for cname, c in sorted(clusters.items()):
            lines.append(f"{metric}{_labels([('envoy_cluster_name', cname)])} {c.get(field, 0)}")
    listeners: Mapping[str, Any] = merged.get("listeners", {})
    for metric, field, kind in (
        ("envoy_listener_downstream_cx_total", "cx_total", "counter"),
        ("envoy_listener_downstream_cx_active", "cx_active", "gauge"),
        ("envoy_listener_downstream_cx_destroy", "cx_destroy", "counter"),
        ("envoy_listener_downstream_rq_total", "rq_total", "counter"),
        ("envoy_listener_downstream_protocol_error", "protocol_errors", "counter"),
    ):
        family(metric, kind, f"Envoy-compatible listener statistic {field}.")
        for lname, ls in sorted(listeners.items()):
            lines.append(f"{metric}{_labels([('envoy_listener_name', lname)])} {ls.get(field, 0)}")
    family("pillion_local_replies_total", "counter", "Local replies sent, by response flag.")
    for flag, n in sorted(merged.get("local_replies", {}).items()):
        lines.append(f"pillion_local_replies_total{_labels([('response_flags', flag or '-')])} {n}")
    rbac: Mapping[str, int] = merged.get("rbac", {})
    for outcome, help_ in (("allowed", "Requests and connections an ALLOW policy matched"),
                           ("denied", "Requests and connections refused by RBAC, by the DENY policy that "
                                      "matched (policy=\"none\": no ALLOW policy matched)"),
                           ("logged", "Requests and connections an AUDIT policy matched")):
        family(f"pillion_rbac_{outcome}_total", "counter", help_ + ".")
        for key, n in sorted(rbac.items()):
            kind, _, policy = key.partition("|")
            if kind == outcome:
                lines.append(f"pillion_rbac_{outcome}_total{_labels([('policy', policy or 'none')])} {n}")
    # [accesslog] access log records dropped because a worker's queue was full
    family("pillion_access_log_dropped_total", "counter", "Access log records dropped (queue full).")
    lines.append(f"pillion_access_log_dropped_total {merged.get('access_log_dropped', 0)}")
    family("pillion_tls_handshake_failures_total", "counter", "TLS connections refused or failed, by reason.")
    for reason, n in sorted(merged.get("tls_failures", {}).items()):
        lines.append(f"pillion_tls_handshake_failures_total{_labels([('reason', reason)])} {n}")
    # [tracing] spans the exporter could not deliver (queue full, collector down or slow)
    spans: Mapping[str, int] = merged.get("spans", {})
    family("pillion_spans_dropped_total", "counter", "Spans dropped, by reason.")
    for reason in ("queue_full", "export"):
        lines.append(f"pillion_spans_dropped_total{_labels([('reason', reason)])} {spans.get('dropped_' + reason, 0)}")
    family("pillion_spans_exported_total", "counter", "Spans accepted by the collector.")
    lines.append(f"pillion_spans_exported_total {spans.get('exported', 0)}")
    # [tracing] end
    for name, value in sorted((extra or {}).items()):
        family(name, "gauge", name.replace("_", " ") + ".")
        lines.append(f"{name} {_fmt(value)}")
    return "\n".join(lines) + "\n"
