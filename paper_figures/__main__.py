"""``python -m paper_figures [NAMES...] --tier quick|full``: regenerate the paper figures."""

import sys

from isometry.cli import main

sys.exit(main(["figures", *sys.argv[1:]]))
