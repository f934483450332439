"""The experiment harness: data, one training run reduced to a table row and curves, sweeps of
runs, results stores, and reading an experiment back for a figure.

A support module of :mod:`isometry.experiments`, not an experiment
(:func:`isometry.experiments.names` skips it). The training experiments
(``trainability``, ``learning_speed``, ``clipping``, ``cnn_trainability``)
each train many independent networks, one per grid point, with
:func:`isometry.training.train`. One run here is

1. data (:func:`load_data`): a classification dataset of :mod:`isometry.data`
   (the embedded digits by default), inputs flattened for an MLP or kept as
   images for a CNN and, optionally, scaled by ``s`` so that the first
   pre-activations start at a chosen ``q*`` (:func:`input_scale`, :func:`scaled`);
2. training (:func:`train_model`, :func:`train_mlp`): :func:`isometry.training.train`
   into a scratch directory of the results store (its checkpoints let an
   interrupted run resume; the directory is removed once the point is
   recorded). A :class:`~isometry.training.NonFiniteError` is caught and
   recorded as a divergence at its step, with the metrics logged before it;
3. reduction: one table row of final numbers (the whole training and
   held-out splits evaluated by :func:`isometry.training.evaluate`) and
   curves over the logged steps (:func:`curves`, one set of columns for
   every experiment and figure).

Compilation dominates small trainings, and every run compiles its own train
step. :func:`run_points` runs a sweep's points inside :func:`compile_cache`,
JAX's persistent compilation cache in a temporary directory of the process,
so runs whose train steps have the same shapes and code (any ``sigma_w2``,
seed or learning rate at one depth) load the compiled step instead of
compiling it again.

Figures run and read every experiment the same way, with :func:`stored_run`
(into a lasting store, or a temporary one from :func:`results_dir`): the
figure passes the study's :class:`~isometry.experiments.Experiment` (no lookup
by name here, so this module imports no experiment), and reads the result on
the experiment's grid, ``run.array("train_accuracy", ("depth", "sigma_w2",
"seed"))``, typed as the point records hold it (:class:`StoredRun`).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from isometry import data as _data
from isometry import networks, sweep, training, validate

__all__ = [
    "CURVE_KEYS",
    "DATASETS",
    "PROBE_KEYS",
    "RESULTS",
    "RunResult",
    "StoredRun",
    "check_train",
    "compile_cache",
    "curves",
    "figure_tiers",
    "input_scale",
    "load_data",
    "results_dir",
    "run_dir",
    "run_points",
    "scaled",
    "stored_run",
    "train_mlp",
    "train_model",
]

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")
"""Classification datasets of :mod:`isometry.data` (``digits`` is embedded; the others read
local files)."""

CURVE_KEYS = (
    "step", "loss", "accuracy", "grad_norm", "grad_norm_clipped", "clip_ratio",
    "grad_norm_layers", "eval_step", "eval_loss", "eval_accuracy", "probe_step",
    "jac_sv2_mean", "jac_sv2_var", "jac_sv2_max",
)  # fmt: skip
"""Arrays :func:`curves` extracts from training records."""

PROBE_KEYS = ("jac_sv2_mean", "jac_sv2_var", "jac_sv2_max")
"""The Jacobian probe's numbers (:func:`isometry.training.monitor_probe`)."""

_TRAIN_KEYS = ("loss", "accuracy", "grad_norm", "grad_norm_clipped", "clip_ratio")

RESULTS = Path("results") / "experiments"
"""Root of the stores that figures run experiments into (``RESULTS/<name>/<tier>``)."""


# --------------------------------------------------------------------------- #
# Data and configuration.
# --------------------------------------------------------------------------- #


def load_data(name: str = "digits", seed: int = 0, *, images: bool = False) -> _data.Dataset:
    """The classification dataset ``name``: inputs flattened to ``(n, in_dim)``, or images.

    ``digits``: the embedded 8x8 digits (1,438 training, 359 held-out
    examples, 64 standardized features, 10 classes), split by ``seed``;
    with ``images`` as ``(n, 8, 8, 1)``.
    """
    validate.choice("dataset", name, DATASETS)
    if not images:
        return _data.load(name, seed=seed).flatten()
    shape = {"images": True} if name == "digits" else {"flat": False}
    return _data.load(name, seed=seed, **shape)


def input_scale(ds: _data.Dataset, sigma_w2: float, sigma_b2: float, q_star: float) -> float:
    """The input scale ``s`` that starts the first pre-activations at ``q*``.

    The MLP's input map keeps the mean square of the features (LeCun
    variance ``1/in_dim``, or no map), so ``x^0`` has mean square
    ``s^2 m_u`` with ``m_u = mean(u^2)`` over the training inputs, and

        q^1 = sigma_w2 s^2 m_u + sigma_b2 = q*   =>   s = sqrt((q* - sigma_b2) / (sigma_w2 m_u)).

    The network then starts at the fixed point whose critical
    ``(sigma_w2, sigma_b2)`` it uses, as the free-probability analysis of
    Pennington, Schoenholz & Ganguli 2017 assumes (``h^l ~ N(0, q*)`` in
    every layer).
    """
    validate.real_array("q_star", q_star, minimum=sigma_b2, strict=True)
    m_u = float(np.mean(np.square(ds.x_train, dtype=np.float64)))
    return math.sqrt((q_star - sigma_b2) / (sigma_w2 * m_u))


def scaled(ds: _data.Dataset, s: float) -> _data.Dataset:
    """The dataset with inputs multiplied by ``s`` (both splits)."""
    if s == 1.0:
        return ds
    return dataclasses.replace(
        ds,
        x_train=(ds.x_train * np.float32(s)).astype(np.float32),
        x_test=(ds.x_test * np.float32(s)).astype(np.float32),
    )


def check_study(cfg) -> None:
    """Checks of the fields every training study shares: ``width``, ``seeds`` (integers
    >= 1), ``dataset`` (one of :data:`DATASETS`) and ``train`` (:func:`check_train`)."""
    validate.int_fields(cfg, "width", "seeds")
    validate.choice("dataset", cfg.dataset, DATASETS)
    check_train(cfg.train)


def check_train(train: training.TrainConfig) -> None:
    """Checks of an experiment's :class:`~isometry.training.TrainConfig` beyond its own.

    Raises ``TypeError`` unless ``train`` is a ``TrainConfig``, and
    ``ValueError`` when ``train.log_every > train.steps`` (no loss would be logged
    before the end).
    """
    if not isinstance(train, training.TrainConfig):
        raise TypeError(f"train must be a training.TrainConfig, got {type(train).__name__}")
    if train.log_every > train.steps:
        raise ValueError(
            f"train.log_every must be <= train.steps ({train.steps}), got {train.log_every}"
        )


# --------------------------------------------------------------------------- #
# One run.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One training run reduced.

    Attributes:
        row: final numbers: ``steps_done``, ``diverged``, ``diverged_step``
            (``None`` unless diverged), ``loss`` (last logged batch loss),
            ``train_loss``/``train_accuracy`` (whole training split) and
            ``eval_loss``/``eval_accuracy`` (held-out split), both at the
            final parameters (the last finite ones after a divergence).
        curves: arrays over the logged steps (:func:`curves`).
    """

    row: dict
    curves: dict[str, np.ndarray]


def train_model(
    model: nnx.Module,
    ds: _data.Dataset,
    config: training.TrainConfig,
    run_dir: str | Path | None,
    *,
    depth: int,
) -> RunResult:
    """Train ``model`` (``depth`` stacked layers, whose gradient norms the log holds; 0 for a
    model without a scanned stack) on ``ds`` and reduce the run.

    ``run_dir``: the training directory (resumes a run left there from its
    last periodic checkpoint; removed when done, so no checkpoint is written
    after the last step), or ``None`` to keep everything in memory (a
    divergence then loses the records before it). Same arguments, same result.
    """
    diverged_step = None
    try:
        records = training.train(model, ds, config, run_dir, final_checkpoint=False).records
    except training.NonFiniteError as err:
        diverged_step = err.step
        records = (
            [] if run_dir is None else training.MetricsLog(Path(run_dir) / "metrics.jsonl").read()
        )
    # the chunk of the training loop's own evaluations: one compiled evaluator per structure
    b = min(config.eval_batch_size, ds.x_test.shape[0])
    tr = training.evaluate(model, ds.x_train, ds.y_train, batch_size=b)
    ev = training.evaluate(model, ds.x_test, ds.y_test, batch_size=b)
    c = curves(records, depth)
    row = {
        "steps_done": config.steps if diverged_step is None else diverged_step - 1,
        "diverged": diverged_step is not None,
        "diverged_step": diverged_step,
        "loss": float(c["loss"][-1]) if c["loss"].size else math.nan,
        "train_loss": tr["loss"],
        "train_accuracy": tr["accuracy"],
        "eval_loss": ev["loss"],
        "eval_accuracy": ev["accuracy"],
    }
    if run_dir is not None:
        shutil.rmtree(run_dir, ignore_errors=True)
    return RunResult(row, c)


def train_mlp(
    net: networks.MLPConfig,
    ds: _data.Dataset,
    config: training.TrainConfig,
    run_dir: str | Path | None,
    *,
    seed: int,
) -> RunResult:
    """:func:`train_model` of ``MLP(net)`` (float32, initialized from ``nnx.Rngs(seed)``)."""
    model = networks.MLP(net, rngs=nnx.Rngs(seed), dtype=jnp.float32)
    return train_model(model, ds, config, run_dir, depth=net.depth)


def _num(v) -> float:
    """A logged number (``None`` for NaN, ``"inf"`` strings in the JSON log) as a float."""
    return math.nan if v is None else float(v)


def curves(records: Sequence[dict], depth: int) -> dict[str, np.ndarray]:
    """Arrays over the logged steps of :func:`isometry.training.train` records.

    Returns (``T`` training log steps, ``E`` evaluation steps, ``P`` probe
    steps, ``L = depth``) ``step (T,)`` int, ``loss``, ``accuracy``,
    ``grad_norm`` (before clipping), ``grad_norm_clipped``, ``clip_ratio``
    ``(T,)``, ``grad_norm_layers (T, L)``, ``eval_step (E,)`` int,
    ``eval_loss``, ``eval_accuracy`` ``(E,)``, and for the Jacobian probe
    ``probe_step (P,)`` int, ``jac_sv2_mean``, ``jac_sv2_var``,
    ``jac_sv2_max`` ``(P,)``. Non-finite values logged as ``None``/``"inf"``
    become NaN/inf.
    """
    train = [r for r in records if "loss" in r]
    ev = [r for r in records if "eval_loss" in r]
    probe = [r for r in records if "jac_sv2_mean" in r]
    out = {
        "step": np.asarray([r["step"] for r in train], np.int64),
        "eval_step": np.asarray([r["step"] for r in ev], np.int64),
        "eval_loss": np.asarray([_num(r["eval_loss"]) for r in ev]),
        "eval_accuracy": np.asarray([_num(r.get("eval_accuracy")) for r in ev]),
    }
    for k in _TRAIN_KEYS:
        out[k] = np.asarray([_num(r.get(k)) for r in train])
    out["probe_step"] = np.asarray([r["step"] for r in probe], np.int64)
    for k in PROBE_KEYS:
        out[k] = np.asarray([_num(r[k]) for r in probe])
    layers = [[_num(v) for v in r.get("grad_norm_layers", [])] for r in train]
    out["grad_norm_layers"] = np.asarray(layers).reshape(len(train), depth)
    return out


# --------------------------------------------------------------------------- #
# A sweep of runs.
# --------------------------------------------------------------------------- #


_CACHE_DIR: Path | None = None


def _cache_dir() -> Path:
    """This process's compilation-cache directory (created once, removed at exit)."""
    global _CACHE_DIR
    if _CACHE_DIR is None:
        _CACHE_DIR = Path(tempfile.mkdtemp(prefix="isometry-compile-"))
        atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
    return _CACHE_DIR


@contextlib.contextmanager
def compile_cache() -> Iterator[Path | None]:
    """JAX's persistent compilation cache for the ``with`` block.

    Every compiled function is stored (no minimum compile time) in a
    private temporary directory kept for the life of the process, so a later
    run with an identical program (in this sweep or a later one) loads it
    instead of compiling. The same program compiles to the same executable
    either way, so results do not change. A cache the user configured
    (``jax_compilation_cache_dir``) is left as it is and used; after the
    block the process's settings are as before. Yields the directory
    (``None`` when the user's own cache is in use).
    """
    from jax.experimental.compilation_cache import compilation_cache as cc

    if jax.config.jax_compilation_cache_dir is not None:
        yield None
        return
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    directory = _cache_dir()
    cc.reset_cache()
    cc.set_cache_dir(str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        yield directory
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
        jax.config.update("jax_compilation_cache_dir", None)
        cc.reset_cache()


def run_dir(store: sweep.Store, point: dict) -> Path:
    """The scratch training directory of ``point`` inside ``store``."""
    return store.root / "runs" / sweep.point_id(point)


def run_points(
    store: sweep.Store,
    grid: sweep.Grid,
    fn: Callable[[dict, Path], dict],
    *,
    progress: bool = True,
    label: str | None = None,
) -> Path:
    """:func:`isometry.sweep.run_partitioned` of ``fn(point, run_dir)`` in a :func:`compile_cache`.

    Returns the aggregate csv path. Finished points are skipped; an
    interrupted point resumes from its last checkpoint in its ``run_dir``.
    """
    with compile_cache():
        csv = sweep.run_partitioned(
            store, grid, lambda p: fn(p, run_dir(store, p)), progress=progress, label=label
        )
    with contextlib.suppress(OSError):  # the scratch parent, once every run is done
        (store.root / "runs").rmdir()
    return csv


# --------------------------------------------------------------------------- #
# Reading an experiment back (figures).
# --------------------------------------------------------------------------- #


@contextlib.contextmanager
def results_dir(path: str | Path | None = None) -> Iterator[Path]:
    """``path`` as a :class:`~pathlib.Path`; for ``None`` a temporary directory removed on exit."""
    if path is not None:
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="isometry-") as tmp:
        yield Path(tmp)


def figure_tiers(
    name: str, tiny_overrides: Sequence[str], quick_overrides: Sequence[str] = ()
) -> dict[str, dict]:
    """The tiers of a figure that shows experiment ``name`` (its ``TIERS``).

    ``tiny``: the quick preset with ``tiny_overrides`` in a temporary store;
    ``quick``: the quick preset with ``quick_overrides`` (the figure's own sizes, where
    they differ from the experiment's), ``full``: the full preset as it is, both stored in
    ``RESULTS/<name>/<tier>``. Each tier is the keyword arguments
    ``preset, overrides, store`` of the figure's ``compute`` (:func:`stored_run`).
    """
    tiers = {"tiny": {"preset": "quick", "overrides": tuple(tiny_overrides), "store": None}}
    for tier, overrides in (("quick", tuple(quick_overrides)), ("full", ())):
        tiers[tier] = {"preset": tier, "overrides": overrides, "store": str(RESULTS / name / tier)}
    return tiers


@dataclasses.dataclass(frozen=True)
class StoredRun:
    """A finished experiment read back on its grid: config, grid, typed rows, point arrays.

    ``rows[i]`` are the table rows ``{**point, **row}`` of the ``i``-th point of
    ``grid`` (in grid order), as the store's point records hold them (numbers,
    booleans, text; no csv round trip); an unfinished point has none.
    :meth:`array` lays a column out on the grid's axes, :meth:`arrays` gives a
    point's stored arrays.
    """

    config: object
    grid: sweep.Grid
    rows: tuple[tuple[dict, ...], ...]
    point_arrays: dict[str, dict[str, np.ndarray]]

    @classmethod
    def read(cls, store: sweep.Store, grid: sweep.Grid) -> StoredRun:
        """The finished points of ``grid`` in ``store``, read back (arrays loaded)."""
        points = grid.points()
        rows = tuple(
            tuple({**p, **r} for r in store.read(p)["rows"]) if store.done(p) else ()
            for p in points
        )
        arrays = {sweep.point_id(p): store.arrays(p) for p in points}
        return cls(store.config, grid, rows, arrays)

    @property
    def points(self) -> list[dict]:
        """The grid's points, in grid order."""
        return self.grid.points()

    @property
    def table(self) -> dict[str, np.ndarray]:
        """Every row as typed columns ``{name: (n_rows,)}``: the aggregate table
        (:func:`isometry.sweep.load_table`) with :func:`isometry.sweep.typed_column` types."""
        flat = [r for rows in self.rows for r in rows]
        cols = list(dict.fromkeys(k for r in flat for k in r))
        return {c: sweep.typed_column([r.get(c) for r in flat]) for c in cols}

    def coords(self, name: str) -> tuple:
        """The values of grid parameter ``name`` along its axis (``KeyError`` if none)."""
        return self.grid.values(name)

    def axis(self, name: str) -> int:
        """The axis of grid parameter ``name`` in the arrays of :meth:`array`."""
        return self.grid.axis(name)

    def array(self, column: str, axes: Sequence[str] = (), *, rows: bool = False) -> np.ndarray:
        """``column`` laid out on the grid, typed (:func:`isometry.sweep.typed_column`).

        Shape ``grid.shape`` (one axis per grid block, :attr:`isometry.sweep.Grid.shape`),
        one value per point; ``rows=True`` adds a last axis over each point's rows
        (e.g. one per layer), ``grid.shape + (R,)`` for the most rows ``R`` of a
        point. A missing value (an unfinished point, a shorter point, a row
        without ``column``) is NaN (numbers), ``None`` otherwise. ``axes``: the
        grid's parameters in the order wanted, one naming each axis (e.g.
        ``("depth", "sigma_w2", "seed")``); the rows' axis stays last. The result
        is C-contiguous, so a reduction over its last axis adds in the order a
        1-D reduction would. ``ValueError`` if a point has several rows and
        ``rows`` is false.
        """
        if not rows and any(len(r) > 1 for r in self.rows):
            raise ValueError(
                f"the points of this run have several rows each; read {column!r} with rows=True"
            )
        width = max((len(r) for r in self.rows), default=0) if rows else 1
        cells = [
            [r[k].get(column) if k < len(r) else None for k in range(width)] for r in self.rows
        ]
        shape = self.grid.shape + ((width,) if rows else ())
        values = sweep.typed_column([v for c in cells for v in c]).reshape(shape)
        if axes:
            order = self._order(axes)
            values = values.transpose(order + ([len(order)] if rows else []))
        return np.ascontiguousarray(values)

    def arrays(self, point: dict) -> dict[str, np.ndarray]:
        """The arrays stored with ``point`` (empty if none)."""
        return self.point_arrays.get(sweep.point_id(point), {})

    def stack(self, name: str, length: int, axes: Sequence[str] = ()) -> np.ndarray:
        """The stored 1-D array ``name`` of every point on the grid: ``grid.shape + (length,)``
        float64, each cut to ``length`` and padded with NaN (a run that stopped early; a point
        without it is all NaN). ``axes`` as in :meth:`array`."""
        out = np.full((len(self.rows), length), np.nan)
        for i, p in enumerate(self.points):
            a = self.arrays(p).get(name)
            if a is not None:
                a = np.asarray(a)[:length]
                out[i, : a.size] = a
        out = out.reshape((*self.grid.shape, length))
        if axes:
            out = out.transpose([*self._order(axes), len(self.grid.shape)])
        return np.ascontiguousarray(out)

    def _order(self, axes: Sequence[str]) -> list[int]:
        """The grid axes named by ``axes`` (one parameter per axis), in that order."""
        order = [self.axis(a) for a in axes]
        if sorted(order) != list(range(len(self.grid.shape))):
            raise ValueError(
                f"axes must name each grid axis once, got {tuple(axes)} for the parameters "
                f"{self.grid.names}"
            )
        return order


def stored_run(
    experiment,
    preset: str = "quick",
    overrides: Sequence[str] = (),
    store: str | Path | None = None,
    *,
    progress: bool = False,
) -> StoredRun:
    """Run ``experiment`` at ``preset`` with ``overrides`` into ``store``; read it back.

    The one way figures fetch an experiment's results: ``experiment`` is the
    study's :class:`~isometry.experiments.Experiment` (``trainability.EXPERIMENT``),
    run by its :meth:`~isometry.experiments.Experiment.run_preset` (``optimize``
    only for ``full``) and read on its grid (:meth:`StoredRun.read`). ``store``:
    the results directory (a finished store is read, an interrupted one resumed;
    one holding another configuration is refused,
    :class:`isometry.sweep.ConfigMismatchError`), or ``None`` for a temporary
    directory removed after reading (:func:`results_dir`).
    """
    cfg = experiment.preset_config(preset, overrides)
    with results_dir(store) as out:
        experiment.run_preset(preset, overrides, out, progress=progress)
        return StoredRun.read(sweep.Store(out, experiment.name, cfg), experiment.grid(cfg))
