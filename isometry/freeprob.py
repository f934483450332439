"""Free-probability theory of the spectrum of the input-output Jacobian.

For a depth-``L`` network ``J = prod_l D^l W^l`` with ``D^l = diag phi'(h^l)``,
``h^l ~ N(0, q*)``, free probability predicts the law of the eigenvalues of
``J J^T`` (the squared singular values of ``J``) in the wide limit
(Pennington, Schoenholz & Ganguli 2017, 2018). S-transforms multiply:

    S_{J J^T}(m) = (S_W(m) S_{D^2}(m))^L
    S_W(m)       = 1 / (sigma_w2 (1 + m))     Gaussian weights   (s1 = -1)
    S_W(m)       = 1 / sigma_w2               orthogonal weights (s1 = 0)
    S_{D^2}(m)   = (1 + m) / (m z_D),  M_{D^2}(z_D) = m,  M_{D^2}(z) = E[d / (z - d)],

with ``d = phi'(h)^2``. The moment generating function ``M(z) = z G(z) - 1`` of
``J J^T`` solves ``z = (1 + m) / (m S_{J J^T}(m))`` at ``m = M(z)``; the
density is ``rho(lambda) = -(1/pi) Im G(lambda + i0)``.

The law of ``d``:

* ReLU, hard-tanh, linear: Bernoulli, ``d = 1`` with probability ``p``
  (closed form ``Activation.bernoulli_p``), else 0;
* leaky ReLU / PReLU with slope ``a``: ``d`` in ``{1, a^2}``, each with probability 1/2;
* any other activation: the composite Gauss-Legendre rule of
  :mod:`isometry.gaussian` as a discrete measure on ``d(sqrt(q*) z)``
  (:data:`LAW_QUADRATURE`, 480 nodes), exact where ``phi'`` is constant on a
  half-line (SELU, ELU: an atom of ``d``).

Solver. For each ``lambda`` the unknown is the subordination point
``u = z_D`` (upper half plane), written as ``v = log u``; with ``m = M_{D^2}(u)``

    F(v) = log(1 + m) - log m + L [log sigma_w2 + log m + log u + (s - 1) log(1 + m)]
           - log z = 0                          (s = 1 Gaussian, 0 orthogonal)

is the logarithm of the S-transform equation, so depth enters as ``L log S``
and depth 1,000 is as well conditioned as depth 1. Principal logarithms are
exact on the physical branch (``u`` in C+, ``m`` in C- for ``z`` in C+).
Newton's method follows ``z = lambda + i eta`` from ``eta`` far outside the
support (``m ~ m1 / z``) down to ``eta = 1e-13 x edge`` in geometric steps:
every step starts inside the basin of the physical root, so no other branch
is picked up, and all grid points are solved at once (vectorized, jittable).
Atoms (at zero: mass ``1 - p``; for orthogonal weights at ``sigma_w2^L a^L``
for an atom ``a`` of ``d`` of mass ``p_a``: ``max(0, 1 - L (1 - p_a))``) are
reported separately and subtracted from the density.

A grid point where Newton's residual stays above tolerance, or where the
discrete law of ``d`` does not resolve ``M_{D^2}`` at the solution (the
subordination point close to the support of ``d``: depth 1 with orthogonal
weights, where ``J J^T = sigma_w2 D^2``, is the typical case), is reported:
``converged`` is False there, the density is NaN there, and the public
functions raise :class:`SolverError` naming the points unless
``on_failure="nan"``.

Precision and return types. Every computation here runs in float64 (the
Newton solver, the edge search and the moment series need it; they enable
float64 locally with ``jax.enable_x64``), and every public result is a JAX
array of dtype float64 made under that local switch, whatever the global
``jax_enable_x64`` says: :func:`max_eigenvalue` returns a 0-d array, like the
fields of :class:`JacobianMoments` and :class:`SpectralDensity`; use
``float(...)`` or ``.astype`` to convert. The one exception is
:class:`SpectralLaw`, a tabulated law built on the host for comparison with
measured spectra, which holds NumPy float64 arrays and Python floats.

References:
    Pennington, Schoenholz & Ganguli 2017, "Resurrecting the sigmoid in deep
    learning through dynamical isometry: theory and practice" (NeurIPS).
    Pennington, Schoenholz & Ganguli 2018, "The emergence of spectral
    universality in deep networks" (AISTATS).
    Voiculescu, Dykema & Nica 1992, "Free random variables" (S-transform).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from isometry import gaussian as gs
from isometry import initializers, validate
from isometry.activations import Activation
from isometry.activations import get as get_activation

__all__ = [
    "LAW_QUADRATURE",
    "D2Law",
    "JacobianMoments",
    "SolverError",
    "SpectralDensity",
    "SpectralLaw",
    "d2_law",
    "jacobian_moments",
    "max_eigenvalue",
    "s_transform",
    "sample_spectral_law",
    "singular_value_density",
    "spectral_atoms",
    "spectral_density",
    "spectral_law",
]

Array = jax.Array

WEIGHTS = ("gaussian", "orthogonal")
_S = {"gaussian": 1, "orthogonal": 0}

LAW_QUADRATURE = gs.Quadrature(points=12, panels=24)
"""Rule whose nodes discretize the law of ``d = phi'(h)^2`` for smooth activations."""
_CHECK_QUADRATURE = gs.Quadrature(points=10, panels=18)
"""A second, independent rule: where the two disagree at the solution, the law is unresolved."""


class SolverError(ValueError):
    """The density solver did not converge (or did not resolve) at some grid points."""


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


def _host_eval():
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
    with _host_eval():
        return float(act.bernoulli_p(np.float64(q), **act.kwargs))


def _moments(act, q, order):
    """``(mu_1, ..., mu_order)``, ``mu_k = E[phi'(sqrt(q) z)^(2k)]``, as floats
    (a Bernoulli law: ``mu_k = p``, no program)."""
    if act.bernoulli_p is not None:
        return (_bernoulli_p(act, q),) * order
    n = max(order, _MOMENT_ORDER)
    with _host_eval():
        q = np.float64(q)
        mu = _moment_table(act, q, n) if _hashable(act) else _moment_table.__wrapped__(act, q, n)
        return tuple(float(m) for m in np.asarray(mu)[:order])


_RUN_ONCE = {"xla_backend_optimization_level": 0}
"""Compiler options of small programs that run a few times per law (the moments, the edge
search): XLA's CPU optimization level 0 compiles them about 30% faster (measured: 0.45 s ->
0.27 s and 0.44 s -> 0.30 s), costs 0.6 ms more per edge search, and agrees with the default
build to 2e-15 relative (not used for the laws' nodes, where ``tanh'`` near 0 moves by 1e-7)."""


@functools.partial(jax.jit, static_argnames=("act", "order"), compiler_options=_RUN_ONCE)
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
    mu = _moments(act, q, order)
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
    with _host_eval():
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
            mm, _ = _m_of_u(u, nodes, w)
            dm = -jnp.sum(w * nodes / (u[..., None] - nodes) ** 2, axis=-1)
            u = u - (mm - m) / dm
        s_d = (1 + m) / (m * u)
        s_w = 1.0 / (sw * (1 + m)) if weights == "gaussian" else 1.0 / sw + 0 * m
        return s_w * s_d


# --------------------------------------------------------------------------- #
# Validation helpers.
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
        with _host_eval():
            return initializers.critical_variances(act, np.float64(q_star)).sigma_w2
    validate.real_array("sigma_w2", sigma_w2, minimum=0.0, strict=True)
    if np.ndim(sigma_w2) != 0:
        raise ValueError(f"sigma_w2 must be a scalar, got shape {np.shape(sigma_w2)}")
    return float(sigma_w2)


def _setup(act, q_star, depth, weights, sigma_w2):
    act = get_activation(act)
    q = _check_q(q_star)
    depth = _check_depth(depth)
    weights = _check_weights(weights)
    sw = _sigma(act, q, sigma_w2)
    return act, q, depth, weights, sw


# --------------------------------------------------------------------------- #
# Moments.
# --------------------------------------------------------------------------- #


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class JacobianMoments:
    """Moments of the eigenvalue law of ``J J^T``.

    Attributes:
        mean: ``m1 = (sigma_w2 mu1)^L``.
        second_moment: ``m2 = m1^2 [1 + L (mu2 / mu1^2 - 1 - s1)]``.
        variance: ``m2 - m1^2`` (``L (mu2/mu1^2 - 1 - s1)`` at criticality).
        moments: ``(order,)`` array ``m_1 .. m_order`` from the S-transform series.
    """

    mean: Array
    second_moment: Array
    variance: Array
    moments: Array


def _series_inverse(a, order):
    """Compositional inverse of ``f(x) = sum_{k>=1} a[k] x^k`` (``a[0] = 0``), truncated."""
    # Newton iteration on power series: solve f(g(y)) = y.
    g = np.zeros(order + 1)
    g[1] = 1.0 / a[1]
    for _ in range(order + 2):
        fg = _compose(a, g, order)
        dfg = _compose(_deriv(a), g, order)
        r = fg.copy()
        r[1] -= 1.0
        g = g - _mul(r, _inv(dfg, order), order)
    return g


def _mul(a, b, order):
    return np.convolve(a, b)[: order + 1]


def _inv(a, order):
    out = np.zeros(order + 1)
    out[0] = 1.0 / a[0]
    for k in range(1, order + 1):
        out[k] = -np.dot(a[1 : k + 1], out[k - 1 :: -1][:k]) / a[0]
    return out


def _deriv(a):
    d = np.zeros_like(a)
    d[:-1] = a[1:] * np.arange(1, len(a))
    return d


def _compose(a, g, order):
    out = np.zeros(order + 1)
    power = np.zeros(order + 1)
    power[0] = 1.0
    for k in range(order + 1):
        out += a[k] * power
        power = _mul(power, g, order)
    return out


def _log_series(a, order):
    """``log(a(x))`` for ``a[0] > 0``."""
    b = a / a[0]
    da = _deriv(b)
    out = np.zeros(order + 1)
    out[1:] = (_mul(da, _inv(b, order), order)[:order]) / np.arange(1, order + 1)
    out[0] = math.log(a[0])
    return out


def _exp_series(a, order):
    out = np.zeros(order + 1)
    out[0] = 1.0
    da = _deriv(a)
    for k in range(1, order + 1):
        out[k] = np.dot(da[:k], out[k - 1 :: -1][:k]) / k
    return out * math.exp(a[0])


def _moment_series(mu, depth, s, sw, order):
    """``m_1..m_order`` of ``J J^T`` from ``mu_1..mu_order`` of ``d``, by series.

    With ``psi(x) = sum m_k x^k = M(1/x)``, its inverse is
    ``chi(m) = m S(m) / (1 + m)``; ``S_J = (S_W S_D)^L`` is formed as
    ``exp(L log(S_W S_D))``.
    """
    psi_d = np.zeros(order + 2)
    psi_d[1:] = mu[: order + 1]
    chi_d = _series_inverse(psi_d, order + 1)  # chi_d(m) = m S_D(m)/(1+m)
    # S_D(m) = chi_d(m) (1 + m) / m
    s_d = _mul(chi_d[1:], np.array([1.0, 1.0]), order)
    # S_W(m) = 1/(sw (1+m)^s)
    one_plus = np.zeros(order + 1)
    one_plus[:2] = 1.0
    s_w = _inv(one_plus, order) / sw if s == 1 else np.eye(1, order + 1)[0] / sw
    layer = _mul(s_w, s_d, order)
    s_j = _exp_series(depth * _log_series(layer, order), order)
    # chi_J(m) = m S_J(m) / (1 + m)
    chi_j = np.zeros(order + 1)
    chi_j[1:] = _mul(s_j, _inv(one_plus, order), order)[:order]
    psi_j = _series_inverse(chi_j, order)
    return psi_j[1:]


def jacobian_moments(
    act: Activation | str, q_star, depth: int, weights: str, sigma_w2=None, *, order: int = 4
) -> JacobianMoments:
    """Moments of the eigenvalues of ``J J^T`` for a depth-``depth`` network at ``q*``.

        m1 = (sigma_w2 mu1)^L,   m2 = m1^2 [1 + L (mu2 / mu1^2 - 1 - s1)],
        mu_k = E_z[phi'(sqrt(q*) z)^(2k)],   s1 = -1 (Gaussian), 0 (orthogonal).

    Higher moments (``moments``, up to ``order``) come from the power series
    of ``S_{J J^T} = (S_W S_{D^2})^L`` (Pennington, Schoenholz & Ganguli
    2018, eqs. 14-18). ``sigma_w2`` defaults to the critical point for ``q*``.

    Raises:
        ValueError: ``q_star <= 0``, ``depth < 1``, unknown ``weights``, bad ``sigma_w2``.
    """
    act, q, depth, weights, sw = _setup(act, q_star, depth, weights, sigma_w2)
    order = validate.positive_int("order", order, minimum=2)
    mu = np.array(_moments(act, q, order + 1))
    s1 = -1.0 if weights == "gaussian" else 0.0
    m1 = (sw * mu[0]) ** depth
    m2 = m1**2 * (1.0 + depth * (mu[1] / mu[0] ** 2 - 1.0 - s1))
    ms = _moment_series(mu, depth, _S[weights], sw, order)
    with jax.enable_x64(True):
        return JacobianMoments(
            mean=jnp.asarray(m1),
            second_moment=jnp.asarray(m2),
            variance=jnp.asarray(m2 - m1**2),
            moments=jnp.asarray(ms),
        )


# --------------------------------------------------------------------------- #
# The equation and its Newton solver.
# --------------------------------------------------------------------------- #


def _m_of_u(u, nodes, w):
    """``(M_{D^2}(u), C(u))`` for the discrete law; ``u`` any shape.

        M_{D^2}(u) = sum_k w_k d_k / (u - d_k),    C(u) = sum_k w_k u / (u - d_k)

    over the positive nodes, so ``1 + M_{D^2}(u) = P(d = 0) + C(u)``. ``C`` is
    summed directly: near the bottom of the spectrum (``lambda -> 0``,
    ``u -> 0``) ``M -> -(1 - P(d = 0))`` and forming ``1 + M`` from ``M``
    would cancel every digit.
    """
    du = u[..., None] - nodes
    return jnp.sum(w * nodes / du, axis=-1), jnp.sum(w * u[..., None] / du, axis=-1)


def _m_of_u_cells(u, a, b, w):
    """``M_{D^2}(u)`` for a mixture of uniform laws on ``[a_i, b_i]`` with masses ``w_i``.

    Per cell ``E[d / (u - d)] = -1 + u log((u - a) / (u - b)) / (b - a)``
    ``= -1 + u / (u - b) * log1p(delta) / delta``, ``delta = (b - a) / (u - b)``;
    exact up to the real axis (Plemelj), so it resolves ``u`` near the support of ``d``.
    Returns ``(M_{D^2}(u), C(u))`` with ``C = 1 + M = sum_i w_i u / (u - b_i) log1p(delta) / delta``
    summed directly (see :func:`_m_of_u`; the cells carry no mass at ``d = 0``).
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


class _Params(NamedTuple):
    """The scalars of the equation (float64 arrays, traced: one program serves every
    depth, ensemble and grid range)."""

    zero: Array  # P(d = 0): 1 + M = zero + C
    logsig: Array  # log sigma_w2
    m1: Array  # (sigma_w2 mu1)^L
    mu1: Array
    mu2: Array
    edge: Array  # the right edge of the support
    depth: Array  # L
    s: Array  # 1 Gaussian, 0 orthogonal weights
    levels: Array  # continuation levels (integer)


def _residual(v, logz, law, p: _Params, cells):
    u = jnp.exp(v)
    m, c = _m_of_u_cells(u, *law) if cells else _m_of_u(u, *law)
    lm, l1m = jnp.log(m), jnp.log(p.zero + c)
    layer = p.logsig + lm + v + (p.s - 1) * l1m
    return l1m - lm + p.depth * layer - logz


def _log_lambda_real(t, dmax, nodes, w, depth, s, logsig):
    """``log lambda`` on the real axis at ``u = dmax + exp(t)`` (``m > 0``)."""
    u = dmax + jnp.exp(t)
    m = jnp.sum(w * nodes / (u - nodes))
    return (
        jnp.log1p(m)
        - jnp.log(m)
        + depth * (logsig + jnp.log(m) + jnp.log(u))
        + depth * (s - 1) * jnp.log1p(m)
    )


@functools.partial(jax.jit, compiler_options=_RUN_ONCE)
def _edge(nodes, w, dmax, logsig, depth, s):
    """Minimum over real ``u > dmax`` of ``lambda(u)``: the right edge (log), and the limit flag."""
    f = functools.partial(
        _log_lambda_real, dmax=dmax, nodes=nodes, w=w, depth=depth, s=s, logsig=logsig
    )
    scale = jnp.maximum(dmax, 1e-300)
    ts = jnp.log(scale) + jnp.linspace(-34.0, 25.0, 600)
    vals = jax.vmap(f)(ts)
    vals = jnp.where(jnp.isfinite(vals), vals, jnp.inf)
    i = jnp.argmin(vals)
    lo = ts[jnp.maximum(i - 1, 0)]
    hi = ts[jnp.minimum(i + 1, ts.size - 1)]
    df = jax.grad(f)

    def body(_, ab):
        a, b = ab
        c = 0.5 * (a + b)
        g = df(c)
        return jnp.where(g > 0, a, c), jnp.where(g > 0, c, b)

    a, b = jax.lax.fori_loop(0, 80, body, (lo, hi))
    t = 0.5 * (a + b)
    at_boundary = i == 0
    return jnp.minimum(f(t), vals[i]), at_boundary


_LEVELS_RATIO = 0.25
_NEWTON_PER_LEVEL = 4
_POLISH = 12
_ETA_FLOOR = 1e-13
_TOL = 1e-7  # |F| = |log(z(m) / z)|: relative error of the equation


def _solve(lam, law, p: _Params, cells: bool):
    """Newton continuation in ``eta``; returns ``(C, z, |F|, v)`` per grid point (traced).

    ``C`` as in :func:`_m_of_u` (``1 + M = P(d = 0) + C``); ``cells``: ``law`` is
    ``(a, b, w)`` of :func:`_m_of_u_cells`, else ``(nodes, weights)``.
    """
    scale = jnp.where(lam > 0, jnp.minimum(lam, p.edge), p.edge)
    eta_min = _ETA_FLOOR * scale
    eta0 = 2.0 * (p.edge + jnp.abs(lam))
    z0 = lam + 1j * eta0
    m0 = p.m1 / z0
    u0 = p.mu1 / m0 + p.mu2 / p.mu1
    v0 = jnp.log(u0)

    def res(v, logz):
        return _residual(v, logz, law, p, cells)

    def newton(v, logz):
        f, df = jax.jvp(lambda x: res(x, logz), (v,), (jnp.ones_like(v),))
        step = f / df
        step = jnp.where(jnp.isfinite(step), step, 0.0)
        # Trust region in log u; stay in the upper half plane, 0 < Im v < pi.
        size = jnp.abs(step)
        step = jnp.where(size > 1.0, step / size, step)
        vn = v - step
        im = jnp.imag(vn)
        im = jnp.where(im <= 0.0, 0.5 * jnp.imag(v), im)
        im = jnp.where(im >= jnp.pi, 0.5 * (jnp.imag(v) + jnp.pi), im)
        return jnp.real(vn) + 1j * im

    def level(k, v):
        eta = jnp.maximum(eta0 * _LEVELS_RATIO**k, eta_min)
        logz = jnp.log(lam + 1j * eta)
        return jax.lax.fori_loop(0, _NEWTON_PER_LEVEL, lambda _, x: newton(x, logz), v)

    v = jax.lax.fori_loop(jnp.zeros_like(p.levels), p.levels, level, v0)
    z = lam + 1j * eta_min
    logz = jnp.log(z)
    v = jax.lax.fori_loop(0, _POLISH, lambda _, x: newton(x, logz), v)
    r = jnp.abs(res(v, logz))
    u = jnp.exp(v)
    _, c = _m_of_u_cells(u, *law) if cells else _m_of_u(u, *law)
    return c, z, r, v


def _levels(lam, edge):
    """Continuation levels from ``eta0 = 2 (edge + |lambda|)`` to ``eta_min``."""
    lam = np.abs(np.asarray(lam))
    pos = lam[lam > 0]
    lo = min(float(pos.min()), edge) if pos.size else edge
    hi = edge + float(lam.max())
    n = math.log(2.0 * hi / (_ETA_FLOOR * lo)) / math.log(1.0 / _LEVELS_RATIO)
    return 8 * math.ceil((n + 2) / 8)


_CELLS = 2048


@functools.partial(jax.jit, static_argnames=("act",))
def _dphi(act, x):
    return act.dphi(x)


@functools.lru_cache(maxsize=64)
def _cells(act, q, n):
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
    with _host_eval():
        a = np.asarray(_dphi(act, sqrt(q) * (lo + eps))) ** 2
        b = np.asarray(_dphi(act, sqrt(q) * (hi - eps))) ** 2
    w = w / w.sum()
    return a, b, w


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpectralDensity:
    """A predicted spectral density on a grid.

    Attributes:
        grid: ``(n,)`` the points (eigenvalues of ``J J^T``, or singular values of ``J``).
        density: ``(n,)`` the density of the continuous part there (NaN only
            where ``converged`` is False).
        atom_at_zero: ``()`` the mass at 0 (``1 - p`` for ReLU-like laws).
        atom_locations: ``(k,)`` the other atoms' locations (orthogonal weights
            with an atom of ``d``: ``sigma_w2^L a^L``).
        atom_masses: ``(k,)`` their masses.
        converged: ``(n,)`` Newton converged and the law of ``d`` resolved there.
        residual: ``(n,)`` ``|F|`` of the log S-transform equation.
    """

    grid: Array
    density: Array
    atom_at_zero: Array
    atom_locations: Array
    atom_masses: Array
    converged: Array
    residual: Array


def _atoms(law, depth, weights, sw):
    locs, masses = [], []
    if weights == "orthogonal":
        for a, pa in law.atoms:
            mass = 1.0 - depth * (1.0 - pa)
            if mass > 1e-14:
                locs.append(sw**depth * a**depth)
                masses.append(mass)
    return np.array(locs, dtype=np.float64), np.array(masses, dtype=np.float64)


def _law_arrays(law):
    return jnp.asarray(law.nodes, jnp.float64), jnp.asarray(law.weights, jnp.float64)


def _edge_of(law, depth, weights, sw):
    """The right edge (a float): :func:`_edge` on the host, in one context for every caller."""
    with _host_eval():
        nodes, w = _law_arrays(law)
        dmax = float(law.nodes.max())
        log_edge, at_boundary = _edge(
            nodes, w, np.float64(dmax), np.float64(math.log(sw)), np.float64(depth),
            np.float64(_S[weights]),
        )  # fmt: skip
        edge = math.exp(float(log_edge))
        if bool(at_boundary) and law.exact and weights == "orthogonal":
            edge = (sw * dmax) ** depth  # the atom at the top of the support
    return edge


def max_eigenvalue(act: Activation | str, q_star, depth: int, weights: str, sigma_w2=None) -> Array:
    """The right edge of the support of the eigenvalue law of ``J J^T``.

    The edge is where the real function ``lambda(m) = (1 + m) / (m S_J(m))``,
    ``m > 0``, turns (``d lambda / dm = 0``): the minimum of ``lambda`` over
    the real subordination point ``u = z_D > max d`` (or its limit at
    ``u -> max d``, an atom, for orthogonal weights with an atom of ``d`` at
    its top). Linear Gaussian: ``(L + 1)^(L + 1) / L^L``.
    (Pennington, Schoenholz & Ganguli 2018, sec. 3.) Returns a 0-d float64 array.
    """
    act, q, depth, weights, sw = _setup(act, q_star, depth, weights, sigma_w2)
    with jax.enable_x64(True):
        return jnp.asarray(_edge_of(d2_law(act, q), depth, weights, sw))


def _params(law, sw, depth, weights, edge, levels) -> _Params:
    """The equation's scalars for :func:`_solve` (NumPy float64: no program per value)."""
    f = np.float64
    return _Params(
        zero=f(law.zero_mass),
        logsig=f(math.log(sw)),
        m1=f((sw * law.mu[0]) ** depth),
        mu1=f(law.mu[0]),
        mu2=f(law.mu[1]),
        edge=f(edge),
        depth=f(depth),
        s=f(_S[weights]),
        levels=np.int64(levels),
    )


def _green(c, z, locs, masses):
    """``G`` minus the atoms' poles: the continuous part's Stieltjes transform.

    ``G = (1 + M) / z`` and ``1 + M = P(0) + C`` (:func:`_m_of_u`), so the part
    without the atom at zero is ``C / z``.
    """
    g = c / z
    if locs.size:
        g = g - jnp.sum(jnp.asarray(masses) / (z[:, None] - jnp.asarray(locs)), axis=-1)
    return g


# Agreement required between two discretizations of the law of d, |G_1 - G_2| <= tol |G|.
# Both parts of G are compared: a solution that lands on the real axis between
# two nodes of the first rule has density 0 under both rules but a different real part.
_RESOLVED = 1e-7
_RESOLVED_CELLS = 1e-3


@jax.jit
def _solve_nodes(lam, law, check, atoms, p: _Params):
    """Solve on the nodes ``law`` of the law of ``d``; ``check``: a second, independent rule
    (None for the exact laws) that must give the same ``G`` at the solution.

    Returns ``(G (n,), converged (n,), |F| (n,), unresolved (n,))``, ``G`` without the
    poles of ``atoms = (locations, masses)``.
    """
    c, z, r, v = _solve(lam, law, p, cells=False)
    g = _green(c, z, *atoms)
    ok = (r < _TOL) & jnp.isfinite(g)
    if check is not None:
        _, c_check = _m_of_u(jnp.exp(v), *check)
        ok = ok & (jnp.abs(_green(c_check, z, *atoms) - g) <= _RESOLVED * jnp.abs(g))
    return g, ok, r, ~ok & (lam > 0)


@jax.jit
def _solve_cells(lam, idx, found, fine, coarse, atoms, p: _Params):
    """Solve again at ``lam[idx]`` with the law of ``d`` as a mixture of uniform cells
    (``fine``; exact up to the real axis), checked against half as many cells (``coarse``).

    ``found = (G, converged, |F|, unresolved)`` of :func:`_solve_nodes`; its unresolved points
    among ``idx`` take the new solution. Returns the updated ``(G, converged, |F|)``.
    """
    g, ok, r, bad = found
    cc, zc, rc, vc = _solve(lam[idx], fine, p._replace(zero=jnp.zeros_like(p.zero)), cells=True)
    gc = _green(cc, zc, *atoms)
    _, c2 = _m_of_u_cells(jnp.exp(vc), *coarse)
    okc = (
        (rc < _TOL)
        & jnp.isfinite(gc)
        & (jnp.abs(_green(c2, zc, *atoms) - gc) <= _RESOLVED_CELLS * jnp.abs(gc))
    )
    take = bad[idx]
    return tuple(
        x.at[idx].set(jnp.where(take, new, x[idx])) for x, new in ((g, gc), (ok, okc), (r, rc))
    )


@jax.jit
def _density_of(lam, g, ok):
    """``(rho (n,), converged (n,))``: ``-Im G / pi``, 0 at negative points, NaN where not ok."""
    dens = jnp.maximum(-jnp.imag(g) / jnp.pi, 0.0)
    dens = jnp.where(lam < 0, 0.0, dens)
    ok = ok | (lam < 0)
    return jnp.where(ok, dens, jnp.nan), ok


_ATOMS = 2
"""The most atoms of a closed-form law of ``d`` (leaky ReLU): the solver's atom arrays' length."""

_CELLS_BATCH = 8
"""The cells' solve takes a power of two of at least this many points (or the whole grid)."""


def _unresolved_points(bad):
    """Indices of the grid points to solve again with the cells, or None: all points under a
    trace; else the unresolved ones, padded (repeating one) to a power of two of at least
    :data:`_CELLS_BATCH`, at most the whole grid, so that few shapes compile (each point of
    the cells' solve costs about 10 ms: padding to the whole grid would cost more)."""
    n = bad.shape[0]
    if not validate.is_concrete(bad):
        return np.arange(n)
    idx = np.nonzero(np.asarray(bad))[0]
    if not idx.size:
        return None
    size = min(n, max(_CELLS_BATCH, 1 << math.ceil(math.log2(idx.size))))
    return np.concatenate([idx, np.full(size - idx.size, idx[-1])])


def _density_core(act, q, depth, weights, sw, lam):
    """Solve on the (float64, 1-D) grid ``lam``; returns the dataclass pieces.

    Two compiled programs serve every depth, ensemble and grid of one law's shape:
    :func:`_solve_nodes`, then :func:`_solve_cells` where the nodes do not resolve
    ``M_{D^2}`` (``u`` close to the support of ``d``).
    """
    with _host_eval():
        law = d2_law(act, q)
        edge = _edge_of(law, depth, weights, sw)
        check = None if law.exact else _law_arrays(d2_law(act, q, quad=_CHECK_QUADRATURE))
    locs, masses = _atoms(law, depth, weights, sw)
    if weights == "orthogonal" and law.exact and law.nodes.size == 1 and law.weights[0] == 1.0:
        # Linear orthogonal network: all mass at sigma_w2^L, no continuous part.
        zeros = jnp.zeros_like(lam)
        return zeros, 0.0, locs, masses, jnp.ones(lam.shape, bool), zeros
    levels = _levels(lam, edge) if validate.is_concrete(lam) else _levels([edge * 1e-30], edge)
    # Atoms padded with zero masses (their poles subtract exact zeros): one shape for all laws.
    pad = max(0, _ATOMS - locs.size)
    p, atoms = (
        _params(law, sw, depth, weights, edge, levels),
        (np.pad(locs, (0, pad)), np.pad(masses, (0, pad))),
    )
    found = _solve_nodes(lam, _law_arrays(law), check, atoms, p)
    g, ok, r, bad = found
    idx = None if law.exact else _unresolved_points(bad)
    if idx is not None:
        with _host_eval():
            fine, coarse = _cells(act, q, _CELLS), _cells(act, q, _CELLS // 2)
        g, ok, r = _solve_cells(lam, idx, found, fine, coarse, atoms, p)
    dens, ok = _density_of(lam, g, ok)
    return dens, law.zero_mass, locs, masses, ok, r


def _check_grid(grid):
    validate.real_array("grid", grid, nonempty=True)


def _report(name, grid, ok, on_failure):
    if on_failure == "nan" or not validate.is_concrete(ok):
        return
    bad = ~np.asarray(ok)
    if bad.any():
        pts = np.asarray(grid).ravel()[bad.ravel()]
        raise SolverError(
            f"{name}: the density solver did not converge at {bad.sum()} of {bad.size} grid "
            f"points, e.g. {np.array2string(pts[:8], precision=6)}"
            " (pass on_failure='nan' to get NaN there and the `converged` mask)"
        )


def spectral_density(
    act: Activation | str,
    q_star,
    depth: int,
    weights: str,
    grid,
    sigma_w2=None,
    *,
    on_failure: str = "raise",
) -> SpectralDensity:
    """Density of the eigenvalues of ``J J^T`` on ``grid`` (wide-network limit).

        rho(lambda) = -(1/pi) Im G(lambda + i0),  G = (1 + m) / z,
        z = (1 + m) / (m S_J(m)),  S_J = (S_W S_{D^2})^L

    (Pennington, Schoenholz & Ganguli 2017, eqs. 9-13; 2018.) Atoms (at zero
    for ReLU-like activations; for orthogonal weights at ``sigma_w2^L`` when
    ``d`` has an atom at 1 of mass > ``1 - 1/L``) are reported separately and
    excluded from ``density``; ``integral density + atoms = 1``.

    Args:
        act: activation or its name.
        q_star: the pre-activation variance ``q* > 0``.
        depth: ``L >= 1``.
        weights: ``"gaussian"`` or ``"orthogonal"``.
        grid: eigenvalues, any shape (finite); negative points get density 0.
        sigma_w2: weight variance; default the critical point for ``q*``.
        on_failure: ``"raise"`` (:class:`SolverError` naming the points where
            the solver failed) or ``"nan"`` (NaN there; see ``converged``).

    Returns:
        :class:`SpectralDensity` with ``density`` of ``grid``'s shape.
    """
    return _density_on_grid(
        "spectral_density", act, q_star, depth, weights, grid, sigma_w2, on_failure, singular=False
    )


def singular_value_density(
    act: Activation | str,
    q_star,
    depth: int,
    weights: str,
    grid,
    sigma_w2=None,
    *,
    on_failure: str = "raise",
) -> SpectralDensity:
    """Density of the singular values ``s`` of ``J`` on ``grid``: ``2 s rho(s^2)``.

    Atoms move to ``sqrt`` of their eigenvalue locations. Arguments as in
    :func:`spectral_density` (``grid`` holds singular values).
    """
    return _density_on_grid(
        "singular_value_density", act, q_star, depth, weights, grid, sigma_w2, on_failure,
        singular=True,
    )  # fmt: skip


def _density_on_grid(name, act, q_star, depth, weights, grid, sigma_w2, on_failure, singular):
    """The checks and the solve shared by :func:`spectral_density` and
    :func:`singular_value_density` (``singular``: ``grid`` holds ``s``, solved at ``s^2``)."""
    with _host_eval():
        act, q, depth, weights, sw = _setup(act, q_star, depth, weights, sigma_w2)
    validate.choice("on_failure", on_failure, ("raise", "nan"))
    _check_grid(grid)
    with jax.enable_x64(True):
        x = jnp.asarray(grid, jnp.float64)
        lam = jnp.where(x >= 0, x * x, -1.0).ravel() if singular else x.ravel()
        dens, zero, locs, masses, ok, r = _density_core(act, q, depth, weights, sw, lam)
        locs = jnp.asarray(locs)
        if singular:  # p(s) = 2 s rho(s^2); atoms at sqrt of their eigenvalues
            dens = jnp.where(x.ravel() < 0, 0.0, 2.0 * jnp.abs(x.ravel()) * dens)
            locs = jnp.sqrt(locs)
        out = SpectralDensity(
            grid=x,
            density=dens.reshape(x.shape),
            atom_at_zero=jnp.asarray(zero),
            atom_locations=locs,
            atom_masses=jnp.asarray(masses),
            converged=ok.reshape(x.shape),
            residual=r.reshape(x.shape),
        )
    _report(name, grid, out.converged, on_failure)
    return out


# --------------------------------------------------------------------------- #
# The law as a CDF: for comparison with measured spectra.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class SpectralLaw:
    """The law of the eigenvalues ``lambda`` of ``J J^T``, tabulated on a grid.

    The law is the atom at 0, the other atoms, and a continuous part with
    density ``rho`` (:func:`spectral_density`). Its CDF is

        F(lambda) = 1 - int_lambda^edge rho - sum_{a_k > lambda} m_k,

    the integral by the trapezoid rule in ``log lambda`` (of ``lambda rho``)
    from the right edge down, so it needs no mass below ``floor``: there the
    atom at 0 and the continuous part are one number, :attr:`below`. Built by
    :func:`spectral_law`; NumPy float64 arrays (a host-side table).

    Attributes:
        grid: ``(G,)`` increasing positive eigenvalues.
        density: ``(G,)`` ``rho`` of the continuous part (NaN where unresolved).
        converged: ``(G,)`` the solver converged and resolved the law of ``d`` there.
        atom_at_zero: the mass at 0.
        atom_locations: ``(k,)`` the other atoms' locations.
        atom_masses: ``(k,)`` their masses.
        edge: the right edge of the support (:func:`max_eigenvalue`).
        floor: the CDF is tabulated at grid points ``>= floor`` (raised above
            the highest unresolved grid point).
    """

    grid: np.ndarray
    density: np.ndarray
    converged: np.ndarray
    atom_at_zero: float
    atom_locations: np.ndarray
    atom_masses: np.ndarray
    edge: float
    floor: float

    def __hash__(self):
        return id(self)

    @functools.cached_property
    def above(self) -> np.ndarray:
        """``(G,)`` the continuous mass above each grid point; NaN below the floor."""
        keep = self.grid >= self.floor
        x = self.grid[keep]
        out = np.full(self.grid.shape, np.nan)
        if x.size < 2:
            return out
        f = x * np.nan_to_num(self.density[keep])
        seg = 0.5 * (f[1:] + f[:-1]) * np.diff(np.log(x))
        out[keep] = np.concatenate([np.cumsum(seg[::-1])[::-1], [0.0]])
        return out

    @property
    def continuous_mass(self) -> float:
        """The continuous part's mass above the floor (NaN with fewer than 2 grid points there)."""
        above = self.above[self.grid >= self.floor]
        return float(above[0]) if above.size >= 2 else float("nan")

    @property
    def below(self) -> float:
        """The mass at or below the floor: ``1 - continuous mass - atoms`` (the atom at 0
        and the continuous part there; may be slightly negative by quadrature error)."""
        return 1.0 - self.continuous_mass - float(np.sum(self.atom_masses))

    def _above_at(self, x):
        """The continuous mass above ``x``, linear in ``s = sqrt(lambda)`` between grid points."""
        keep = self.grid >= self.floor
        if keep.sum() < 2:
            return np.full(np.shape(x), np.nan)
        return np.interp(np.sqrt(np.maximum(x, 0.0)), np.sqrt(self.grid[keep]), self.above[keep])

    def in_singular_values(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(s (G,), p(s) (G,), atom locations (k,))`` in the singular values ``s = sqrt(lambda)``
        of ``J``: ``p(s) = 2 s rho(s^2)``."""
        s = np.sqrt(self.grid)
        return s, 2.0 * s * self.density, np.sqrt(self.atom_locations)

    def cdf(self, x) -> np.ndarray:
        """``F(x)``, atoms included (right-continuous); NaN below the floor.

        Between grid points the continuous part is linear in the singular value
        ``s = sqrt(lambda)`` (the variable of the measured histograms).
        """
        x = np.asarray(x, dtype=float)
        atoms = np.sum(self.atom_masses * (self.atom_locations > x[..., None]), axis=-1)
        return np.where(x >= self.floor, 1.0 - self._above_at(x) - atoms, np.nan)

    def continuous_cdf(self, x) -> np.ndarray:
        """The CDF of the continuous part above the floor, normalized to 1."""
        return 1.0 - self._above_at(x) / self.continuous_mass


def spectral_atoms(act: Activation | str, q_star, depth: int, weights: str, sigma_w2=None):
    """``(atom_at_zero, locations (k,), masses (k,))`` of the eigenvalue law of ``J J^T``.

    The atom at 0 has mass ``P(d = 0)`` (``1 - p`` for ReLU-like laws); for
    orthogonal weights an atom ``a`` of ``d`` of mass ``p_a`` puts
    ``max(0, 1 - L (1 - p_a))`` at ``sigma_w2^L a^L`` (see :func:`spectral_density`).
    No solve: floats and NumPy float64 arrays.
    """
    act, q, depth, weights, sw = _setup(act, q_star, depth, weights, sigma_w2)
    law = d2_law(act, q)
    locs, masses = _atoms(law, depth, weights, sw)
    return float(law.zero_mass), locs, masses


def spectral_law(
    act: Activation | str,
    q_star,
    depth: int,
    weights: str,
    grid,
    sigma_w2=None,
    *,
    floor: float = 0.0,
    atom_window: float = 1e-6,
    pad_to: int | None = None,
) -> SpectralLaw:
    """The law of the eigenvalues of ``J J^T`` with its CDF on ``grid`` (:class:`SpectralLaw`).

    Args:
        act, q_star, depth, weights, sigma_w2: as in :func:`spectral_density`.
        grid: eigenvalues (any shape); sorted, and non-positive points dropped.
        floor: the smallest eigenvalue at which the CDF is tabulated (>= 0).
        atom_window: grid points within ``atom_window * a`` of an atom ``a``
            are dropped: there the solver's density is round-off of the atom's
            subtracted pole.
        pad_to: pad the solver's grid to this length (repeating its last
            point), so calls with grids of different lengths compile once.

    Grid points where the solver fails raise the floor above the highest of
    them (by a factor ``1 + 1e-4``).
    """
    act, q, depth, weights, sw = _setup(act, q_star, depth, weights, sigma_w2)
    _check_grid(grid)
    validate.real_array("floor", floor, minimum=0.0)
    validate.real_array("atom_window", atom_window, minimum=0.0)
    zero, locs, masses = spectral_atoms(act, q, depth, weights, sw)
    x = np.unique(np.asarray(grid, dtype=float))
    x = x[(x > 0) & np.isfinite(x)]
    for a in locs:
        x = x[np.abs(x - a) >= 0.999 * atom_window * a]
    if not x.size:
        raise ValueError("grid must hold positive eigenvalues away from the atoms")
    size = x.size if pad_to is None else max(x.size, validate.positive_int("pad_to", pad_to))
    with jax.enable_x64(True):
        lam = jnp.asarray(np.pad(x, (0, size - x.size), mode="edge"))
        dens, _, _, _, ok, _ = _density_core(act, q, depth, weights, sw, lam)
        edge = _edge_of(d2_law(act, q), depth, weights, sw)
    dens, ok = np.asarray(dens)[: x.size], np.asarray(ok)[: x.size]
    if not ok.all():
        floor = max(float(floor), float(x[~ok].max()) * 1.0001)
    return SpectralLaw(x, dens, ok, zero, locs, masses, edge, float(floor))


def sample_spectral_law(
    act: Activation | str,
    q_star,
    depth: int,
    weights: str,
    sample,
    floor: float,
    sigma_w2=None,
    *,
    points: int = 120,
) -> SpectralLaw:
    """:func:`spectral_law` on a grid that resolves a measured sample of eigenvalues.

    The grid, in the singular values ``s = sqrt(lambda)``: ``points`` linear
    from 0 to past the edge and the sample's maximum, ``points`` geometric in
    ``s^2`` from ``floor`` to the edge, ``points // 2`` sample quantiles
    inside the support, 16 points clustered at the edge and 12 on either side
    of each atom (from ``1e-6`` relative; the atom window is ``1e-6`` in ``s``).

    Args:
        sample: measured eigenvalues of ``J J^T`` (any shape, pooled).
        floor: the smallest eigenvalue the measurement resolves.
        points: grid size per part (>= 8).
    """
    points = validate.positive_int("points", points, minimum=8)
    lam = np.sort(np.ravel(np.asarray(sample, dtype=float)))
    if not lam.size:
        raise ValueError("sample must not be empty")
    with jax.enable_x64(True):
        edge = float(max_eigenvalue(act, q_star, depth, weights, sigma_w2))
    _, locs, _ = spectral_atoms(act, q_star, depth, weights, sigma_w2)
    atoms, s_edge = np.sqrt(locs), np.sqrt(edge)
    s_meas = np.sqrt(lam[lam > floor])
    inside = s_meas[s_meas < s_edge]
    hi = max(1.02 * s_edge, 1.05 * float(np.sqrt(lam[-1])))
    parts = [
        np.linspace(0.0, hi, points + 1)[1:],
        np.sqrt(np.geomspace(floor, edge, points)),
        np.quantile(inside, np.linspace(0, 1, points // 2)) if inside.size else [],
        s_edge * (1 - np.geomspace(1e-8, 0.1, 16)),
    ]
    for a in atoms:
        parts += [a * (1 - np.geomspace(1e-6, 0.1, 12)), a * (1 + np.geomspace(1e-6, 0.1, 12))]
    s = np.unique(np.concatenate([np.ravel(x) for x in parts]))
    s = s[(s > 0) & np.isfinite(s)]
    return spectral_law(act, q_star, depth, weights, s * s, sigma_w2, floor=floor, atom_window=2e-6)
