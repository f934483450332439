"""Gradient clipping in an exploding-gradient regime (deep ReLU, sigma_w2 = 2.5 > 2): training loss and gradient norms without clipping and with global-norm, value and adaptive clipping, the unclipped run's divergence marked (Pascanu, Mikolov & Bengio 2013; Brock et al. 2021).

Measurement: the ``clipping`` experiment (plain SGD on the embedded digits,
one network, initialization and data order for every rule). Left: the
training-batch loss; an x marks the step at which a run stopped with a
non-finite loss or gradient. Middle: the global gradient norm before
clipping (solid) and after (dotted). Right: the per-layer gradient norm
``||dLoss/dW^l||`` at the first step (markers) with the mean-field profile
(line, scale fitted),

    ||dLoss/dW^l||^2  ~  prod_{k=l}^{L-1} sigma_w2 E[phi'(h^k)^2]  x  (q^l - sigma_b2),

where ``q^l`` follows the length map from the data's first layer; for
ReLU the backward growth ``sigma_w2 / 2`` per layer cancels the forward
growth of ``q^l``, so the profile is flat while its overall scale (and the
initial loss) grows like ``(sigma_w2 / 2)^L``.
"""

from __future__ import annotations

import jax
import matplotlib.pyplot as plt
import numpy as np

from isometry import gaussian, meanfield, plotting, signal
from isometry.experiments import clipping, harness
from isometry.paper_figures import core

KEYS = (
    "clips", "step", "loss", "grad_norm", "grad_norm_clipped", "diverged_step",
    "layer", "grad_norm_layers_initial", "layer_theory", "train_accuracy", "eval_accuracy",
    "chi1", "depth", "sigma_w2", "width", "learning_rate", "activation",
)  # fmt: skip

COST = {"quick": 10}
"""Seconds of one CPU core for the quick tier from empty stores (a scheduling hint)."""

TIERS = harness.figure_tiers(
    "clipping",
    (
        "clips=none,global_norm:1",
        "depth=6",
        "width=16",
        "train.steps=6",
        "train.eval_every=3",
    ),
)


def layer_profile(activation, sigma_w2, sigma_b2, q1, depth) -> np.ndarray:
    """Mean-field ``||dLoss/dW^l||^2`` for ``l = 1..L``, up to one constant factor.

    ``q^1 = q1`` then the length map; ``chi^k = sigma_w2 E[phi'(sqrt(q^k) z)^2]``;
    ``g_l^2 = prod_{k=l}^{L-1} chi^k (q^l - sigma_b2)``, normalized to ``g_L^2 = 1``.
    """
    with jax.enable_x64(True):
        q = np.asarray([q1], float)
        if depth > 1:
            rest = meanfield.iterate_q_map(activation, q1, sigma_w2, sigma_b2, depth - 1)
            q = np.concatenate([q, np.asarray(rest, float)])
        chi = sigma_w2 * gaussian.dphi_moment(activation, q)
        # gain^l = chi^l (proportional to mu1(q^l)); p^{l-1} proportional to q^l - sigma_b2.
        g2 = signal.gradient_profile(chi, chi, np.maximum(q - sigma_b2, 1e-300))[2]
        return np.asarray(g2, float)


def compute(preset, overrides, store) -> dict:
    run = harness.stored_run(
        clipping.EXPERIMENT, preset, overrides, store, progress=core.progress_enabled()
    )
    cfg = run.config
    T = cfg.train.steps // cfg.train.log_every
    # (clip, seed): the grid's axes; curves along a last axis of T logged steps
    out = {k: run.stack(k, T) for k in ("loss", "grad_norm", "grad_norm_clipped")}
    layers0 = np.full((cfg.depth,), np.nan)
    for p in run.points:  # the first seed-0 run that logged a step (not all NaN)
        a = run.arrays(p)
        if p["seed"] == 0 and a["grad_norm_layers"].shape[0] and np.isnan(layers0).all():
            layers0 = a["grad_norm_layers"][0]
    diverged, train_acc, eval_acc = (
        run.array(c).astype(float) for c in ("diverged_step", "train_accuracy", "eval_accuracy")
    )
    ds = harness.load_data(cfg.dataset)
    q1 = cfg.sigma_w2 * float(np.mean(np.square(ds.x_train, dtype=np.float64))) + cfg.sigma_b2
    return {
        "clips": np.asarray(cfg.clips),
        "step": (np.arange(T) + 1) * cfg.train.log_every,
        **out,
        "diverged_step": diverged,
        "layer": np.arange(1, cfg.depth + 1),
        "grad_norm_layers_initial": layers0,
        "layer_theory": np.sqrt(
            layer_profile(cfg.activation, cfg.sigma_w2, cfg.sigma_b2, q1, cfg.depth)
        ),
        "train_accuracy": train_acc,
        "eval_accuracy": eval_acc,
        "chi1": np.asarray(float(run.array("chi1").flat[0])),
        "depth": np.asarray(cfg.depth),
        "sigma_w2": np.asarray(cfg.sigma_w2),
        "width": np.asarray(cfg.width),
        "learning_rate": np.asarray(cfg.train.learning_rate),
        "activation": np.asarray(cfg.activation),
    }


_COLORS = ("black", "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")


def _label(clip: str, acc: float) -> str:
    return f"{clip} (held-out acc. {acc:.2f})" if np.isfinite(acc) else clip


def plot(data, params):
    plotting.style()
    clips = [str(c) for c in data["clips"]]
    step = np.asarray(data["step"])
    fig, (ax_l, ax_g, ax_p) = plt.subplots(1, 3, figsize=(14.5, 4.3), constrained_layout=True)
    for c, clip in enumerate(clips):
        color = _COLORS[c % len(_COLORS)]
        acc = np.nanmean(np.asarray(data["eval_accuracy"])[c])
        for r in range(np.asarray(data["loss"]).shape[1]):
            first = r == 0
            loss = np.asarray(data["loss"])[c, r]
            ax_l.plot(step, loss, color=color, lw=1.2, alpha=1.0 if first else 0.4,
                      label=_label(clip, acc) if first else None)  # fmt: skip
            g, gc = np.asarray(data["grad_norm"])[c, r], np.asarray(data["grad_norm_clipped"])[c, r]
            ax_g.plot(step, g, color=color, lw=1.2, alpha=1.0 if first else 0.4,
                      label=clip if first else None)  # fmt: skip
            if clip != "none":
                ax_g.plot(step, gc, color=color, lw=1.4, ls=":", alpha=1.0 if first else 0.4)
            d = np.asarray(data["diverged_step"])[c, r]
            if np.isfinite(d):
                ok = np.isfinite(loss)
                y = loss[ok][-1] if ok.any() else np.nan
                ax_l.plot([d], [y], "x", color="tab:red", ms=10, mew=2)
                ax_l.annotate(f"non-finite at step {int(d)}", (d, y), textcoords="offset points",
                              xytext=(8, 4), color="tab:red", fontsize=8)  # fmt: skip
    ax_l.set_yscale("log")
    ax_l.set_xlabel("training step")
    ax_l.set_ylabel("training-batch loss")
    ax_l.set_title("Loss (x: run stopped, non-finite)")
    ax_l.legend(fontsize=8)
    ax_g.set_yscale("log")
    ax_g.set_xlabel("training step")
    ax_g.set_ylabel(r"global gradient norm $\|g\|$")
    ax_g.set_title("Gradient norm: before (solid), after clipping (dotted)")
    ax_g.legend(fontsize=8)
    layer = np.asarray(data["layer"])
    meas = np.asarray(data["grad_norm_layers_initial"])
    theory = np.asarray(data["layer_theory"])
    ax_p.plot(layer, meas, "o", ms=4, mfc="none", color="tab:blue", label="measured, step 1")
    scale = plotting.log_fit_scale(meas, theory)
    ax_p.plot(layer, scale * theory, color=plotting.THEORY_COLOR, lw=1.4,
              label="mean-field profile (scale fitted)")  # fmt: skip
    ax_p.text(
        0.03, 0.05,
        r"theory: $\|\partial L/\partial W^l\|^2 \propto \prod_{k \geq l} \chi^k \,(q^l - \sigma_b^2)$",
        transform=ax_p.transAxes, fontsize=8, color=plotting.THEORY_COLOR,
    )  # fmt: skip
    ax_p.set_yscale("log")
    ax_p.set_xlabel(r"layer $l$")
    ax_p.set_ylabel(r"$\|\partial \mathrm{Loss} / \partial W^l\|$")
    ax_p.set_title(rf"Per-layer gradients at initialization ($\chi_1={float(data['chi1']):.3g}$)")
    ax_p.legend(fontsize=8)
    if np.any(meas > 0):
        ax_p.set_ylim(np.nanmin(meas[meas > 0]) / 4, np.nanmax(meas) * 4)
    fig.suptitle(
        rf"{data['activation']} network, $\sigma_w^2={float(data['sigma_w2']):g}$, "
        rf"depth {int(data['depth'])}, width {int(data['width'])}; "
        rf"SGD, learning rate {float(data['learning_rate']):g}"
    )
    return fig
