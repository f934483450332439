"""The deep vanilla CNN :class:`ConvNet` (Xiao et al. 2018), its config :class:`ConvConfig`,
and the stride-1 convolution :func:`conv` (circular or same padding).

``h^l = conv(x^{l-1}, K^l) + b^l``, ``x^l = phi(h^l)`` (optionally residual),
delta-orthogonal kernels by default; see :mod:`isometry.networks`.
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
    resolve_init,
)
from isometry.networks.stack import identity

__all__ = ["PADDINGS", "ConvConfig", "ConvNet", "conv"]

Array = jax.Array

PADDINGS = ("circular", "same")


@dataclasses.dataclass(frozen=True)
class ConvConfig(BranchScaled):
    """A deep vanilla CNN (Xiao et al. 2018): ``depth`` convolutions ``C -> C``.

    ``h^l = conv(x^{l-1}, K^l) + b^l``, ``x^l = phi(h^l)``, kernels
    ``K^l (*kernel, C, C)`` with ``sigma_w2 = fan_in Var(K)`` (``fan_in = C k^d``);
    delta-orthogonal kernels put ``sqrt(sigma_w2)`` times a Haar-orthogonal
    ``C x C`` matrix at the centre tap, zeros elsewhere.

    Attributes:
        depth: ``L``, the number of convolutions in the stack.
        channels: ``C``, the hidden channel count.
        kernel_size: spatial kernel extent (the same along every axis).
        spatial_dims: 1, 2 or 3 spatial axes (data ``(B, *spatial, C)``).
        in_channels: input channels; ``None`` or ``channels`` means no input
            map, otherwise one linear convolution ``in_channels -> channels``
            (delta-orthogonal with ``sigma_w2 = 1`` when ``init`` is
            delta-orthogonal, else LeCun).
        out_dim: with ``pool``, a dense readout to ``out_dim``.
        pool: global average pooling head (``(B, *spatial, C) -> (B, C)``).
        padding: ``"circular"`` (periodic) or ``"same"`` (zeros).
        activation, activation_params, init, sigma_w2, sigma_b2, q_star, bias,
            dtype: as in :class:`MLPConfig`; ``init`` defaults to ``delta_orthogonal``
            and ``"critical"`` means delta-orthogonal at the critical point of
            ``q_star``.
        residual, residual_scale: ``x^l = x^{l-1} + alpha phi(h^l)`` with
            ``alpha`` a number > 0 or ``"1/sqrt(L)"``, as in :class:`MLPConfig`.
    """

    depth: int
    channels: int
    kernel_size: int = 3
    spatial_dims: int = 2
    in_channels: int | None = None
    out_dim: int | None = None
    pool: bool = False
    padding: str = "circular"
    activation: str | _activations.Activation = "tanh"
    activation_params: Any = ()
    init: str = "delta_orthogonal"
    sigma_w2: float | None = None
    sigma_b2: float | None = None
    q_star: float | None = None
    bias: bool = True
    residual: bool = False
    residual_scale: float | str = 1.0
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "activation_params", activation_params(self.activation_params))
        validate.positive_int("channels", self.channels)
        if not isinstance(self.residual, bool):
            raise TypeError(f"residual must be True or False, got {self.residual!r}")
        check_branch_scale("residual_scale", self.residual_scale)
        validate.positive_int("kernel_size", self.kernel_size)
        if self.spatial_dims not in (1, 2, 3) or isinstance(self.spatial_dims, bool):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {self.spatial_dims!r}")
        validate.choice("padding", self.padding, PADDINGS)
        if not isinstance(self.pool, bool):
            raise TypeError(f"pool must be True or False, got {self.pool!r}")
        if self.out_dim is not None and not self.pool:
            raise ValueError("ConvConfig: out_dim needs the pooling head (pool=True)")
        check_common("ConvConfig", self, conv=True)
        if self.in_channels is not None and self.in_channels > self.channels:
            if self.initializer().name == "delta_orthogonal":
                raise ValueError(
                    "ConvConfig: delta_orthogonal needs in_channels <= channels (an orthogonal "
                    f"centre tap), got in_channels={self.in_channels}, channels={self.channels}"
                )

    @property
    def act(self) -> _activations.Activation:
        return activation_of(self)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return (self.kernel_size,) * self.spatial_dims + (self.channels, self.channels)

    def initializer(self) -> _initializers.Initializer:
        return resolve_init("ConvConfig", self, conv=True)[0]

    def variances(self) -> tuple[float, float]:
        """Effective ``(sigma_w2, sigma_b2)``: ``sigma_w2 = fan_in Var(K)`` (Xiao et al. 2018)."""
        _, v = resolve_init("ConvConfig", self, conv=True)
        return v.sigma_w2, (v.sigma_b2 if self.bias else 0.0)


_SPATIAL = {1: "W", 2: "HW", 3: "DHW"}


def conv(x: Array, kernel: Array, padding: str = "circular") -> Array:
    """Stride-1 convolution of ``x (B, *spatial, C_in)`` (or ``(*spatial, C_in)``)
    with ``kernel (*k, C_in, C_out)``, circular (periodic) or same (zero) padding, in the
    promoted dtype of the two."""
    d = kernel.ndim - 2
    dt = jnp.result_type(x, kernel)  # promoted as a matmul is (lax.conv wants one dtype)
    x, kernel = jnp.asarray(x).astype(dt), kernel.astype(dt)
    single = x.ndim == d + 1
    if single:
        x = x[None]
    lead = x.shape[: x.ndim - d - 1]
    x = x.reshape((-1, *x.shape[-d - 1 :]))
    if padding == "circular":
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in kernel.shape[:d]] + [(0, 0)]
        x = jnp.pad(x, pads, mode="wrap")
        pad = "VALID"
    else:
        pad = "SAME"
    sp = _SPATIAL[d]
    dn = lax.conv_dimension_numbers(x.shape, kernel.shape, (f"N{sp}C", f"{sp}IO", f"N{sp}C"))
    y = lax.conv_general_dilated(x, kernel, (1,) * d, pad, dimension_numbers=dn)
    y = y.reshape((*lead, *y.shape[1:]))
    return y[0] if single else y


def _conv_step(cfg: ConvConfig, act, p, x, probe):
    h = conv(x, p["kernel"], cfg.padding)
    if "bias" in p:
        h = h + p["bias"]
    if probe is not None:
        h = h + probe
    a = act.phi(h)
    aux = {"preact": h, "post": a}
    if cfg.residual:
        aux["branch"] = cfg.branch_scale * a
        return x + aux["branch"], aux
    return a, aux


def _pool_head(cfg, readout, x):
    d = cfg.spatial_dims
    y = jnp.mean(x, axis=tuple(range(x.ndim - d - 1, x.ndim - 1)))
    if readout is not None:
        y = y @ readout[0] + readout[1]
    return y


class ConvNet(ScannedNet):
    """A deep vanilla CNN as a scanned stack (Xiao et al. 2018).

    Shapes: input ``(B, *spatial, in_channels)``; output ``(B, *spatial, C)``
    without the pooling head, ``(B, C)`` or ``(B, out_dim)`` with it.
    Parameters: ``kernel (L, *k, C, C)``, ``bias (L, C)``; the input map
    ``embed (*k, in_channels, C)`` and the readout as in :class:`MLP`.
    Construction and the stack view are
    :class:`~isometry.networks.build.ScannedNet`'s.
    """

    def __init__(self, config: ConvConfig, *, rngs: nnx.Rngs, dtype=None):
        if not isinstance(config, ConvConfig):
            raise TypeError(f"config must be a ConvConfig, got {type(config).__name__}")
        super().__init__(
            config, rngs, dtype, width=config.channels, kernel_shape=config.kernel_shape
        )

    # -- the pieces of the stack view (ScannedNet) -------------------------- #

    def embed_spec(self, init):
        """One convolution ``in_channels -> channels`` when they differ: delta-orthogonal
        with ``sigma_w2 = 1`` when ``init`` is delta-orthogonal, else LeCun."""
        cfg = self.config
        if cfg.in_channels is None or cfg.in_channels == cfg.channels:
            return None
        shape = (cfg.kernel_size,) * cfg.spatial_dims + (cfg.in_channels, cfg.channels)
        first = (
            _initializers.get("delta_orthogonal", sigma_w2=1.0)
            if init.name == "delta_orthogonal"
            else _initializers.get("lecun_normal")
        )
        return shape, first

    def layer_step(self):
        """One convolution layer."""
        return functools.partial(_conv_step, self.config, self.config.act)

    def input_fn(self, embed):
        """``u -> conv(u, embed)`` (or ``u``), in the model's dtype."""
        return functools.partial(_conv_in, self.config.padding, embed, self.kernel.dtype)

    def output_fn(self, readout):
        """The pooling head (and dense readout), or the identity without ``pool``."""
        cfg = self.config
        return functools.partial(_pool_head, cfg, readout) if cfg.pool else identity

    def __call__(self, u: Array) -> Array:
        c = self.config
        if jnp.ndim(u) < c.spatial_dims + 1:
            raise ValueError(
                f"u must have shape (B, *spatial, C) with {c.spatial_dims} spatial axes, "
                f"got {jnp.shape(u)}"
            )
        check_input("u", u, c.in_channels or c.channels)
        return self.stack()(u)


def _conv_in(padding, kernel, dtype, u):
    """The input map in the model's ``dtype``: ``u`` itself, or one convolution."""
    u = jnp.asarray(u).astype(dtype)
    return u if kernel is None else conv(u, kernel, padding)
