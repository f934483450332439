"""Named elementwise nonlinearities with exact derivatives and Gaussian kernels.

An :class:`Activation` bundles ``phi``, its exact derivative ``phi'`` (also for
the kinked ReLU, leaky ReLU and hard-tanh), the points where ``phi`` or ``phi'``
is not smooth (so quadrature can split there), and, where they exist, the
closed-form Gaussian kernels used by mean-field theory:

    kernel(q1, q2, q12)        = E[phi(u1) phi(u2)]
    deriv_kernel(q1, q2, q12)  = E[phi'(u1) phi'(u2)]

for ``(u1, u2) ~ N(0, [[q1, q12], [q12, q2]])``. Closed forms: linear; ReLU and
leaky ReLU (arc-cosine kernel, Cho & Saul 2009); erf (arcsine kernel,
Williams 1997); sin; hard-tanh (one-dimensional moments only, ``q1 = q2 = q12``).

Activations are frozen dataclasses: hashable, comparable by value, and usable
as static arguments of ``jax.jit``.

Example:
    >>> from isometry import activations
    >>> act = activations.get("leaky_relu", negative_slope=0.1)
    >>> float(act(-2.0)), float(act.dphi(-2.0))
    (-0.2, 0.1)
    >>> my = activations.custom("cube", lambda x: x**3)
    >>> float(my.dphi(2.0))
    12.0
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import erf

__all__ = ["Activation", "custom", "get", "names", "register", "register_transform"]

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Activation:
    """An elementwise nonlinearity ``phi`` with the facts theory needs.

    Attributes:
        name: catalog name (or a user's name for custom activations).
        fn: ``fn(x, **params) -> phi(x)``, elementwise.
        deriv: ``deriv(x, **params) -> phi'(x)``, elementwise and exact.
        params: the parameters as sorted ``(name, value)`` pairs.
        kinks: points where ``phi`` or ``phi'`` is not smooth (quadrature
            splits its panels there).
        kernel: optional closed form ``(q1, q2, q12, **params) ->
            E[phi(u1) phi(u2)]``.
        second_moment: optional closed form ``(q, **params) -> E[phi(u)^2]``,
            ``u ~ N(0, q)`` (smooth in ``q``, unlike ``kernel`` at ``c = 1``).
        deriv_kernel: optional closed form ``(q1, q2, q12, **params) ->
            E[phi'(u1) phi'(u2)]``.
        bernoulli_p: for activations whose ``phi'^2`` takes only the values 0
            and 1 (ReLU, hard-tanh, linear), a closed form
            ``(q, **params) -> P(phi'(u)^2 = 1)`` for ``u ~ N(0, q)``.
        first_moment: optional closed form ``(q, **params) -> E[phi(u)]``.
        deriv_mean: optional closed form ``(q, **params) -> E[phi'(u)]`` (the factor
            of Stein's lemma ``E[u phi(u)] = q E[phi'(u)]``).
        piecewise_linear: ``phi`` is piecewise linear (``phi'' = 0`` off kinks).
    """

    name: str
    fn: Callable
    deriv: Callable
    params: tuple[tuple[str, float], ...] = ()
    kinks: tuple[float, ...] = ()
    kernel: Callable | None = None
    second_moment: Callable | None = None
    deriv_kernel: Callable | None = None
    bernoulli_p: Callable | None = None
    first_moment: Callable | None = None
    deriv_mean: Callable | None = None
    piecewise_linear: bool = False

    @property
    def kwargs(self) -> dict[str, float]:
        return dict(self.params)

    def __call__(self, x: Array) -> Array:
        return self.fn(x, **self.kwargs)

    def phi(self, x: Array) -> Array:
        """``phi(x)``, elementwise."""
        return self.fn(x, **self.kwargs)

    def dphi(self, x: Array) -> Array:
        """``phi'(x)``, elementwise; exact (one-sided at kinks)."""
        return self.deriv(x, **self.kwargs)

    def d2phi(self, x: Array) -> Array:
        """``phi''(x)`` by autodiff of ``phi'`` (zero off the kinks for piecewise-linear phi)."""
        x = jnp.asarray(x, dtype=jnp.result_type(float, x))
        g = jax.grad(lambda t: self.deriv(t, **self.kwargs))
        return jnp.vectorize(g)(x)

    def __repr__(self) -> str:
        p = ", ".join(f"{k}={v}" for k, v in self.params)
        return f"Activation({self.name}{', ' + p if p else ''})"


# --------------------------------------------------------------------------- #
# Closed-form Gaussian kernels.
# --------------------------------------------------------------------------- #


def _cos_angle(q1, q2, q12):
    c = q12 / jnp.sqrt(q1 * q2)
    return jnp.clip(c, -1.0, 1.0)


def _arccos_k1(c):
    """Arc-cosine kernel of degree 1, normalized: E[relu(z1) relu(z2)] for corr c."""
    theta = jnp.arccos(c)
    return (jnp.sqrt(jnp.maximum(1.0 - c * c, 0.0)) + (jnp.pi - theta) * c) / (2.0 * jnp.pi)


def _leaky_kernel(q1, q2, q12, negative_slope=0.0):
    a = negative_slope
    c = _cos_angle(q1, q2, q12)
    return jnp.sqrt(q1 * q2) * ((1.0 + a * a) * _arccos_k1(c) - 2.0 * a * _arccos_k1(-c))


def _leaky_deriv_kernel(q1, q2, q12, negative_slope=0.0):
    a = negative_slope
    theta = jnp.arccos(_cos_angle(q1, q2, q12))
    return (1.0 + a * a) * (jnp.pi - theta) / (2.0 * jnp.pi) + a * theta / jnp.pi


def _linear_kernel(q1, q2, q12):
    return q12 + 0.0 * (q1 + q2)


def _linear_deriv_kernel(q1, q2, q12):
    return jnp.ones_like(q12 + 0.0 * (q1 + q2))


def _erf_kernel(q1, q2, q12):
    # Williams (1997): E[erf(u1) erf(u2)] = (2/pi) arcsin(2 q12 / sqrt((1+2q1)(1+2q2))).
    return (2.0 / jnp.pi) * jnp.arcsin(2.0 * q12 / jnp.sqrt((1.0 + 2.0 * q1) * (1.0 + 2.0 * q2)))


def _erf_deriv_kernel(q1, q2, q12):
    # erf'(x) = (2/sqrt(pi)) exp(-x^2);  E[exp(-u1^2 - u2^2)] = det(I + 2 Sigma)^(-1/2).
    return (4.0 / jnp.pi) / jnp.sqrt((1.0 + 2.0 * q1) * (1.0 + 2.0 * q2) - 4.0 * q12 * q12)


def _phi_std(t):
    return jnp.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)


def _sin_kernel(q1, q2, q12):
    # E[sin u1 sin u2] = exp(-(q1 + q2)/2) sinh(q12).
    return jnp.exp(-0.5 * (q1 + q2)) * jnp.sinh(q12)


def _sin_deriv_kernel(q1, q2, q12):
    # E[cos u1 cos u2] = exp(-(q1 + q2)/2) cosh(q12).
    return jnp.exp(-0.5 * (q1 + q2)) * jnp.cosh(q12)


def _leaky_second_moment(q, negative_slope=0.0):
    return 0.5 * (1.0 + negative_slope * negative_slope) * q


def _relu_second_moment(q):
    return 0.5 * q


def _linear_second_moment(q):
    return q


def _erf_second_moment(q):
    return (2.0 / jnp.pi) * jnp.arcsin(2.0 * q / (1.0 + 2.0 * q))


def _sin_second_moment(q):
    return 0.5 * (1.0 - jnp.exp(-2.0 * q))


def _hard_tanh_second_moment(q):
    # E[clip(u)^2] = q (P(|z|<t) - 2 t pdf(t)) + P(|z|>t), t = 1/sqrt(q).
    t = 1.0 / jnp.sqrt(q)
    inside = erf(t / math.sqrt(2.0))
    return q * (inside - 2.0 * t * _phi_std(t)) + (1.0 - inside)


def _leaky_first_moment(q, negative_slope=0.0):
    return (1.0 - negative_slope) * jnp.sqrt(q / (2.0 * jnp.pi))


def _leaky_deriv_mean(q, negative_slope=0.0):
    return (1.0 + negative_slope) / 2.0 * jnp.ones_like(q)


def _zero_mean(q, **_):
    return jnp.zeros_like(q)


def _erf_deriv_mean(q):
    return 2.0 / jnp.sqrt(jnp.pi * (1.0 + 2.0 * q))


def _sin_deriv_mean(q):
    return jnp.exp(-q / 2.0)


def _hard_tanh_p(q):
    return erf(1.0 / jnp.sqrt(2.0 * q))


def _relu_p(q):
    return 0.5 + 0.0 * q


def _linear_p(q):
    return 1.0 + 0.0 * q


# --------------------------------------------------------------------------- #
# The catalog.  Each function is module level, so two `get` calls with the same
# parameters return equal (and equally hashed) activations.
# --------------------------------------------------------------------------- #


def _linear(x):
    return x


def _d_linear(x):
    return jnp.ones_like(x)


def _relu(x):
    return jnp.maximum(x, 0.0)


def _d_relu(x):
    return jnp.where(x > 0, 1.0, 0.0).astype(jnp.result_type(x, float))


def _leaky_relu(x, negative_slope=0.01):
    return jnp.where(x > 0, x, negative_slope * x)


def _d_leaky_relu(x, negative_slope=0.01):
    return jnp.where(x > 0, 1.0, negative_slope) * jnp.ones_like(x, dtype=jnp.result_type(x, float))


def _elu(x, alpha=1.0):
    return jnp.where(x > 0, x, alpha * jnp.expm1(jnp.minimum(x, 0.0)))


def _d_elu(x, alpha=1.0):
    return jnp.where(x > 0, 1.0, alpha * jnp.exp(jnp.minimum(x, 0.0)))


_SELU_ALPHA = 1.6732632423543772
_SELU_SCALE = 1.0507009873554805


def _selu(x):
    return _SELU_SCALE * _elu(x, _SELU_ALPHA)


def _d_selu(x):
    return _SELU_SCALE * _d_elu(x, _SELU_ALPHA)


def _gelu(x):
    # Exact (erf) GELU: x Phi(x).
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _d_gelu(x):
    return 0.5 * (1.0 + erf(x / math.sqrt(2.0))) + x * _phi_std(x)


def _silu(x):
    return x * jax.nn.sigmoid(x)


def _d_silu(x):
    s = jax.nn.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def _softplus(x):
    return jax.nn.softplus(x)


def _d_softplus(x):
    return jax.nn.sigmoid(x)


def _sigmoid(x):
    return jax.nn.sigmoid(x)


def _d_sigmoid(x):
    s = jax.nn.sigmoid(x)
    return s * (1.0 - s)


def _tanh(x):
    return jnp.tanh(x)


def _d_tanh(x):
    t = jnp.tanh(x)
    return 1.0 - t * t


def _hard_tanh(x):
    return jnp.clip(x, -1.0, 1.0)


def _d_hard_tanh(x):
    return jnp.where(jnp.abs(x) < 1.0, 1.0, 0.0).astype(jnp.result_type(x, float))


def _erf(x):
    return erf(x)


def _d_erf(x):
    return (2.0 / math.sqrt(math.pi)) * jnp.exp(-x * x)


def _sin(x):
    return jnp.sin(x)


def _d_sin(x):
    return jnp.cos(x)


_PWL = {"piecewise_linear": True}

# name -> (fn, deriv, default params, kinks-of(params), extras)
_CATALOG: dict[str, Callable[..., Activation]] = {}
# prefix -> factory(base_name, **params): names "prefix:base" (e.g. "dks:tanh", isometry.shaping)
_TRANSFORMS: dict[str, Callable[..., Activation]] = {}


def register(name: str, factory: Callable[..., Activation]) -> None:
    """Add ``factory(**params) -> Activation`` to the catalog under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register: name must be a non-empty string, got {name!r}")
    _CATALOG[name] = factory


def register_transform(prefix: str, factory: Callable[..., Activation]) -> None:
    """Make ``get("prefix:base", **params)`` return ``factory(base, **params)``.

    :mod:`isometry.shaping` registers ``dks`` and ``tat`` (imported with :mod:`isometry`), so
    ``get("dks:tanh", depth=50, zeta=1.5)`` is the DKS-transformed tanh of a 50-layer network.
    """
    if not isinstance(prefix, str) or not prefix or ":" in prefix:
        raise ValueError(f"register_transform: prefix must be a non-empty name, got {prefix!r}")
    _TRANSFORMS[prefix] = factory


def _builtin(name, fn, deriv, defaults=None, kinks=lambda **p: (), **extras):
    defaults = dict(defaults or {})

    def factory(**params):
        unknown = set(params) - set(defaults)
        if unknown:
            allowed = ", ".join(sorted(defaults)) or "none"
            raise ValueError(
                f"activation {name!r}: unknown parameter(s) {sorted(unknown)}; allowed: {allowed}"
            )
        merged = {**defaults, **params}
        for key, value in merged.items():
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(
                    f"activation {name!r}: parameter {key} must be a finite number, got {value!r}"
                )
        return Activation(
            name=name,
            fn=fn,
            deriv=deriv,
            params=tuple(sorted((k, float(v)) for k, v in merged.items())),
            kinks=tuple(kinks(**merged)),
            **extras,
        )

    register(name, factory)


_builtin(
    "linear",
    _linear,
    _d_linear,
    kernel=_linear_kernel,
    second_moment=_linear_second_moment,
    deriv_kernel=_linear_deriv_kernel,
    bernoulli_p=_linear_p,
    first_moment=_zero_mean,
    deriv_mean=lambda q: jnp.ones_like(q),
    **_PWL,
)
_builtin(
    "relu",
    _relu,
    _d_relu,
    kinks=lambda: (0.0,),
    kernel=lambda q1, q2, q12: _leaky_kernel(q1, q2, q12, 0.0),
    second_moment=_relu_second_moment,
    deriv_kernel=lambda q1, q2, q12: _leaky_deriv_kernel(q1, q2, q12, 0.0),
    bernoulli_p=_relu_p,
    first_moment=lambda q: _leaky_first_moment(q, 0.0),
    deriv_mean=lambda q: _leaky_deriv_mean(q, 0.0),
    **_PWL,
)
for _name in ("leaky_relu", "prelu"):
    _builtin(
        _name,
        _leaky_relu,
        _d_leaky_relu,
        defaults={"negative_slope": 0.01 if _name == "leaky_relu" else 0.25},
        kinks=lambda negative_slope: (0.0,),
        kernel=_leaky_kernel,
        second_moment=_leaky_second_moment,
        deriv_kernel=_leaky_deriv_kernel,
        first_moment=_leaky_first_moment,
        deriv_mean=_leaky_deriv_mean,
        **_PWL,
    )
_builtin("elu", _elu, _d_elu, defaults={"alpha": 1.0}, kinks=lambda alpha: (0.0,))
_builtin("selu", _selu, _d_selu, kinks=lambda: (0.0,))
_builtin("gelu", _gelu, _d_gelu)
_builtin("silu", _silu, _d_silu)
_builtin("swish", _silu, _d_silu)
_builtin("softplus", _softplus, _d_softplus)
_builtin("sigmoid", _sigmoid, _d_sigmoid, first_moment=lambda q: 0.5 * jnp.ones_like(q))
_builtin("tanh", _tanh, _d_tanh, first_moment=_zero_mean)
_builtin(
    "hard_tanh",
    _hard_tanh,
    _d_hard_tanh,
    kinks=lambda: (-1.0, 1.0),
    second_moment=_hard_tanh_second_moment,
    bernoulli_p=_hard_tanh_p,
    first_moment=_zero_mean,
    deriv_mean=_hard_tanh_p,
    **_PWL,
)
_builtin(
    "erf",
    _erf,
    _d_erf,
    kernel=_erf_kernel,
    second_moment=_erf_second_moment,
    deriv_kernel=_erf_deriv_kernel,
    first_moment=_zero_mean,
    deriv_mean=_erf_deriv_mean,
)
_builtin(
    "sin",
    _sin,
    _d_sin,
    kernel=_sin_kernel,
    second_moment=_sin_second_moment,
    deriv_kernel=_sin_deriv_kernel,
    first_moment=_zero_mean,
    deriv_mean=_sin_deriv_mean,
)


def names() -> tuple[str, ...]:
    """The catalog's activation names, sorted."""
    return tuple(sorted(_CATALOG))


def get(name: str | Activation, **params: float) -> Activation:
    """Look up an activation by name, e.g. ``get("leaky_relu", negative_slope=0.2)``.

    Passing an :class:`Activation` returns it unchanged (parameters not allowed).
    ``"prefix:base"`` names a transformed activation (:func:`register_transform`), e.g.
    ``get("dks:tanh", depth=50, zeta=1.5)`` or ``get("tat:leaky_relu", depth=50, eta=0.9)``
    (:mod:`isometry.shaping`).

    Raises:
        ValueError: unknown name (the message lists the known ones) or bad parameters.
    """
    if isinstance(name, Activation):
        if params:
            raise ValueError("get: parameters cannot be applied to an Activation instance")
        return name
    if not isinstance(name, str):
        raise TypeError(f"activation must be a name or an Activation, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    prefix, colon, base = key.partition(":")
    if colon and prefix in _TRANSFORMS:
        return _TRANSFORMS[prefix](base, **params)
    if key not in _CATALOG:
        transforms = ", ".join(f"{p}:<name>" for p in sorted(_TRANSFORMS))
        raise ValueError(
            f"unknown activation {name!r}; known: {', '.join(names())}"
            + (f"; transformed: {transforms}" if transforms else "")
        )
    return _CATALOG[key](**params)


def custom(
    name: str,
    fn: Callable[[Array], Array],
    deriv: Callable[[Array], Array] | None = None,
    kinks: tuple[float, ...] = (),
) -> Activation:
    """Wrap any elementwise JAX function as an :class:`Activation`.

    Args:
        name: a label (used in plots and errors).
        fn: ``phi``, elementwise, written with ``jax.numpy``.
        deriv: ``phi'``; when omitted it is ``jax.grad(fn)`` applied elementwise.
        kinks: points where ``phi`` or ``phi'`` is not smooth, so quadrature
            splits its panels there.

    Two calls with the same function object compare equal.
    """
    if not callable(fn):
        raise TypeError(f"custom: fn must be callable, got {type(fn).__name__}")
    return Activation(
        name=name,
        fn=_Unary(fn),
        deriv=_Unary(deriv) if deriv is not None else _UnaryGrad(fn),
        kinks=tuple(float(k) for k in kinks),
    )


@dataclasses.dataclass(frozen=True)
class _Unary:
    """Adapts a one-argument function to the ``fn(x, **params)`` convention."""

    f: Callable

    def __call__(self, x, **params):
        return self.f(jnp.asarray(x, dtype=jnp.result_type(x, float)))


@dataclasses.dataclass(frozen=True)
class _UnaryGrad:
    """``phi'`` of a one-argument function by elementwise autodiff."""

    f: Callable

    def __call__(self, x, **params):
        x = jnp.asarray(x, dtype=jnp.result_type(x, float))
        return jnp.vectorize(jax.grad(self.f))(x)
