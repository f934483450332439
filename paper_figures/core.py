"""Run figure scripts: cached results per (figure, tier), figures as PNG and PDF.

:func:`make` computes a figure's data (or reads its cache), plots it and
writes ``<out>/<name>.png`` and ``.pdf``. With ``progress=True`` it reports
each stage (cache read, compute, plot) on stderr, and the figure's
experiments report their points: a figure module reads
:func:`progress_enabled` inside ``compute`` and passes it on, e.g.
``harness.stored_run(trainability.EXPERIMENT, preset, overrides, store,
progress=core.progress_enabled())``. Figures are loaded by name here
(:func:`load_module`, the one place that imports a figure module by its name).
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import hashlib
import importlib
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from isometry import atomic, plotting, runtime
from isometry.paper_figures import FIGURES

__all__ = [
    "TIER_NAMES",
    "caption",
    "default_jobs",
    "load_module",
    "make",
    "make_many",
    "progress_enabled",
]

TIER_NAMES = ("tiny", "quick", "full")

_PROGRESS = contextvars.ContextVar("isometry_figure_progress", default=False)


def progress_enabled() -> bool:
    """Whether the figure being made reports progress (``make(..., progress=True)``).

    ``False`` outside :func:`make`. Figure modules pass it to the experiments
    their ``compute`` runs (``progress=core.progress_enabled()``), so a long
    figure shows its points done / total on stderr.
    """
    return _PROGRESS.get()


def load_module(name: str):
    """The figure module ``name`` (``ValueError`` naming the known figures otherwise)."""
    if name not in FIGURES:
        raise ValueError(f"unknown figure {name!r}; known: {', '.join(FIGURES)}")
    return importlib.import_module(FIGURES[name])


def caption(name: str) -> str:
    """The caption of figure ``name``: its module docstring's first line."""
    return (load_module(name).__doc__ or "").strip().splitlines()[0]


def _fingerprint(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(cache: Path, fp: str) -> dict | None:
    """The arrays cached in ``cache`` if they were made with fingerprint ``fp``, else ``None``."""
    if not cache.exists():
        return None
    with np.load(cache, allow_pickle=False) as z:
        if str(z["_fingerprint"]) != fp:
            return None
        return {k: z[k] for k in z.files if not k.startswith("_")}


def _stage(name: str, text: str) -> None:
    if progress_enabled():
        print(f"[{name}] {text}", file=sys.stderr, flush=True)


def make(
    name: str,
    tier: str = "quick",
    out: str | Path = "paper_figures/out",
    results: str | Path = "results/figures",
    recompute: bool = False,
    *,
    progress: bool = False,
) -> dict:
    """Compute (or load cached) results for figure ``name`` at ``tier``; write PNG and PDF.

    Results are cached in ``results/<name>_<tier>.npz`` together with the
    parameters that produced them; a cache made with other parameters is
    recomputed, never mixed. ``progress=True`` reports the stages on stderr
    and sets :func:`progress_enabled` for the figure's ``compute``.
    Returns ``{"data": ..., "paths": [...], "seconds": ..., "cpu_seconds": ...}`` (wall
    and this process's CPU time, all its threads, of the whole call).
    """
    if tier not in TIER_NAMES:
        raise ValueError(f"tier must be one of {', '.join(TIER_NAMES)}; got {tier!r}")
    module = load_module(name)
    params = dict(module.TIERS[tier])
    fp = _fingerprint(params)
    cache = Path(results) / f"{name}_{tier}.npz"
    t0, c0 = time.perf_counter(), time.process_time()
    token = _PROGRESS.set(bool(progress))
    try:
        data = None if recompute else _cached(cache, fp)
        if data is None:
            _stage(name, f"computing ({tier}) ...")
            with runtime.lapack_threads(1):  # see isometry.runtime
                data = {k: np.asarray(v) for k, v in module.compute(**params).items()}
            atomic.write_npz(cache, _fingerprint=np.asarray(fp), **data)
            _stage(name, f"computed in {time.perf_counter() - t0:.1f} s; cached in {cache}")
        else:
            _stage(name, f"cached results from {cache}")
        fig = module.plot(data, params)
        paths = plotting.save(fig, Path(out) / name)
    finally:
        _PROGRESS.reset(token)
    return {
        "data": data,
        "paths": paths,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
    }


def _make_paths(name, tier, out, results, recompute, progress) -> tuple[str, list, float, float]:
    """:func:`make` in a worker process: the figure's paths, wall and CPU seconds (no arrays)."""
    r = make(name, tier, out, results, recompute, progress=progress)
    return name, r["paths"], r["seconds"], r["cpu_seconds"]


def default_jobs() -> int:
    """Worker processes for :func:`make_many` by default: the CPU cores when JAX computes on
    the CPU, else 1 (processes sharing one accelerator would each claim its memory)."""
    import jax

    if jax.default_backend() != "cpu":
        return 1
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


def _longest_first(names: Sequence[str], tier: str) -> list[str]:
    """``names`` ordered by the figure modules' ``COST[tier]`` (seconds, a scheduling hint;
    0 where a module gives none), longest first, ties in the given order."""
    cost = {n: getattr(load_module(n), "COST", {}).get(tier, 0.0) for n in names}
    return sorted(names, key=lambda n: -cost[n])


def make_many(
    names: Sequence[str],
    tier: str = "quick",
    out: str | Path = "paper_figures/out",
    results: str | Path = "results/figures",
    recompute: bool = False,
    *,
    progress: bool = False,
    jobs: int = 1,
) -> Iterator[tuple[str, list, float]]:
    """:func:`make` each figure of ``names``; yields ``(name, paths, seconds, cpu_seconds)`` as
    each finishes.

    ``jobs == 1`` makes them one after another in this process, in the given
    order. ``jobs > 1`` makes them in that many fresh worker processes
    (``spawn``; each figure computes in one process, as it would alone, so the
    results are the same), longest first by the modules' ``COST`` hints; most
    quick-tier work is small programs that keep one core busy, so two processes
    on two cores finish in about half the time. The first error stops the
    figures not yet started and is raised here.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")
    if jobs == 1 or len(names) < 2:
        for n in names:
            r = make(n, tier, out, results, recompute, progress=progress)
            yield n, r["paths"], r["seconds"], r["cpu_seconds"]
        return
    ctx = multiprocessing.get_context("spawn")
    workers = min(jobs, len(names))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = [
            pool.submit(_make_paths, n, tier, out, results, recompute, progress)
            for n in _longest_first(names, tier)
        ]
        try:
            for f in concurrent.futures.as_completed(futures):
                yield f.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise
