"""The density solver: the spectral density of ``J J^T`` from the S-transform equation.

For each ``lambda`` the subordination point ``u = z_D`` (as ``v = log u``) solves
the logarithm of the S-transform equation by Newton continuation in ``eta``
(see :mod:`isometry.freeprob`); where the nodes of the law of ``d`` do not
resolve ``M_{D^2}`` the points are solved again with the law as uniform cells.
:func:`spectral_density` and :func:`singular_value_density` are the public
entry points; :func:`density_core` the solve on a float64 grid.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from isometry import validate
from isometry.activations import Activation
from isometry.freeprob.law import (
    CHECK_QUADRATURE,
    WEIGHT_EXPONENT,
    d2_law,
    host_eval,
    law_arrays,
    m_of_u,
    m_of_u_cells,
    setup,
    uniform_cells,
)
from isometry.freeprob.support import edge_of, jacobian_atoms

__all__ = [
    "SolverError",
    "SpectralDensity",
    "check_grid",
    "density_core",
    "singular_value_density",
    "spectral_density",
]

Array = jax.Array


class SolverError(ValueError):
    """The density solver did not converge (or did not resolve) at some grid points."""


# --------------------------------------------------------------------------- #
# The equation and its Newton solver.
# --------------------------------------------------------------------------- #


class _Params(NamedTuple):
    """The scalars of the equation (float64 arrays, traced: one program serves every
    depth, ensemble and grid range)."""

    zero: Array  # P(d = 0): 1 + M = zero + C
    logsig: Array  # log sigma_w2
    m1: Array  # (sigma_w2 mu1)^L
    mu1: Array
    mu2: Array
    edge: Array  # the right edge of the support
    depth: Array  # L
    s: Array  # 1 Gaussian, 0 orthogonal weights
    levels: Array  # continuation levels (integer)


def _residual(v, logz, law, p: _Params, cells):
    u = jnp.exp(v)
    m, c = m_of_u_cells(u, *law) if cells else m_of_u(u, *law)
    lm, l1m = jnp.log(m), jnp.log(p.zero + c)
    layer = p.logsig + lm + v + (p.s - 1) * l1m
    return l1m - lm + p.depth * layer - logz


_LEVELS_RATIO = 0.25
_NEWTON_PER_LEVEL = 4
_POLISH = 12
_ETA_FLOOR = 1e-13
_TOL = 1e-7  # |F| = |log(z(m) / z)|: relative error of the equation


def _solve(lam, law, p: _Params, cells: bool):
    """Newton continuation in ``eta``; returns ``(C, z, |F|, v)`` per grid point (traced).

    ``C`` as in :func:`m_of_u` (``1 + M = P(d = 0) + C``); ``cells``: ``law`` is
    ``(a, b, w)`` of :func:`m_of_u_cells`, else ``(nodes, weights)``.
    """
    scale = jnp.where(lam > 0, jnp.minimum(lam, p.edge), p.edge)
    eta_min = _ETA_FLOOR * scale
    eta0 = 2.0 * (p.edge + jnp.abs(lam))
    z0 = lam + 1j * eta0
    m0 = p.m1 / z0
    u0 = p.mu1 / m0 + p.mu2 / p.mu1
    v0 = jnp.log(u0)

    def res(v, logz):
        return _residual(v, logz, law, p, cells)

    def newton(v, logz):
        f, df = jax.jvp(lambda x: res(x, logz), (v,), (jnp.ones_like(v),))
        step = f / df
        step = jnp.where(jnp.isfinite(step), step, 0.0)
        # Trust region in log u; stay in the upper half plane, 0 < Im v < pi.
        size = jnp.abs(step)
        step = jnp.where(size > 1.0, step / size, step)
        vn = v - step
        im = jnp.imag(vn)
        im = jnp.where(im <= 0.0, 0.5 * jnp.imag(v), im)
        im = jnp.where(im >= jnp.pi, 0.5 * (jnp.imag(v) + jnp.pi), im)
        return jnp.real(vn) + 1j * im

    def level(k, v):
        eta = jnp.maximum(eta0 * _LEVELS_RATIO**k, eta_min)
        logz = jnp.log(lam + 1j * eta)
        return jax.lax.fori_loop(0, _NEWTON_PER_LEVEL, lambda _, x: newton(x, logz), v)

    v = jax.lax.fori_loop(jnp.zeros_like(p.levels), p.levels, level, v0)
    z = lam + 1j * eta_min
    logz = jnp.log(z)
    v = jax.lax.fori_loop(0, _POLISH, lambda _, x: newton(x, logz), v)
    r = jnp.abs(res(v, logz))
    u = jnp.exp(v)
    _, c = m_of_u_cells(u, *law) if cells else m_of_u(u, *law)
    return c, z, r, v


def _levels(lam, edge):
    """Continuation levels from ``eta0 = 2 (edge + |lambda|)`` to ``eta_min``:
    ``log(eta0 / eta_min) / log(1 / ratio)``, summed in logarithms (the ratio of the two
    overflows for a grid point below about ``1e-295 x edge``)."""
    lam = np.abs(np.asarray(lam))
    pos = lam[lam > 0]
    lo = min(float(pos.min()), edge) if pos.size else edge
    hi = edge + float(lam.max())
    span = math.log(2.0) + math.log(hi) - math.log(_ETA_FLOOR) - math.log(lo)
    n = span / math.log(1.0 / _LEVELS_RATIO)
    return 8 * math.ceil((n + 2) / 8)


_CELLS = 2048


# --------------------------------------------------------------------------- #
# The density on a grid.
# --------------------------------------------------------------------------- #


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpectralDensity:
    """A predicted spectral density on a grid.

    Attributes:
        grid: ``(n,)`` the points (eigenvalues of ``J J^T``, or singular values of ``J``).
        density: ``(n,)`` the density of the continuous part there (NaN only
            where ``converged`` is False).
        atom_at_zero: ``()`` the mass at 0 (``1 - p`` for ReLU-like laws).
        atom_locations: ``(k,)`` the other atoms' locations (orthogonal weights
            with an atom of ``d``: ``sigma_w2^L a^L``).
        atom_masses: ``(k,)`` their masses.
        converged: ``(n,)`` Newton converged and the law of ``d`` resolved there.
        residual: ``(n,)`` ``|F|`` of the log S-transform equation.
    """

    grid: Array
    density: Array
    atom_at_zero: Array
    atom_locations: Array
    atom_masses: Array
    converged: Array
    residual: Array


def _params(law, sw, depth, weights, edge, levels) -> _Params:
    """The equation's scalars for :func:`_solve` (NumPy float64: no program per value)."""
    f = np.float64
    return _Params(
        zero=f(law.zero_mass),
        logsig=f(math.log(sw)),
        m1=f((sw * law.mu[0]) ** depth),
        mu1=f(law.mu[0]),
        mu2=f(law.mu[1]),
        edge=f(edge),
        depth=f(depth),
        s=f(WEIGHT_EXPONENT[weights]),
        levels=np.int64(levels),
    )


def _green(c, z, locs, masses):
    """``G`` minus the atoms' poles: the continuous part's Stieltjes transform.

    ``G = (1 + M) / z`` and ``1 + M = P(0) + C`` (:func:`m_of_u`), so the part
    without the atom at zero is ``C / z``.
    """
    g = c / z
    if locs.size:
        g = g - jnp.sum(jnp.asarray(masses) / (z[:, None] - jnp.asarray(locs)), axis=-1)
    return g


# Agreement required between two discretizations of the law of d, |G_1 - G_2| <= tol |G|.
# Both parts of G are compared: a solution that lands on the real axis between
# two nodes of the first rule has density 0 under both rules but a different real part.
_RESOLVED = 1e-7
_RESOLVED_CELLS = 1e-3


@jax.jit
def _solve_nodes(lam, law, check, atoms, p: _Params):
    """Solve on the nodes ``law`` of the law of ``d``; ``check``: a second, independent rule
    (None for the exact laws) that must give the same ``G`` at the solution.

    Returns ``(G (n,), converged (n,), |F| (n,), unresolved (n,))``, ``G`` without the
    poles of ``atoms = (locations, masses)``.
    """
    c, z, r, v = _solve(lam, law, p, cells=False)
    g = _green(c, z, *atoms)
    ok = (r < _TOL) & jnp.isfinite(g)
    if check is not None:
        _, c_check = m_of_u(jnp.exp(v), *check)
        ok = ok & (jnp.abs(_green(c_check, z, *atoms) - g) <= _RESOLVED * jnp.abs(g))
    return g, ok, r, ~ok & (lam > 0)


@jax.jit
def _solve_cells(lam, idx, found, fine, coarse, atoms, p: _Params):
    """Solve again at ``lam[idx]`` with the law of ``d`` as a mixture of uniform cells
    (``fine``; exact up to the real axis), checked against half as many cells (``coarse``).

    ``found = (G, converged, |F|, unresolved)`` of :func:`_solve_nodes`; its unresolved points
    among ``idx`` take the new solution. Returns the updated ``(G, converged, |F|)``.
    """
    g, ok, r, bad = found
    cc, zc, rc, vc = _solve(lam[idx], fine, p._replace(zero=jnp.zeros_like(p.zero)), cells=True)
    gc = _green(cc, zc, *atoms)
    _, c2 = m_of_u_cells(jnp.exp(vc), *coarse)
    okc = (
        (rc < _TOL)
        & jnp.isfinite(gc)
        & (jnp.abs(_green(c2, zc, *atoms) - gc) <= _RESOLVED_CELLS * jnp.abs(gc))
    )
    take = bad[idx]
    return tuple(
        x.at[idx].set(jnp.where(take, new, x[idx])) for x, new in ((g, gc), (ok, okc), (r, rc))
    )


_TINY = float(np.finfo(np.float64).tiny)
"""The smallest normal float64: the solver's range of positive ``lambda`` starts there."""


@jax.jit
def _density_of(lam, g, ok):
    """``(rho (n,), converged (n,))``: ``-Im G / pi``, 0 at negative points, NaN where not ok.

    A subnormal ``lambda`` (below :data:`_TINY`) is not ok: there ``eta_min = 1e-13 lambda``
    underflows and the solve returns a wrong density with a small residual (ReLU, Gaussian,
    depth 3: ``lambda^(2/3) rho = 0.1378`` from ``1e-200`` down to ``2.3e-308``,
    ``2e-200`` at ``1e-310``).
    """
    dens = jnp.maximum(-jnp.imag(g) / jnp.pi, 0.0)
    dens = jnp.where(lam < 0, 0.0, dens)
    ok = (ok & ~((lam > 0) & (lam < _TINY))) | (lam < 0)
    return jnp.where(ok, dens, jnp.nan), ok


_ATOMS = 2
"""The most atoms of a closed-form law of ``d`` (leaky ReLU): the solver's atom arrays' length."""
_CELLS_BATCH = 8
"""The cells' solve takes a power of two of at least this many points (or the whole grid)."""


def _unresolved_points(bad):
    """Indices of the grid points to solve again with the cells, or None: all points under a
    trace; else the unresolved ones, padded (repeating one) to a power of two of at least
    :data:`_CELLS_BATCH`, at most the whole grid, so that few shapes compile (each point of
    the cells' solve costs about 10 ms: padding to the whole grid would cost more)."""
    n = bad.shape[0]
    if not validate.is_concrete(bad):
        return np.arange(n)
    idx = np.nonzero(np.asarray(bad))[0]
    if not idx.size:
        return None
    size = min(n, max(_CELLS_BATCH, 1 << math.ceil(math.log2(idx.size))))
    return np.concatenate([idx, np.full(size - idx.size, idx[-1])])


def density_core(act, q, depth, weights, sw, lam):
    """Solve on the (float64, 1-D) grid ``lam``; returns the dataclass pieces.

    Two compiled programs serve every depth, ensemble and grid of one law's shape:
    ``_solve_nodes``, then ``_solve_cells`` where the nodes do not resolve
    ``M_{D^2}`` (``u`` close to the support of ``d``).
    """
    with host_eval():
        law = d2_law(act, q)
        edge = edge_of(law, depth, weights, sw)
        check = None if law.exact else law_arrays(d2_law(act, q, quad=CHECK_QUADRATURE))
    locs, masses = jacobian_atoms(law, depth, weights, sw)
    if weights == "orthogonal" and law.exact and law.nodes.size == 1 and law.weights[0] == 1.0:
        # Linear orthogonal network: all mass at sigma_w2^L, no continuous part.
        zeros = jnp.zeros_like(lam)
        return zeros, 0.0, locs, masses, jnp.ones(lam.shape, bool), zeros
    levels = _levels(lam, edge) if validate.is_concrete(lam) else _levels([edge * 1e-30], edge)
    # Atoms padded with zero masses (their poles subtract exact zeros): one shape for all laws.
    pad = max(0, _ATOMS - locs.size)
    p, atoms = (
        _params(law, sw, depth, weights, edge, levels),
        (np.pad(locs, (0, pad)), np.pad(masses, (0, pad))),
    )
    found = _solve_nodes(lam, law_arrays(law), check, atoms, p)
    g, ok, r, bad = found
    idx = None if law.exact else _unresolved_points(bad)
    if idx is not None:
        with host_eval():
            fine, coarse = uniform_cells(act, q, _CELLS), uniform_cells(act, q, _CELLS // 2)
        g, ok, r = _solve_cells(lam, idx, found, fine, coarse, atoms, p)
    dens, ok = _density_of(lam, g, ok)
    return dens, law.zero_mass, locs, masses, ok, r


def check_grid(grid):
    """``grid`` is a non-empty array of finite reals (any shape)."""
    validate.real_array("grid", grid, nonempty=True)


def _report(name, grid, ok, on_failure):
    if on_failure == "nan" or not validate.is_concrete(ok):
        return
    bad = ~np.asarray(ok)
    if bad.any():
        pts = np.asarray(grid).ravel()[bad.ravel()]
        raise SolverError(
            f"{name}: the density solver did not converge at {bad.sum()} of {bad.size} grid "
            f"points, e.g. {np.array2string(pts[:8], precision=6)}"
            " (pass on_failure='nan' to get NaN there and the `converged` mask)"
        )


def spectral_density(
    act: Activation | str,
    q_star,
    depth: int,
    weights: str,
    grid,
    sigma_w2=None,
    *,
    on_failure: str = "raise",
) -> SpectralDensity:
    """Density of the eigenvalues of ``J J^T`` on ``grid`` (wide-network limit).

        rho(lambda) = -(1/pi) Im G(lambda + i0),  G = (1 + m) / z,
        z = (1 + m) / (m S_J(m)),  S_J = (S_W S_{D^2})^L

    (Pennington, Schoenholz & Ganguli 2017, eqs. 9-13; 2018.) Atoms (at zero
    for ReLU-like activations; for orthogonal weights at ``sigma_w2^L`` when
    ``d`` has an atom at 1 of mass > ``1 - 1/L``) are reported separately and
    excluded from ``density``; ``integral density + atoms = 1``.

    Args:
        act: activation or its name.
        q_star: the pre-activation variance ``q* > 0``.
        depth: ``L >= 1``.
        weights: ``"gaussian"`` or ``"orthogonal"``.
        grid: eigenvalues, any shape (finite); negative points get density 0.
        sigma_w2: weight variance; default the critical point for ``q*``.
        on_failure: ``"raise"`` (:class:`SolverError` naming the points where
            the solver failed) or ``"nan"`` (NaN there; see ``converged``).

    Returns:
        :class:`SpectralDensity` with ``density`` of ``grid``'s shape.
    """
    return _density_on_grid(
        "spectral_density", act, q_star, depth, weights, grid, sigma_w2, on_failure, singular=False
    )


def singular_value_density(
    act: Activation | str,
    q_star,
    depth: int,
    weights: str,
    grid,
    sigma_w2=None,
    *,
    on_failure: str = "raise",
) -> SpectralDensity:
    """Density of the singular values ``s`` of ``J`` on ``grid``: ``2 s rho(s^2)``.

    Atoms move to ``sqrt`` of their eigenvalue locations. Arguments as in
    :func:`spectral_density` (``grid`` holds singular values).
    """
    return _density_on_grid(
        "singular_value_density", act, q_star, depth, weights, grid, sigma_w2, on_failure,
        singular=True,
    )  # fmt: skip


def _density_on_grid(name, act, q_star, depth, weights, grid, sigma_w2, on_failure, singular):
    """The checks and the solve shared by :func:`spectral_density` and
    :func:`singular_value_density` (``singular``: ``grid`` holds ``s``, solved at ``s^2``)."""
    with host_eval():
        act, q, depth, weights, sw = setup(act, q_star, depth, weights, sigma_w2)
    validate.choice("on_failure", on_failure, ("raise", "nan"))
    check_grid(grid)
    with jax.enable_x64(True):
        x = jnp.asarray(grid, jnp.float64)
        lam = jnp.where(x >= 0, x * x, -1.0).ravel() if singular else x.ravel()
        dens, zero, locs, masses, ok, r = density_core(act, q, depth, weights, sw, lam)
        locs = jnp.asarray(locs)
        if singular:  # p(s) = 2 s rho(s^2); atoms at sqrt of their eigenvalues
            dens = jnp.where(x.ravel() < 0, 0.0, 2.0 * jnp.abs(x.ravel()) * dens)
            locs = jnp.sqrt(locs)
        out = SpectralDensity(
            grid=x,
            density=dens.reshape(x.shape),
            atom_at_zero=jnp.asarray(zero),
            atom_locations=locs,
            atom_masses=jnp.asarray(masses),
            converged=ok.reshape(x.shape),
            residual=r.reshape(x.shape),
        )
    _report(name, grid, out.converged, on_failure)
    return out
