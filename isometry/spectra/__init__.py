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

The package, one concern a module (every public name is re-exported here):
``values`` (dense singular values, :func:`log_singular_values`,
:func:`trace_moments`), ``stats`` (moments, summaries, histograms and
distances of samples), ``krylov`` (Lanczos and SLQ, :class:`SLQResult`) and
``laws`` (:func:`distance_to_law`, :func:`compare_to_laws`).
"""

from isometry.spectra.krylov import (
    SLQResult,
    jacobian_slq,
    lanczos,
    max_eigenvalue,
    slq,
    slq_density,
)
from isometry.spectra.laws import (
    LawComparison,
    LawDistance,
    SpectrumComparison,
    compare_to_laws,
    distance_to_law,
    resolution_floor,
)
from isometry.spectra.stats import (
    histogram_density,
    ks_distance,
    ks_distance_cdf,
    moments,
    summary,
    summary_rows,
    wasserstein1,
    wasserstein1_cdf,
)
from isometry.spectra.values import (
    log_singular_values,
    singular_values,
    squared_singular_values,
    trace_moments,
)

__all__ = [
    "LawComparison",
    "LawDistance",
    "SLQResult",
    "SpectrumComparison",
    "compare_to_laws",
    "distance_to_law",
    "histogram_density",
    "jacobian_slq",
    "ks_distance",
    "ks_distance_cdf",
    "lanczos",
    "log_singular_values",
    "max_eigenvalue",
    "moments",
    "resolution_floor",
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
