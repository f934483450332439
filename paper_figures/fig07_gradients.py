"""Per-layer backpropagated gradient norms at initialization for sigmoid / tanh / relu under xavier / he / orthogonal init, plain vs batch norm, layer norm and residual networks: measured (markers) against mean-field theory (lines) (Glorot & Bengio 2010; He et al. 2015; Saxe et al. 2014; Ioffe & Szegedy 2015; Ba et al. 2016; He et al. 2016).

Each panel shows ``||dLoss/dh^l||^2 / ||dLoss/dh^L||^2``, the squared norm
of the gradient with respect to the pre-activations ``h^l`` relative to the
last layer, against the layer ``l`` (the input is at ``l = 1``): the geometric
mean over seeds of the measurement (experiment ``gradients``: width-``N`` MLPs
of ``L`` hidden layers, zero biases, Gaussian inputs, a random projection of
the output as the loss) and the mean-field recursion of
:func:`isometry.signal.theory` (plain and residual networks, and layer
normalization before the activation), which predicts these ratios with no free parameter, and for
batch normalization the mean-field theory of Yang et al. 2019
(:func:`isometry.batchnorm_theory.gradient_profile`: growth by ``lambda(B)``
per layer, the same for every init since the normalization removes
``sigma_w2``; the first layer, fed the raw inputs instead of the BSB1 fixed
point, differs by ``(d* - c*)/q0``).
Orthogonal init is ``sigma_w2 = 1`` times a Haar-orthogonal matrix, so in
mean field it coincides with Xavier (``sigma_w2 = 1`` for square layers); He
is ``sigma_w2 = 2``.

What to see: plain networks with xavier or orthogonal init vanish toward the
input (``chi1 < 1``; sigmoid, whose slope is at most 1/4, by ~20 orders of
magnitude over 16 layers, and still with he); relu with he stays flat
(``chi1 = 1``); tanh with he grows mildly (``chi1 > 1`` until the activations
saturate). Batch norm makes every combination grow toward the input (Yang et al.
2019; mildly for sigmoid) at the rate ``lambda(B = 16)`` of the theory (1.11
sigmoid, 1.25 tanh, 1.59 relu); at the quick width ``N = 64`` the measured
growth scatters around the line by the seed spread and O(1/N) corrections.
Residual connections keep sigmoid and tanh within two orders of magnitude, but
relu's residual stream grows, and its gradients grow faster than the infinite-
width recursion: zero-bias relu networks are homogeneous, so the gradient's
component along the stream (a 1/N share at the output) grows as fast as the
stream itself (2.9 per layer against 2 for the rest); the relu residual line
includes this finite-width correction (:func:`isometry.signal.theory` with
``width``), which at the quick tier's ``N = 64``, ``L = 16`` adds about one
decade to the 4.5 of infinite width. Layer norm before the activation flattens
tanh and relu but not
sigmoid: the activation always sees unit variance, where sigmoid's slope is
small, so its gradients vanish as in the plain network (as predicted). For
relu the weight gradients ``||dLoss/dW^l||^2`` stay flat under any ``sigma_w2``
(the forward signal shrinks as fast as the backward one), which is why the
backpropagated gradient is shown. Quick sizes (``L = 16``,
``N = 64``, 2 seeds) are smaller than the full tier (``L = 50``, ``N = 256``,
8 seeds).
"""

from __future__ import annotations

import numpy as np

from isometry import batchnorm_theory, plotting, signal
from isometry.experiments import gradients, harness
from isometry.paper_figures import core

COST = {"quick": 13}  # single-core CPU seconds of the quick tier (a scheduling hint)

KEYS = ("layer", "activations", "inits", "techniques", "grad_preact_sq", "relative", "theory")

TIERS = harness.figure_tiers(
    "gradients",
    ("activations=relu", "inits=xavier,he", "depth=6", "width=16", "batch=4", "seeds=1"),
)

TECHNIQUE_TITLES = {
    "plain": "plain",
    "batch_norm": "batch norm",
    "layer_norm": "layer norm (pre-activation)",
    "residual": "residual",
}


def theory_curves(cfg, activation: str, technique: str) -> np.ndarray:
    """Mean-field ``||dLoss/dh^l||^2 / ||dLoss/dh^L||^2`` per init of ``cfg``: ``(I, L)``.

    Zero biases (``sigma_b2 = 0``), inputs of mean square ``q0 = 1``
    (``x^0 = u ~ N(0, 1)``), ``sigma_w2`` of each initializer for ``N x N``
    layers (:func:`experiments.gradients.init_numbers`); one compiled
    recursion for all inits; residual networks at the width ``N`` (the
    finite-width correction of relu). Batch norm:
    :func:`isometry.batchnorm_theory.gradient_profile` at the batch size ``B``
    (the same for every init: the normalization removes ``sigma_w2``; NaN for
    ``B < 4``, where the mean-field theory does not apply).
    """
    if technique == "batch_norm":
        if cfg.batch < 4:
            return np.full((len(cfg.inits), cfg.depth), np.nan)
        th = batchnorm_theory.gradient_profile(activation, cfg.batch, cfg.depth, 1.0)
        return np.tile(np.asarray(th.grad_preact_sq, dtype=np.float64), (len(cfg.inits), 1))
    sw = np.asarray([gradients.init_numbers(cfg, i)["sigma_w2"] for i in cfg.inits])
    kw = {}
    if technique == "residual":
        # At the experiment's width: the finite-width correction for relu (signal.theory).
        kw.update(residual_scale=cfg.residual_scale, width=cfg.width)
    elif technique == "layer_norm":
        kw.update(layer_norm=True, width=cfg.width)
    # One call per init (concrete arguments: the recursion compiles once, at XLA level 0).
    th = [signal.theory(activation, float(s), 0.0, cfg.depth, 1.0, **kw) for s in sw]
    return np.asarray([t.grad_preact_sq for t in th], dtype=np.float64)


def compute(preset, overrides, store) -> dict:
    run = harness.stored_run(
        gradients.EXPERIMENT, preset, overrides, store, progress=core.progress_enabled()
    )
    cfg = run.config
    acts, inits, techs = cfg.activations, cfg.inits, cfg.techniques
    L = cfg.depth
    # (activation, init, technique, seed, layer): the grid's axes, then the point's rows
    g = run.array("grad_preact_sq", ("activation", "init", "technique", "seed"), rows=True)
    theory = np.full((len(acts), len(inits), len(techs), L), np.nan)
    for ia, a in enumerate(acts):
        for it, tq in enumerate(techs):
            theory[ia, :, it] = theory_curves(cfg, a, tq)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.exp(np.mean(np.log(g / g[..., -1:]), axis=-2))
    return {
        "layer": np.arange(1, L + 1),
        "activations": np.asarray(acts),
        "inits": np.asarray(inits),
        "techniques": np.asarray(techs),
        "grad_preact_sq": g,
        "relative": rel,
        "theory": theory,
    }


def plot(data, params):
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    plotting.style()
    acts, inits, techs = (list(map(str, data[k])) for k in ("activations", "inits", "techniques"))
    layer, rel, th = data["layer"], data["relative"], data["theory"]
    fig, axes = plt.subplots(
        len(acts),
        len(techs),
        figsize=(3.1 * len(techs), 2.5 * len(acts) + 0.6),
        sharex=True,
        sharey="row",
        squeeze=False,
        constrained_layout=True,
    )
    colors = {i: f"C{k}" for k, i in enumerate(inits)}
    markers = dict(zip(inits, "osD^v<>", strict=False))
    # Orthogonal and xavier coincide in mean field: dashes keep both lines visible.
    styles = {i: ("--" if i == "orthogonal" else "-") for i in inits}
    for ia, a in enumerate(acts):
        for it, tq in enumerate(techs):
            ax = axes[ia, it]
            for ii, i in enumerate(inits):
                m = rel[ia, ii, it]
                ok = np.isfinite(m) & (m > 0)
                ax.plot(layer[ok], m[ok], markers[i], ms=3.5, color=colors[i], mfc="none", mew=1)
                if np.all(np.isfinite(th[ia, ii, it])):
                    ax.plot(layer, th[ia, ii, it], styles[i], lw=1.1, color=colors[i], alpha=0.8)
            ax.set_yscale("log")
            ax.axhline(1.0, color="0.6", lw=0.6, ls=":")
            if ia == 0:
                ax.set_title(TECHNIQUE_TITLES.get(tq, tq))
            if ia == len(acts) - 1:
                ax.set_xlabel("layer $l$ (input at $l = 1$)")
            if it == 0:
                ax.set_ylabel(
                    f"{a}\n" + r"$\|\partial L/\partial h^l\|^2 / \|\partial L/\partial h^L\|^2$"
                )
            if np.all(~np.isfinite(th[ia, :, it])) and ia == 0:
                ax.text(
                    0.03,
                    0.04,
                    "no mean-field theory here",
                    transform=ax.transAxes,
                    fontsize=7,
                    color="0.4",
                )
    handles = [
        Line2D([], [], color=colors[i], marker=markers[i], mfc="none", ls=styles[i], label=i)
        for i in inits
    ]
    handles += [
        Line2D([], [], color="0.3", marker="o", mfc="none", ls="none", label="measured"),
        Line2D([], [], color="0.3", ls="-", label="theory (mean field; residual relu: width N)"),
    ]
    fig.legend(handles=handles, loc="outside upper center", ncol=len(handles), frameon=False)
    return fig
