"""Experiments: one module per study, a frozen config with quick/full presets and a run function.

Every module ``experiments/<name>.py`` defines

* ``Config``: a frozen dataclass (hashable; every field typed, so
  ``--set key=value`` parses against it);
* ``PRESETS = {"quick": Config(...), "full": Config(...)}``: ``quick`` runs in
  well under a minute on a laptop CPU, ``full`` reproduces the paper;
* ``run(config, out, *, per_device=4, optimize=True, progress=True) -> Path``: the sweep,
  written to the results store ``out`` (:class:`isometry.sweep.Store`),
  returning the aggregate csv;
* ``EXPERIMENT = Experiment(name, Config, PRESETS, run, summary)``.

Modules are discovered, so a new study is one new module: no list to edit.
Modules whose name starts with ``_`` and the support modules in
:data:`SUPPORT` (``harness``: data, training runs, sweeps of runs, results
stores and :func:`~isometry.experiments.harness.stored_run`, shared by the
studies and the figures) are not experiments.
Use :func:`names`, :func:`get`, :func:`config` and :func:`run`; the
``isometry run NAME --preset quick --set key=value`` command wraps them.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from isometry import sweep

__all__ = ["PRESET_NAMES", "SUPPORT", "Experiment", "config", "get", "names", "run"]

PRESET_NAMES = ("quick", "full")

SUPPORT = frozenset({"harness"})
"""Public modules of this package that are not experiments."""


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A registered study: its config type, presets and run function."""

    name: str
    config: type
    presets: Mapping[str, Any]
    run: Callable[..., Path]
    summary: str = ""

    def __post_init__(self):
        missing = [p for p in PRESET_NAMES if p not in self.presets]
        if missing:
            raise ValueError(f"experiment {self.name!r} lacks presets {missing}")


def names() -> list[str]:
    """Names of the experiment modules in this package (sorted)."""
    return sorted(
        m.name
        for m in pkgutil.iter_modules(__path__)
        if not m.name.startswith("_") and m.name not in SUPPORT
    )


def get(name: str) -> Experiment:
    """The experiment ``name``; ``ValueError`` for an unknown name, ``ImportError`` with the
    reason when its module needs something missing (e.g. :mod:`isometry.training`)."""
    known = names()
    if name not in known:
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(known)}")
    try:
        mod = importlib.import_module(f"{__name__}.{name}")
    except ImportError as err:
        raise ImportError(f"experiment {name!r} cannot be loaded: {err}") from err
    exp = getattr(mod, "EXPERIMENT", None)
    if not isinstance(exp, Experiment):
        raise ValueError(f"module experiments.{name} defines no EXPERIMENT")
    return exp


def config(name: str, preset: str = "quick", overrides: Sequence[str] = ()):
    """The config of experiment ``name`` at ``preset`` with ``key=value`` overrides applied."""
    exp = get(name)
    if preset not in exp.presets:
        raise ValueError(f"preset must be one of {sorted(exp.presets)}, got {preset!r}")
    return sweep.apply_overrides(exp.presets[preset], overrides, name=f"experiment {name!r}")


def run(
    name: str,
    preset: str = "quick",
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    **options,
) -> Path:
    """Run experiment ``name`` into ``out`` (default ``results/<name>/<preset>``); the csv path.

    ``options`` go to the experiment's run function; ``optimize`` defaults to
    ``preset == "full"`` (quick sweeps are dominated by compilation, see
    :func:`isometry.sweep.map_sharded`).
    """
    cfg = config(name, preset, overrides)
    options.setdefault("optimize", preset == "full")
    out = Path("results") / name / preset if out is None else Path(out)
    return get(name).run(cfg, out, **options)
