"""Statistics of samples of squared singular values: moments, summaries, histograms, distances.

Summaries (:func:`moments`, :func:`summary`, :func:`summary_rows`,
:func:`histogram_density`) and distances between samples (:func:`ks_distance`,
:func:`wasserstein1`) or of a sample to a CDF (:func:`ks_distance_cdf`,
:func:`wasserstein1_cdf`) work on arrays of squared singular values, or on
weighted atoms (the SLQ quadrature measure, :meth:`isometry.spectra.SLQResult.atoms`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from isometry import validate

__all__ = [
    "histogram_density",
    "ks_distance",
    "ks_distance_cdf",
    "moments",
    "summary",
    "summary_rows",
    "wasserstein1",
    "wasserstein1_cdf",
]

Array = jax.Array


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
