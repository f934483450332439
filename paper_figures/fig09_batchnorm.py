"""Gradient explosion in batch-normalized networks at initialization: per-layer growth rate of the weight gradients vs batch size B for linear, tanh and relu networks, measured (markers) against the mean-field theory of Yang et al. 2019 (lines), which for linear networks is (B - 2)/(B - 3) and for relu tends to pi/(pi - 1).

Networks ``x^l = phi(BN(h^l))``, ``h^l = W^l x^{l-1}`` with batch statistics
(experiment ``batchnorm``: width ``N``, depth ``L``, Gaussian ``sigma_w2 = 1``
weights, Gaussian inputs, a random projection of the output as the loss).
Left: ``||dLoss/dW^l||^2 / ||dLoss/dW^L||^2`` per layer at one batch size
(geometric mean over seeds) and the theory ``lambda^(L - l)``. Right: the
growth rate ``(||dLoss/dW^1||^2 / ||dLoss/dW^L||^2)^(1/(L-1))`` per layer,
mean and standard error over seeds, against ``B``, and the theory's
``lambda(B)``; dotted: rate 1 (no explosion).

Theory (:mod:`isometry.batchnorm_theory`): in the wide limit every unit's
batch vector after the normalization is uniform on the sphere of radius
``sqrt(B)`` orthogonal to the all-ones vector (the BSB1 fixed point, reached
after one layer from independent inputs), and the backpropagated gradient's
batch Gram matrix is multiplied per layer by the backward operator, whose
largest eigenvalue (eigenvector ``G = I - 11^T/B``)

    lambda = B / ((d* - c*)(B - 3)(B - 1)) E[tr(P_v D G D P_v)]

is computed by quadrature over the law of two normalized entries (no Monte
Carlo). Linear: ``(B - 2)/(B - 3)``; ReLU: ``pi/(pi - 1) ~ 1.467`` as ``B``
grows; tanh: ~1.18. The weight gradients grow by exactly ``lambda`` per layer
from the last layer to the first (batch normalization makes ``W^1``'s gradient
independent of the input scale), so the measured rate estimates ``lambda``.

Where measurement and theory part, and why: at ``B = 4`` (and less at
``B = 6``) the measured rates sit below the line. The per-unit backward
factor carries ``1/||G h||^2 ~ 1/chi^2_{B-1}``, whose variance is infinite
for ``B <= 5``; the width-``N`` average of such factors converges to its mean
slowly and its logarithm (the geometric-mean rate) is biased low, so the
wide-limit assumption fails there at any practical width (at ``B = 4`` the
theory gives 3.08 for relu and 2.13 for tanh; the measured rates sit well
below). From ``B = 6`` on the measured rates (mean +- s.e. over seeds, the
right panel) follow the theory within a few standard errors, deviations of
the size of the finite-width (O(1/N)) corrections. In the left panel the
linear network at ``B = 8`` falls below ``lambda^(L - l)`` over the first
few layers (the theory's rate there is 1.2); this finite-size effect is not
explained here.

Quick sizes (``L = 16``, ``N = 256``, 4 seeds, ``B = 4..64``) are smaller
than the paper's; the full tier uses ``L = 50``, ``N = 256``, 8 seeds and
``B = 4..256``.
"""

from __future__ import annotations

import numpy as np

from isometry import batchnorm_theory, plotting
from isometry.experiments import batchnorm, harness
from isometry.paper_figures import core

COST = {"quick": 24}  # single-core CPU seconds of the quick tier (a scheduling hint)

KEYS = (
    "activations",
    "batch_sizes",
    "growth_rate",
    "layer",
    "grad_weight_sq",
    "theory_batch",
    "theory_rate",
)

_ACTS = "activations=linear,tanh,relu"
_STORE = "results/experiments/batchnorm/{}"
TIERS = {
    "tiny": {
        "preset": "quick",
        "overrides": (
            "activations=linear,relu",
            "batch_sizes=4,8",
            "depth=4",
            "width=16",
            "seeds=2",
        ),
        "store": None,
        "layer_batch": 4,
    },
    "quick": {
        "preset": "quick",
        "overrides": (_ACTS, "batch_sizes=4,6,8,16,32,64", "width=256", "seeds=4"),
        "store": _STORE.format("quick"),
        "layer_batch": 8,
    },
    "full": {
        "preset": "full",
        "overrides": (_ACTS, "batch_sizes=4,6,8,16,32,64,128,256"),
        "store": _STORE.format("full"),
        "layer_batch": 8,
    },
}


def linear_rate(batch):
    """Wide-limit per-layer growth rate of ``||dLoss/dW^l||^2`` in linear BN networks.

    ``(B - 2) / (B - 3)`` for ``B >= 4`` (the closed form of
    :func:`isometry.batchnorm_theory.gradient_rate` for linear ``phi``); NaN below.
    """
    b = np.asarray(batch, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b >= 4, (b - 2) / (b - 3), np.nan)


def theory_rates(activations, batches) -> np.ndarray:
    """``lambda(B)`` of :func:`isometry.batchnorm_theory.gradient_rate`: ``(A, K)``."""
    return np.asarray(
        [[float(batchnorm_theory.gradient_rate(a, int(b))) for b in batches] for a in activations]
    )


def compute(preset, overrides, store, layer_batch) -> dict:
    run = harness.stored_run(
        batchnorm.EXPERIMENT, preset, overrides, store, progress=core.progress_enabled()
    )
    cfg = run.config
    if layer_batch not in cfg.batch_sizes:
        raise ValueError(f"layer_batch must be one of {cfg.batch_sizes}, got {layer_batch}")
    acts, bs, L = cfg.activations, cfg.batch_sizes, cfg.depth
    # (activation, batch, seed): the grid's axes; the points' rows are the layers
    axes = ("activation", "batch", "seed")
    g = run.array("grad_weight_sq", axes, rows=True)
    rate = run.array("growth_rate", axes, rows=True)[..., 0]  # one rate per point
    grid = np.round(np.geomspace(4, max(max(bs), 8), 40)).astype(int)
    fine = np.unique(np.concatenate([grid, [b for b in bs if b >= 4]]))
    return {
        "activations": np.asarray(acts),
        "batch_sizes": np.asarray(bs),
        "growth_rate": rate,
        "layer": np.arange(1, L + 1),
        "grad_weight_sq": g,
        "theory_batch": fine,
        "theory_rate": theory_rates(acts, fine),
    }


def plot(data, params):
    import matplotlib.pyplot as plt

    plotting.style()
    acts = list(map(str, data["activations"]))
    bs = np.asarray(data["batch_sizes"])
    rate, g, layer = data["growth_rate"], data["grad_weight_sq"], data["layer"]
    L = layer.size
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10.5, 4.0), constrained_layout=True)
    colors = {a: f"C{k}" for k, a in enumerate(acts)}
    markers = dict(zip(acts, "osD^v", strict=False))

    # Left: per-layer growth at one batch size.
    b0 = int(params["layer_batch"])
    ib = int(np.flatnonzero(bs == b0)[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.exp(np.nanmean(np.log(g[:, ib] / g[:, ib, :, -1:]), axis=1))
    for ia, a in enumerate(acts):
        ax0.plot(layer, rel[ia], markers[a], ms=4, mfc="none", color=colors[a], label=a)
    lam = {a: data["theory_rate"][ia][data["theory_batch"] == b0] for ia, a in enumerate(acts)}
    for a in acts:
        if lam[a].size:
            ax0.plot(layer, lam[a][0] ** (L - layer), "-", color=colors[a], lw=1.1, alpha=0.8)
    ax0.plot([], [], "-", color="0.3", label=r"theory $\lambda^{L-l}$")
    ax0.set_yscale("log")
    ax0.axhline(1.0, color="0.6", lw=0.6, ls=":")
    ax0.set_xlabel("layer $l$ (input at $l = 1$)")
    ax0.set_ylabel(r"$\|\partial L/\partial W^l\|^2 / \|\partial L/\partial W^L\|^2$")
    ax0.set_title(f"batch size $B = {b0}$")
    ax0.legend(loc="best")

    # Right: growth rate per layer vs batch size.
    n = np.sum(np.isfinite(rate), axis=-1)
    mean = np.nanmean(rate, axis=-1)
    sem = (
        np.nanstd(rate, axis=-1, ddof=1) / np.sqrt(np.maximum(n, 1))
        if rate.shape[-1] > 1
        else np.zeros_like(mean)
    )
    for ia, a in enumerate(acts):
        ax1.errorbar(
            bs,
            mean[ia],
            yerr=sem[ia],
            fmt=markers[a],
            ms=4,
            mfc="none",
            color=colors[a],
            capsize=2,
            label=f"{a} (measured)",
        )
    for ia, a in enumerate(acts):
        ax1.plot(data["theory_batch"], data["theory_rate"][ia], "-", color=colors[a], lw=1.2)
    ax1.plot([], [], "-", color="0.3", label=r"mean-field theory $\lambda(B)$")
    ax1.axhline(1.0, color="0.4", lw=0.8, ls=":", label="rate 1 (no explosion)")
    ax1.set_xscale("log")
    ax1.set_xticks(bs)
    ax1.set_xticklabels([str(b) for b in bs])
    ax1.minorticks_off()
    ax1.set_xlabel("batch size $B$")
    ax1.set_ylabel(r"growth rate per layer of $\|\partial L/\partial W^l\|^2$")
    ax1.set_title(f"$L = {L}$; mean $\\pm$ s.e. over seeds")
    ax1.legend(loc="best")
    return fig
