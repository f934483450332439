"""Lanczos and stochastic Lanczos quadrature: spectra of symmetric operators, matrix-free.

:func:`lanczos` tridiagonalizes an operator given as a matvec;
:func:`max_eigenvalue` reads its top Ritz value; :func:`slq` and
:func:`jacobian_slq` (``J^T J`` from ``jvp``/``vjp`` alone) give the
quadrature measure :class:`SLQResult`, smoothed by :func:`slq_density`
(Golub & Meurant 2010; Ubaru, Chen & Saad 2017; Chen, Trogdon & Ubaru 2021).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from isometry import validate

__all__ = ["SLQResult", "jacobian_slq", "lanczos", "max_eigenvalue", "slq", "slq_density"]

Array = jax.Array


def lanczos(matvec: Callable[[Array], Array], v0: Array, n_steps: int) -> tuple[Array, Array]:
    """Lanczos tridiagonalization with full reorthogonalization.

    For a symmetric operator ``A`` (given as ``matvec(v) = A v``, ``v (n,)``)
    and a start vector ``v0 (n,)``, builds an orthonormal Krylov basis
    ``V (n_steps, n)`` and ``T = V A V^T`` tridiagonal with diagonal ``alpha``
    and off-diagonal ``beta``. Every new vector is orthogonalized twice
    against all previous ones (classical Gram-Schmidt, twice is enough;
    Giraud et al. 2005), so no ghost eigenvalues appear. When the Krylov space
    is exhausted (``beta`` below ``n * eps * |alpha|``) the remaining vectors
    are zero and their Ritz values carry zero weight.

    Returns ``(alpha (n_steps,), beta (n_steps - 1,))``. Jittable and vmappable.
    """
    v0 = jnp.asarray(v0)
    n = v0.shape[-1]
    dtype = v0.dtype
    eps = jnp.finfo(dtype).eps
    V = jnp.zeros((n_steps, n), dtype).at[0].set(v0 / jnp.linalg.norm(v0))

    def body(j, state):
        V, alpha, beta, scale = state
        v = V[j]
        w = matvec(v)
        a = jnp.vdot(v, w)
        w = (
            w
            - a * v
            - jnp.where(j > 0, beta[jnp.maximum(j - 1, 0)], 0.0) * V[jnp.maximum(j - 1, 0)]
        )
        for _ in range(2):
            w = w - V.T @ (V @ w)
        b = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.abs(a) + b)
        ok = b > n * eps * scale
        vnext = jnp.where(ok, w / jnp.where(ok, b, 1.0), 0.0)
        V = jnp.where(j + 1 < n_steps, V.at[jnp.minimum(j + 1, n_steps - 1)].set(vnext), V)
        alpha = alpha.at[j].set(a)
        beta = beta.at[j].set(jnp.where(ok, b, 0.0))
        return V, alpha, beta, scale

    alpha = jnp.zeros(n_steps, dtype)
    beta = jnp.zeros(n_steps, dtype)
    _, alpha, beta, _ = lax.fori_loop(0, n_steps, body, (V, alpha, beta, jnp.zeros((), dtype)))
    return alpha, beta[:-1]


def _ritz(alpha, beta):
    """Ritz values and Gauss quadrature weights (squared first components)."""
    T = jnp.diag(alpha) + jnp.diag(beta, 1) + jnp.diag(beta, -1)
    theta, U = jnp.linalg.eigh(T)
    return theta, U[0] ** 2


def max_eigenvalue(matvec: Callable[[Array], Array], v0: Array, n_steps: int = 16) -> Array:
    """Largest eigenvalue of a symmetric operator from ``n_steps`` Lanczos steps.

    The largest Ritz value is a lower bound that converges geometrically in
    ``n_steps`` (Kaniel-Paige-Saad), much faster than power iteration.
    """
    alpha, beta = lanczos(matvec, v0, n_steps)
    theta, _ = _ritz(alpha, beta)
    return theta[-1]


@dataclasses.dataclass(frozen=True)
class SLQResult:
    """The SLQ quadrature measure ``(1/P) sum_p sum_j weights[p, j] delta(nodes[p, j])``.

    Attributes:
        nodes: Ritz values ``(n_probes, n_steps)``, eigenvalues of ``J^T J``.
        weights: quadrature weights ``(n_probes, n_steps)``; each row sums to 1.
        n: the operator's dimension.
    """

    nodes: Array
    weights: Array
    n: int

    def atoms(self) -> tuple[Array, Array]:
        """Pooled ``(nodes, weights)`` (weights sum to 1), for the distance functions."""
        P = self.nodes.shape[0]
        return self.nodes.ravel(), self.weights.ravel() / P

    def moment(self, k: int) -> Array:
        """``(1/n) tr (J^T J)^k`` by the quadrature (unbiased for ``k < 2 n_steps``)."""
        return jnp.mean(jnp.sum(self.weights * self.nodes**k, axis=1))


def slq(
    matvec: Callable[[Array], Array],
    n: int,
    key: Array,
    *,
    n_probes: int = 16,
    n_steps: int = 64,
    dtype=None,
) -> SLQResult:
    """Stochastic Lanczos quadrature of a symmetric operator's spectral density.

    ``rho(lambda) = (1/n) sum_i delta(lambda - lambda_i) ~= (1/P) sum_p sum_j
    tau_pj delta(lambda - theta_pj)`` where ``theta_pj`` are the Ritz values of
    ``n_steps`` Lanczos steps from the unit probe ``v_p`` and ``tau_pj`` the
    squared first components of their eigenvectors (Gauss quadrature of
    ``v_p^T f(A) v_p``; Golub & Meurant 2010, Ubaru et al. 2017).

    Choice of probes and steps (Chen, Trogdon & Ubaru 2021): probes are
    Rademacher vectors (``+-1/sqrt(n)``, the lowest-variance choice); each
    probe's measure differs from the true one by ``O((lambda_max -
    lambda_min) / sqrt(n))`` in Wasserstein-1, and averaging ``P`` probes
    divides that by ``sqrt(P)``; ``n_steps`` Gauss nodes add at most
    ``O((lambda_max - lambda_min) / n_steps)``. For wide networks (``n >=
    1000``) a few probes suffice; resolving a density with sharp features needs
    ``n_steps`` of 50-100. Cost: ``P * n_steps`` matvecs plus ``O(P n_steps^2 n)``
    for full reorthogonalization; memory ``O(P n_steps n)``.

    ``matvec`` maps ``(n,) -> (n,)`` and is vmapped over probes. ``dtype``
    defaults to the default float (float64 when x64 is enabled).
    """
    n = validate.positive_int("n", n)
    validate.prng_key("key", key)
    n_probes = validate.positive_int("n_probes", n_probes)
    n_steps = validate.positive_int("n_steps", n_steps)
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    probes = jax.random.rademacher(key, (n_probes, n), dtype=dtype) / jnp.sqrt(n).astype(dtype)
    alpha, beta = jax.vmap(lambda v: lanczos(matvec, v, n_steps))(probes)
    nodes, weights = jax.vmap(_ritz)(alpha, beta)
    return SLQResult(nodes=nodes, weights=weights, n=n)


def jacobian_slq(
    f: Callable[[Array], Array],
    x: Array,
    key: Array,
    *,
    n_probes: int = 16,
    n_steps: int = 64,
    dtype=None,
) -> SLQResult:
    """SLQ of ``J^T J`` for the Jacobian ``J = df/dx`` at ``x``, matrix-free.

    Only ``jvp`` and ``vjp`` of ``f`` are used (``J^T J v = vjp(jvp(v))``), so
    memory is that of a forward/backward pass, never ``n x n``. ``x`` has any
    shape (``n = x.size``); the eigenvalues of ``J^T J`` are the squared
    singular values of ``J`` (plus ``n - m`` zeros when ``f`` maps to fewer
    dimensions). ``dtype`` (e.g. ``jnp.float64``) sets the Lanczos precision;
    ``f`` is evaluated at ``x`` cast to it. See :func:`slq` for probes/steps.
    """
    x = jnp.asarray(x)
    validate.prng_key("key", key)
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    n_probes = validate.positive_int("n_probes", n_probes)
    n_steps = validate.positive_int("n_steps", n_steps)
    nodes, weights = _jacobian_slq(f, x.astype(dtype), key, n_probes, n_steps)
    return SLQResult(nodes=nodes, weights=weights, n=x.size)


@partial(jax.jit, static_argnums=(0, 3, 4))
def _jacobian_slq(f, x, key, n_probes, n_steps):
    """Compiled once per (f, shapes, n_probes, n_steps): pass the same ``f`` to reuse it."""
    dtype = x.dtype
    shape = x.shape
    y, f_vjp = jax.vjp(f, x)
    _, f_jvp = jax.linearize(f, x)

    def matvec(v):
        (g,) = f_vjp(f_jvp(v.reshape(shape)).astype(y.dtype))
        return g.reshape(-1).astype(dtype)

    r = slq(matvec, x.size, key, n_probes=n_probes, n_steps=n_steps, dtype=dtype)
    return r.nodes, r.weights


def slq_density(result: SLQResult, grid, *, bandwidth: float | None = None) -> Array:
    """Gaussian-smoothed SLQ density on ``grid``: ``sum tau_j N(lambda; theta_j, bandwidth^2) / P``.

    Default ``bandwidth``: the mean spacing of the Ritz values,
    ``(theta_max - theta_min) / n_steps``.
    """
    grid = jnp.asarray(validate.finite_values("grid", grid))
    if bandwidth is not None:
        validate.real_array("bandwidth", bandwidth, minimum=0.0, strict=True)
    nodes, w = result.atoms()
    if bandwidth is None:
        steps = result.nodes.shape[1]
        bandwidth = (jnp.max(nodes) - jnp.min(nodes)) / steps
    z = (grid[:, None] - nodes[None, :]) / bandwidth
    return jnp.sum(w * jnp.exp(-0.5 * z * z), axis=1) / (bandwidth * math.sqrt(2 * math.pi))
