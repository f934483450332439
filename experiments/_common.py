"""Helpers shared by the experiment modules (not an experiment: the name starts with ``_``).

Only :func:`results_dir` lives here (it moves to the experiment harness).
``ACTIVATIONS`` and ``seed_key`` are thin re-exports kept for the experiment
modules that still import them; new code uses ``tuple(activations.names())``
and :func:`isometry.sweep.point_key`.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from isometry import activations, sweep

__all__ = ["results_dir"]

ACTIVATIONS = tuple(activations.names())
seed_key = sweep.point_key


@contextlib.contextmanager
def results_dir(path=None):
    """``path`` as a :class:`~pathlib.Path`; for ``None`` a temporary directory removed on exit.

    Figures run their experiment into a lasting store (resumable) or, at the
    test tier, into a throw-away one::

        with results_dir(None) as out:
            table = sweep.load_table(experiments.run("gradients", "quick", out=out))
    """
    if path is not None:
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="isometry-") as tmp:
        yield Path(tmp)
