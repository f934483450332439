"""Trainability of deep tanh networks over (sigma_w2, depth): the 6 xi_c bound.

Sweep: ``sigma_w2`` x ``depth`` x seed, each point one training run
(:mod:`isometry.experiments.harness`). The network is an
:class:`isometry.networks.MLP` of ``depth`` hidden layers of width ``N``,
Gaussian weights and biases in the mean-field convention,

    h^l = W^l x^{l-1} + b^l,   x^l = phi(h^l),   W_ij ~ N(0, sigma_w2 / N),   b_i ~ N(0, sigma_b2),

trained on the embedded digits (:func:`isometry.data.load_digits`) as the
``train`` config says (:class:`isometry.training.TrainConfig`: ``train.optimizer``
at a fixed ``train.learning_rate`` for ``train.steps`` updates). Mean-field
theory says a random network carries the correlation of two inputs over
about ``xi_c`` layers,

    1 / xi_c = -log chi_c,   chi_c = sigma_w2 E[phi'(u1) phi'(u2)] at the fixed point (q*, c*),

and that it trains only if its depth is below about ``6 xi_c``; ``xi_c``
diverges at the edge of chaos (``chi1 = 1``), so the trainable depth does
too (Schoenholz, Gilmer, Ganguli & Sohl-Dickstein 2017, "Deep information
propagation", Figs. 5 and 6). The table holds the measurement only; the
theory is :func:`theory` (:func:`isometry.meanfield.phase_diagram`), which
figure 3 draws over it.

Protocol and sizes. The paper trains wide fully connected networks on MNIST
and CIFAR-10 with SGD and RMSProp for up to about 10^4 steps, ``sigma_w2`` in
``[1, 4]``, ``sigma_b2 = 0.05``, ``L`` up to 300; Fig. 6 shows the trainable
region growing toward ``6 xi_c`` with training time. Here the data are the
8x8 digits (64 features) and the default optimizer is RMSProp, which the
paper also uses: its per-parameter step size does not depend on the gradient
scale, so a single learning rate serves every depth (near criticality SGD
needs a smaller rate as the depth grows). The ``quick`` preset (width 64, 400 steps,
``L <= 100``) trains for far fewer steps than the paper, so its trainable
band lies inside the ``6 xi_c`` curve rather than filling it; ``full``
(width 784, 3000 steps, ``L`` up to 300, 31 values of ``sigma_w2``) takes
the paper's sizes, still on the digits (``dataset=mnist`` reads local MNIST
files).

Table columns: ``depth, sigma_w2, seed, steps_done, diverged, diverged_step,
loss, train_loss, train_accuracy, eval_loss, eval_accuracy``
(accuracies of the whole training and held-out splits at the final
parameters; chance is 0.1). Arrays per point: ``step``, ``loss`` (the
logged training-batch loss).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from isometry import activations, kernels, meanfield, networks, sweep, training, validate
from isometry.experiments import Experiment, harness

__all__ = [
    "EXPERIMENT",
    "NTK_INPUTS",
    "PRESETS",
    "Config",
    "grid",
    "ntk_condition",
    "run",
    "theory",
]


TRAIN = training.TrainConfig(
    steps=400, batch_size=64, optimizer="rmsprop", learning_rate=1e-4, log_every=50,
    eval_every=0, probe_every=0, checkpoint_every=1000,
)  # fmt: skip
"""The quick preset's training: RMSProp at one rate for every depth, no evaluation or probe."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Trainability sweep.

    Attributes:
        activation: activation name (the paper: ``tanh``).
        sigma_w2: weight variances (the heat map's x axis).
        sigma_b2: bias variance.
        depths: hidden-layer counts ``L`` (the y axis).
        width: ``N``.
        seeds: independent runs per ``(sigma_w2, depth)``.
        dataset: ``digits`` (embedded) or a local-file dataset.
        train: every run's :class:`~isometry.training.TrainConfig`; run ``s``
            uses ``train.seed + s`` for initialization and data order
            (``--set train.steps=300``).
    """

    activation: str = "tanh"
    sigma_w2: tuple[float, ...] = (1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0)
    sigma_b2: float = 0.05
    depths: tuple[int, ...] = (10, 25, 50, 100)
    width: int = 64
    seeds: int = 1
    dataset: str = "digits"
    train: training.TrainConfig = TRAIN

    def __post_init__(self):
        validate.choice("activation", self.activation, tuple(activations.names()))
        validate.reals("sigma_w2", self.sigma_w2, minimum=0.0, strict=True)
        validate.real_array("sigma_b2", self.sigma_b2, minimum=0.0)
        validate.positive_ints("depths", self.depths)
        harness.check_study(self)


PRESETS = {
    "quick": Config(),
    "full": Config(
        sigma_w2=tuple(float(v) for v in np.round(np.linspace(1.0, 4.0, 31), 6)),
        depths=(10, 20, 40, 60, 80, 100, 130, 160, 200, 250, 300),
        width=784,
        seeds=2,
        train=dataclasses.replace(TRAIN, steps=3000, batch_size=128, log_every=100),
    ),
}


def grid(cfg: Config) -> sweep.Grid:
    """``depth x sigma_w2 x seed`` (runs of one depth share a compiled train step)."""
    return sweep.product(depth=cfg.depths, sigma_w2=cfg.sigma_w2, seed=range(cfg.seeds))


def theory(activation: str, sigma_w2, sigma_b2: float) -> dict[str, np.ndarray]:
    """Mean-field theory at each ``sigma_w2 (W,)``: ``chi1``, ``xi_c`` ``(W,)`` and the
    critical ``sigma_w2`` (scalar) of ``sigma_b2``.

    ``xi_c = -1 / log chi_c`` is ``inf`` at the edge of chaos. Computed in
    float32 (:func:`isometry.meanfield.phase_diagram`; about 1e-5 relative,
    ample for a curve over a heat map).
    """
    sw = np.asarray(sigma_w2, np.float32)
    with jax.enable_x64(False):
        d = meanfield.phase_diagram(activation, sw, np.asarray([sigma_b2], np.float32))
        return {
            "chi1": np.asarray(d.chi1[:, 0], np.float64),
            "xi_c": np.asarray(d.xi_c[:, 0], np.float64),
            "critical_sigma_w2": np.asarray(d.critical_sigma_w2, np.float64).reshape(()),
        }


NTK_INPUTS = 16
"""Training inputs (the first of the split) whose NTK :func:`ntk_condition` conditions."""


def ntk_condition(activation: str, sigma_w2, sigma_b2: float, x, max_depth: int) -> np.ndarray:
    """``log10`` of the infinite-width NTK's condition number ``(W, max_depth)``.

    Entry ``[w, L - 1]`` is ``kappa = lambda_max / lambda_min`` of the NTK
    (:func:`isometry.kernels.ntk`, NTK parameterization) at the readout of a
    network with ``L`` hidden layers at ``sigma_w2[w]``: layer ``L + 1`` of
    the recursion on the inputs ``x (n, d)``, the readout taking the hidden
    layers' variances and the input embedding counted as the input. Gradient
    descent at its largest stable rate ``~ 2 / lambda_max`` fits the slowest
    eigendirection after ``~ kappa`` steps, so ``kappa`` above the number of
    training steps predicts failure to train (Xiao, Pennington & Schoenholz
    2020). Theory only, float64, by the Hermite-series route
    (``method="series"`` at ``order=64``: on the quick tier's grid its
    ``log10 kappa`` differs from ``order=192`` by < 1e-9 where ``kappa < 1e8``);
    one ``vmap`` over ``sigma_w2``, one scan over depth.
    """
    validate.positive_int("max_depth", max_depth)
    with jax.enable_x64(True):
        x = jax.numpy.asarray(x, np.float64)

        def one(sw):
            r = kernels.layers(
                activation, x, max_depth + 1, sw, sigma_b2, method="series", order=64
            )
            return kernels.condition_number(r.ntk[1:])

        kappa = jax.jit(jax.vmap(one))(jax.numpy.asarray(sigma_w2, np.float64))
        return np.log10(np.asarray(kappa))


def train_config(cfg: Config, seed: int) -> training.TrainConfig:
    """The :class:`~isometry.training.TrainConfig` of run ``seed``: ``cfg.train`` at
    ``train.seed + seed``."""
    return dataclasses.replace(cfg.train, seed=cfg.train.seed + seed)


def run(
    cfg: Config, out, *, per_device: int = 4, optimize: bool = True, progress: bool = True
) -> Path:
    """Train one MLP per (depth, sigma_w2, seed) into the store ``out``; the csv path.

    Runs go through :func:`isometry.experiments.harness.run_points`
    (``per_device`` and ``optimize`` are for vectorized sweeps and unused).
    """
    del per_device, optimize
    store = sweep.Store(out, "trainability", cfg)
    ds = harness.load_data(cfg.dataset)

    def point(p, run_dir):
        tc = train_config(cfg, p["seed"])
        net = networks.MLPConfig(
            depth=p["depth"], width=cfg.width, in_dim=ds.in_dim, out_dim=ds.out_dim,
            activation=cfg.activation, init="gaussian", sigma_w2=p["sigma_w2"],
            sigma_b2=cfg.sigma_b2,
        )  # fmt: skip
        res = harness.train_mlp(net, ds, tc, run_dir, seed=tc.seed)
        arrays = {k: res.curves[k] for k in ("step", "loss")}
        return {"rows": res.row, "arrays": arrays}

    return harness.run_points(store, grid(cfg), point, progress=progress, label="trainability")


EXPERIMENT = Experiment(
    "trainability",
    Config,
    PRESETS,
    run,
    "training accuracy over (sigma_w2, depth) for tanh; the 6 xi_c trainable-depth bound",
    grid=grid,
)
