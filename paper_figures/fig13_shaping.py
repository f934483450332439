"""Kernel shaping: held-out accuracy after a fixed budget vs depth for vanilla networks with DKS/TAT activations, edge-of-chaos tanh and a batch-normalized ResNet, beside the compound C-maps (Martens et al. 2021; Zhang et al. 2022).

Measurement (left): the ``shaping`` experiment, one Adam run per (variant,
depth, seed) at one learning rate and budget, held-out accuracy averaged
over seeds (chance 0.1); a cross marks a run stopped by a non-finite loss.
Theory (right): the compound C-map ``C_f(c) = C^L(c)`` of each vanilla
variant at the largest depth (:func:`isometry.experiments.shaping.theory`):
DKS keeps ``C_f(0) = 0`` and ``C_f'(1) = zeta``, TAT's leaky ReLU has
``C_f(0) = eta``, while the edge-of-chaos tanh map is nearly constant (every
pair of inputs ends up almost parallel): the degeneration kernel shaping
prevents, and the edge-of-chaos network is the one that falls to chance with
depth. The ResNet has no such map (not drawn). Where theory and measurement
part: DKS tanh and DKS softplus have the same compound C-map (both are fixed
by ``zeta``; the dashed curve lies on the solid one), yet at the largest depth
DKS tanh trains markedly worse with this short Adam budget. The initial kernel
does not explain the gap; the shaping conditions say nothing about the
optimizer's trajectory (Martens et al. train with K-FAC for many epochs, not
done here); one untested guess is that DKS tanh at depth 100 is nearly affine
(``alpha ~ 0.09``, ``gamma ~ 15``), which Adam's per-parameter steps treat
differently from the softplus transform.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from isometry import plotting
from isometry.experiments import harness, shaping
from isometry.paper_figures import core

KEYS = ("variants", "depth", "eval_accuracy", "diverged", "c", "c_maps", "c_map_variants", "theory_depth",
        "steps", "width", "zeta", "eta")  # fmt: skip

COST = {"quick": 79}
"""Seconds of one CPU core for the quick tier from empty stores (a scheduling hint)."""

TIERS = harness.figure_tiers(
    "shaping",
    ("variants=resnet_bn", "depths=2", "train.steps=4", "train.log_every=2"),
)

LABELS = {
    "eoc_tanh": "tanh, edge of chaos",
    "dks_tanh": "DKS tanh",
    "dks_softplus": "DKS softplus",
    "tat_leaky_relu": "TAT leaky ReLU",
    "resnet_bn": "ResNet + batch norm (ReLU)",
}
COLORS = {
    "eoc_tanh": "tab:gray",
    "dks_tanh": "tab:blue",
    "dks_softplus": "tab:green",
    "tat_leaky_relu": "tab:orange",
    "resnet_bn": "tab:red",
}


def compute(preset, overrides, store) -> dict:
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
    }


def plot(data, params):
    plotting.style()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11.0, 4.4), constrained_layout=True)
    depth = np.asarray(data["depth"])
    for v, acc, div in zip(data["variants"], data["eval_accuracy"], data["diverged"], strict=True):
        v = str(v)
        last = f": {acc[-1]:.2f} at $L = {depth[-1]}$" if np.isfinite(acc[-1]) else ""
        ax.plot(depth, acc, "o-", color=COLORS[v], label=LABELS[v] + last)
        bad = np.asarray(div) > 0
        if bad.any():
            ax.plot(depth[bad], np.asarray(acc)[bad], "x", color="black", ms=9, mew=2)
    ax.axhline(0.1, color=plotting.THEORY_COLOR, ls=":", lw=1, label="chance")
    ax.set_xlabel(r"depth $L$ (hidden layers, no skip connections except the ResNet)")
    ax.set_ylabel("held-out accuracy after training")
    ax.set_ylim(0.0, 1.02)
    ax.set_xticks(depth)
    ax.set_title(f"Measured: width {int(data['width'])}, {int(data['steps'])} Adam steps")
    ax.legend(loc="lower left", fontsize=8, framealpha=0.9)
    c = np.asarray(data["c"])
    bx.plot(c, c, color=plotting.THEORY_COLOR, ls=":", lw=1, label="identity (linear network)")
    for v, cf in zip(data["c_map_variants"], data["c_maps"], strict=True):
        dashed = str(v) == "dks_tanh"  # on top of DKS softplus: same zeta, nearly the same map
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
    zeta, eta = float(data["zeta"]), float(data["eta"])
    bx.set_title(rf"Theory: DKS $C_f'(1)={zeta:g}$, TAT $C_f(0)={eta:g}$")
    bx.legend(loc="lower right", fontsize=8, framealpha=0.9)
    return fig
