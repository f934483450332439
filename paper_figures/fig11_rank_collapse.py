"""Deep transformers at initialization: without a residual path (and with post-LN) the tokens of a sequence collapse to one direction within a few blocks and the query/key gradients vanish with them, while pre-LN with 1/sqrt(L) branches keeps the token cosine, norm, Jacobian and gradients bounded; mean-field Gram recursions (lines) over measurement (markers) (Dong et al. 2021; Noci et al. 2022; Xiong et al. 2020; Bordelon et al. 2023; Yang et al. 2023).

Experiment ``transformer_signal``: ``S = 2`` sequences of ``T = 8`` causal
tokens (input cosine 0.3 within, 0.1 across sequences) through ``L``
transformer blocks (ReLU MLP, He ``W_1``, ``N Var(W_V, W_O, W_2) = 1``,
``N Var(W_Q, W_K) = 0.1``) in the three layer-norm placements (columns)
and three branch scales (colours: ``alpha = 1``, ``1/sqrt(L)``, no residual).
Rows: ``1 - `` the mean token cosine within a sequence (rank collapse is
its fall to 0), the mean squared token norm, the mean squared singular value
of the Jacobian ``dx^l/dx^0`` (random tangents pushed through all blocks in
one pass), the ratio ``||dL/dW_Q||^2 / ||dL/dW_V||^2`` of each block, and
``||dL/dW_V||^2`` per block, relative to the loss gradient at the top (a
random projection of every token). Markers: mean over seeds (one at the quick
tier); lines: :func:`isometry.transformer_theory.profile` from the inputs'
expected Gram, with no free parameter.

Where theory and measurement part, and why: the recursions assume uniform
attention (exact as ``N Var(W_Q) -> 0``; here 0.1), independent branches and
gradient independence at infinite width. Forward statistics, Jacobians,
updates and the Q/K-to-V ratio follow the lines for every residual variant
with layer norm and for ``alpha = 1/sqrt(L)`` everywhere. Without layer norm
at ``alpha = 1`` the stream grows about threefold per block, so the
attention logits (standard deviation ``~ N Var(W_Q)`` times the squared token
norm) leave the uniform regime within a few blocks: the theory is dotted where
that product exceeds 1 (and not drawn for the gradient rows), the measured
collapse lags it, and the stream overflows float32 past ``1e30`` (no markers
there). Without a
residual path the tokens of a sequence collapse within ~10 blocks as
predicted, and then move as one vector whose squared norm does a
multiplicative random walk of log-variance ``~ L / N`` (Hanin & Nica 2019):
the measured norm, Jacobian and value gradients scatter around, and mostly
below, the infinite-width line (the mean over seeds of a log-normal's
typical values). At the quick tier ``L / N = 1`` and one seed is drawn: the
no-residual Jacobian and value-gradient markers (and the norm without layer
norm) lie mostly below the line, typically by up to two decades and at most by
about three and a half (within about one and a half at ``N = 128`` with 2
seeds, the earlier quick tier). After the collapse (no residual; post-LN with
``alpha = 1`` at depth) the Q/K gradients vanish exactly in both theory and
measurement: ratios below ``1e-12`` are rounding and drawn at that floor.
Post-LN gradient predictions are qualitative (the normalization's projections
compound) and its value gradients at ``alpha = 1`` sit below the line.
Quick tier: ``L = 64``, ``N = 64``, 1 seed, 2 tangents (the depth is kept: the
overflow and post-LN's collapse at ``alpha = 1`` need some 50 blocks); full:
``L = 256``, ``N = 256``, 8 seeds, 8 tangents.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from isometry import plotting
from isometry import transformer_theory as tt
from isometry.experiments import harness, transformer_signal
from isometry.paper_figures import core

COST = {"quick": 28}  # single-core CPU seconds of the quick tier (a scheduling hint)

KEYS = ("block", "norm_positions", "alphas", "measured", "theory", "stats", "qk_sigma_w2")

TIERS = harness.figure_tiers(
    "transformer_signal",
    (
        "norm_positions=pre",
        "alphas=1/sqrt(L)",
        "depth=4",
        "width=16",
        "heads=2",
        "seq_len=4",
        "seeds=1",
        "tangents=1",
    ),
    # quick: the preset's depth 64 and 2 tangents at half its width (128), one of its 2 seeds
    quick_overrides=("width=64", "seeds=1"),
)

STATS = ("collapse", "norm", "jacobian_sq", "update", "qk_value", "grad_value")
FLOOR = 1e-12  # ratios below this are rounding (exact zeros of the theory): drawn at the floor
LABELS = {
    "collapse": "1 - token cosine",
    "norm": "mean sq. token norm",
    "jacobian_sq": r"mean $s^2$ of $\partial x^l/\partial x^0$",
    "update": r"$L\,\|x^l - x^{l-1}\|^2 / \|x^{l-1}\|^2$",
    "qk_value": r"$\|\partial L/\partial W_Q\|^2 / \|\partial L/\partial W_V\|^2$",
    "grad_value": r"$\|\partial L/\partial W_V^l\|^2$ (rel.)",
}
ALPHA_LABELS = {"1": r"$\alpha = 1$", "1/sqrt(L)": r"$\alpha = 1/\sqrt{L}$", "0": "no residual"}
NORM_TITLES = {"none": "no layer norm", "pre": "pre-LN", "post": "post-LN"}


def _theory(cfg, pos: str, alpha: str) -> np.ndarray:
    """``(len(STATS), L)`` predictions of one variant."""
    net = transformer_signal.network_config(cfg, pos, alpha)
    with np.errstate(all="ignore"), jax.enable_x64(True):  # no float32 floor on 1 - cosine
        G0 = jnp.asarray(transformer_signal.input_gram(cfg), jnp.float64)
        p = tt.profile(net, G0, cfg.seq_len)
        vals = {
            "collapse": 1.0 - np.asarray(p.cosine),
            "norm": p.norm,
            "jacobian_sq": p.jacobian_sq,
            "update": cfg.depth * np.asarray(p.update),
            "qk_value": p.qk_value,
            "grad_value": p.grad_weights["value"],
        }
    return np.stack([np.asarray(vals[s], np.float64) for s in STATS])


def measured_stats(run: harness.StoredRun, depth: int) -> np.ndarray:
    """``(P, A, len(STATS), S, L)``: each statistic of :data:`STATS` per (norm position,
    alpha, seed, block) from the run's table; NaN where the stream passed ``1e30``.

    float32 overflows near 1e38: statistics of a stream past 1e30 are not
    measurements, nor are the gradients of a network whose stream got there.
    """
    axes = ("norm_position", "alpha", "seed")
    col = {c: run.array(c, axes, rows=True).astype(float) for c in (
        "cosine", "norm", "jacobian_sq", "update", "grad_query", "grad_value")}  # fmt: skip
    row = {
        "collapse": 1.0 - col["cosine"],
        "norm": col["norm"],
        "jacobian_sq": col["jacobian_sq"],
        "update": depth * col["update"],
        "qk_value": col["grad_query"] / col["grad_value"],
        "grad_value": col["grad_value"],
    }
    ok = np.isfinite(col["norm"]) & (col["norm"] < 1e30)
    meas = np.stack([np.where(ok, row[x], np.nan) for x in STATS], axis=2)
    blown = ~ok.all(axis=-1)  # (P, A, S)
    for x in ("qk_value", "grad_value"):
        meas[:, :, STATS.index(x)][blown] = np.nan
    return meas


def compute(preset, overrides, store) -> dict:
    run = harness.stored_run(
        transformer_signal.EXPERIMENT, preset, overrides, store, progress=core.progress_enabled()
    )
    cfg, L = run.config, run.config.depth
    with np.errstate(divide="ignore", invalid="ignore"):
        meas = measured_stats(run, cfg.depth)
    theory = np.stack(
        [np.stack([_theory(cfg, p, a) for a in cfg.alphas]) for p in cfg.norm_positions]
    )
    measured = _finite_mean(meas, axis=-2)
    return {
        "block": np.arange(1, L + 1),
        "norm_positions": np.asarray(cfg.norm_positions),
        "alphas": np.asarray(cfg.alphas),
        "measured": measured,
        "theory": theory,
        "stats": np.asarray(STATS),
        "qk_sigma_w2": np.asarray(cfg.qk_sigma_w2),
    }


def _finite_mean(v: np.ndarray, axis: int) -> np.ndarray:
    """Mean of the finite entries along ``axis``; NaN where there are none.

    Where every seed's stream overflowed (no layer norm, ``alpha = 1``, deep
    blocks) no measurement is left, so the mean is NaN by definition rather
    than numpy's warning about an empty slice.
    """
    ok = np.isfinite(v)
    n = np.sum(ok, axis=axis)
    total = np.sum(np.where(ok, v, 0.0), axis=axis)
    return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def _shown(v: np.ndarray, stat: str) -> np.ndarray:
    """Finite values for a log axis: the Q/K ratio clipped at :data:`FLOOR`, others positive."""
    v = np.asarray(v, np.float64)
    if stat == "qk_value":
        return np.where(np.isfinite(v), np.maximum(v, FLOOR), np.nan)
    return np.where(np.isfinite(v) & (v > 0), v, np.nan)


def plot(data, params):
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    plotting.style()
    pos, alphas, stats = (list(map(str, data[k])) for k in ("norm_positions", "alphas", "stats"))
    block, meas, th = data["block"], data["measured"], data["theory"]
    fig, axes = plt.subplots(
        len(stats), len(pos), figsize=(3.3 * len(pos), 2.0 * len(stats) + 0.6),
        sharex=True, sharey="row", squeeze=False, constrained_layout=True,
    )  # fmt: skip
    colors = {a: f"C{k}" for k, a in enumerate(alphas)}
    for i, p in enumerate(pos):
        for r, s in enumerate(stats):
            ax = axes[r, i]
            for j, a in enumerate(alphas):
                m, t = _shown(meas[i, j, r], s), _shown(th[i, j, r], s)
                # uniform attention needs logits of variance ~ (qk_sigma_w2 norm)^2 << 1,
                # norm that of the attention's input (1 after a layer norm); a gradient
                # needs every block above it valid
                valid = (p != "none") | (data["qk_sigma_w2"] * th[i, j, stats.index("norm")] <= 1)
                if s in ("qk_value", "grad_value"):
                    valid = np.full_like(valid, np.all(valid))
                ax.plot(block, m, "o", ms=2.5, color=colors[a], mfc="none", mew=0.8)
                ax.plot(block, np.where(valid, t, np.nan), "-", lw=1.1, color=colors[a])
                if s not in ("qk_value", "grad_value"):  # these leave the plot outside it
                    ax.plot(block, np.where(valid, np.nan, t), ":", lw=1.1, color=colors[a])
            ax.set_yscale("log")
            ax.set_xscale("log")
            if s == "qk_value" and i == 0:
                ax.text(0.03, 0.04, f"at {FLOOR:g}: zero (collapsed)", transform=ax.transAxes,
                        fontsize=7, color="0.4")  # fmt: skip
            if r == 0:
                ax.set_title(NORM_TITLES.get(p, p))
            if i == 0:
                ax.set_ylabel(LABELS[s], fontsize=8)
            if r == len(stats) - 1:
                ax.set_xlabel("block $l$")
    handles = [
        Line2D([], [], color=colors[a], ls="-", label=ALPHA_LABELS.get(a, a)) for a in alphas
    ]
    handles += [
        Line2D([], [], color="0.3", marker="o", mfc="none", ls="none", label="measured"),
        Line2D([], [], color="0.3", ls="-", label="mean-field Gram theory"),
        Line2D([], [], color="0.3", ls=":", label="outside its assumptions"),
    ]
    fig.legend(handles=handles, loc="outside upper center", ncol=len(handles), frameon=False)
    return fig
