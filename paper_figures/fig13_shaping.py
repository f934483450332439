"""Kernel shaping: held-out accuracy after a fixed budget vs depth for vanilla networks with DKS/TAT activations, edge-of-chaos tanh, batch-normalized ResNets and weighted ResNets shaped through their own structure, with the learning-rate sensitivity of DKS tanh and the compound C-maps (Martens et al. 2021; Zhang et al. 2022).

Measurement (left): the ``shaping`` experiment, one Adam run per (variant,
depth, seed) at one learning rate and budget, held-out accuracy averaged
over seeds (chance 0.1); a cross marks a run stopped by a non-finite loss.
The quick tier trains two depths, 20 and 100 (every claim below is made at the largest;
the full tier trains five, 20 to 200).
Circles are vanilla chains and the toolkit's ResNet with batch norm; squares
are weighted ResNets (``w x + sqrt(1 - w^2) f(x)``, two nonlinear layers per
branch, no normalization unless said) whose DKS/TAT activations were solved
through the subnetwork maximizing function the theory engine read off the
model (``shaping.subnet_max_func``). Middle: DKS tanh and DKS softplus at the
largest depth against Adam's learning rate (the dashed line is the rate of
the left panel). Theory (right): the compound C-map of each shaped network at
the largest depth: ``C^L`` for the chains
(:func:`isometry.experiments.shaping.theory`), the model's structure composed
with the local C-map for the weighted ResNets (DKS: ``C_f(0) = 0`` and largest
slope ``zeta``; TAT: largest ``C_f(0)`` ``residual_eta``), and the nearly
constant map of edge-of-chaos tanh, the degeneration kernel shaping prevents
and the network that falls to chance with depth.

Where theory and measurement part, and why. DKS tanh and DKS softplus have
the same compound C-map (the dashed curve lies on the solid one), yet DKS
tanh falls at the largest depth at the left panel's rate: the middle panel
shows why. Below that rate DKS tanh trains as well as DKS softplus; at it, it does
not. The initial kernel is the same; what differs is how far training moves the
network from it: at that rate the second moment of DKS tanh's pre-activations grows
during training far beyond the ``q = 1`` the transform was solved at, in the middle
of the network (softplus's stays near it), and there the shaped tanh is far more
nonlinear (its local ``C'(1)`` grows with ``q``, and 100 layers compound the
excess). The shaping conditions fix the kernel at initialization only; the stable
step size is a property of the transform, and Martens et al. tune it (with K-FAC).
The weighted ResNets (single runs): shaped through their own structure they train at
every depth; at the largest depth DKS's keeps clearly more accuracy than the same
network with plain ReLU (whose signal and gradients shrink layer by layer: ReLU is
not normalized), TAT's a little more, and both far more than the same network with
batch norm, which does not train there: its gradients grow backwards through the
batch-normalized layers (Yang et al. 2019), which weighted shortcuts do not tame at
this depth. The toolkit's own ResNet with batch norm (unweighted sums, one layer per
block) trains, less well than the shaped networks.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from isometry import plotting
from isometry.experiments import harness, shaping
from isometry.paper_figures import core

KEYS = ("variants", "depth", "eval_accuracy", "diverged", "c", "c_maps", "c_map_variants", "theory_depth",
        "steps", "width", "zeta", "eta", "residual_eta", "learning_rate", "lr_sweep", "lr_variants", "lr_accuracy")  # fmt: skip

LR_SWEEP = (3e-4,)
"""Adam learning rates of the sensitivity panel (DKS tanh vs DKS softplus at the largest depth)
besides the experiment's own, whose runs the panel shares with the depth panel."""
LR_VARIANTS = ("dks_tanh", "dks_softplus")

COST = {"quick": 90}
"""Seconds of one CPU core for the quick tier from empty stores (a scheduling hint)."""

TIERS = harness.figure_tiers(
    "shaping",
    ("variants=resnet_bn,wresnet_dks_softplus", "depths=2", "train.steps=4", "train.log_every=2"),
)
TIERS["tiny"]["lr_sweep"] = LR_SWEEP[:1]  # the code path, one rate

LABELS = {
    "eoc_tanh": "tanh, edge of chaos",
    "dks_tanh": "DKS tanh",
    "dks_softplus": "DKS softplus",
    "tat_leaky_relu": "TAT leaky ReLU",
    "resnet_bn": "ResNet + batch norm (ReLU)",
    "wresnet_dks_softplus": "weighted ResNet, DKS softplus",
    "wresnet_tat_leaky_relu": "weighted ResNet, TAT leaky ReLU",
    "wresnet_relu": "weighted ResNet, ReLU (unshaped)",
    "wresnet_bn": "weighted ResNet, ReLU + batch norm",
}
COLORS = {
    "eoc_tanh": "tab:gray",
    "dks_tanh": "tab:blue",
    "dks_softplus": "tab:green",
    "tat_leaky_relu": "tab:orange",
    "resnet_bn": "tab:red",
    "wresnet_dks_softplus": "tab:green",
    "wresnet_tat_leaky_relu": "tab:orange",
    "wresnet_relu": "tab:purple",
    "wresnet_bn": "tab:red",
}


def compute(preset, overrides, store, lr_sweep=LR_SWEEP) -> dict:
    run = harness.stored_run(
        shaping.EXPERIMENT, preset, overrides, store, progress=core.progress_enabled()
    )
    cfg = run.config
    # (variant, depth): means over seeds, on the sorted distinct depths
    depths, k = np.unique(run.coords("depth"), return_index=True)
    axes = ("variant", "depth", "seed")
    acc = run.array("eval_accuracy", axes).astype(float).mean(axis=-1)[:, k]
    div = run.array("diverged", axes).mean(axis=-1)[:, k]  # the fraction of runs stopped
    th = shaping.theory(cfg, int(depths[-1]))
    rates, lr_acc = _lr_sweep(preset, overrides, store, int(depths[-1]), lr_sweep)
    if all(v in cfg.variants for v in LR_VARIANTS):  # the experiment's rate: its own runs
        rows = [list(cfg.variants).index(v) for v in LR_VARIANTS]
        rates = np.append(rates, cfg.train.learning_rate)
        lr_acc = np.concatenate([lr_acc, acc[rows, -1:]], axis=1)
    order = np.argsort(rates)
    drawn = [v for v in cfg.variants if v in th]
    return {
        "variants": np.asarray(cfg.variants),
        "depth": depths,
        "eval_accuracy": acc,
        "diverged": div,
        "c": th["c"],
        "c_maps": np.asarray([th[v] for v in drawn]).reshape(len(drawn), th["c"].size),
        "c_map_variants": np.asarray(drawn),
        "theory_depth": np.asarray(depths[-1]),
        "steps": np.asarray(cfg.train.steps),
        "width": np.asarray(cfg.width),
        "zeta": np.asarray(cfg.zeta),
        "eta": np.asarray(cfg.eta),
        "residual_eta": np.asarray(cfg.residual_eta),
        "learning_rate": np.asarray(cfg.train.learning_rate),
        "lr_sweep": rates[order],
        "lr_variants": np.asarray(LR_VARIANTS),
        "lr_accuracy": lr_acc[:, order],
    }


def _lr_sweep(preset, overrides, store, depth: int, rates) -> tuple[np.ndarray, np.ndarray]:
    """The ``rates`` (:data:`LR_SWEEP`) and the held-out accuracy ``(variant, rate)`` of
    :data:`LR_VARIANTS` at ``depth`` (means over seeds): the same experiment, one stored
    run per rate."""
    out = np.full((len(LR_VARIANTS), len(rates)), np.nan)
    for j, lr in enumerate(rates):
        sub = (*overrides, f"variants={','.join(LR_VARIANTS)}", f"depths={depth}",
               f"train.learning_rate={lr!r}")  # fmt: skip
        where = None if store is None else str(Path(store) / f"learning_rate_{lr:g}")
        run = harness.stored_run(
            shaping.EXPERIMENT, preset, sub, where, progress=core.progress_enabled()
        )
        acc = run.array("eval_accuracy", ("variant", "depth", "seed")).astype(float)
        out[:, j] = acc.mean(axis=-1)[:, 0]
    return np.asarray(rates, float), out


def plot(data, params):
    plotting.style()
    fig, (ax, cx, bx) = plt.subplots(
        1,
        3,
        figsize=(16.0, 5.2),
        constrained_layout=True,
        gridspec_kw={"width_ratios": [1.25, 0.8, 1]},
    )
    depth = np.asarray(data["depth"])
    for v, acc, div in zip(data["variants"], data["eval_accuracy"], data["diverged"], strict=True):
        v = str(v)
        last = f": {acc[-1]:.2f} at $L = {depth[-1]}$" if np.isfinite(acc[-1]) else ""
        style = "s--" if v.startswith("wresnet") else "o-"
        ax.plot(depth, acc, style, color=COLORS[v], label=LABELS[v] + last)
        bad = np.asarray(div) > 0
        if bad.any():
            ax.plot(depth[bad], np.asarray(acc)[bad], "x", color="black", ms=9, mew=2)
    ax.axhline(0.1, color=plotting.THEORY_COLOR, ls=":", lw=1, label="chance")
    ax.set_xlabel(r"depth $L$ (nonlinear layers; circles: chains and the toolkit's ResNet)")
    ax.set_ylabel("held-out accuracy after training")
    ax.set_ylim(0.0, 1.02)
    ax.set_xticks(depth)
    lr = float(data["learning_rate"])
    ax.set_title(f"Measured: width {int(data['width'])}, {int(data['steps'])} Adam steps, "
                 f"rate {lr:g}")  # fmt: skip
    ax.legend(loc="lower left", fontsize=7.5, framealpha=0.9)
    _plot_lr(cx, data)
    c = np.asarray(data["c"])
    bx.plot(c, c, color=plotting.THEORY_COLOR, ls=":", lw=1, label="identity (linear network)")
    for v, cf in zip(data["c_map_variants"], data["c_maps"], strict=True):
        # DKS tanh lies on DKS softplus (same zeta); the residual networks' maps are dashed
        dashed = str(v) == "dks_tanh" or str(v).startswith("wresnet")
        bx.plot(
            c,
            cf,
            color=COLORS[str(v)],
            lw=1.8,
            ls="--" if dashed else "-",
            label=LABELS[str(v)],
            zorder=3 if dashed else 2,
        )
    L = int(data["theory_depth"])
    bx.set_xlabel(r"input cosine $c$")
    bx.set_ylabel(rf"compound C-map $C_f(c)$, $L = {L}$")
    bx.set_xlim(-1, 1)
    bx.set_ylim(-1.02, 1.02)
    zeta, eta, r_eta = (float(data[k]) for k in ("zeta", "eta", "residual_eta"))
    bx.set_title(rf"Theory: DKS $C_f'(1)={zeta:g}$, TAT $C_f(0)={eta:g}$ (ResNet ${r_eta:g}$)")
    bx.legend(loc="lower right", fontsize=8, framealpha=0.9)
    return fig


def _plot_lr(cx, data) -> None:
    rates = np.asarray(data["lr_sweep"])
    for v, acc in zip(data["lr_variants"], data["lr_accuracy"], strict=True):
        cx.plot(rates, acc, "o-", color=COLORS[str(v)], label=LABELS[str(v)])
    cx.axvline(float(data["learning_rate"]), color="black", ls="--", lw=1,
               label="the rate of the left panel")  # fmt: skip
    cx.axhline(0.1, color=plotting.THEORY_COLOR, ls=":", lw=1)
    cx.set_xscale("log")
    cx.set_xlabel("Adam learning rate")
    cx.set_ylabel("held-out accuracy after training")
    cx.set_ylim(0.0, 1.02)
    cx.set_title(f"Measured: learning rate at $L = {int(np.asarray(data['depth'])[-1])}$")
    cx.legend(loc="lower left", fontsize=8, framealpha=0.9)
