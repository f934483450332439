"""Learning speed at criticality: orthogonal vs Gaussian weights for tanh at small and large q* and for ReLU; loss curves at fixed depth, steps to a held-out accuracy vs depth, and the Jacobian spectrum's spread at initialization (Pennington, Schoenholz & Ganguli 2017, Figs. 4-5).

Measurement: the ``learning_speed`` experiment (SGD, learning rate scaled
as ``1/L``, embedded digits). Top row: held-out loss against training step
at the deepest depth, one panel per setting. Bottom left: the first step at
which held-out accuracy reaches the threshold, against depth (open markers
at the top edge: not reached within the run). Bottom right: the variance of
the squared singular values ``lambda`` of the input-output Jacobian at
initialization, ``Var(lambda) / mean(lambda)^2`` measured (markers) against
free probability (lines, where ``mean = 1``), ``Var = L (mu2 / mu1^2 - 1 - s1)``.
Orthogonal tanh at small ``q*`` keeps that spread near zero (dynamical
isometry) and learns at a speed that does not grow with depth: at the largest
depth it is the fastest (with orthogonal tanh at ``q* = 1/4``), while at the
smallest the larger ``q*``, with more gain per layer and a spread still small,
learn faster. Where
the spread is large and ``L`` exceeds the width, the few sampled
eigenvalues miss the heavy tail, so the measured spread of the
non-isometric networks falls below the infinite-width prediction. The
expectation itself does not fall: at finite width it is larger still (for
Gaussian linear networks exactly ``m2 = 2.3 N`` at ``L = N`` against free
probability's ``N + 1``, figure 14), while a typical network's gain sits
below the mean by ``exp(-5 L / 2N)`` (ReLU) with a log-variance of
``5 L / N`` (Hanin & Nica 2019); a few seeds see typical networks.

Quick tier: the experiment's quick preset (width 64, one seed per point) at
depths 16 and 128 only and for 300 steps (the preset: depths 16, 48, 128 and
400 steps); the learning-time lines join the two measured depths.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from isometry import plotting
from isometry.experiments import harness
from isometry.experiments import learning_speed as ls
from isometry.paper_figures import core

KEYS = (
    "settings", "inits", "depth", "steps_to_accuracy", "jac_var", "jac_mean", "jac_var_theory",
    "curve_depth", "eval_step", "eval_loss", "step", "loss", "threshold", "steps",
    "q_star", "sigma_w2",
)  # fmt: skip

COST = {"quick": 22}
"""Seconds of one CPU core for the quick tier from empty stores (a scheduling hint)."""

TIERS = harness.figure_tiers(
    "learning_speed",
    (
        "settings=tanh:1/64",
        "depths=3",
        "width=16",
        "train.steps=20",
        "train.log_every=5",
        "train.eval_every=5",
    ),
    # quick: the preset's shallowest and deepest depths (not 48 between them), 300 of its 400 steps
    quick_overrides=("depths=16,128", "train.steps=300"),
)


def compute(preset, overrides, store) -> dict:
    run = harness.stored_run(
        ls.EXPERIMENT, preset, overrides, store, progress=core.progress_enabled()
    )
    cfg = run.config
    depths = np.asarray(cfg.depths, int)
    # (setting, init, depth, seed), the grid's axes
    t_acc, jac, jac_mean = (
        run.array(c).astype(float) for c in ("steps_to_accuracy", "jac_sv2_var", "jac_sv2_mean")
    )
    jac_th = run.array("jac_var_theory").astype(float)[..., -1]  # theory: the same for each seed
    deepest = int(depths.max())
    tc = cfg.train
    n_eval = tc.steps // tc.eval_every + 1 if tc.eval_every else 2
    n_log = tc.steps // tc.log_every
    eval_step = np.arange(n_eval) * tc.eval_every
    step = (np.arange(n_log) + 1) * tc.log_every
    at = int(np.flatnonzero(depths == deepest)[0])  # curves of the deepest networks
    eval_loss = run.stack("eval_loss", n_eval, ("setting", "init", "seed", "depth"))[..., at, :]
    loss = run.stack("loss", n_log, ("setting", "init", "seed", "depth"))[..., at, :]
    crit = [ls.critical_setting(s) for s in cfg.settings]
    return {
        "settings": np.asarray(cfg.settings),
        "inits": np.asarray(cfg.inits),
        "depth": depths,
        "steps_to_accuracy": t_acc,
        "jac_var": jac,
        "jac_mean": jac_mean,
        "jac_var_theory": jac_th,
        "curve_depth": np.asarray(deepest),
        "eval_step": eval_step,
        "eval_loss": eval_loss,
        "step": step,
        "loss": loss,
        "threshold": np.asarray(cfg.accuracy_threshold),
        "steps": np.asarray(tc.steps),
        "q_star": np.asarray([c["q_star"] for c in crit]),
        "sigma_w2": np.asarray([c["sigma_w2"] for c in crit]),
    }


_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
_STYLE = {"orthogonal": ("-", "o"), "gaussian": ("--", "s")}


def _label(setting: str, sw: float) -> str:
    act, q = (t.strip() for t in setting.split(":"))
    return rf"{act}, $q^*={q}$ ($\sigma_w^2={sw:.3g}$)"


def _seed_mean(v: np.ndarray) -> np.ndarray:
    """Mean over the last axis of the finite entries; NaN where none is finite."""
    n = np.isfinite(v).sum(-1)
    return np.where(n > 0, np.nansum(np.where(np.isfinite(v), v, 0.0), -1) / np.maximum(n, 1),
                    np.nan)  # fmt: skip


def _depth_axis(ax, depth) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(depth))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(int(d)) for d in depth])
    ax.set_xlim(depth.min() / 1.25, depth.max() * 1.25)
    ax.set_xlabel(r"depth $L$ (hidden layers)")


def plot(data, params):
    plotting.style()
    settings, inits = [str(s) for s in data["settings"]], [str(i) for i in data["inits"]]
    sw = np.asarray(data["sigma_w2"])
    S = len(settings)
    depth = np.asarray(data["depth"])
    steps = int(data["steps"])
    fig = plt.figure(figsize=(max(3.3 * S, 9.0), 7.6), constrained_layout=True)
    sub_top, sub_bottom = fig.subfigures(2, 1, height_ratios=(1.0, 1.1))
    top = np.atleast_1d(sub_top.subplots(1, S, sharey=True))
    ax_t, ax_j = sub_bottom.subplots(1, 2)
    ev_step = np.asarray(data["eval_step"])
    eval_loss = np.asarray(data["eval_loss"])
    for k, (ax, s) in enumerate(zip(top, settings, strict=True)):
        for i, init in enumerate(inits):
            ls_ = _STYLE.get(init, ("-", "o"))[0]
            for r, c in enumerate(eval_loss[k, i]):
                ax.plot(ev_step, c, color=_COLORS[k % 6], ls=ls_, lw=1.4,
                        alpha=1.0 if r == 0 else 0.35, label=init if r == 0 else None)  # fmt: skip
        ax.axhline(np.log(10), color="0.6", lw=0.8, ls=":")
        ax.set_title(_label(s, sw[k]), fontsize=9)
        ax.set_xlabel("training step")
        ax.set_xlim(0, steps)
        ax.legend(title=f"L = {int(data['curve_depth'])}", fontsize=8, title_fontsize=8,
                  loc="lower left")  # fmt: skip
    top[0].set_ylabel("held-out loss (dotted: chance, log 10)")
    top[0].set_ylim(0, max(2.6, float(np.nanmax(eval_loss[..., :1], initial=0)) * 1.1))
    t_acc = _seed_mean(np.asarray(data["steps_to_accuracy"]))
    var = np.asarray(data["jac_var"]) / np.asarray(data["jac_mean"]) ** 2
    jac = _seed_mean(var)
    jac_th = np.asarray(data["jac_var_theory"])
    miss_y = steps * 1.12
    for k in range(S):
        for i, init in enumerate(inits):
            ls_, mk = _STYLE.get(init, ("-", "o"))
            color = _COLORS[k % 6]
            y = t_acc[k, i]
            ax_t.plot(depth, y, color=color, ls=ls_, marker=mk, ms=5, lw=1.3)
            miss = ~np.isfinite(y)
            jitter = 1.0 + 0.035 * (2 * k + i - S)
            ax_t.plot(depth[miss] * jitter, np.full(miss.sum(), miss_y), ls="none", marker=mk,
                      ms=6, mfc="none", color=color)  # fmt: skip
            ax_j.plot(depth, jac_th[k, i], color=color, ls=ls_, lw=1.3)
            ax_j.plot(depth, jac[k, i], ls="none", marker=mk, ms=5, mfc="none", color=color)
    ax_t.axhline(steps, color="0.6", lw=0.8, ls=":")
    # above the row of open markers, which can stand at the smallest depth too
    ax_t.text(depth.min() / 1.2, steps * 1.21, f"not reached in {steps} steps", va="center",
              ha="left", fontsize=8, color="0.35")  # fmt: skip
    _depth_axis(ax_t, depth)
    ax_t.set_ylabel(f"steps to {float(data['threshold']):.0%} held-out accuracy")
    ax_t.set_ylim(0, steps * 1.28)
    ax_t.set_title("Learning time vs depth (SGD, learning rate ~ 1/L)", fontsize=10)
    _depth_axis(ax_j, depth)
    ax_j.set_yscale("log")
    ax_j.set_ylabel(r"spread $\mathrm{Var}\,\lambda / (\mathrm{mean}\,\lambda)^2$ of $JJ^T$")
    ax_j.set_title(
        "Jacobian at initialization: free probability (lines), measured (markers)", fontsize=10
    )
    handles = [
        plt.Line2D([], [], color=_COLORS[k % 6], lw=2, label=_label(s, sw[k]))
        for k, s in enumerate(settings)
    ] + [
        plt.Line2D([], [], color="0.3", ls=_STYLE.get(i, ("-", "o"))[0],
                   marker=_STYLE.get(i, ("-", "o"))[1], label=i)
        for i in inits
    ]  # fmt: skip
    ax_t.legend(
        handles=handles, fontsize=7, loc="center right", bbox_to_anchor=(1.0, 0.6), framealpha=0.9
    )
    return fig
