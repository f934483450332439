"""Training accuracy of deep tanh networks over (sigma_w2, depth) at sigma_b2 = 0.05, with the mean-field bound 6 xi_c on the trainable depth (Schoenholz et al. 2017, Figs. 5-6) and the depth where the infinite-width NTK's condition number reaches the number of training steps (Xiao et al. 2020): on the ordered side the two bounds agree in shape, on the chaotic side the NTK stays well conditioned and does not predict the measured failure.

Measurement: the ``trainability`` experiment (one training run per
``(sigma_w2, L, seed)`` on the embedded digits); the heat map is the
training-split accuracy after training, averaged over seeds (chance 0.1),
written in each cell.
Theory: ``6 xi_c(sigma_w2)`` (:func:`isometry.meanfield.depth_scales`) and
the edge of chaos ``chi1 = 1``. Runs stopped by a non-finite loss are
marked. The ``quick`` tier trains far fewer steps than the paper, so its
trainable band sits inside the 6 xi_c curve (the paper's Fig. 6 shows the
band filling it as training time grows; between this tier's 400 steps and 600
the band keeps its shape and only the cells at its edges rise noticeably). Its
depths are 10, 25, 50 and 100; each row of the map reaches halfway to its
neighbours, so the row of ``L = 50`` covers 38 to 75 and that of ``L = 100`` the rest.

Right panel: ``log10 kappa``, the condition number of the NTK of
:data:`~isometry.experiments.trainability.NTK_INPUTS` training inputs
(:func:`isometry.experiments.trainability.ntk_condition`, theory only), with
its contour ``kappa = steps`` (also drawn on the left): gradient descent at
its largest stable rate fits the slowest NTK mode after about ``kappa``
steps. In the ordered phase the NTK tends to a constant matrix ``p* 1 1^T``
and ``kappa`` grows exponentially with depth, at a rate set by the decay of
``1 - c^l`` (the same ``chi1`` that sets ``xi_c`` there), so the contour
follows the left branch of ``6 xi_c``: at the quick tier (16 inputs,
``kappa = 400``) it sits at 0.66-0.73 of ``6 xi_c`` (depth 13 vs 19.8 at
``sigma_w2 = 0.96``, 43 vs 60.2 at 1.38, 61 vs 83.5 at 1.47). Compare both
with the measured edge, which the depth grid brackets (the accuracies are
written in the cells). Cells at the edge of the band are single runs whose
outcome is sensitive to float32 rounding: a change that only reorders the
sums in the weight gradients (relative difference about 1e-6) can move them
by tenths, while cells inside or far outside the band hardly move. In the
chaotic phase the NTK's
diagonal grows like ``chi1^l`` while its off-diagonal entries stay bounded:
it tends to a multiple of the identity, ``kappa -> 1`` (Xiao et al. 2020:
such networks can fit the training set but do not generalize), so the NTK
predicts no failure where the measured networks fail to train; these are
width-64 networks with ``L / N`` near 1, far from the infinite-width limit,
trained by RMSProp rather than gradient descent.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from isometry import plotting
from isometry.experiments import harness, trainability
from isometry.paper_figures import core

KEYS = (
    "sigma_w2", "depth", "train_accuracy", "eval_accuracy", "diverged_fraction",
    "sigma_w2_theory", "six_xi_c", "critical_sigma_w2", "sigma_b2", "steps", "width",
    "ntk_sigma_w2", "ntk_depth", "ntk_log10_cond", "ntk_inputs",
)  # fmt: skip

COST = {"quick": 55}
"""Seconds of one CPU core for the quick tier from empty stores (a scheduling hint)."""

TIERS = harness.figure_tiers(
    "trainability",
    (
        "sigma_w2=1.0,1.75,4.0",
        "depths=4",
        "width=16",
        "train.steps=20",
        "train.log_every=10",
    ),
)


NTK_GRID = 41
"""``sigma_w2`` values of the NTK condition-number map."""

COND_CLIP = 8.0
"""``log10 kappa`` shown up to here (the series route is accurate to ~1e-10)."""


def seed_means(run: harness.StoredRun, column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(depths (D,), sigma_w2 (W,), mean (D, W))``: ``column`` averaged over seeds, on the
    sorted distinct depths and ``sigma_w2`` of the run's grid (booleans average to fractions)."""
    v = run.array(column, ("depth", "sigma_w2", "seed")).mean(axis=-1)
    depths, i = np.unique(run.coords("depth"), return_index=True)
    sw, j = np.unique(run.coords("sigma_w2"), return_index=True)
    return depths, sw.astype(float), v[np.ix_(i, j)]


def compute(preset, overrides, store) -> dict:
    run = harness.stored_run(
        trainability.EXPERIMENT, preset, overrides, store, progress=core.progress_enabled()
    )
    cfg = run.config
    depths, sw, train_acc = seed_means(run, "train_accuracy")
    edges = _edges(sw)
    sw_th = np.linspace(max(edges[0], 0.05), edges[-1], 601)
    th = trainability.theory(cfg.activation, sw_th, cfg.sigma_b2)
    sw_ntk = np.linspace(sw_th[0], sw_th[-1], NTK_GRID)
    x = harness.load_data(cfg.dataset).x_train[: trainability.NTK_INPUTS]
    max_depth = int(_edges(depths)[-1])
    cond = trainability.ntk_condition(cfg.activation, sw_ntk, cfg.sigma_b2, x, max_depth)
    return {
        "sigma_w2": sw,
        "depth": depths,
        "train_accuracy": train_acc,
        "eval_accuracy": seed_means(run, "eval_accuracy")[2],
        "diverged_fraction": seed_means(run, "diverged")[2],
        "sigma_w2_theory": sw_th,
        "six_xi_c": 6.0 * th["xi_c"],
        "critical_sigma_w2": th["critical_sigma_w2"],
        "sigma_b2": np.asarray(cfg.sigma_b2),
        "steps": np.asarray(cfg.train.steps),
        "width": np.asarray(cfg.width),
        "ntk_sigma_w2": sw_ntk,
        "ntk_depth": np.arange(1, max_depth + 1),
        "ntk_log10_cond": cond,
        "ntk_inputs": np.asarray(len(x)),
    }


def _edges(centres) -> np.ndarray:
    """Cell edges halfway between sorted centres (the outer ones mirrored)."""
    c = np.asarray(centres, float)
    if c.size == 1:
        return np.array([c[0] - 0.5, c[0] + 0.5])
    mid = (c[1:] + c[:-1]) / 2
    return np.concatenate([[2 * c[0] - mid[0]], mid, [2 * c[-1] - mid[-1]]])


def plot(data, params):
    plotting.style()
    fig, (ax, ax_ntk) = plt.subplots(
        1, 2, figsize=(12.4, 4.8), constrained_layout=True, width_ratios=(1.0, 1.0)
    )
    _accuracy_panel(fig, ax, data)
    _ntk_panel(fig, ax_ntk, data)
    return fig


def _theory_lines(ax, data) -> None:
    """6 xi_c, the edge of chaos and the contour ``kappa = steps`` of the NTK."""
    bound = np.asarray(data["six_xi_c"])
    ax.plot(data["sigma_w2_theory"], bound, color="white", lw=2.6)
    ax.plot(
        data["sigma_w2_theory"], bound, color=plotting.THEORY_COLOR, lw=1.3, ls="--",
        label=r"$6\,\xi_c$ (mean-field theory)",
    )  # fmt: skip
    crit = float(data["critical_sigma_w2"])
    ax.axvline(crit, color="white", lw=1.0, ls=":")
    ax.axvline(
        crit, color="tab:red", lw=1.0, ls=(0, (2, 3)),
        label=rf"edge of chaos $\sigma_w^2 = {crit:.2f}$",
    )  # fmt: skip
    steps = int(data["steps"])
    cond = np.minimum(np.asarray(data["ntk_log10_cond"]), COND_CLIP)
    if np.nanmin(cond) < np.log10(steps) < np.nanmax(cond):
        kw = {"levels": [np.log10(steps)], "linewidths": 1.6}
        sw, depth = data["ntk_sigma_w2"], data["ntk_depth"]
        ax.contour(sw, depth, cond.T, colors="white", **kw)
        ax.contour(sw, depth, cond.T, colors="tab:orange", linestyles="-.", **kw)
    ax.plot([], [], color="tab:orange", ls="-.", label=rf"NTK $\kappa = {steps}$ (= steps)")


def _accuracy_panel(fig, ax, data) -> None:
    sw, depth = np.asarray(data["sigma_w2"]), np.asarray(data["depth"])
    acc = np.asarray(data["train_accuracy"])
    xe, ye = _edges(sw), _edges(depth)
    im = ax.pcolormesh(xe, ye, acc, cmap="viridis", vmin=0.0, vmax=1.0, shading="flat")
    fig.colorbar(im, ax=ax, label="training-set accuracy after training (chance 0.1)")
    for i, j in zip(*np.nonzero(np.isfinite(acc)), strict=True):  # the numbers, from the data
        y = ye[i] + 0.72 * (ye[i + 1] - ye[i])  # above a divergence marker at the centre
        ax.text(sw[j], y, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=6.5,
                color="white" if acc[i, j] < 0.6 else "black")  # fmt: skip
    _theory_lines(ax, data)
    div = np.asarray(data["diverged_fraction"])
    ii, jj = np.nonzero(div > 0)
    if ii.size:
        ax.plot(sw[jj], depth[ii], "x", color="tab:red", ms=7, mew=1.5, label="diverged (NaN)")
    ax.set_xlim(xe[0], xe[-1])
    ax.set_ylim(ye[0], ye[-1])
    ax.set_yticks(depth)
    ax.set_xlabel(r"weight variance $\sigma_w^2$")
    ax.set_ylabel(r"depth $L$ (hidden layers)")
    ax.set_title(
        rf"Trainability, tanh, $\sigma_b^2={float(data['sigma_b2']):g}$: "
        rf"width {int(data['width'])}, {int(data['steps'])} steps"
    )
    ax.legend(loc="upper right", framealpha=0.9, fontsize="small")


def _ntk_panel(fig, ax, data) -> None:
    sw, depth = np.asarray(data["ntk_sigma_w2"]), np.asarray(data["ntk_depth"])
    cond = np.minimum(np.asarray(data["ntk_log10_cond"]), COND_CLIP)
    im = ax.pcolormesh(
        _edges(sw), _edges(depth), cond.T, cmap="magma_r", vmin=0.0, vmax=COND_CLIP,
        shading="flat",
    )  # fmt: skip
    fig.colorbar(im, ax=ax, label=rf"$\log_{{10}}\kappa$ of the NTK (clipped at {COND_CLIP:g})")
    _theory_lines(ax, data)
    ax.set_xlim(sw[0], sw[-1])
    ax.set_ylim(0.5, depth[-1] + 0.5)
    ax.set_xlabel(r"weight variance $\sigma_w^2$")
    ax.set_ylabel(r"depth $L$ (hidden layers)")
    ax.set_title(rf"Infinite-width NTK condition number, {int(data['ntk_inputs'])} training inputs")
    ax.legend(loc="upper right", framealpha=0.9, fontsize="small")
