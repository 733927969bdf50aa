"""``pillion control token``: mint a workload bootstrap token for the control server's CA.

Owns: the argument handling, output and exit codes of that one command (0 ok,
1 a bad name or a file problem, 2 bad usage). The token itself comes from
``control.ca_service.issue_workload_token``, with the key in the same state
directory the control server uses, so the server accepts it.

    pillion control token --state-dir DIR --namespace NS --service-account SA [--hours 720] [--out FILE]

Without ``--out`` the token is printed on stdout; with it, the token is written to
FILE with mode 0600 (it is a credential) and nothing is printed.
"""

from __future__ import annotations

import argparse
import sys

from certs.errors import CertError
from certs.pem import KEY_FILE_MODE, atomic_write
from control.ca_service import issue_workload_token

DEFAULT_HOURS = 720.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pillion control token",
        description="Mint a bootstrap token that lets one workload get certificates for "
        "spiffe://<trust-domain>/ns/NS/sa/SA from the control server's CA.",
    )
    parser.add_argument("--state-dir", required=True,
                        help="the control server's state directory (holds token-key; created if missing)")
    parser.add_argument("--namespace", required=True, help="the workload's namespace")
    parser.add_argument("--service-account", required=True, help="the workload's service account")
    parser.add_argument("--hours", type=float, default=DEFAULT_HOURS,
                        help=f"how long the token is valid (default {DEFAULT_HOURS:g})")
    parser.add_argument("--out", help="write the token to this file (mode 0600) instead of stdout")
    return parser


def token_main(argv: list[str]) -> int:
    """Run ``pillion control token``; return the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or bad usage (2)
        return exc.code if isinstance(exc.code, int) else 2
    if not args.hours > 0:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: --hours must be positive", file=sys.stderr)
        return 2
    try:
        token = issue_workload_token(args.state_dir, args.namespace, args.service_account, args.hours)
        if args.out:
            atomic_write(args.out, (token + "\n").encode(), KEY_FILE_MODE)
        else:
            print(token)
    except (CertError, ValueError, OverflowError) as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{parser.prog}: {exc.filename or args.state_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(token_main(sys.argv[1:]))
