"""What one node can see: its Sidecar, and the services, routes and rules visible to it.

Owns: Sidecar selection for a node, `exportTo` visibility, the meaning of
Sidecar egress `hosts` ("./*", "*/*", "ns/host", "ns/*.suffix") and the
host -> ServiceEntry / VirtualService / DestinationRule lookups the builders
share. It produces no xDS.

Rules (Istio's, narrowed to what Pillion implements):

- Sidecar: the one in the node's namespace whose workloadSelector labels are
  a subset of the node's labels; else the namespace's Sidecar without
  selector; else the root namespace's Sidecar without selector. Two selecting
  Sidecars for one node is a problem (Istio would pick one arbitrarily).
- exportTo: empty or "*" is everyone, "." the owner's namespace, "~" nobody,
  any other entry that namespace.
- In a Sidecar's egress hosts, "." is the node's namespace, as it is for a
  root-namespace Sidecar applied to another namespace.
- Without a Sidecar, or with a Sidecar that has no egress entries, every
  exported service is visible (for clusters); no listeners are made without
  a Sidecar.
- PeerAuthentications are not scoped by exportTo: the node's own (its
  inbound mode, from `security.py`) and those of the workloads it calls
  (for auto mTLS) both apply.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from control.translate.errors import Problem
from control.translate.model import (
    ConfigSet,
    Destination,
    DestinationRule,
    EgressListener,
    MtlsMode,
    NodeInfo,
    ServiceEntry,
    Sidecar,
    VirtualService,
    labels_match,
)
from control.translate.security import PeerPolicies


def exported(export_to: Iterable[str], owner_namespace: str, namespace: str) -> bool:
    targets = tuple(export_to)
    if not targets:
        return True
    return any(
        target == "*" or target == namespace or (target == "." and owner_namespace == namespace)
        for target in targets
    )


def host_matches(pattern: str, host: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return pattern == host


def select_sidecar(config: ConfigSet, node: NodeInfo, problems: list[Problem]) -> Sidecar | None:
    local = [s for s in config.sidecars if s.meta.namespace == node.namespace]
    selecting = [
        s for s in local if s.selector is not None and labels_match(s.selector, node.labels)
    ]
    for extra in selecting[1:]:
        labels = ",".join(f"{k}={v}" for k, v in node.labels.items())
        who = node.name or labels or "(no labels)"
        problems.append(
            Problem(
                extra.meta.file,
                extra.meta.resource,
                "spec.workloadSelector",
                f"selects the workload {who} in {node.namespace}, as "
                f"{selecting[0].meta.resource} does; exactly one Sidecar may select a workload",
            )
        )
    if selecting:
        return selecting[0]
    for pool in (
        local,
        [s for s in config.sidecars if s.meta.namespace == config.mesh.root_namespace],
    ):
        for sidecar in pool:
            if sidecar.selector is None:
                return sidecar
    return None


@dataclass(frozen=True)
class Scope:
    """One node's view of a ConfigSet. Build with `Scope.of`."""

    config: ConfigSet
    node: NodeInfo
    sidecar: Sidecar | None
    registry: Mapping[str, ServiceEntry]  # every host -> its ServiceEntry
    services: Mapping[str, ServiceEntry]  # hosts exported to the node, sorted
    routes: Mapping[str, VirtualService]  # host -> VirtualService exported to the node
    rules: Mapping[str, DestinationRule]  # host -> DestinationRule exported to the node
    peers: PeerPolicies  # every PeerAuthentication, for the modes of destination workloads
    inbound_mode: Callable[[int], MtlsMode]  # the node's own mTLS mode per ingress port

    @classmethod
    def of(cls, config: ConfigSet, node: NodeInfo, problems: list[Problem]) -> Scope:
        namespace = node.namespace
        registry = {host: se for se in config.service_entries for host in se.hosts}
        services = {
            host: registry[host]
            for host in sorted(registry)
            if exported(registry[host].export_to, registry[host].meta.namespace, namespace)
        }
        routes = {
            host: vs
            for vs in config.virtual_services
            if exported(vs.export_to, vs.meta.namespace, namespace)
            for host in vs.hosts
        }
        rules = {
            dr.host: dr
            for dr in config.destination_rules
            if exported(dr.export_to, dr.meta.namespace, namespace)
        }
        sidecar = select_sidecar(config, node, problems)
        peers = PeerPolicies(config)
        inbound_mode = peers.for_node(node, problems)
        return cls(config, node, sidecar, registry, services, routes, rules, peers, inbound_mode)

    def visible(self, egress: EgressListener) -> list[str]:
        """Hosts (sorted) that `egress` lets the node reach."""
        return [
            host
            for host, se in self.services.items()
            if any(
                self._namespace_matches(ns, se.meta.namespace) and host_matches(pattern, host)
                for ns, pattern in egress.hosts
            )
        ]

    def _namespace_matches(self, pattern: str, namespace: str) -> bool:
        if pattern == "*":
            return True
        if pattern == ".":
            return namespace == self.node.namespace
        return pattern == namespace  # "~" never equals a namespace

    def cluster_hosts(self) -> list[str]:
        """Hosts (sorted) that get outbound clusters: everything the egress entries can reach."""
        if self.sidecar is None or not self.sidecar.egress:
            return list(self.services)
        seen: set[str] = set()
        for egress in self.sidecar.egress:
            seen.update(self.visible(egress))
        return sorted(seen)

    def has_subset(self, host: str, subset: str) -> bool:
        rule = self.rules.get(host)
        return rule is not None and any(s.name == subset for s in rule.subsets)

    def destination(
        self, vs: VirtualService, dest: Destination, port: int, problems: list[Problem]
    ) -> tuple[str, tuple[str, int]] | None:
        """The cluster a route destination names when used on listener `port`, and its (host, port).

        The destination's own port wins; otherwise the listener's port is used,
        so the destination host must have it.
        """
        number = dest.port or port
        if self.registry[dest.host].port(number) is None:
            field = f"{dest.path}.port.number" if dest.port else f"{dest.path}.host"
            problems.append(
                Problem(
                    vs.meta.file,
                    vs.meta.resource,
                    field,
                    f"host {dest.host} has no port {number} (used by the node's listener on "
                    f"port {port}); set destination.port.number",
                )
            )
            return None
        if dest.subset and not self.has_subset(dest.host, dest.subset):
            problems.append(
                Problem(
                    vs.meta.file,
                    vs.meta.resource,
                    f"{dest.path}.subset",
                    f"no DestinationRule exported to namespace {self.node.namespace} defines "
                    f"subset {dest.subset!r} of host {dest.host}",
                )
            )
            return None
        return cluster_name("outbound", number, dest.subset, dest.host), (dest.host, number)


def cluster_name(direction: str, port: int, subset: str, host: str) -> str:
    """Istio's cluster naming: "outbound|9080|v1|reviews.default.svc.cluster.local"."""
    return f"{direction}|{port}|{subset}|{host}"
