"""``pillion traces``: the recent traces of the control server's OTLP receiver, as trees.

Reads ``/debug/traces`` from the debug port (``pillion control --otlp-port``)
and prints each trace as an indented tree of spans: service, kind, name,
duration and status (with the HTTP status code when there is one). A span
whose parent was not received is shown as a root.
"""

from __future__ import annotations

import sys
import urllib.error
from collections.abc import Iterable, Mapping
from typing import Any

from control.status import fetch


def _walk(span: Mapping[str, Any], depth: int, children: Mapping[str, list[Mapping[str, Any]]],
          out: list[str]) -> None:
    code = span.get("attributes", {}).get("http.response.status_code")
    status = span.get("status", "UNSET") + (f" {code}" if code is not None else "")
    out.append(f"{'  ' * (depth + 1)}{span.get('service', '?')} {span.get('kind', '')} "
               f"{span.get('name', '')} {span.get('duration_ms', 0.0):.2f}ms {status}")
    for child in children.get(span["span_id"], []):
        _walk(child, depth + 1, children, out)


def format_traces(traces: Iterable[Mapping[str, Any]], limit: int = 10) -> str:
    out: list[str] = []
    for n, trace in enumerate(traces):
        if n >= limit:
            break
        spans = list(trace.get("spans", []))
        out.append(f"trace {trace.get('trace_id', '?')} ({len(spans)} spans)")
        ids = {s["span_id"] for s in spans}
        children: dict[str, list[Mapping[str, Any]]] = {}
        roots: list[Mapping[str, Any]] = []
        for s in spans:
            parent = s.get("parent_span_id", "")
            if parent and parent in ids:
                children.setdefault(parent, []).append(s)
            else:
                roots.append(s)
        for root in roots:
            _walk(root, 0, children, out)
    return "\n".join(out) if out else "no traces received yet"


def traces_main(server: str, limit: int = 10) -> int:
    try:
        doc = fetch(server, "/debug/traces")
    except (OSError, urllib.error.URLError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"pillion traces: cannot reach {server}: {reason}", file=sys.stderr)
        return 1
    if not isinstance(doc, dict) or "traces" not in doc:
        print(f"pillion traces: {server} has no trace receiver (start it with --otlp-port)", file=sys.stderr)
        return 1
    print(format_traces(doc["traces"], limit))
    return 0
