"""``python -m isometry.paper_figures [NAMES...] --tier quick|full``: the paper figures."""

import sys

from isometry.cli import main

sys.exit(main(["figures", *sys.argv[1:]]))
