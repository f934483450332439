"""Jacobian singular-value densities at depths 2-128, measured (histograms) with the free-probability prediction (lines): orthogonal sigmoid networks at small q* stay isometric, Gaussian and ReLU networks spread (Pennington, Schoenholz & Ganguli 2017, Fig. 2).

Each panel is one ensemble at its critical point (``chi1 = 1``) for its ``q*``:
linear with Gaussian weights, ReLU and hard-tanh with orthogonal weights, and
tanh / erf with orthogonal against Gaussian weights at ``q* = 1/64, 1/4, 1``
(the quick tier: ``1/64`` and ``1``). Each axis is ``log10 s``, so spectra that
span decades and spectra concentrated at ``s = 1`` read alike; narrow ones get
a zoomed inset.
The measurement is the ``spectra`` experiment (inputs on the ``q*`` sphere,
every depth in one pass), run into a results store; the prediction is
:func:`isometry.freeprob.spectral_law` with its atoms.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from isometry import freeprob, plotting
from isometry.experiments import harness
from isometry.experiments import spectra as spectra_experiment
from isometry.paper_figures import core

KEYS = (
    "depths",
    "activation",
    "weights",
    "q_star",
    "log10_s",
    "theory_x",
    "theory_density",
    "atom_at_zero",
    "atom_location",
    "atom_mass",
)


def _panels(q_stars) -> list[tuple[str, str, float]]:
    """Row 1: linear Gaussian, ReLU and hard-tanh orthogonal; then one row per ``q*``:
    tanh and erf, orthogonal against Gaussian."""
    return [
        ("linear", "gaussian", 1.0),
        ("relu", "orthogonal", 1.0),
        ("hard_tanh", "orthogonal", 0.25),
        ("hard_tanh", "orthogonal", 1.0),
        *[
            (act, w, q)
            for q in q_stars
            for act in ("tanh", "erf")
            for w in ("orthogonal", "gaussian")
        ],
    ]


COST = {"quick": 60}
"""Single-core CPU seconds of the quick tier from empty stores (a scheduling hint for
``isometry figures --jobs``; estimated from loaded runs, see BENCHMARKS.md)."""

TIERS = {
    "tiny": {
        "panels": [("hard_tanh", "orthogonal", 0.25)],
        "depths": (2, 8),
        "width": 32,
        "seeds": 1,
        "points": 40,
        "store": None,
    },
    "quick": {
        "panels": _panels((1 / 64, 1.0)),
        "depths": (2, 8, 32, 128),
        "width": 200,
        "seeds": 2,
        "points": 50,
        "store": "results/experiments/fig04_spectra/quick",
    },
    "full": {
        "panels": _panels((1 / 64, 0.25, 1.0)),
        "depths": (2, 8, 32, 128),
        "width": 1000,
        "seeds": 8,
        "points": 200,
        "store": "results/experiments/fig04_spectra/full",
    },
}

XLIM = (-4.0, 1.5)
"""The log10 s axis: Gaussian spectra reach far below; their mass there is off the axis."""


def _measure(panels, depths, width, seeds, root: Path) -> np.ndarray:
    """Squared singular values ``(P, K, seeds * width)`` from the ``spectra`` experiment.

    One sweep per (activation, weights), over its ``q*`` values and seeds, into
    ``root/<activation>_<weights>_<fingerprint>`` (resumable; a changed
    configuration gets a new directory). Computed in float32 (``log10 s`` on a
    histogram above ``1e-4``, far above float32 rounding).
    """
    found = {}
    for run in spectra_experiment.run_cases(
        panels, depths, width, seeds, root, progress=core.progress_enabled()
    ).values():
        for p in run.points:
            found.setdefault((p["activation"], p["weights"], float(p["q_star"])), []).append(
                run.arrays(p)["sq_singular_values"]
            )
    lam = [np.stack(found[(a, w, float(q))], axis=1) for a, w, q in panels]  # (K, S, N)
    return np.stack([x.reshape(x.shape[0], -1) for x in lam]).astype(np.float64)


def _theory(act, weights, q, depth, log10_s, points):
    """The density of ``log10 s`` on a grid over the axis, denser over the measured bulk.

    ``p(log10 s) = s ln(10) p_s(s)`` with ``p_s`` from the law of
    :func:`isometry.freeprob.spectral_law` in the singular values. Returns
    ``(x, density, atom_at_zero, atom_location (log10 s, NaN if none), atom_mass)``.
    """
    x_edge = 0.5 * np.log10(float(freeprob.max_eigenvalue(act, q, depth, weights)))
    finite = log10_s[np.isfinite(log10_s)]
    lo = max(XLIM[0], float(np.quantile(finite, 0.005)) if finite.size else XLIM[0])
    x = np.concatenate(
        [
            np.linspace(XLIM[0], x_edge, points),
            np.linspace(min(lo, x_edge - 1e-3), x_edge, points // 2),
            x_edge + np.log10(1.0 - np.geomspace(1e-7, 0.02, 8)),
            [x_edge + 1e-3, XLIM[1]],
        ]
    )
    x = np.unique(x[(x >= XLIM[0]) & (x <= max(XLIM[1], x_edge))])
    s = 10.0**x
    # One grid length for every call (padded with its last point): one compilation.
    law = freeprob.spectral_law(
        act, q, depth, weights, s * s, atom_window=0.0, pad_to=2 * points + 16
    )
    s, p_s, locs = law.in_singular_values()
    dens = s * np.log(10.0) * p_s
    loc = float(np.log10(locs[0])) if locs.size else np.nan
    mass = float(law.atom_masses[0]) if law.atom_masses.size else 0.0
    return x, dens, law.atom_at_zero, loc, mass


def compute(panels, depths, width, seeds, points, store) -> dict:
    panels = [(str(a), str(w), float(q)) for a, w, q in panels]
    depths = tuple(int(d) for d in depths)
    with harness.results_dir(store) as root:
        lam = _measure(panels, depths, width, seeds, root)
    with np.errstate(divide="ignore"):
        log10_s = 0.5 * np.log10(np.clip(lam, 0.0, None))
    P, K = len(panels), len(depths)
    G = 2 * points + 16
    tx, td = np.full((P, K, G), np.nan), np.full((P, K, G), np.nan)
    zero, loc, mass = np.zeros((P, K)), np.full((P, K), np.nan), np.zeros((P, K))
    for i, (act, w, q) in enumerate(panels):
        for k, d in enumerate(depths):
            x, dens, zero[i, k], loc[i, k], mass[i, k] = _theory(
                act, w, q, d, log10_s[i, k], points
            )
            tx[i, k, : x.size], td[i, k, : x.size] = x, dens
    return {
        "depths": np.asarray(depths),
        "activation": np.asarray([a for a, _, _ in panels]),
        "weights": np.asarray([w for _, w, _ in panels]),
        "q_star": np.asarray([q for _, _, q in panels]),
        "log10_s": log10_s,
        "theory_x": tx,
        "theory_density": td,
        "atom_at_zero": zero,
        "atom_location": loc,
        "atom_mass": mass,
    }


def _q_text(q: float) -> str:
    inv = 1.0 / q
    return f"1/{round(inv)}" if q < 1 and abs(inv - round(inv)) < 1e-9 else f"{q:g}"


def _title(act: str, weights: str, q: float) -> str:
    name = {"hard_tanh": "hard-tanh", "relu": "ReLU"}.get(act, act)
    if act in ("linear", "relu"):  # laws of phi' that do not depend on q*
        return f"{name}, {weights}"
    return f"{name}, {weights}, $q^*$ = {_q_text(q)}"


def plot(data, params):
    panels = [
        {
            "title": _title(str(a), str(w), float(q)),
            "log10_s": data["log10_s"][i],
            "theory_x": data["theory_x"][i],
            "theory_density": data["theory_density"][i],
            "atom_at_zero": data["atom_at_zero"][i],
            "atom_location": data["atom_location"][i],
            "atom_mass": data["atom_mass"][i],
        }
        for i, (a, w, q) in enumerate(
            zip(data["activation"], data["weights"], data["q_star"], strict=True)
        )
    ]
    return plotting.spectra_grid_figure(panels, data["depths"], ncols=4, xlim=XLIM)
