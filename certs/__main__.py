"""``python -m certs ...``: the same commands as ``pillion certs ...`` (see ``certs/cli.py``).

Owns nothing but the entry point; must not hold logic of its own.
"""

from __future__ import annotations

import sys

from certs.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m certs"))
