"""Largest eigenvalue and variance of J J^T vs depth, orthogonal against Gaussian weights: free probability (lines) and measured networks (markers); orthogonal tanh at small q* stays flat, everything else grows with depth (Pennington, Schoenholz & Ganguli 2017, Figs. 3-4; 2018).

Theory: the right edge of the support (:func:`isometry.freeprob.max_eigenvalue`)
and ``Var = L (mu2 / mu1^2 - 1 - s1)`` (:func:`isometry.freeprob.jacobian_moments`)
at criticality. Measurement: the ``spectra`` experiment's table (per-seed largest
squared singular value and variance of the squared singular values), shown as
the geometric mean over seeds with bars of one geometric standard deviation
(log axes; deep networks' largest eigenvalues fluctuate by factors). At finite
width the deep points fall below the wide-network lines: the limit holds for
``L / N -> 0``. Figure 14 gives the exact finite-width law of the gain
``||J u||^2 / ||u||^2`` of Gaussian linear and ReLU networks (Hanin & Nica
2019): its mean stays at the wide-network value, but its log spreads with
variance ``2 L / N`` (linear) and ``5 L / N`` (ReLU), so geometric means over
a few seeds (the markers here) sit below the mean, by ``exp(-5 L / 2N)`` for
the gain of a ReLU network; the expected second moment of the linear
network's spectrum is above free probability's (``2.3 N`` against ``N + 1``
at ``L = N``). The finite-width law of the largest eigenvalue is not derived
here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from isometry import freeprob, plotting
from isometry.experiments import harness
from isometry.experiments import spectra as spectra_experiment
from isometry.paper_figures import core

KEYS = (
    "case_activation",
    "case_weights",
    "case_q_star",
    "depth",
    "max_measured",
    "var_measured",
    "depth_theory",
    "max_theory",
    "var_theory",
)

# (activation, q*) per column; each with orthogonal and Gaussian weights (linear: Gaussian
# only, since linear orthogonal networks are exact isometries with variance 0).
_CASES = [
    ("tanh", "orthogonal", 1 / 64),
    ("tanh", "gaussian", 1 / 64),
    ("tanh", "orthogonal", 1.0),
    ("tanh", "gaussian", 1.0),
    ("relu", "orthogonal", 1.0),
    ("relu", "gaussian", 1.0),
    ("linear", "gaussian", 1.0),
]

COST = {"quick": 22}
"""Single-core CPU seconds of the quick tier from empty stores (a scheduling hint for
``isometry figures --jobs``; estimated from loaded runs, see BENCHMARKS.md)."""

TIERS = {
    "tiny": {
        "cases": [("relu", "orthogonal", 1.0), ("relu", "gaussian", 1.0)],
        "depths": (1, 2, 4),
        "width": 16,
        "seeds": 2,
        "store": None,
    },
    "quick": {
        "cases": _CASES,
        "depths": (1, 2, 4, 8, 16, 32, 64, 128),
        "width": 200,
        "seeds": 3,
        "store": "results/experiments/fig05_spectral_edge/quick",
    },
    "full": {
        "cases": _CASES,
        "depths": (1, 2, 4, 8, 16, 32, 64, 128),
        "width": 1000,
        "seeds": 8,
        "store": "results/experiments/fig05_spectral_edge/full",
    },
}


def _measure(cases, depths, width, seeds, root: Path) -> list[dict]:
    """Per case: the ``spectra`` table's ``max`` and ``var`` per depth, ``(seeds, K)`` each.

    One sweep per (activation, weights) over its ``q*`` values, into
    ``root/<activation>_<weights>_<fingerprint>`` (float32), read on its grid
    ``(activation, weights, q_star, seed)`` with a row per depth.
    """
    runs = spectra_experiment.run_cases(
        cases, depths, width, seeds, root, progress=core.progress_enabled()
    )
    found = []
    for act, w, q in cases:
        run = runs[(act, w)]
        axes = ("q_star", "seed", "activation", "weights")
        iq = int(np.flatnonzero(np.isclose(run.coords("q_star"), q, rtol=1e-12))[0])
        row_depths = list(run.array("depth", axes, rows=True)[iq, 0, 0, 0])
        k = [row_depths.index(d) for d in depths]
        found.append({c: run.array(c, axes, rows=True)[iq, :, 0, 0][:, k] for c in ("max", "var")})
    return found


def _theory(act, weights, q, depths):
    """Wide-network edge and variance of the eigenvalues of ``J J^T`` at each depth."""
    mx = [freeprob.max_eigenvalue(act, q, int(d), weights) for d in depths]
    var = [float(freeprob.jacobian_moments(act, q, int(d), weights).variance) for d in depths]
    return np.asarray(mx), np.asarray(var)


def compute(cases, depths, width, seeds, store) -> dict:
    cases = [(str(a), str(w), float(q)) for a, w, q in cases]
    depths = tuple(int(d) for d in depths)
    with harness.results_dir(store) as root:
        measured = _measure(cases, depths, width, seeds, root)
    dt = np.unique(np.round(np.geomspace(1, max(depths), 24)).astype(int))
    theory = [_theory(a, w, q, dt) for a, w, q in cases]
    return {
        "case_activation": np.asarray([a for a, _, _ in cases]),
        "case_weights": np.asarray([w for _, w, _ in cases]),
        "case_q_star": np.asarray([q for _, _, q in cases]),
        "depth": np.asarray(depths),
        "max_measured": np.stack([m["max"] for m in measured]),
        "var_measured": np.stack([m["var"] for m in measured]),
        "depth_theory": dt,
        "max_theory": np.stack([t[0] for t in theory]),
        "var_theory": np.stack([t[1] for t in theory]),
    }


def _q_text(q: float) -> str:
    inv = 1.0 / q
    return f"1/{round(inv)}" if q < 1 and abs(inv - round(inv)) < 1e-9 else f"{q:g}"


def plot(data, params):
    columns: dict[str, dict] = {}
    colors = {"orthogonal": "C0", "gaussian": "C3"}
    for i, (a, w, q) in enumerate(
        zip(data["case_activation"], data["case_weights"], data["case_q_star"], strict=True)
    ):
        a, w, q = str(a), str(w), float(q)
        group = "ReLU / linear" if a in ("relu", "linear") else f"{a}, $q^*$ = {_q_text(q)}"
        col = columns.setdefault(group, {"title": group, "cases": []})
        name = {"relu": "ReLU"}.get(a, a)
        col["cases"].append(
            {
                "label": f"{name}, {w}",
                "color": "0.35" if a == "linear" else colors[w],
                "ls": "-" if w == "orthogonal" else "--",
                "marker": "o" if w == "orthogonal" else "s",
                "depth_theory": data["depth_theory"],
                "max_theory": data["max_theory"][i],
                "var_theory": data["var_theory"][i],
                "depth": data["depth"],
                "max_measured": data["max_measured"][i],
                "var_measured": data["var_measured"][i],
            }
        )
    return plotting.spectral_edge_figure(list(columns.values()))
