"""Gradient explosion in batch-normalized networks at initialization: per-layer growth rate of the weight gradients vs batch size B for linear, tanh and relu networks, with the closed-form linear rate (B - 2)/(B - 3) (Yang et al. 2019).

Networks ``x^l = phi(BN(h^l))``, ``h^l = W^l x^{l-1}`` with batch statistics
(experiment ``batchnorm``: width ``N``, depth ``L``, Gaussian ``sigma_w2 = 1``
weights, Gaussian inputs, a random projection of the output as the loss).
Left: ``||dLoss/dW^l||^2 / ||dLoss/dW^L||^2`` per layer at one batch size
(geometric mean over seeds): it grows geometrically toward the input. Right:
the growth rate ``(||dLoss/dW^1||^2 / ||dLoss/dW^L||^2)^(1/(L-1))`` per
layer, mean and standard error over seeds, against ``B``; dotted: rate 1 (no
explosion).

Theory (lines; linear networks only). In the wide limit a linear batch-normalized
network sits at the fixed point where every unit's batch vector ``h_i`` is
isotropic Gaussian in the ``(B-1)``-dimensional space orthogonal to the
all-ones vector (the batch Gram matrix ``B/(B-1) (I - 11^T/B)``). Backward,
the normalization ``h -> sqrt(B) G h / ||G h||`` (``G`` the centring) scales the
gradient by ``sqrt(B)/||G h||`` and projects out the all-ones vector and
``h`` itself. With gradient independence, the squared gradient norm is
multiplied per layer by

    sigma_w2 E[B / ||h||^2] * (B - 2)/(B - 1)
        = sigma_w2 (B - 1) / (sigma_w2 (B - 3)) * (B - 2)/(B - 1) = (B - 2)/(B - 3),

using ``E[1/chi^2_{B-1}] = 1/(B - 3)`` and the mean of a rank-``(B-2)``
projection of an isotropic ``(B-1)``-dimensional gradient; ``B >= 4`` (at
``B = 3`` the mean diverges, at ``B = 2`` the gradient vanishes identically).
The rate exceeds 1 at every ``B`` and falls to 1 like ``1 + 1/B``,
consistent with Yang et al. 2019 (for linear networks the rate tends to 1 as
the batch grows). Derived here, and checked by
Monte Carlo with this experiment (``N = 512``, ``L = 32``, 4 seeds): measured
1.99, 1.46, 1.32, 1.20, 1.070, 1.033, 1.016 at ``B = 4, 5, 6, 8, 16, 32, 64``
against 2, 1.5, 1.333, 1.2, 1.077, 1.034, 1.016. The finite-width deviation
at ``B = 16`` (9% of ``rate - 1``) was 28% at ``N = 128``; at ``B <= 6`` the
per-unit factor ``1/chi^2_{B-1}`` is heavy-tailed and the geometric-mean
estimator sits up to 2.5% low. At the quick width ``N = 64`` the first
layers also fall below the line (the raw Gaussian input is not yet at the
fixed point). No closed form is drawn for tanh and relu (Yang et al. compute
theirs with Laplace and Gegenbauer methods): only their measured rates, which stay
well above 1 even at ``B = 64``.

Quick sizes (``L = 16``, ``N = 64``, 4 seeds, ``B = 4..64``) are smaller
than the paper's; the full tier uses ``L = 50``, ``N = 256``, 8 seeds and
``B = 4..256``.
"""

from __future__ import annotations

import numpy as np

from isometry import plotting
from isometry.experiments import harness
from isometry.paper_figures import core

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
        "overrides": (_ACTS, "batch_sizes=4,6,8,16,32,64", "seeds=4"),
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

    ``(B - 2) / (B - 3)`` for ``B >= 4`` (derived in the module docstring);
    NaN below.
    """
    b = np.asarray(batch, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b >= 4, (b - 2) / (b - 3), np.nan)


def compute(preset, overrides, store, layer_batch) -> dict:
    run = harness.stored_run(
        "batchnorm", preset, overrides, store, progress=core.progress_enabled()
    )
    cfg, t = run.config, run.table
    if layer_batch not in cfg.batch_sizes:
        raise ValueError(f"layer_batch must be one of {cfg.batch_sizes}, got {layer_batch}")
    acts, bs, L, S = cfg.activations, cfg.batch_sizes, cfg.depth, cfg.seeds
    g = np.full((len(acts), len(bs), S, L), np.nan)
    rate = np.full((len(acts), len(bs), S), np.nan)
    for a, b, s, l, v, r in zip(
        t["activation"],
        t["batch"],
        t["seed"],
        t["layer"],
        t["grad_weight_sq"],
        t["growth_rate"],
        strict=True,
    ):
        ia, ib = acts.index(a), bs.index(int(b))
        g[ia, ib, int(s), int(l) - 1] = v
        rate[ia, ib, int(s)] = r
    fine = np.geomspace(4, max(max(bs), 8), 200)
    return {
        "activations": np.asarray(acts),
        "batch_sizes": np.asarray(bs),
        "growth_rate": rate,
        "layer": np.arange(1, L + 1),
        "grad_weight_sq": g,
        "theory_batch": fine,
        "theory_rate": linear_rate(fine),
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
    if "linear" in acts:
        th = linear_rate(b0) ** (L - layer)
        ax0.plot(
            layer,
            th,
            "-",
            color=colors["linear"],
            lw=1.2,
            label="linear theory $((B-2)/(B-3))^{L-l}$",
        )
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
    if "linear" in acts:
        ax1.plot(
            data["theory_batch"],
            data["theory_rate"],
            "-",
            color=colors["linear"],
            lw=1.2,
            label="linear theory $(B-2)/(B-3)$",
        )
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
