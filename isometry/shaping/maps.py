"""What a shaping transform is, and the mean-field route that checks one.

:class:`ShapedActivation` is an :class:`~isometry.activations.Activation`
``phi_hat(x) = gamma (phi(alpha x + beta) + delta)`` carrying its
:class:`Transform` (what was solved for, and the residual of every condition).
:func:`local_maps` evaluates the local Q/C-map quantities of any activation at
``q = 1`` with the mean-field functions (:mod:`isometry.gaussian`,
:mod:`isometry.meanfield`); :func:`compound_c_map` iterates its C-map;
:func:`checked` attaches the residuals to a solution, or raises
:class:`ShapingError`: a transform is never returned silently wrong.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from isometry import activations, gaussian, meanfield, validate
from isometry.activations import Activation

__all__ = [
    "LOCAL_KEYS",
    "NORMALIZED_TOLERANCE",
    "TOLERANCE",
    "ShapedActivation",
    "ShapingError",
    "Transform",
    "checked",
    "compound_c_map",
    "local_maps",
    "shaped",
]

TOLERANCE = 1e-8
"""Largest accepted residual of any shaping condition (float64, toolkit quadrature)."""

NORMALIZED_TOLERANCE = 1e-6
"""Largest ``|Q(1) - 1|`` of an activation taken as normalized by :func:`compound_c_map`."""

LOCAL_KEYS = ("Q1", "Q_slope", "mean", "C_slope", "C_curv", "Cf0")
"""What :func:`local_maps` can evaluate."""


class ShapingError(ValueError):
    """The solver found no transform meeting the conditions to :data:`TOLERANCE`."""


@dataclasses.dataclass(frozen=True)
class Transform:
    """What a shaping transform solved for and how well the result meets its conditions.

    Attributes:
        method: ``"dks"`` or ``"tat"`` (smooth: ``tau``; leaky ReLU: ``eta``).
        base: the untransformed activation (leaky ReLU: with the solved ``negative_slope``).
        depth: ``L``, the number of nonlinear layers of a plain chain; ``None`` when the
            conditions were imposed through a ``subnet_max_func``.
        target: ``zeta`` (DKS), ``tau`` (smooth TAT) or ``eta`` (leaky-ReLU TAT).
        alpha, beta, gamma, delta: ``phi_hat(x) = gamma (phi(alpha x + beta) + delta)``.
        negative_slope: leaky ReLU's slope ``a`` (``None`` otherwise).
        residuals: ``(condition, value - target)`` pairs, evaluated by the mean-field
            route on the returned activation (all below :data:`TOLERANCE` in magnitude).
        local_target: the per-layer target the network-level one became: ``C'(1)``
            (DKS), ``C''(1)`` (smooth TAT); ``None`` for leaky-ReLU TAT.
        subnet_max_func: the function the conditions were imposed through (``None``:
            the plain chain of ``depth`` layers).
    """

    method: str
    base: Activation
    depth: int | None
    target: float
    alpha: float
    beta: float
    gamma: float
    delta: float
    negative_slope: float | None = None
    residuals: tuple[tuple[str, float], ...] = ()
    local_target: float | None = None
    subnet_max_func: object = dataclasses.field(default=None, compare=False)

    @property
    def max_residual(self) -> float:
        return max(abs(v) for _, v in self.residuals)


@dataclasses.dataclass(frozen=True, repr=False)
class ShapedActivation(Activation):
    """An :class:`~isometry.activations.Activation` made by ``shaping.dks`` or ``shaping.tat``.

    Works wherever an activation is accepted; ``transform`` reports its
    parameters and the conditions' residuals (:class:`Transform`). Equality and
    hashing ignore ``transform`` (it is determined by the rest), so compiled
    functions that take the activation as a static argument are reused.
    """

    transform: Transform | None = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass(frozen=True)
class _Affine:
    """``phi_hat(x) = gamma (f(alpha x + beta) + delta)`` (``f`` = ``base.phi``)."""

    base: Activation

    def __call__(self, x, alpha, beta, gamma, delta):
        return gamma * (self.base.phi(alpha * x + beta) + delta)


@dataclasses.dataclass(frozen=True)
class _AffineDeriv:
    """``phi_hat'(x) = gamma alpha phi'(alpha x + beta)``."""

    base: Activation

    def __call__(self, x, alpha, beta, gamma, delta):
        return gamma * alpha * self.base.dphi(alpha * x + beta)


def shaped(method: str, base: Activation, alpha, beta, gamma, delta) -> ShapedActivation:
    """The activation ``gamma (base(alpha x + beta) + delta)``, named ``"method:base"``."""
    params = {"alpha": alpha, "beta": beta, "gamma": gamma, "delta": delta}
    return ShapedActivation(
        name=f"{method}:{base.name}",
        fn=_Affine(base),
        deriv=_AffineDeriv(base),
        params=tuple(sorted((k, float(v)) for k, v in params.items())),
        kinks=tuple((k - beta) / alpha for k in base.kinks),
        piecewise_linear=base.piecewise_linear,
    )


def local_maps(
    act: Activation | str, depth: int | None = None, *, keys=("Q1", "Q_slope", "mean", "C_slope")
) -> dict[str, jax.Array]:
    """The local Q/C-map quantities ``keys`` of ``act`` at ``q = 1`` (``sigma_w2 = 1``, no
    bias), in float64: 0-d arrays

        Q1 = Q(1) = E[phi(z)^2],  Q_slope = Q'(1) (autodiff of meanfield.q_map_slope),
        mean = E[phi(z)] (C(0) = mean^2 / Q(1)),  C_slope = C'(1) = E[phi'(z)^2] / Q(1),
        C_curv = C''(1) = E[phi''(z)^2] / Q(1),  Cf0 = C_f(0) (needs ``depth`` and a
        normalized activation: :func:`compound_c_map` at 0).

    Every expectation is the toolkit's quadrature (:mod:`isometry.gaussian`);
    only the keys asked for are computed (each compiles for a new activation).
    """
    act = activations.get(act)
    unknown = set(keys) - set(LOCAL_KEYS)
    if unknown:
        raise ValueError(f"local_maps: unknown keys {sorted(unknown)}; allowed: {LOCAL_KEYS}")
    if "Cf0" in keys and depth is None:
        raise ValueError("local_maps: 'Cf0' needs depth")
    with jax.enable_x64(True):
        one = jnp.asarray(1.0, jnp.float64)
        q1 = gaussian.second_moment(act, one)
        terms = {
            "Q1": lambda: q1,
            "Q_slope": lambda: meanfield.q_map_slope(act, one, 1.0, 0.0),
            "mean": lambda: gaussian.expect(act.phi, one, kinks=act.kinks),
            "C_slope": lambda: gaussian.dphi_moment(act, one) / q1,
            "C_curv": lambda: (
                gaussian.expect(lambda x: act.d2phi(x) ** 2, one, kinks=act.kinks) / q1
            ),
            "Cf0": lambda: compound_c_map(act, 0.0, depth),
        }
        return {k: terms[k]() for k in keys}


def compound_c_map(act: Activation | str, c, depth: int) -> jax.Array:
    """``C_f(c) = C^L(c)``: :func:`isometry.meanfield.iterate_c_map` of ``depth`` layers at
    ``q = 1``, ``sigma_w2 = 1``, no bias (float64). ``c`` any shape; returns ``c``'s shape.

    The compound C-map of Martens et al. 2021 (arXiv 2110.01765, section 3) holds
    the length at ``q = 1``, so the activation must be normalized, ``Q(1) =
    E[phi(z)^2] = 1`` (within :data:`NORMALIZED_TOLERANCE`), as the activations
    of ``shaping.dks`` and ``shaping.tat`` are. ``depth = 1`` is the local C-map.

    Raises:
        ValueError: ``Q(1) != 1`` (an unshaped activation such as ``"tanh"``: its
            Q-map does not fix 1, the layers' length drifts away from 1 and ``C^L``
            at ``q = 1`` is not its network's compound map).
    """
    act = activations.get(act)
    depth = validate.positive_int("depth", depth)
    with jax.enable_x64(True):
        _check_normalized(act)
        c = jnp.asarray(c, jnp.float64)
        return meanfield.iterate_c_map(act, c, 1.0, 1.0, 0.0, depth)[-1]


def _check_normalized(act: Activation) -> None:
    """``Q(1) = E[phi(z)^2]`` is 1 (where concrete), else a ``ValueError`` saying how to shape."""
    q1 = gaussian.second_moment(act, jnp.asarray(1.0, jnp.float64))
    if not validate.is_concrete(q1) or abs(float(q1) - 1.0) <= NORMALIZED_TOLERANCE:
        return
    raise ValueError(
        f"compound_c_map: activation {act.name!r} is not normalized: its Q-map does not fix 1 "
        f"(Q(1) = E[phi(z)^2] = {float(q1):.6g}), so the compound C-map at q = 1 is not its "
        f"network's; use a shaped activation, shaping.dks({act.name!r}, depth) or "
        f"shaping.tat({act.name!r}, depth), or one with E[phi(z)^2] = 1"
    )


def checked(act: ShapedActivation, transform: Transform, conditions, extra=()) -> ShapedActivation:
    """``act`` with ``transform`` and its residuals attached; raises :class:`ShapingError` if
    any exceeds :data:`TOLERANCE`.

    ``conditions``: ``(name, (local_maps key, target))`` pairs, evaluated on ``act`` by
    the mean-field route; ``extra``: ``(name, residual_fn)`` pairs, ``residual_fn(act) ->
    float`` (conditions through a ``subnet_max_func``).
    """
    m = local_maps(act, transform.depth, keys=tuple(key for _, (key, _) in conditions))
    residuals = tuple((name, float(m[key]) - target) for name, (key, target) in conditions)
    residuals += tuple((name, float(fn(act))) for name, fn in extra)
    transform = dataclasses.replace(transform, residuals=residuals)
    bad = [(n, v) for n, v in residuals if not abs(v) <= TOLERANCE]
    if bad:
        where = f"depth={transform.depth}" if transform.depth is not None else "subnet_max_func"
        raise ShapingError(
            f"{transform.method}({transform.base.name}, {where}, target={transform.target}): "
            f"the solution misses {bad} (tolerance {TOLERANCE:g})"
        )
    return dataclasses.replace(act, transform=transform)
