"""Mean-field signal propagation: length and correlation maps, fixed points, depth scales.

For a deep network ``h^l = W^l phi(h^{l-1}) + b^l`` with ``W_ij ~ N(0,
sigma_w2/N)`` and ``b_i ~ N(0, sigma_b2)``, in the wide limit (Poole et al.
2016; Schoenholz et al. 2017)::

    q-map:  q^l  = sigma_w2 E_z[phi(sqrt(q^{l-1}) z)^2] + sigma_b2,          fixed point q*
    c-map:  c^l  = (sigma_w2 E[phi(u1) phi(u2)] + sigma_b2) / q*,             fixed point c*
            u1 = sqrt(q*) z1,  u2 = sqrt(q*) (c z1 + sqrt(1 - c^2) z2)
    chi1    = sigma_w2 E_z[phi'(sqrt(q*) z)^2]            (slope of the c-map at c = 1)
    chi_c   = sigma_w2 E[phi'(u1) phi'(u2)] at c*
    xi_q    = -1 / log(d q-map / dq at q*),   xi_c = -1 / log(chi_c)

``chi1 < 1``: ordered phase (c* = 1, gradients vanish); ``chi1 > 1``: chaotic
(c* < 1, gradients explode); ``chi1 = 1``: the edge of chaos, where ``xi_c``
diverges. Networks train up to depth about ``6 xi_c``.

Every function takes ``act`` (an :class:`~isometry.activations.Activation`
or its name) and broadcasts over its array arguments; all are jittable (with
``act`` static), vmappable and differentiable. Results are float64-accurate
when ``jax_enable_x64`` is on (see :mod:`isometry.gaussian` for the
quadrature's accuracy).

Fixed points are found by safeguarded Newton iteration; :func:`solve_q_star`
and :func:`solve_c_star` also report convergence. A length map without a
finite fixed point (e.g. ReLU with ``sigma_w2 > 2``: ``q^l`` grows without
bound) gives ``q* = inf`` and ``converged = False``, never a silent NaN.

References:
    Poole, Lahiri, Raghu, Sohl-Dickstein & Ganguli 2016, "Exponential
    expressivity in deep neural networks through transient chaos".
    Schoenholz, Gilmer, Ganguli & Sohl-Dickstein 2017, "Deep information
    propagation".
    Pennington, Schoenholz & Ganguli 2017, "Resurrecting the sigmoid in deep
    learning through dynamical isometry" (critical point for a chosen q*).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from isometry import gaussian as gs
from isometry import validate
from isometry.activations import Activation
from isometry.activations import get as get_activation

__all__ = [
    "FixedPoint",
    "PhaseDiagram",
    "c_map",
    "c_star",
    "chi1",
    "chi_c",
    "critical_point",
    "critical_sigma_w2",
    "depth_scales",
    "iterate_c_map",
    "iterate_q_map",
    "phase_diagram",
    "q_map",
    "q_map_slope",
    "q_star",
    "solve_c_star",
    "solve_q_star",
]

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FixedPoint:
    """A fixed point with its diagnostics.

    Attributes:
        value: the fixed point (``inf`` for a diverging length map).
        converged: ``|map(value) - value| <= tol * max(value, 1)``, finite.
        residual: ``map(value) - value``.
        iterations: iterations used.
    """

    value: Array
    converged: Array
    residual: Array
    iterations: Array


def _dtype(*xs):
    return jnp.result_type(*xs, float)


def _tol(dtype):
    return 1e-13 if jnp.dtype(dtype) == jnp.float64 else 1e-6


_FLOOR = 1e-30  # lengths below this count as zero (tanh with sigma_b2 = 0, ordered)


_UNSET = object()


def _validate(sigma_w2, sigma_b2, q=_UNSET):
    """The variances (and ``q`` where given) are finite reals in range that broadcast together.

    ``None`` or a string is a ``TypeError`` naming the parameter (never passed on to jax).
    """
    validate.real_array("sigma_w2", sigma_w2, minimum=0.0, strict=True)
    validate.real_array("sigma_b2", sigma_b2, minimum=0.0)
    named = {"sigma_w2": sigma_w2, "sigma_b2": sigma_b2}
    if q is not _UNSET:
        validate.real_array("q", q, minimum=0.0)
        named["q"] = q
    validate.broadcastable(**named)


# --------------------------------------------------------------------------- #
# Length map and its fixed point.
# --------------------------------------------------------------------------- #


def q_map(act: Activation | str, q, sigma_w2, sigma_b2, *, quad=None) -> Array:
    """One step of the length map, ``sigma_w2 E[phi(sqrt(q) z)^2] + sigma_b2``.

    Shapes: ``q, sigma_w2, sigma_b2`` broadcast together. (Poole et al. 2016, eq. 3.)
    """
    _validate(sigma_w2, sigma_b2, q)
    return _q_map(get_activation(act), q, sigma_w2, sigma_b2, quad)


def q_map_slope(act: Activation | str, q, sigma_w2, sigma_b2=0.0, *, quad=None) -> Array:
    """``d q-map / dq``, by forward-mode autodiff of :func:`q_map`.

    Equals ``chi1 + sigma_w2 E[phi''(u) phi(u)]`` at ``u ~ N(0, q)`` (Gaussian
    integration by parts); ``xi_q = -1 / log(slope at q*)``.
    """
    _validate(sigma_w2, sigma_b2, q)
    return _q_map_slope(get_activation(act), q, sigma_w2, sigma_b2, quad)


@functools.partial(jax.jit, static_argnames=("act", "quad"))
def _q_map_slope(act, q, sigma_w2, sigma_b2, quad):
    dtype = _dtype(q, sigma_w2, sigma_b2)
    q, sw, sb = (jnp.asarray(v, dtype) for v in (q, sigma_w2, sigma_b2))

    def one(qi, swi, sbi):
        f = functools.partial(_q_map, act, sw=swi, sb=sbi, quad=quad)
        return jax.jvp(f, (qi,), (jnp.ones_like(qi),))[1]

    return jnp.vectorize(one)(q, sw, sb)


@functools.partial(jax.jit, static_argnames=("act", "quad"))
def _q_map(act, q, sw, sb, quad):
    return sw * gs.second_moment(act, q, quad=quad) + sb


def _q_map_and_slope(act, q, sw, sb, quad):
    """``(q-map(q), d q-map / dq)``, the slope as its own expectation.

    ``d/dq E[phi(sqrt(q) z)^2] = E[phi(x) phi'(x) x] / q`` at ``x = sqrt(q) z``
    (differentiating under the integral): one more quadrature on the same
    rule, several times cheaper than forward-mode through the rule's
    ``q``-dependent nodes. Closed-form second moments are differentiated.
    """
    if act.second_moment is not None:
        return jax.jvp(lambda q: _q_map(act, q, sw, sb, quad), (q,), (jnp.ones_like(q),))
    kinks = act.kinks
    m2 = gs.expect(lambda x: act.phi(x) ** 2, q, kinks=kinks, quad=quad)
    dm2 = gs.expect(lambda x: act.phi(x) * act.dphi(x) * x, q, kinks=kinks, quad=quad) / q
    return sw * m2 + sb, sw * dm2


def _q_newton(act, sw, sb, quad, max_iter):
    """``(cond, body)`` of safeguarded Newton on ``g(q) = q-map(q) - q``, one point."""
    dtype = sw.dtype
    tol = _tol(dtype)
    big = jnp.finfo(dtype).max / 16

    def cond(state):
        i, q, done = state
        return (i < max_iter) & ~done & jnp.isfinite(q)

    def body(state):
        i, q, _ = state
        m, s = _q_map_and_slope(act, q, sw, sb, quad)
        newton = q - (m - q) / (s - 1.0)
        # Newton only where the map contracts (s < 1): it then heads for the
        # stable fixed point; elsewhere a plain map step moves away from an
        # unstable one (e.g. q = 0 for tanh with sigma_w2 > 1, sigma_b2 = 0).
        contracting = (s < 1.0) & jnp.isfinite(newton)
        # A contracting map whose Newton step crosses zero has its stable
        # fixed point at q* = 0 (e.g. tanh, sigma_b2 = 0, sigma_w2 < 1).
        q_new = jnp.where(contracting, newton, m)
        q_new = jnp.maximum(q_new, _FLOOR)
        # Converged when the (Newton) step is below tol relative to q: for a
        # nearly flat map (s ~ 1) a small residual alone would not suffice.
        # (or when the residual is at rounding level: no step can do better).
        at_rounding = jnp.abs(m - q) <= 8 * jnp.finfo(dtype).eps * jnp.maximum(m, q)
        done = (jnp.abs(q_new - q) <= tol * q + _FLOOR) | at_rounding
        q_new = jnp.where(jnp.isfinite(q_new) & (q_new < big), q_new, jnp.inf)
        return i + 1, q_new, done

    return cond, body


def _q_finish(act, sw, sb, quad, state):
    """The ``FixedPoint`` of a finished Newton state (``inf`` where the map grows on)."""
    i, q, done = state
    finite = jnp.isfinite(q)
    m, s = _q_map_and_slope(act, jnp.where(finite, q, 1.0), sw, sb, quad)
    growing = finite & ~done & (m > q) & (s >= 1.0)
    # A map that still grows with slope >= 1 has no finite fixed point ahead.
    q = jnp.where(growing, jnp.inf, q)
    residual = jnp.where(jnp.isfinite(q), m - q, jnp.inf)
    return FixedPoint(q, done & jnp.isfinite(q), residual, i)


def _solve_q(act, sw, sb, q0, max_iter, quad):
    """Safeguarded Newton on ``g(q) = q-map(q) - q`` for one (sigma_w2, sigma_b2)."""
    cond, body = _q_newton(act, sw, sb, quad, max_iter)
    state = lax.while_loop(cond, body, (jnp.array(0), jnp.asarray(q0, sw.dtype), jnp.array(False)))
    return _q_finish(act, sw, sb, quad, state)


def _newton_rounds(step, active, state, lead: int = 6, block: int = 256):
    """Run per-point iterations ``state <- step(state)`` while ``active(state)``, batched.

    A batched ``while_loop`` runs every point for as many steps as the slowest
    one needs. Here all points take ``lead`` steps together (most converge in
    that many), then the points still active are gathered ``block`` at a time
    and iterated on their own. Each point's sequence of steps is the same as
    alone, so the results are those of a per-point loop.
    """

    def masked(_, st):
        new = jax.vmap(step)(st)
        keep = jax.vmap(active)(st)
        return jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, st)

    state = lax.fori_loop(0, lead, masked, state)
    n = state[0].shape[0]
    take = min(block, n)

    def one_round(st):
        idx = jnp.argsort(~jax.vmap(active)(st), stable=True)[:take]
        sub = jax.tree.map(lambda v: v[idx], st)
        sub = jax.vmap(lambda x: lax.while_loop(active, step, x))(sub)
        return jax.tree.map(lambda v, u: v.at[idx].set(u), st, sub)

    return lax.while_loop(lambda st: jnp.any(jax.vmap(active)(st)), one_round, state)


def solve_q_star(
    act: Activation | str, sigma_w2, sigma_b2, *, q0=1.0, max_iter: int = 200, quad=None
) -> FixedPoint:
    """The stable fixed point ``q*`` of the length map, with convergence diagnostics.

    Starts from ``q0`` (the input's ``||x||^2 / N``; default 1) and follows the
    map to the stable fixed point it reaches. Broadcasts over ``sigma_w2,
    sigma_b2`` (and ``q0``).
    """
    _validate(sigma_w2, sigma_b2)
    validate.real_array("q0", q0, minimum=0.0, strict=True)
    return _solve_q_star(get_activation(act), sigma_w2, sigma_b2, q0, max_iter, quad)


@functools.partial(jax.jit, static_argnames=("act", "max_iter", "quad"))
def _solve_q_star(act, sigma_w2, sigma_b2, q0, max_iter, quad):
    dtype = _dtype(sigma_w2, sigma_b2, q0)
    sw, sb, q0 = (jnp.asarray(v, dtype) for v in (sigma_w2, sigma_b2, q0))
    shape = jnp.broadcast_shapes(sw.shape, sb.shape, q0.shape)
    sw, sb, q0 = (v.ravel() for v in jnp.broadcast_arrays(sw, sb, q0))

    def step(x):
        return _q_newton(act, x[3], x[4], quad, max_iter)[1](x[:3]) + x[3:]

    def active(x):
        return _q_newton(act, x[3], x[4], quad, max_iter)[0](x[:3])

    zeros = jnp.zeros(sw.shape, int)
    state = _newton_rounds(step, active, (zeros, q0, zeros.astype(bool), sw, sb))
    flat = jax.vmap(functools.partial(_q_finish, act, quad=quad))(sw, sb, state=state[:3])
    return jax.tree.map(lambda x: x.reshape(shape), flat)


def q_star(act: Activation | str, sigma_w2, sigma_b2, *, q0=1.0, quad=None) -> Array:
    """The fixed point ``q*`` of the length map (``inf`` where ``q^l`` diverges).

    Use :func:`solve_q_star` for the convergence flag. (Poole et al. 2016.)
    """
    return solve_q_star(act, sigma_w2, sigma_b2, q0=q0, quad=quad).value


def iterate_q_map(act: Activation | str, q0, sigma_w2, sigma_b2, depth: int, *, quad=None):
    """``q^1..q^depth`` from ``q^0 = q0``; shape ``(depth, *broadcast shape)``."""
    validate.positive_int("depth", depth)
    _validate(sigma_w2, sigma_b2, q0)
    return _iterate_q_map(get_activation(act), q0, sigma_w2, sigma_b2, depth, quad)


@functools.partial(jax.jit, static_argnames=("act", "depth", "quad"))
def _iterate_q_map(act, q0, sigma_w2, sigma_b2, depth, quad):
    def body(q, _):
        q = _q_map(act, q, sigma_w2, sigma_b2, quad)
        return q, q

    dtype = _dtype(q0, sigma_w2, sigma_b2)
    q0 = jnp.broadcast_to(
        jnp.asarray(q0, dtype), jnp.broadcast_shapes(*map(jnp.shape, (q0, sigma_w2, sigma_b2)))
    )
    return lax.scan(body, q0, None, length=depth)[1]


# --------------------------------------------------------------------------- #
# Correlation map.
# --------------------------------------------------------------------------- #


def c_map(act: Activation | str, c, q, sigma_w2, sigma_b2, *, quad=None) -> Array:
    """One step of the correlation map at the length ``q`` (normally ``q*``)::

        c -> (sigma_w2 E[phi(u1) phi(u2)] + sigma_b2) / q.

    (Poole et al. 2016, eq. 5; Schoenholz et al. 2017.) Broadcasts over all arguments.
    """
    _validate(sigma_w2, sigma_b2, q)
    validate.real_array("c", c, minimum=-1.0, maximum=1.0)
    return _c_map_jit(get_activation(act), c, q, sigma_w2, sigma_b2, quad)


_c_map_jit = jax.jit(
    lambda act, c, q, sw, sb, quad: _c_map(act, c, q, sw, sb, quad), static_argnums=(0, 5)
)


def _c_map(act, c, q, sw, sb, quad):
    return (sw * gs.phi_kernel(act, q, q, c, quad=quad) + sb) / q


def iterate_c_map(act: Activation | str, c0, q, sigma_w2, sigma_b2, depth: int, *, quad=None):
    """``c^1..c^depth`` from ``c^0 = c0`` at fixed length ``q``; shape ``(depth, ...)``."""
    validate.positive_int("depth", depth)
    _validate(sigma_w2, sigma_b2, q)
    validate.real_array("c0", c0, minimum=-1.0, maximum=1.0)
    return _iterate_c_map(get_activation(act), c0, q, sigma_w2, sigma_b2, depth, quad)


@functools.partial(jax.jit, static_argnames=("act", "depth", "quad"))
def _iterate_c_map(act, c0, q, sigma_w2, sigma_b2, depth, quad):
    def body(c, _):
        c = jnp.clip(_c_map(act, c, q, sigma_w2, sigma_b2, quad), -1.0, 1.0)
        return c, c

    dtype = _dtype(c0, q, sigma_w2, sigma_b2)
    shape = jnp.broadcast_shapes(*map(jnp.shape, (c0, q, sigma_w2, sigma_b2)))
    return lax.scan(body, jnp.broadcast_to(jnp.asarray(c0, dtype), shape), None, length=depth)[1]


def _series_order(dtype) -> int:
    return 192 if jnp.dtype(dtype) == jnp.float64 else 96


def _horner(coef: Array, c: Array) -> Array:
    """``sum_k coef[..., k] c^k`` (Horner; ``coef`` has the series on its last axis)."""
    order = coef.shape[-1] - 1
    return lax.fori_loop(0, order + 1, lambda i, acc: acc * c + coef[..., order - i], 0.0 * c)


def _series_root(b2: Array, q: Array, sw: Array, sb: Array, halvings: int = 50) -> Array:
    """Root in ``[0, 1)`` of the deflated series c-map ``((sw P(c) + sb) / q - c) / (1 - c)``.

    ``P(c) = sum_k b2_k c^k`` is the Mehler series of ``E[phi(u1) phi(u2)]``;
    bisection keeps the sign change (positive below ``c*``).
    """

    def series_k(c):
        return ((sw * _horner(b2, c) + sb) / q - c) / (1.0 - c)

    def bisect(_, ab):
        a, b = ab
        m = 0.5 * (a + b)
        up = series_k(m) > 0
        return jnp.where(up, m, a), jnp.where(up, b, m)

    one = jnp.ones_like(q)
    a, b = lax.fori_loop(0, halvings, bisect, (0.0 * one, one - jnp.finfo(q.dtype).eps))
    return 0.5 * (a + b)


def _solve_c(act, q, sw, sb, chi, exact, quad):
    """Stable fixed point of the c-map at length ``q``; 1 when ``chi1 <= 1``.

    Chaotic phase (``chi1 > 1``): ``c*`` is the root in ``[0, 1)`` of the
    deflated function ``k(c) = (c-map(c) - c) / (1 - c)``, positive below
    ``c*`` (``c-map(0) >= 0`` when ``sigma_b2 >= 0``) and tending to
    ``1 - chi1 < 0`` as ``c -> 1``. Dividing out the fixed point at ``c = 1``
    keeps ``c*`` a simple root near the edge of chaos.

    1. Bisection (50 halvings) on the Hermite (Mehler) series of the c-map,
       which costs one matrix product per point
       (:func:`isometry.gaussian.hermite_coefficients`).
    2. Newton steps on the two-dimensional quadrature (1 in float32, 3 in
       float64 or when ``exact``): quadratic convergence from the series'
       estimate gives full precision; the exact residual decides ``converged``.

    Returns the ``FixedPoint`` and ``chi_c`` at it.
    """
    dtype = q.dtype
    finite = jnp.isfinite(q)
    q = jnp.where(finite, q, 1.0)
    b2 = gs.hermite_coefficients(act.phi, q, _series_order(dtype)) ** 2
    c = _series_root(b2, q, sw, sb)
    one = jnp.ones_like(q)

    def exact_map(c):
        return _c_map(act, c, q, sw, sb, quad)

    def polish(_, c):
        kc, dk = jax.jvp(lambda c: (exact_map(c) - c) / (1.0 - c), (c,), (one,))
        new = c - kc / dk
        ok = jnp.isfinite(new) & (new < 1.0) & (new >= 0.0)
        return jnp.where(ok, new, c)

    steps = 3 if (exact or jnp.dtype(dtype) == jnp.float64) else 1
    c = lax.fori_loop(0, steps, polish, c)
    residual = exact_map(c) - c
    tol = 1e-10 if jnp.dtype(dtype) == jnp.float64 else 1e-5
    ordered = ~(chi > 1.0)
    chi_c = jnp.where(ordered, chi, sw * gs.deriv_kernel(act, q, q, c, quad=quad))
    fp = FixedPoint(
        jnp.where(ordered, 1.0, jnp.where(finite, c, jnp.nan)),
        (ordered | (jnp.abs(residual) <= tol)) & finite,
        jnp.where(ordered, 0.0, residual),
        jnp.where(ordered, 0, 50 + steps),
    )
    return fp, jnp.where(finite, chi_c, jnp.inf)


def _mehler_c(act, q, sw, sb, chi):
    """``c*`` and ``chi_c`` from the Mehler series alone, with a certified truncation bound.

    With ``P(c) = sum_{k<=K} b_k^2 c^k`` for ``phi`` and ``D(c)`` the same for
    ``phi'`` (:func:`isometry.gaussian.hermite_series`), the exact maps differ
    from the truncated ones by at most (Parseval, ``0 <= c <= 1``)

        |c-map(c) - (sw P(c) + sb) / q| <= c^(K+1) sw R / q,   |chi_c - sw D(c)| <= c^(K+1) sw R'

    where ``R, R'`` are the energies beyond order ``K`` (``D`` comes from the
    same coefficients by Stein's identity). The root's distance from ``c*`` is
    then at most ``c^(K+1) sw R / q / (1 - chi_c)`` (first order). A point is
    ``certified`` when the map's bound is below ``1e-6 (1 - chi_c)`` or below
    the map's own rounding (``8 eps`` relative: there no floating-point route
    does better), the bound on ``chi_c`` moves ``xi_c`` by less than ``1e-4``
    relative (or is below rounding), and ``q <= 30`` (where the fixed nodes
    resolve ``phi``); the others take the quadrature route of
    :func:`_solve_c`. Every operation is one product or a Horner sweep per
    point: no two-dimensional quadrature. For tanh on the
    ``[0.5, 5] x [0, 2]`` grid every chaotic point is certified at ``K = 192``.

    Returns ``(FixedPoint, chi_c, certified)`` for the chaotic points
    (``chi1 > 1``); ordered points get ``c* = 1``, ``chi_c = chi1``.
    """
    dtype = q.dtype
    order = 2 * _series_order(dtype)
    usable = jnp.isfinite(q) & (q <= 30.0)
    q = jnp.where(usable, q, 1.0)
    b, m2 = gs.hermite_series(act.phi, q, order + 1)
    n2 = gs.hermite_series(act.dphi, q, 1)[1]
    # Stein: E[phi'(sqrt(q) z) He_k(z)] = E[phi(sqrt(q) z) He_{k+1}(z)] / sqrt(q).
    k = jnp.arange(1, order + 2, dtype=dtype)
    b2, d2 = b[..., :-1] ** 2, k * b[..., 1:] ** 2 / q[..., None]
    eps = 8 * jnp.finfo(dtype).eps
    c = _series_root(b2, q, sw, sb)
    residual = (sw * _horner(b2, c) + sb) / q - c
    chi_c = sw * _horner(d2, c)
    c_k = c ** (order + 1)
    map_bound = c_k * sw * jnp.maximum(m2 - jnp.sum(b2, axis=-1), 0.0) / q
    chi_bound = c_k * sw * jnp.maximum(n2 - jnp.sum(d2, axis=-1), 0.0)
    # Below the map's own rounding (eps * map), no float route does better.
    gap = jnp.where(chi_c < 1.0, 1.0 - chi_c, 0.0)
    c_ok = map_bound <= jnp.maximum(eps * (sw * m2 + sb) / q, 1e-6 * gap)
    log_chi = jnp.log(jnp.clip(chi_c, jnp.finfo(dtype).tiny, 1.0))
    xi_ok = chi_bound <= chi_c * jnp.maximum(eps, -1e-4 * log_chi)
    certified = usable & (gap > 0) & c_ok & xi_ok
    ordered = ~(chi > 1.0)
    fp = FixedPoint(
        jnp.where(ordered, 1.0, c),
        ordered | (certified & (jnp.abs(residual) <= 1e-5)),
        jnp.where(ordered, 0.0, residual),
        jnp.where(ordered, 0, 50),
    )
    return fp, jnp.where(ordered, chi, chi_c), ordered | certified


def solve_c_star(
    act: Activation | str, sigma_w2, sigma_b2, *, exact: bool | None = None, quad=None
) -> FixedPoint:
    """The stable fixed point ``c*`` of the correlation map at ``q*``, with diagnostics.

    ``c* = 1`` in the ordered phase (``chi1 <= 1``). In the chaotic phase,
    with ``exact=True`` (the default in float64) or an activation with
    closed-form kernels: bisection on the Hermite series of the c-map, then
    Newton steps on the two-dimensional quadrature (three; one when not
    ``exact``). Otherwise (float32): the Mehler series alone, of order 192,
    wherever its Parseval truncation bound certifies ``c*`` to ``1e-6`` and
    ``xi_c`` to ``1e-4`` relative (or to rounding), the quadrature route at
    the other points. (Schoenholz et al. 2017.) Where ``q*`` diverges ``c*``
    is undefined: ``nan`` with ``converged = False``.
    """
    return _correlation_point(get_activation(act), sigma_w2, sigma_b2, exact, quad)[0]


def _correlation_point(act, sigma_w2, sigma_b2, exact, quad):
    exact = _checked_exactness(sigma_w2, sigma_b2, exact)
    return _correlation_point_jit(act, sigma_w2, sigma_b2, exact, quad)


def _checked_exactness(sigma_w2, sigma_b2, exact) -> bool:
    """Validate the variances; ``exact`` (the accurate c* route) defaults to float64 inputs."""
    _validate(sigma_w2, sigma_b2)
    dtype = _dtype(sigma_w2, sigma_b2)
    return (jnp.dtype(dtype) == jnp.float64) if exact is None else bool(exact)


@functools.partial(jax.jit, static_argnames=("act", "exact", "quad"))
def _correlation_point_jit(act, sigma_w2, sigma_b2, exact, quad):
    dtype = _dtype(sigma_w2, sigma_b2)
    sw, sb = jnp.broadcast_arrays(jnp.asarray(sigma_w2, dtype), jnp.asarray(sigma_b2, dtype))
    qs = _solve_q_star(act, sw, sb, 1.0, 200, quad)
    x1 = _chi1_at(act, qs.value, sw, quad)
    solve = functools.partial(_solve_c, act, exact=exact, quad=quad)
    q, flat = qs.value.ravel(), (sw.ravel(), sb.ravel())
    if exact or (act.kernel is not None and act.deriv_kernel is not None):
        fp, xc = _chaotic_chunks(solve, q, *flat, x1.ravel())
    else:  # the series where its bound certifies it, the quadrature elsewhere
        series = functools.partial(_mehler_c, act)
        fp, xc, certified = _chaotic_chunks(series, q, *flat, x1.ravel())
        need = ~certified & (x1.ravel() > 1.0)
        fq, xq = _chaotic_chunks(solve, q, *flat, jnp.where(need, x1.ravel(), 0.0))
        fp, xc = jax.tree.map(lambda a, b: jnp.where(need, a, b), (fq, xq), (fp, xc))
    fp, xc = jax.tree.map(lambda v: v.reshape(sw.shape), (fp, xc))
    fp = dataclasses.replace(fp, converged=fp.converged & qs.converged)
    return fp, xc, qs, x1, sw, sb


def _chaotic_chunks(solve, q, sw, sb, chi, chunk: int = 512):
    """``vmap(solve)`` over points, in chunks, skipping chunks with no chaotic point.

    ``solve(q, sw, sb, chi) -> (FixedPoint, chi_c, *extra)`` for one point.

    The two-dimensional quadrature holds (points x nodes) arrays, so points go
    in chunks; sorting the chaotic points (``chi1 > 1``) to the end lets whole
    chunks of ordered points (``c* = 1``, nothing to solve) skip the work.
    """
    n = q.shape[0]
    chunk = min(chunk, max(n, 1))  # a few points are one block, not padded to a full chunk
    order = jnp.argsort(chi > 1.0, stable=True)
    pad = (-n) % chunk
    take = jnp.concatenate([order, jnp.full((pad,), order[-1] if n else 0)])
    args = tuple(v[take].reshape(-1, min(chunk, n + pad), *v.shape[1:]) for v in (q, sw, sb, chi))

    def run(block):
        work = lambda b: jax.vmap(solve)(*b)  # noqa: E731
        skip_shape = jax.eval_shape(work, block)
        ordered = lambda b: jax.tree.map(  # noqa: E731
            lambda s: jnp.zeros(s.shape, s.dtype), skip_shape
        )
        return lax.cond(jnp.any(block[3] > 1.0), work, ordered, block)

    out = lax.map(run, args)
    out = jax.tree.map(lambda v: v.reshape(-1)[: n + pad], out)
    inv = jnp.zeros(n, dtype=order.dtype).at[order].set(jnp.arange(n, dtype=order.dtype))
    (fp, xc, *extra) = jax.tree.map(lambda v: v[inv], out)
    # Ordered points: c* = 1, chi_c = chi1 (what `solve` returns for them too);
    # any further outputs of `solve` are zero there.
    ordered = ~(chi > 1.0)
    fp = FixedPoint(
        jnp.where(ordered, 1.0, fp.value),
        jnp.where(ordered, jnp.isfinite(q), fp.converged),
        jnp.where(ordered, 0.0, fp.residual),
        jnp.where(ordered, 0, fp.iterations),
    )
    return (fp, jnp.where(ordered, chi, xc), *extra)


def c_star(act: Activation | str, sigma_w2, sigma_b2, *, quad=None) -> Array:
    """The stable fixed point ``c*`` of the correlation map (1 in the ordered phase)."""
    return solve_c_star(act, sigma_w2, sigma_b2, quad=quad).value


# --------------------------------------------------------------------------- #
# Susceptibilities and depth scales.
# --------------------------------------------------------------------------- #


def _chi1_at(act, q, sw, quad):
    finite = jnp.isfinite(q)
    mu1 = gs.dphi_moment(act, jnp.where(finite, q, 1.0), 1, quad=quad)
    return jnp.where(finite, sw * mu1, jnp.inf)


def chi1(act: Activation | str, sigma_w2, sigma_b2, *, quad=None) -> Array:
    """``chi1 = sigma_w2 E[phi'(sqrt(q*) z)^2]``: the per-layer growth of squared gradients.

    ``chi1 = 1`` is the edge of chaos (Poole et al. 2016; Schoenholz et al. 2017, eq. 8).
    ``inf`` where ``q*`` diverges.
    """
    _validate(sigma_w2, sigma_b2)
    return _chi1(get_activation(act), sigma_w2, sigma_b2, quad)


@functools.partial(jax.jit, static_argnames=("act", "quad"))
def _chi1(act, sigma_w2, sigma_b2, quad):
    qs = _solve_q_star(act, sigma_w2, sigma_b2, 1.0, 200, quad).value
    return _chi1_at(act, qs, jnp.asarray(sigma_w2, qs.dtype), quad)


def chi_c(act: Activation | str, sigma_w2, sigma_b2, *, quad=None) -> Array:
    """``chi_c = sigma_w2 E[phi'(u1) phi'(u2)]`` at ``(q*, c*)`` (equals ``chi1`` when c* = 1)."""
    return _correlation_point(get_activation(act), sigma_w2, sigma_b2, None, quad)[1]


def _xi(slope):
    # xi = -1 / log(slope); slope >= 1 means no exponential decay: xi = inf.
    return jnp.where(slope < 1.0, -1.0 / jnp.log(jnp.where(slope < 1.0, slope, 0.5)), jnp.inf)


def depth_scales(act: Activation | str, sigma_w2, sigma_b2, *, quad=None) -> tuple[Array, Array]:
    """``(xi_q, xi_c)``: the depths over which lengths and correlations approach their fixed points.

        1/xi_q = -log(d q-map/dq at q*) = -log(chi1 + sigma_w2 E[phi''(u) phi(u)])
        1/xi_c = -log chi_c

    ``xi_c`` diverges at the edge of chaos; in the ordered phase ``xi_c = -1/log chi1``.
    (Schoenholz et al. 2017, eqs. 5 and 9.)
    """
    d = _diagram_point(get_activation(act), sigma_w2, sigma_b2, quad)
    return d["xi_q"], d["xi_c"]


def _diagram_point(act, sigma_w2, sigma_b2, quad, exact=None):
    exact = _checked_exactness(sigma_w2, sigma_b2, exact)
    return _diagram_point_jit(act, sigma_w2, sigma_b2, quad, exact)


@functools.partial(jax.jit, static_argnames=("act", "quad", "exact"))
def _diagram_point_jit(act, sigma_w2, sigma_b2, quad, exact):
    cs, xc, qs, x1, sw, sb = _correlation_point_jit(act, sigma_w2, sigma_b2, exact, quad)
    finite = jnp.isfinite(qs.value)
    qq = jnp.where(finite, qs.value, 1.0)
    slope = jnp.where(finite, _q_map_and_slope(act, qq, sw, sb, quad)[1], jnp.inf)
    return {
        "q_star": qs.value,
        "c_star": cs.value,
        "chi1": x1,
        "chi_c": xc,
        "xi_q": _xi(slope),
        "xi_c": _xi(xc),
        "converged": qs.converged & cs.converged,
    }


# --------------------------------------------------------------------------- #
# Criticality.
# --------------------------------------------------------------------------- #


def critical_point(act: Activation | str, q_star, *, quad=None) -> tuple[Array, Array]:
    """The critical ``(sigma_w2, sigma_b2)`` whose length fixed point is ``q_star``.

        sigma_w2 = 1 / E[phi'(sqrt(q*) z)^2],   sigma_b2 = q* - sigma_w2 E[phi(sqrt(q*) z)^2]

    (Pennington, Schoenholz & Ganguli 2017.) ReLU gives ``(2, 0)`` for every q*.

    Raises:
        ValueError: ``q_star <= 0``, or no critical point has this ``q*``
            (``sigma_b2`` would be negative), for concrete inputs. Under ``jit``
            such points give ``sigma_b2 < 0``: check it.
    """
    validate.real_array("q_star", q_star, minimum=0.0, strict=True)
    act = get_activation(act)
    q = jnp.asarray(q_star, _dtype(q_star))
    sw, sb = _critical_point(act, q, quad)
    if validate.is_concrete(sb):
        bad = jnp.asarray(sb < 0)
        if bool(jnp.any(bad)):
            raise ValueError(
                f"critical_point: no critical point of {act.name} has q_star = "
                f"{jnp.asarray(q)[bad] if q.ndim else float(q)} (it would need sigma_b2 < 0)"
            )
    return sw, sb


@functools.partial(jax.jit, static_argnames=("act", "quad"))
def _critical_point(act, q, quad):
    sw = 1.0 / gs.dphi_moment(act, q, 1, quad=quad)
    sb = q - sw * gs.second_moment(act, q, quad=quad)
    # Exact zeros (ReLU, linear) come out as -1e-17: snap to the boundary.
    return sw, jnp.where(jnp.abs(sb) <= 64 * jnp.finfo(q.dtype).eps * q, 0.0, sb)


def critical_sigma_w2(act: Activation | str, sigma_b2, *, bracket=(1e-2, 1e2), quad=None) -> Array:
    """The edge of chaos: the ``sigma_w2`` where ``chi1(sigma_w2, sigma_b2) = 1``.

    Bisection in ``log sigma_w2`` over ``bracket`` (60 halvings: relative
    accuracy 2^-60 of the bracket's log-width), each step solving ``q*``.
    ``nan`` is never returned: where ``chi1 - 1`` has no sign change in the
    bracket the result is ``inf``. Broadcasts over ``sigma_b2``.
    """
    validate.real_array("sigma_b2", sigma_b2, minimum=0.0)
    lo, hi = bracket
    if not (0 < lo < hi):
        raise ValueError(f"bracket must satisfy 0 < lo < hi, got {bracket}")
    return _critical_sigma_w2(get_activation(act), sigma_b2, (float(lo), float(hi)), quad)


@functools.partial(jax.jit, static_argnames=("act", "bracket", "quad"))
def _critical_sigma_w2(act, sigma_b2, bracket, quad):
    lo, hi = bracket
    sb = jnp.asarray(sigma_b2, _dtype(sigma_b2))

    def one(sbi):
        def chi_minus_one(log_sw):
            sw = jnp.exp(log_sw)
            qs = _solve_q(act, sw, sbi, jnp.ones_like(sw), 200, quad).value
            return jnp.nan_to_num(_chi1_at(act, qs, sw, quad) - 1.0, nan=jnp.inf)

        a, b = jnp.log(jnp.asarray(lo, sb.dtype)), jnp.log(jnp.asarray(hi, sb.dtype))
        fa, fb = chi_minus_one(a), chi_minus_one(b)

        def body(_, ab):
            a, b = ab
            m = 0.5 * (a + b)
            below = chi_minus_one(m) < 0
            return jnp.where(below, m, a), jnp.where(below, b, m)

        a, b = lax.fori_loop(0, 60, body, (a, b))
        ok = (fa < 0) & (fb >= 0)
        return jnp.where(ok, jnp.exp(0.5 * (a + b)), jnp.inf)

    return jnp.vectorize(one)(sb)


# --------------------------------------------------------------------------- #
# Phase diagram.
# --------------------------------------------------------------------------- #


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PhaseDiagram:
    """Mean-field quantities over a ``(sigma_w2, sigma_b2)`` grid.

    Arrays have shape ``(len(sigma_w2), len(sigma_b2))``; ``critical_sigma_w2``
    has shape ``(len(sigma_b2),)`` (the edge of chaos, ``chi1 = 1``).
    """

    sigma_w2: Array
    sigma_b2: Array
    q_star: Array
    c_star: Array
    chi1: Array
    chi_c: Array
    xi_q: Array
    xi_c: Array
    converged: Array
    critical_sigma_w2: Array

    def as_dict(self) -> dict[str, Array]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def phase_diagram(
    act: Activation | str, sigma_w2_grid, sigma_b2_grid, *, exact: bool | None = None, quad=None
) -> PhaseDiagram:
    """``q*, c*, chi1, chi_c, xi_q, xi_c`` on the grid, plus the critical line.

    One vectorized, jitted computation. Shapes: grids ``(W,)`` and ``(B,)``;
    results ``(W, B)``. ``exact`` (default: float64 in use) polishes ``c*``
    with three Newton steps on the two-dimensional quadrature; otherwise the
    certified Mehler series gives ``c*`` and ``chi_c`` (see
    :func:`solve_c_star`; a 201 x 201 float32 tanh diagram then costs no
    two-dimensional quadrature at all).
    (Poole et al. 2016, Fig. 2; Schoenholz et al. 2017, Fig. 1.)
    """
    for name, g in (("sigma_w2_grid", sigma_w2_grid), ("sigma_b2_grid", sigma_b2_grid)):
        validate.real_array(name, g, nonempty=True)
        if np.ndim(g) != 1:
            raise ValueError(f"{name} must be one-dimensional, got shape {jnp.shape(g)}")
    validate.real_array("sigma_w2_grid", sigma_w2_grid, minimum=0.0, strict=True)
    validate.real_array("sigma_b2_grid", sigma_b2_grid, minimum=0.0)
    act = get_activation(act)
    dtype = _dtype(sigma_w2_grid, sigma_b2_grid)
    exact = (jnp.dtype(dtype) == jnp.float64) if exact is None else bool(exact)
    sw, sb = jnp.asarray(sigma_w2_grid, dtype), jnp.asarray(sigma_b2_grid, dtype)
    return _phase_diagram(act, sw, sb, quad, exact)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _phase_diagram(act, sw_grid, sb_grid, quad, exact):
    sw, sb = jnp.meshgrid(sw_grid, sb_grid, indexing="ij")
    d = _diagram_point_jit(act, sw, sb, quad, exact)
    crit = _critical_sigma_w2(act, sb_grid, (1e-2, 1e2), quad)
    return PhaseDiagram(sigma_w2=sw_grid, sigma_b2=sb_grid, critical_sigma_w2=crit, **d)
