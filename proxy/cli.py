"""``pillion``: one console script, subcommands a user can guess.

``pillion proxy`` is served here; ``validate``, ``demo`` (and later
``control``) belong to the control plane and are dispatched to
``control.cli`` by name, so the data plane does not depend on control-plane
code beyond the shared translator (ARCHITECTURE.md's import rule).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from proxy.options import ProxyOptions

CONTROL_COMMANDS = ("control", "status", "validate", "demo", "traces")  # [tracing] traces

# Pillion's processes start children (proxy workers, the demo's processes) by fork and exec while
# gRPC threads may be running. gRPC's fork handlers exist for children that go on using gRPC; in a
# child that only execs, they can leave it stuck before the exec. Off unless the user sets it.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


def _labels(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise argparse.ArgumentTypeError(f"label {item!r} is not key=value")
        out[k] = v
    return out


def proxy_parser(prog: str = "pillion proxy") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Run a Pillion sidecar proxy.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--config-dir", help="standalone mode: a directory of Istio YAML")
    src.add_argument("--xds", metavar="HOST:PORT", help="follow a control server over ADS (e.g. 127.0.0.1:15010)")
    ap.add_argument("--cert-dir", default=None,
                    help="standalone mTLS: a directory with cert-chain.pem, key.pem and root-cert.pem")
    ap.add_argument("--ca-address", default=None, metavar="HOST:PORT",
                    help="get the workload certificate from this CA (default: the --xds address when --token-file is given)")
    ap.add_argument("--token-file", default=None, help="the workload's bootstrap token for the CA")
    ap.add_argument("--trust-domain", default="cluster.local")
    ap.add_argument("--cert-validity-hours", type=float, default=24.0)
    ap.add_argument("--admin-port", type=int, default=15000, help="admin API port on 127.0.0.1 (0: any free port)")
    ap.add_argument("--admin-address", default="127.0.0.1")
    ap.add_argument("--status-port", type=int, default=None, help="also serve /healthz/ready here (Istio: 15021)")
    ap.add_argument("--prometheus-port", type=int, default=None, help="also serve /stats/prometheus here (Istio: 15090)")
    ap.add_argument("--concurrency", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("--drain-seconds", type=float, default=5.0,
                    help="on SIGTERM, finish in-flight work for at most this long (default 5)")
    ap.add_argument("--exit-on-zero-active-connections", action="store_true",
                    default=os.environ.get("EXIT_ON_ZERO_ACTIVE_CONNECTIONS", "").lower() == "true",
                    help="on SIGTERM stop only inbound listeners and exit once no connection is left, so the "
                    "app can still call out while it finishes (Istio's EXIT_ON_ZERO_ACTIVE_CONNECTIONS)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--namespace", default="default", help="this workload's namespace")
    ap.add_argument("--labels", type=_labels, default={}, help="this workload's labels: app=x,version=v1")
    ap.add_argument("--name", default="", help="this workload's name (default: its app label)")
    ap.add_argument("--service-account", default="default")
    ap.add_argument("--workload-group", default="", help="xDS: register as a member of this WorkloadGroup")
    ap.add_argument("--instance-ip", default="127.0.0.1", help="xDS: this workload's address")
    ap.add_argument("--no-watch", action="store_true", help="do not reload the config dir on change")
    ap.add_argument("--intercept", action="store_true",
                    help="transparent interception: serve the capture listeners (15001 outbound, 15006 inbound) "
                         "that `pillion init-iptables` redirects this namespace's TCP to; run as uid 1337")
    return ap


def run_proxy(argv: list[str]) -> int:
    args = proxy_parser().parse_args(argv)
    opts = ProxyOptions(
        config_dir=args.config_dir, cert_dir=args.cert_dir, xds=args.xds,
        ca_address=args.ca_address or (args.xds if args.token_file else None), token_file=args.token_file,
        trust_domain=args.trust_domain, cert_validity_hours=args.cert_validity_hours, admin_address=args.admin_address, admin_port=args.admin_port,
        status_port=args.status_port, prometheus_port=args.prometheus_port,
        concurrency=max(1, args.concurrency), drain_seconds=args.drain_seconds,
        exit_on_zero_active_connections=args.exit_on_zero_active_connections, log_level=args.log_level,
        namespace=args.namespace, labels=args.labels, node_name=args.name,
        service_account=args.service_account, workload_group=args.workload_group,
        instance_ip=args.instance_ip, watch=not args.no_watch, intercept=args.intercept,
    )
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvloop

    from proxy.supervisor import Supervisor

    return int(uvloop.run(Supervisor(opts).run()))


USAGE = """usage: pillion <command> [options]

commands:
  proxy          run a sidecar proxy (standalone: --config-dir DIR; or --xds HOST:PORT)
  control        run the control server (ADS on 15010); `pillion control status` lists proxies
  certs          mesh CA and workload certificates: init, issue, inspect
  proxy-config   show a running sidecar's listeners, routes, clusters, endpoints, secrets
  validate       check a directory of Istio YAML
  init-iptables  install (or --clean) the interception rules of this network namespace
  demo           run a local demo: an app behind a sidecar, with traffic
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "proxy":
        return run_proxy(rest)
    if cmd == "init-iptables":
        from proxy.iptables import main as iptables_main

        return iptables_main(rest)
    if cmd == "proxy-config":  # [accesslog] istioctl proxy-config, over the admin API
        from proxy.proxy_config import main as proxy_config_main

        return proxy_config_main(rest)
    if cmd == "wait":
        from proxy.wait import main as wait_main

        return wait_main(rest)
    if cmd == "certs":
        from certs.cli import main as certs_main

        return int(certs_main(rest))
    if cmd in CONTROL_COMMANDS:
        control_cli = importlib.import_module("control.cli")
        return int(control_cli.main([cmd, *rest]))
    print(f"pillion: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2
