"""`python -m control ...` is `pillion control ...` (the control server, or `status`)."""

import sys

from control.cli import main

sys.exit(main(["control", *sys.argv[1:]]))
