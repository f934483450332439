"""The transformer encoder :class:`Transformer`, its config :class:`TransformerConfig`,
multi-head self-attention :func:`attention` and :func:`transformer_params`.

Blocks ``x -> x + alpha f(LN x)`` (pre-LN), ``LN(x + alpha f(x))`` (post-LN)
or ``x + alpha f(x)`` with ``f`` self-attention then an MLP, scanned over depth
like every model of :mod:`isometry.networks`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from isometry import activations as _activations
from isometry import initializers as _initializers
from isometry import validate
from isometry.networks.build import check_input, lecun, readout_params, stacked
from isometry.networks.config import (
    BranchScaled,
    activation_of,
    activation_params,
    check_branch_scale,
    check_dtype,
    check_parameterization,
    resolve_dtype,
)
from isometry.networks.stack import Stack, StackedParam

__all__ = [
    "POOLS",
    "TRANSFORMER_NORMS",
    "Transformer",
    "TransformerConfig",
    "attention",
    "transformer_params",
]

Array = jax.Array


TRANSFORMER_NORMS = ("pre", "post", "none")
POOLS = ("mean", "last", "none")


@dataclasses.dataclass(frozen=True)
class TransformerConfig(BranchScaled):
    """A transformer encoder: token embedding, ``depth`` blocks, readout.

    A block maps the tokens ``x (T, N)`` (one sequence; leading batch axes
    allowed) through two residual sublayers, each ``x -> x + alpha f(x)``
    with the layer norm ``LN`` (over the ``N`` features of each token, unit
    gain, zero offset at initialization) placed

        "pre":   x + alpha f(LN(x))       (Xiong et al. 2020; GPT-2)
        "post":  LN(x + alpha f(x))       (Vaswani et al. 2017)
        "none":  x + alpha f(x)

    and, without the residual path (``residual=False``), ``f(LN(x))``,
    ``LN(f(x))`` or ``f(x)``. The sublayers are multi-head self-attention

        MHSA(z) = concat_h softmax(Q_h K_h^T / sqrt(d) + mask) V_h  W_O,
        Q_h = z W_Q^h, K_h = z W_K^h, V_h = z W_V^h,   d = N / heads

    (``mask``: ``-inf`` above the diagonal when ``causal``) and the MLP
    ``MLP(z) = phi(z W_1 + b_1) W_2``. The probe of :class:`Stack` is added to
    the MLP pre-activation ``h = z W_1 + b_1`` (``aux["preact"]``).

    Attributes:
        depth: ``L``, the number of blocks (>= 1).
        width: ``N``, the model (residual-stream) width.
        heads: attention heads; must divide ``width``.
        mlp_width: ``M``, the MLP hidden width (default ``width``).
        in_dim: patch dimension of real-valued tokens ``u (T, in_dim)``
            (linear embedding, LeCun, ``Var = 1/in_dim``); ``None`` with
            ``vocab_size`` for symbols.
        vocab_size: number of symbols of integer tokens ``u (T,)``
            (embedding table entries ``N(0, 1)``).
        seq_len: with a value, a learned positional embedding ``(seq_len, N)``
            (entries ``N(0, 1)``) is added to the token embedding.
        out_dim: readout dimension (``None``: the readout is the identity).
        pool: ``"mean"`` over tokens, the ``"last"`` token, or ``"none"``
            (a readout per token).
        activation, activation_params: the MLP's ``phi``.
        init, sigma_w2, sigma_b2, q_star: ``W_1``'s scheme and variances,
            resolved by :func:`isometry.initializers.resolve` (fans ``(N, M)``).
        value_sigma_w2: ``N Var`` of ``W_V``, ``W_O`` and ``W_2`` (the linear
            maps; Gaussian, or orthogonal when ``init``'s ensemble is).
        qk_sigma_w2: ``N Var`` of ``W_Q`` and ``W_K`` (Gaussian). Small values
            make attention close to uniform at initialization, the regime
            of :mod:`isometry.transformer_theory` (Noci et al. 2022).
        bias: a bias ``b_1`` in the MLP (variance ``sigma_b2``).
        norm_position: ``"pre"``, ``"post"`` or ``"none"``.
        residual: residual paths around both sublayers.
        residual_scale: ``alpha``, a number > 0 or ``"1/sqrt(L)"``.
        causal: mask attention to earlier tokens.
        norm_eps: added to the variance in layer normalization.
        dtype: the parameters' dtype, as in :class:`MLPConfig` (default
            ``"float32"``; the model's ``dtype=`` argument overrides it).
        parameterization: ``"standard"`` (default), ``"ntk"``, ``"mup"`` or
            ``"depth_mup"``: the forward changes of the kind: attention logits
            ``Q K^T / d`` under muP and depth-muP (Yang et al. 2022, TP5), branch
            scale ``residual_scale / sqrt(L)`` under depth-muP (Yang et al. 2023).
            The variances and learning rates are set by
            :func:`isometry.parameterization.apply`.
    """

    depth: int
    width: int
    heads: int = 4
    mlp_width: int | None = None
    in_dim: int | None = None
    vocab_size: int | None = None
    seq_len: int | None = None
    out_dim: int | None = None
    pool: str = "mean"
    activation: str | _activations.Activation = "relu"
    activation_params: Any = ()
    init: str = "he_normal"
    sigma_w2: float | None = None
    sigma_b2: float | None = None
    q_star: float | None = None
    value_sigma_w2: float = 1.0
    qk_sigma_w2: float = 1.0
    bias: bool = False
    norm_position: str = "pre"
    residual: bool = True
    residual_scale: float | str = 1.0
    causal: bool = False
    norm_eps: float = 1e-5
    dtype: str = "float32"
    parameterization: str = "standard"

    def __post_init__(self):
        object.__setattr__(self, "activation_params", activation_params(self.activation_params))
        validate.int_fields(self, "depth", "width", "heads")
        check_dtype(self)
        if self.width % self.heads:
            raise ValueError(f"heads must divide width, got heads={self.heads}, width={self.width}")
        for name in ("mlp_width", "in_dim", "vocab_size", "seq_len", "out_dim"):
            if getattr(self, name) is not None:
                validate.positive_int(name, getattr(self, name))
        if (self.in_dim is None) == (self.vocab_size is None) and self.in_dim is not None:
            raise ValueError("TransformerConfig: give in_dim (patches) or vocab_size, not both")
        validate.choice("pool", self.pool, POOLS)
        validate.choice("norm_position", self.norm_position, TRANSFORMER_NORMS)
        for name in ("bias", "residual", "causal"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        check_branch_scale("residual_scale", self.residual_scale)
        validate.real_array("value_sigma_w2", self.value_sigma_w2, minimum=0.0, strict=True)
        validate.real_array("qk_sigma_w2", self.qk_sigma_w2, minimum=0.0)
        validate.real_array("norm_eps", self.norm_eps, minimum=0.0)
        _activations.get(self.activation, **dict(self.activation_params))
        self.variances()  # validates init / sigma_w2 / sigma_b2 / q_star
        check_parameterization("TransformerConfig", self)

    @property
    def act(self) -> _activations.Activation:
        return activation_of(self)

    @property
    def hidden(self) -> int:
        """``M``, the MLP hidden width."""
        return self.width if self.mlp_width is None else self.mlp_width

    def _resolved(self):
        name = "gaussian" if str(self.init).strip().lower() == "critical" else self.init
        try:
            v = _initializers.resolve(
                self.act, name, q_star=self.q_star, sigma_w2=self.sigma_w2,
                sigma_b2=self.sigma_b2, fan_in=self.width, fan_out=self.hidden,
            )  # fmt: skip
        except ValueError as err:
            raise ValueError(f"TransformerConfig: {err}") from None
        if not self.bias and v.sigma_b2 > 0:
            raise ValueError(
                f"TransformerConfig: bias=False is incompatible with sigma_b2 = {v.sigma_b2:g}"
            )
        return _initializers.get(name).at(v.sigma_w2), v

    def initializer(self) -> _initializers.Initializer:
        """``W_1``'s initializer."""
        return self._resolved()[0]

    def variances(self) -> tuple[float, float]:
        """``W_1``'s effective ``(sigma_w2, sigma_b2)`` (mean-field convention)."""
        v = self._resolved()[1]
        return v.sigma_w2, (v.sigma_b2 if self.bias else 0.0)


def _layer_norm(x, scale, offset, eps):
    """``(x - mean x) / sqrt(var x + eps) * scale + offset`` over the last axis."""
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.var(x, axis=-1, keepdims=True)
    return (x - mu) * lax.rsqrt(var + eps) * scale + offset


def attention(
    z: Array, wq: Array, wk: Array, wv: Array, wo: Array, heads: int, causal: bool,
    logits: str = "1/sqrt(d)",
):  # fmt: skip
    """Multi-head self-attention of the tokens ``z (..., T, N)``; weights ``(N, N)``.

    ``concat_h softmax(Q_h K_h^T / sqrt(d) + mask) V_h W_O`` with ``d = N / heads``;
    ``logits="1/d"``: ``Q_h K_h^T / d`` (muP; Yang et al. 2022).
    Returns ``(out (..., T, N), weights (..., heads, T, T))``.
    """
    *lead, T, N = z.shape
    d = N // heads

    def split(w):
        return (z @ w).reshape(*lead, T, heads, d)

    q, k, v = split(wq), split(wk), split(wv)
    scale = jnp.asarray(d, z.dtype) if logits == "1/d" else jnp.sqrt(jnp.asarray(d, z.dtype))
    s = jnp.einsum("...thd,...shd->...hts", q, k) / scale
    if causal:
        mask = jnp.tril(jnp.ones((T, T), bool))
        s = jnp.where(mask, s, jnp.finfo(s.dtype).min)
    a = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("...hts,...shd->...thd", a, v).reshape(*lead, T, N)
    return o @ wo, a


def _sublayer(cfg: TransformerConfig, alpha, f, x, scale, offset):
    """``x -> x + alpha f(LN x)`` (pre), ``LN(x + alpha f(x))`` (post), ... (the config's doc)."""
    ln = functools.partial(_layer_norm, scale=scale, offset=offset, eps=cfg.norm_eps)
    z = ln(x) if cfg.norm_position == "pre" else x
    out, aux = f(z)
    y = x + alpha * out if cfg.residual else out
    return (ln(y) if cfg.norm_position == "post" else y), aux


def _block_step(cfg: TransformerConfig, act, alpha, p, x, probe):
    """One transformer block ``x^{l-1} -> x^l`` (see :class:`TransformerConfig`)."""

    def attn(z):
        logits = "1/d" if cfg.parameterization in ("mup", "depth_mup") else "1/sqrt(d)"
        out, _ = attention(
            z, p["query"], p["key"], p["value"], p["out"], cfg.heads, cfg.causal, logits
        )
        return out, {}

    def mlp(z):
        h = z @ p["mlp_in"]
        if "mlp_bias" in p:
            h = h + p["mlp_bias"]
        if probe is not None:
            h = h + probe
        a = act.phi(h)
        out = a @ p["mlp_out"]
        return out, {"preact": h, "post": a, "branch": alpha * out}

    y, _ = _sublayer(cfg, alpha, attn, x, p["ln1_scale"], p["ln1_offset"])
    x_new, aux = _sublayer(cfg, alpha, mlp, y, p["ln2_scale"], p["ln2_offset"])
    if not cfg.residual:
        del aux["branch"]
    return x_new, aux


_TRANSFORMER_WEIGHTS = ("query", "key", "value", "out", "mlp_in", "mlp_out")


def _linear_init(cfg: TransformerConfig, sigma_w2) -> _initializers.Initializer:
    ensemble = cfg.initializer().ensemble
    return _initializers.get("orthogonal" if ensemble == "orthogonal" else "gaussian", sigma_w2)


def transformer_params(cfg: TransformerConfig, key, dtype=None) -> dict[str, Array]:
    """The stacked block parameters of :class:`Transformer` drawn from ``key`` (may be traced,
    so seeds can be ``vmap``-ped): ``{name: (L, ...)}`` as in :meth:`Transformer.stacked_params`.
    ``dtype`` defaults to the config's."""
    dtype = resolve_dtype(cfg, dtype)
    L, N, M = cfg.depth, cfg.width, cfg.hidden
    k = jax.random.split(key, 7)
    lin = _linear_init(cfg, cfg.value_sigma_w2)
    p = {
        "value": stacked(lin, k[2], L, (N, N), dtype),
        "out": stacked(lin, k[3], L, (N, N), dtype),
        "mlp_in": stacked(cfg.initializer(), k[4], L, (N, M), dtype),
        "mlp_out": stacked(lin, k[5], L, (M, N), dtype),
    }
    for i, name in enumerate(("query", "key")):
        p[name] = _initializers.draw_layers(
            lambda kk: _initializers.sample_gaussian(kk, (N, N), cfg.qk_sigma_w2, dtype),
            k[i],
            L,
            (N, N),
        )
    if cfg.bias:
        p["mlp_bias"] = _initializers.sample_bias(k[6], (L, M), cfg.variances()[1], dtype)
    for i in (1, 2):
        p[f"ln{i}_scale"] = jnp.ones((L, N), dtype)
        p[f"ln{i}_offset"] = jnp.zeros((L, N), dtype)
    return p


class Transformer(nnx.Module):
    """A transformer encoder as a scanned stack of blocks (see :class:`TransformerConfig`).

    Shapes: input ``(..., T, in_dim)`` (patches) or integer ``(..., T)``
    (symbols); the stack's state ``x (..., T, N)``; output ``(..., out_dim)``
    (``(..., T, out_dim)`` with ``pool="none"``). Stacked parameters
    (:class:`StackedParam`, leading axis ``L``): ``query, key, value, out
    (L, N, N)``, ``mlp_in (L, N, M)``, ``mlp_out (L, M, N)``, ``mlp_bias
    (L, M)``, ``ln{1,2}_scale, ln{1,2}_offset (L, N)``; ``Stack.weights`` are
    the six matrices. ``model.stack()`` is a :class:`Stack`, so
    :func:`isometry.jacobian.stack_jacobians` and :func:`isometry.signal.measure`
    work unchanged on per-example states ``(T, N)``.
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs, dtype=None):
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
        cfg = config
        dtype = resolve_dtype(cfg, dtype)
        self.config = cfg
        N = cfg.width
        params = transformer_params(cfg, rngs.params(), dtype)
        self.blocks = nnx.Dict({k: StackedParam(v) for k, v in params.items()})
        if cfg.in_dim is not None:
            self.embed = lecun(rngs.params(), (cfg.in_dim, N), dtype)
        elif cfg.vocab_size is not None:
            self.embed = nnx.Param(
                _initializers.standard_normal(rngs.params(), (cfg.vocab_size, N), dtype)
            )
        else:
            self.embed = None
        self.position = (
            None
            if cfg.seq_len is None
            else nnx.Param(_initializers.standard_normal(rngs.params(), (cfg.seq_len, N), dtype))
        )
        self.readout, self.readout_bias = readout_params(rngs, N, cfg.out_dim, dtype)

    def stacked_params(self) -> dict[str, Array]:
        """The blocks' parameters stacked over depth: ``{name: (L, ...)}``."""
        return {k: v[...] for k, v in self.blocks.items()}

    def stack(self) -> Stack:
        """The network as a :class:`~isometry.networks.Stack`: the block step, the stacked
        parameters, the token embedding and the readout."""
        cfg = self.config
        embed = None if self.embed is None else self.embed[...]
        pos = None if self.position is None else self.position[...]
        out = None if self.readout is None else (self.readout[...], self.readout_bias[...])
        return Stack(
            functools.partial(_block_step, cfg, cfg.act, cfg.branch_scale),
            self.stacked_params(),
            functools.partial(_token_embed, cfg.vocab_size is not None, embed, pos),
            functools.partial(_token_readout, cfg.pool, out),
            weights=_TRANSFORMER_WEIGHTS,
        )

    def __call__(self, u: Array) -> Array:
        cfg = self.config
        if cfg.vocab_size is not None:
            if jnp.ndim(u) < 1 or not jnp.issubdtype(jnp.asarray(u).dtype, jnp.integer):
                raise TypeError(f"u must be integer tokens (..., T), got {jnp.asarray(u).dtype}")
        else:
            check_input("u", u, cfg.in_dim or cfg.width)
        T = jnp.shape(u)[-1 if cfg.vocab_size is not None else -2]
        if cfg.seq_len is not None and T > cfg.seq_len:
            raise ValueError(f"u has {T} tokens, more than seq_len={cfg.seq_len}")
        return self.stack()(u)


def _token_embed(symbols: bool, embed, pos, u):
    """``x^0``: embedded tokens (table lookup or linear map) plus positions."""
    if embed is None:
        x = u
    elif symbols:
        x = jnp.take(embed, u, axis=0)
    else:
        x = u @ embed
    if pos is not None:
        x = x + pos[: x.shape[-2]]
    return x


def _token_readout(pool: str, readout, x):
    """Pool the tokens ``x (..., T, N)`` (mean, last or none), then the linear readout."""
    if pool == "mean":
        x = jnp.mean(x, axis=-2)
    elif pool == "last":
        x = x[..., -1, :]
    return x if readout is None else x @ readout[0] + readout[1]
