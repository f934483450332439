"""The fully connected network :class:`MLP` and its config :class:`MLPConfig`.

``h^l = W^l x^{l-1} + b^l``, ``x^l = phi(h^l)``, with optional normalization
(before or after ``phi``), residual connections and a learnable PReLU slope;
see :mod:`isometry.networks`. A plain stack (no normalization, fixed slope) is
called through :func:`isometry.networks.stack.dense_stack` (its hand-written JVP).
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
from isometry.networks.build import ScannedNet, check_input
from isometry.networks.config import (
    BranchScaled,
    activation_of,
    activation_params,
    check_branch_scale,
    check_common,
    check_parameterization,
    resolve_init,
)
from isometry.networks.stack import (
    StackedBatchStat,
    StackedParam,
    dense_stack,
    identity,
    scan_collect,
)

__all__ = ["MLP", "NORMS", "NORM_POSITIONS", "MLPConfig"]

Array = jax.Array

NORMS = ("none", "batch", "layer")
NORM_POSITIONS = ("pre", "post")


@dataclasses.dataclass(frozen=True)
class MLPConfig(BranchScaled):
    """A fully connected network: input map, ``depth`` square hidden layers, readout.

    Attributes:
        depth: ``L``, the number of hidden layers in the scanned stack (>= 1).
        width: ``N``, the hidden width.
        in_dim: input dimension; ``None`` or ``width`` means no input map
            (``x^0 = u``); otherwise a linear map with ``Var = 1/in_dim``
            (LeCun), which keeps the mean squared entry.
        out_dim: readout dimension; ``None`` means ``y = x^L``; otherwise a
            linear readout with ``Var = 1/width`` and zero bias.
        activation: a catalog name or an :class:`~isometry.activations.Activation`;
            ``"prelu"`` has a learnable channel-wise slope, initialized at its
            ``negative_slope`` parameter.
        activation_params: parameters of the activation, e.g.
            ``{"negative_slope": 0.1}``.
        init: an initializer name (``gaussian``, ``orthogonal``, ``xavier_normal``,
            ``he_normal``, ``lecun_normal``, ... see :mod:`isometry.initializers`),
            or ``"critical"`` (Gaussian weights at the critical point of ``q_star``).
        sigma_w2: weight variance for ``gaussian``/``orthogonal`` (default 1).
        sigma_b2: bias variance (default 0).
        q_star: critical initialization: ``(sigma_w2, sigma_b2) =
            meanfield.critical_point(activation, q_star)``.
        bias: use biases.
        norm: ``"none"``, ``"batch"`` or ``"layer"``.
        norm_position: ``"pre"`` (``phi(norm(h))``) or ``"post"`` (``norm(phi(h))``).
        residual: ``x^l = x^{l-1} + residual_scale * branch(x^{l-1})``.
        residual_scale: the branch scale ``alpha``: a number > 0, or
            ``"1/sqrt(L)"`` (``alpha = 1/sqrt(depth)``; Hayou et al. 2021,
            Bordelon et al. 2023, Yang et al. 2023).
        norm_eps: added to the variance in normalization.
        momentum: running-statistics momentum of batch normalization.
        dtype: the parameters' dtype, ``"float32"`` (default, whatever
            ``jax_enable_x64`` says) or ``"float64"`` (needs ``jax_enable_x64``),
            ``"bfloat16"``, ``"float16"``; the model's ``dtype=`` argument overrides it.
        parameterization: ``"standard"`` (default), ``"ntk"``, ``"mup"`` or
            ``"depth_mup"``: the forward change of the kind (depth-muP: the branch
            scale ``residual_scale / sqrt(L)``; the others: none). The variances and
            learning rates are set by :func:`isometry.parameterization.apply`.

    :meth:`variances` gives the hidden layers' effective ``(sigma_w2,
    sigma_b2)`` (resolved from ``init``, ``q_star`` or the fans); inputs on the
    network's ``q*`` sphere come from
    ``isometry.jacobian.sphere_inputs(key, shape, model=cfg)``.
    """

    depth: int
    width: int
    in_dim: int | None = None
    out_dim: int | None = None
    activation: str | _activations.Activation = "tanh"
    activation_params: Any = ()
    init: str = "gaussian"
    sigma_w2: float | None = None
    sigma_b2: float | None = None
    q_star: float | None = None
    bias: bool = True
    norm: str = "none"
    norm_position: str = "pre"
    residual: bool = False
    residual_scale: float | str = 1.0
    norm_eps: float = 1e-5
    momentum: float = 0.99
    dtype: str = "float32"
    parameterization: str = "standard"

    def __post_init__(self):
        object.__setattr__(self, "activation_params", activation_params(self.activation_params))
        validate.positive_int("width", self.width)
        validate.choice("norm", self.norm, NORMS)
        validate.choice("norm_position", self.norm_position, NORM_POSITIONS)
        if not isinstance(self.residual, bool):
            raise TypeError(f"residual must be True or False, got {self.residual!r}")
        check_branch_scale("residual_scale", self.residual_scale)
        validate.real_array("norm_eps", self.norm_eps, minimum=0.0)
        validate.real_array("momentum", self.momentum, minimum=0.0, maximum=1.0)
        if _initializers.get(
            "gaussian" if str(self.init).lower() == "critical" else self.init
        ).name == ("delta_orthogonal"):
            raise ValueError(
                "MLPConfig: init 'delta_orthogonal' is for convolution kernels; "
                "use 'orthogonal' for dense layers (or ConvNet)"
            )
        check_common("MLPConfig", self, conv=False)
        check_parameterization("MLPConfig", self)

    @property
    def act(self) -> _activations.Activation:
        """The activation (at its initial parameters, for a learnable PReLU)."""
        return activation_of(self)

    @property
    def learnable_slope(self) -> bool:
        return self.act.name == "prelu"

    def initializer(self) -> _initializers.Initializer:
        """The hidden layers' weight initializer."""
        return resolve_init("MLPConfig", self, conv=False)[0]

    def variances(self) -> tuple[float, float]:
        """The effective ``(sigma_w2, sigma_b2)`` of the hidden layers (mean-field convention).

        ``Var W_ij = sigma_w2 / width``, ``Var b_i = sigma_b2`` (0 without
        biases): from ``q_star`` (the critical point), ``sigma_w2``/``sigma_b2``,
        or the fans of a fan-based ``init`` (He: 2, Xavier: 1 for square layers).
        """
        _, v = resolve_init("MLPConfig", self, conv=False)
        return v.sigma_w2, (v.sigma_b2 if self.bias else 0.0)


def _normalize(kind, v, p, train, eps):
    """Batch or layer normalization of ``v`` (channels last) with gain/offset.

    Layer: ``(v - mean_i v) / sqrt(var_i v + eps)`` over the channel axis.
    Batch: the same over the batch (and spatial) axes with batch statistics
    in training, running statistics in evaluation. Returns ``(out, stats)``.
    """
    if kind == "layer":
        mu = jnp.mean(v, axis=-1, keepdims=True)
        var = jnp.var(v, axis=-1, keepdims=True)
        stats = None
    elif train:
        if v.ndim < 2:
            raise ValueError(
                "batch normalization in training mode needs a batch axis (x of shape (B, N)); "
                "use model.eval() for per-example functions"
            )
        axes = tuple(range(v.ndim - 1))
        mu, var = jnp.mean(v, axis=axes), jnp.var(v, axis=axes)
        stats = (mu, var)
    else:
        mu, var = p["mean"], p["var"]
        stats = None
    return (v - mu) * lax.rsqrt(var + eps) * p["scale"] + p["offset"], stats


def _phi(act, p, z):
    if "slope" in p:  # learnable PReLU
        return jnp.where(z > 0, z, p["slope"] * z)
    return act.phi(z)


def _mlp_step(cfg: MLPConfig, act, train: bool, p, x, probe):
    """One hidden layer; see the module docstring for the equations."""
    h = x @ p["kernel"]
    if "bias" in p:
        h = h + p["bias"]
    if probe is not None:
        h = h + probe
    aux = {"preact": h}
    z = h
    if cfg.norm != "none" and cfg.norm_position == "pre":
        z, stats = _normalize(cfg.norm, z, p, train, cfg.norm_eps)
    a = _phi(act, p, z)
    aux["post"] = a
    if cfg.norm != "none" and cfg.norm_position == "post":
        a, stats = _normalize(cfg.norm, a, p, train, cfg.norm_eps)
    if cfg.norm == "batch" and train:
        aux["batch_mean"], aux["batch_var"] = stats
    if cfg.residual:
        branch = cfg.branch_scale * a
        aux["branch"] = branch
        return x + branch, aux
    return a, aux


def _plain_dense(cfg: MLPConfig) -> bool:
    """The stack is ``phi(x W + b)`` (optionally residual): no normalization, fixed slope."""
    return cfg.norm == "none" and not cfg.learnable_slope


class MLP(ScannedNet):
    """A deep fully connected network as a scanned stack (see :mod:`isometry.networks`).

    Shapes: input ``(..., in_dim)``, output ``(..., out_dim)`` (or ``(..., width)``).
    Stacked parameters (:class:`StackedParam`) carry a leading depth axis ``L``:
    ``kernel (L, N, N)``, ``bias (L, N)``, ``slope (L, N)`` (PReLU),
    ``norm_scale, norm_offset (L, N)``; batch norm's running statistics
    ``running_mean, running_var (L, N)`` are :class:`StackedBatchStat`. The
    input map ``embed`` and the readout are plain ``nnx.Param``. Construction
    and the stack view are :class:`~isometry.networks.build.ScannedNet`'s.

    Args:
        config: an :class:`MLPConfig`.
        rngs: ``nnx.Rngs`` (the ``params`` stream is used).
        dtype: parameter dtype; default the config's ``dtype`` (float32).
    """

    STACKED = (
        ("bias", "bias"),
        ("slope", "slope"),
        ("scale", "norm_scale"),
        ("offset", "norm_offset"),
        ("mean", "running_mean"),
        ("var", "running_var"),
    )

    def __init__(self, config: MLPConfig, *, rngs: nnx.Rngs, dtype=None):
        if not isinstance(config, MLPConfig):
            raise TypeError(f"config must be an MLPConfig, got {type(config).__name__}")
        N = config.width
        super().__init__(config, rngs, dtype, width=N, kernel_shape=(N, N))
        cfg, L, dtype = config, config.depth, self.kernel.dtype
        self.use_running_average = False
        self.slope = (
            StackedParam(jnp.full((L, N), cfg.act.kwargs["negative_slope"], dtype))
            if cfg.learnable_slope
            else None
        )
        if cfg.norm != "none":
            self.norm_scale = StackedParam(jnp.ones((L, N), dtype))
            self.norm_offset = StackedParam(jnp.zeros((L, N), dtype))
        else:
            self.norm_scale = self.norm_offset = None
        if cfg.norm == "batch":
            self.running_mean = StackedBatchStat(jnp.zeros((L, N), dtype))
            self.running_var = StackedBatchStat(jnp.ones((L, N), dtype))
        else:
            self.running_mean = self.running_var = None

    # -- the pieces of the stack view (ScannedNet) -------------------------- #

    def embed_spec(self, init):
        """``x^0 = u W_in`` (LeCun) when ``in_dim`` is given and differs from ``width``."""
        cfg = self.config
        if cfg.in_dim is not None and cfg.in_dim != cfg.width:
            return (cfg.in_dim, cfg.width), "lecun_normal"
        return None

    def layer_step(self):
        """One hidden layer in the current mode (batch statistics in training)."""
        train = not self.use_running_average
        return functools.partial(_mlp_step, self.config, self.config.act, train)

    def input_fn(self, embed):
        """``u -> u W_in`` (or ``u``), in the model's dtype, the input's last axis checked."""
        return functools.partial(_matmul, embed, self.config.width, self.kernel.dtype)

    def output_fn(self, readout):
        """``x^L -> x^L W_out + b_out`` (or ``x^L`` when ``out_dim`` is ``None``)."""
        return identity if readout is None else functools.partial(_affine, *readout)

    def __call__(self, u: Array) -> Array:
        """Forward pass; in training mode batch norm updates its running statistics."""
        check_input("u", u, self.config.in_dim or self.config.width)
        s, cfg = self.stack(), self.config
        if _plain_dense(cfg):
            alpha = cfg.branch_scale if cfg.residual else None
            return s.output_map(dense_stack(s.step, cfg.act.phi, alpha, s.input_map(u), s.params))
        xL, aux = scan_collect(s.step, s.params, s.input_map(u))
        if self.config.norm == "batch" and not self.use_running_average:
            m = self.config.momentum
            self.running_mean[...] = m * self.running_mean[...] + (1 - m) * aux["batch_mean"]
            self.running_var[...] = m * self.running_var[...] + (1 - m) * aux["batch_var"]
        return s.output_map(xL)


def _matmul(w, width, dtype, u):
    """The input map ``u W`` (``u`` when ``w`` is ``None``) in the model's ``dtype``; the
    input's last axis is checked."""
    check_input("u", u, width if w is None else w.shape[0])
    u = jnp.asarray(u).astype(dtype)
    return u if w is None else u @ w


def _affine(w, b, x):
    return x @ w + b
