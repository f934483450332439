"""Singular-value spectra of Jacobians: exact, stable in log space, and matrix-free.

The object of dynamical isometry is the spectrum of ``J J^T`` (the squared
singular values ``lambda_i = s_i^2`` of the input-output Jacobian ``J``;
Pennington, Schoenholz & Ganguli 2017, 2018). This module computes it three
ways and summarizes it:

* **Dense** (:func:`singular_values`, :func:`squared_singular_values`): exact
  SVD, or the faster eigenvalues of the Gram matrix ``J J^T``. Batched over
  leading axes.
* **Very deep** (:func:`log_singular_values`): for a scanned stack
  ``layer(params_l, h) -> h`` the product ``J = A_L ... A_1`` is accumulated
  as ``J_d = Q_d diag(exp(g_d)) T_d`` (QR factorizations, the log scales
  ``g_d`` kept in log space, ``T_d`` unit upper triangular), so 1,000-10,000
  layers neither overflow nor underflow where the plain product does
  (Benettin et al. 1980's QR method for Lyapunov exponents, kept exact at
  every finite depth).
* **Matrix-free** (:func:`lanczos`, :func:`slq`, :func:`jacobian_slq`):
  stochastic Lanczos quadrature of ``J^T J`` from ``jvp``/``vjp`` alone, for
  networks too wide for a dense Jacobian (Golub & Meurant 2010; Ubaru, Chen &
  Saad 2017; Chen, Trogdon & Ubaru 2021).

Summaries (:func:`moments`, :func:`summary`, :func:`trace_moments`,
:func:`histogram_density`) and distances between spectra (:func:`ks_distance`,
:func:`wasserstein1`, and against a theoretical CDF :func:`ks_distance_cdf`,
:func:`wasserstein1_cdf`) work on arrays of squared singular values, or on
weighted atoms (the SLQ quadrature measure).

Conventions: a Jacobian is a matrix ``(..., m, n)``; spectra are returned
sorted in decreasing order along the last axis, of length ``min(m, n)``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from isometry import depthscan, freeprob, meanfield, validate

__all__ = [
    "SLQResult",
    "histogram_density",
    "jacobian_slq",
    "ks_distance",
    "ks_distance_cdf",
    "lanczos",
    "log_singular_values",
    "max_eigenvalue",
    "moments",
    "singular_values",
    "slq",
    "slq_density",
    "squared_singular_values",
    "summary",
    "summary_rows",
    "trace_moments",
    "wasserstein1",
    "wasserstein1_cdf",
]

Array = jax.Array

# --------------------------------------------------------------------------- #
# Dense singular values.
# --------------------------------------------------------------------------- #


def _as_matrix_batch(name: str, J, check_finite: bool = True) -> Array:
    """``J`` as a float array ``(..., m, n)``; concrete NaN/inf entries raise (``check_finite``)."""
    J = jnp.asarray(J)
    if J.ndim < 2:
        raise ValueError(f"{name} must have shape (..., m, n) with m, n >= 1, got {J.shape}")
    if J.shape[-1] == 0 or J.shape[-2] == 0:
        raise ValueError(f"{name} must have non-empty matrix dimensions, got {J.shape}")
    if not jnp.issubdtype(J.dtype, jnp.floating):
        J = J.astype(jnp.result_type(float))
    if check_finite and validate.is_concrete(J) and not bool(jnp.all(jnp.isfinite(J))):
        validate.finite_values(name, J)
    return J


@jax.jit
def _svd_vals(J):
    return jnp.linalg.svd(J, compute_uv=False)


@jax.jit
def _gram_vals(J):
    m, n = J.shape[-2:]
    Jt = jnp.swapaxes(J, -1, -2)
    G = J @ Jt if m <= n else Jt @ J
    lam = jnp.linalg.eigvalsh(G)[..., ::-1]
    return jnp.maximum(lam, 0.0)


def _np_svd_vals(J):
    return np.linalg.svd(J, compute_uv=False)


def _np_gram_vals(J):
    m, n = J.shape[-2:]
    Jt = np.swapaxes(J, -1, -2)
    G = J @ Jt if m <= n else Jt @ J
    return np.maximum(np.linalg.eigvalsh(G)[..., ::-1], 0.0)


def _np_gram64_vals(J):
    return _np_gram_vals(np.asarray(J, dtype=np.float64)).astype(J.dtype)


def _gram64_vals(J):
    """Gram eigenvalues formed and solved in float64 by NumPy (a host callback under ``jit``)."""
    out = jax.ShapeDtypeStruct((*J.shape[:-2], min(J.shape[-2:])), J.dtype)
    return jax.pure_callback(_np_gram64_vals, out, J, vmap_method="expand_dims")


_KERNELS = {
    "svd": (_svd_vals, _np_svd_vals),
    "eigh": (_gram_vals, _np_gram_vals),
    "gram64": (_gram64_vals, _np_gram64_vals),
}


def _parallel(fn, np_fn, J: Array, workers: int | None) -> Array:
    """Apply a batched kernel, split over ``workers`` threads for concrete CPU batches.

    XLA's CPU LAPACK kernels loop over a batch on one core; for a concrete
    batch on CPU the chunks run through NumPy's LAPACK (which releases the
    GIL) in ``workers`` threads, one per core. Under ``jit`` (or one matrix,
    or ``workers=1``) the batch runs as one XLA call.
    """
    batch = J.shape[:-2]
    nb = math.prod(batch)
    workers = 1 if workers is None else workers
    if workers <= 1 or nb < 2 or not validate.is_concrete(J) or jax.default_backend() != "cpu":
        return fn(J)
    flat = np.asarray(J).reshape((nb, *J.shape[-2:]))
    chunks = np.array_split(np.arange(nb), min(workers, nb))
    with ThreadPoolExecutor(len(chunks)) as ex:
        parts = list(ex.map(lambda idx: np_fn(flat[idx[0] : idx[-1] + 1]), chunks))
    out = np.concatenate(parts, axis=0).astype(J.dtype)
    return jnp.asarray(out.reshape((*batch, out.shape[-1])))


def singular_values(
    J, *, method: str = "svd", workers: int | None = None, check_finite: bool = True
) -> Array:
    """Singular values of ``J``, batched: ``(..., m, n) -> (..., min(m, n))``, decreasing.

    Methods:
        ``"svd"``: exact, LAPACK ``gesdd``; each ``s_i`` to relative accuracy
            about ``eps * s_max / s_i``.
        ``"eigh"``: ``s_i = sqrt(lambda_i(J J^T))`` (the smaller Gram matrix);
            faster, but forming ``J J^T`` squares the condition number: the
            error of ``lambda_i`` is about ``eps * s_max^2``, so a singular
            value below ``sqrt(eps) * s_max`` (``~3e-4 s_max`` in float32,
            ``~1.5e-8 s_max`` in float64) has no correct digit. Use it for bulk
            statistics of well-conditioned Jacobians, never for the smallest
            singular values.
        ``"gram64"``: the Gram route formed and solved in float64 (NumPy
            LAPACK ``syevd``; a host callback under ``jit``), returned in
            ``J``'s dtype: ``|lambda_i - lambda_i(J)| <~ n eps_64 s_max^2``, so
            ``|s_i - s_i(J)| <~ sqrt(n eps_64) s_max`` (``~2e-7 s_max`` at
            ``n = 256``; measured 5e-9 s_max on depth-1..128 tanh Jacobians).
            For a float32 ``J`` that is at least as accurate as the float32
            SVD in every singular value (whose error is ``~ eps_32 s_max``,
            measured 1.7e-6 s_max) at about the cost of one float32 SVD, so it
            is the fast exact-enough route for float32 spectra. For a float64
            ``J`` it equals ``"eigh"``; keep ``"svd"`` there when singular
            values below ``1e-8 s_max`` matter.

    ``workers > 1`` threads split a concrete batch on CPU (NumPy's LAPACK per
    chunk); the default runs the batch as one XLA call, which is faster when
    the BLAS library is single-threaded (``OPENBLAS_NUM_THREADS=1``) and
    lets a multi-threaded BLAS use the cores inside each factorization.

    A concrete ``J`` with a NaN or inf entry raises ``ValueError`` (LAPACK
    would return NaN singular values); ``check_finite=False`` skips the check,
    and under ``jit`` it is skipped: there NaN in ``J`` gives NaN out (the flag
    to test with ``jnp.isfinite``).
    """
    J = _as_matrix_batch("J", J, check_finite)
    validate.choice("method", method, tuple(_KERNELS))
    if method == "svd":
        return _parallel(*_KERNELS[method], J, workers)
    return jnp.sqrt(_parallel(*_KERNELS[method], J, workers))


def squared_singular_values(
    J, *, method: str = "svd", workers: int | None = None, check_finite: bool = True
) -> Array:
    """Eigenvalues of ``J J^T`` (squared singular values), ``(..., m, n) -> (..., min(m, n))``.

    With ``method="eigh"`` / ``"gram64"`` these are the Gram eigenvalues
    directly (absolute error about ``eps * s_max^2`` in the Gram matrix's
    precision); see :func:`singular_values` (also for ``check_finite``).
    """
    J = _as_matrix_batch("J", J, check_finite)
    validate.choice("method", method, tuple(_KERNELS))
    if method != "svd":
        return _parallel(*_KERNELS[method], J, workers)
    return singular_values(J, method="svd", workers=workers, check_finite=False) ** 2


# --------------------------------------------------------------------------- #
# Summaries and distances.
# --------------------------------------------------------------------------- #


def moments(sq_singular_values, order: int = 4) -> Array:
    """Moments ``m_k = (1/n) sum_i lambda_i^k``, ``k = 1..order``: ``(..., n) -> (..., order)``.

    ``lambda_i`` are squared singular values (eigenvalues of ``J J^T``); free
    probability predicts ``m1 = (sigma_w2 mu1)^L`` and
    ``m2 = m1^2 [1 + L (mu2/mu1^2 - 1 - s1)]`` (Pennington et al. 2018).
    """
    lam = jnp.asarray(validate.finite_values("sq_singular_values", sq_singular_values))
    order = validate.positive_int("order", order)
    ks = jnp.arange(1, order + 1, dtype=lam.dtype)
    return jnp.mean(lam[..., None] ** ks, axis=-2)


def summary(sq_singular_values, *, zero_tol: float = 1e-3) -> dict[str, Array]:
    """Bulk statistics of squared singular values ``lambda`` (last axis), batched.

    Returns a dict of arrays over the leading axes: ``mean`` (``m1``),
    ``second_moment`` (``m2``), ``var`` (``m2 - m1^2``), ``max``, ``min``,
    ``condition_number`` (``s_max / s_min = sqrt(lambda_max / lambda_min)``, inf
    when ``lambda_min = 0``) and ``frac_near_zero`` (fraction with
    ``lambda < zero_tol * mean``, the collapsed directions).

    A concrete input with NaN or inf raises ``ValueError`` (``var`` would be
    NaN); under ``jit`` the check is skipped and NaN propagates.
    """
    validate.real_array("zero_tol", zero_tol, minimum=0.0)
    lam = jnp.asarray(validate.finite_values("sq_singular_values", sq_singular_values))
    if lam.ndim < 1 or lam.shape[-1] == 0:
        raise ValueError(f"sq_singular_values must have shape (..., n), n >= 1, got {lam.shape}")
    m1 = lam.mean(-1)
    m2 = (lam * lam).mean(-1)
    lmax, lmin = lam.max(-1), lam.min(-1)
    cond = jnp.where(lmin > 0, jnp.sqrt(lmax / jnp.where(lmin > 0, lmin, 1.0)), jnp.inf)
    return {
        "mean": m1,
        "second_moment": m2,
        "var": m2 - m1 * m1,
        "max": lmax,
        "min": lmin,
        "condition_number": cond,
        "frac_near_zero": (lam < zero_tol * m1[..., None]).mean(-1),
    }


def summary_rows(depths, sq_singular_values) -> list[dict]:
    """One row per depth of bulk statistics of squared singular values ``lambda (K, n)``.

    Rows ``{"depth", "mean", "var", "max", "min"}`` (Python numbers) for the
    ``K`` depths, computed in float64 NumPy (``var`` two-pass, ``mean((lambda -
    mean)^2)``), the per-depth form of :func:`summary` for result tables.
    """
    lam = np.asarray(validate.finite_values("sq_singular_values", sq_singular_values), np.float64)
    if lam.ndim != 2 or lam.shape[0] != len(depths):
        raise ValueError(
            f"sq_singular_values must have shape (len(depths)={len(depths)}, n), got {lam.shape}"
        )
    return [
        {"depth": int(d), "mean": float(v.mean()), "var": float(v.var()),
         "max": float(v.max()), "min": float(v.min())}
        for d, v in zip(depths, lam, strict=True)
    ]  # fmt: skip


def histogram_density(values, *, bins: int | np.ndarray = 60, range=None, weights=None, log=False):
    """Histogram density: ``(edges (B+1,), density (B,))`` with ``sum density * width = 1``.

    ``values`` of any shape are pooled (e.g. seeds x inputs x singular values).
    ``log=True`` bins ``log10(values)`` (for spectra spanning decades);
    ``weights`` (same shape) give weighted atoms, e.g. SLQ quadrature weights.
    NaN or inf in ``values`` or ``weights`` raises ``ValueError`` (they are
    never dropped silently); with ``log=True`` entries ``<= 0`` (exact zeros of
    a rank-deficient spectrum) are left out of the log bins.
    """
    v = np.asarray(validate.finite_values("values", values), dtype=float).ravel()
    if np.ndim(bins) == 0:
        validate.positive_int("bins", bins)
    elif np.ndim(bins) != 1 or len(bins) < 2 or np.any(np.diff(bins) <= 0):
        raise ValueError(f"bins must be a count >= 1 or increasing edges, got {bins!r}")
    w = None if weights is None else validate.real_array("weights", weights, minimum=0.0)
    w = None if w is None else np.asarray(w, float).ravel()
    if w is not None and w.shape != v.shape:
        raise ValueError(f"weights must match values, got {w.shape} vs {v.shape}")
    keep = (v > 0) if log else np.ones(v.shape, bool)
    v = v[keep]
    w = None if w is None else w[keep]
    if w is not None and not w.sum() > 0:
        raise ValueError("weights must have a positive sum over the binned values")
    if v.size == 0:
        raise ValueError("values has no positive entries (log=True bins log10 of them)")
    if log:
        v = np.log10(v)
    density, edges = np.histogram(v, bins=bins, range=range, weights=w, density=True)
    return edges, density


def _weighted(name, a, w):
    """Pooled atoms and weights summing to 1; concrete NaN/inf or negative weights raise."""
    a = jnp.ravel(jnp.asarray(validate.finite_values(name, a)))
    if w is None:
        w = jnp.full(a.shape, 1.0 / a.size, dtype=jnp.result_type(a.dtype, float))
    else:
        validate.real_array(f"{name}_weights", w, minimum=0.0)
        w = jnp.ravel(jnp.asarray(w))
        if w.shape != a.shape:
            raise ValueError(f"{name}_weights must match {name}: {w.shape} vs {a.shape}")
        if validate.is_concrete(w) and not float(jnp.sum(w)) > 0:
            raise ValueError(f"{name}_weights must have a positive sum")
        w = w / jnp.sum(w)
    return a, w


def _cdf_at(points, a, w):
    """Right-continuous weighted empirical CDF of atoms (a, w) at ``points``."""
    order = jnp.argsort(a)
    a, w = a[order], w[order]
    cw = jnp.concatenate([jnp.zeros(1, w.dtype), jnp.cumsum(w)])
    return cw[jnp.searchsorted(a, points, side="right")]


def ks_distance(a, b, *, a_weights=None, b_weights=None) -> Array:
    """Kolmogorov-Smirnov distance ``sup_x |F_a(x) - F_b(x)|`` of two (weighted) samples.

    Samples of any shape are pooled; weights default to uniform. NaN or inf
    in a concrete sample raises ``ValueError`` (a NaN would sort last and
    bias the distance silently); under ``jit`` the check is skipped.
    """
    a, wa = _weighted("a", a, a_weights)
    b, wb = _weighted("b", b, b_weights)
    pts = jnp.concatenate([a, b])
    return jnp.max(jnp.abs(_cdf_at(pts, a, wa) - _cdf_at(pts, b, wb)))


def wasserstein1(a, b, *, a_weights=None, b_weights=None) -> Array:
    """Wasserstein-1 distance ``int |F_a(x) - F_b(x)| dx`` of two (weighted) samples (exact).

    NaN or inf in a concrete sample raises ``ValueError`` (as :func:`ks_distance`).
    """
    a, wa = _weighted("a", a, a_weights)
    b, wb = _weighted("b", b, b_weights)
    pts = jnp.sort(jnp.concatenate([a, b]))
    diff = jnp.abs(_cdf_at(pts[:-1], a, wa) - _cdf_at(pts[:-1], b, wb))
    return jnp.sum(diff * jnp.diff(pts))


def ks_distance_cdf(a, cdf: Callable[[Array], Array], *, a_weights=None) -> Array:
    """KS distance ``sup_x |F_a(x) - F(x)|`` between a (weighted) sample and a continuous CDF.

    ``cdf`` is vectorized (e.g. a theoretical CDF from free probability);
    the supremum is attained at an atom, from the left or the right.
    """
    a, w = _weighted("a", a, a_weights)
    order = jnp.argsort(a)
    a, w = a[order], w[order]
    right = jnp.cumsum(w)
    left = right - w
    F = jnp.asarray(cdf(a))
    return jnp.max(jnp.maximum(jnp.abs(right - F), jnp.abs(left - F)))


def wasserstein1_cdf(
    a, cdf: Callable[[Array], Array], support: tuple[float, float], *, a_weights=None, n: int = 8192
) -> Array:
    """``int |F_a(x) - F(x)| dx`` over ``support = (lo, hi)`` (which must contain both laws).

    The integral runs on the union of a uniform grid of ``n`` points and the
    sample's atoms (trapezoid rule for ``F``, exact steps for ``F_a``).
    """
    lo, hi = (float(s) for s in support)
    if not hi > lo:
        raise ValueError(f"support must be (lo, hi) with hi > lo, got {support}")
    a, w = _weighted("a", a, a_weights)
    pts = jnp.sort(jnp.concatenate([jnp.linspace(lo, hi, n, dtype=a.dtype), jnp.clip(a, lo, hi)]))
    mid = 0.5 * (pts[1:] + pts[:-1])
    diff = jnp.abs(_cdf_at(mid, a, w) - jnp.asarray(cdf(mid)))
    return jnp.sum(diff * jnp.diff(pts))


# --------------------------------------------------------------------------- #
# Lanczos and stochastic Lanczos quadrature.
# --------------------------------------------------------------------------- #


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


# --------------------------------------------------------------------------- #
# Trace moments without an SVD.
# --------------------------------------------------------------------------- #


def trace_moments(J, *, n_steps: int = 16) -> dict[str, Array]:
    """Mean, variance and max of the squared singular values of ``J`` without an SVD.

    For ``J (..., m, n)`` and ``k = min(m, n)``, with ``G`` the smaller Gram matrix:
    ``mean = tr(G)/k = ||J||_F^2 / k``, ``second_moment = tr(G^2)/k =
    ||G||_F^2 / k``, ``var = second_moment - mean^2``, and ``max`` the largest
    Ritz value of ``n_steps`` Lanczos steps on ``G`` (a lower bound, accurate
    to a few digits for ``n_steps ~ 16`` on Jacobian spectra). Costs one Gram
    product and ``n_steps`` matvecs instead of an SVD. Batched over leading axes.
    """
    J = _as_matrix_batch("J", J)
    n_steps = validate.positive_int("n_steps", n_steps)
    return _trace_moments(J, n_steps)


@partial(jax.jit, static_argnums=1)
def _trace_moments(J, n_steps):
    m, n = J.shape[-2:]
    k = min(m, n)
    Jt = jnp.swapaxes(J, -1, -2)
    G = J @ Jt if m <= n else Jt @ J
    mean = jnp.sum(J * J, axis=(-2, -1)) / k
    m2 = jnp.sum(G * G, axis=(-2, -1)) / k
    steps = min(n_steps, k)

    def top(g):
        v0 = jnp.ones(k, g.dtype) + jnp.arange(k, dtype=g.dtype) / k
        return max_eigenvalue(lambda v: g @ v, v0, steps)

    flat = G.reshape((-1, k, k))
    lmax = jax.vmap(top)(flat).reshape(G.shape[:-2])
    return {"mean": mean, "second_moment": m2, "var": m2 - mean * mean, "max": lmax}


# --------------------------------------------------------------------------- #
# Stable log singular values of very deep stacks.
# --------------------------------------------------------------------------- #


def _graded_log_sv(log_d, T):
    """log singular values of ``diag(exp(log_d)) T`` without overflow, decreasing.

    Rows are sorted by scale (a row-graded matrix, for which Householder-based
    SVD keeps small singular values accurate) and scaled by the largest. Rows
    whose relative scale underflows the dtype take their scale ``log_d`` (the
    strongly graded limit, where ``s_i -> d_i`` up to ``cond(T)``).
    """
    order = jnp.argsort(-log_d)
    log_d = log_d[order]
    T = T[order]
    top = log_d[0]
    rel = log_d - top
    tiny = jnp.log(jnp.finfo(T.dtype).tiny) + 10.0
    B = jnp.exp(jnp.maximum(rel, tiny))[:, None] * T
    s = jnp.linalg.svd(B, compute_uv=False)
    with_svd = jnp.log(jnp.maximum(s, jnp.finfo(T.dtype).tiny)) + top
    return jnp.where(rel > tiny, with_svd, log_d)


def log_singular_values(layer, params, x, depths=None, *, tangents=None, unroll: int = 1) -> Array:
    """Log singular values of the Jacobian of a scanned stack at ``depths``, stable at any depth.

    For ``h_d = layer(params[d-1], h_{d-1})`` and ``A_d = dh_d/dh_{d-1}``, the
    product ``J_d = A_d ... A_1 V`` (``V`` = identity, or the rows of
    ``tangents``) is carried as ``J_d = Q_d diag(exp(g_d)) T_d``:
    ``A_d Q_{d-1} = Q_d R_d`` (QR), ``g_d = g_{d-1} + log|diag R_d|`` (log
    space: no overflow at 10,000 layers), ``T_d = G_d T_{d-1}`` with
    ``G_ij = R_ij exp(g_j - g_i) / |R_ii|`` (upper triangular, unit-modulus
    diagonal; the columns are permuted before each step so that ``g`` is
    decreasing and ``G`` stays bounded: column pivoting by scale). At each requested
    depth, ``log s(J_d) = log s(diag(exp(g_d)) T_d)`` by an SVD of the
    row-scaled graded factor. ``sum_i g_d,i / d`` are the finite-depth
    Lyapunov exponents (Benettin et al. 1980).

    Args:
        layer: ``layer(params_l, h) -> h`` (same shape).
        params: pytree whose leaves have leading depth axis ``L``.
        x: one input ``h_0`` of any shape (``n = x.size``); vmap for a batch.
        depths: increasing depths in ``1..L`` (default: ``L`` only).
        tangents: optional ``(k, *x.shape)``, input directions (rows).

    Returns:
        ``(len(depths), min(n, k))`` log singular values, decreasing. Accurate
        to working precision relative to ``s_max`` for singular values above
        ``eps * s_max``, and in the graded regime below it. An exactly zero
        singular value (a layer with a zero derivative, e.g. ReLU's dead
        units) comes out finite but very negative: at most ``log(tiny)`` of
        the dtype (``-87`` in float32) per singular layer.
    """
    plan = depthscan.plan(layer, params, x, depths, tangents)

    def init(h, T):
        k = T.shape[0]
        Qt = T.reshape(k, -1)
        # J_0 = V: QR of V^T's columns = the tangent directions.
        Q, R = jnp.linalg.qr(Qt.T)
        return (h, Q, _log_abs_diag(R), _unit(R, jnp.zeros(k, Qt.dtype)))

    def step(carry, p):
        h, Q, g, T = carry
        # Keep the scales decreasing (a symmetric permutation of Q D T, exact),
        # so the scaled factor below has entries exp(g_j - g_i) <= 1.
        order = jnp.argsort(-g)
        Q, g, T = Q[:, order], g[order], T[order]
        rows = jnp.swapaxes(Q, 0, 1).reshape((Q.shape[1], *plan.shape))
        h, M = depthscan.push_tangents(layer, p, h, rows)
        Q, R = jnp.linalg.qr(M.reshape(M.shape[0], -1).T)
        dg = _log_abs_diag(R)
        G = _unit(R, g)
        return (h, Q, g + dg, G @ T)

    def emit(carry):
        _, _, g, T = carry
        return _graded_log_sv(g, T)

    return depthscan.scan_emit(plan, init, step, emit, unroll=unroll)


def _log_abs_diag(R):
    """``log |R_ii|``, at least ``log(tiny)``: an exactly singular layer (ReLU's dead units)
    then scales its direction by ``tiny`` instead of ``log 0 = -inf``, whose differences
    ``g_j - g_i`` would be NaN."""
    d = jnp.abs(jnp.diagonal(R))
    return jnp.log(jnp.maximum(d, jnp.finfo(R.dtype).tiny))


def _unit(R, g):
    """``G_ij = R_ij exp(g_j - g_i) / |R_ii|`` (upper triangular, unit-modulus diagonal)."""
    d = jnp.maximum(jnp.abs(jnp.diagonal(R)), jnp.finfo(R.dtype).tiny)
    big = 0.5 * jnp.log(jnp.finfo(R.dtype).max)
    e = jnp.exp(jnp.minimum(g[None, :] - g[:, None], big))
    return jnp.triu(R / d[:, None] * e)


# --------------------------------------------------------------------------- #
# A measured sample against a predicted law.
# --------------------------------------------------------------------------- #

__all__ += ["LawDistance", "distance_to_law", "resolution_floor"]

_FLOOR_EPS = 1e3


def resolution_floor(eps: float, method: str, lam_max: float) -> float:
    """The smallest squared singular value a plain float product of Jacobians resolves.

        floor = (1e3 eps)^2 lambda_max    (method "svd")
        floor =  1e3 eps    lambda_max    (method "eigh", the Gram matrix)

    Plain products resolve squared singular values down to about
    ``(c eps)^2 lambda_max`` with the SVD (``c ~ 1e2`` at width 1,000 and
    depth 128, checked against the QR route :func:`log_singular_values`) and
    down to about ``c eps lambda_max`` with the Gram matrix; ``eps`` is the
    machine epsilon of the sample's dtype.
    """
    methods = ("svd", "eigh")
    if method not in methods:
        raise ValueError(f"method must be one of {methods}, got {method!r}")
    return (_FLOOR_EPS * eps if method == "eigh" else (_FLOOR_EPS * eps) ** 2) * lam_max


@dataclasses.dataclass(frozen=True)
class LawDistance:
    """Distances of a measured sample to a predicted law (see :func:`distance_to_law`).

    Attributes:
        ks: ``sup_{x >= floor} |F_meas - F|``, bounded above by its parts (at most 1).
        wasserstein1: ``int_floor^inf |F_meas - F| dx``.
        atom_mass_difference: ``sum_k |measured mass at atom k - m_k|``.
        below_floor: the law's mass at or below the floor (clipped at 0).
        measured_below_floor: the sample's fraction at or below the floor.
    """

    ks: float
    wasserstein1: float
    atom_mass_difference: float
    below_floor: float
    measured_below_floor: float


def distance_to_law(sample, law, *, atom_window: float = 1e-6) -> LawDistance:
    """Kolmogorov-Smirnov and Wasserstein-1 distances of ``sample`` to ``law``, atoms included.

    ``law`` is a tabulated law with atoms, such as
    :class:`isometry.freeprob.SpectralLaw`: it has ``floor``, ``below``,
    ``edge``, ``atom_locations``, ``atom_masses``, ``continuous_mass``,
    ``cdf(x)`` and ``continuous_cdf(x)``. The law splits into the mass at or
    below the floor, the atoms (a measured value within ``atom_window * a`` of
    an atom ``a`` counts as it) and the continuous part above the floor; with
    ``w`` the weights of the pieces,

        KS <= |w_below,meas - w_below| + sum_k |w_k,meas - m_k|
              + w_cont,meas KS(continuous parts)

    (the last by :func:`ks_distance_cdf` against the normalized continuous
    CDF), which is the reported ``ks`` (at most 1). ``wasserstein1`` is
    :func:`wasserstein1_cdf` against ``law.cdf`` on ``[floor, max(edge, sample)]``
    (values below the floor counted at the floor).

    Args:
        sample: measured values (any shape, pooled), in the law's variable.
        law: the predicted law.
        atom_window: relative half-width of an atom.
    """
    lam = np.ravel(np.asarray(validate.finite_values("sample", sample), dtype=float))
    n, floor = lam.size, float(law.floor)
    below_meas = float(np.mean(lam <= floor))
    if not np.isfinite(law.continuous_mass):  # the law is not tabulated above its floor
        nan = float("nan")
        return LawDistance(nan, nan, nan, nan, below_meas)
    below = max(0.0, float(law.below))
    d = abs(below_meas - below)
    atoms = 0.0
    at_atom = np.zeros(n, bool)
    for a, m in zip(law.atom_locations, law.atom_masses, strict=True):
        hit = np.abs(lam - a) <= atom_window * a
        diff = abs(float(np.mean(hit)) - float(m))
        d, atoms = d + diff, atoms + diff
        at_atom |= hit
    rest = lam[(lam > floor) & ~at_atom]
    if rest.size and law.continuous_mass > 0:
        d += (rest.size / n) * float(ks_distance_cdf(rest, law.continuous_cdf))
    hi = max(float(law.edge), float(lam.max()))
    cdf = lambda x: law.cdf(np.maximum(x, floor))  # noqa: E731  (rounding below the floor)
    w1 = float(wasserstein1_cdf(lam, cdf, (floor, hi))) if hi > floor else 0.0
    return LawDistance(min(d, 1.0), w1, atoms, below, below_meas)


# --------------------------------------------------------------------------- #
# Free-probability laws beside measured spectra, per depth.
# --------------------------------------------------------------------------- #

__all__ += ["LawComparison", "SpectrumComparison", "compare_to_laws"]

_ATOM_WINDOW = 2e-6
"""Measured ``s^2`` within ``2e-6`` (relative) of an atom count as it (``1e-6`` in ``s``)."""

_FIXED_POINT_RTOL = 1e-4
"""``|q_map(q*) - q*| / q*`` above which ``q*`` is not taken as the length fixed point
(the float32 q-map is good to about 1e-6)."""

_SCALARS = (
    "ks", "atom_at_zero", "below_floor", "measured_below_floor", "floor", "edge", "mean", "var"
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LawComparison:
    """One depth's free-probability law in the singular values ``s`` beside a measured sample.

    Attributes:
        depth: ``L``.
        s: ``(G,)`` the law's grid in the singular values ``s = sqrt(lambda)``.
        density: ``(G,)`` ``p(s) = 2 s rho(s^2)`` of the continuous part (NaN where unresolved).
        cdf: ``(G,)`` ``F(s^2)``, atoms included (NaN below the floor).
        atom_at_zero: the mass at 0.
        atom_locations: ``(k,)`` the other atoms, in ``s``.
        atom_masses: ``(k,)`` their masses.
        edge: the right edge of the support, in ``s^2``.
        floor: the smallest ``s^2`` compared (:func:`resolution_floor`).
        ks, below_floor, measured_below_floor: of :func:`distance_to_law`.
        mean, var: ``E[s^2]`` and ``Var[s^2]`` of the law (``freeprob.jacobian_moments``).
    """

    depth: int
    s: np.ndarray
    density: np.ndarray
    cdf: np.ndarray
    atom_at_zero: float
    atom_locations: np.ndarray
    atom_masses: np.ndarray
    edge: float
    floor: float
    ks: float
    below_floor: float
    measured_below_floor: float
    mean: float
    var: float

    def as_dict(self) -> dict:
        """The fields as a dict (the ``theory`` entries of ``plotting.spectrum_figure``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class SpectrumComparison:
    """Free-probability laws beside measured spectra at several depths (:func:`compare_to_laws`).

    Attributes:
        laws: one :class:`LawComparison` per depth, in the order of the depths.
        floor: the resolution floor they share, in ``s^2``.
        q_map: ``q^1`` of the q-map at ``q*`` (``q*`` itself at the length fixed point).
        q_star: ``q*``.
    """

    laws: tuple[LawComparison, ...]
    floor: float
    q_map: float
    q_star: float

    @property
    def at_fixed_point(self) -> bool:
        """``q*`` is the length fixed point of the variances (``|q^1 - q*| <= 1e-4 q*``), as
        the theory assumes (``q^l = q*`` at every layer)."""
        return abs(self.q_map - self.q_star) <= _FIXED_POINT_RTOL * self.q_star

    def as_arrays(self) -> dict[str, np.ndarray]:
        """``theory_*`` arrays ``(K, ...)`` for a ``.npz`` file: the grids padded with NaN to
        the longest (``theory_s``, ``theory_density``, ``theory_cdf``; ``(K, G)``), the atoms
        to the most (``(K, max(1, k))``), and one ``(K,)`` array per scalar."""
        K = len(self.laws)
        G = max(law.s.size for law in self.laws)
        A = max(1, max(law.atom_locations.size for law in self.laws))
        grids = {k: np.full((K, G), np.nan) for k in ("s", "density", "cdf")}
        atoms = {k: np.full((K, A), np.nan) for k in ("atom_locations", "atom_masses")}
        for i, law in enumerate(self.laws):
            for k, out in (*grids.items(), *atoms.items()):
                v = getattr(law, k)
                out[i, : v.size] = v
        return {
            **{f"theory_{k}": v for k, v in (*grids.items(), *atoms.items())},
            **{f"theory_{k}": np.asarray([getattr(law, k) for law in self.laws]) for k in _SCALARS},
        }

    def as_record(self) -> dict:
        """A JSON-ready ``{"theory": {"distance": ..., "per_depth": [...]}}`` record: the
        scalars of each depth and its atoms as ``[location in s, mass]`` pairs."""
        return {
            "theory": {
                "distance": "Kolmogorov-Smirnov, sup |F_measured - F_theory| over s^2 >= floor "
                "(the mass below the floor compared as one number)",
                "per_depth": [
                    {
                        **{k: float(getattr(law, k)) for k in _SCALARS},
                        "atoms": [
                            [float(a), float(m)]
                            for a, m in zip(law.atom_locations, law.atom_masses, strict=True)
                        ],
                    }
                    for law in self.laws
                ],
            }
        }


def _check_comparison(depths, sample, eps) -> tuple[list[int], np.ndarray]:
    """``depths`` as ints ``>= 1`` and ``sample`` as a finite float ``(K, M)`` array."""
    depths = validate.positive_ints("depths", tuple(np.ravel(np.asarray(depths)).tolist()))
    lam = np.asarray(validate.finite_values("sample", sample, nonempty=True), dtype=float)
    if lam.ndim != 2 or lam.shape[0] != len(depths) or lam.shape[1] < 1:
        raise ValueError(
            f"sample must have shape (len(depths), M) = ({len(depths)}, M), got {lam.shape}"
        )
    validate.real_array("eps", eps, minimum=0.0, strict=True)
    return depths, lam


def _law_comparison(act, q_star, depth, weights, sample, floor, sigma_w2, points):
    """One depth of :func:`compare_to_laws`: ``sample`` ``(M,)`` against its law."""
    law = freeprob.sample_spectral_law(
        act, q_star, depth, weights, sample, floor, sigma_w2, points=points
    )
    dist = distance_to_law(sample, law, atom_window=_ATOM_WINDOW)
    moments = freeprob.jacobian_moments(act, q_star, depth, weights, sigma_w2)
    s, density, atoms = law.in_singular_values()
    return LawComparison(
        depth=depth,
        s=s,
        density=density,
        cdf=law.cdf(law.grid),
        atom_at_zero=law.atom_at_zero,
        atom_locations=atoms,
        atom_masses=law.atom_masses,
        edge=law.edge,
        floor=law.floor,
        ks=dist.ks,
        below_floor=dist.below_floor,
        measured_below_floor=dist.measured_below_floor,
        mean=float(moments.mean),
        var=float(moments.variance),
    )


def compare_to_laws(
    act,
    weights: str,
    q_star: float,
    sigma_w2: float,
    sigma_b2: float,
    depths,
    sample,
    eps: float,
    *,
    method: str = "svd",
    points: int = 120,
) -> SpectrumComparison:
    """The free-probability law of ``J J^T`` at each depth beside its measured spectrum.

    For each depth ``L``: the law on a grid resolving the sample
    (:func:`isometry.freeprob.sample_spectral_law`), its distance to the sample
    (:func:`distance_to_law`, a measured ``s^2`` within ``2e-6`` relative of an
    atom counting as it) and its mean and variance of ``s^2``
    (:func:`isometry.freeprob.jacobian_moments`). All depths share one floor,

        floor = resolution_floor(eps, method, max(max sample, max_L edge_L)),

    below which the law's mass and the sample's fraction are compared as one
    number. The theory assumes ``q^l = q*`` at every layer: a ``UserWarning``
    says so when ``q*`` is not the length fixed point of ``(sigma_w2,
    sigma_b2)`` (:attr:`SpectrumComparison.at_fixed_point`). Pennington,
    Schoenholz & Ganguli 2017, 2018.

    Args:
        act: the activation (or its name).
        weights: the ensemble, ``"gaussian"`` or ``"orthogonal"``.
        q_star, sigma_w2, sigma_b2: the network's length fixed point and variances.
        depths: ``(K,)`` depths ``>= 1``.
        sample: ``(K, M)`` measured squared singular values per depth (pooled over
            networks and inputs).
        eps: the machine epsilon of the measurement's dtype.
        method: ``"svd"`` or ``"eigh"``, how the sample was computed (:func:`resolution_floor`).
        points: the law's grid size per part (``>= 8``; about ``2.5 points`` in all).

    Returns:
        :class:`SpectrumComparison` (host-side NumPy arrays and floats).
    """
    depths, lam = _check_comparison(depths, sample, eps)
    points = validate.positive_int("points", points, minimum=8)
    q_map = float(meanfield.q_map(act, q_star, sigma_w2, sigma_b2))
    if abs(q_map - q_star) > _FIXED_POINT_RTOL * q_star:
        warnings.warn(
            f"q*={q_star:.6g} is not the length fixed point of (sigma_w2, sigma_b2) (the q-map "
            f"gives {q_map:.6g}); the theory assumes q^l = q* at every layer",
            stacklevel=2,
        )
    edge = max(float(freeprob.max_eigenvalue(act, q_star, d, weights, sigma_w2)) for d in depths)
    floor = resolution_floor(eps, method, max(float(lam.max()), edge))
    laws = tuple(
        _law_comparison(act, q_star, d, weights, row, floor, sigma_w2, points)
        for d, row in zip(depths, lam, strict=True)
    )
    return SpectrumComparison(laws, floor, q_map, float(q_star))
