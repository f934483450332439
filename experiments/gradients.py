"""Per-layer gradient norms at initialization: the seed techniques side by side.

Sweep: activation (sigmoid / tanh / relu) x initializer (xavier / he /
orthogonal) x technique (plain, batch norm, layer norm, residual) x seed.
Each network is an :class:`isometry.networks.MLP` of ``depth`` hidden layers
of width ``N``; a batch of Gaussian inputs goes forward and the gradient of a
random projection of the output, ``Loss = sum_a <v_a, y_a> / B``, comes back
(:func:`isometry.signal.measure`). Per layer ``l``:

    grad_preact_sq^l = ||dLoss/dh^l||_F^2,   grad_weight_sq^l = ||dLoss/dW^l||_F^2,
    q^l = mean (h^l)^2.

Vanishing gradients show as ``grad_weight_sq`` falling toward the input
(``l = 1``), exploding gradients as it growing (Glorot & Bengio 2010; He et
al. 2015; Saxe et al. 2014; Ioffe & Szegedy 2015; Ba et al. 2016; He et al.
2016). ``orthogonal`` uses ``sigma_w2 = orthogonal_sigma_w2`` (1 by default;
2 is the ReLU analogue of He). Initializers are sampled from their ensemble
(Gaussian or Haar orthogonal) at their effective ``sigma_w2`` for ``N x N``
layers (Xavier 1, He 2), so the initializer is a number inside one compiled
function.

Vectorized: initializers and seeds vary inside one compiled function per
(activation, technique); the points are sharded over all devices. Each
point's kernels, inputs and loss projection are drawn first, by programs
compiled once for the whole sweep (:func:`sampled_inputs`), so the
per-network programs hold no random number generation.

Table columns: ``activation, init, technique, seed, layer, grad_preact_sq,
grad_weight_sq, q``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from isometry import activations, initializers, networks, signal, sweep, validate
from isometry.experiments import Experiment

__all__ = [
    "EXPERIMENT",
    "PRESETS",
    "TECHNIQUES",
    "Config",
    "measure_function",
    "measure_sampled",
    "point_inputs",
    "point_kernels",
    "run",
    "sampled_inputs",
]

INITS = (
    "gaussian", "orthogonal", "xavier", "xavier_normal", "glorot", "glorot_normal",
    "he", "he_normal", "kaiming", "kaiming_normal", "lecun", "lecun_normal",
)  # fmt: skip
TECHNIQUES = ("plain", "batch_norm", "layer_norm", "residual")
ACTIVATIONS = tuple(activations.names())
_NETWORK = {
    "plain": {},
    "batch_norm": {"norm": "batch"},
    "layer_norm": {"norm": "layer"},
    "residual": {"residual": True},
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Gradient-norm sweep.

    Attributes:
        activations: activation names.
        inits: initializer names (:mod:`isometry.initializers`).
        techniques: subset of ``plain``, ``batch_norm``, ``layer_norm``, ``residual``.
        depth: hidden layers ``L``.
        width: ``N``.
        batch: inputs per measurement (batch statistics for batch norm).
        seeds: independent networks per combination.
        orthogonal_sigma_w2: ``sigma_w2`` of the ``orthogonal`` (and ``gaussian``) init.
        residual_scale: branch scale ``alpha`` of residual networks.
        seed: base seed.
    """

    activations: tuple[str, ...] = ("sigmoid", "tanh", "relu")
    inits: tuple[str, ...] = ("xavier", "he", "orthogonal")
    techniques: tuple[str, ...] = TECHNIQUES
    depth: int = 16
    width: int = 64
    batch: int = 16
    seeds: int = 2
    orthogonal_sigma_w2: float = 1.0
    residual_scale: float = 1.0
    seed: int = 0

    def __post_init__(self):
        validate.names("activations", self.activations, ACTIVATIONS)
        validate.names("inits", self.inits, INITS)
        validate.names("techniques", self.techniques, TECHNIQUES)
        validate.int_fields(self, "depth", "width", "seeds")
        validate.positive_int("batch", self.batch, 2)
        validate.real_array("orthogonal_sigma_w2", self.orthogonal_sigma_w2, minimum=0, strict=True)
        validate.real_array("residual_scale", self.residual_scale, minimum=0, strict=True)
        validate.positive_int("seed", self.seed, 0)


PRESETS = {
    "quick": Config(),
    "full": Config(depth=50, width=256, batch=64, seeds=8),
}


def grid(cfg: Config) -> sweep.Grid:
    """``activation x init x technique x seed``."""
    return sweep.product(
        activation=cfg.activations, init=cfg.inits, technique=cfg.techniques,
        seed=range(cfg.seeds),
    )  # fmt: skip


def network_config(cfg: Config, activation: str, technique: str) -> networks.MLPConfig:
    """The :class:`~isometry.networks.MLPConfig` of one (activation, technique).

    Built with Gaussian ``sigma_w2 = 1`` weights; :func:`measure_function`
    replaces the kernels by the point's initializer.
    """
    kw = dict(_NETWORK[technique])
    if technique == "residual":
        kw["residual_scale"] = cfg.residual_scale
    return networks.MLPConfig(
        depth=cfg.depth, width=cfg.width, activation=activation, init="gaussian", **kw
    )


def init_numbers(cfg: Config, init: str) -> dict[str, float]:
    """``{"sigma_w2", "orthogonal"}`` of an initializer for square ``N x N`` layers.

    ``sigma_w2`` from :func:`isometry.initializers.resolve`: ``orthogonal_sigma_w2``
    for ``gaussian``/``orthogonal``, the fans' for the fan-based schemes.
    """
    ini = initializers.get(init)
    sw = None if ini.sigma_w2_param is None else cfg.orthogonal_sigma_w2
    v = initializers.resolve(None, ini, sigma_w2=sw, fan_in=cfg.width, fan_out=cfg.width)
    return {"sigma_w2": v.sigma_w2, "orthogonal": float(ini.ensemble == "orthogonal")}


def point_kernels(width: int, depth: int, seed: int):
    """``k(sigma_w2, orthogonal, index) -> (L, N, N)``: the hidden kernels of point ``index``.

    ``sqrt(sigma_w2)`` times a Haar-orthogonal matrix (``orthogonal = 1``) or
    times ``N(0, 1/N)`` entries (``orthogonal = 0``), layer ``l`` from
    ``fold_in(k_w, l)`` with ``k_w, k_in, k_loss = split(point_key(seed, index), 3)``.
    """
    N, L = width, depth
    dtype = jnp.result_type(float)

    def k(sigma_w2, orthogonal, index):
        k_w = jax.random.split(sweep.point_key(seed, index), 3)[0]

        def kernel(l):
            kg, ko = jax.random.split(jax.random.fold_in(k_w, l))
            g = initializers.sample_gaussian(kg, (N, N), sigma_w2, dtype)
            # A conditional: a Gaussian point skips the QR of the orthogonal draw.
            return lax.cond(
                orthogonal > 0.5,
                lambda: initializers.sample_orthogonal(ko, (N, N), sigma_w2, dtype),
                lambda: g,
            )

        return jax.vmap(kernel)(jnp.arange(L))

    return k


def point_inputs(batch: int, width: int, seed: int):
    """``i(index) -> (u, v)``: the inputs ``u ~ N(0, 1)`` of point ``index`` and the
    projection ``v ~ N(0, 1)`` of its loss ``sum_a <v_a, y_a> / B``, ``(B, N)`` each
    (from ``k_in`` and ``k_loss`` of :func:`point_kernels`)."""

    def i(index):
        _, k_in, k_loss = jax.random.split(sweep.point_key(seed, index), 3)
        u = jax.random.normal(k_in, (batch, width))
        # signal.random_projection_loss(k_loss, y.shape, y.dtype); y = x^L is (B, N) here.
        return u, jax.random.normal(k_loss, (batch, width), u.dtype)

    return i


def measure_sampled(net: networks.MLPConfig):
    """``m(kernel, u, v) -> {grad_preact_sq, grad_weight_sq, q}``, each ``(L,)``.

    The network of ``net`` with the hidden kernels ``kernel (L, N, N)`` and
    everything else (zero biases, unit norm gains) as
    :class:`~isometry.networks.MLP` initializes it, measured on the inputs
    ``u (B, N)`` with the loss ``sum_a <v_a, y_a> / B``
    (:func:`isometry.signal.measure`). No randomness: a sweep compiles this
    once per network and the sampling (:func:`point_kernels`,
    :func:`point_inputs`) once for all.
    """
    # Built once: apart from the kernels its parameters (zero biases, unit
    # norm gains) do not depend on the seed.
    base = networks.MLP(net, rngs=nnx.Rngs(params=0)).stack()

    def m(kernel, u, v):
        params = dict(base.params)
        params["kernel"] = kernel.astype(params["kernel"].dtype)
        stack = dataclasses.replace(base, params=params)
        fwd, bwd = signal.measure(stack, u, lambda y: jnp.sum(v * y) / u.shape[0])
        return {
            "grad_preact_sq": bwd.grad_preact_sq,
            "grad_weight_sq": bwd.grad_weight_sq,
            "q": fwd.q,
        }

    return m


def measure_function(net: networks.MLPConfig, batch: int, seed: int):
    """``f(sigma_w2, orthogonal, index) -> {grad_preact_sq, grad_weight_sq, q}``, each ``(L,)``:
    :func:`measure_sampled` of the point's :func:`point_kernels` and :func:`point_inputs`
    (the same numbers as :func:`run` stores)."""
    kernels = point_kernels(net.width, net.depth, seed)
    inputs = point_inputs(batch, net.width, seed)
    m = measure_sampled(net)

    def f(sigma_w2, orthogonal, index):
        return m(kernels(sigma_w2, orthogonal, index), *inputs(index))

    return f


def sampled_inputs(width: int, depth: int, seed: int, *, optimize: bool = True):
    """``s(sigma_w2, orthogonal, index, batch) -> {kernel, u, v}`` (numpy) of one point.

    :func:`point_kernels` and :func:`point_inputs`, each compiled once (the
    kernels for every batch size) and called point by point, so a sweep's
    measurement programs (:func:`measure_sampled`, one per network) hold no
    random number generation: its threefry hashes were most of their compile
    time. ``optimize=False`` compiles with XLA's backend optimization level 0
    (as :func:`isometry.sweep.map_sharded`). A group's draws are held in host
    memory while it runs (the full preset: 24 points of 13 MB).
    """
    opts = sweep.compiler_options(optimize)
    kernels = jax.jit(point_kernels(width, depth, seed), compiler_options=opts)
    inputs = {}

    def s(sigma_w2, orthogonal, index, batch):
        if batch not in inputs:
            inputs[batch] = jax.jit(point_inputs(batch, width, seed), compiler_options=opts)
        u, v = inputs[batch](index)
        return {"kernel": np.asarray(kernels(sigma_w2, orthogonal, index)),
                "u": np.asarray(u), "v": np.asarray(v)}  # fmt: skip

    return s


def layer_rows(out, key: str = "layer") -> list[dict]:
    """One row per layer ``l = 1..L`` of the per-layer arrays in ``out`` (``key``: ``l``)."""
    n = len(next(iter(out.values())))
    return [{key: l + 1, **{k: float(v[l]) for k, v in out.items()}} for l in range(n)]


def run(
    cfg: Config, out, *, per_device: int = 4, optimize: bool = True, progress: bool = True
) -> Path:
    """Run the sweep into the store ``out``; returns the aggregate csv path."""
    g = grid(cfg)
    store = sweep.Store(out, "gradients", cfg)
    index = {sweep.point_id(p): i for i, p in enumerate(g.points())}
    sample = sampled_inputs(cfg.width, cfg.depth, cfg.seed, optimize=optimize)
    return sweep.run_vectorized(
        store,
        g,
        lambda s: measure_sampled(network_config(cfg, s["activation"], s["technique"])),
        lambda p, o: layer_rows(o),
        static=("activation", "technique"),
        inputs=lambda p: sample(
            **init_numbers(cfg, p["init"]), index=index[sweep.point_id(p)], batch=cfg.batch
        ),
        per_device=per_device,
        optimize=optimize,
        progress=progress,
        label="gradients",
    )


EXPERIMENT = Experiment(
    "gradients",
    Config,
    PRESETS,
    run,
    "per-layer gradient norms: activations x inits x techniques",
    grid=grid,
)
