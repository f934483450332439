"""Trainability of deep transformers vs depth: layer-norm placement and residual branch scale.

Sweep: ``task x norm_position x alpha x depth x seed``, each point one
training run (:mod:`isometry.experiments.harness`). The network is an
:class:`isometry.networks.Transformer` of ``depth`` blocks of width ``N``
(ReLU MLP with He ``W_1``; ``W_V, W_O, W_2`` of variance ``1/N``; ``W_Q, W_K``
of variance ``qk_sigma_w2 / N``; learned positional embedding), each block
two residual sublayers

    "pre":   x + alpha f(LN(x)),   "post":  LN(x + alpha f(x)),   "none":  x + alpha f(x),

with ``alpha = 1``, ``1/sqrt(L)`` or ``0`` (``"0"``: no residual path,
``f(LN(x))``, ``LN(f(x))`` or ``f(x)``), trained for a fixed budget
(``train``: Adam at one rate, no warm-up, for every depth and variant) on two
embedded tasks:

``digits``
    the 8x8 digits (:func:`isometry.data.load_digits`) read as a sequence of
    ``patch x patch`` patches (:func:`isometry.data.patch_sequence`; ``T = 64 /
    patch^2`` tokens, linear patch embedding), mean-pooled, not causal; chance
    0.1 (Dosovitskiy et al. 2021).
``recall``
    associative recall (:func:`isometry.data.associative_recall`):
    ``k_1 v_1 ... k_P v_P q -> v`` with the paired value of the query key;
    symbols embedded, causal, read out at the last token; chance ``1/values``.

What the cited papers lead one to expect: pre-LN trains at depth without
warm-up while post-LN's gradients near the output grow with depth, so
post-LN needs warm-up and degrades at depth with a fixed rate (Xiong et al.
2020); without a residual path the tokens collapse to one direction within a
few blocks and the query/key gradients vanish, so depth hurts training (Dong
et al. 2021; Noci et al. 2022); scaling the branches by ``1/sqrt(L)`` keeps
the per-block updates and the trainable behaviour depth-independent
(Bordelon et al. 2023; Yang et al. 2023). The table holds the measurement;
figure 12 draws it and says which of these held.

Presets: ``quick`` (``N = 32``, 4 heads, depths 2 and 16, 2 seeds, 200 Adam
steps of batch 32 at rate 3e-3; recall of 2 pairs) trains one task and four of
the nine variants, one per claim: pre-LN and post-LN at ``alpha = 1`` (the
comparison of Xiong et al. 2020), pre-LN at ``alpha = 1/sqrt(L)`` (Bordelon et
al. 2023) and no LN without a residual path (the rank-collapse case of Dong et
al. 2021 and Noci et al. 2022). Each (task, variant, depth) compiles its own
train step (seeds share it), and on a CPU the compiles, not the steps, set the
tier's cost, so the quick tier keeps the grid at 8 such groups: recall, where
all four claims show (``--set tasks=digits,recall`` adds the digits as 4 tokens
of 4x4 patches, on which pre-LN learns too at ``L = 2`` within the budget).
``full`` (``N = 128``, depths 2 to 128, 4 seeds, 2,000 steps of batch 128 at
rate 1e-3, 16-token digits, 4-pair recall) trains both tasks and all nine
variants.

Table columns: ``task, norm_position, alpha, depth, seed, steps_done,
diverged, loss, train_loss, train_accuracy, eval_loss,
eval_accuracy`` (accuracies of the whole training and held-out splits at the
final parameters). Arrays per point: ``step``, ``loss``, ``grad_norm`` (the
logged training-batch loss and gradient norm).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from isometry import data, networks, sweep, training, validate
from isometry.experiments import Experiment, harness
from isometry.experiments.transformer_signal import ALPHAS

__all__ = [
    "ALPHAS",
    "EXPERIMENT",
    "PRESETS",
    "TASKS",
    "TINY",
    "Config",
    "chance",
    "grid",
    "load_task",
    "network_config",
    "run",
]

TASKS = ("digits", "recall")
"""The embedded tasks: digits as patch sequences, associative recall."""

TRAIN = training.TrainConfig(
    steps=200, batch_size=64, optimizer="adam", learning_rate=1e-3, log_every=50,
    eval_every=0, probe_every=0, checkpoint_every=1000,
)  # fmt: skip
"""The default training: Adam at one rate for every depth and variant, no warm-up."""

QUICK_TRAIN = dataclasses.replace(TRAIN, batch_size=32, learning_rate=3e-3)
"""The quick preset's training: 200 Adam steps of batch 32 at rate 3e-3 (one rate for every
depth and variant, no warm-up), at which pre-LN learns recall of 2 pairs and the digits as 4
tokens of 4x4 patches at ``L = 2``."""

QUICK_VARIANTS = ("pre:1", "pre:1/sqrt(L)", "post:1", "none:0")
"""The quick preset's ``norm_position:alpha`` variants (four of the nine)."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Transformer trainability sweep.

    Attributes:
        tasks: subset of :data:`TASKS`.
        norm_positions: subset of ``none``, ``pre``, ``post``.
        alphas: subset of ``"1"``, ``"1/sqrt(L)"``, ``"0"`` (no residual path).
        variants: ``"norm_position:alpha"`` pairs to train (``--set
            variants=pre:1,none:0``); empty means every pair of
            ``norm_positions x alphas``.
        depths: blocks ``L``.
        width: ``N``.
        heads: attention heads (divide ``width``).
        qk_sigma_w2: ``N Var(W_Q)``, ``N Var(W_K)``.
        patch: patch side of the digits task (divides 8).
        pairs, keys, values: the recall task's sizes
            (:func:`isometry.data.associative_recall`).
        n_train, n_test: the recall task's split sizes.
        seeds: independent runs per point (run ``s``: initialization and data
            order from ``train.seed + s``).
        seed: seed of the data (digits split, recall sequences).
        train: every run's :class:`~isometry.training.TrainConfig`
            (``--set train.steps=100``).
    """

    tasks: tuple[str, ...] = TASKS
    norm_positions: tuple[str, ...] = ("none", "pre", "post")
    alphas: tuple[str, ...] = ALPHAS
    variants: tuple[str, ...] = ()
    depths: tuple[int, ...] = (2, 8, 32)
    width: int = 32
    heads: int = 4
    qk_sigma_w2: float = 1.0
    patch: int = 2
    pairs: int = 4
    keys: int = 8
    values: int = 8
    n_train: int = 2048
    n_test: int = 512
    seeds: int = 2
    seed: int = 0
    train: training.TrainConfig = TRAIN

    def __post_init__(self):
        validate.names("tasks", self.tasks, TASKS)
        validate.names("norm_positions", self.norm_positions, networks.TRANSFORMER_NORMS)
        validate.names("alphas", self.alphas, ALPHAS)
        for v in self.variants:
            n, _, a = str(v).partition(":")
            if n not in self.norm_positions or a not in self.alphas:
                raise ValueError(
                    "variants must be 'norm_position:alpha' with norm_position in "
                    f"{self.norm_positions} and alpha in {self.alphas}, got {v!r}"
                )
        validate.positive_ints("depths", self.depths)
        validate.int_fields(self, "width", "heads", "patch", "pairs", "keys", "values")
        validate.int_fields(self, "n_train", "n_test", "seeds")
        validate.positive_int("seed", self.seed, 0)
        validate.real_array("qk_sigma_w2", self.qk_sigma_w2, minimum=0.0)
        if 8 % self.patch:
            raise ValueError(f"patch must divide 8 (the digits' side), got {self.patch}")
        harness.check_train(self.train)
        network_config(self, "recall", "pre", "1", 1)  # heads | width, recall sizes

    def variant_pairs(self) -> tuple[tuple[str, str], ...]:
        """The trained ``(norm_position, alpha)`` pairs."""
        if self.variants:
            return tuple(tuple(v.partition(":")[::2]) for v in self.variants)
        return tuple((n, a) for n in self.norm_positions for a in self.alphas)


TINY = (
    "tasks=recall", "variants=pre:1/sqrt(L)", "depths=2", "width=8", "heads=2", "seeds=1",
    "n_train=64", "n_test=32", "train.steps=4", "train.batch_size=16", "train.log_every=2",
)  # fmt: skip
"""Overrides of the quick preset for a run of seconds (tests, the figure's tiny tier)."""


def grid(cfg: Config) -> sweep.Grid:
    """``task x (norm_position, alpha) x depth x seed`` (one variant and depth share a
    compiled train step across seeds)."""
    norms, alphas = zip(*cfg.variant_pairs(), strict=True)
    return (
        sweep.product(task=cfg.tasks)
        * sweep.zipped(norm_position=norms, alpha=alphas)
        * sweep.product(depth=cfg.depths, seed=range(cfg.seeds))
    )


def load_task(cfg: Config, task: str) -> data.Dataset:
    """The dataset of ``task``: digits as ``(n, 64 / patch^2, patch^2)`` float32 patch
    sequences, or recall as ``(n, 2 P + 1)`` int32 symbols."""
    validate.choice("task", task, TASKS)
    if task == "recall":
        return data.associative_recall(
            cfg.seed, n_train=cfg.n_train, n_test=cfg.n_test, pairs=cfg.pairs, keys=cfg.keys,
            values=cfg.values,
        )  # fmt: skip
    ds = harness.load_data("digits", cfg.seed, images=True)
    seq = lambda x: data.patch_sequence(x[..., 0], cfg.patch).astype(np.float32)  # noqa: E731
    return dataclasses.replace(ds, x_train=seq(ds.x_train), x_test=seq(ds.x_test))


def chance(cfg: Config, task: str) -> float:
    """Accuracy of guessing: ``1/10`` (digits) or ``1/values`` (recall)."""
    return 1.0 / (cfg.values if task == "recall" else 10)


def network_config(
    cfg: Config, task: str, norm_position: str, alpha: str, depth: int
) -> networks.TransformerConfig:
    """The :class:`~isometry.networks.TransformerConfig` of one point, embedding and readout
    included: patches, mean pool, not causal (digits); symbols, last token, causal (recall)."""
    recall = task == "recall"
    tokens = 2 * cfg.pairs + 1 if recall else 64 // cfg.patch**2
    return networks.TransformerConfig(
        depth=depth, width=cfg.width, heads=cfg.heads, norm_position=norm_position,
        residual=alpha != "0", residual_scale=alpha if alpha == "1/sqrt(L)" else 1.0,
        causal=recall, qk_sigma_w2=cfg.qk_sigma_w2, activation="relu", init="he_normal",
        in_dim=None if recall else cfg.patch**2,
        vocab_size=cfg.keys + cfg.values if recall else None, seq_len=tokens,
        out_dim=cfg.values if recall else 10, pool="last" if recall else "mean",
    )  # fmt: skip


PRESETS = {
    "quick": Config(
        tasks=("recall",),
        variants=QUICK_VARIANTS,
        depths=(2, 16),
        patch=4,
        pairs=2,
        train=QUICK_TRAIN,
    ),
    "full": Config(
        depths=(2, 8, 32, 128),
        width=128,
        seeds=4,
        n_train=8192,
        n_test=2048,
        train=dataclasses.replace(TRAIN, steps=2000, batch_size=128, log_every=100),
    ),
}


def run(
    cfg: Config, out, *, per_device: int = 4, optimize: bool = True, progress: bool = True
) -> Path:
    """Train one transformer per grid point into the store ``out``; the csv path.

    One training run per point (:func:`isometry.experiments.harness.run_points`,
    resumable); ``per_device`` and ``optimize`` belong to vectorized sweeps.
    """
    del per_device, optimize
    store = sweep.Store(out, "transformer_trainability", cfg)
    tasks = {t: load_task(cfg, t) for t in cfg.tasks}

    def point(p, run_dir):
        tc = dataclasses.replace(cfg.train, seed=cfg.train.seed + p["seed"])
        net = network_config(cfg, p["task"], p["norm_position"], p["alpha"], p["depth"])
        model = networks.Transformer(net, rngs=nnx.Rngs(tc.seed), dtype=jnp.float32)
        res = harness.train_model(model, tasks[p["task"]], tc, run_dir, depth=p["depth"])
        row = {k: v for k, v in res.row.items() if k != "diverged_step"}  # steps_done says it
        arrays = {k: res.curves[k] for k in ("step", "loss", "grad_norm")}
        return {"rows": row, "arrays": arrays}

    return harness.run_points(
        store, grid(cfg), point, progress=progress, label="transformer_trainability"
    )


EXPERIMENT = Experiment(
    "transformer_trainability",
    Config,
    PRESETS,
    run,
    "transformers: held-out accuracy after a fixed budget vs depth, LN placement x branch scale",
    grid=grid,
)
