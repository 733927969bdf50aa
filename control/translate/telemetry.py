"""The `Telemetry` kind (telemetry.istio.io v1 / v1alpha1): tracing and access logging per workload.

Owns: reading MeshConfig's `extensionProviders` into the providers a
Telemetry may name (`mesh_telemetry`), building and checking Telemetry
resources (`build_telemetries`), and merging them into one node's effective
settings (`node_telemetry`), which `tracing.py` and `accesslog.py` turn into
HCM `tracing` and HCM / tcp_proxy `access_log`.

Semantics (Istio's, where Pillion has them):
- levels, broad to specific: MeshConfig; the root namespace's Telemetry
  without selector; the workload's namespace's Telemetry without selector;
  the Telemetry of that namespace whose `selector.matchLabels` match the
  workload. Each level's fields override the broader level's one field at a
  time (a namespace setting only `randomSamplingPercentage` keeps the mesh's
  provider), separately for outbound (CLIENT) and inbound (SERVER) listeners
  as `match.mode` says.
- Two resources at one level for one workload: Istio keeps the oldest; Pillion
  has no creation time and refuses, naming both.
- An entry that turns tracing or logging on must have a provider, its own or
  an inherited one; the mesh's are `defaultProviders.tracing` and, for access
  logs, the built-in "envoy" when `accessLogFile` is set.

Refused (not supported yet): targetRef(s), tracing customTags and
useRequestIdForTraceSampling false, accessLogging filter, non-empty metrics,
several providers in one entry, custom access log formats.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from control.translate.accesslog import JSON_FORMAT
from control.translate.errors import Problem
from control.translate.model import ConfigSet, NodeInfo, frozen_map, labels_match
from control.translate.model_telemetry import (
    DEFAULT_LOG_PATH,
    DIRECTIONS,
    ENVOY_PROVIDER,
    MODES,
    AccessLogRule,
    FileLogProvider,
    MeshTelemetry,
    NodeTelemetry,
    OtelProvider,
    Telemetry,
    Trace,
    TracingRule,
)

if TYPE_CHECKING:
    from control.translate.istio import Build, Entry, Session
    from control.translate.model import MeshConfig

Report = Callable[[str, str], None]
_SIDE = {"outbound": "CLIENT (outbound)", "inbound": "SERVER (inbound)"}
_CUSTOM_FORMAT = ("custom access log formats are not supported yet; omit logFormat for Envoy's default "
                  "TEXT line or set labels: {} for the default JSON fields")


# --- MeshConfig ----------------------------------------------------------------


def mesh_telemetry(spec: dict[str, Any], report: Report) -> MeshTelemetry:
    """The providers of a MeshConfig spec (plus the built-in "envoy") and its default sampling."""
    providers: dict[str, OtelProvider | FileLogProvider] = {}
    for i, raw in enumerate(spec.get("extensionProviders", [])):
        path = f"spec.extensionProviders[{i}]"
        name = raw["name"]
        if name in providers:
            report(f"{path}.name", f"provider name {name!r} is listed twice")
            continue
        kinds = [kind for kind in ("opentelemetry", "envoyFileAccessLog") if kind in raw]
        if len(kinds) != 1:
            report(path, "set exactly one provider kind: opentelemetry or envoyFileAccessLog")
        elif kinds[0] == "opentelemetry":
            otel = raw["opentelemetry"]
            providers[name] = OtelProvider(name, otel["service"], int(otel["port"]))
        else:
            found = _file_provider(name, raw["envoyFileAccessLog"], f"{path}.envoyFileAccessLog", report)
            if found is not None:
                providers[name] = found
    # Istio's built-in "envoy" logger writes MeshConfig's accessLogFile (stdout when unset).
    providers.setdefault(ENVOY_PROVIDER, FileLogProvider(
        ENVOY_PROVIDER, spec.get("accessLogFile") or DEFAULT_LOG_PATH, spec.get("accessLogEncoding", "TEXT")))
    sampling = float(spec.get("defaultConfig", {}).get("tracing", {}).get("sampling", 1.0))
    return MeshTelemetry(frozen_map(providers), sampling)


def _file_provider(name: str, raw: dict[str, Any], path: str, report: Report) -> FileLogProvider | None:
    log_format = raw.get("logFormat", {})
    encoding = "TEXT"
    if "text" in log_format:
        report(f"{path}.logFormat.text", _CUSTOM_FORMAT)
        return None
    if "labels" in log_format:
        labels = log_format["labels"]
        if labels and labels != JSON_FORMAT:
            report(f"{path}.logFormat.labels", "custom JSON fields are not supported yet; set labels: {} "
                   "for the default JSON fields")
            return None
        encoding = "JSON"
    return FileLogProvider(name, raw.get("path") or DEFAULT_LOG_PATH, encoding)


# --- building ----------------------------------------------------------------------


def build_telemetries(session: Session, entries: list[Entry], mesh: MeshConfig, mesh_ok: bool) -> list[Telemetry]:
    """The Telemetry resources of `entries` (valid ones, in file order); problems go to `session`.

    `mesh_ok` is false when the MeshConfig was wrong: a provider it failed to
    declare is then not reported again.
    """
    root = mesh.root_namespace
    built: list[tuple[Entry, Telemetry]] = []
    wide: dict[str, Telemetry] = {}  # namespace -> its Telemetry without selector
    failed = False
    for entry in entries:
        b = session.builder(entry)
        found = _telemetry(entry, b, mesh.telemetry, mesh_ok)
        other = wide.get(entry.namespace) if found is not None and found.selector is None else None
        if other is not None:
            where = f"the whole mesh (root namespace {root})" if entry.namespace == root else \
                f"every workload in namespace {entry.namespace}"
            b("spec.selector", f"{other.meta.resource} already applies to {where}; only one Telemetry without "
              "selector is allowed per namespace (Istio would keep the oldest, Pillion has no creation time)")
        if found is None or b.failed:
            failed = True
            continue
        if found.selector is None:
            wide[entry.namespace] = found
        built.append((entry, found))
    if not failed and mesh_ok:  # otherwise a missing inherited provider may only echo another mistake
        for entry, found in built:
            _check_inherited(session.builder(entry), found, _broader(found, wide, root), mesh)
    return [found for _, found in built]


def _telemetry(entry: Entry, b: Build, mt: MeshTelemetry, mesh_ok: bool) -> Telemetry | None:
    spec = entry.spec
    labels = spec.get("selector", {}).get("matchLabels")
    if spec.get("metrics"):
        b("spec.metrics", "not supported yet: Pillion always exports Istio's standard metrics; "
          "leave metrics out (or empty)")
    tracing: list[TracingRule] = []
    taken: dict[str, str] = {}
    for i, raw in enumerate(spec.get("tracing", [])):
        path = f"spec.tracing[{i}]"
        if raw.get("useRequestIdForTraceSampling") is False:
            b(f"{path}.useRequestIdForTraceSampling", "false is not supported yet (only the default, true)")
        provider = _provider(raw, path, OtelProvider, "opentelemetry", mt, mesh_ok, b)
        sampling = raw.get("randomSamplingPercentage")
        tracing.append(TracingRule(path, _directions(raw, path, taken, b), provider,
                                   None if sampling is None else float(sampling), raw.get("disableSpanReporting")))
    logging: list[AccessLogRule] = []
    taken = {}
    for i, raw in enumerate(spec.get("accessLogging", [])):
        path = f"spec.accessLogging[{i}]"
        provider = _provider(raw, path, FileLogProvider, "envoyFileAccessLog", mt, mesh_ok, b)
        logging.append(AccessLogRule(path, _directions(raw, path, taken, b), provider, raw.get("disabled")))
    if b.failed:
        return None
    return Telemetry(entry.meta(), frozen_map(labels) if labels else None, tuple(tracing), tuple(logging))


def _directions(raw: dict[str, Any], path: str, taken: dict[str, str], b: Build) -> tuple[str, ...]:
    """The directions `raw` covers; an earlier entry of the same list covering one is a problem."""
    directions = MODES[raw.get("match", {}).get("mode", "CLIENT_AND_SERVER")]
    for direction in directions:
        if direction in taken:
            b(f"{path}.match", f"{taken[direction]} already applies to {_SIDE[direction]} traffic; "
              "one entry per direction is supported (set match.mode to CLIENT or SERVER)")
        taken[direction] = path
    return directions


def _provider(raw: dict[str, Any], path: str, cls: type[Any], kind: str, mt: MeshTelemetry, mesh_ok: bool,
              b: Build) -> Any:
    """The MeshConfig provider `raw.providers` names (None when it names none or is wrong)."""
    names = raw.get("providers", [])
    if not names:
        return None
    if len(names) > 1:
        b(f"{path}.providers", "only one provider per entry is supported yet")
        return None
    name = names[0]["name"]
    found = mt.providers.get(name)
    if found is None:
        if mesh_ok:
            b(f"{path}.providers[0].name", f"no MeshConfig extensionProviders entry is named {name!r}")
        else:
            b.fail_quietly()
        return None
    if not isinstance(found, cls):
        builtin = f" or the built-in {ENVOY_PROVIDER!r}" if cls is FileLogProvider else ""
        b(f"{path}.providers[0].name", f"provider {name!r} is not an {kind} provider (this field takes "
          f"{kind} providers{builtin} only)")
        return None
    return found


def _broader(t: Telemetry, wide: Mapping[str, Telemetry], root: str) -> list[Telemetry]:
    """The Telemetry levels `t` inherits from, most specific first (MeshConfig not included)."""
    owners = [t.meta.namespace] if t.selector is not None else []
    if t.meta.namespace != root or t.selector is not None:
        owners.append(root)
    levels = [wide[ns] for ns in dict.fromkeys(owners) if ns in wide]
    return [level for level in levels if level is not t]


def _check_inherited(b: Build, t: Telemetry, broader: list[Telemetry], mesh: MeshConfig) -> None:
    """Every entry that turns tracing or logging on needs a provider, its own or inherited."""
    for rule in t.tracing:
        if rule.provider is not None or rule.disabled:
            continue
        for direction in rule.directions:
            inherited = any((r := level.tracing_for(direction)) is not None and r.provider is not None
                            for level in broader)
            if not inherited and mesh.tracing is None:
                b(f"{rule.path}.providers", f"no tracing provider applies to {_SIDE[direction]} traffic: name "
                  "an opentelemetry extension provider here, in a broader Telemetry or in MeshConfig "
                  "defaultProviders.tracing")
                break
    for log_rule in t.access_logging:
        if log_rule.provider is not None or log_rule.disabled:
            continue
        for direction in log_rule.directions:
            inherited = any((r2 := level.access_logging_for(direction)) is not None and r2.provider is not None
                            for level in broader)
            if not inherited and not mesh.access_log_file:
                b(f"{log_rule.path}.providers", f"no access log provider applies to {_SIDE[direction]} traffic: "
                  f"name one here (an envoyFileAccessLog extension provider or {ENVOY_PROVIDER!r}), in a "
                  "broader Telemetry, or set MeshConfig accessLogFile")
                break


# --- one node -----------------------------------------------------------------------


def node_telemetry(config: ConfigSet, node: NodeInfo, problems: list[Problem]) -> NodeTelemetry:
    """The node's tracing and access logging per direction, all levels merged field by field."""
    mesh = config.mesh
    levels = _levels(config, node, problems)
    tracing: dict[str, Trace | None] = {}
    logs: dict[str, FileLogProvider | None] = {}
    for direction in DIRECTIONS:
        tr = mesh.tracing
        provider = OtelProvider(tr.provider, tr.service, tr.port) if tr is not None else None
        sampling, off = mesh.telemetry.sampling, False
        log = FileLogProvider(ENVOY_PROVIDER, mesh.access_log_file, mesh.access_log_encoding) \
            if mesh.access_log_file else None
        log_off = False
        for level in levels:
            rule = level.tracing_for(direction)
            if rule is not None:
                provider = rule.provider or provider
                sampling = rule.sampling if rule.sampling is not None else sampling
                off = rule.disabled if rule.disabled is not None else off
            log_rule = level.access_logging_for(direction)
            if log_rule is not None:
                log = log_rule.provider or log
                log_off = log_rule.disabled if log_rule.disabled is not None else log_off
        tracing[direction] = Trace(provider, sampling) if provider is not None and not off else None
        logs[direction] = None if log_off else log
    return NodeTelemetry(frozen_map(tracing), frozen_map(logs))


def _levels(config: ConfigSet, node: NodeInfo, problems: list[Problem]) -> list[Telemetry]:
    """The Telemetry resources that apply to `node`, broadest first."""
    root = config.mesh.root_namespace
    wide: dict[str, Telemetry] = {}
    selecting: list[Telemetry] = []
    for t in config.telemetries:  # sorted by (namespace, name)
        if t.selector is None:
            wide.setdefault(t.meta.namespace, t)
        elif t.meta.namespace == node.namespace and labels_match(t.selector, node.labels):
            selecting.append(t)
    levels = [wide[ns] for ns in dict.fromkeys((root, node.namespace)) if ns in wide]
    for extra in selecting[1:]:
        labels = ",".join(f"{k}={v}" for k, v in node.labels.items())
        who = node.name or labels or "(no labels)"
        problems.append(Problem(
            extra.meta.file, extra.meta.resource, "spec.selector",
            f"several Telemetry resources select this workload ({who} in {node.namespace}): "
            f"{selecting[0].meta.resource} and this one; Istio would keep the oldest, Pillion has no "
            "creation time and refuses to guess"))
    return levels + selecting[:1]

