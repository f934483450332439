"""Signal propagation through deep transformers at initialization: rank collapse, gradients, depth.

Sweep: layer-norm placement (``none`` / ``pre`` / ``post``) x residual branch
scale ``alpha`` (``1``, ``1/sqrt(L)``, ``0`` = no residual path) x seed. Each
network is an :class:`isometry.networks.Transformer` of ``depth`` blocks of
width ``N`` (ReLU MLP with He ``W_1``; ``W_V, W_O, W_2`` of variance ``1/N``;
``W_Q, W_K`` of variance ``qk_sigma_w2 / N``). Its stack input is ``S``
sequences of ``T`` synthetic tokens of unit mean square, pair cosine
``cosine`` within a sequence and ``cross_cosine`` across sequences::

    x_{s,t} = sqrt(c_x) u + sqrt(c - c_x) v_s + sqrt(1 - c) w_{s,t},   u, v, w ~ N(0, I_N).

Per block ``l`` (one forward/backward pass; a random projection
``Loss = sum_{s,t} <r_{s,t}, x^L_{s,t}>``, ``r ~ N(0, I)``)::

    norm, cosine, cross_cosine   token Gram statistics of x^l (transformer_theory.gram_statistics)
    update       = ||x^l - x^{l-1}||^2 / ||x^{l-1}||^2
    jacobian_sq  = tr(J_l^T J_l) / (S T N),  J_l = dx^l/dx^0, from k random tangents pushed
                   through all blocks in one pass (jacobian.stack_jacobians)
    grad_state   = ||dLoss/dx^{l-1}||^2 / ||dLoss/dx^L||^2
    grad_<w>     = ||dLoss/dW_w^l||^2 / (N ||dLoss/dx^L||^2),
                   w in query, key, value, out, mlp_in, mlp_out

the quantities :func:`isometry.transformer_theory.profile` predicts.

Table columns: ``norm_position, alpha, seed, block`` and the statistics above.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from isometry import jacobian, networks, sweep, validate
from isometry import transformer_theory as tt
from isometry.experiments import Experiment, gradients

__all__ = [
    "ALPHAS",
    "EXPERIMENT",
    "PRESETS",
    "WEIGHTS",
    "Config",
    "grid",
    "input_gram",
    "measure_blocks",
    "measure_function",
    "measure_sampled",
    "network_config",
    "point_samples",
    "probes",
    "run",
    "token_inputs",
]

ALPHAS = ("1", "1/sqrt(L)", "0")
WEIGHTS = ("query", "key", "value", "out", "mlp_in", "mlp_out")


@dataclasses.dataclass(frozen=True)
class Config:
    """Transformer signal-propagation sweep.

    Attributes:
        norm_positions: subset of ``none``, ``pre``, ``post``.
        alphas: subset of ``"1"``, ``"1/sqrt(L)"``, ``"0"`` (no residual path).
        depth: blocks ``L``.
        width: ``N``.
        heads: attention heads.
        seq_len: tokens per sequence ``T`` (>= 2).
        sequences: sequences ``S`` (>= 2 for the cross-sequence cosine).
        cosine, cross_cosine: the input tokens' cosines (``0 <= cross <= cosine < 1``).
        qk_sigma_w2: ``N Var(W_Q)``; small means near-uniform attention (the theory's regime).
        causal: causal attention.
        tangents: random tangents of the Jacobian estimate (0: no Jacobian, NaN).
        seeds: networks per variant.
        seed: base seed.
    """

    norm_positions: tuple[str, ...] = ("none", "pre", "post")
    alphas: tuple[str, ...] = ALPHAS
    depth: int = 64
    width: int = 128
    heads: int = 4
    seq_len: int = 8
    sequences: int = 2
    cosine: float = 0.3
    cross_cosine: float = 0.1
    qk_sigma_w2: float = 0.1
    causal: bool = True
    tangents: int = 2
    seeds: int = 2
    seed: int = 0

    def __post_init__(self):
        validate.names("norm_positions", self.norm_positions, networks.TRANSFORMER_NORMS)
        validate.names("alphas", self.alphas, ALPHAS)
        validate.int_fields(self, "depth", "width", "heads", "seeds")
        validate.positive_int("tangents", self.tangents, 0)
        validate.positive_int("seq_len", self.seq_len, 2)
        validate.positive_int("sequences", self.sequences, 2)
        validate.real_array("cosine", self.cosine, minimum=0.0, maximum=0.999)
        validate.real_array("cross_cosine", self.cross_cosine, minimum=0.0, maximum=self.cosine)
        validate.real_array("qk_sigma_w2", self.qk_sigma_w2, minimum=0.0)
        validate.positive_int("seed", self.seed, 0)
        network_config(self, self.norm_positions[0], self.alphas[0])  # heads | width


def grid(cfg: Config) -> sweep.Grid:
    """``norm_position x alpha x seed``."""
    return sweep.product(norm_position=cfg.norm_positions, alpha=cfg.alphas, seed=range(cfg.seeds))


def network_config(cfg: Config, norm_position: str, alpha: str) -> networks.TransformerConfig:
    """The :class:`~isometry.networks.TransformerConfig` of one variant (no embedding/readout)."""
    residual = alpha != "0"
    scale = alpha if alpha == "1/sqrt(L)" else 1.0
    return networks.TransformerConfig(
        depth=cfg.depth, width=cfg.width, heads=cfg.heads, norm_position=norm_position,
        residual=residual, residual_scale=scale, causal=cfg.causal, qk_sigma_w2=cfg.qk_sigma_w2,
        activation="relu", init="he_normal",
    )  # fmt: skip


PRESETS = {
    "quick": Config(),
    "full": Config(depth=256, width=256, seeds=8, tangents=8),
}


def token_inputs(key, sequences: int, seq_len: int, width: int, cosine, cross_cosine, dtype=None):
    """``(S, T, N)`` tokens of unit mean square with the given cosines (module docstring)."""
    dtype = jnp.result_type(float) if dtype is None else dtype
    ku, kv, kw = jax.random.split(key, 3)
    u = jax.random.normal(ku, (1, 1, width), dtype)
    v = jax.random.normal(kv, (sequences, 1, width), dtype)
    w = jax.random.normal(kw, (sequences, seq_len, width), dtype)
    return (
        math.sqrt(cross_cosine) * u
        + math.sqrt(cosine - cross_cosine) * v
        + math.sqrt(1.0 - cosine) * w
    )


def input_gram(cfg: Config):
    """The expected Gram ``(S T, S T)`` of :func:`token_inputs` (the theory's ``G0``)."""
    n, T = cfg.sequences * cfg.seq_len, cfg.seq_len
    seq = jnp.arange(n) // T
    same = (seq[:, None] == seq[None, :]).astype(float)
    return (1 - cfg.cosine) * jnp.eye(n) + (cfg.cosine - cfg.cross_cosine) * same + cfg.cross_cosine


def measure_blocks(stack: networks.Stack, x0, key, tangents: int = 4) -> dict:
    """Per-block statistics of a transformer stack for the tokens ``x0 (S, T, N)`` (module doc).

    Returns a dict of ``(L,)`` arrays: ``norm, cosine, cross_cosine, update,
    jacobian_sq, grad_state`` and ``grad_<w>`` for ``w`` in :data:`WEIGHTS`.
    """
    return _measure(stack, x0, *probes(key, x0.shape, x0.dtype, tangents))


def probes(key, shape, dtype, tangents: int) -> tuple[jax.Array, jax.Array]:
    """``(r, V)``: the loss projection ``r ~ N(0, I)`` of ``shape`` and ``tangents`` random
    tangents ``V (tangents, *shape)`` of :func:`measure_blocks`, drawn from ``key``."""
    k_loss, k_tan = jax.random.split(key)
    r = jax.random.normal(k_loss, shape, dtype)
    return r, jax.random.normal(k_tan, (tangents, *shape), dtype)


def _measure(stack: networks.Stack, x0, r, V) -> dict:
    """:func:`measure_blocks` with the loss projection ``r`` and the tangents ``V`` given
    (no tangents, ``V.shape[0] == 0``: ``jacobian_sq`` is NaN)."""
    L, N, T = stack.depth, x0.shape[-1], x0.shape[-2]

    def loss(params, probes):
        def body(x, inp):
            p, dx = inp
            x = x + dx
            return stack.layer(p, x), x

        xL, _ = lax.scan(body, x0, (params, probes))
        return jnp.sum(r * xL)

    g_p, g_x = jax.grad(loss, argnums=(0, 1))(stack.params, jnp.zeros((L, *x0.shape), x0.dtype))
    top = jnp.sum(r**2)
    states = stack.hidden_states(x0)
    prev = jnp.concatenate([x0[None], states[:-1]])
    st = tt.gram_statistics(jax.vmap(tt.token_gram)(states), T)
    jsq = jnp.full((L,), jnp.nan, x0.dtype)
    if tangents := V.shape[0]:
        jsq = jacobian.stack_jacobians(
            stack.layer, stack.params, x0, range(1, L + 1), tangents=V,
            reduce=lambda J: jnp.sum(J**2) / (tangents * x0.size),
        )  # fmt: skip
    out = {
        "norm": st.norm,
        "cosine": st.cosine,
        "cross_cosine": st.cross_cosine,
        "update": _per_block(states - prev) / _per_block(prev),
        "jacobian_sq": jsq,
        "grad_state": _per_block(g_x) / top,
    }
    return out | {f"grad_{w}": _per_block(g_p[w]) / (N * top) for w in WEIGHTS}


def _per_block(a):
    return jnp.sum(a.reshape(a.shape[0], -1) ** 2, axis=1)


def point_samples(cfg: Config):
    """``s(seed) -> (params, x0, r, V)``: a point's block parameters ``{name: (L, ...)}``,
    its tokens ``x0 (S, T, N)``, loss projection ``r`` and tangents ``V`` (:func:`probes`).
    Their law does not depend on the layer-norm placement or the branch scale, so one
    sampler serves every variant."""
    net = network_config(cfg, "pre", "1")
    dtype = jnp.result_type(float)

    def s(seed):
        k_net, k_in, k_m = jax.random.split(sweep.point_key(cfg.seed, seed), 3)
        params = networks.transformer_params(net, k_net, dtype)
        x0 = token_inputs(
            k_in, cfg.sequences, cfg.seq_len, cfg.width, cfg.cosine, cfg.cross_cosine, dtype
        )
        return params, x0, *probes(k_m, x0.shape, dtype, cfg.tangents)

    return s


def measure_sampled(cfg: Config, norm_position: str, alpha: str):
    """``m(params, x0, r, V) -> measure_blocks(...)`` for one variant, on the samples of
    :func:`point_samples` (no random draws)."""
    net = network_config(cfg, norm_position, alpha)
    template = networks.Transformer(net, rngs=nnx.Rngs(0)).stack()

    def m(params, x0, r, V):
        return _measure(dataclasses.replace(template, params=params), x0, r, V)

    return m


def measure_function(cfg: Config, norm_position: str, alpha: str):
    """``f(seed) -> measure_blocks(...)`` for one variant, one compiled program over seeds
    (:func:`measure_sampled` of :func:`point_samples`)."""
    sample, m = point_samples(cfg), measure_sampled(cfg, norm_position, alpha)
    return lambda seed: m(*sample(seed))


def _sampled_inputs(cfg: Config):
    """``inputs(point)`` of :func:`run` at the quick sizes: a point's samples (numpy, flat
    names), drawn by one program compiled once at XLA level 0."""
    sample = jax.jit(point_samples(cfg), compiler_options=sweep.compiler_options(False))

    def inputs(p):
        params, *rest = sample(p["seed"])
        flat = {f"param_{k}": np.asarray(v) for k, v in params.items()}
        return flat | {k: np.asarray(v) for k, v in zip(("x0", "r", "V"), rest, strict=True)}

    return inputs


def _measure_flat(cfg: Config, norm_position: str, alpha: str):
    m = measure_sampled(cfg, norm_position, alpha)

    def f(x0, r, V, **flat):
        return m({k.removeprefix("param_"): v for k, v in flat.items()}, x0, r, V)

    return f


def run(
    cfg: Config, out, *, per_device: int = 4, optimize: bool = True, progress: bool = True
) -> Path:
    """Run the sweep into the store ``out``; returns the aggregate csv path."""
    store = sweep.Store(out, "transformer_signal", cfg)
    # Small sweeps (compiled at level 0) draw each point's parameters first, by one program
    # for all variants: the random draws were a third of each variant's compile time. Large
    # ones (a point's parameters are 400 MB at the full tier) draw them inside.
    if optimize:
        fn, inputs = (lambda s: measure_function(cfg, s["norm_position"], s["alpha"])), None
    else:
        fn, inputs = (
            (lambda s: _measure_flat(cfg, s["norm_position"], s["alpha"])),
            _sampled_inputs(cfg),
        )
    return sweep.run_vectorized(
        store,
        grid(cfg),
        fn,
        lambda p, o: gradients.layer_rows(o, key="block"),
        static=("norm_position", "alpha"),
        inputs=inputs,
        per_device=per_device,
        optimize=optimize,
        progress=progress,
        label="transformer_signal",
    )


EXPERIMENT = Experiment(
    "transformer_signal", Config, PRESETS, run,
    "transformers at init: token cosine/norm, Jacobians, Q/K/V/MLP gradients vs depth",
    grid=grid,
)  # fmt: skip
