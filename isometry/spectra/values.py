"""Singular values of Jacobians: dense, stable in log space at any depth, and trace moments.

* **Dense** (:func:`singular_values`, :func:`squared_singular_values`): the
  SVD, or the eigenvalues of the smaller Gram matrix ``J J^T`` (in the input's
  precision or in float64), batched over leading axes, optionally split over
  threads for a concrete batch on CPU.
* **Very deep** (:func:`log_singular_values`): the QR route in log space for a
  scanned stack, exact at every finite depth and free of overflow at 10,000
  layers.
* **Traces** (:func:`trace_moments`): mean, variance and max of the squared
  singular values from traces and a few Lanczos steps, without an SVD.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from isometry import depthscan, validate
from isometry.spectra.krylov import max_eigenvalue

__all__ = ["log_singular_values", "singular_values", "squared_singular_values", "trace_moments"]

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
