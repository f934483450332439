"""A measured spectrum against a predicted law: distances, and free-probability laws per depth.

:func:`distance_to_law` gives the Kolmogorov-Smirnov and Wasserstein-1
distances of a sample to a tabulated law with atoms, above the
:func:`resolution_floor` of a float product of Jacobians; :func:`compare_to_laws`
puts the free-probability law of ``J J^T`` beside the measured spectrum at each
depth (:class:`SpectrumComparison` of one :class:`LawComparison` per depth).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from isometry import freeprob, meanfield, validate
from isometry.spectra.stats import ks_distance_cdf, wasserstein1_cdf

__all__ = [
    "LawComparison",
    "LawDistance",
    "SpectrumComparison",
    "compare_to_laws",
    "distance_to_law",
    "resolution_floor",
]

# --------------------------------------------------------------------------- #
# A measured sample against a predicted law.
# --------------------------------------------------------------------------- #

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
    ``w`` the weights of the pieces::

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
