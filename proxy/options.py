"""ProxyOptions: the frozen bootstrap of one ``pillion proxy`` process."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ProxyOptions:
    config_dir: str | None = None  # standalone mode: the Istio YAML directory
    cert_dir: str | None = None  # standalone mTLS: cert-chain.pem, key.pem, root-cert.pem
    xds: str | None = None  # HOST:PORT of a control server (a later issue)
    admin_address: str = "127.0.0.1"
    admin_port: int = 15000  # 0 picks a free port (tests)
    status_port: int | None = None  # Istio's 15021 /healthz/ready, off unless asked for
    prometheus_port: int | None = None  # Istio's 15090 /stats/prometheus, off unless asked for
    concurrency: int = 1  # worker processes; 1 runs the worker in this process
    drain_seconds: float = 5.0  # Istio's terminationDrainDuration default
    exit_on_zero_active_connections: bool = False  # drain ends when no connection is left; outbound stays open
    log_level: str = "info"
    namespace: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    node_name: str = ""  # workload name; defaults to the labels' app or "sidecar"
    service_account: str = "default"
    workload_group: str = ""  # xDS: ask the control server to auto-register this workload
    instance_ip: str = "127.0.0.1"  # xDS: the address other sidecars reach this one on
    ca_address: str | None = None  # HOST:PORT of the mesh CA: get and renew a workload certificate
    token_file: str | None = None  # the workload's bootstrap token for the CA
    trust_domain: str = "cluster.local"
    cert_validity_hours: float = 24.0
    watch: bool = True  # reload the config dir on change
    intercept: bool = False  # transparent interception (iptables): capture listeners instead of explicit ones
    tick_seconds: float = 1.0  # idle-timeout sweep period

    @property
    def workload(self) -> str:
        return self.node_name or self.labels.get("app", "") or "sidecar"

    def node(self) -> dict[str, str]:
        # [accesslog] app/version: Istio's source_/destination_app and _version labels of this workload
        return {"workload": self.workload, "namespace": self.namespace,
                "app": self.labels.get("app", ""), "version": self.labels.get("version", "")}
