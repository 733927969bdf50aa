"""Control-plane commands of the ``pillion`` script: ``validate`` and ``demo``.

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


def main(argv: list[str]) -> int:
    cmd, rest = argv[0], argv[1:]
    if cmd == "validate":
        return validate(rest)
    if cmd == "demo":
        from control.demo import main as demo_main

        return demo_main(rest)
    print(f"pillion: unknown command {cmd!r}", file=sys.stderr)
    return 2
