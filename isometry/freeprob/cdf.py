"""The eigenvalue law of ``J J^T`` as a CDF, for comparison with measured spectra.

:class:`SpectralLaw` tabulates the atoms and the continuous part (the density
of :mod:`isometry.freeprob.density`) on a grid; :func:`spectral_law` builds it,
:func:`sample_spectral_law` on a grid that resolves a measured sample.
NumPy float64 on the host.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from isometry import validate
from isometry.activations import Activation
from isometry.freeprob.density import check_grid, density_core
from isometry.freeprob.law import d2_law, setup
from isometry.freeprob.support import edge_of, max_eigenvalue, spectral_atoms

__all__ = ["SpectralLaw", "sample_spectral_law", "spectral_law"]

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SpectralLaw:
    """The law of the eigenvalues ``lambda`` of ``J J^T``, tabulated on a grid.

    The law is the atom at 0, the other atoms, and a continuous part with
    density ``rho`` (:func:`spectral_density`). Its CDF is

        F(lambda) = 1 - int_lambda^edge rho - sum_{a_k > lambda} m_k,

    the integral by the trapezoid rule in ``log lambda`` (of ``lambda rho``)
    from the right edge down, so it needs no mass below ``floor``: there the
    atom at 0 and the continuous part are one number, :attr:`below`. Built by
    :func:`spectral_law`; NumPy float64 arrays (a host-side table).

    Attributes:
        grid: ``(G,)`` increasing positive eigenvalues.
        density: ``(G,)`` ``rho`` of the continuous part (NaN where unresolved).
        converged: ``(G,)`` the solver converged and resolved the law of ``d`` there.
        atom_at_zero: the mass at 0.
        atom_locations: ``(k,)`` the other atoms' locations.
        atom_masses: ``(k,)`` their masses.
        edge: the right edge of the support (:func:`max_eigenvalue`).
        floor: the CDF is tabulated at grid points ``>= floor`` (raised above
            the highest unresolved grid point).
    """

    grid: np.ndarray
    density: np.ndarray
    converged: np.ndarray
    atom_at_zero: float
    atom_locations: np.ndarray
    atom_masses: np.ndarray
    edge: float
    floor: float

    def __hash__(self):
        return id(self)

    @functools.cached_property
    def above(self) -> np.ndarray:
        """``(G,)`` the continuous mass above each grid point; NaN below the floor."""
        keep = self.grid >= self.floor
        x = self.grid[keep]
        out = np.full(self.grid.shape, np.nan)
        if x.size < 2:
            return out
        f = x * np.nan_to_num(self.density[keep])
        seg = 0.5 * (f[1:] + f[:-1]) * np.diff(np.log(x))
        out[keep] = np.concatenate([np.cumsum(seg[::-1])[::-1], [0.0]])
        return out

    @property
    def continuous_mass(self) -> float:
        """The continuous part's mass above the floor (NaN with fewer than 2 grid points there)."""
        above = self.above[self.grid >= self.floor]
        return float(above[0]) if above.size >= 2 else float("nan")

    @property
    def below(self) -> float:
        """The mass at or below the floor: ``1 - continuous mass - atoms`` (the atom at 0
        and the continuous part there; may be slightly negative by quadrature error)."""
        return 1.0 - self.continuous_mass - float(np.sum(self.atom_masses))

    def _above_at(self, x):
        """The continuous mass above ``x``, linear in ``s = sqrt(lambda)`` between grid points."""
        keep = self.grid >= self.floor
        if keep.sum() < 2:
            return np.full(np.shape(x), np.nan)
        return np.interp(np.sqrt(np.maximum(x, 0.0)), np.sqrt(self.grid[keep]), self.above[keep])

    def in_singular_values(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(s (G,), p(s) (G,), atom locations (k,))`` in the singular values ``s = sqrt(lambda)``
        of ``J``: ``p(s) = 2 s rho(s^2)``."""
        s = np.sqrt(self.grid)
        return s, 2.0 * s * self.density, np.sqrt(self.atom_locations)

    def cdf(self, x) -> np.ndarray:
        """``F(x)``, atoms included (right-continuous); NaN below the floor.

        Between grid points the continuous part is linear in the singular value
        ``s = sqrt(lambda)`` (the variable of the measured histograms).
        """
        x = np.asarray(x, dtype=float)
        atoms = np.sum(self.atom_masses * (self.atom_locations > x[..., None]), axis=-1)
        return np.where(x >= self.floor, 1.0 - self._above_at(x) - atoms, np.nan)

    def continuous_cdf(self, x) -> np.ndarray:
        """The CDF of the continuous part above the floor, normalized to 1."""
        return 1.0 - self._above_at(x) / self.continuous_mass


def spectral_law(
    act: Activation | str,
    q_star,
    depth: int,
    weights: str,
    grid,
    sigma_w2=None,
    *,
    floor: float = 0.0,
    atom_window: float = 1e-6,
    pad_to: int | None = None,
) -> SpectralLaw:
    """The law of the eigenvalues of ``J J^T`` with its CDF on ``grid`` (:class:`SpectralLaw`).

    Args:
        act, q_star, depth, weights, sigma_w2: as in :func:`spectral_density`.
        grid: eigenvalues (any shape); sorted, and non-positive points dropped.
        floor: the smallest eigenvalue at which the CDF is tabulated (>= 0).
        atom_window: grid points within ``atom_window * a`` of an atom ``a``
            are dropped: there the solver's density is round-off of the atom's
            subtracted pole.
        pad_to: pad the solver's grid to this length (repeating its last
            point), so calls with grids of different lengths compile once.

    Grid points where the solver fails raise the floor above the highest of
    them (by a factor ``1 + 1e-4``).
    """
    act, q, depth, weights, sw = setup(act, q_star, depth, weights, sigma_w2)
    check_grid(grid)
    validate.real_array("floor", floor, minimum=0.0)
    validate.real_array("atom_window", atom_window, minimum=0.0)
    zero, locs, masses = spectral_atoms(act, q, depth, weights, sw)
    x = np.unique(np.asarray(grid, dtype=float))
    x = x[(x > 0) & np.isfinite(x)]
    for a in locs:
        x = x[np.abs(x - a) >= 0.999 * atom_window * a]
    if not x.size:
        raise ValueError("grid must hold positive eigenvalues away from the atoms")
    size = x.size if pad_to is None else max(x.size, validate.positive_int("pad_to", pad_to))
    with jax.enable_x64(True):
        lam = jnp.asarray(np.pad(x, (0, size - x.size), mode="edge"))
        dens, _, _, _, ok, _ = density_core(act, q, depth, weights, sw, lam)
        edge = edge_of(d2_law(act, q), depth, weights, sw)
    dens, ok = np.asarray(dens)[: x.size], np.asarray(ok)[: x.size]
    if not ok.all():
        floor = max(float(floor), float(x[~ok].max()) * 1.0001)
    return SpectralLaw(x, dens, ok, zero, locs, masses, edge, float(floor))


def sample_spectral_law(
    act: Activation | str,
    q_star,
    depth: int,
    weights: str,
    sample,
    floor: float,
    sigma_w2=None,
    *,
    points: int = 120,
) -> SpectralLaw:
    """:func:`spectral_law` on a grid that resolves a measured sample of eigenvalues.

    The grid, in the singular values ``s = sqrt(lambda)``: ``points`` linear
    from 0 to past the edge and the sample's maximum, ``points`` geometric in
    ``s^2`` from ``floor`` to the edge, ``points // 2`` sample quantiles
    inside the support, 16 points clustered at the edge and 12 on either side
    of each atom (from ``1e-6`` relative; the atom window is ``1e-6`` in ``s``).

    Args:
        sample: measured eigenvalues of ``J J^T`` (any shape, pooled).
        floor: the smallest eigenvalue the measurement resolves.
        points: grid size per part (>= 8).
    """
    points = validate.positive_int("points", points, minimum=8)
    lam = np.sort(np.ravel(np.asarray(sample, dtype=float)))
    if not lam.size:
        raise ValueError("sample must not be empty")
    with jax.enable_x64(True):
        edge = float(max_eigenvalue(act, q_star, depth, weights, sigma_w2))
    _, locs, _ = spectral_atoms(act, q_star, depth, weights, sigma_w2)
    atoms, s_edge = np.sqrt(locs), np.sqrt(edge)
    s_meas = np.sqrt(lam[lam > floor])
    inside = s_meas[s_meas < s_edge]
    hi = max(1.02 * s_edge, 1.05 * float(np.sqrt(lam[-1])))
    parts = [
        np.linspace(0.0, hi, points + 1)[1:],
        np.sqrt(np.geomspace(floor, edge, points)),
        np.quantile(inside, np.linspace(0, 1, points // 2)) if inside.size else [],
        s_edge * (1 - np.geomspace(1e-8, 0.1, 16)),
    ]
    for a in atoms:
        parts += [a * (1 - np.geomspace(1e-6, 0.1, 12)), a * (1 + np.geomspace(1e-6, 0.1, 12))]
    s = np.unique(np.concatenate([np.ravel(x) for x in parts]))
    s = s[(s > 0) & np.isfinite(s)]
    return spectral_law(act, q_star, depth, weights, s * s, sigma_w2, floor=floor, atom_window=2e-6)
