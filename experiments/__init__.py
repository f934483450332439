"""Experiments: one module per study, a frozen config with quick/full presets and a run function.

Every module ``experiments/<name>.py`` defines

* ``Config``: a frozen dataclass (hashable; every field typed, so
  ``--set key=value`` parses against it);
* ``PRESETS = {"quick": Config(...), "full": Config(...)}``: ``quick`` runs in
  well under a minute on a laptop CPU, ``full`` reproduces the paper;
* ``grid(config) -> sweep.Grid``: the points of the sweep (its axes name the
  parameters a figure reads the results along);
* ``run(config, out, *, per_device=4, optimize=True, progress=True) -> Path``: the sweep,
  written to the results store ``out`` (:class:`isometry.sweep.Store`),
  returning the aggregate csv;
* ``EXPERIMENT = Experiment(name, Config, PRESETS, run, summary, grid=grid)``.

Modules are discovered by name here (:func:`get`, the one place that imports
an experiment by its name), so a new study is one new module: no list to
edit. Modules whose name starts with ``_`` and the support modules in
:data:`SUPPORT` (``harness``: data, training runs, sweeps of runs, results
stores and :func:`~isometry.experiments.harness.stored_run`, shared by the
studies and the figures) are not experiments.
Use :func:`names`, :func:`get`, :func:`config` and :func:`run`; the
``isometry run NAME --preset quick --set key=value`` command wraps them. Code
that holds an :class:`Experiment` (a figure: ``trainability.EXPERIMENT``) uses
its :meth:`Experiment.preset_config` and :meth:`Experiment.run_preset`, and
:func:`~isometry.experiments.harness.stored_run` reads it back on its grid.
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
    """A registered study: its config type, presets, run function and grid.

    ``grid(config)`` is the :class:`isometry.sweep.Grid` that ``run`` sweeps:
    its points are the store's points, its axes those of the arrays a figure
    reads back (:meth:`isometry.experiments.harness.StoredRun.array`).
    """

    name: str
    config: type
    presets: Mapping[str, Any]
    run: Callable[..., Path]
    summary: str = ""
    grid: Callable[[Any], sweep.Grid] = dataclasses.field(kw_only=True)

    def __post_init__(self):
        missing = [p for p in PRESET_NAMES if p not in self.presets]
        if missing:
            raise ValueError(f"experiment {self.name!r} lacks presets {missing}")

    def preset_config(self, preset: str = "quick", overrides: Sequence[str] = ()):
        """The config at ``preset`` with ``key=value`` overrides applied (``ValueError`` for an
        unknown preset or a bad override)."""
        if preset not in self.presets:
            raise ValueError(f"preset must be one of {sorted(self.presets)}, got {preset!r}")
        return sweep.apply_overrides(
            self.presets[preset], overrides, name=f"experiment {self.name!r}"
        )

    def run_preset(
        self,
        preset: str = "quick",
        overrides: Sequence[str] = (),
        out: str | Path | None = None,
        **options,
    ) -> Path:
        """Run at ``preset`` with ``overrides`` into ``out`` (default
        ``results/<name>/<preset>``); the csv path.

        ``options`` go to the run function; ``optimize`` defaults to
        ``preset == "full"`` (quick sweeps are dominated by compilation, see
        :func:`isometry.sweep.map_sharded`).
        """
        cfg = self.preset_config(preset, overrides)
        options.setdefault("optimize", preset == "full")
        out = Path("results") / self.name / preset if out is None else Path(out)
        return self.run(cfg, out, **options)


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
    return get(name).preset_config(preset, overrides)


def run(
    name: str,
    preset: str = "quick",
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    **options,
) -> Path:
    """Run experiment ``name`` into ``out`` (default ``results/<name>/<preset>``); the csv path.

    :meth:`Experiment.run_preset` of :func:`get` ``(name)``: ``options`` go to
    the experiment's run function; ``optimize`` defaults to ``preset == "full"``.
    """
    return get(name).run_preset(preset, overrides, out, **options)
