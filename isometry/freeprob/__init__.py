"""Free-probability theory of the spectrum of the input-output Jacobian.

For a depth-``L`` network ``J = prod_l D^l W^l`` with ``D^l = diag phi'(h^l)``,
``h^l ~ N(0, q*)``, free probability predicts the law of the eigenvalues of
``J J^T`` (the squared singular values of ``J``) in the wide limit
(Pennington, Schoenholz & Ganguli 2017, 2018). S-transforms multiply:

    S_{J J^T}(m) = (S_W(m) S_{D^2}(m))^L
    S_W(m)       = 1 / (sigma_w2 (1 + m))     Gaussian weights   (s1 = -1)
    S_W(m)       = 1 / sigma_w2               orthogonal weights (s1 = 0)
    S_{D^2}(m)   = (1 + m) / (m z_D),  M_{D^2}(z_D) = m,  M_{D^2}(z) = E[d / (z - d)],

with ``d = phi'(h)^2``. The moment generating function ``M(z) = z G(z) - 1`` of
``J J^T`` solves ``z = (1 + m) / (m S_{J J^T}(m))`` at ``m = M(z)``; the
density is ``rho(lambda) = -(1/pi) Im G(lambda + i0)``.

The law of ``d``:

* ReLU, hard-tanh, linear: Bernoulli, ``d = 1`` with probability ``p``
  (closed form ``Activation.bernoulli_p``), else 0;
* leaky ReLU / PReLU with slope ``a``: ``d`` in ``{1, a^2}``, each with probability 1/2;
* any other activation: the composite Gauss-Legendre rule of
  :mod:`isometry.gaussian` as a discrete measure on ``d(sqrt(q*) z)``
  (:data:`LAW_QUADRATURE`, 480 nodes), exact where ``phi'`` is constant on a
  half-line (SELU, ELU: an atom of ``d``).

Solver. For each ``lambda`` the unknown is the subordination point
``u = z_D`` (upper half plane), written as ``v = log u``; with ``m = M_{D^2}(u)``

    F(v) = log(1 + m) - log m + L [log sigma_w2 + log m + log u + (s - 1) log(1 + m)]
           - log z = 0                          (s = 1 Gaussian, 0 orthogonal)

is the logarithm of the S-transform equation, so depth enters as ``L log S``
and depth 1,000 is as well conditioned as depth 1. Principal logarithms are
exact on the physical branch (``u`` in C+, ``m`` in C- for ``z`` in C+).
Newton's method follows ``z = lambda + i eta`` from ``eta`` far outside the
support (``m ~ m1 / z``) down to ``eta = 1e-13 x edge`` in geometric steps:
every step starts inside the basin of the physical root, so no other branch
is picked up, and all grid points are solved at once (vectorized, jittable).
Atoms (at zero: mass ``1 - p``; for orthogonal weights at ``sigma_w2^L a^L``
for an atom ``a`` of ``d`` of mass ``p_a``: ``max(0, 1 - L (1 - p_a))``) are
reported separately and subtracted from the density.

A grid point where Newton's residual stays above tolerance, or where the
discrete law of ``d`` does not resolve ``M_{D^2}`` at the solution (the
subordination point close to the support of ``d``: depth 1 with orthogonal
weights, where ``J J^T = sigma_w2 D^2``, is the typical case), is reported:
``converged`` is False there, the density is NaN there, and the public
functions raise :class:`SolverError` naming the points unless
``on_failure="nan"``.

Precision and return types. Every computation here runs in float64 (the
Newton solver, the edge search and the moment series need it; they enable
float64 locally with ``jax.enable_x64``), and every public result is a JAX
array of dtype float64 made under that local switch, whatever the global
``jax_enable_x64`` says: :func:`max_eigenvalue` returns a 0-d array, like the
fields of :class:`JacobianMoments` and :class:`SpectralDensity`; use
``float(...)`` or ``.astype`` to convert. The one exception is
:class:`SpectralLaw`, a tabulated law built on the host for comparison with
measured spectra, which holds NumPy float64 arrays and Python floats.

The package, one concern a module (every public name is re-exported here):
``law`` (the law of ``d``, its ``M_{D^2}`` and S-transform, the argument
checks), ``moments`` (:func:`jacobian_moments`), ``support`` (the right edge
:func:`max_eigenvalue` and the atoms), ``density`` (the Newton solver,
:func:`spectral_density`) and ``cdf`` (:class:`SpectralLaw`).

References:
    Pennington, Schoenholz & Ganguli 2017, "Resurrecting the sigmoid in deep
    learning through dynamical isometry: theory and practice" (NeurIPS).
    Pennington, Schoenholz & Ganguli 2018, "The emergence of spectral
    universality in deep networks" (AISTATS).
    Voiculescu, Dykema & Nica 1992, "Free random variables" (S-transform).
"""

from isometry.freeprob.cdf import SpectralLaw, sample_spectral_law, spectral_law
from isometry.freeprob.density import (
    SolverError,
    SpectralDensity,
    singular_value_density,
    spectral_density,
)
from isometry.freeprob.law import LAW_QUADRATURE, D2Law, d2_law, s_transform
from isometry.freeprob.law import WEIGHTS as WEIGHTS  # public, not in __all__
from isometry.freeprob.moments import JacobianMoments, jacobian_moments
from isometry.freeprob.support import max_eigenvalue, spectral_atoms

__all__ = [
    "LAW_QUADRATURE",
    "D2Law",
    "JacobianMoments",
    "SolverError",
    "SpectralDensity",
    "SpectralLaw",
    "d2_law",
    "jacobian_moments",
    "max_eigenvalue",
    "s_transform",
    "sample_spectral_law",
    "singular_value_density",
    "spectral_atoms",
    "spectral_density",
    "spectral_law",
]
