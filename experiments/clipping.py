"""Gradient clipping in an exploding-gradient regime: none vs global-norm, value and adaptive.

Sweep: clipping rule x seed, each point one training run
(:mod:`isometry.experiments.harness`) of the same deep network, initialization and
data order. The default network is a deep ReLU MLP with ``sigma_w2 = 2.5``,
above He's critical ``2``: in mean field every layer multiplies the forward
length and the backward gradient by

    chi1 = sigma_w2 E[phi'(h)^2] = sigma_w2 / 2 = 1.25,

so at depth ``L`` the logits and the gradient start ``~ chi1^(L/2)`` times
too large (the ordered/chaotic picture of Schoenholz et al. 2017 for
gradients; Glorot & Bengio 2010; He et al. 2015), and plain SGD blows up
within a few steps. The rules (:func:`isometry.training.clipping`), applied
to the gradient ``g`` before the SGD update::

    none:            g
    global_norm:c    g * min(1, c / ||g||)                         (Pascanu et al. 2013)
    value:c          clamp(g_i, -c, c) per entry
    agc:c            G_i * min(1, c max(||W_i||, eps) / ||G_i||)    per unit i of every layer
                                                                    (Brock et al. 2021)

A non-finite loss or gradient stops a run (:class:`isometry.training.NonFiniteError`);
the step is recorded as ``diverged_step`` with the metrics logged before it.
Logged every ``train.log_every`` steps: the batch loss, the global gradient norm
before and after clipping and the per-layer gradient norms.

References: Pascanu, Mikolov & Bengio 2013, "On the difficulty of training
recurrent neural networks"; Brock, De, Smith & Simonyan 2021,
"High-performance large-scale image recognition without normalization".

Sizes: ``quick`` trains width 64, depth 30 on the embedded digits for 200
steps; ``full`` width 256, depth 50 for 2000 steps with three seeds.

Table columns: ``clip, seed, chi1, steps_done, diverged, diverged_step,
loss, train_loss, train_accuracy, eval_loss, eval_accuracy,
grad_norm_initial, grad_norm_max, clipped_fraction``. Arrays per point:
``step, loss, grad_norm, grad_norm_clipped, clip_ratio, grad_norm_layers
(T, L), eval_step, eval_loss, eval_accuracy``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from isometry import activations, meanfield, networks, signal, sweep, training, validate
from isometry.experiments import Experiment, harness

__all__ = ["EXPERIMENT", "PRESETS", "Config", "gradient_growth", "grid", "run"]


TRAIN = training.TrainConfig(
    steps=200, batch_size=64, optimizer="sgd", learning_rate=0.05, log_every=1, eval_every=25,
    probe_every=0, checkpoint_every=1000,
)  # fmt: skip
"""The quick preset's training: plain SGD, every step logged (its ``clip`` is each point's rule)."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Clipping sweep.

    Attributes:
        clips: clipping rules, ``none`` or ``global_norm:C``, ``value:C``, ``agc:C``.
        activation: activation name.
        init: weight initializer (``gaussian`` or ``orthogonal``).
        sigma_w2: weight variance (``> 2`` for ReLU: exploding).
        sigma_b2: bias variance.
        depth: hidden layers ``L``.
        width: ``N``.
        seeds: independent runs per rule.
        dataset: ``digits`` (embedded) or a local-file dataset.
        train: every run's :class:`~isometry.training.TrainConfig`, with ``clip``
            replaced by the point's rule; run ``s`` uses ``train.seed + s`` for
            initialization and data order.
    """

    clips: tuple[str, ...] = ("none", "global_norm:1", "value:0.01", "agc:0.01")
    activation: str = "relu"
    init: str = "gaussian"
    sigma_w2: float = 2.5
    sigma_b2: float = 0.0
    depth: int = 30
    width: int = 64
    seeds: int = 1
    dataset: str = "digits"
    train: training.TrainConfig = TRAIN

    def __post_init__(self):
        if not isinstance(self.clips, tuple) or not self.clips:
            raise ValueError(f"clips must be a non-empty tuple, got {self.clips!r}")
        for c in self.clips:
            training.parse_clip(c)
        if len(set(self.clips)) != len(self.clips):
            raise ValueError(f"clips must not repeat, got {self.clips!r}")
        validate.choice("activation", self.activation, tuple(activations.names()))
        validate.choice("init", self.init, ("gaussian", "orthogonal"))
        validate.real_array("sigma_w2", self.sigma_w2, minimum=0.0, strict=True)
        validate.real_array("sigma_b2", self.sigma_b2, minimum=0.0)
        validate.positive_int("depth", self.depth)
        harness.check_study(self)


PRESETS = {
    "quick": Config(),
    "full": Config(
        depth=50,
        width=256,
        seeds=3,
        train=dataclasses.replace(TRAIN, steps=2000, batch_size=128, eval_every=100),
    ),
}


def grid(cfg: Config) -> sweep.Grid:
    """``clip x seed``."""
    return sweep.product(clip=cfg.clips, seed=range(cfg.seeds))


def train_config(cfg: Config, clip: str, seed: int) -> training.TrainConfig:
    """The :class:`~isometry.training.TrainConfig` of one run: ``cfg.train`` with the
    rule ``clip`` and seed ``train.seed + seed``."""
    return dataclasses.replace(cfg.train, clip=clip, seed=cfg.train.seed + seed)


def gradient_summary(curves: dict[str, np.ndarray]) -> dict[str, float]:
    """``grad_norm_initial`` (first logged), ``grad_norm_max`` and ``clipped_fraction``.

    ``clipped_fraction``: the share of logged steps whose clipped norm is
    below the raw norm (``clip_ratio < 1 - 1e-6``).
    """
    g, ratio = curves["grad_norm"], curves["clip_ratio"]
    finite = g[np.isfinite(g)]
    return {
        "grad_norm_initial": float(g[0]) if g.size else float("nan"),
        "grad_norm_max": float(finite.max()) if finite.size else float("nan"),
        "clipped_fraction": float(np.mean(ratio < 1 - 1e-6)) if ratio.size else float("nan"),
    }


def gradient_growth(activation: str, sigma_w2: float, sigma_b2: float, ds) -> float:
    """``chi1 = sigma_w2 E[phi'(h)^2]``, the per-layer growth of squared gradient norms.

    At the fixed point ``q*`` (:func:`isometry.meanfield.chi1`); where ``q*``
    diverges (ReLU above ``sigma_w2 = 2``) at the first layer's
    ``q^1 = sigma_w2 mean(u^2) + sigma_b2``; ReLU's ``chi1 = sigma_w2 / 2`` at every ``q``.
    """
    with jax.enable_x64(True):
        chi = float(meanfield.chi1(activation, sigma_w2, sigma_b2))
        if not np.isfinite(chi):  # chi^1 of the per-layer recursion from the data
            p0 = float(np.mean(np.square(ds.x_train, dtype=np.float64)))
            chi = float(signal.theory(activation, sigma_w2, sigma_b2, 1, p0).chi[0])
    return chi


def run(
    cfg: Config, out, *, per_device: int = 4, optimize: bool = True, progress: bool = True
) -> Path:
    """Train the same exploding MLP once per (clip rule, seed) into ``out``; the csv path.

    ``per_device`` and ``optimize`` are unused (independent runs).
    """
    del per_device, optimize
    store = sweep.Store(out, "clipping", cfg)
    ds = harness.load_data(cfg.dataset)
    chi1 = gradient_growth(cfg.activation, cfg.sigma_w2, cfg.sigma_b2, ds)
    net = networks.MLPConfig(
        depth=cfg.depth, width=cfg.width, in_dim=ds.in_dim, out_dim=ds.out_dim,
        activation=cfg.activation, init=cfg.init, sigma_w2=cfg.sigma_w2, sigma_b2=cfg.sigma_b2,
    )  # fmt: skip

    def point(p, run_dir):
        tc = train_config(cfg, p["clip"], p["seed"])
        res = harness.train_mlp(net, ds, tc, run_dir, seed=tc.seed)
        row = {"chi1": chi1, **res.row, **gradient_summary(res.curves)}
        keep = (
            "step", "loss", "grad_norm", "grad_norm_clipped", "clip_ratio", "grad_norm_layers",
            "eval_step", "eval_loss", "eval_accuracy",
        )  # fmt: skip
        return {"rows": row, "arrays": {k: res.curves[k] for k in keep}}

    return harness.run_points(store, grid(cfg), point, progress=progress, label="clipping")


EXPERIMENT = Experiment(
    "clipping",
    Config,
    PRESETS,
    run,
    "exploding gradients: training without and with global-norm, value and adaptive clipping",
    grid=grid,
)
