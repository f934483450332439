"""Transformer trainability vs depth: held-out accuracy after a fixed Adam budget for layer-norm placement x residual branch scale, on digits read as patch sequences and on associative recall (Xiong et al. 2020; Noci et al. 2022; Bordelon et al. 2023).

Experiment ``transformer_trainability``: transformers of ``L`` blocks
(width ``N``, 4 heads, ReLU MLP, learned positions) trained from the same
initialization scheme with Adam at one rate and no warm-up, for every depth
and variant. One panel per task: associative recall ``k_1 v_1 k_2 v_2 q -> v``
(2 pairs, 8 keys, 8 values, causal, last token read out) and, at the full
tier, the embedded 8x8 digits as patch sequences (mean-pooled). Colour:
layer-norm placement; line style: branch scale ``alpha``; line: mean over
seeds, band: the seeds' range, dots: single seeds; dotted grey: chance.

The cited claims, each checked by one variant on recall at the quick tier
(``N = 32``, 200 steps of batch 32 at rate 3e-3, 2 seeds, ``L = 2`` and
``16``; the figure gives the accuracies):

- pre-LN trains at depth without warm-up (Xiong et al. 2020): its deepest
  networks still learn, far above chance, but fit the training set less well:
  at this rate depth slows pre-LN's optimization.
- post-LN degrades with depth without warm-up (Xiong et al. 2020); where it
  sits at chance its training accuracy does too, so the optimization fails
  rather than generalization.
- without a residual path depth hurts (rank collapse, Dong et al. 2021; Noci
  et al. 2022), earliest of all variants: at ``L = 2`` it is the only variant
  already below the others, and at ``L = 16`` it sits at chance.
- ``alpha = 1/sqrt(L)`` makes depth harmless (Bordelon et al. 2023; Yang et
  al. 2023), for pre-LN: compare it with pre-LN at ``alpha = 1`` at the
  largest depth.

Limits: two seeds give a range, not an error bar (the band shows it). The
recall split is not disjoint: 25 % of the 512 held-out sequences also
occur among the 2,048 training sequences, so memorization alone would score
at most about 0.34. The quick tier trains one task and four of the nine
variants (pre-LN at ``alpha = 1`` and ``1/sqrt(L)``, post-LN at ``alpha =
1``, no LN without residual), one per claim, because every (task, variant,
depth) compiles its own train step and the compiles set the tier's cost, and
it trains two depths (the curves join ``L = 2`` to ``L = 16`` with a straight
line, not a measurement in between: the full tier's depths show the course).
The digits (``--set tasks=digits,recall``; 4 tokens of 4x4 patches) show the
same at these sizes except the branch scale, which they do not separate:
pre-LN keeps 0.94-0.98 held-out at ``L = 16`` with either ``alpha``, post-LN
falls to chance, and the stack without a residual path is below the others
at ``L = 2`` (0.87-0.91) and near chance at 16. The full tier (``N = 128``,
depths 2 to 128, 4 seeds, 2,000 steps at rate 1e-3, 16-token digits, 4-pair
recall) trains both tasks and all nine variants.
"""

from __future__ import annotations

import numpy as np

from isometry import plotting
from isometry.experiments import harness
from isometry.experiments import transformer_trainability as tt
from isometry.paper_figures import core

KEYS = (
    "tasks", "variants", "depths", "eval_accuracy", "train_accuracy", "chance", "steps", "patch",
    "pairs",
)  # fmt: skip

TIERS = harness.figure_tiers("transformer_trainability", tt.TINY)

COST = {"quick": 50}
"""Single-core CPU seconds of a tier from empty stores (scheduling hint for ``--jobs``): 16 runs
of 200 steps, most of the time going to tracing and compiling 8 train steps."""


def task_title(task: str, data) -> str:
    """The panel title of ``task``: the digits' patch size or the recall task's pairs."""
    if task == "digits":
        p = int(data["patch"])
        return f"digits as {64 // p**2} tokens of {p}x{p} patches"
    return f"associative recall, {int(data['pairs'])} pairs" if task == "recall" else task


NORM_COLORS = {"none": "C0", "pre": "C1", "post": "C3"}
NORM_LABELS = {"none": "no LN", "pre": "pre-LN", "post": "post-LN"}
ALPHA_STYLES = {"1": "-", "1/sqrt(L)": "--", "0": ":"}
ALPHA_LABELS = {"1": r"$\alpha = 1$", "1/sqrt(L)": r"$\alpha = 1/\sqrt{L}$", "0": "no residual"}


def compute(preset, overrides, store) -> dict:
    run = harness.stored_run(
        tt.EXPERIMENT, preset, overrides, store, progress=core.progress_enabled()
    )
    cfg = run.config
    tasks, depths = list(cfg.tasks), list(cfg.depths)
    variants = [f"{n}:{a}" for n, a in cfg.variant_pairs()]
    # (task, variant, depth, seed): the grid's axes (a variant is one zipped axis)
    axes = ("task", "norm_position", "depth", "seed")
    acc = {c: run.array(c, axes) for c in ("eval_accuracy", "train_accuracy")}
    return {
        "tasks": np.asarray(tasks),
        "variants": np.asarray(variants),
        "depths": np.asarray(depths),
        **acc,
        "chance": np.asarray([tt.chance(cfg, k) for k in tasks]),
        "steps": np.asarray(cfg.train.steps),
        "width": np.asarray(cfg.width),
        "patch": np.asarray(cfg.patch),
        "pairs": np.asarray(cfg.pairs),
    }


def plot(data, params):
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    plotting.style()
    tasks, variants = list(map(str, data["tasks"])), list(map(str, data["variants"]))
    depths = np.asarray(data["depths"])
    fig, axes = plt.subplots(
        1,
        len(tasks),
        figsize=(max(4.6 * len(tasks), 5.4), 3.8),
        squeeze=False,
        constrained_layout=True,
    )
    for i, task in enumerate(tasks):
        ax = axes[0, i]
        for j, v in enumerate(variants):
            norm, _, alpha = v.partition(":")
            acc = data["eval_accuracy"][i, j]  # (depths, seeds)
            c, ls = NORM_COLORS.get(norm, "0.3"), ALPHA_STYLES.get(alpha, "-")
            ax.fill_between(depths, acc.min(-1), acc.max(-1), color=c, alpha=0.12, lw=0)
            ax.plot(np.repeat(depths, acc.shape[-1]), acc.ravel(), ".", ms=3, color=c, alpha=0.5)
            ax.plot(depths, acc.mean(-1), ls, marker="o", ms=4, mfc="none", color=c, lw=1.3)
        ax.axhline(float(data["chance"][i]), color="0.5", lw=0.9, ls=":")
        ax.text(depths[0], float(data["chance"][i]) + 0.015, "chance", fontsize=7, color="0.4")
        ax.set(xscale="log", ylim=(0, 1.02), xlabel="depth $L$ (blocks)")
        ax.set_xticks(depths, [str(int(d)) for d in depths], minor=False)
        ax.minorticks_off()
        ax.set_ylabel("held-out accuracy")
        ax.set_title(
            f"{task_title(task, data)}: $N = {int(data['width'])}$, {int(data['steps'])} steps",
            fontsize=9,
        )
    norms = list(dict.fromkeys(v.partition(":")[0] for v in variants))
    alphas = list(dict.fromkeys(v.partition(":")[2] for v in variants))
    by_norm = [Line2D([], [], color=NORM_COLORS.get(n, "0.3"), label=NORM_LABELS.get(n, n))
               for n in norms]  # fmt: skip
    by_alpha = [Line2D([], [], color="0.3", ls=ALPHA_STYLES.get(a, "-"),
                       label=ALPHA_LABELS.get(a, a)) for a in alphas]  # fmt: skip
    if len(tasks) > 1:  # one row
        handles, ncol = by_norm + by_alpha, len(by_norm) + len(by_alpha)
    else:  # one panel: colours in the first row, line styles in the second (filled by column)
        ncol = max(len(by_norm), len(by_alpha))
        blank = Line2D([], [], lw=0, label=" ")
        pad = lambda h: h + [blank] * (ncol - len(h))  # noqa: E731
        handles = [h for pair in zip(pad(by_norm), pad(by_alpha), strict=True) for h in pair]
    fig.legend(handles=handles, loc="outside upper center", ncol=ncol, frameon=False)
    return fig
