"""The law of ``d = phi'(h)^2``, ``h ~ N(0, q*)``: the measure free probability composes.

:func:`d2_law` gives it as a discrete measure (closed forms for ReLU-like and
leaky-ReLU laws, quadrature nodes otherwise), with its moments ``mu_k = E[d^k]``;
:func:`m_of_u` and :func:`m_of_u_cells` its moment generating function
``M_{D^2}(u) = E[d / (u - d)]``; :func:`s_transform` one layer's S-transform;
:func:`setup` the checks of the arguments every public function takes.
Float64 throughout (:func:`host_eval`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from isometry import gaussian as gs
from isometry import initializers, validate
from isometry.activations import Activation
from isometry.activations import get as get_activation

__all__ = [
    "CHECK_QUADRATURE",
    "LAW_QUADRATURE",
    "RUN_ONCE",
    "WEIGHTS",
    "WEIGHT_EXPONENT",
    "D2Law",
    "d2_law",
    "d_moments",
    "host_eval",
    "law_arrays",
    "m_of_u",
    "m_of_u_cells",
    "s_transform",
    "setup",
    "uniform_cells",
]

Array = jax.Array


WEIGHTS = ("gaussian", "orthogonal")
WEIGHT_EXPONENT = {"gaussian": 1, "orthogonal": 0}
"""``s`` of ``S_W(m) = 1 / (sigma_w2 (1 + m)^s)`` for each ensemble of ``weights``."""

LAW_QUADRATURE = gs.Quadrature(points=12, panels=24)
"""Rule whose nodes discretize the law of ``d = phi'(h)^2`` for smooth activations."""
CHECK_QUADRATURE = gs.Quadrature(points=10, panels=18)
"""A second, independent rule: where the two disagree at the solution, the law is unresolved."""


# --------------------------------------------------------------------------- #
# The law of D^2.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class D2Law:
    """The law of ``d = phi'(h)^2``, ``h ~ N(0, q*)``, as a discrete measure.

    Attributes:
        nodes: ``(K,)`` positive values of ``d`` (zero values are dropped:
            they do not enter ``M_{D^2}``).
        weights: ``(K,)`` their probabilities.
        zero_mass: ``P(d = 0)``.
        atoms: ``((a, p_a), ...)`` exact atoms of ``d`` at ``a > 0``.
        exact: True for the closed-form (finite) laws.
        mu: ``(mu_1, mu_2, ...)``, ``mu_k = E[d^k]`` (accurate quadrature).
    """

    nodes: np.ndarray
    weights: np.ndarray
    zero_mass: float
    atoms: tuple[tuple[float, float], ...]
    exact: bool
    mu: tuple[float, ...]

    def __hash__(self):
        return id(self)


def _check_q(q_star):
    validate.real_array("q_star", q_star, minimum=0.0, strict=True)
    if np.ndim(q_star) != 0:
        raise ValueError(f"q_star must be a scalar, got shape {np.shape(q_star)}")
    return float(q_star)


_MOMENT_ORDER = 8
"""Moments ``mu_1 .. mu_8`` come from one compiled program per activation (sliced to the order)."""


def host_eval():
    """The context of every host-side theory number here: float64, evaluated at once.

    ``jax.core.eval_context`` evaluates also under an outer ``jit`` trace (a traced
    grid) without changing the compilation cache's key, unlike
    ``jax.ensure_compile_time_eval``: each program compiles once for every caller.
    """
    stack = contextlib.ExitStack()
    stack.enter_context(jax.enable_x64(True))
    stack.enter_context(jax.core.eval_context())
    return stack


def _hashable(x) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def _bernoulli_p(act, q) -> float:
    """``P(phi'(sqrt(q) z)^2 = 1)`` of a Bernoulli law of ``d`` (``act.bernoulli_p``)."""
    with host_eval():
        return float(act.bernoulli_p(np.float64(q), **act.kwargs))


def d_moments(act, q, order):
    """``(mu_1, ..., mu_order)``, ``mu_k = E[phi'(sqrt(q) z)^(2k)]``, as floats
    (a Bernoulli law: ``mu_k = p``, no program)."""
    if act.bernoulli_p is not None:
        return (_bernoulli_p(act, q),) * order
    n = max(order, _MOMENT_ORDER)
    with host_eval():
        q = np.float64(q)
        mu = _moment_table(act, q, n) if _hashable(act) else _moment_table.__wrapped__(act, q, n)
        return tuple(float(m) for m in np.asarray(mu)[:order])


RUN_ONCE = {"xla_backend_optimization_level": 0}
"""Compiler options of small programs that run a few times per law (the moments, the edge
search): XLA's CPU optimization level 0 compiles them about 30% faster (measured: 0.45 s ->
0.27 s and 0.44 s -> 0.30 s), costs 0.6 ms more per edge search, and agrees with the default
build to 2e-15 relative (not used for the laws' nodes, where ``tanh'`` near 0 moves by 1e-7)."""


@functools.partial(jax.jit, static_argnames=("act", "order"), compiler_options=RUN_ONCE)
def _moment_table(act, q, order):
    """``(order,)`` the moments ``mu_1 .. mu_order`` at the scalar ``q``."""
    return jnp.stack([gs.dphi_moment(act, q, k) for k in range(1, order + 1)])


def d2_law(act: Activation | str, q_star, *, quad: gs.Quadrature | None = None, order: int = 8):
    """The law of ``d = phi'(sqrt(q*) z)^2`` used by the solver (see :class:`D2Law`).

    Closed forms for ReLU / hard-tanh / linear (Bernoulli) and leaky ReLU /
    PReLU (two values); otherwise quadrature nodes of ``quad``
    (default :data:`LAW_QUADRATURE`).
    """
    act = get_activation(act)
    q = _check_q(q_star)
    try:
        return _d2_law_cached(act, q, quad or LAW_QUADRATURE, order)
    except TypeError:  # an activation that is not hashable: no cache
        return _d2_law(act, q, quad or LAW_QUADRATURE, order)


@functools.lru_cache(maxsize=128)
def _d2_law_cached(act, q, quad, order):
    return _d2_law(act, q, quad, order)


def _d2_law(act, q, quad, order):
    mu = d_moments(act, q, order)
    if act.bernoulli_p is not None:
        p = mu[0]
        return D2Law(np.array([1.0]), np.array([p]), 1.0 - p, ((1.0, p),), True, mu)
    if act.name in ("leaky_relu", "prelu"):
        a2 = act.kwargs["negative_slope"] ** 2
        if a2 == 0.0:
            return D2Law(np.array([1.0]), np.array([0.5]), 0.5, ((1.0, 0.5),), True, mu)
        if a2 == 1.0:
            return D2Law(np.array([1.0]), np.array([1.0]), 0.0, ((1.0, 1.0),), True, mu)
        return D2Law(
            np.array([1.0, a2]), np.array([0.5, 0.5]), 0.0, ((1.0, 0.5), (a2, 0.5)), True, mu
        )
    with host_eval():
        nodes = _law_nodes if _hashable(act) else _law_nodes.__wrapped__
        dphi, w = nodes(act, np.float64(q), quad)
    d = np.asarray(dphi, dtype=np.float64) ** 2
    w = np.asarray(w, dtype=np.float64)
    w = w / w.sum()
    zero = float(w[d == 0.0].sum())
    keep = d > 0.0
    d, w = d[keep], w[keep]
    # Exact atoms: phi' constant on a panel run (SELU, ELU on h > 0).
    values, inverse, counts = np.unique(d, return_inverse=True, return_counts=True)
    mass = np.bincount(inverse, weights=w)
    atoms = tuple(
        (float(a), float(pa)) for a, pa, c in zip(values, mass, counts, strict=True) if c > 2
    )
    return D2Law(d, w, zero, atoms, False, mu)


@functools.partial(jax.jit, static_argnames=("act", "quad"))
def _law_nodes(act, q, quad):
    """``(phi'(sqrt(q) z_i) (n,), w_i (n,))`` on the nodes of ``quad`` (one program per rule)."""
    z, w = gs.nodes([(0.0, jnp.sqrt(q), quad.features(act.kinks))], quad)
    return act.dphi(jnp.sqrt(q) * z), w


def law_arrays(law):
    """``(nodes (K,), weights (K,))`` of a :class:`D2Law` as float64 JAX arrays."""
    return jnp.asarray(law.nodes, jnp.float64), jnp.asarray(law.weights, jnp.float64)


# --------------------------------------------------------------------------- #
# Its moment generating function M_{D^2}, and one layer's S-transform.
# --------------------------------------------------------------------------- #


def m_of_u(u, nodes, w):
    """``(M_{D^2}(u), C(u))`` for the discrete law; ``u`` any shape.

        M_{D^2}(u) = sum_k w_k d_k / (u - d_k),    C(u) = sum_k w_k u / (u - d_k)

    over the positive nodes, so ``1 + M_{D^2}(u) = P(d = 0) + C(u)``. ``C`` is
    summed directly: near the bottom of the spectrum (``lambda -> 0``,
    ``u -> 0``) ``M -> -(1 - P(d = 0))`` and forming ``1 + M`` from ``M``
    would cancel every digit.
    """
    du = u[..., None] - nodes
    return jnp.sum(w * nodes / du, axis=-1), jnp.sum(w * u[..., None] / du, axis=-1)


def m_of_u_cells(u, a, b, w):
    """``M_{D^2}(u)`` for a mixture of uniform laws on ``[a_i, b_i]`` with masses ``w_i``.

    Per cell ``E[d / (u - d)] = -1 + u log((u - a) / (u - b)) / (b - a)``
    ``= -1 + u / (u - b) * log1p(delta) / delta``, ``delta = (b - a) / (u - b)``;
    exact up to the real axis (Plemelj), so it resolves ``u`` near the support of ``d``.
    Returns ``(M_{D^2}(u), C(u))`` with ``C = 1 + M = sum_i w_i u / (u - b_i) log1p(delta) / delta``
    summed directly (see :func:`m_of_u`; the cells carry no mass at ``d = 0``).
    """
    u = u[..., None]
    ub = u - b
    delta = (b - a) / ub
    small = jnp.abs(delta) < 1e-3
    safe = jnp.where(small, 0.5, delta)
    ratio = jnp.where(
        small,
        1.0 - delta / 2 + delta**2 / 3 - delta**3 / 4,
        jnp.log1p(safe) / safe,
    )
    return jnp.sum(w * (-1.0 + u / ub * ratio), axis=-1), jnp.sum(w * (u / ub * ratio), axis=-1)


@functools.partial(jax.jit, static_argnames=("act",))
def _dphi(act, x):
    return act.dphi(x)


@functools.lru_cache(maxsize=64)
def uniform_cells(act, q, n):
    """The law of ``d`` as a mixture of uniforms: ``n`` cells uniform in ``z`` on [-9, 9]
    (plus the kinks as edges), each with its exact Gaussian mass."""
    from math import erf, sqrt

    c = 9.0
    edges = np.linspace(-c, c, n + 1)
    kz = [k / sqrt(q) for k in act.kinks if abs(k / sqrt(q)) < c]
    edges = np.unique(np.concatenate([edges, kz]))
    cdf = np.array([0.5 * (1.0 + erf(x / sqrt(2.0))) for x in edges])
    w = np.diff(cdf)
    lo, hi = edges[:-1], edges[1:]
    eps = 1e-9 * (hi - lo)
    with host_eval():
        a = np.asarray(_dphi(act, sqrt(q) * (lo + eps))) ** 2
        b = np.asarray(_dphi(act, sqrt(q) * (hi - eps))) ** 2
    w = w / w.sum()
    return a, b, w


def s_transform(act: Activation | str, q_star, weights: str, m, sigma_w2=None):
    """``S_W(m) S_{D^2}(m)``: one layer's S-transform, for real ``m`` near 0 or complex ``m``.

    Computed as ``(1 + m) / (m z_D) * S_W(m)`` with ``M_{D^2}(z_D) = m`` by
    Newton's method from ``z_D ~ mu1 / m + mu2 / mu1`` (small ``|m|``).
    Shapes: ``m`` any; returns ``m``'s shape (complex).
    """
    act = get_activation(act)
    weights = _check_weights(weights)
    law = d2_law(act, q_star)
    sw = _sigma(act, q_star, sigma_w2)
    with jax.enable_x64(True):
        m = jnp.asarray(m, jnp.complex128)
        nodes, w = jnp.asarray(law.nodes), jnp.asarray(law.weights)
        u = law.mu[0] / m + law.mu[1] / law.mu[0]
        for _ in range(60):
            mm, _ = m_of_u(u, nodes, w)
            dm = -jnp.sum(w * nodes / (u[..., None] - nodes) ** 2, axis=-1)
            u = u - (mm - m) / dm
        s_d = (1 + m) / (m * u)
        s_w = 1.0 / (sw * (1 + m)) if weights == "gaussian" else 1.0 / sw + 0 * m
        return s_w * s_d


# --------------------------------------------------------------------------- #
# The arguments of every public function.
# --------------------------------------------------------------------------- #


def _check_weights(weights):
    if not isinstance(weights, str):
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    key = weights.strip().lower()
    return validate.choice("weights", key, WEIGHTS)


def _check_depth(depth):
    return validate.positive_int("depth", depth)


def _sigma(act, q_star, sigma_w2):
    """``sigma_w2`` as given, or that of the critical point of ``q*`` (the shared resolver)."""
    if sigma_w2 is None:
        with host_eval():
            return initializers.critical_variances(act, np.float64(q_star)).sigma_w2
    validate.real_array("sigma_w2", sigma_w2, minimum=0.0, strict=True)
    if np.ndim(sigma_w2) != 0:
        raise ValueError(f"sigma_w2 must be a scalar, got shape {np.shape(sigma_w2)}")
    return float(sigma_w2)


def setup(act, q_star, depth, weights, sigma_w2):
    """The checked ``(activation, q*, depth, weights, sigma_w2)`` of a public call; ``sigma_w2``
    defaults to the critical point of ``q*``."""
    act = get_activation(act)
    q = _check_q(q_star)
    depth = _check_depth(depth)
    weights = _check_weights(weights)
    sw = _sigma(act, q, sigma_w2)
    return act, q, depth, weights, sw
