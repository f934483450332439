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
method on ``(alpha, beta)`` solves the other two. Rectifiers, as dks does: ReLU keeps
``beta = +-1`` fixed and drops ``Q'(1) = 1`` (one degree of freedom too few; Newton on
``alpha``); leaky ReLU solves its negative slope and ``beta`` (``alpha = 1``). Of an odd
activation's two mirror-image solutions ``phi_hat(x)`` and ``-phi_hat(-x)`` (the same
conditions) the one with ``beta >= 0`` is returned.

TAT (Tailored Activation Transformations; Zhang, Botev & Martens 2022, "Deep
learning without shortcuts: shaping the kernel with tailored rectifiers",
arXiv 2203.08120) for leaky ReLU, ``phi_hat(x) = sqrt(2 / (1 + a^2))
leaky_relu_a(x)``, chooses the negative slope ``a`` so that ``C_f(0) = eta``
(the leaky-ReLU C-map has ``C'(1) = 1`` whatever ``a``; ``Q(1) = 1`` fixes
``gamma``). For smooth activations TAT (its section 4.4 and appendix) asks

    Q(1) = 1,   Q'(1) = 1,   C'(1) = 1,   C''(1) = tau / L,

so that ``C_f''(1) = tau`` (second derivatives add when slopes are 1), with
``(alpha, beta, delta)`` found by Newton's method and ``gamma`` from ``Q(1) = 1``.

Any architecture. A residual network, or a researcher's own model, is described by
its *subnetwork maximizing function* ``M(x, r_fn)`` (dks's convention; Martens et
al. 2021, section 5; Zhang et al. 2022, appendix B): pass it as
``subnet_max_func=`` instead of ``depth``, and the conditions bound the largest
compound slope, curvature or ``C_f(0)`` over the network's subnetworks
(:mod:`isometry.shaping.subnets`). :func:`subnet_max_func` derives it from an NNX
model's own computation through the theory engine (its residual sums and their
weights, the nonlinear layers on every path); the weighted residual blocks
(:class:`isometry.networks.WeightedResidual`, :class:`isometry.networks.WeightedResNet`)
and DKS's initializer (``initializers.get("suo")``) build such models.

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
    >>> act.transform.max_residual < 1e-8      # the conditions, re-checked by a second route
    True
"""

from __future__ import annotations

from isometry import activations
from isometry.shaping.maps import (
    LOCAL_KEYS,
    NORMALIZED_TOLERANCE,
    TOLERANCE,
    ShapedActivation,
    ShapingError,
    Transform,
    compound_c_map,
    local_maps,
)
from isometry.shaping.model import ModelMaxFunc, subnet_max_func
from isometry.shaping.subnets import chain
from isometry.shaping.transforms import DKS_ACTIVATIONS, TAT_ACTIVATIONS, dks, tat

__all__ = [
    "DKS_ACTIVATIONS",
    "LOCAL_KEYS",
    "NORMALIZED_TOLERANCE",
    "TAT_ACTIVATIONS",
    "TOLERANCE",
    "ModelMaxFunc",
    "ShapedActivation",
    "ShapingError",
    "Transform",
    "chain",
    "compound_c_map",
    "dks",
    "local_maps",
    "subnet_max_func",
    "tat",
]


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
