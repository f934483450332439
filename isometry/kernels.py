"""Infinite-width kernels of deep fully connected networks: NNGP and NTK.

For inputs ``x`` of shape ``(n, d)`` and the network

    h^1 = W^1 x + b^1,   h^{l+1} = W^{l+1} phi(h^l) + b^{l+1},
    W_ij ~ N(0, sigma_w2 / fan_in),   b_i ~ N(0, sigma_b2),

the pre-activations of layer ``l`` are, in the wide limit, a Gaussian process
with covariance ``K^l (n, n)`` (the NNGP kernel; Neal 1996, Lee et al. 2018,
Matthews et al. 2018):

    K^1      = sigma_w2 x x^T / d + sigma_b2,
    K^{l+1}  = sigma_w2 E[phi(u) phi(u')] + sigma_b2,      (u, u') ~ N(0, K^l).

In the NTK parameterization (``h = sqrt(sigma_w2 / fan_in) W x + sigma_b b``
with ``W, b`` standard normal and all trained), the neural tangent kernel of
layer ``l``, ``Theta^l = sum_params J J^T``, is deterministic in the wide
limit and obeys (Jacot, Gabriel & Hongler 2018; Lee et al. 2019, eq. 9):

    Theta^1     = K^1,
    Theta^{l+1} = K^{l+1} + sigma_w2 Kdot^l * Theta^l,    Kdot^l = E[phi'(u) phi'(u')],

``*`` elementwise. Entry ``(i, j)`` needs the variances ``q_i = K_ii``,
``q_j = K_jj`` (unequal in general) and the correlation
``c_ij = K_ij / sqrt(q_i q_j)``: that is exactly the mean-field length map on
the diagonal (:func:`isometry.meanfield.q_map`) and the correlation map off
it (:func:`isometry.meanfield.c_map` at equal lengths). The diagonal is
computed by the one-dimensional expectations of :mod:`isometry.gaussian`
(closed forms where the activation has them), the off-diagonal entries by its
two-dimensional ones (:func:`isometry.gaussian.phi_kernel`,
:func:`isometry.gaussian.deriv_kernel`: the activation's closed form, e.g.
the arc-cosine kernels of ReLU (Cho & Saul 2009) or the arcsine kernel of erf
(Williams 1997), else the feature-aware quadrature, float64-accurate; see
that module). ``method="series"`` replaces the two-dimensional quadrature by
Mehler's formula on the activation's Hermite coefficients (one matrix
product per layer; for smooth activations without closed forms; see
:func:`layers`).

The condition number of the NTK bounds how fast gradient descent fits the
training set: the slowest mode relaxes ``kappa = lambda_max / lambda_min``
times slower than the fastest, whose rate the largest stable learning rate
``2 / lambda_max`` fixes (Xiao, Pennington & Schoenholz 2020, "Disentangling
trainability and generalization in deep neural networks").
:func:`condition_number` gives ``kappa``.

Every function takes ``act`` (an :class:`~isometry.activations.Activation`
or its name). All are jittable (``act``, ``depth``, ``method`` static;
argument checks run only on concrete values), and follow the dtype of ``x``.
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

__all__ = ["Kernels", "condition_number", "layers", "nngp", "ntk"]

Array = jax.Array

METHODS = ("quadrature", "series")
_PAIR_CHUNK = 256  # pairs per quadrature batch: bounds memory at (chunk x nodes^2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Kernels:
    """The kernels of layers ``1..depth``.

    Attributes:
        nngp: ``(depth, n, n)``, ``nngp[l - 1] = K^l``.
        ntk: ``(depth, n, n)``, ``ntk[l - 1] = Theta^l``.
    """

    nngp: Array
    ntk: Array


def _check(x, depth, sigma_w2, sigma_b2, method, order) -> None:
    validate.positive_int("depth", depth)
    validate.real_array("sigma_w2", sigma_w2, minimum=0.0, strict=True)
    validate.real_array("sigma_b2", sigma_b2, minimum=0.0)
    validate.choice("method", method, METHODS)
    if order is not None:
        validate.positive_int("order", order)
    for name, v in (("sigma_w2", sigma_w2), ("sigma_b2", sigma_b2)):
        if jnp.ndim(v) != 0:
            raise ValueError(
                f"{name} must be a scalar (vmap over several), got shape {jnp.shape(v)}"
            )
    if not validate.is_concrete(x):
        return
    a = np.asarray(x)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"x must be a 2-D array (n inputs, d features), got shape {a.shape}")
    validate.real_array("x", a)
    zero = np.flatnonzero(np.sum(a.astype(float) ** 2, axis=1) == 0.0)
    if zero.size:
        raise ValueError(
            f"x has inputs of zero norm (rows {zero[:5].tolist()}); their correlation with "
            "other inputs is undefined"
        )


def layers(
    act: Activation | str,
    x,
    depth: int,
    sigma_w2,
    sigma_b2,
    *,
    method: str = "quadrature",
    order: int | None = None,
    quad: gs.Quadrature | None = None,
) -> Kernels:
    """NNGP and NTK of every layer ``1..depth`` in one scan over depth.

    Args:
        act: the activation ``phi``.
        x: inputs ``(n, d)``, no row zero.
        depth: number of layers ``L >= 1`` (layer 1 is ``W^1 x + b^1``).
        sigma_w2: weight variance ``> 0`` (scalar; traced under ``vmap``).
        sigma_b2: bias variance ``>= 0`` (scalar).
        method: ``"quadrature"`` (default): the activation's closed forms, else
            the 2-D feature-aware quadrature of :mod:`isometry.gaussian`
            (float64-accurate). ``"series"``: for activations without a closed
            form, Mehler's formula ``E[f(u) f(u')] = sum_k a_k(q_i) a_k(q_j)
            c^k`` with ``a_k(q) = E[f(sqrt(q) z) He_k(z)] / sqrt(k!)``
            (:func:`isometry.gaussian.hermite_coefficients`) truncated at
            ``order``: hundreds of times cheaper, accurate for smooth
            activations (tanh: relative error below 1e-10 for ``q <= 4`` at
            the default order, tested; the truncation error is largest at
            ``|c| = 1``, where it is the coefficients' tail beyond ``order``)
            and poor for kinked ones, whose coefficients decay slowly.
        order: the series' truncation (``method="series"`` only); default 192
            in float64, 96 in float32.
        quad: quadrature layout (default matched to the dtype).

    Returns:
        :class:`Kernels` with arrays ``(depth, n, n)`` of ``x``'s float dtype.
    """
    _check(x, depth, sigma_w2, sigma_b2, method, order)
    return _layers(get_activation(act), x, depth, sigma_w2, sigma_b2, method, order, quad)


def nngp(act: Activation | str, x, depth: int, sigma_w2, sigma_b2, **options) -> Array:
    """NNGP kernel ``K^depth (n, n)``: covariance of the layer-``depth`` pre-activations.

    ``K^1 = sigma_w2 x x^T / d + sigma_b2``, ``K^{l+1} = sigma_w2 E[phi(u) phi(u')] +
    sigma_b2`` with ``(u, u') ~ N(0, K^l)`` (Lee et al. 2018, eq. 4). ``options``
    as in :func:`layers`.
    """
    return layers(act, x, depth, sigma_w2, sigma_b2, **options).nngp[-1]


def ntk(act: Activation | str, x, depth: int, sigma_w2, sigma_b2, **options) -> Array:
    """Neural tangent kernel ``Theta^depth (n, n)``, NTK parameterization, all weights and
    biases trained.

    ``Theta^1 = K^1``, ``Theta^{l+1} = K^{l+1} + sigma_w2 Kdot^l * Theta^l``,
    ``Kdot^l = E[phi'(u) phi'(u')]`` at ``(u, u') ~ N(0, K^l)`` (Jacot et al.
    2018, Theorem 1; Lee et al. 2019, eq. 9). ``options`` as in :func:`layers`.
    """
    return layers(act, x, depth, sigma_w2, sigma_b2, **options).ntk[-1]


def condition_number(kernel) -> Array:
    """``kappa = lambda_max / lambda_min`` of symmetric kernels ``(..., n, n)`` -> ``(...)``.

    ``inf`` only for a singular symmetric kernel: where the smallest eigenvalue
    is not positive (exactly singular, or positive semi-definite with its
    smallest eigenvalue below rounding). A kernel with NaN or inf entries, or
    one that is not symmetric (``max |K - K^T| > sqrt(eps) max |K|`` for some
    matrix, ``eps`` of its dtype: the eigenvalue solver reads one triangle only),
    raises ``ValueError``; the checks run on concrete values only, so the
    function stays jittable (under ``jit`` such a kernel gives a meaningless
    number or ``inf``).
    """
    k = jnp.asarray(kernel)
    if validate.is_concrete(k):
        _check_kernel(k)
    lam = jnp.linalg.eigvalsh(k)
    lo, hi = lam[..., 0], lam[..., -1]
    return jnp.where(lo > 0, hi / jnp.where(lo > 0, lo, 1.0), jnp.inf)


def _check_kernel(k) -> None:
    """A concrete kernel stack ``(..., n, n)``: square, finite, symmetric to ``sqrt(eps)``."""
    if k.ndim < 2 or k.shape[-1] != k.shape[-2] or k.shape[-1] < 1:
        raise ValueError(f"kernel must be (..., n, n) with n >= 1, got shape {k.shape}")
    validate.finite_values("kernel", k)
    a = np.asarray(k)
    a = a if np.issubdtype(a.dtype, np.floating) else a.astype(np.float64)
    tol = float(np.sqrt(np.finfo(a.dtype).eps))
    asym = np.max(np.abs(a - np.swapaxes(a, -1, -2)), axis=(-2, -1))
    scale = np.max(np.abs(a), axis=(-2, -1))
    bad = asym > tol * scale
    if np.any(bad):
        i = np.unravel_index(
            np.argmax(np.where(bad, asym, 0.0) / np.where(bad, scale, 1.0)), bad.shape
        )
        raise ValueError(
            f"kernel must be symmetric: max |K - K^T| = {float(asym[i]):.3g} is above "
            f"{tol:.2g} x max |K| = {float(scale[i]):.3g}"
            + (f" (matrix {tuple(int(j) for j in i)})" if i else "")
        )


# --------------------------------------------------------------------------- #
# The recursion.
# --------------------------------------------------------------------------- #


@functools.partial(jax.jit, static_argnames=("act", "depth", "method", "order", "quad"))
def _layers(act, x, depth, sigma_w2, sigma_b2, method, order, quad) -> Kernels:
    x = jnp.asarray(x)
    x = x.astype(jnp.result_type(x, float))
    sw, sb = (jnp.asarray(v, x.dtype) for v in (sigma_w2, sigma_b2))
    if order is None:
        order = 192 if x.dtype == jnp.float64 else 96
    k1 = sw * (x @ x.T) / x.shape[1] + sb
    expectations = functools.partial(_expectations, act, method=method, order=order, quad=quad)

    def body(carry, _):
        k, theta = carry
        kphi, kdot = expectations(k)
        k_next = sw * kphi + sb
        theta_next = k_next + sw * kdot * theta
        return (k_next, theta_next), (k_next, theta_next)

    _, (ks, thetas) = lax.scan(body, (k1, k1), None, length=depth - 1)
    return Kernels(jnp.concatenate([k1[None], ks]), jnp.concatenate([k1[None], thetas]))


def _expectations(act, k, *, method, order, quad):
    """``(E[phi(u) phi(u')], E[phi'(u) phi'(u')]) (n, n)`` at ``(u, u') ~ N(0, k)``.

    Diagonal: the 1-D moments (the q-map's integrand and ``mu_1``); off it, the
    closed forms on the whole matrix, or the series, or the 2-D quadrature at
    ``(q_i, q_j, c_ij)`` on the upper triangle (in batches), mirrored.
    """
    q = jnp.diagonal(k)
    diag = (gs.second_moment(act, q, quad=quad), gs.dphi_moment(act, q, quad=quad))
    n = q.shape[0]
    if n == 1:
        return tuple(d[:, None] for d in diag)
    c = jnp.clip(k / jnp.sqrt(q[:, None] * q[None, :]), -1.0, 1.0)
    closed = act.kernel is not None and act.deriv_kernel is not None
    if method == "series" or closed:
        off = (
            _mehler(act, act.kernel, act.phi, q, c, order),
            _mehler(act, act.deriv_kernel, act.dphi, q, c, order),
        )
        return tuple(_with_diagonal(o, d) for o, d in zip(off, diag, strict=True))
    i, j = np.triu_indices(n, 1)
    pairs = (q[i], q[j], c[i, j])

    def both(p):
        return gs.phi_kernel(act, *p, quad=quad), gs.deriv_kernel(act, *p, quad=quad)

    upper = lax.map(both, pairs, batch_size=_PAIR_CHUNK)
    return tuple(_symmetric(u, d, i, j) for u, d in zip(upper, diag, strict=True))


def _symmetric(upper, diag, i, j):
    """The symmetric matrix with ``diag`` on the diagonal and ``upper`` at ``(i, j)``."""
    m = jnp.diag(diag)
    return m.at[i, j].set(upper).at[j, i].set(upper)


def _with_diagonal(m, diag):
    return m - jnp.diag(jnp.diagonal(m)) + jnp.diag(diag)


def _mehler(act, closed_form, f, q, c, order):
    """``E[f(u_i) f(u_j)] (n, n)`` by Mehler's formula, or the closed form if there is one.

    ``sum_k a_k(q_i) a_k(q_j) c_ij^k`` with the normalized Hermite coefficients
    ``a_k(q)`` of ``f(sqrt(q) z)``; the powers ``c^k`` by a cumulative product.
    """
    if closed_form is not None:
        qi, qj = q[:, None], q[None, :]
        return closed_form(qi, qj, c * jnp.sqrt(qi * qj), **act.kwargs)
    a = gs.hermite_coefficients(f, q, order)
    ones = jnp.ones((*c.shape, 1), c.dtype)
    powers = jnp.cumprod(jnp.concatenate([ones, jnp.repeat(c[..., None], order, -1)], -1), -1)
    return jnp.einsum("ijk,ik,jk->ij", powers, a, a, precision=lax.Precision.HIGHEST)
