"""What the model configs share: branch scales, dtypes, activation parameters, and the
resolution and checks of the initialization options.

Each config (:class:`~isometry.networks.MLPConfig`, ``ConvConfig``,
``TransformerConfig``) validates itself in ``__post_init__`` with these, so a
bad option gets a clear error naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from isometry import activations as _activations
from isometry import initializers as _initializers
from isometry import validate

__all__ = [
    "BRANCH_SCALES",
    "DTYPES",
    "INIT_OPTIONS",
    "PARAMETERIZATIONS",
    "BranchScaled",
    "activation_of",
    "activation_params",
    "branch_scale",
    "check_branch_scale",
    "check_common",
    "check_dtype",
    "check_parameterization",
    "forward_config",
    "resolve_dtype",
    "resolve_init",
]

BRANCH_SCALES = ("1/sqrt(L)",)
PARAMETERIZATIONS = ("standard", "ntk", "mup", "depth_mup")

INIT_OPTIONS = ("init", "sigma_w2", "sigma_b2", "q_star", "value_sigma_w2", "qk_sigma_w2")
"""Config fields that only choose the initial parameters; the forward pass never reads them."""


def forward_config(cfg):
    """``cfg`` with its initialization options (:data:`INIT_OPTIONS`) at their defaults.

    Two networks whose configs have equal forward configs compute the same function of
    their parameters: the initialization options choose the parameters' first values
    only. Jitted functions keyed on a model's graph definition (the train step, the
    evaluator: :mod:`isometry.training`) key on this config, so the runs of a sweep over
    ``sigma_w2`` or ``q_star`` trace and compile them once. ``cfg`` itself where it is not
    a toolkit network config (``MLPConfig``, ``ConvConfig``, ``TransformerConfig``: the
    :class:`BranchScaled` dataclasses), has no such field, or its defaults do not make a
    valid config.
    """
    if not (isinstance(cfg, BranchScaled) and dataclasses.is_dataclass(cfg)):
        return cfg
    defaults = {
        f.name: f.default
        for f in dataclasses.fields(cfg)
        if f.name in INIT_OPTIONS and f.default is not dataclasses.MISSING
    }
    if not defaults or all(getattr(cfg, k) == v for k, v in defaults.items()):
        return cfg
    try:
        return dataclasses.replace(cfg, **defaults)
    except (TypeError, ValueError):
        return cfg


def check_branch_scale(name: str, value) -> None:
    """``value`` is a residual branch scale: a finite number > 0 or a name in ``BRANCH_SCALES``."""
    if isinstance(value, str):
        validate.choice(name, value, BRANCH_SCALES)
        return
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number > 0 or one of {BRANCH_SCALES}, got {value!r}")
    validate.real_array(name, value, minimum=0.0, strict=True)


def branch_scale(value, depth: int) -> float:
    """The residual branch scale ``alpha`` as a number.

    ``"1/sqrt(L)"`` gives ``alpha = depth ** -0.5``, the depth scaling under which
    the residual stream's variance and each block's update stay O(1) as
    ``L -> infinity`` (Hayou et al. 2021; Bordelon et al. 2023; Yang et al. 2023,
    depth-muP); a number is returned as a float.
    """
    check_branch_scale("residual_scale", value)
    validate.positive_int("depth", depth)
    return depth**-0.5 if isinstance(value, str) else float(value)


class BranchScaled:
    """Configs with ``residual_scale`` and ``depth``: the branch scale as a number."""

    @property
    def branch_scale(self) -> float:
        """``alpha`` as a number (``"1/sqrt(L)"`` at this depth; see :func:`branch_scale`);
        under ``parameterization="depth_mup"`` it is ``residual_scale / sqrt(L)`` (depth-muP's
        ``a / sqrt(L)``, Yang et al. 2023)."""
        alpha = branch_scale(self.residual_scale, self.depth)
        if getattr(self, "parameterization", "standard") == "depth_mup":
            return alpha * self.depth**-0.5
        return alpha


def check_parameterization(owner: str, cfg) -> None:
    """``cfg.parameterization`` is one of :data:`PARAMETERIZATIONS`; ``"depth_mup"`` needs
    residual paths and a numeric ``residual_scale`` (its ``a`` in ``a / sqrt(L)``)."""
    validate.choice("parameterization", cfg.parameterization, PARAMETERIZATIONS)
    if cfg.parameterization != "depth_mup":
        return
    if not cfg.residual:
        raise ValueError(f"{owner}: parameterization='depth_mup' needs residual=True")
    if isinstance(cfg.residual_scale, str):
        raise ValueError(
            f"{owner}: parameterization='depth_mup' already scales the branches by 1/sqrt(L); "
            f"residual_scale must be a number (its a in a/sqrt(L)), got {cfg.residual_scale!r}"
        )


def activation_params(value) -> tuple[tuple[str, float], ...]:
    """``activation_params`` (a mapping or ``(name, value)`` pairs) as sorted, hashable pairs."""
    if isinstance(value, Mapping):
        value = value.items()
    try:
        return tuple(sorted((str(k), float(v)) for k, v in value))
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"activation_params must be a mapping or (name, value) pairs, got {value!r}"
        ) from err


def resolve_init(
    owner: str, cfg, *, conv: bool
) -> tuple[_initializers.Initializer, _initializers.Variances]:
    """Check the initialization options; return ``(initializer, variances)``.

    ``init="critical"`` is Gaussian (dense) or delta-orthogonal (convolution)
    weights at the critical point of ``q_star``; the variances come from
    :func:`isometry.initializers.resolve` (the fans of the hidden layer's kernel).
    """
    name = cfg.init
    if isinstance(name, str) and name.strip().lower() == "critical":
        name = "delta_orthogonal" if conv else "gaussian"
    shape = cfg.kernel_shape if conv else (cfg.width, cfg.width)
    fan_in, fan_out = _initializers.fans(shape)
    try:
        v = _initializers.resolve(
            cfg.act, name, q_star=cfg.q_star, sigma_w2=cfg.sigma_w2, sigma_b2=cfg.sigma_b2,
            fan_in=fan_in, fan_out=fan_out,
        )  # fmt: skip
    except ValueError as err:
        raise ValueError(f"{owner}: {err}") from None
    return _initializers.get(name).at(v.sigma_w2), v


DTYPES = ("float32", "float64", "bfloat16", "float16")


def check_dtype(cfg) -> None:
    """Normalize ``cfg.dtype`` to its name, one of :data:`DTYPES`."""
    dtype = str(jnp.dtype(cfg.dtype)) if _is_dtype(cfg.dtype) else cfg.dtype
    object.__setattr__(cfg, "dtype", validate.choice("dtype", dtype, DTYPES))


def check_common(owner: str, cfg, *, conv: bool) -> None:
    """The checks ``MLPConfig`` and ``ConvConfig`` (``conv``) share: depth, dtype, the
    optional sizes, ``bias``, the activation and the initialization options."""
    validate.positive_int("depth", cfg.depth)
    check_dtype(cfg)
    for name in ("in_dim", "out_dim", "in_channels"):
        if getattr(cfg, name, None) is not None:
            validate.positive_int(name, getattr(cfg, name))
    if not isinstance(cfg.bias, bool):
        raise TypeError(f"bias must be True or False, got {cfg.bias!r}")
    _activations.get(cfg.activation, **dict(cfg.activation_params))  # validates
    _, v = resolve_init(owner, cfg, conv=conv)
    sb = v.sigma_b2
    if not cfg.bias and sb > 0:
        raise ValueError(
            f"{owner}: bias=False is incompatible with sigma_b2 = {sb:g} > 0 "
            "(a critical q_star may need a bias: pass bias=True)"
        )


def activation_of(cfg) -> _activations.Activation:
    """The config's activation at its parameters."""
    return _activations.get(cfg.activation, **dict(cfg.activation_params))


def _is_dtype(x) -> bool:
    try:
        return x is not None and jnp.issubdtype(jnp.dtype(x), jnp.floating)
    except TypeError:
        return False


def resolve_dtype(cfg, dtype):
    """The parameters' dtype: the constructor's ``dtype``, else the config's (default float32).

    float64 needs ``jax_enable_x64`` (jax would silently make float32 arrays).
    """
    if dtype is not None and not _is_dtype(dtype):
        raise TypeError(f"dtype must be a floating dtype ({', '.join(DTYPES)}), got {dtype!r}")
    dt = jnp.dtype(cfg.dtype if dtype is None else dtype)
    if dt == jnp.float64 and not jax.config.read("jax_enable_x64"):
        raise ValueError(
            "dtype float64 needs jax.config.update('jax_enable_x64', True) first "
            "(or jax.enable_x64() around the model's use)"
        )
    return dt
