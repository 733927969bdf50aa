"""Builders for the registry kinds, and the driver that builds every kind in order.

Owns: `build_all` (kinds built in dependency order, so a builder can resolve
a name against objects built before it), MeshConfig, and the meaning of
ServiceEntry, WorkloadEntry and WorkloadGroup fields beyond their shape:
host uniqueness, port uniqueness, resolution rules, endpoint ports. The
traffic kinds are in `traffic.py`, shared field rules in `fields.py`.
PeerAuthentication is built here too (what it means for a node is in
`security.py`); AuthorizationPolicy and RequestAuthentication in
`authz_kinds.py`; Telemetry in `telemetry.py`. It must not read files or
produce xDS; `istio.py` drives it and owns the registry (`Session.services`,
`.rules`, `.routed`) the builders fill.

A builder reports through its `Build` callable and returns None when
anything was wrong with its document.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from certs.spiffe import validate_trust_domain
from control.translate import authz_kinds, telemetry, traffic
from control.translate.fields import keep, protocol, speaks_h2, workload
from control.translate.model import (
    AuthorizationPolicy,
    DestinationRule,
    MeshConfig,
    MtlsMode,
    PeerAuthentication,
    RequestAuthentication,
    Resolution,
    ServiceEntry,
    ServicePort,
    Sidecar,
    UnenforcedPolicy,
    VirtualService,
    Workload,
    WorkloadEntry,
    WorkloadGroup,
    frozen_map,
)
from control.translate.model_telemetry import Telemetry
from control.translate.schema import child, port_key
from control.translate.specs import UNENFORCED_KINDS
from control.translate.tracing import mesh_tracing  # [tracing]

if TYPE_CHECKING:
    from control.translate.istio import Build, Entry, Session

_BUILD_ORDER = (
    "MeshConfig",
    "ServiceEntry",
    "WorkloadEntry",
    "WorkloadGroup",
    "PeerAuthentication",
    "DestinationRule",
    "Sidecar",
    "VirtualService",
    "AuthorizationPolicy",
    "RequestAuthentication",
)


@dataclass
class Built:
    """What the builders produced, before `istio.py` sorts it into a ConfigSet."""

    mesh: MeshConfig = field(default_factory=MeshConfig)
    service_entries: list[ServiceEntry] = field(default_factory=list)
    workload_entries: list[WorkloadEntry] = field(default_factory=list)
    workload_groups: list[WorkloadGroup] = field(default_factory=list)
    sidecars: list[Sidecar] = field(default_factory=list)
    virtual_services: list[VirtualService] = field(default_factory=list)
    destination_rules: list[DestinationRule] = field(default_factory=list)
    peer_authentications: list[PeerAuthentication] = field(default_factory=list)
    unenforced: list[UnenforcedPolicy] = field(default_factory=list)
    authorization_policies: list[AuthorizationPolicy] = field(default_factory=list)
    request_authentications: list[RequestAuthentication] = field(default_factory=list)
    telemetries: list[Telemetry] = field(default_factory=list)


def build_all(session: Session, entries: list[Entry]) -> Built:
    built = Built()
    valid = [entry for entry in entries if entry.valid]
    mesh_entry: Entry | None = None
    mesh_ok = all(e.valid for e in entries if e.kind == "MeshConfig")  # [telemetry] its providers were read
    # namespace -> its PeerAuthentication without selector
    namespace_wide: dict[str, PeerAuthentication] = {}
    for kind in _BUILD_ORDER:
        for entry in (e for e in valid if e.kind == kind):
            b = session.builder(entry)
            if kind == "MeshConfig":
                if mesh_entry is not None:
                    b("", f"only one MeshConfig is allowed; the first is in {mesh_entry.doc.file}")
                    continue
                mesh_entry = entry
                built.mesh = _mesh_config(entry, b)
                mesh_ok = mesh_ok and not b.failed
            elif kind == "ServiceEntry":
                keep(built.service_entries, _service_entry(session, entry, b))
            elif kind == "WorkloadEntry":
                found = workload(entry.spec, "spec", b, entry.name, need_address=True)
                if not b.failed:
                    built.workload_entries.append(WorkloadEntry(entry.meta(), found))
            elif kind == "WorkloadGroup":
                keep(built.workload_groups, _workload_group(entry, b))
            elif kind == "PeerAuthentication":
                found_policy = _peer_authentication(entry, b, namespace_wide)
                keep(built.peer_authentications, found_policy)
            elif kind == "DestinationRule":
                keep(built.destination_rules, traffic.destination_rule(session, entry, b))
            elif kind == "Sidecar":
                keep(built.sidecars, traffic.sidecar(session, entry, b))
            elif kind == "VirtualService":
                keep(built.virtual_services, traffic.virtual_service(session, entry, b))
            elif kind == "AuthorizationPolicy":
                keep(built.authorization_policies, authz_kinds.authorization_policy(entry, b))
            else:
                keep(built.request_authentications, authz_kinds.request_authentication(entry, b))
    built.telemetries = telemetry.build_telemetries(
        session, [e for e in valid if e.kind == "Telemetry"], built.mesh, mesh_ok
    )
    for entry in (e for e in valid if e.kind in UNENFORCED_KINDS):
        if session.allow_unenforced:
            built.unenforced.append(UnenforcedPolicy(entry.meta(), entry.spec))
        else:
            session.builder(entry)(
                "",
                f"{entry.kind} is not enforced yet; refusing to load rather than silently ignoring it",
            )
    return built


def _mesh_config(entry: Entry, b: Build) -> MeshConfig:
    spec = entry.spec
    trust_domain = spec.get("trustDomain", "cluster.local")
    try:
        validate_trust_domain(trust_domain)
    except ValueError as exc:  # certs' InvalidSpiffeId
        b("spec.trustDomain", str(exc))
    # [accesslog] Pillion formats access logs itself: only the default formats for now.
    if spec.get("accessLogFormat"):
        b("spec.accessLogFormat", "custom access log formats are not supported yet; "
          "leave it empty for the default TEXT line or set accessLogEncoding: JSON")
    # [accesslog] end
    return MeshConfig(
        trust_domain=trust_domain,
        root_namespace=spec.get("rootNamespace", "istio-system"),
        outbound_mode=spec.get("outboundTrafficPolicy", {}).get("mode", "ALLOW_ANY"),
        enable_auto_mtls=spec.get("enableAutoMtls", True),
        access_log_file=spec.get("accessLogFile", ""),  # [accesslog]
        access_log_encoding=spec.get("accessLogEncoding", "TEXT"),  # [accesslog]
        tracing=mesh_tracing(spec, b),  # [tracing]
        telemetry=telemetry.mesh_telemetry(spec, b),  # [telemetry] providers a Telemetry may name
        meta=entry.meta() if entry.label != "MeshConfig" else None,
    )


def _peer_authentication(
    e: Entry, b: Build, namespace_wide: dict[str, PeerAuthentication]
) -> PeerAuthentication | None:
    """A PeerAuthentication; at most one without selector per namespace (the root's is mesh-wide)."""
    spec = e.spec
    labels = spec.get("selector", {}).get("matchLabels")
    selector = frozen_map(labels) if labels else None
    ports: dict[int, MtlsMode] = {}
    raw_ports: dict[Any, dict[str, str]] = spec.get("portLevelMtls", {})
    if raw_ports and selector is None:
        b(
            "spec.portLevelMtls",
            "portLevelMtls needs a selector with matchLabels (port-level modes apply to "
            "one workload's ports, not to a whole namespace or the mesh)",
        )
    for key, raw in raw_ports.items():
        number = port_key(key)
        if number is None:  # the shape check reported it
            continue
        if number in ports:
            b(child("spec.portLevelMtls", key), f"port {number} is listed twice")
        ports[number] = MtlsMode(raw.get("mode", "UNSET"))
    other = namespace_wide.get(e.namespace) if selector is None else None
    if other is not None:
        b(
            "spec.selector",
            f"{other.meta.resource} already applies to every workload in namespace "
            f"{e.namespace}; only one PeerAuthentication without selector is allowed per namespace",
        )
    if b.failed:
        return None
    mode = MtlsMode(spec.get("mtls", {}).get("mode", "UNSET"))
    result = PeerAuthentication(e.meta(), selector, mode, frozen_map(ports))
    if selector is None:
        namespace_wide[e.namespace] = result
    return result


def _service_entry(s: Session, e: Entry, b: Build) -> ServiceEntry | None:
    spec = e.spec
    hosts: list[str] = spec["hosts"]
    if not hosts:
        b("spec.hosts", "must list at least one host")
    for i, host in enumerate(hosts):
        path = f"spec.hosts[{i}]"
        if not host:
            b(path, "must not be empty")
        elif "*" in host:
            b(path, "wildcard hosts are not supported yet")
        elif host in hosts[:i]:
            b(path, f"host {host} is listed twice")
        elif host in s.services:
            other = s.services[host].meta
            b(path, f"host {host} is already declared by {other.resource} in {other.file}")
    for i, address in enumerate(spec.get("addresses", [])):
        try:
            ipaddress.ip_network(address, strict=False)
        except ValueError:
            b(f"spec.addresses[{i}]", f"{address!r} is not an IP address or CIDR range")
    ports: list[ServicePort] = []
    raw_ports: list[dict[str, Any]] = spec.get("ports", [])
    for i, raw in enumerate(raw_ports):
        path = f"spec.ports[{i}]"
        if any(other["number"] == raw["number"] for other in raw_ports[:i]):
            b(f"{path}.number", f"port {raw['number']} is listed twice")
        if any(other["name"] == raw["name"] for other in raw_ports[:i]):
            b(f"{path}.name", f"port name {raw['name']!r} is listed twice")
        proto = protocol(raw, path, b)
        if proto is not None:
            ports.append(
                ServicePort(
                    raw["number"], raw["name"], proto, raw.get("targetPort"), speaks_h2(raw)
                )
            )
    resolution = Resolution(spec.get("resolution", "NONE"))
    raw_endpoints: list[dict[str, Any]] = spec.get("endpoints", [])
    selector = spec.get("workloadSelector")
    if resolution is Resolution.NONE:
        if raw_endpoints:
            b(
                "spec.endpoints",
                "endpoints need resolution STATIC (NONE forwards to the original destination)",
            )
        if selector is not None:
            b("spec.workloadSelector", "workloadSelector needs resolution STATIC")
    elif raw_endpoints and selector is not None:
        b("spec.workloadSelector", "set endpoints or workloadSelector, not both")
    names = {raw["name"] for raw in raw_ports}
    endpoints: list[Workload] = []
    for i, raw in enumerate(raw_endpoints):
        path = f"spec.endpoints[{i}]"
        for port_name in raw.get("ports", {}):
            if port_name not in names:
                b(child(f"{path}.ports", port_name), f"no port named {port_name!r} in spec.ports")
        endpoints.append(workload(raw, path, b, "", need_address=True))
    if b.failed:
        s.broken_hosts.update(hosts)  # references to them would only echo this problem
        return None
    entry = ServiceEntry(
        meta=e.meta(),
        hosts=tuple(hosts),
        ports=tuple(ports),
        resolution=resolution,
        addresses=tuple(spec.get("addresses", [])),
        location=spec.get("location", "MESH_EXTERNAL"),
        endpoints=tuple(endpoints),
        workload_selector=frozen_map(selector.get("labels")) if selector is not None else None,
        export_to=tuple(spec.get("exportTo", [])),
    )
    for host in hosts:
        s.services[host] = entry
    return entry


def _workload_group(e: Entry, b: Build) -> WorkloadGroup | None:
    template = workload(e.spec["template"], "spec.template", b, "", need_address=False)
    if b.failed:
        return None
    labels = e.spec.get("metadata", {}).get("labels")
    return WorkloadGroup(e.meta(), frozen_map(labels), template)
