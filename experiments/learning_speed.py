"""Learning speed at criticality: orthogonal vs Gaussian weights, tanh at small and large q*, ReLU.

Sweep: setting (activation and fixed point ``q*``) x weights (orthogonal /
Gaussian) x depth x seed, each point one training run
(:mod:`isometry.experiments.harness`). Every network sits at the critical point of
its ``q*`` (:func:`isometry.meanfield.critical_point`),

    sigma_w2 = 1 / E[phi'(sqrt(q*) z)^2],   sigma_b2 = q* - sigma_w2 E[phi(sqrt(q*) z)^2],

so ``chi1 = 1`` and the mean squared singular value of the input-output
Jacobian ``J`` is 1 at any depth; ReLU's critical point is ``(2, 0)`` (He)
for every ``q*``. The inputs are scaled so that the first pre-activations
start at ``q*`` (:func:`isometry.experiments.harness.input_scale`). What differs is
the *spread* of the spectrum of ``J J^T`` (free probability, Pennington,
Schoenholz & Ganguli 2017, 2018):

    Var(lambda) = L (mu2 / mu1^2 - 1 - s1),   mu_k = E[phi'(sqrt(q*) z)^(2k)],

with ``s1 = -1`` for Gaussian and ``0`` for orthogonal weights. Orthogonal
tanh at small ``q*`` (``phi`` nearly linear, ``mu2 ~ mu1^2``) is dynamically
isometric at any depth; Gaussian weights and ReLU (``mu2 / mu1^2 = 2``) are
not. The paper finds that isometric networks learn fastest and that their
learning time does not grow with depth (Pennington, Schoenholz & Ganguli
2017, "Resurrecting the sigmoid in deep learning through dynamical
isometry: theory and practice", Figs. 4 and 5; Saxe, McClelland & Ganguli
2014 for deep linear networks).

Protocol. Plain SGD (the paper trains with SGD, momentum and ADAM and finds
the same ordering with each; without momentum or per-parameter
rescaling the conditioning of ``J`` acts on the updates most directly). The
learning rate is scaled with depth,

    eta_L = train.learning_rate * (lr_reference_depth / L) ** lr_depth_exponent,

because the gradient of an isometric network gets one O(1) contribution per
layer, so its step in function space grows like ``L`` at a fixed rate; with
``eta ~ 1/L`` that step is the same at every depth (exponent 0 gives a
constant rate). Each run records the training-batch loss every
``train.log_every`` steps, the held-out loss and accuracy every ``train.eval_every``
steps, the steps to reach ``accuracy_threshold`` held-out accuracy, and the
squared singular values of the input-output Jacobian at initialization on
``train.probe_inputs`` held-out inputs (:func:`jacobian_at_init`: the fields of
the training probe, :func:`isometry.training.monitor_probe`, computed exactly
in one pass over depth) beside the free-probability variance above
(:func:`isometry.freeprob.jacobian_moments`).

Sizes. The paper trains networks a few hundred layers deep on CIFAR-10.
``quick``: the embedded digits, width 64, ``L`` in (16, 48, 128), 400 steps.
``full``: width 400, ``L`` up to 256 on the digits, 3000 steps
(``dataset=cifar10`` reads local CIFAR-10 files).

Table columns: ``setting, init, depth, seed, activation, q_star, sigma_w2,
sigma_b2, learning_rate, input_scale, steps_to_accuracy`` (NaN if never
reached), ``steps_done, diverged, diverged_step, loss, train_loss,
train_accuracy, eval_loss, eval_accuracy, jac_sv2_mean, jac_sv2_var,
jac_sv2_max`` (at initialization), ``jac_var_theory``. Arrays per point:
``step, loss, eval_step, eval_loss, eval_accuracy``.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from isometry import (
    activations,
    freeprob,
    jacobian,
    meanfield,
    networks,
    spectra,
    sweep,
    training,
    validate,
)
from isometry.experiments import Experiment, harness

__all__ = [
    "EXPERIMENT",
    "INITS",
    "PRESETS",
    "Config",
    "critical_setting",
    "grid",
    "jacobian_at_init",
    "parse_setting",
    "run",
    "steps_to_threshold",
]

INITS = ("orthogonal", "gaussian")


def parse_setting(text: str) -> tuple[str, float]:
    """``"tanh:1/64"`` -> ``("tanh", 0.015625)``: an activation and its fixed point ``q*``.

    ``q*`` is a number or a fraction ``a/b``; raises ``ValueError`` naming the
    setting when it is malformed, the activation unknown or ``q* <= 0``.
    """
    if not isinstance(text, str) or text.count(":") != 1:
        raise ValueError(f"a setting must be 'activation:q_star' (e.g. 'tanh:1/64'), got {text!r}")
    act, q = (t.strip() for t in text.split(":"))
    validate.choice("setting activation", act, tuple(activations.names()))
    try:
        q_star = float(Fraction(q))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"setting {text!r}: q_star must be a number or a fraction a/b") from None
    if not q_star > 0:
        raise ValueError(f"setting {text!r}: q_star must be > 0, got {q_star}")
    return act, q_star


def critical_setting(text: str) -> dict[str, float | str]:
    """``{"activation", "q_star", "sigma_w2", "sigma_b2"}`` of a setting at its critical point.

    Raises ``ValueError`` when the activation has no critical point with that ``q*``.
    """
    act, q = parse_setting(text)
    with jax.enable_x64(True):
        sw, sb = (float(v) for v in meanfield.critical_point(act, q))
    if not (np.isfinite(sw) and np.isfinite(sb)) or sb < 0:
        raise ValueError(f"setting {text!r}: {act} has no critical point with q* = {q:g}")
    return {"activation": act, "q_star": q, "sigma_w2": sw, "sigma_b2": max(sb, 0.0)}


TRAIN = training.TrainConfig(
    steps=400, batch_size=64, optimizer="sgd", learning_rate=0.01, log_every=10, eval_every=10,
    probe_every=0, probe_inputs=4, checkpoint_every=1000,
)  # fmt: skip
"""The quick preset's training: plain SGD, held-out evaluation every 10 steps; no training
probe (the Jacobian at initialization, on ``probe_inputs`` held-out inputs, is
:func:`jacobian_at_init`'s)."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Learning-speed sweep.

    Attributes:
        settings: ``"activation:q_star"`` strings (``q*`` may be a fraction ``a/b``).
        inits: subset of ``orthogonal``, ``gaussian``.
        depths: hidden-layer counts ``L``; loss curves are kept at every depth.
        width: ``N``.
        lr_reference_depth: depth at which the rate is ``train.learning_rate``.
        lr_depth_exponent: ``eta_L = train.learning_rate (L_ref / L)^exponent`` (0: constant).
        accuracy_threshold: held-out accuracy defining the learning time.
        seeds: independent runs per (setting, init, depth).
        dataset: ``digits`` (embedded) or a local-file dataset.
        train: every run's :class:`~isometry.training.TrainConfig`, its learning
            rate scaled with depth (``learning_rate``); ``train.eval_every``
            (>= 1) is the resolution of the learning time; run ``s`` uses
            ``train.seed + s`` for initialization and data order.
    """

    settings: tuple[str, ...] = ("tanh:1/64", "tanh:1/4", "tanh:1", "relu:1")
    inits: tuple[str, ...] = INITS
    depths: tuple[int, ...] = (16, 48, 128)
    width: int = 64
    lr_reference_depth: int = 64
    lr_depth_exponent: float = 1.0
    accuracy_threshold: float = 0.9
    seeds: int = 1
    dataset: str = "digits"
    train: training.TrainConfig = TRAIN

    def __post_init__(self):
        if not isinstance(self.settings, tuple) or not self.settings:
            raise ValueError(f"settings must be a non-empty tuple, got {self.settings!r}")
        for s in self.settings:
            critical_setting(s)
        validate.names("inits", self.inits, INITS)
        validate.positive_ints("depths", self.depths)
        validate.positive_int("lr_reference_depth", self.lr_reference_depth)
        validate.real_array("lr_depth_exponent", self.lr_depth_exponent)
        validate.real_array("accuracy_threshold", self.accuracy_threshold, minimum=0.0, maximum=1.0)
        harness.check_study(self)
        validate.positive_int("train.eval_every", self.train.eval_every)


PRESETS = {
    "quick": Config(),
    "full": Config(
        depths=(8, 16, 32, 64, 128, 256),
        width=400,
        seeds=3,
        train=dataclasses.replace(TRAIN, steps=3000, batch_size=128, log_every=20, eval_every=20),
    ),
}


def grid(cfg: Config) -> sweep.Grid:
    """``setting x init x depth x seed``."""
    return sweep.product(
        setting=cfg.settings, init=cfg.inits, depth=cfg.depths, seed=range(cfg.seeds)
    )


def learning_rate(cfg: Config, depth: int) -> float:
    """``eta_L = train.learning_rate (lr_reference_depth / L) ** lr_depth_exponent``."""
    return cfg.train.learning_rate * (cfg.lr_reference_depth / depth) ** cfg.lr_depth_exponent


def steps_to_threshold(steps, values, threshold: float) -> float:
    """The first of ``steps (T,)`` whose ``values (T,)`` reach ``threshold``; NaN if none does."""
    steps, values = np.asarray(steps), np.asarray(values, np.float64)
    hit = np.flatnonzero(values >= threshold)
    return float(steps[hit[0]]) if hit.size else float("nan")


def train_config(cfg: Config, depth: int, seed: int) -> training.TrainConfig:
    """The :class:`~isometry.training.TrainConfig` of one run: ``cfg.train`` at the depth's
    learning rate and seed ``train.seed + seed``."""
    return dataclasses.replace(
        cfg.train, learning_rate=learning_rate(cfg, depth), seed=cfg.train.seed + seed
    )


def jacobian_at_init(model: networks.MLP, u) -> dict[str, float]:
    """``{"jac_sv2_mean", "jac_sv2_var", "jac_sv2_max"}`` of a toolkit stack at inputs ``u (P, d)``.

    The squared singular values ``lambda`` of ``J = dx^L/dx^0`` (``x^0 =
    input_map(u_p)``) at each input, exactly: the Jacobians in one pass over
    depth (:func:`isometry.jacobian.stack_jacobians`), then the eigenvalues of
    ``J J^T`` (:func:`isometry.spectra.squared_singular_values`). The mean and
    the variance of ``lambda`` are averaged over the ``P`` inputs and the
    largest is taken over them: the fields of the training probe
    (:func:`isometry.training.monitor_probe`), whose Hutchinson traces are
    exact at these widths, without compiling its monitor.
    """
    J = jax.vmap(lambda x: jacobian.stack_jacobians(model, x))(jnp.asarray(u, jnp.float32))
    n = J.shape[-1]
    lam = np.asarray(spectra.squared_singular_values(J.reshape(-1, n, n)), np.float64)
    return {
        "jac_sv2_mean": float(lam.mean(-1).mean()),
        "jac_sv2_var": float(lam.var(-1).mean()),
        "jac_sv2_max": float(lam.max()),
    }


def run(
    cfg: Config, out, *, per_device: int = 4, optimize: bool = True, progress: bool = True
) -> Path:
    """Train one MLP per (setting, init, depth, seed) into the store ``out``; the csv path.

    Each run starts at its setting's critical point with inputs scaled to
    ``q*``; ``per_device`` and ``optimize`` are unused (independent runs).
    """
    del per_device, optimize
    store = sweep.Store(out, "learning_speed", cfg)
    ds = harness.load_data(cfg.dataset)
    crit = {s: critical_setting(s) for s in cfg.settings}

    def point(p, run_dir):
        c, depth = crit[p["setting"]], p["depth"]
        tc = train_config(cfg, depth, p["seed"])
        scale = harness.input_scale(ds, c["sigma_w2"], c["sigma_b2"], c["q_star"])
        net = networks.MLPConfig(
            depth=depth, width=cfg.width, in_dim=ds.in_dim, out_dim=ds.out_dim,
            activation=c["activation"], init=p["init"], sigma_w2=c["sigma_w2"],
            sigma_b2=c["sigma_b2"],
        )  # fmt: skip
        data = harness.scaled(ds, scale)
        model = networks.MLP(net, rngs=nnx.Rngs(tc.seed), dtype=jnp.float32)
        jac = jacobian_at_init(model, data.x_test[: tc.probe_inputs])
        res = harness.train_model(model, data, tc, run_dir, depth=depth)
        cv = res.curves
        with jax.enable_x64(True):
            var = freeprob.jacobian_moments(
                c["activation"], c["q_star"], depth, p["init"], c["sigma_w2"]
            ).variance
        row = {
            **c,
            "learning_rate": tc.learning_rate,
            "input_scale": scale,
            "steps_to_accuracy": steps_to_threshold(
                cv["eval_step"], cv["eval_accuracy"], cfg.accuracy_threshold
            ),
            **res.row,
            **jac,
            "jac_var_theory": float(var),
        }
        keep = ("step", "loss", "eval_step", "eval_loss", "eval_accuracy")
        return {"rows": row, "arrays": {k: cv[k] for k in keep}}

    return harness.run_points(store, grid(cfg), point, progress=progress, label="learning_speed")


EXPERIMENT = Experiment(
    "learning_speed",
    Config,
    PRESETS,
    run,
    "orthogonal vs Gaussian at criticality: loss curves and steps-to-accuracy vs depth",
    grid=grid,
)
