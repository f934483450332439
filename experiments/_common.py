"""Helpers shared by the experiment modules (not an experiment: the name starts with ``_``)."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from isometry import activations, sweep

__all__ = ["results_dir", "seed_key", "spectrum_rows", "sphere_input"]


def seed_key(seed, index):
    """Deprecated alias of :func:`isometry.sweep.point_key`."""
    return sweep.point_key(seed, index)


def sphere_input(key, shape, q_star):
    """An input of ``shape`` on the sphere ``||x||^2 = x.size * q*`` (mean square ``q*``)."""
    x = jax.random.normal(key, shape)
    return x * jnp.sqrt(x.size * q_star) / jnp.linalg.norm(x)


def spectrum_rows(depths, lam) -> list[dict]:
    """One row per depth of bulk statistics of squared singular values ``lam (K, n)``."""
    lam = np.asarray(lam, dtype=np.float64)
    rows = []
    for d, v in zip(depths, lam, strict=True):
        rows.append(
            {
                "depth": int(d),
                "mean": float(v.mean()),
                "var": float(v.var()),
                "max": float(v.max()),
                "min": float(v.min()),
            }
        )
    return rows


ACTIVATIONS = tuple(activations.names())


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
