"""Kernel shaping: DKS and TAT activation transforms from the local Q and C maps.

A deep vanilla network (no skip connections, no normalization) with
orthogonal weights (``sigma_w2 = 1``, no bias) and inputs with
``||x||^2 / N = 1`` is described, in the wide limit, by the *local maps* of
its activation ``phi_hat`` (Martens et al. 2021, section 3):

    Q(q) = E[phi_hat(sqrt(q) z)^2]                       (length map)
    C(c) = E[phi_hat(u1) phi_hat(u2)] / Q(1),  (u1, u2) ~ N(0, [[1, c], [c, 1]])   (correlation map)

and the network's *compound* C-map is ``C_f = C o C o ... o C`` (``L`` times).
A deep network is trainable only when ``C_f`` is neither close to the constant
map (all inputs look alike) nor to the identity (a linear model). Kernel
shaping transforms the activation,

    phi_hat(x) = gamma (phi(alpha x + beta) + delta),

so that ``C_f`` has a prescribed, moderate shape at every depth.

DKS (Deep Kernel Shaping; Martens, Ballard, Desjardins, Swirszcz, Dalibard,
Sohl-Dickstein & Schoenholz 2021, "Rapid training of deep neural networks
without skip connections or normalization layers using Deep Kernel Shaping",
arXiv 2110.01765, section 5) asks

    Q(1) = 1,   Q'(1) = 1,   C(0) = E[phi_hat(z)]^2 = 0,   C'(1) = zeta^(1/L),

so that the compound map of an ``L``-layer network has ``C_f(0) = 0`` and
``C_f'(1) = zeta`` (slopes multiply under composition at the fixed point 1).
Given ``(alpha, beta)``, ``delta = -E[phi(alpha z + beta)]`` and ``gamma =
1 / std(phi(alpha z + beta))`` give the first and third conditions; Newton's
method on ``(alpha, beta)`` solves the other two.

TAT (Tailored Activation Transformations; Zhang, Botev & Martens 2022, "Deep
learning without shortcuts: shaping the kernel with tailored rectifiers",
arXiv 2203.08120) for leaky ReLU, ``phi_hat(x) = sqrt(2 / (1 + a^2))
leaky_relu_a(x)``, chooses the negative slope ``a`` so that ``C_f(0) = eta``
(the leaky-ReLU C-map has ``C'(1) = 1`` whatever ``a``; ``Q(1) = 1`` fixes
``gamma``). For smooth activations TAT (its section 4.4 and appendix) asks

    Q(1) = 1,   Q'(1) = 1,   C'(1) = 1,   C''(1) = tau / L,

so that ``C_f''(1) = tau`` (second derivatives add when slopes are 1), with
``(alpha, beta, delta)`` found by Newton's method and ``gamma`` from ``Q(1) = 1``.

Numerics. The solvers run in float64 (locally, whatever ``jax_enable_x64``
says) with the toolkit's composite Gauss-Legendre rule
(:func:`isometry.gaussian.nodes`, :data:`isometry.gaussian.PRECISE`, panels at
the base activation's kinks in ``x = alpha z + beta``), using the Gaussian
identities ``Q'(1) = E[phi_hat(z) phi_hat'(z) z]``, ``C'(1) = E[phi_hat'(z)^2]``
and ``C''(1) = E[phi_hat''(z)^2]``. The returned activation's conditions are
then re-evaluated by a second route, the mean-field functions on the returned
:class:`~isometry.activations.Activation` (``gaussian.second_moment``,
``meanfield.q_map_slope`` by autodiff, ``gaussian.expect``,
``gaussian.dphi_moment``, ``meanfield.iterate_c_map``); these residuals are
reported in :attr:`Transform.residuals` and must all be below
:data:`TOLERANCE` (1e-8), else :class:`ShapingError` is raised: a transform
is never returned silently wrong.

Names. Importing :mod:`isometry` registers the prefixes ``dks:`` and ``tat:``
with :func:`isometry.activations.register_transform`, so a config can name a
transformed activation by string: ``activations.get("dks:tanh", depth=50,
zeta=1.5)``, ``activations.get("tat:leaky_relu", depth=50, eta=0.9)``,
``activations.get("tat:softplus", depth=50, tau=0.3)`` (or ``MLPConfig(
activation="dks:tanh", activation_params={"depth": 50})``). Results are cached:
the same arguments return the same (equal) activation without solving again.

Example:
    >>> from isometry import shaping
    >>> act = shaping.dks("tanh", depth=50, zeta=1.5)
    >>> act.transform.alpha, act.transform.residuals     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from isometry import activations, gaussian, meanfield, validate
from isometry.activations import Activation

__all__ = [
    "DKS_ACTIVATIONS",
    "LOCAL_KEYS",
    "NORMALIZED_TOLERANCE",
    "TAT_ACTIVATIONS",
    "TOLERANCE",
    "ShapedActivation",
    "ShapingError",
    "Transform",
    "compound_c_map",
    "dks",
    "local_maps",
    "tat",
]

TOLERANCE = 1e-8
"""Largest accepted residual of any shaping condition (float64, toolkit quadrature)."""

DKS_ACTIVATIONS = ("elu", "erf", "gelu", "selu", "sigmoid", "silu", "softplus", "swish", "tanh")
"""Catalog activations DKS transforms (``phi'`` exists, ``C`` is smooth enough at 1)."""

TAT_ACTIVATIONS = (
    "leaky_relu",
    "elu",
    "erf",
    "gelu",
    "sigmoid",
    "silu",
    "softplus",
    "swish",
    "tanh",
)
"""Catalog activations TAT transforms: leaky ReLU (the ``eta`` variant) and smooth ones
(the ``tau`` variant; ``C''(1) = E[phi''^2]`` must be finite, so ``phi'`` continuous)."""

_NO_TRANSFORM = {
    "relu": "ReLU is not smooth and has one degree of freedom too few (its C-map cannot be "
    "shaped with Q'(1) = 1); use 'leaky_relu' with TAT",
    "prelu": "a learnable slope has no fixed C-map; use 'leaky_relu' with TAT",
    "hard_tanh": "hard-tanh is piecewise linear with two kinks: no smooth C-map to shape",
    "linear": "a linear activation has C(c) = c for every transform (C'(1) = 1 always)",
    "sin": "sin is periodic: its shaped C-maps have many spurious solutions",
    "leaky_relu": "DKS shapes smooth activations; leaky ReLU is shaped by TAT (shaping.tat)",
    "selu": "SELU's derivative jumps at 0, so C''(1) = E[phi''^2] is infinite",
}


class ShapingError(ValueError):
    """The solver found no transform meeting the conditions to :data:`TOLERANCE`."""


@dataclasses.dataclass(frozen=True)
class Transform:
    """What a shaping transform solved for and how well the result meets its conditions.

    Attributes:
        method: ``"dks"``, ``"tat"`` (smooth, ``tau``) or ``"tat"`` with ``negative_slope``.
        base: the untransformed activation.
        depth: ``L``, the number of nonlinear layers the transform is for.
        target: ``zeta`` (DKS), ``tau`` (smooth TAT) or ``eta`` (leaky-ReLU TAT).
        alpha, beta, gamma, delta: ``phi_hat(x) = gamma (phi(alpha x + beta) + delta)``.
        negative_slope: leaky-ReLU TAT's slope ``a`` (``None`` otherwise).
        residuals: ``(condition, value - target)`` pairs, evaluated by the mean-field
            route on the returned activation (all below :data:`TOLERANCE` in magnitude).
    """

    method: str
    base: Activation
    depth: int
    target: float
    alpha: float
    beta: float
    gamma: float
    delta: float
    negative_slope: float | None = None
    residuals: tuple[tuple[str, float], ...] = ()

    @property
    def max_residual(self) -> float:
        return max(abs(v) for _, v in self.residuals)


@dataclasses.dataclass(frozen=True, repr=False)
class ShapedActivation(Activation):
    """An :class:`~isometry.activations.Activation` made by :func:`dks` or :func:`tat`.

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


def _shaped(method: str, base: Activation, alpha, beta, gamma, delta) -> ShapedActivation:
    params = {"alpha": alpha, "beta": beta, "gamma": gamma, "delta": delta}
    return ShapedActivation(
        name=f"{method}:{base.name}",
        fn=_Affine(base),
        deriv=_AffineDeriv(base),
        params=tuple(sorted((k, float(v)) for k, v in params.items())),
        kinks=tuple((k - beta) / alpha for k in base.kinks),
        piecewise_linear=base.piecewise_linear,
    )


# --------------------------------------------------------------------------- #
# Local maps of phi_hat at q = 1, in the base activation's coordinates.
# --------------------------------------------------------------------------- #


def _moments(base: Activation, p, curvature: bool = False, quad=gaussian.PRECISE):
    """Local-map quantities of ``phi_hat`` for ``p = (alpha, beta, delta)`` (``delta = None``:
    the DKS choice ``-E[phi(alpha z + beta)]``); returns a dict of scalars (``c_curv`` only
    with ``curvature``).

    ``x = beta + alpha z``: panels go at the base's features in ``x``.
    """
    alpha, beta, delta = p
    z, w = gaussian.nodes([(beta, alpha, quad.features(base.kinks))], quad)
    x = beta + alpha * z
    f, d = base.phi(x), base.dphi(x)
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


def _residual(base: Activation, method: str, p, local_target):
    """The conditions Newton's method zeroes, ``p = (alpha, beta)`` (DKS) or
    ``(alpha, beta, delta)`` (TAT); ``local_target`` is ``zeta^(1/L)`` or ``tau / L``."""
    if method == "dks":
        m = _moments(base, (p[0], p[1], None))
        return jnp.stack([m["q_slope"] - 1.0, m["c_slope"] - local_target])
    m = _moments(base, (p[0], p[1], p[2]), curvature=True)
    return jnp.stack([m["q_slope"] - 1.0, m["c_slope"] - 1.0, m["c_curv"] - local_target])


@functools.partial(jax.jit, static_argnames=("base", "method"))
def _residual_and_jacobian(base: Activation, method: str, p, local_target):
    """``(r(p), dr/dp)`` in one compiled program (forward mode)."""
    r = functools.partial(_residual, base, method, local_target=local_target)
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


_STARTS = {  # alpha (input scale), beta (input shift), delta (output shift): as in Martens 2021
    "alpha": (1.0, 0.1, 0.5, 2.0),
    "beta": (0.0, 1.0, -1.0, 0.5),
    "delta": (0.0, 1.0, -1.0),
}


def _solve_smooth(base: Activation, method: str, local_target: float):
    """``(alpha, beta, gamma, delta)`` of the first start from which Newton converges
    (``max |r| < 1e-12``) to ``alpha > 0`` (and, for TAT, ``alpha gamma < 2``: the
    reference implementation rejects the other, unstable solutions); ``None`` if none does."""
    names = ("alpha", "beta") if method == "dks" else ("alpha", "beta", "delta")
    with jax.enable_x64(True):
        target = jnp.float64(local_target)

        def fn(p):
            res, jac = _residual_and_jacobian(base, method, jnp.asarray(p), target)
            return np.asarray(res), np.asarray(jac)

        for p0 in itertools.product(*(_STARTS[n] for n in names)):
            p = _newton(fn, p0)
            if p is None or p[0] <= 0:
                continue
            m = _moments(base, (p[0], p[1], None if method == "dks" else p[2]))
            gamma, delta = float(m["gamma"]), float(m["delta"])
            if method == "tat" and p[0] * gamma >= 2.0:
                continue
            return float(p[0]), float(p[1]), gamma, delta
    return None


# --------------------------------------------------------------------------- #
# The mean-field route: checks on the returned activation.
# --------------------------------------------------------------------------- #


LOCAL_KEYS = ("Q1", "Q_slope", "mean", "C_slope", "C_curv", "Cf0")
"""What :func:`local_maps` can evaluate."""


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


NORMALIZED_TOLERANCE = 1e-6
"""Largest ``|Q(1) - 1|`` of an activation taken as normalized by :func:`compound_c_map`."""


def compound_c_map(act: Activation | str, c, depth: int) -> jax.Array:
    """``C_f(c) = C^L(c)``: :func:`isometry.meanfield.iterate_c_map` of ``depth`` layers at
    ``q = 1``, ``sigma_w2 = 1``, no bias (float64). ``c`` any shape; returns ``c``'s shape.

    The compound C-map of Martens et al. 2021 (arXiv 2110.01765, section 3) holds
    the length at ``q = 1``, so the activation must be normalized, ``Q(1) =
    E[phi(z)^2] = 1`` (within :data:`NORMALIZED_TOLERANCE`), as the activations
    of :func:`dks` and :func:`tat` are.

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


def _checked(act: ShapedActivation, transform: Transform, conditions) -> ShapedActivation:
    """``act`` with ``transform`` and its residuals (mean-field route) attached; raises
    :class:`ShapingError` if any exceeds :data:`TOLERANCE`."""
    m = local_maps(act, transform.depth, keys=tuple(key for _, (key, _) in conditions))
    residuals = tuple((name, float(m[key]) - target) for name, (key, target) in conditions)
    transform = dataclasses.replace(transform, residuals=residuals)
    bad = [(n, v) for n, v in residuals if not abs(v) <= TOLERANCE]
    if bad:
        raise ShapingError(
            f"{transform.method}({transform.base.name}, depth={transform.depth}, "
            f"target={transform.target}): the solution misses {bad} (tolerance {TOLERANCE:g})"
        )
    return dataclasses.replace(act, transform=transform)


# --------------------------------------------------------------------------- #
# Public transforms.
# --------------------------------------------------------------------------- #


def _base(act, method: str) -> Activation:
    """The base activation, or a ``ValueError`` saying why ``method`` cannot transform it."""
    act = activations.get(act)
    if isinstance(act, ShapedActivation):
        raise ValueError(f"{method}: activation {act.name!r} is already shaped")
    allowed = TAT_ACTIVATIONS if method == "tat" else DKS_ACTIVATIONS
    if act.name in allowed or (
        act.name not in _NO_TRANSFORM and not act.kinks and act.name not in activations.names()
    ):
        return act
    why = _NO_TRANSFORM.get(act.name, "its local C-map is not smooth")
    raise ValueError(
        f"{method}: no transform exists for activation {act.name!r} ({why}); "
        f"supported: {', '.join(allowed)} or a smooth custom activation"
    )


def _depth(depth) -> int:
    if isinstance(depth, float) and depth.is_integer():
        depth = int(depth)
    return validate.positive_int("depth", depth)


def dks(act: Activation | str, depth: int, zeta: float = 1.5) -> ShapedActivation:
    """Deep Kernel Shaping: ``phi_hat(x) = gamma (phi(alpha x + beta) + delta)`` with

        Q(1) = 1,  Q'(1) = 1,  E[phi_hat(z)] = 0,  C'(1) = zeta^(1/L),

    so that an ``L = depth``-layer vanilla network (orthogonal weights,
    ``sigma_w2 = 1``, no bias, inputs with ``||x||^2 / N = 1``) has the
    compound C-map slope ``C_f'(1) = zeta`` and ``C_f(0) = 0`` (Martens et
    al. 2021, arXiv 2110.01765, eqs. of section 5; ``zeta = 1.5`` is their
    default). The result's ``transform`` holds ``alpha, beta, gamma, delta``
    and the residuals (all below 1e-8).

    Args:
        act: a name in :data:`DKS_ACTIVATIONS` or a smooth custom activation.
        depth: ``L >= 1``, the number of nonlinear layers.
        zeta: the compound slope, ``> 1``.

    Raises:
        ValueError: bad ``depth``/``zeta``, or an activation with no transform
            (ReLU: not smooth; linear: ``C'(1) = 1`` always; ...).
        ShapingError: no start converges, or the result misses a condition.
    """
    base = _base(act, "dks")
    depth = _depth(depth)
    validate.real_array("zeta", zeta, minimum=1.0, strict=True)
    if not zeta > 1.0:
        raise ValueError(f"zeta must be > 1 (a compound slope of 1 is the linear map), got {zeta}")
    return _dks(base, depth, float(zeta))


@functools.lru_cache(maxsize=256)
def _dks(base: Activation, depth: int, zeta: float) -> ShapedActivation:
    local = zeta ** (1.0 / depth)
    sol = _solve_smooth(base, "dks", local)
    if sol is None:
        raise ShapingError(
            f"dks: Newton's method found no transform of {base.name!r} "
            f"for depth={depth}, zeta={zeta} (C'(1) target {local:.6g})"
        )
    act = _shaped("dks", base, *sol)
    t = Transform("dks", base, depth, zeta, *sol)
    conditions = (
        ("Q(1) - 1", ("Q1", 1.0)),
        ("Q'(1) - 1", ("Q_slope", 1.0)),
        ("E[phi_hat]", ("mean", 0.0)),
        ("C'(1) - zeta^(1/L)", ("C_slope", local)),
    )
    return _checked(act, t, conditions)


def tat(
    act: Activation | str, depth: int, eta: float = 0.9, *, tau: float = 0.3
) -> ShapedActivation:
    """Tailored Activation Transformation (Zhang, Botev & Martens 2022, arXiv 2203.08120).

    Leaky ReLU: ``phi_hat(x) = sqrt(2 / (1 + a^2)) leaky_relu_a(x)`` with the
    negative slope ``a`` chosen so that the compound C-map of ``L = depth``
    layers has ``C_f(0) = eta`` (``Q(1) = 1``, ``C'(1) = 1`` hold for any
    ``a``). A small ``eta`` is a nearly linear network; the paper uses 0.9.

    Smooth activations: ``phi_hat(x) = gamma (phi(alpha x + beta) + delta)`` with

        Q(1) = 1,  Q'(1) = 1,  C'(1) = 1,  C''(1) = tau / L,

    so that ``C_f''(1) = tau`` (the paper's default ``tau = 0.3``; ``eta`` is unused).

    Raises:
        ValueError: ``depth < 1``, ``eta`` outside ``(0, 1)``, ``tau <= 0``, an
            activation with no transform (ReLU: one degree of freedom too few,
            use leaky ReLU; SELU: ``phi'`` jumps, ``C''(1)`` infinite; ...), or a
            depth too shallow to reach ``eta`` with leaky ReLU.
        ShapingError: the solver does not converge or misses a condition.
    """
    base = _base(act, "tat")
    depth = _depth(depth)
    validate.real_array("eta", eta)
    if not 0.0 < eta < 1.0:
        raise ValueError(f"eta must lie in (0, 1), got {eta}")
    validate.real_array("tau", tau, minimum=0.0, strict=True)
    if base.name == "leaky_relu":
        return _tat_leaky(depth, float(eta))
    return _tat_smooth(base, depth, float(tau))


@functools.lru_cache(maxsize=256)
def _tat_smooth(base: Activation, depth: int, tau: float) -> ShapedActivation:
    sol = _solve_smooth(base, "tat", tau / depth)
    if sol is None:
        raise ShapingError(
            f"tat: Newton's method found no transform of {base.name!r} for depth={depth}, tau={tau}"
        )
    t = Transform("tat", base, depth, tau, *sol)
    conditions = (
        ("Q(1) - 1", ("Q1", 1.0)),
        ("Q'(1) - 1", ("Q_slope", 1.0)),
        ("C'(1) - 1", ("C_slope", 1.0)),
        ("C''(1) - tau/L", ("C_curv", tau / depth)),
    )
    return _checked(_shaped("tat", base, *sol), t, conditions)


def _leaky_cf0(depth: int):
    """``a -> C_f(0)`` for leaky ReLU of slope ``a``: the closed-form C-map
    (:attr:`Activation.kernel` of ``leaky_relu``, Cho & Saul 2009) iterated ``depth`` times."""
    leaky = activations.get("leaky_relu")

    def cf0(a):
        norm = leaky.second_moment(1.0, negative_slope=a)
        step = lambda c, _: (leaky.kernel(1.0, 1.0, c, negative_slope=a) / norm, None)  # noqa: E731
        return jax.lax.scan(step, jnp.zeros_like(a), None, length=depth)[0]

    return jax.jit(cf0)


@functools.lru_cache(maxsize=256)
def _tat_leaky(depth: int, eta: float) -> ShapedActivation:
    with jax.enable_x64(True):
        cf0 = _leaky_cf0(depth)
        lo, hi = 0.0, 1.0  # C_f(0) falls from C_relu^L(0) at a = 0 to 0 at a = 1 (linear)
        top = float(cf0(jnp.float64(lo)))
        if top <= eta:
            raise ValueError(
                f"tat: a {depth}-layer leaky-ReLU network cannot reach C_f(0) = eta = {eta}: "
                f"even ReLU (a = 0) gives {top:.6g}; use a smaller eta or more depth"
            )
        for _ in range(200):  # bisection: C_f(0) decreases in a
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if float(cf0(jnp.float64(mid))) > eta else (lo, mid)
            if hi - lo < 1e-15:
                break
    a = 0.5 * (lo + hi)
    base = activations.get("leaky_relu", negative_slope=a)
    gamma = math.sqrt(2.0 / (1.0 + a * a))
    t = Transform("tat", base, depth, eta, 1.0, 0.0, gamma, 0.0, negative_slope=a)
    conditions = (("Q(1) - 1", ("Q1", 1.0)), ("C_f(0) - eta", ("Cf0", eta)))
    return _checked(_shaped("tat", base, 1.0, 0.0, gamma, 0.0), t, conditions)


# --------------------------------------------------------------------------- #
# Names: "dks:<base>" and "tat:<base>" in isometry.activations.get.
# --------------------------------------------------------------------------- #


def _by_name(fn, **defaults):
    def factory(base: str, **params):
        unknown = set(params) - {"depth", *defaults}
        if unknown or "depth" not in params:
            allowed = ", ".join(["depth", *defaults])
            raise ValueError(
                f"activation '{fn.__name__}:{base}': parameters are {allowed} (depth required); "
                f"got {sorted(params)}"
            )
        return fn(base, **params)

    return factory


activations.register_transform("dks", _by_name(dks, zeta=1.5))
activations.register_transform("tat", _by_name(tat, eta=0.9, tau=0.3))
