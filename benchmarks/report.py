"""Turn the macro benchmark's raw results into headline metrics, ratios, a table and a chart.

The raw results (one dict per target, one sub-dict per scenario) stay in the JSON as
they were measured; this module only reads them. A metric is ``None`` when its scenario
failed or the target was not available, and every ratio that needs it is ``None`` too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TARGETS = ("direct", "pillion", "envoy")
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    label: str
    unit: str
    decimals: int
    higher_is_better: bool
    proxy_only: bool = False  # no meaningful value for "direct"


METRICS = (
    Metric("http_rps", "HTTP/1.1 keep-alive", "req/s", 0, True),
    Metric("p50_us", "latency p50 @ fixed rate", "us", 0, False),
    Metric("p99_us", "latency p99 @ fixed rate", "us", 0, False),
    Metric("added_p50_us", "added latency p50", "us", 0, False, proxy_only=True),
    Metric("added_p99_us", "added latency p99", "us", 0, False, proxy_only=True),
    Metric("tcp_rr_per_s", "TCP ping-pong", "round trips/s", 0, True),
    Metric("tcp_mb_per_s", "TCP bulk, one connection", "MB/s", 0, True),
    Metric("cpu_s_per_1k", "proxy CPU per 1000 req", "CPU-s", 4, False, proxy_only=True),
    Metric("upstream_cpu_s_per_1k", "upstream CPU per 1000 req", "CPU-s", 4, False),
    Metric("peak_rss_mib", "proxy peak RSS", "MiB", 1, False, proxy_only=True),
    Metric("idle_rss_mib", "proxy idle RSS", "MiB", 1, False, proxy_only=True),
)


def _get(d: dict | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value)):
        return float(value)
    return None


def headline(target: dict) -> dict[str, float | None]:
    """The table's numbers for one target, from its raw scenario results."""
    if not target.get("available"):
        return {m.key: None for m in METRICS}
    wrk = target.get("http_rps") or {}
    resources = target.get("resources") or {}
    peak = _number(resources.get("peak_rss_bytes"))
    idle = _number(resources.get("idle_rss_bytes"))
    return {
        "http_rps": _number(wrk.get("requests_per_s")) if "error" not in wrk else None,
        "p50_us": _number(_get(target, "latency", "p50_us")),
        "p99_us": _number(_get(target, "latency", "p99_us")),
        "added_p50_us": None,
        "added_p99_us": None,
        "tcp_rr_per_s": _number(_get(target, "tcp_rr", "round_trips_per_s")),
        "tcp_mb_per_s": _number(_get(target, "tcp_bulk", "mb_per_s")),
        "cpu_s_per_1k": _number(resources.get("cpu_s_per_1k")),
        "upstream_cpu_s_per_1k": _number(resources.get("upstream_cpu_s_per_1k")),
        "peak_rss_mib": peak / MIB if peak is not None else None,
        "idle_rss_mib": idle / MIB if idle is not None else None,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def summarize(targets: dict[str, dict]) -> dict[str, Any]:
    """``{"metrics": {target: {key: value}}, "ratios": {"pillion/envoy": ..., ...}}``."""
    metrics = {name: headline(targets.get(name, {})) for name in TARGETS}
    base = metrics["direct"]
    for name in ("pillion", "envoy"):
        for pct in ("p50", "p99"):
            mine, direct = metrics[name][f"{pct}_us"], base[f"{pct}_us"]
            if mine is not None and direct is not None:
                metrics[name][f"added_{pct}_us"] = mine - direct
    ratios = {
        "pillion/envoy": {m.key: _ratio(metrics["pillion"][m.key], metrics["envoy"][m.key])
                          for m in METRICS},
        "pillion/direct": {m.key: None if m.proxy_only
                           else _ratio(metrics["pillion"][m.key], base[m.key])
                           for m in METRICS},
    }
    return {"metrics": metrics, "ratios": ratios}


def _fmt(value: float | None, decimals: int) -> str:
    if value is None:
        return "-"
    return f"{value:,.{decimals}f}"


def format_table(summary: dict[str, Any], targets: dict[str, dict]) -> str:
    """A fixed-width table: one row per metric, absolute numbers then the two ratios."""
    head = ["metric", "unit", *TARGETS, "pillion/envoy", "pillion/direct"]
    rows = [head]
    for m in METRICS:
        row = [m.label, m.unit]
        for name in TARGETS:
            available = targets.get(name, {}).get("available")
            if name == "direct" and m.proxy_only:
                row.append("-")
            elif not available:
                row.append("n/a")
            else:
                row.append(_fmt(summary["metrics"][name][m.key], m.decimals))
        for pair in ("pillion/envoy", "pillion/direct"):
            ratio = summary["ratios"][pair][m.key]
            row.append("-" if ratio is None else f"{ratio:.2f}x")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(row[2:], widths[2:], strict=True)]
        lines.append("  ".join(cells))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = []
    for name in TARGETS:
        target = targets.get(name, {})
        if not target:
            notes.append(f"{name}: not run")
        elif not target.get("available"):
            first = str(target.get("error", "unknown error")).splitlines()[0]
            notes.append(f"{name}: not available: {first}")
        for scenario in ("http_rps", "latency", "tcp_rr", "tcp_bulk"):
            error = _get(target, scenario, "error")
            if error:
                notes.append(f"{name} {scenario}: {str(error).splitlines()[0]}")
        source = _get(target, "info", "config_source")
        if source:
            notes.append(f"{name} config: {source}")
    return "\n".join(lines + (["", *notes] if notes else []))


def write_chart(summary: dict[str, Any], targets: dict[str, dict], path: Path,
                title: str) -> None:
    """One small bar chart per metric, the three targets side by side (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"direct": "#7f7f7f", "pillion": "#1f77b4", "envoy": "#ff7f0e"}
    cols = 4
    rows = math.ceil(len(METRICS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows))
    flat = list(axes.flat)
    for ax, m in zip(flat, METRICS, strict=False):
        names = [n for n in TARGETS if not (m.proxy_only and n == "direct")]
        values = [summary["metrics"][n][m.key] for n in names]
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(names, heights, color=[colors[n] for n in names])
        for bar, value in zip(bars, values, strict=True):
            text = "n/a" if value is None else _fmt(value, m.decimals)
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        arrow = "higher is better" if m.higher_is_better else "lower is better"
        ax.set_title(f"{m.label}\n{m.unit}, {arrow}", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.margins(y=0.15)
    for ax in flat[len(METRICS):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
