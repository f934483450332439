"""The command line shared by the examples: ``--out DIR`` and ``--tiny``."""

from __future__ import annotations

import argparse


def cli(main, doc: str) -> None:
    """Parse ``--out`` and ``--tiny`` and call ``main(out, tiny)``."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", default="examples/out", help="folder of the figure (PNG + PDF)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (seconds)")
    a = p.parse_args()
    main(a.out, a.tiny)
