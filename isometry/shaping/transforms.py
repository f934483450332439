"""The public transforms: :func:`dks` and :func:`tat`, for a plain chain or any architecture.

Each turns a network-level target into a per-layer one (:mod:`isometry.shaping.subnets`:
exactly for a chain of ``depth`` layers, by bisection through a
``subnet_max_func``), solves for the transform (:mod:`isometry.shaping.solve`), and
re-checks every condition on the returned activation by the mean-field route
(:func:`isometry.shaping.maps.checked`).
"""

from __future__ import annotations

import functools

from isometry import activations, validate
from isometry.activations import Activation
from isometry.shaping import maps, solve, subnets
from isometry.shaping.maps import ShapedActivation, ShapingError, Transform

__all__ = ["DKS_ACTIVATIONS", "TAT_ACTIVATIONS", "dks", "tat"]

DKS_ACTIVATIONS = (
    "elu", "erf", "gelu", "leaky_relu", "relu", "selu", "sigmoid", "silu", "softplus", "swish",
    "tanh",
)  # fmt: skip
"""Catalog activations DKS transforms: smooth ones (``Q'(1) = 1``, ``C'(1) = s`` in the input
scale and shift), leaky ReLU (in its negative slope and the input shift) and ReLU (in the
input scale, the shift fixed at +-1: ``Q'(1) = 1`` is dropped, as dks does)."""

TAT_ACTIVATIONS = (
    "leaky_relu", "elu", "erf", "gelu", "sigmoid", "silu", "softplus", "swish", "tanh",
)  # fmt: skip
"""Catalog activations TAT transforms: leaky ReLU (the ``eta`` variant) and smooth ones
(the ``tau`` variant; ``C''(1) = E[phi''^2]`` must be finite, so ``phi'`` continuous)."""

_NO_TRANSFORM = {
    "dks": {
        "prelu": "a learnable slope has no fixed C-map; use 'leaky_relu'",
        "hard_tanh": "hard-tanh is piecewise linear with two kinks: no smooth C-map to shape",
        "linear": "a linear activation has C(c) = c for every transform (C'(1) = 1 always)",
        "sin": "sin is periodic: its shaped C-maps have many spurious solutions",
    },
    "tat": {
        "relu": "ReLU has one degree of freedom too few (C'(1) = 1 with Q'(1) = 1 leaves a "
        "linear map); use 'leaky_relu', TAT's rectifier",
        "prelu": "a learnable slope has no fixed C-map; use 'leaky_relu'",
        "hard_tanh": "hard-tanh is piecewise linear with two kinks: no smooth C-map to shape",
        "linear": "a linear activation has C(c) = c for every transform (C'(1) = 1 always)",
        "sin": "sin is periodic: its shaped C-maps have many spurious solutions",
        "selu": "SELU's derivative jumps at 0, so C''(1) = E[phi''^2] is infinite",
    },
}


def _base(act, method: str) -> Activation:
    """The base activation, or a ``ValueError`` saying why ``method`` cannot transform it."""
    act = activations.get(act)
    if isinstance(act, ShapedActivation):
        raise ValueError(f"{method}: activation {act.name!r} is already shaped")
    allowed = TAT_ACTIVATIONS if method == "tat" else DKS_ACTIVATIONS
    no = _NO_TRANSFORM[method]
    if act.name in allowed or (
        act.name not in no and not act.kinks and act.name not in activations.names()
    ):
        return act
    why = no.get(act.name, "its local C-map is not smooth")
    raise ValueError(
        f"{method}: no transform exists for activation {act.name!r} ({why}); "
        f"supported: {', '.join(allowed)} or a smooth custom activation"
    )


def _structure(depth, subnet_max_func):
    """``(depth or None, M)``: exactly one of the two describes the network."""
    if (depth is None) == (subnet_max_func is None):
        raise ValueError(
            "give exactly one of depth (a plain chain of that many nonlinear layers) and "
            f"subnet_max_func (any architecture); got depth={depth!r}, "
            f"subnet_max_func={subnet_max_func!r}"
        )
    if subnet_max_func is not None:
        subnets.check(subnet_max_func)
        return None, subnet_max_func
    if isinstance(depth, float) and depth.is_integer():
        depth = int(depth)
    depth = validate.positive_int("depth", depth)
    return depth, subnets.chain(depth)


def dks(
    act: Activation | str, depth: int | None = None, zeta: float = 1.5, *, subnet_max_func=None
) -> ShapedActivation:
    """Deep Kernel Shaping: ``phi_hat(x) = gamma (phi(alpha x + beta) + delta)`` with

        Q(1) = 1,  Q'(1) = 1,  E[phi_hat(z)] = 0,  C'(1) = s,  mu(s) = zeta,

    where ``mu(s)`` is the network's largest compound slope ``C_f'(1)`` over its
    subnetworks when every nonlinear layer has slope ``s``: ``s^L`` for a plain chain
    of ``L = depth`` layers (``s = zeta^(1/L)``), ``M(1, y -> s y)`` through
    ``subnet_max_func`` for any architecture (Martens et al. 2021, arXiv 2110.01765,
    section 5; ``zeta = 1.5`` is their default). Then ``C_f(0) = 0`` and ``C_f'(1) <=
    zeta`` for the network (orthogonal weights of variance 1, no bias, inputs with
    ``||x||^2 / N = 1``, sums normalized).

    ReLU keeps the input shift at ``beta = 1`` (``-1`` for ``s`` above ~1.467) and drops
    ``Q'(1) = 1`` (one degree of freedom too few); leaky ReLU solves its negative slope
    and ``beta`` (``alpha = 1``). Both follow dks; rectifiers are better shaped by TAT.

    Args:
        act: a name in :data:`DKS_ACTIVATIONS` or a smooth custom activation.
        depth: ``L >= 1``, the number of nonlinear layers of a plain chain.
        zeta: the network's largest compound slope, ``> 1``.
        subnet_max_func: ``M(x, r_fn) -> float`` in dks's convention (instead of
            ``depth``): e.g. :func:`isometry.shaping.subnet_max_func` of a model.

    Returns:
        A :class:`ShapedActivation`; its ``transform`` holds the parameters, the
        per-layer target and the residuals of every condition (all below 1e-8).

    Raises:
        ValueError: bad ``depth``/``zeta``, both or neither of ``depth`` and
            ``subnet_max_func``, a ``subnet_max_func`` not callable as documented or not
            increasing, or an activation with no transform.
        ShapingError: no start converges, or the result misses a condition.
    """
    base = _base(act, "dks")
    depth, m = _structure(depth, subnet_max_func)
    validate.real_array("zeta", zeta, minimum=1.0, strict=True)
    if not zeta > 1.0:
        raise ValueError(f"zeta must be > 1 (a compound slope of 1 is the linear map), got {zeta}")
    return _dks(base, depth, float(zeta), m)


@functools.lru_cache(maxsize=256)
def _dks(base: Activation, depth, zeta: float, m) -> ShapedActivation:
    local = subnets.slope_target(m, zeta)
    method = {"relu": "dks_relu", "leaky_relu": "dks_leaky"}.get(base.name, "dks")
    sol = solve.solve(base, method, local)
    if sol is None:
        raise ShapingError(
            f"dks: Newton's method found no transform of {base.name!r} for "
            f"{_where(depth)}, zeta={zeta} (C'(1) target {local:.6g})"
        )
    alpha, beta, gamma, delta, a = sol
    if a is not None:
        base = activations.get("leaky_relu", negative_slope=a)
    t = Transform("dks", base, depth, zeta, alpha, beta, gamma, delta, a, (), local, m)
    conditions = [
        ("Q(1) - 1", ("Q1", 1.0)),
        ("Q'(1) - 1", ("Q_slope", 1.0)),
        ("E[phi_hat]", ("mean", 0.0)),
        ("C'(1) - s", ("C_slope", local)),
    ]
    if method == "dks_relu":
        del conditions[1]
    extra = [("mu(C'(1)) - zeta", lambda act: _mu(m, act) - zeta)] if depth is None else []
    return maps.checked(maps.shaped("dks", base, alpha, beta, gamma, delta), t, conditions, extra)


def _mu(m, act) -> float:
    s = float(maps.local_maps(act, keys=("C_slope",))["C_slope"])
    return m(1.0, lambda y: s * y)


def _kappa(m, act) -> float:
    t = float(maps.local_maps(act, keys=("C_curv",))["C_curv"])
    return m(0.0, lambda y: t + y)


def _where(depth) -> str:
    return f"depth={depth}" if depth is not None else "the given subnet_max_func"


def tat(
    act: Activation | str,
    depth: int | None = None,
    eta: float = 0.9,
    tau: float = 0.3,
    *,
    subnet_max_func=None,
) -> ShapedActivation:
    """Tailored Activation Transformation (Zhang, Botev & Martens 2022, arXiv 2203.08120).

    Leaky ReLU: ``phi_hat(x) = sqrt(2 / (1 + a^2)) leaky_relu_a(x)`` with the negative
    slope ``a`` chosen so that the network's largest ``C_f(0)`` over its subnetworks is
    ``eta`` (a chain of ``L = depth`` layers: ``C^L(0)``; any architecture: ``M(0,
    C_a)``). ``Q(1) = 1`` and ``C'(1) = 1`` hold for any ``a``. A small ``eta`` is a
    nearly linear network; the paper uses 0.9.

    Smooth activations: ``phi_hat(x) = gamma (phi(alpha x + beta) + delta)`` with

        Q(1) = 1,  Q'(1) = 1,  C'(1) = 1,  C''(1) = t,  kappa(t) = tau,

    where ``kappa(t)`` is the network's largest ``C_f''(1)``: ``L t`` for a chain
    (``t = tau / L``), ``M(0, y -> t + y)`` through ``subnet_max_func`` (the paper's
    default ``tau = 0.3``; ``eta`` is unused).

    Raises:
        ValueError: ``depth < 1``, both or neither of ``depth`` and ``subnet_max_func``,
            ``eta`` outside ``(0, 1)``, ``tau <= 0``, an activation with no transform
            (ReLU: one degree of freedom too few, use leaky ReLU; SELU: ``phi'`` jumps,
            ``C''(1)`` infinite; ...), or a network too shallow to reach ``eta`` with
            leaky ReLU.
        ShapingError: the solver does not converge or misses a condition.
    """
    base = _base(act, "tat")
    depth, m = _structure(depth, subnet_max_func)
    validate.real_array("eta", eta)
    if not 0.0 < eta < 1.0:
        raise ValueError(f"eta must lie in (0, 1), got {eta}")
    validate.real_array("tau", tau, minimum=0.0, strict=True)
    if base.name == "leaky_relu":
        return _tat_leaky(depth, float(eta), m)
    return _tat_smooth(base, depth, float(tau), m)


@functools.lru_cache(maxsize=256)
def _tat_smooth(base: Activation, depth, tau: float, m) -> ShapedActivation:
    local = subnets.curvature_target(m, tau)
    sol = solve.solve(base, "tat", local)
    if sol is None:
        raise ShapingError(
            f"tat: Newton's method found no transform of {base.name!r} for {_where(depth)}, "
            f"tau={tau} (C''(1) target {local:.6g}) with alpha > 0 and alpha gamma < 2 (TAT "
            "rejects the solutions of larger alpha gamma: their Q-maps are unstable)"
        )
    alpha, beta, gamma, delta, _ = sol
    t = Transform("tat", base, depth, tau, alpha, beta, gamma, delta, None, (), local, m)
    conditions = (
        ("Q(1) - 1", ("Q1", 1.0)),
        ("Q'(1) - 1", ("Q_slope", 1.0)),
        ("C'(1) - 1", ("C_slope", 1.0)),
        ("C''(1) - t", ("C_curv", local)),
    )
    extra = []
    if depth is None:
        extra = [("kappa(C''(1)) - tau", lambda act: _kappa(m, act) - tau)]
    return maps.checked(maps.shaped("tat", base, alpha, beta, gamma, delta), t, conditions, extra)


@functools.lru_cache(maxsize=256)
def _tat_leaky(depth, eta: float, m) -> ShapedActivation:
    a = subnets.leaky_slope(m, eta)
    base = activations.get("leaky_relu", negative_slope=a)
    gamma = solve.leaky_gamma(a)
    t = Transform("tat", base, depth, eta, 1.0, 0.0, gamma, 0.0, a, (), None, m)
    act = maps.shaped("tat", base, 1.0, 0.0, gamma, 0.0)
    if depth is not None:
        conditions = (("Q(1) - 1", ("Q1", 1.0)), ("C_f(0) - eta", ("Cf0", eta)))
        return maps.checked(act, t, conditions)
    c_map = lambda c: float(maps.compound_c_map(act, c, 1))  # noqa: E731  mean-field route
    extra = [("M(0, C) - eta", lambda act: m(0.0, c_map) - eta)]
    return maps.checked(act, t, (("Q(1) - 1", ("Q1", 1.0)),), extra)
