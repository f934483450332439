"""Solving for a transform's parameters from per-layer targets (float64 Newton).

``phi_hat(x) = gamma (phi(alpha x + beta) + delta)``. Given ``(alpha, beta)``
(and ``delta`` for smooth TAT), ``gamma`` follows from ``Q(1) = 1`` and, for DKS,
``delta = -E[phi(alpha z + beta)]`` from ``C(0) = 0``; Newton's method finds the
rest so that the per-layer conditions hold:

* ``"dks"`` (smooth): ``Q'(1) = 1``, ``C'(1) = s`` in ``(alpha, beta)``;
* ``"dks_relu"``: ``C'(1) = s`` in ``alpha`` with ``beta = +-1`` fixed (ReLU has one
  degree of freedom too few for ``Q'(1) = 1``; Martens et al. 2021, as dks does:
  ``beta = 1`` below the largest slope it reaches, ``beta = -1`` above);
* ``"dks_leaky"``: ``Q'(1) = 1``, ``C'(1) = s`` in the negative slope ``a`` and
  ``beta`` (``alpha = 1``);
* ``"tat"`` (smooth): ``Q'(1) = 1``, ``C'(1) = 1``, ``C''(1) = t`` in ``(alpha, beta,
  delta)``.

Every expectation is the toolkit's composite Gauss-Legendre rule
(:func:`isometry.gaussian.nodes`, :data:`isometry.gaussian.PRECISE`, panels at the
base activation's kinks in ``x = alpha z + beta``), using ``Q'(1) = E[phi_hat(z)
phi_hat'(z) z]``, ``C'(1) = E[phi_hat'(z)^2]`` and ``C''(1) = E[phi_hat''(z)^2]``.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from isometry import activations, gaussian
from isometry.activations import Activation

__all__ = ["METHODS", "RELU_MAX_SLOPE", "leaky_gamma", "leaky_relu_c_map", "moments", "solve"]

METHODS = ("dks", "dks_relu", "dks_leaky", "tat")

RELU_MAX_SLOPE = 1.466942206924260361
"""The largest ``C'(1)`` of a normalized, centred ``relu(alpha x + 1)`` (dks's constant):
DKS shapes ReLU with ``beta = 1`` below it and ``beta = -1`` above."""


def moments(base: Activation, p, curvature: bool = False, quad=gaussian.PRECISE, **kw):
    """Local-map quantities of ``phi_hat`` for ``p = (alpha, beta, delta)`` (``delta = None``:
    the DKS choice ``-E[phi(alpha z + beta)]``); ``kw``: the base's parameters, traced
    (leaky ReLU's ``negative_slope``). Returns a dict of scalars (``c_curv`` only with
    ``curvature``)."""
    alpha, beta, delta = p
    kw = {**base.kwargs, **kw}
    z, w = gaussian.nodes([(beta, alpha, quad.features(base.kinks))], quad)
    x = beta + alpha * z
    f, d = base.fn(x, **kw), base.deriv(x, **kw)
    mean = jnp.sum(w * f)
    delta = -mean if delta is None else delta
    g2 = 1.0 / jnp.sum(w * (f + delta) ** 2)  # gamma^2: Q(1) = 1
    out = {
        "gamma": jnp.sqrt(g2),
        "delta": delta,
        "q_slope": g2 * alpha * jnp.sum(w * (f + delta) * d * z),
        "c_slope": g2 * alpha**2 * jnp.sum(w * d * d),
    }
    if curvature:
        out["c_curv"] = g2 * alpha**4 * jnp.sum(w * base.d2phi(x) ** 2)
    return out


def _params(method: str, p):
    """``(alpha, beta, delta, kw)`` of the unknowns ``p``."""
    if method == "dks_leaky":
        return (1.0, p[1], None), {"negative_slope": p[0]}
    if method == "tat":
        return (p[0], p[1], p[2]), {}
    return (p[0], p[1], None), {}


def _residual(base: Activation, method: str, p, target):
    """The conditions Newton's method zeroes; ``target = (s,)``, ``(s, beta)`` (ReLU) or
    ``(t,)``."""
    q, kw = _params(method, p)
    m = moments(base, q, curvature=method == "tat", **kw)
    if method == "dks_relu":
        return jnp.stack([m["c_slope"] - target[0], p[1] - target[1]])
    if method == "tat":
        return jnp.stack([m["q_slope"] - 1.0, m["c_slope"] - 1.0, m["c_curv"] - target[0]])
    return jnp.stack([m["q_slope"] - 1.0, m["c_slope"] - target[0]])


@functools.partial(jax.jit, static_argnames=("base", "method"))
def _residual_and_jacobian(base: Activation, method: str, p, target):
    """``(r(p), dr/dp)`` in one compiled program (forward mode)."""
    r = functools.partial(_residual, base, method, target=target)
    jac, res = jax.jacfwd(lambda q: (r(q), r(q)), has_aux=True)(p)
    return res, jac


def _newton(fn, p0, max_iter: int = 40, tol: float = 1e-13):
    """Damped Newton on ``fn(p) -> (r, dr/dp)`` from ``p0``: the largest of ``1, 1/2, ...,
    1/1024`` times the Newton step that lowers ``|r|``. Returns ``p`` with ``max |r(p)| <
    1e-12``, or ``None``."""
    p = np.asarray(p0, np.float64)
    rp, jp = fn(p)
    for _ in range(max_iter):
        if not (np.all(np.isfinite(rp)) and np.all(np.isfinite(jp))):
            return None
        if np.max(np.abs(rp)) < tol:
            return p
        try:
            step = np.linalg.solve(jp, -rp)
        except np.linalg.LinAlgError:
            return None
        for t in 2.0 ** -np.arange(11):
            new = p + t * step
            r_new, j_new = fn(new)
            if np.all(np.isfinite(r_new)) and np.linalg.norm(r_new) < np.linalg.norm(rp):
                break
        else:
            return None
        p, rp, jp = new, r_new, j_new
    return p if np.max(np.abs(rp)) < 1e-12 else None


_STARTS = {  # the unknowns' starting values, as in Martens et al. 2021 and dks
    "dks": ((1.0, 0.1, 0.5, 2.0), (0.0, 1.0, -1.0, 0.5)),  # alpha, beta
    "tat": ((1.0, 0.1, 0.5, 2.0), (0.0, 1.0, -1.0, 0.5), (0.0, 1.0, -1.0)),  # + delta
    "dks_leaky": ((0.5, 0.0, 0.25, 0.75, 0.9), (0.0, 1.0, -1.0)),  # negative slope, beta
}


def _starts(method: str, target):
    if method == "dks_relu":
        return [(a, target[1]) for a in (1.0, 0.1, 0.5, 2.0, 0.02, 5.0)]
    return itertools.product(*_STARTS[method])


def _acceptable(method: str, p, gamma: float) -> bool:
    """``alpha > 0`` (leaky ReLU: ``0 <= a < 1``); smooth TAT also ``alpha gamma < 2``: the
    reference implementation rejects the other, unstable solutions."""
    if method == "dks_leaky":
        return 0.0 <= p[0] < 1.0
    return p[0] > 0 and not (method == "tat" and p[0] * gamma >= 2.0)


def _odd(base: Activation) -> bool:
    x = np.linspace(0.05, 6.0, 120)
    with jax.enable_x64(True):
        return bool(np.allclose(base.phi(-x), -base.phi(x), rtol=1e-13, atol=1e-15))


def solve(base: Activation, method: str, local_target: float):
    """``(alpha, beta, gamma, delta, negative_slope)`` of the first start from which Newton
    converges (``max |r| < 1e-12``) to an acceptable solution; ``None`` if none does. For an
    odd ``phi``, ``x -> -phi_hat(-x)`` meets the same conditions: of the two mirror images
    the one with ``beta >= 0`` is returned (dks's choice).

    ``local_target``: the per-layer ``C'(1)`` (DKS) or ``C''(1)`` (TAT). ``base``: for
    ``"dks_leaky"``, leaky ReLU (its slope is solved for; ``negative_slope`` in the result).
    """
    target = [local_target]
    if method == "dks_relu":
        target.append(1.0 if local_target < RELU_MAX_SLOPE else -1.0)
    with jax.enable_x64(True):
        target = jnp.asarray(target, jnp.float64)

        def fn(p):
            res, jac = _residual_and_jacobian(base, method, jnp.asarray(p), target)
            return np.asarray(res), np.asarray(jac)

        for p0 in _starts(method, np.asarray(target)):
            p = _newton(fn, p0)
            if p is None:
                continue
            q, kw = _params(method, p)
            m = moments(base, q, **kw)
            gamma, delta = float(m["gamma"]), float(m["delta"])
            if not _acceptable(method, p, gamma):
                continue
            if method == "dks_leaky":
                return 1.0, float(p[1]), gamma, delta, float(p[0])
            if p[1] < 0 and _odd(base):  # the mirror image -phi_hat(-x) meets every condition
                p, delta = np.concatenate([p[:1], -p[1:]]), -delta
            return float(p[0]), float(p[1]), gamma, delta, None
    return None


@jax.jit
def _leaky_c(c, a):
    leaky = activations.get("leaky_relu")
    norm = leaky.second_moment(1.0, negative_slope=a)
    return leaky.kernel(1.0, 1.0, c, negative_slope=a) / norm


def leaky_relu_c_map(a: float):
    """``c -> C(c)`` of ``sqrt(2 / (1 + a^2)) leaky_relu_a`` (normalized, ``Q(1) = 1``): the
    closed-form kernel of :mod:`isometry.activations` (Cho & Saul 2009) over its second
    moment, as a function of a float (float64) for a ``subnet_max_func``."""

    def c_map(c):
        with jax.enable_x64(True):
            return float(_leaky_c(np.float64(c), np.float64(a)))

    return c_map


def leaky_gamma(a: float) -> float:
    """``sqrt(2 / (1 + a^2))``: ``Q(1) = 1`` for leaky ReLU of slope ``a``."""
    return math.sqrt(2.0 / (1.0 + a * a))
