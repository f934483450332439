"""Transformer trainability vs depth: held-out accuracy after a fixed Adam budget for layer-norm placement x residual branch scale, on digits read as patch sequences and on associative recall (Xiong et al. 2020; Noci et al. 2022; Bordelon et al. 2023).

Experiment ``transformer_trainability``: transformers of ``L`` blocks
(width ``N``, 4 heads, ReLU MLP, learned positions) trained from the same
initialization scheme with Adam at one rate and no warm-up, for every depth
and variant. Left: the embedded 8x8 digits as 16 tokens of 2x2 patches
(mean-pooled); right: associative recall ``k_1 v_1 ... k_4 v_4 q -> v``
(8 keys, 8 values, causal, last token read out). Colour: layer-norm
placement; line style: branch scale ``alpha``; line: mean over seeds,
band: the seeds' range, dots: single seeds; dotted grey: chance.

Which of the cited claims held at the quick tier (``N = 32``, 200 steps of
batch 64 at rate 1e-3, 2 seeds; held-out accuracy at ``L = 2 / 8 / 32``,
mean over seeds):

- pre-LN trains at depth without warm-up (Xiong et al. 2020): held. Digits
  0.930 / 0.946 / 0.936; recall 0.477 / 0.447 / 0.415 (a small decline).
- post-LN degrades with depth at a fixed rate without warm-up (Xiong et al.
  2020): held. Digits 0.929 / 0.914 / 0.100 and recall 0.473 / 0.391 / 0.125:
  at ``L = 32`` both sit at chance, training accuracy too (0.101, 0.129), so
  the optimization fails rather than generalization.
- without a residual path depth hurts (rank collapse, Dong et al. 2021; Noci
  et al. 2022): held, and earliest. Digits 0.857 / 0.320 / 0.102; recall
  0.405 / 0.169 / 0.119 (already far behind at ``L = 8``, the seeds spread
  widely there: 0.23 and 0.41 on digits).
- ``alpha = 1/sqrt(L)`` makes depth harmless (Bordelon et al. 2023; Yang et
  al. 2023): held for pre-LN. Digits 0.918 / 0.946 / 0.960; recall 0.481 /
  0.460 / 0.453, the best variant at ``L = 32`` on both tasks; its
  advantage over pre-LN at ``alpha = 1`` is small at these depths (0.02-0.04).

Limits: 200 steps do not solve recall (training accuracy at most 0.71,
held-out at most 0.49; chance 0.125), so its panel compares partial learning
and the held-out numbers include overfitting of 2,048 training sequences;
two seeds give a range, not an error bar. The quick tier trains four of the
nine variants (pre-LN at ``alpha = 1`` and ``1/sqrt(L)``, post-LN at
``alpha = 1``, no LN without residual); the full tier (``N = 128``, depths to
128, 4 seeds, 2,000 steps) trains all nine.
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


def per_seed(table: dict, tasks, variants, depths, seeds: int, column: str) -> np.ndarray:
    """``(tasks, variants, depths, seeds)`` array of ``column`` (NaN where no row)."""
    out = np.full((len(tasks), len(variants), len(depths), seeds), np.nan)
    cols = ("task", "norm_position", "alpha", "depth", "seed")
    for t, n, a, d, s, v in zip(*(table[c] for c in cols), table[column], strict=True):
        k = (tasks.index(str(t)), variants.index(f"{n}:{a}"), depths.index(int(d)), int(s))
        out[k] = v
    return out


def compute(preset, overrides, store) -> dict:
    run = harness.stored_run(
        "transformer_trainability", preset, overrides, store, progress=core.progress_enabled()
    )
    cfg, t = run.config, run.table
    tasks, depths = list(cfg.tasks), list(cfg.depths)
    variants = [f"{n}:{a}" for n, a in cfg.variant_pairs()]
    acc = {
        c: per_seed(t, tasks, variants, depths, cfg.seeds, c)
        for c in ("eval_accuracy", "train_accuracy")
    }
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
