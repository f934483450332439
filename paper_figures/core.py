"""Run figure scripts: cached results per (figure, tier), figures as PNG and PDF."""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from pathlib import Path

import numpy as np

from isometry import atomic, plotting
from isometry.paper_figures import FIGURES

__all__ = ["caption", "load_module", "make"]

TIER_NAMES = ("tiny", "quick", "full")


def load_module(name: str):
    if name not in FIGURES:
        raise ValueError(f"unknown figure {name!r}; known: {', '.join(FIGURES)}")
    return importlib.import_module(FIGURES[name])


def caption(name: str) -> str:
    return (load_module(name).__doc__ or "").strip().splitlines()[0]


def _fingerprint(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make(
    name: str,
    tier: str = "quick",
    out: str | Path = "paper_figures/out",
    results: str | Path = "results/figures",
    recompute: bool = False,
) -> dict:
    """Compute (or load cached) results for figure ``name`` at ``tier``; write PNG and PDF.

    Results are cached in ``results/<name>_<tier>.npz`` together with the
    parameters that produced them; a cache made with other parameters is
    recomputed, never mixed. Returns ``{"data": ..., "paths": [...], "seconds": ...}``.
    """
    if tier not in TIER_NAMES:
        raise ValueError(f"tier must be one of {', '.join(TIER_NAMES)}; got {tier!r}")
    module = load_module(name)
    params = dict(module.TIERS[tier])
    fp = _fingerprint(params)
    cache = Path(results) / f"{name}_{tier}.npz"
    t0 = time.perf_counter()
    data = None
    if cache.exists() and not recompute:
        with np.load(cache, allow_pickle=False) as z:
            if str(z["_fingerprint"]) == fp:
                data = {k: z[k] for k in z.files if not k.startswith("_")}
    if data is None:
        data = {k: np.asarray(v) for k, v in module.compute(**params).items()}
        atomic.write_npz(cache, _fingerprint=np.asarray(fp), **data)
    fig = module.plot(data, params)
    paths = plotting.save(fig, Path(out) / name)
    return {"data": data, "paths": paths, "seconds": time.perf_counter() - t0}
