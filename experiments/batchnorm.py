"""Gradient explosion in batch-normalized networks at initialization, vs batch size.

Sweep: activation x batch size ``B`` x seed. Each network is an
:class:`isometry.networks.MLP` of ``depth`` layers ``x^l = phi(BN(h^l))``
(batch statistics, as in training), Gaussian weights ``sigma_w2 = 1``
(batch normalization makes the scale irrelevant). The gradient of a random
projection of the output is measured per layer
(:func:`isometry.signal.measure`), and its growth rate toward the input,

    rate = (||dLoss/dW^1||^2 / ||dLoss/dW^L||^2)^(1 / (L - 1)),

the geometric-mean ratio of consecutive layers' squared weight-gradient
norms, is reported per point. Yang et al. 2019 show that ``rate > 1`` for
every batch size: gradients explode at initialization with a rate that
depends on ``B`` and on the activation (and does not vanish as ``B`` grows);
its wide-network value is :func:`isometry.batchnorm_theory.gradient_rate`
(``(B - 2)/(B - 3)`` linear, ``-> pi/(pi - 1)`` ReLU), which the weight
gradients follow from the last layer to the first.

Vectorized: seeds vary inside one compiled function per (activation, B); the
weights, inputs and loss projections are drawn by programs compiled once
(:func:`isometry.experiments.gradients.sampled_inputs`).

Table columns: ``activation, batch, seed, layer, grad_preact_sq,
grad_weight_sq, q, growth_rate`` (``growth_rate`` is per point, repeated on
its layers' rows).

Reference: Yang, Pennington, Rao, Sohl-Dickstein & Schoenholz 2019, "A mean
field theory of batch normalization" (ICLR).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from isometry import sweep, validate
from isometry.experiments import Experiment, gradients

__all__ = ["EXPERIMENT", "PRESETS", "Config", "growth_rate", "run"]


@dataclasses.dataclass(frozen=True)
class Config:
    """Batch-norm gradient-growth sweep.

    Attributes:
        activations: activation names.
        batch_sizes: batch sizes ``B`` (>= 2: batch statistics need two examples).
        depth: ``L``.
        width: ``N``.
        seeds: independent networks (and batches) per (activation, B).
        seed: base seed.
    """

    activations: tuple[str, ...] = ("relu", "tanh")
    batch_sizes: tuple[int, ...] = (4, 16, 64)
    depth: int = 16
    width: int = 64
    seeds: int = 2
    seed: int = 0

    def __post_init__(self):
        validate.names("activations", self.activations, gradients.ACTIVATIONS)
        validate.positive_ints("batch_sizes", self.batch_sizes)
        for b in self.batch_sizes:
            validate.positive_int("batch_sizes", b, 2)
        validate.positive_int("depth", self.depth, 2)
        validate.positive_int("width", self.width)
        validate.positive_int("seeds", self.seeds)
        validate.positive_int("seed", self.seed, 0)


PRESETS = {
    "quick": Config(),
    "full": Config(batch_sizes=(2, 4, 8, 16, 32, 64, 128, 256), depth=50, width=256, seeds=8),
}


def grid(cfg: Config) -> sweep.Grid:
    """``activation x batch x seed``."""
    return sweep.product(activation=cfg.activations, batch=cfg.batch_sizes, seed=range(cfg.seeds))


def growth_rate(grad_weight_sq) -> float:
    """``(g_1 / g_L)^(1/(L-1))`` for per-layer squared gradient norms ``g (L,)``."""
    g = np.asarray(grad_weight_sq, dtype=np.float64)
    return float(np.exp((np.log(g[0]) - np.log(g[-1])) / (g.size - 1)))


def run(
    cfg: Config, out, *, per_device: int = 4, optimize: bool = True, progress: bool = True
) -> Path:
    """Run the sweep into the store ``out``; returns the aggregate csv path."""
    g = grid(cfg)
    store = sweep.Store(out, "batchnorm", cfg)
    index = {sweep.point_id(p): i for i, p in enumerate(g.points())}
    gcfg = gradients.Config(depth=cfg.depth, width=cfg.width, seed=cfg.seed)
    # Gaussian weights, sigma_w2 = 1 (batch normalization makes the scale irrelevant).
    weights = gradients.init_numbers(gcfg, "gaussian")
    sample = gradients.sampled_inputs(cfg.width, cfg.depth, cfg.seed, optimize=optimize)

    def rows(p, o):
        r = gradients.layer_rows(o)
        rate = growth_rate(o["grad_weight_sq"])
        for row in r:
            row["growth_rate"] = rate
        return r

    return sweep.run_vectorized(
        store,
        g,
        lambda s: gradients.measure_sampled(
            gradients.network_config(gcfg, s["activation"], "batch_norm")
        ),
        rows,
        static=("activation", "batch"),
        inputs=lambda p: sample(**weights, index=index[sweep.point_id(p)], batch=p["batch"]),
        per_device=per_device,
        optimize=optimize,
        progress=progress,
        label="batchnorm",
    )


EXPERIMENT = Experiment(
    "batchnorm",
    Config,
    PRESETS,
    run,
    "gradient growth per layer vs batch size (batch norm)",
    grid=grid,
)
