"""Control-plane commands of the ``pillion`` script: ``control``, ``status``, ``validate`` and ``demo``.

``pillion control --config-dir DIR`` runs the control server;
``pillion control status`` (or ``pillion status``) prints what it pushed to
each connected proxy and whether the proxy ACKed it; ``pillion control token``
mints a workload bootstrap token for the control server's CA.

Reached from ``proxy.cli`` by name (see its docstring for why).
"""

from __future__ import annotations

import argparse
import sys


def validate(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="pillion validate", description="Check a directory of Istio YAML.")
    ap.add_argument("dir")
    args = ap.parse_args(argv)
    from control.translate import ConfigError, load_dir

    try:
        cfg = load_dir(args.dir)
    except ConfigError as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        print(f"{len(e.problems)} problem(s) in {args.dir}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{args.dir}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"{args.dir}: OK ({cfg.summary() if hasattr(cfg, 'summary') else 'valid'})")
    return 0


def control(argv: list[str]) -> int:
    if argv and argv[0] == "status":
        return status(argv[1:])
    if argv and argv[0] == "token":
        from control.tokens_cli import token_main

        return token_main(argv[1:])
    ap = argparse.ArgumentParser(
        prog="pillion control",
        description="Run the control server: Istio YAML in DIR -> Envoy xDS v3 (ADS) to every proxy. "
        "`pillion control status` lists the connected proxies.",
    )
    ap.add_argument("--config-dir", required=True, help="a directory of Istio YAML (watched for changes)")
    ap.add_argument("--xds-port", type=int, default=15010, help="ADS gRPC port (plaintext; 0: any free port)")
    ap.add_argument("--debug-port", type=int, default=15014, help="debug HTTP port: /debug/syncz, /debug/config, /ready")
    ap.add_argument("--address", default="127.0.0.1", help="address both ports bind")
    ap.add_argument("--registration-grace", type=float, default=10.0,
                    help="seconds an auto-registered WorkloadEntry outlives its proxy's stream")
    ap.add_argument("--debounce", type=float, default=0.1, help="seconds of quiet before a changed config is reloaded")
    ap.add_argument("--no-watch", action="store_true", help="load the config dir once; do not watch it")
    ap.add_argument("--ca-state-dir", default=None,
                    help="also serve the mesh CA on the xDS port, with its root and token key in DIR "
                    "(created on first start; mint tokens with `pillion control token`)")
    ap.add_argument("--trust-domain", default="cluster.local", help="trust domain of a CA created in --ca-state-dir")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--otlp-port", type=int, default=None,  # [tracing]
                    help="also receive OTLP/gRPC traces on this port (4317 usually; 0: any free port); "
                         "the last traces are served on /debug/traces (see `pillion traces`)")
    args = ap.parse_args(argv)
    from control.server import ControlOptions, run

    options = ControlOptions(
        config_dir=args.config_dir, address=args.address, xds_port=args.xds_port,
        debug_port=args.debug_port, registration_grace=args.registration_grace,
        debounce=args.debounce, watch=not args.no_watch, ca_state_dir=args.ca_state_dir,
        trust_domain=args.trust_domain,
        otlp_port=args.otlp_port,  # [tracing]
    )
    return run(options, args.log_level)


def status(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="pillion control status",
        description="List the proxies connected to a control server and their ACK/NACK state per xDS type.",
    )
    ap.add_argument("--server", default="127.0.0.1:15014", help="the control server's debug address (host:port)")
    args = ap.parse_args(argv)
    from control.status import status_main

    return status_main(args.server)


def traces(argv: list[str]) -> int:  # [tracing]
    ap = argparse.ArgumentParser(
        prog="pillion traces",
        description="Show the recent traces the control server's OTLP receiver (--otlp-port) holds, as trees.",
    )
    ap.add_argument("--server", default="127.0.0.1:15014", help="the control server's debug address (host:port)")
    ap.add_argument("--limit", type=int, default=10, help="how many traces to show (most recent first)")
    args = ap.parse_args(argv)
    from control.traces_cli import traces_main

    return traces_main(args.server, args.limit)


def main(argv: list[str]) -> int:
    cmd, rest = argv[0], argv[1:]
    if cmd == "control":
        return control(rest)
    if cmd == "status":
        return status(rest)
    if cmd == "validate":
        return validate(rest)
    if cmd == "traces":  # [tracing]
        return traces(rest)
    if cmd == "demo":
        from control.demo import main as demo_main

        return demo_main(rest)
    print(f"pillion: unknown command {cmd!r}", file=sys.stderr)
    return 2
