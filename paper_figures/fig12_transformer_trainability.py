"""Transformer trainability vs depth: held-out accuracy after a fixed Adam budget for layer-norm placement x residual branch scale, on digits read as patch sequences and on associative recall (Xiong et al. 2020; Noci et al. 2022; Bordelon et al. 2023).

Experiment ``transformer_trainability``: transformers of ``L`` blocks
(width ``N``, 4 heads, ReLU MLP, learned positions) trained from the same
initialization scheme with Adam at one rate and no warm-up, for every depth
and variant. Left: the embedded 8x8 digits as 4 tokens of 4x4 patches
(mean-pooled); right: associative recall ``k_1 v_1 k_2 v_2 q -> v`` (2 pairs,
8 keys, 8 values, causal, last token read out). Colour: layer-norm
placement; line style: branch scale ``alpha``; line: mean over seeds,
band: the seeds' range, dots: single seeds; dotted grey: chance.

Which of the cited claims held at the quick tier (``N = 32``, 200 steps of
batch 32 at rate 3e-3, 2 seeds; held-out accuracy at ``L = 2 / 8 / 16``,
mean over seeds):

- pre-LN trains at depth without warm-up (Xiong et al. 2020): held on
  digits (0.955 / 0.954 / 0.948), partly on recall (0.988 / 0.815 / 0.652):
  at ``L = 16`` it still learns, far above chance 0.125, but its training
  accuracy falls from 0.997 to 0.727, so at this rate depth slows pre-LN's
  optimization.
- post-LN degrades with depth without warm-up (Xiong et al. 2020): held.
  Digits 0.947 / 0.827 / 0.103 and recall 0.979 / 0.387 / 0.133: at
  ``L = 16`` both sit at chance, training accuracy too (0.102, 0.124), so the
  optimization fails rather than generalization.
- without a residual path depth hurts (rank collapse, Dong et al. 2021; Noci
  et al. 2022): held, and earliest. Digits 0.887 / 0.350 / 0.139, recall
  0.734 / 0.171 / 0.115 (training 0.132 and 0.142 at ``L = 16``); it is also
  the weakest variant at ``L = 2``.
- ``alpha = 1/sqrt(L)`` makes depth harmless (Bordelon et al. 2023; Yang et
  al. 2023): held for pre-LN. Digits 0.957 / 0.954 / 0.972, recall 0.988 /
  0.960 / 0.944, the best variant at ``L = 16`` on both tasks; on recall it
  stands 0.15 above pre-LN at ``alpha = 1`` at ``L = 8`` and 0.29 at
  ``L = 16``.

Limits: two seeds give a range, not an error bar (post-LN on recall at
``L = 8``: 0.54 and 0.23). The recall split is not disjoint: 25 % of the 512 held-out sequences also
occur among the 2,048 training sequences, so memorization alone would score
at most about 0.34. The quick tier trains four of the nine variants (pre-LN
at ``alpha = 1`` and ``1/sqrt(L)``, post-LN at ``alpha = 1``, no LN without
residual), one per claim, because every (task, variant, depth) compiles its
own train step and the compiles set the tier's cost; the full tier
(``N = 128``, depths 2 to 128, 4 seeds, 2,000 steps at rate 1e-3, 16-token
digits, 4-pair recall) trains all nine.
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

COST = {"quick": 166.0}
"""Single-core CPU seconds of a tier from empty stores (scheduling hint for ``--jobs``): 48 runs
of 200 steps, most of the time going to tracing and compiling 24 train steps."""


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
        1, len(tasks), figsize=(4.6 * len(tasks), 3.8), squeeze=False, constrained_layout=True
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
    handles = [Line2D([], [], color=NORM_COLORS.get(n, "0.3"), label=NORM_LABELS.get(n, n))
               for n in norms]  # fmt: skip
    handles += [Line2D([], [], color="0.3", ls=ALPHA_STYLES.get(a, "-"),
                       label=ALPHA_LABELS.get(a, a)) for a in alphas]  # fmt: skip
    fig.legend(handles=handles, loc="outside upper center", ncol=len(handles), frameon=False)
    return fig
