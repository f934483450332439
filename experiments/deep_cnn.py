"""Deep vanilla CNNs at initialization: delta-orthogonal vs Gaussian kernels, vs depth.

Sweep: initializer (``delta_orthogonal`` / ``gaussian``) x seed, every depth
of ``depths`` in one pass. Each network is a stack of ``depth``
stride-1 convolutions ``C -> C`` with circular padding
(:class:`isometry.networks.ConvNet`), ``x^l = phi(conv(x^{l-1}, K^l) + b^l)``,
at the critical point of ``q*`` (``sigma_w2 = fan_in Var(K)``):

    delta-orthogonal:  K^l[centre] = sqrt(sigma_w2) Q^l (Haar orthogonal C x C), 0 elsewhere
    Gaussian:          K^l ~ N(0, sigma_w2 / (C k^d))

(centre ``(k - 1) // 2`` along each axis, :func:`isometry.initializers.sample_delta_orthogonal`).
The input (``spatial^d x C``) lies on the sphere of mean square
``(q* - sigma_b2) / sigma_w2`` (:func:`isometry.jacobian.sphere_inputs`), so the
first pre-activation, like every later one, has mean square ``q*``: both
kernels give ``E ||h^1||^2 / n = sigma_w2 mean((x^0)^2) + sigma_b2`` with circular
padding (before this was fixed the input had mean square ``q*``, ``h^1`` sat at
``sigma_w2 q* + sigma_b2`` (0.36 for tanh at ``q* = 1/4``), and the first
layers' factors ``sigma_w2 mu1(q^l) < 1`` pulled the mean of ``s^2`` to ~0.85). The
squared singular values of the input-output Jacobian ``J_d`` (a
``n x n`` matrix, ``n = C size^d``) are summarized per depth: the
delta-orthogonal network keeps them concentrated near 1 at any depth
(dynamical isometry), the Gaussian one spreads them out as depth grows
(Xiao et al. 2018, Figure 1's mechanism; the test-accuracy-vs-depth study
needs training and is a separate experiment).

Vectorized: the initializer and the seed vary inside one compiled function.

Table columns: ``init, seed, depth, mean, var, max, min``.

Reference: Xiao, Bahri, Sohl-Dickstein, Schoenholz & Pennington 2018,
"Dynamical isometry and a mean field theory of CNNs: how to train
10,000-layer vanilla convolutional neural networks" (ICML).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from isometry import activations, initializers, jacobian, networks, spectra, sweep, validate
from isometry.experiments import Experiment

__all__ = ["EXPERIMENT", "INITS", "PRESETS", "Config", "run"]

INITS = ("delta_orthogonal", "gaussian")
ACTIVATIONS = tuple(activations.names())


@dataclasses.dataclass(frozen=True)
class Config:
    """Deep-CNN Jacobian sweep.

    Attributes:
        inits: subset of ``delta_orthogonal``, ``gaussian``.
        activation: activation name.
        q_star: fixed point whose critical ``(sigma_w2, sigma_b2)`` is used.
        depths: depths at which the spectrum is taken.
        channels: ``C``.
        size: spatial extent along each axis.
        spatial_dims: 1 or 2.
        kernel_size: ``k``.
        seeds: independent networks per initializer.
        seed: base seed.
    """

    inits: tuple[str, ...] = INITS
    activation: str = "tanh"
    q_star: float = 0.25
    depths: tuple[int, ...] = (4, 16, 64)
    channels: int = 8
    size: int = 4
    spatial_dims: int = 2
    kernel_size: int = 3
    seeds: int = 2
    seed: int = 0

    def __post_init__(self):
        validate.names("inits", self.inits, INITS)
        validate.choice("activation", self.activation, ACTIVATIONS)
        validate.real_array("q_star", self.q_star, minimum=0.0, strict=True)
        validate.positive_ints("depths", self.depths)
        validate.int_fields(self, "channels", "size", "kernel_size", "seeds")
        validate.choice("spatial_dims", self.spatial_dims, (1, 2))
        validate.positive_int("seed", self.seed, 0)


PRESETS = {
    "quick": Config(),
    "full": Config(depths=(8, 32, 128, 512), channels=16, size=8, seeds=8),
}


def grid(cfg: Config) -> sweep.Grid:
    """``init x seed``."""
    return sweep.product(init=cfg.inits, seed=range(cfg.seeds))


def point_function(cfg: Config):
    """``f(orthogonal, index) -> (K, n)`` squared singular values of ``J_d`` at each depth."""
    v = initializers.resolve(cfg.activation, "delta_orthogonal", q_star=cfg.q_star)
    sw, sb = v.sigma_w2, v.sigma_b2
    net = networks.ConvConfig(
        depth=max(cfg.depths), channels=cfg.channels, kernel_size=cfg.kernel_size,
        spatial_dims=cfg.spatial_dims, activation=cfg.activation, init="gaussian",
        sigma_w2=sw, sigma_b2=sb,
    )  # fmt: skip
    # The layer function of an abstract model (no weights drawn; they are drawn below).
    step = nnx.eval_shape(lambda: networks.ConvNet(net, rngs=nnx.Rngs(0))).layer_step()

    def layer(params_l, x):
        return step(params_l, x, None)[0]

    kshape = net.kernel_shape
    C = cfg.channels
    shape = (cfg.size,) * cfg.spatial_dims + (C,)
    n = int(np.prod(shape))
    depths = sorted(set(cfg.depths))
    dtype = jnp.result_type(float)

    def kernel(key, orthogonal):
        kg, ko, kb = jax.random.split(key, 3)
        g = initializers.sample_gaussian(kg, kshape, sw, dtype)
        delta = initializers.sample_delta_orthogonal(ko, kshape, sw, dtype)
        b = initializers.sample_bias(kb, (C,), sb, dtype)
        return {"kernel": jnp.where(orthogonal > 0.5, delta, g), "bias": b}

    def f(orthogonal, index):
        k_w, k_x = jax.random.split(sweep.point_key(cfg.seed, index))
        keys = jacobian.random_params(k_w, max(depths))
        params = jax.vmap(lambda kl: kernel(kl, orthogonal))(keys)
        # Mean square (q* - sigma_b2) / sigma_w2: h^1, like every later layer, sits at q*.
        x0 = jacobian.sphere_inputs(k_x, shape, cfg.q_star, sw, sb)
        return jacobian.stack_jacobians(
            layer, params, x0, depths,
            reduce=lambda J: spectra.squared_singular_values(J.reshape(n, n), check_finite=False),
        )  # fmt: skip

    return f


def run(
    cfg: Config, out, *, per_device: int = 4, optimize: bool = True, progress: bool = True
) -> Path:
    """Run the sweep into the store ``out``; returns the aggregate csv path."""
    g = grid(cfg)
    store = sweep.Store(out, "deep_cnn", cfg)
    index = {sweep.point_id(p): i for i, p in enumerate(g.points())}
    depths = sorted(set(cfg.depths))
    return sweep.run_vectorized(
        store,
        g,
        lambda s: point_function(cfg),
        lambda p, lam: spectra.summary_rows(depths, lam),
        inputs=lambda p: {
            "orthogonal": float(p["init"] == "delta_orthogonal"),
            "index": index[sweep.point_id(p)],
        },
        arrays=lambda p, lam: {"depths": np.asarray(depths), "sq_singular_values": lam},
        per_device=per_device,
        optimize=optimize,
        progress=progress,
        label="deep_cnn",
    )


EXPERIMENT = Experiment(
    "deep_cnn",
    Config,
    PRESETS,
    run,
    "delta-orthogonal vs Gaussian CNNs: Jacobian spectra vs depth",
    grid=grid,
)
