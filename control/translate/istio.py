"""Istio YAML in, validated typed objects (`ConfigSet`) out.

Owns: the public loaders (`load_dir`, `load_text`, `load_sources`), the checks
on each document's envelope (apiVersion, kind, metadata), duplicate
detection, the registry the builders fill while a load runs (`Session`), and
host name resolution. The per-kind rules live in `kinds.py` and `traffic.py`.
It must not produce xDS; `resources.py` and its builders do that.

Strategy: documents go through four passes. (1) identify: envelope and
duplicate checks; (2) shape: `specs.py` tables via `schema.check`; (3) build,
kind by kind in dependency order (ServiceEntry before DestinationRule before
VirtualService) so each builder can resolve names against what was built
before it; (4) assemble a sorted `ConfigSet`. Every mistake becomes a
`Problem` and loading ends with one `ConfigError` listing them all. When a
document is already wrong, problems that would only echo it (a VirtualService
naming a host declared by a broken ServiceEntry) are left out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control.translate import kinds, specs
from control.translate.documents import Document, iter_documents, read_dir
from control.translate.errors import ConfigError, Problem
from control.translate.model import (
    DNS_SUFFIX,
    ConfigSet,
    DestinationRule,
    Meta,
    ServiceEntry,
    Sidecar,
    VirtualService,
    frozen_map,
)
from control.translate.schema import child, strip_nulls, type_name

# Istio kinds that exist but that Pillion does not read yet.
_KNOWN_UNSUPPORTED_KINDS = frozenset(
    {"Gateway", "EnvoyFilter", "ProxyConfig", "WasmPlugin", "WorkloadSelector"}
)
_TOP_LEVEL = ("apiVersion", "kind", "metadata", "spec")


def load_dir(path: str | Path, allow_unenforced_security: bool = False) -> ConfigSet:
    """Load every *.yaml / *.yml file directly in `path` (sorted by name).

    Raises ConfigError listing every problem found. A kind that is not
    enforced yet (none today: the security kinds and Telemetry are enforced)
    is refused unless `allow_unenforced_security` is true, because loading a
    policy that is not enforced would silently change what the mesh does.
    """
    sources, problems = read_dir(path)
    return Session(allow_unenforced_security, problems).load(sources)


def load_text(
    text: str, file: str = "<string>", *, allow_unenforced_security: bool = False
) -> ConfigSet:
    """Load one multi-document YAML text; `file` names it in problems."""
    return Session(allow_unenforced_security, []).load([(file, text)])


def load_sources(
    sources: Iterable[tuple[str, str]], *, allow_unenforced_security: bool = False
) -> ConfigSet:
    """Load (file name, YAML text) pairs as one configuration (for config stores)."""
    return Session(allow_unenforced_security, []).load(list(sources))


@dataclass
class Entry:
    """One document that named a known kind, with its identity resolved."""

    doc: Document
    kind: str
    namespace: str
    name: str
    label: str  # "Kind ns/name", as problems print it
    metadata: dict[str, Any]
    spec: dict[str, Any]
    valid: bool = True

    def meta(self) -> Meta:
        labels = self.metadata.get("labels") or {}
        return Meta(self.kind, self.namespace, self.name, self.doc.file, frozen_map(labels))


class Build:
    """The report callable for one document: records problems and remembers failure."""

    def __init__(self, session: Session, entry: Entry) -> None:
        self.session = session
        self.entry = entry
        self.failed = False

    def __call__(self, field: str, message: str) -> None:
        self.session.add(self.entry, field, message)
        self.failed = True

    def fail_quietly(self) -> None:
        """Fail because of a mistake already reported elsewhere."""
        self.failed = True


class Session:
    """One load: the problems found so far and the registry built so far."""

    def __init__(self, allow_unenforced: bool, problems: list[Problem]) -> None:
        self.allow_unenforced = allow_unenforced
        self.problems = problems
        self.complete = True  # False once a file could not be read or parsed
        self.services: dict[str, ServiceEntry] = {}  # host -> ServiceEntry
        self.rules: dict[str, DestinationRule] = {}  # host -> DestinationRule
        self.routed: dict[str, VirtualService] = {}  # host -> VirtualService
        self.fallback_sidecars: dict[str, Sidecar] = {}  # namespace -> selector-less Sidecar
        self.broken_hosts: set[str] = set()  # hosts of ServiceEntries that failed
        self.broken_rule_hosts: set[str] = set()  # hosts of DestinationRules that failed

    def builder(self, entry: Entry) -> Build:
        return Build(self, entry)

    def add(self, entry: Entry, field: str, message: str) -> None:
        line = entry.doc.line(field) if field else entry.doc.line("metadata")
        self.problems.append(Problem(entry.doc.file, entry.label, field, message, line))

    def load(self, sources: list[tuple[str, str]]) -> ConfigSet:
        if self.problems:
            self.complete = False
        before = len(self.problems)
        documents = list(iter_documents(sources, self.problems))
        if len(self.problems) > before:
            self.complete = False
        entries = self._identify(documents)
        for entry in entries:
            self._check_shape(entry)
        self._note_broken(entries)
        built = kinds.build_all(self, entries)
        if self.problems:
            raise ConfigError(self.problems)
        return ConfigSet(
            mesh=built.mesh,
            service_entries=_sorted(built.service_entries),
            workload_entries=_sorted(built.workload_entries),
            workload_groups=_sorted(built.workload_groups),
            sidecars=_sorted(built.sidecars),
            virtual_services=_sorted(built.virtual_services),
            destination_rules=_sorted(built.destination_rules),
            peer_authentications=_sorted(built.peer_authentications),
            unenforced=_sorted(built.unenforced),
            authorization_policies=_sorted(built.authorization_policies),
            request_authentications=_sorted(built.request_authentications),
            telemetries=_sorted(built.telemetries),
            files=tuple(file for file, _ in sources),
        )

    # --- pass 1: identify --------------------------------------------------

    def _identify(self, documents: list[Document]) -> list[Entry]:
        entries: list[Entry] = []
        seen: dict[tuple[str, str, str], Entry] = {}
        for doc in documents:
            entry = self._envelope(doc)
            if entry is None:
                continue
            key = (entry.kind, entry.namespace, entry.name)
            first = seen.get(key)
            if first is not None and entry.kind != "MeshConfig":  # build_all allows one MeshConfig
                self.add(
                    entry,
                    "metadata.name",
                    f"duplicate {first.label}, first defined in {first.doc.file}",
                )
                continue
            seen[key] = entry
            entries.append(entry)
        return entries

    def _envelope(self, doc: Document) -> Entry | None:
        data = doc.data
        anonymous = f"document {doc.index}"
        if not isinstance(data, dict):
            got = type_name(data)
            self.problems.append(
                Problem(
                    doc.file,
                    anonymous,
                    "",
                    f"expected a mapping with apiVersion, kind, metadata and spec, got {got}",
                    doc.line(""),
                )
            )
            return None
        data = strip_nulls(data)
        kind = data.get("kind")
        metadata = data.get("metadata")
        md = metadata if isinstance(metadata, dict) else {}
        raw_namespace, raw_name = md.get("namespace"), md.get("name")
        namespace = raw_namespace if isinstance(raw_namespace, str) and raw_namespace else "default"
        name = raw_name if isinstance(raw_name, str) else ""
        if not isinstance(kind, str) or kind not in specs.KINDS:
            if kind is None:
                message = "required field is missing"
            elif not isinstance(kind, str):
                message = f"expected a string, got {type_name(kind)} {kind!r}"
            elif kind in _KNOWN_UNSUPPORTED_KINDS:
                message = f"kind {kind} is not supported yet"
            else:
                message = f"unknown kind {kind!r}; expected one of {', '.join(sorted(specs.KINDS))}"
            label = f"{kind} {namespace}/{name}" if isinstance(kind, str) and name else anonymous
            self.problems.append(Problem(doc.file, label, "kind", message, doc.line("kind")))
            return None
        if kind == "MeshConfig" and metadata is None:
            label = "MeshConfig"
        else:
            label = f"{kind} {namespace}/{name}" if name else f"{kind} ({anonymous})"
        spec = data.get("spec", {})
        entry = Entry(doc, kind, namespace, name, label, md, spec if isinstance(spec, dict) else {})
        build = Build(self, entry)
        for key in data:
            if key not in _TOP_LEVEL:
                build(child("", key), "unknown field")
        self._check_api_version(build, kind, data.get("apiVersion"))
        if not (kind == "MeshConfig" and metadata is None):
            specs.METADATA.check(metadata if metadata is not None else {}, "metadata", build)
        if not isinstance(spec, dict):
            build("spec", f"expected a mapping, got {type_name(spec)} {spec!r}")
        entry.valid = not build.failed
        return entry

    def _check_api_version(self, build: Build, kind: str, api_version: Any) -> None:
        groups = specs.KINDS[kind][0]  # () for MeshConfig: any apiVersion, or none
        if api_version is None:
            if groups:
                build("apiVersion", "required field is missing")
        elif not isinstance(api_version, str):
            build("apiVersion", f"expected a string, got {type_name(api_version)} {api_version!r}")
        elif groups:
            group, _, version = api_version.partition("/")
            if group not in groups or version not in specs.API_VERSIONS[group]:
                accepted = [f"{g}/{v}" for g in groups for v in specs.API_VERSIONS[g]]
                build("apiVersion", f"{api_version!r} is not one of {', '.join(accepted)}")

    # --- pass 2: shape -----------------------------------------------------

    def _check_shape(self, entry: Entry) -> None:
        build = Build(self, entry)
        specs.KINDS[entry.kind][1].check(entry.spec, "spec", build)
        if build.failed:
            entry.valid = False

    def _note_broken(self, entries: list[Entry]) -> None:
        """Remember hosts of broken documents so follow-on problems are not reported."""
        for entry in entries:
            if entry.valid:
                continue
            if entry.kind == "ServiceEntry":
                hosts = entry.spec.get("hosts")
                if isinstance(hosts, list):
                    self.broken_hosts.update(h for h in hosts if isinstance(h, str))
            elif entry.kind == "DestinationRule" and isinstance(entry.spec.get("host"), str):
                self.broken_rule_hosts.add(entry.spec["host"])

    # --- names ---------------------------------------------------------------

    def resolve(self, host: str, namespace: str, field: str, build: Build) -> str | None:
        """The ServiceEntry host that `host` (as written in `namespace`) names, or None.

        A name is taken literally if a ServiceEntry declares it; a short name
        ("reviews") also matches "reviews.<namespace>.svc.cluster.local".
        """
        if host in self.services:
            return host
        fqdn = f"{host}.{namespace}.svc.{DNS_SUFFIX}" if "." not in host else ""
        if fqdn and fqdn in self.services:
            return fqdn
        if not self.complete or host in self.broken_hosts or fqdn in self.broken_hosts:
            build.fail_quietly()
        else:
            also = f" (nor {fqdn})" if fqdn else ""
            build(field, f"no ServiceEntry declares host {host!r}{also}")
        return None


def _sorted(objects: list[Any]) -> tuple[Any, ...]:
    return tuple(
        sorted(objects, key=lambda obj: (obj.meta.kind, obj.meta.namespace, obj.meta.name))
    )
