"""Network-level targets through a subnetwork maximizing function (Martens et al. 2021, sec. 5;
Zhang, Botev & Martens 2022, appendix B).

A network's compound C-map is built from the local C-map ``r`` of its
nonlinear layers by composition (layers in sequence) and weighted averages
(normalized sums ``w x + sqrt(1 - w^2) f(x)`` give ``w^2 c_x + (1 - w^2) c_f``).
dks's convention describes an architecture by its *subnetwork maximizing
function* ``M(x, r_fn)``: the network's map evaluated at ``x`` with every
nonlinear layer replaced by ``r_fn``, maximized over its subnetworks (the
whole network, a residual branch alone, ...). Replacing ``r_fn`` by a product
or a sum gives the quantities the conditions bound:

    max slope      mu(s) = M(1, y -> s y)    (C_f'(1), every layer of C'(1) = s; DKS)
    max curvature  kappa(t) = M(0, y -> t + y)   (C_f''(1), layers of C'(1) = 1, C''(1) = t; TAT)
    max C_f(0)     M(0, C_a)                 (leaky-ReLU TAT, ``C_a`` its local C-map)

:func:`chain` is the plain chain of ``L`` layers (``M(x, r) = r^L(x)``).
:func:`slope_target`, :func:`curvature_target` and :func:`leaky_slope` invert these
increasing (decreasing for the slope ``a``) functions by bisection to round-off.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable

from isometry.shaping import solve

__all__ = ["chain", "check", "curvature_target", "leaky_slope", "slope_target"]

SubnetMaxFunc = Callable[[float, Callable[[float], float]], float]

_GRID = (1.0, 1.001, 1.01, 1.1, 1.5, 2.0, 4.0)  # slopes at which M is checked monotone


@dataclasses.dataclass(frozen=True)
class Chain:
    """``M(x, r) = r^depth(x)``: a plain chain of ``depth`` nonlinear layers."""

    depth: int

    def __call__(self, x: float, r_fn) -> float:
        for _ in range(self.depth):
            x = r_fn(x)
        return x


def chain(depth: int) -> Chain:
    """The subnetwork maximizing function of a plain chain of ``depth`` nonlinear layers."""
    return Chain(depth)


def _value(subnet_max_func, x, r_fn, what: str) -> float:
    try:
        v = subnet_max_func(x, r_fn)
    except Exception as err:  # a user's function: say which call failed and how
        raise ValueError(
            f"subnet_max_func must be callable as subnet_max_func(x, r_fn) -> float (dks's "
            f"convention); {what} raised {type(err).__name__}: {err}"
        ) from err
    try:
        v = float(v)
    except (TypeError, ValueError) as err:
        raise ValueError(f"subnet_max_func: {what} returned {v!r}, not a real number") from err
    if not math.isfinite(v):
        raise ValueError(f"subnet_max_func: {what} returned {v}, not a finite number")
    return v


def check(subnet_max_func) -> None:
    """Raise ``ValueError`` unless ``subnet_max_func`` is callable as dks documents it, is 1 at
    ``x = 1`` for identity layers (normalized sums), and ``mu(s)`` increases from 1 (the
    network has a nonlinear layer)."""
    if not callable(subnet_max_func):
        raise ValueError(
            f"subnet_max_func must be a callable subnet_max_func(x, r_fn) -> float, "
            f"got {subnet_max_func!r}"
        )
    one = _value(subnet_max_func, 1.0, lambda y: y, "M(1, identity)")
    if abs(one - 1.0) > 1e-12:
        raise ValueError(
            f"subnet_max_func: M(1, identity) = {one!r}, not 1: a network of identity layers "
            "with normalized sums (w^2 + (1 - w^2) = 1) keeps c = 1"
        )
    mu = [_value(subnet_max_func, 1.0, lambda y, s=s: s * y, f"M(1, y -> {s} y)") for s in _GRID]
    if any(b < a * (1 - 1e-12) for a, b in itertools.pairwise(mu)):
        pairs = ", ".join(f"mu({s})={m:.6g}" for s, m in zip(_GRID, mu, strict=True))
        raise ValueError(f"subnet_max_func: the max slope mu(s) = M(1, y -> s y) is not "
                         f"increasing in s: {pairs}")  # fmt: skip
    if not mu[-1] > 1.0:
        raise ValueError(
            "subnet_max_func: mu(s) = M(1, y -> s y) stays 1 for every slope s: the network "
            "has no nonlinear layer to shape"
        )


def _bisect(fn, target: float, lo: float, hi: float, increasing: bool = True) -> float:
    """``x`` in ``[lo, hi]`` with ``fn(x) = target``, to the last bit (``fn`` monotone)."""
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if (fn(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _bracket(fn, target: float, lo: float, hi: float, what: str) -> float:
    """An upper end ``hi`` with ``fn(hi) >= target``: the interval above ``lo`` doubled."""
    for _ in range(200):
        if fn(hi) >= target:
            return hi
        hi = lo + 2.0 * (hi - lo)
    raise ValueError(f"subnet_max_func: no {what} reaches the target {target}")


def slope_target(subnet_max_func, zeta: float) -> float:
    """The per-layer ``C'(1) = s > 1`` with ``mu(s) = M(1, y -> s y) = zeta`` (DKS)."""
    if isinstance(subnet_max_func, Chain):
        return zeta ** (1.0 / subnet_max_func.depth)
    mu = lambda s: subnet_max_func(1.0, lambda y: s * y)  # noqa: E731
    return _bisect(mu, zeta, 1.0, _bracket(mu, zeta, 1.0, 1.5, "slope"))


def curvature_target(subnet_max_func, tau: float) -> float:
    """The per-layer ``C''(1) = t > 0`` with ``M(0, y -> t + y) = tau`` (smooth TAT)."""
    if isinstance(subnet_max_func, Chain):
        return tau / subnet_max_func.depth
    kappa = lambda t: subnet_max_func(0.0, lambda y: t + y)  # noqa: E731
    return _bisect(kappa, tau, 0.0, _bracket(kappa, tau, 0.0, 0.1, "curvature"))


def leaky_slope(subnet_max_func, eta: float) -> float:
    """Leaky ReLU's negative slope ``a`` in ``[0, 1)`` with ``M(0, C_a) = eta`` (TAT);
    ``M(0, C_a)`` falls from ReLU's (``a = 0``) to 0 (``a = 1``, linear)."""
    cf0 = lambda a: subnet_max_func(0.0, solve.leaky_relu_c_map(a))  # noqa: E731
    top = cf0(0.0)
    if top <= eta:
        raise ValueError(
            f"tat: this network cannot reach max C_f(0) = eta = {eta} with leaky ReLU: even "
            f"ReLU (a = 0) gives {top:.6g}; use a smaller eta or a deeper network"
        )
    return _bisect(cf0, eta, 0.0, 1.0, increasing=False)
