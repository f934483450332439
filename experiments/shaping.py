"""Kernel shaping (DKS, TAT) vs edge of chaos vs a batch-normalized ResNet: accuracy over depth.

Sweep: ``variant x depth x seed``, each point one training run
(:mod:`isometry.experiments.harness`) of an :class:`isometry.networks.MLP`
of ``depth`` hidden layers of width ``N`` on a classification dataset. The
variants (:data:`VARIANTS`):

* ``eoc_tanh``: vanilla tanh network (no skip connections, no normalization)
  with orthogonal weights at the edge of chaos of ``q*`` (``chi1 = 1``;
  :func:`isometry.initializers.resolve`), inputs scaled to ``q*``;
* ``dks_tanh``, ``dks_softplus``: vanilla networks with the DKS-transformed
  activation (:func:`isometry.shaping.dks`, ``zeta``), orthogonal weights,
  ``sigma_w2 = 1``, zero-initialized biases;
* ``tat_leaky_relu``: the same with TAT's leaky ReLU (:func:`isometry.shaping.tat`, ``eta``);
* ``resnet_bn``: the baseline, a residual ReLU network with batch
  normalization, ``x^l = x^{l-1} + relu(BN(W^l x^{l-1} + b^l))``, He weights;
* ``wresnet_dks_softplus``, ``wresnet_tat_leaky_relu``: a residual network
  without normalization, :class:`isometry.networks.WeightedResNet` (blocks ``w x +
  sqrt(1 - w^2) f(x)``, two nonlinear layers per branch, ``depth / 2`` blocks,
  scaled uniform orthogonal weights), its activation shaped through the
  subnetwork maximizing function the theory engine reads off the model
  (:func:`isometry.shaping.subnet_max_func`): DKS softplus, TAT leaky ReLU;
* ``wresnet_relu``: the same network with plain ReLU (unshaped);
  ``wresnet_bn``: the same with batch norm before every ReLU.

Inputs: each example is scaled to ``||u||^2 / d = 1`` (``q*`` for
``eoc_tanh``), the kernel-shaping convention (Martens et al. 2021, section
3); the width equals the input dimension, so there is no input map and the
first pre-activation has ``q = 1`` (orthogonal weights keep every length).

Claim under test (Martens et al. 2021; Zhang, Botev & Martens 2022): a deep
vanilla network with a shaped activation trains far better than one at the
edge of chaos at the same depth and budget, approaching a residual network
with batch normalization. The papers train with K-FAC (also SGD/Adam) for
many epochs on ImageNet; here Adam at one learning rate for every variant
and depth, a short budget, the embedded 8x8 digits at the ``quick`` preset
(width 64, depths 20 and 100, 200 steps) and
local CIFAR-10 files at ``full`` (``dataset=cifar10``: flattened 32x32x3
images, width 3072, depths 20-200). TAT's leaky ReLU cannot reach
``C_f(0) = 0.9`` below 11 layers (even ReLU gives less), hence depth 20 as
the shallowest quick depth.

Table columns: ``variant, depth, seed, steps_done, diverged, diverged_step,
loss, train_loss, train_accuracy, eval_loss, eval_accuracy, alpha, beta,
gamma, delta, max_residual`` (the transform's parameters and its largest
condition residual; NaN for the untransformed variants). Arrays per point:
``step``, ``loss``. Compound C-maps: :func:`theory`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from isometry import (
    activations,
    initializers,
    meanfield,
    networks,
    shaping,
    sweep,
    training,
    validate,
)
from isometry.experiments import Experiment, harness

__all__ = [
    "EXPERIMENT", "PRESETS", "VARIANTS", "WRESNETS", "Config", "grid", "network", "run", "theory",
    "wresnet", "wresnet_activation",
]  # fmt: skip

VARIANTS = (
    "eoc_tanh", "dks_tanh", "dks_softplus", "tat_leaky_relu", "resnet_bn",
    "wresnet_dks_softplus", "wresnet_tat_leaky_relu", "wresnet_relu", "wresnet_bn",
)  # fmt: skip
"""Network variants: vanilla at the edge of chaos, DKS and TAT; the residual batch-norm
baseline; weighted residual networks shaped through their own structure, unshaped, and
with batch norm."""

WRESNETS = ("wresnet_dks_softplus", "wresnet_tat_leaky_relu", "wresnet_relu", "wresnet_bn")

TRAIN = training.TrainConfig(
    steps=200, batch_size=64, optimizer="adam", learning_rate=1e-3, log_every=50,
    eval_every=0, probe_every=0, checkpoint_every=1000,
)  # fmt: skip
"""The quick preset's training: Adam at one rate for every variant and depth."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Kernel-shaping sweep.

    Attributes:
        variants: entries of :data:`VARIANTS`.
        depths: hidden-layer counts ``L``.
        width: ``N`` (the input dimension: 64 for the digits, 3072 for CIFAR-10).
        seeds: independent runs per ``(variant, depth)``.
        zeta: DKS's compound slope ``C_f'(1)``.
        eta: TAT's ``C_f(0)`` for leaky ReLU.
        q_star: the edge-of-chaos network's fixed point.
        shortcut_weight: ``w`` of the weighted residual networks.
        residual_eta: TAT's largest ``C_f(0)`` over the weighted residual network's
            subnetworks (its shortcuts keep it more linear than a chain: with ``w = 0.8``
            ten blocks of ReLU reach only 0.80, so the chains' 0.9 is out of reach;
            0.75 is dks's value for its ResNet).
        dataset: ``digits`` (embedded) or a local-file dataset.
        train: every run's :class:`~isometry.training.TrainConfig` (run ``s``
            uses ``train.seed + s``).
    """

    variants: tuple[str, ...] = VARIANTS
    depths: tuple[int, ...] = (20, 100)
    width: int = 64
    seeds: int = 1
    zeta: float = 1.5
    eta: float = 0.9
    q_star: float = 1.0
    shortcut_weight: float = 0.8
    residual_eta: float = 0.75
    dataset: str = "digits"
    train: training.TrainConfig = TRAIN

    def __post_init__(self):
        validate.names("variants", self.variants, VARIANTS)
        validate.positive_ints("depths", self.depths)
        validate.real_array("zeta", self.zeta, minimum=1.0, strict=True)
        validate.real_array("eta", self.eta, minimum=0.0, maximum=1.0)
        validate.real_array("q_star", self.q_star, minimum=0.0, strict=True)
        validate.real_array("shortcut_weight", self.shortcut_weight, minimum=0.0, maximum=1.0)
        validate.real_array("residual_eta", self.residual_eta, minimum=0.0, maximum=1.0)
        harness.check_study(self)


PRESETS = {
    "quick": Config(),
    "full": Config(
        depths=(20, 50, 100, 150, 200),
        width=3072,
        seeds=2,
        dataset="cifar10",
        train=dataclasses.replace(TRAIN, steps=5000, batch_size=128, log_every=100),
    ),
}


def grid(cfg: Config) -> sweep.Grid:
    """``depth x variant x seed``."""
    return sweep.product(depth=cfg.depths, variant=cfg.variants, seed=range(cfg.seeds))


def activation(cfg: Config, variant: str, depth: int) -> activations.Activation:
    """The variant's activation for ``depth`` layers (shaped: :mod:`isometry.shaping`)."""
    if variant == "dks_tanh":
        return shaping.dks("tanh", depth, cfg.zeta)
    if variant == "dks_softplus":
        return shaping.dks("softplus", depth, cfg.zeta)
    if variant == "tat_leaky_relu":
        return shaping.tat("leaky_relu", depth, cfg.eta)
    return activations.get("relu" if variant == "resnet_bn" else "tanh")


def network(cfg: Config, variant: str, depth: int, in_dim: int, out_dim: int):
    """``(MLPConfig, m)``: the variant's network and the inputs' mean square ``m``
    (``||u||^2 / d``) that puts its first pre-activation at its fixed point."""
    act = activation(cfg, variant, depth)
    common = {"depth": depth, "width": cfg.width, "in_dim": in_dim, "out_dim": out_dim}
    if variant == "resnet_bn":
        net = networks.MLPConfig(
            **common, activation=act, init="he_normal", norm="batch", residual=True
        )
        return net, 1.0
    if variant == "eoc_tanh":
        v = initializers.resolve(act, "orthogonal", q_star=cfg.q_star)
        net = networks.MLPConfig(
            **common, activation=act, init="orthogonal", sigma_w2=float(v.sigma_w2),
            sigma_b2=float(v.sigma_b2),
        )  # fmt: skip
        return net, (cfg.q_star - float(v.sigma_b2)) / float(v.sigma_w2)
    net = networks.MLPConfig(
        **common, activation=act, init="orthogonal", sigma_w2=1.0, sigma_b2=0.0
    )
    return net, 1.0


def wresnet(cfg: Config, variant: str, depth: int, in_dim: int, out_dim: int, seed: int):
    """``(model, activation)``: the weighted residual network of ``variant`` (``depth / 2``
    blocks of two nonlinear layers), its activation shaped through the model's own
    subnetwork maximizing function (:func:`wresnet_activation`)."""
    act = wresnet_activation(cfg, variant, depth, in_dim)
    norm = "batch" if variant == "wresnet_bn" else "none"
    return _wresnet_model(cfg, depth, act, in_dim, out_dim, seed, norm), act


def _wresnet_model(cfg: Config, depth, act, in_dim, out_dim, seed, norm="none"):
    return networks.WeightedResNet(
        in_dim, cfg.width, max(1, depth // 2), act, out_dim,
        shortcut_weight=cfg.shortcut_weight, norm=norm, rngs=nnx.Rngs(seed),
    )  # fmt: skip


@functools.lru_cache(maxsize=64)
def wresnet_activation(cfg: Config, variant: str, depth: int, in_dim: int):
    """The activation of a weighted residual variant: ReLU (unshaped, batch norm), or DKS
    softplus / TAT leaky ReLU solved through :func:`isometry.shaping.subnet_max_func` of
    the network (read off a copy with ReLU: the structure does not depend on it)."""
    if variant in ("wresnet_relu", "wresnet_bn"):
        return activations.get("relu")
    model = _wresnet_model(cfg, depth, "relu", in_dim, 10, 0)
    m = shaping.subnet_max_func(model, np.ones((1, in_dim), np.float32))
    if variant == "wresnet_dks_softplus":
        return shaping.dks("softplus", zeta=cfg.zeta, subnet_max_func=m)
    return shaping.tat("leaky_relu", eta=cfg.residual_eta, subnet_max_func=m)


def on_sphere(x: np.ndarray, m: float) -> np.ndarray:
    """Each row of ``x (n, d)`` scaled to mean square ``m`` (``||u||^2 = d m``)."""
    x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    norm = np.sqrt(np.mean(x * x, axis=1, keepdims=True))
    return (x * math.sqrt(m) / np.maximum(norm, 1e-12)).astype(np.float32)


def _transform_row(act) -> dict:
    t = getattr(act, "transform", None)
    keys = ("alpha", "beta", "gamma", "delta")
    if t is None:
        return {**dict.fromkeys(keys, math.nan), "max_residual": math.nan}
    return {**{k: getattr(t, k) for k in keys}, "max_residual": t.max_residual}


def run(
    cfg: Config, out, *, per_device: int = 4, optimize: bool = True, progress: bool = True
) -> Path:
    """Train one MLP per (depth, variant, seed) into the store ``out``; the csv path."""
    del per_device, optimize
    store = sweep.Store(out, "shaping", cfg)
    ds = harness.load_data(cfg.dataset)
    if ds.in_dim != cfg.width:
        raise ValueError(f"width must equal the input dimension {ds.in_dim} (no input map)")

    def point(p, run_dir):
        tc = dataclasses.replace(cfg.train, seed=cfg.train.seed + p["seed"])
        if p["variant"] in WRESNETS:
            model, act = wresnet(cfg, p["variant"], p["depth"], ds.in_dim, ds.out_dim, tc.seed)
            data = dataclasses.replace(
                ds, x_train=on_sphere(ds.x_train, 1.0), x_test=on_sphere(ds.x_test, 1.0)
            )
            res = harness.train_model(model, data, tc, run_dir, depth=0)  # no stack
            return {"rows": {**res.row, **_transform_row(act)},
                    "arrays": {k: res.curves[k] for k in ("step", "loss")}}  # fmt: skip
        net, m = network(cfg, p["variant"], p["depth"], None, ds.out_dim)
        data = dataclasses.replace(
            ds, x_train=on_sphere(ds.x_train, m), x_test=on_sphere(ds.x_test, m)
        )
        res = harness.train_mlp(net, data, tc, run_dir, seed=tc.seed)
        row = {**res.row, **_transform_row(net.act)}
        return {"rows": row, "arrays": {k: res.curves[k] for k in ("step", "loss")}}

    return harness.run_points(store, grid(cfg), point, progress=progress, label="shaping")


def theory(cfg: Config, depth: int, c=None) -> dict[str, np.ndarray]:
    """Compound C-maps ``C_f(c)`` of the vanilla variants at ``depth`` layers, ``c (K,)``
    (default 21 points in ``[-1, 1]``): ``{"c": c, variant: C_f(c)}``.

    :func:`isometry.meanfield.iterate_c_map` ``depth`` times: shaped variants at
    ``q = 1``, ``sigma_w2 = 1``, no bias (their ``Q(1) = 1``; in float64 this is
    :func:`isometry.shaping.compound_c_map`), edge of chaos at ``q*`` and its
    critical variances. Computed in float32 with the fast quadrature (error about
    2e-6 per layer, 2e-4 at ``c = 1`` after 100 layers: ample for curves; float64
    takes minutes at depth 100). The shaped weighted residual networks: the
    structure :func:`isometry.shaping.subnet_max_func` read off the model, composed
    with the activation's local C-map, in float32 with the fast quadrature as well
    (within 1e-4 of the float64 local map, :func:`isometry.shaping.compound_c_map`
    of depth 1, at 100 layers, in a seventh of the time; in float64 the composition
    equals the theory engine's kernel of the model to 1e-8,
    ``tests/test_shaping_architectures.py``). The batch-norm and unshaped ReLU
    networks have no C-map of this form (not included).
    """
    c = np.linspace(-1.0, 1.0, 21) if c is None else np.asarray(c, np.float64)
    out = {"c": c}
    for variant in cfg.variants:
        if variant in ("resnet_bn", "wresnet_relu", "wresnet_bn"):
            continue
        if variant in WRESNETS:  # the model's structure composed with the local C-map
            act = wresnet_activation(cfg, variant, depth, cfg.width)
            local = functools.partial(_compound_c_map_f32, act, q=1.0, sw=1.0, sb=0.0, depth=1)
            out[variant] = np.asarray(act.transform.subnet_max_func.network(c, local))
            continue
        act = activation(cfg, variant, depth)
        q, sw, sb = 1.0, 1.0, 0.0
        if variant == "eoc_tanh":
            v = initializers.resolve(act, "orthogonal", q_star=cfg.q_star)
            q, sw, sb = cfg.q_star, float(v.sigma_w2), float(v.sigma_b2)
        out[variant] = _compound_c_map_f32(act, c, q=q, sw=sw, sb=sb, depth=depth)
    return out


def _compound_c_map_f32(act, c, *, q, sw, sb, depth) -> np.ndarray:
    """``C^depth(c)`` of ``act`` at length ``q`` and variances ``sw, sb``, in float32 (the
    fast quadrature), returned in float64."""
    with jax.enable_x64(False):
        cf = meanfield.iterate_c_map(act, np.float32(c), q, sw, sb, depth)[-1]
    return np.asarray(cf, np.float64)


EXPERIMENT = Experiment(
    "shaping",
    Config,
    PRESETS,
    run,
    "held-out accuracy vs depth: DKS/TAT vanilla nets vs edge of chaos vs ResNet+BN",
    grid=grid,
)
