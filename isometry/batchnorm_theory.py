"""Mean-field theory of batch normalization at initialization (Yang et al. 2019).

A batch-normalized layer acts on each unit's batch vector ``h_i`` (``B``
entries, one per example) as

    x_i = phi(n(h_i)),   n(h) = sqrt(B) G h / ||G h||,   G = I - 1 1^T / B,

(``(h - mean) / std`` over the batch, unit gain, zero offset), and
``h^l = x^{l-1} W^l`` with ``W_ij ~ N(0, sigma_w2 / N)`` (or ``sqrt(sigma_w2)``
times a Haar-orthogonal matrix). In the wide limit the units' batch vectors are
independent ``N(0, sigma_w2 K^{l-1})`` with ``K^l = (1/N) X^l X^l^T`` the
``B x B`` batch Gram matrix, and the forward map is
``K^l = E[phi(n(h)) phi(n(h))^T]`` (``sigma_w2`` drops out).

**Forward: the BSB1 fixed point.** When ``G K G`` is proportional to ``G``
(any Gram matrix with equal diagonal and equal off-diagonal entries, "BSB1",
e.g. independent inputs of equal norms), ``G h`` is isotropic in the
``(B - 1)``-dimensional space orthogonal to the all-ones vector, so
``n = sqrt(B) v`` with ``v`` uniform on the unit sphere of that space, and
``K^l`` is the BSB1 matrix

    K*_aa = E[phi(n_1)^2] = d*,   K*_ab = E[phi(n_1) phi(n_2)] = c*   (a != b),

reached in one layer. The pair ``(n_1, n_2)`` is the projection of a uniform
point of the ``(B - 2)``-sphere of radius ``sqrt(B - 1)`` onto two unit
directions with cosine ``-1/(B - 1)``; its density on the disk is
proportional to ``(1 - |s|^2)^((B - 5)/2)`` (``s = n / sqrt(B - 1)``). All
expectations here are quadratures over that disk (no Monte Carlo): polar
coordinates ``s = sin(psi) (cos theta, sin theta)``, which turn the radial
weight into the smooth ``sin(psi) cos(psi)^(B - 4)``, composite
Gauss-Legendre in ``psi`` (panels at ``|n| = 1, 2, 3, 4, 6, 9, 13``) and in
``theta`` (panels split where ``n_1 = 0`` or ``n_2 = 0``, so ReLU-type kinks
at 0 never fall inside a panel).

**Backward: the gradient rate.** With gradient independence, the Gram matrix
of the backpropagated gradients ``Pi^l = (1/N) sum_i g_i g_i^T``
(``g_i = dLoss/dx^l_i``) obeys ``Pi^{l-1} = sigma_w2 E[J^T Pi^l J]`` with
``J = dphi(n(h))/dh = diag(phi'(n)) sqrt(B)/||G h|| (G - v v^T)``. At the
fixed point ``||G h||^2 = sigma_w2 (d* - c*) r^2``, ``r^2 ~ chi^2_{B-1}``
independent of ``v``, and ``E[1/r^2] = 1/(B - 3)``, so

    Pi^{l-1} = T(Pi^l),   T(Pi) = B / ((d* - c*)(B - 3)) E_v[P_v D Pi D P_v],
    P_v = G - v v^T,  D = diag(phi'(sqrt(B) v)).

``T`` commutes with permutations of the batch and maps into matrices supported
on ``1^perp``; the only such permutation-invariant matrix is ``G``, so
``T(G) = lambda G``, and ``T(Pi)`` of any permutation-invariant ``Pi`` (the
identity, from a random-projection loss) is already proportional to ``G``.
Squared gradient norms then grow by

    lambda = B / ((d* - c*)(B - 3)(B - 1)) E[tr(P_v D G D P_v)]

per layer toward the input, with (``f = phi'(n)``, ``n = sqrt(B) v``)

    E tr = (B - 2) E f_1^2 + (E f_1^2 + (B - 1) E f_1 f_2) / B
           - (B - 1) (E[f_1^2 n_1^2] - E[f_1 n_1 f_2 n_2]) / B.

That ``lambda`` is the largest eigenvalue of ``T`` is checked, not assumed:
``tests/test_batchnorm_theory.py`` builds ``T`` by Monte Carlo from
autodiff Jacobians of the normalization and compares its top eigenvalue and
eigenvector. Closed forms: linear ``phi`` gives ``lambda = (B - 2)/(B - 3)``
(``E[P_v] = (B - 2)/(B - 1) G``); ReLU tends to ``pi / (pi - 1) ~ 1.467`` as
``B`` grows (``d* - c* -> 1/2 - 1/(2 pi)``, ``E f^2 = 1/2``). ``B >= 4`` is
needed (``E[1/r^2]`` diverges at ``B = 3``; at ``B = 2`` the gradient vanishes).

**Per-layer profiles.** ``||dLoss/dW^l||^2 = N^2 tr(K^{l-1} Pi_h^l)`` grows by
exactly ``lambda`` per layer from the last layer to the first, whatever the
input scale (batch normalization makes ``W^1``'s gradient scale-free). The
gradient with respect to the pre-normalization ``h^l`` carries
``1/||G h^l||^2``: it grows by ``lambda`` for ``l >= 2`` and the first layer,
whose input has Gram ``q0 I`` instead of ``K*``, differs by ``(d* - c*)/q0``.

Accuracy: float64 quadrature of ``lambda`` for linear, ReLU and tanh agrees
with closed forms and a twice-finer rule to better than 1e-11 at
``4 <= B <= 4096`` (tests); activations with kinks away from 0 (hard-tanh,
whose kinks at ``n = +-1`` cut across the panels) converge only
algebraically: relative error ~1e-3 at the default ``points = 24`` (against
96), so pass a larger ``points`` for them.

Reference: Yang, Pennington, Rao, Sohl-Dickstein & Schoenholz 2019, "A mean
field theory of batch normalization" (ICLR), Sections 3-4 (BSB1 fixed point,
gradient explosion, ``pi/(pi - 1)`` for ReLU).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from isometry import validate
from isometry.activations import Activation
from isometry.activations import get as get_activation

__all__ = [
    "BatchNormTheory",
    "check_batch",
    "fixed_point",
    "gradient_profile",
    "gradient_rate",
    "pair_expectation",
    "pair_nodes",
]

Array = jax.Array

# Radial panel edges in |n| (the BN output's scale is 1); beyond 13 the density is < e^-80.
_RADII = (1.0, 2.0, 3.0, 4.0, 6.0, 9.0, 13.0)


def check_batch(batch) -> int:
    """``batch`` as an ``int >= 4``, else a ``ValueError`` naming the range."""
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 4:
        raise ValueError(
            "batch must be an integer >= 4 for the mean-field batch-norm theory "
            f"(E[1/chi^2_(B-1)] = 1/(B - 3) diverges at B = 3), got {batch!r}"
        )
    return int(batch)


def _panels(edges: np.ndarray, points: int) -> tuple[np.ndarray, np.ndarray]:
    """Composite Gauss-Legendre nodes and weights on the sorted ``edges``."""
    x, w = np.polynomial.legendre.leggauss(points)
    a, b = edges[:-1, None], edges[1:, None]
    return ((a + b) / 2 + (b - a) / 2 * x).ravel(), ((b - a) / 2 * w).ravel()


@functools.lru_cache(maxsize=64)
def _pair_rule(batch: int, points: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = batch - 1
    rho = -1.0 / k
    # psi: s = sin(psi), n-radius sqrt(k) sin(psi); weight sin(psi) cos(psi)^(B-4).
    # Panels past the sphere's radius have zero width: the rule's size does not depend on B.
    r_edges = [np.arcsin(min(r / np.sqrt(k), 1.0)) for r in _RADII]
    psi, wp = _panels(np.asarray([0.0, *r_edges, np.pi / 2]), points)
    wp = wp * np.sin(psi) * np.cos(psi) ** (batch - 4)
    # theta: split where n_1 = 0 (cos theta = 0) or n_2 = 0 (rho cos + sqrt(1-rho^2) sin = 0).
    t2 = np.arctan2(-rho, np.sqrt(1 - rho * rho))
    cuts = np.mod([np.pi / 2, 3 * np.pi / 2, t2, t2 + np.pi], 2 * np.pi)
    theta, wt = _panels(np.asarray([0.0, *np.sort(cuts), 2 * np.pi]), points)
    s = np.sin(psi)[:, None] * np.sqrt(k)
    n1 = s * np.cos(theta)[None, :]
    n2 = s * (rho * np.cos(theta) + np.sqrt(1 - rho * rho) * np.sin(theta))[None, :]
    w = wp[:, None] * wt[None, :]
    return n1.ravel(), n2.ravel(), (w / w.sum()).ravel()


def pair_nodes(batch: int, points: int = 24, dtype=None) -> tuple[Array, Array, Array]:
    """Nodes ``(n_1, n_2)`` and weights ``w`` for ``E[f(n_1, n_2)]``, each ``(M,)``.

    ``n = sqrt(B) G h / ||G h||`` for ``h`` with a BSB1 covariance (two
    entries of a batch-normalized batch vector at the fixed point); see the
    module docstring for the law and the rule. ``points`` Gauss-Legendre
    nodes per panel; ``M = 8 points x 5 points`` (8 radial panels, some of zero
    width for small ``B``, and 5 angular ones: the same size for every ``B``).
    """
    batch = check_batch(batch)
    validate.positive_int("points", points, 2)
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    return tuple(jnp.asarray(a, dtype) for a in _pair_rule(batch, points))


def pair_expectation(f, batch: int, *, points: int = 24, dtype=None) -> Array:
    """``E[f(n_1, n_2)]`` over two entries of a batch-normalized batch vector (BSB1 law).

    ``f(n1, n2)`` acts elementwise on arrays and may return a pytree of arrays.
    """
    n1, n2, w = pair_nodes(batch, points, dtype)
    return jax.tree.map(lambda v: jnp.sum(w * v), f(n1, n2))


def fixed_point(act: Activation | str, batch: int, *, points: int = 24) -> tuple[Array, Array]:
    """``(d*, c*)``: diagonal and off-diagonal entries of the BSB1 batch Gram matrix ``K*``.

    ``d* = E[phi(n_1)^2]``, ``c* = E[phi(n_1) phi(n_2)]`` for ``x = phi(BN(h))``
    (linear: ``(1, -1/(B - 1))``).
    """
    return _fixed_point(get_activation(act), *pair_nodes(batch, points))


@functools.partial(jax.jit, static_argnums=0)
def _fixed_point(act: Activation, n1: Array, n2: Array, w: Array) -> tuple[Array, Array]:
    p1, p2 = act.phi(n1), act.phi(n2)
    return jnp.sum(w * p1 * p1), jnp.sum(w * p1 * p2)


def gradient_rate(act: Activation | str, batch: int, *, points: int = 24) -> Array:
    """``lambda``: growth of squared gradient norms per layer toward the input (scalar).

        lambda = B / ((d* - c*)(B - 3)(B - 1)) E[tr(P_v D G D P_v)]

    (module docstring). Linear: ``(B - 2)/(B - 3)``; ReLU: ``-> pi/(pi - 1)``.
    """
    B = check_batch(batch)
    n1, n2, w = pair_nodes(B, points)
    return _rate(get_activation(act), n1, n2, w, jnp.asarray(B, w.dtype))


@functools.partial(jax.jit, static_argnums=0)
def _rate(act: Activation, n1: Array, n2: Array, w: Array, B: Array) -> Array:
    fa, fb, pa, pb = act.dphi(n1), act.dphi(n2), act.phi(n1), act.phi(n2)
    moments = (pa * pa, pa * pb, fa * fa, fa * fb, fa * fa * n1 * n1, fa * n1 * fb * n2)
    d, c, f11, f12, g11, g12 = (jnp.sum(w * m) for m in moments)
    trace = (B - 2) * f11 + (f11 + (B - 1) * f12) / B - (B - 1) * g11 / B
    trace = trace + (B - 1) * g12 / B
    return B * trace / ((d - c) * (B - 3) * (B - 1))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BatchNormTheory:
    """Mean-field per-layer gradients of a batch-normalized network, ``(L,)`` each.

    ``grad_preact_sq``: ``||dLoss/dh^l||^2`` (``h`` before the normalization)
    and ``grad_weight_sq``: ``||dLoss/dW^l||^2``, both relative to the last
    layer (1 there); ``rate``: ``lambda``; ``d_star``, ``c_star``: ``K*``.
    """

    grad_preact_sq: Array
    grad_weight_sq: Array
    rate: Array
    d_star: Array
    c_star: Array


def gradient_profile(
    act: Activation | str, batch: int, depth: int, q0=1.0, *, points: int = 24
) -> BatchNormTheory:
    """Per-layer gradients of ``x^l = phi(BN(x^{l-1} W^l))``, ``l = 1..L``, relative to layer L.

        ||g_W^l||^2 / ||g_W^L||^2 = lambda^(L - l)
        ||g_h^l||^2 / ||g_h^L||^2 = lambda^(L - l)  (l >= 2),   times (d* - c*)/q0 at l = 1

    for inputs with batch Gram ``q0 I`` (independent examples of mean square ``q0``).
    """
    depth = validate.positive_int("depth", depth)
    validate.real_array("q0", q0, minimum=0.0, strict=True)
    lam = gradient_rate(act, batch, points=points)
    d, c = fixed_point(act, batch, points=points)
    w = lam ** jnp.arange(depth - 1, -1, -1, dtype=lam.dtype)
    first = jnp.where(jnp.arange(depth) == 0, (d - c) / q0, 1.0) if depth > 1 else 1.0
    return BatchNormTheory(w * first, w, lam, d, c)
