"""Tests of isometry.freeprob: closed forms, consistency between routes, bad input.

Theory is tested three ways (float64 throughout):

* closed forms: the Fuss-Catalan law of linear Gaussian networks (moments,
  edge, the Marchenko-Pastur density at L = 1); all mass at 1 for linear
  orthogonal networks;
* consistency: the numerical moments of the solved density equal the
  closed-form / S-transform-series moments of ``jacobian_moments``, and the
  density integrates to 1 minus the atoms;
* measurement: spectra of sampled finite networks against the predicted law,
  in ``test_freeprob_measurement.py``.
"""

from __future__ import annotations

import itertools
import math

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)

from isometry import activations, freeprob, gaussian, initializers, meanfield  # noqa: E402

# --------------------------------------------------------------------------- #
# Helpers.
# --------------------------------------------------------------------------- #

_T, _WT = np.polynomial.legendre.leggauss(8)


def _gauss(lo, hi, panels, smooth_ends):
    """Composite 8-point Gauss-Legendre nodes and weights on ``[lo, hi]``.

    With ``smooth_ends`` the variable is ``lo + (hi - lo) sin(pi t / 2)^2``:
    a square-root (or inverse-square-root) behaviour at either end becomes
    smooth in ``t``.
    """
    edges = np.linspace(0.0, 1.0, panels + 1)
    half = 0.5 * np.diff(edges)
    t = (((edges[:-1] + edges[1:]) / 2)[:, None] + half[:, None] * _T).ravel()
    w = (half[:, None] * _WT).ravel()
    if smooth_ends:
        g, dg = np.sin(np.pi * t / 2) ** 2, np.sin(np.pi * t) * np.pi / 2
    else:
        g, dg = t, np.ones_like(t)
    return lo + (hi - lo) * g, w * (hi - lo) * dg


# The laws at hand have, besides square-root edges and divergences at atoms
# inside the support, an integrable power divergence at 0 that can be very
# strong: rho(lambda) ~ lambda^(a - 1) with a = 1/L for Bernoulli laws of d
# (ReLU, hard-tanh: M -> -p, z ~ (M + p)^L), a = 1/(L + 1) for linear
# Gaussian networks, a = 1/(1 + L (4 q* - 1)) for erf (P(d < e) ~ e^(1/(4 q*)));
# leaky ReLU spreads half its mass over L decades per factor 1/a^2 down to
# (sigma_w2 a^2)^L (1e-30 at L = 8, 4e-119 at L = 32). A grid linear in lambda misses
# that mass (it carries almost no moment), so the quadrature is in x = log lambda:
# the top ``_SPLIT`` decades with ``sin^2`` ends (the edge), the deep range down
# to the floor (:func:`_floor`) uniformly in x, and the rest by the power law.
_SPLIT = 1e-8
_FLOOR = 1e-100
_FLOOR_EXACT = 1e-150
_DEEP_PANELS = 160
"""Gauss panels of the deep range from ``_FLOOR`` to ``_SPLIT`` (more in proportion below)."""


def _log_nodes(lo, hi, panels, smooth_ends, breaks=()):
    """Nodes and weights in ``lambda`` for integrating over ``[lo, hi]`` in ``log lambda``."""
    pts = [np.log(lo), *sorted({np.log(b) for b in breaks if lo < b < hi}), np.log(hi)]
    xs, ws, ids = [], [], []
    span = pts[-1] - pts[0]
    for i, (a, b) in enumerate(itertools.pairwise(pts)):
        # Panels in proportion to the length in log lambda, at least 8 per segment.
        x, w = _gauss(a, b, max(8, round(panels * (b - a) / span)), smooth_ends)
        xs.append(x)
        ws.append(w)
        ids.append(np.full(x.size, i))
    x, w = np.concatenate(xs), np.concatenate(ws)
    return np.exp(x), w * np.exp(x), np.concatenate(ids)


def _drop_gaps(lam, dens, ids, scale, atoms):
    """Zero the segments between breaks that lie in a gap of the support.

    A gap ending at an atom (orthogonal weights: the atom at ``sigma_w2^L``)
    holds only round-off of the subtracted pole, which grows like
    ``1 / |lambda - atom|`` as the ``sin^2`` nodes cluster at the atom.
    """
    f = lam * dens
    out = dens.copy()
    for i in np.unique(ids):
        seg = lam[ids == i]
        near = any(np.isclose(a, seg.max(), rtol=1e-6) for a in atoms)
        if near and np.median(f[ids == i]) <= 1e-10 * scale:
            out[ids == i] = 0.0
    return out


def _support_edges(act, q, depth, weights, sigma_w2, lam, dens, scale=None):
    """Edges of the continuous part's support inside ``(split, edge)``.

    An atom at the top (orthogonal weights, Bernoulli ``d``) leaves a gap
    below it: the continuous part ends at a square-root edge inside
    ``(0, max_eigenvalue)``, which becomes a quadrature break. Found where
    ``lambda rho`` crosses ``1e-10`` of its maximum between grid points, then
    refined by two rounds of 32 geometric points.

    A crossing that a refinement does not reproduce is no edge: the density there is
    round-off, which changes with the grid (the solver's continuation starts from the grid's
    range). Hard-tanh at ``q* = 1/64``, depth 32, orthogonal weights: the continuous part has
    mass ``L (1 - p) - (1 - p) = 4e-14`` beside an atom of mass ``1 - 4e-14``, and one grid
    gives ``lambda rho = 1.4e-3`` at ``1 - 1.8e-6`` (residual 6e-14) where another gives 0.
    """
    order = np.argsort(lam)
    lam, f = lam[order], (lam * dens)[order]
    thr = 1e-10 * (f.max() if scale is None else scale)
    on = f > thr
    out = []
    for i in np.nonzero(on[1:] != on[:-1])[0]:
        lo, hi = lam[i], lam[i + 1]
        for _ in range(2):
            x = np.geomspace(lo, hi, 32)
            r = freeprob.spectral_density(act, q, depth, weights, x, sigma_w2)
            g = x * np.asarray(r.density) > thr
            flips = np.nonzero(g != g[0])[0]
            if not flips.size:
                break
            lo, hi = x[flips[0] - 1], x[flips[0]]
        else:
            out.append(float(np.sqrt(lo * hi)))
    return tuple(out)


def _singular_points(act, q, depth, weights, sigma_w2=None):
    """``(sigma_w2 a)^L`` for the atoms ``a`` of ``d`` (mass ``p_a > 0``), orthogonal weights.

    There ``J J^T`` has an atom of mass ``1 - L (1 - p_a)`` while that is positive; at the
    threshold ``L (1 - p_a) = 1`` (PReLU, SELU: ``p_a = 1/2`` at ``L = 2``) it has no atom
    but a density that diverges like ``|lambda - (sigma_w2 a)^L|^(-1/2)`` on one side
    (measured: ``rho sqrt(lambda - lambda_a) -> 0.431`` for SELU at ``q* = 1/64``, 1.440 and
    0.090 at the two ends of PReLU's support). The rule must have a break exactly there:
    a Gauss panel straddling it (SELU: mass 0.978) or a break put near it by the threshold
    search of :func:`_support_edges` (PReLU: 7e-5 below its lower edge, mass 1.000058)
    misses the mass of the divergence.
    """
    if weights != "orthogonal":
        return ()
    if sigma_w2 is None:
        sigma_w2 = float(initializers.critical_variances(act, q).sigma_w2)
    law = freeprob.d2_law(act, q)
    return tuple(float((sigma_w2 * a) ** depth) for a, p in law.atoms if p > 0)


def _floor(act, q, depth, sigma_w2, edge):
    """Where the deep range ends and the tail's power law takes over.

    Smooth laws of ``d``: ``_FLOOR x edge``. The closed-form laws (Bernoulli, leaky ReLU) are
    cheap to solve and go deeper, to ``_FLOOR_EXACT x bottom``,
    ``bottom = min(edge, (sigma_w2 min d)^L)``; measured at depth 32:

    * leaky ReLU's spectrum reaches ``(sigma_w2 a^2)^L = 4e-119`` (``a^2 = 1e-4``), below
      ``_FLOOR x edge = 1e-98``, and holds 0.35 (orthogonal weights: support down to
      ``2.2e-111``) or 0.44 (Gaussian: a second mode at ``1e-122``) of the mass there;
    * below ``bottom`` the density is ``lambda rho = c t (1 + b t + ...)``, ``t = lambda^a``
      (``a = 1/L`` Bernoulli, ``1/(L + 1)`` leaky ReLU with Gaussian weights), so the tail
      ``lambda rho / a_local`` is off by about ``b t`` of itself. At ``1e-98 x edge`` the
      local exponent is ``0.9914 a`` (PReLU, Gaussian weights: tail 5e-3, mass 1 + 1.8e-5),
      ``0.9985 a`` (hard-tanh, ``q* = 1/4``, Gaussian: 1 + 5.8e-7) and ``1.0013 a``
      (hard-tanh, ``q* = 1``, orthogonal: 1 - 1.1e-7); at this floor it is within 3.3e-5 of
      ``a`` and the tails are at most 2.3e-5: mass and moments within 2.5e-9.
    """
    law = freeprob.d2_law(act, q)
    if not law.exact:
        return _FLOOR * edge
    if sigma_w2 is None:
        sigma_w2 = float(initializers.critical_variances(act, q).sigma_w2)
    return _FLOOR_EXACT * min(edge, float(sigma_w2 * law.nodes.min()) ** depth)


def _deep_panels(floor, split):
    """Panels of the deep range: ``_DEEP_PANELS`` for ``_FLOOR`` to ``_SPLIT``, as dense below."""
    ratio = math.log(split / floor) / math.log(_SPLIT / _FLOOR)
    return max(_DEEP_PANELS, round(_DEEP_PANELS * ratio))


def _density_parts(act, q, depth, weights, sigma_w2=None):
    """The continuous part on log grids (top and deep ranges) and the extrapolated tail.

    Returns ``(lam, w, dens, tail, r)``: nodes, weights, density there, the
    mass below the floor (:func:`_floor`, or the lowest resolved point) from the
    local power law ``rho ~ lambda^(a-1)``
    (mass ``lambda rho(lambda) / a`` below ``lambda``; ``a`` the log-slope of
    ``lambda rho`` over the last e-fold), and the top-range result (atoms).
    """
    edge = freeprob.max_eigenvalue(act, q, depth, weights, sigma_w2)
    probe = freeprob.spectral_density(act, q, depth, weights, [edge], sigma_w2)
    breaks = (
        *np.asarray(probe.atom_locations).tolist(),
        *_singular_points(act, q, depth, weights, sigma_w2),
    )
    split, floor = _SPLIT * edge, _floor(act, q, depth, sigma_w2, float(edge))
    lam_top, w_top, id_top = _log_nodes(split, edge, 100, True, breaks)
    top = freeprob.spectral_density(act, q, depth, weights, lam_top, sigma_w2)
    edges = _support_edges(act, q, depth, weights, sigma_w2, lam_top, np.asarray(top.density))
    if edges:
        breaks = breaks + edges
        lam_top, w_top, id_top = _log_nodes(split, edge, 100, True, breaks)
        top = freeprob.spectral_density(act, q, depth, weights, lam_top, sigma_w2)
    lam_deep, w_deep, _ = _log_nodes(floor, split, _deep_panels(floor, split), True, breaks)
    deep = freeprob.spectral_density(act, q, depth, weights, lam_deep, sigma_w2, on_failure="nan")
    bad = ~np.asarray(deep.converged)
    if bad.any():
        # The solver reports where the discretized law of d cannot resolve the
        # spectrum (erf: d's law reaches 0 as a power, u -> 0): the power law
        # takes over from just above the highest such point.
        floor = float(lam_deep[bad].max()) * np.e
        lam_deep, w_deep, _ = _log_nodes(floor, split, _deep_panels(floor, split), True, breaks)
        deep = freeprob.spectral_density(act, q, depth, weights, lam_deep, sigma_w2)
    scale = float(np.max(lam_top * np.asarray(top.density)))
    edges = _support_edges(
        act, q, depth, weights, sigma_w2, lam_deep, np.asarray(deep.density), scale
    )
    if edges:
        lam_deep, w_deep, _ = _log_nodes(
            floor, split, _deep_panels(floor, split), True, breaks + edges
        )
    lam_end = np.array([floor, floor * np.e])
    deep = freeprob.spectral_density(
        act, q, depth, weights, np.concatenate([lam_deep, lam_end]), sigma_w2
    )
    dens_deep = np.asarray(deep.density)
    f0, f1 = lam_end * dens_deep[-2:]
    tail = 0.0
    if f0 > 0 and f1 > f0:
        a = np.log(f1 / f0)
        tail = f0 / a
    lam = np.concatenate([lam_top, lam_deep])
    w = np.concatenate([w_top, w_deep])
    dens_top = np.asarray(top.density)
    scale = float(np.max(lam_top * dens_top))
    atoms = np.asarray(top.atom_locations)
    dens_top = _drop_gaps(lam_top, dens_top, id_top, scale, atoms)
    dens = np.concatenate([dens_top, dens_deep[:-2]])
    return lam, w, dens, tail, top


def _integrate(act, q, depth, weights, sigma_w2=None, powers=(0, 1, 2, 3)):
    lam, w, dens, tail, r = _density_parts(act, q, depth, weights, sigma_w2)
    locs, masses = np.asarray(r.atom_locations), np.asarray(r.atom_masses)
    zero = float(r.atom_at_zero)
    out = []
    for k in powers:
        cont = float(np.sum(w * dens * lam**k)) + (tail if k == 0 else 0.0)
        atoms = float(np.sum(masses * locs**k)) + (zero if k == 0 else 0.0)
        out.append(cont + atoms)
    return out


def _fuss_catalan(depth, k):
    return math.comb((depth + 1) * k, k) / (depth * k + 1)


# --------------------------------------------------------------------------- #
# Closed forms.
# --------------------------------------------------------------------------- #


SLOW = pytest.mark.slow


@pytest.mark.parametrize("depth", [1, pytest.param(2, marks=SLOW), 3, pytest.param(5, marks=SLOW)])
def test_fuss_catalan_density_moments(depth):
    mass, m1, m2, m3 = _integrate("linear", 1.0, depth, "gaussian")
    assert mass == pytest.approx(1.0, rel=1e-8)
    for k, mk in ((1, m1), (2, m2), (3, m3)):
        assert mk == pytest.approx(_fuss_catalan(depth, k), rel=1e-8)


@pytest.mark.parametrize("depth", [1, 2, 7, 100, 1000])
def test_fuss_catalan_edge(depth):
    expected = math.exp((depth + 1) * math.log(depth + 1) - depth * math.log(depth))
    assert freeprob.max_eigenvalue("linear", 0.5, depth, "gaussian") == pytest.approx(
        expected, rel=1e-9
    )


@pytest.mark.parametrize("depth", [1, 2, 4, 50])
def test_fuss_catalan_series_moments(depth):
    jm = freeprob.jacobian_moments("linear", 1.0, depth, "gaussian", order=5)
    expected = [_fuss_catalan(depth, k) for k in range(1, 6)]
    np.testing.assert_allclose(np.asarray(jm.moments), expected, rtol=1e-10)
    assert float(jm.variance) == pytest.approx(depth, rel=1e-12)


def test_marchenko_pastur_pointwise():
    grid = np.linspace(0.01, 4.5, 300)
    r = freeprob.spectral_density("linear", 1.0, 1, "gaussian", grid)
    expected = np.where(grid < 4, np.sqrt(np.maximum(4 / grid - 1, 0)) / (2 * np.pi), 0.0)
    np.testing.assert_allclose(np.asarray(r.density), expected, atol=1e-6)


@pytest.mark.parametrize("depth", [1, 3, 100])
@pytest.mark.parametrize("sigma_w2", [None, 1.3])
def test_linear_orthogonal_is_an_atom(depth, sigma_w2):
    sw = 1.0 if sigma_w2 is None else sigma_w2
    grid = np.linspace(0.05, 3.0, 50)
    r = freeprob.spectral_density("linear", 1.0, depth, "orthogonal", grid, sigma_w2)
    np.testing.assert_allclose(np.asarray(r.atom_locations), [sw**depth], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(r.atom_masses), [1.0], rtol=1e-12)
    assert float(r.atom_at_zero) == 0.0
    assert np.max(np.asarray(r.density)) < 1e-6
    edge = freeprob.max_eigenvalue("linear", 1.0, depth, "orthogonal", sigma_w2)
    assert edge == pytest.approx(sw**depth, rel=1e-9)


def test_relu_atom_at_zero():
    r = freeprob.spectral_density("relu", 1.0, 4, "gaussian", np.linspace(0.1, 5.0, 20))
    assert float(r.atom_at_zero) == pytest.approx(0.5, abs=1e-15)


def test_series_second_moment_matches_closed_form():
    for name in ("tanh", "relu", "erf", "selu", "leaky_relu"):
        for weights in ("gaussian", "orthogonal"):
            for depth in (1, 7, 40):
                jm = freeprob.jacobian_moments(name, 0.3, depth, weights, order=3)
                assert float(jm.moments[1]) == pytest.approx(float(jm.second_moment), rel=1e-10)
                assert float(jm.moments[0]) == pytest.approx(float(jm.mean), rel=1e-12)


def test_moments_closed_form_off_criticality():
    # m1 = (sigma_w2 mu1)^L for any sigma_w2.
    mu1 = float(gaussian.dphi_moment("tanh", 0.5, 1))
    jm = freeprob.jacobian_moments("tanh", 0.5, 6, "orthogonal", sigma_w2=1.7)
    assert float(jm.mean) == pytest.approx((1.7 * mu1) ** 6, rel=1e-12)


# --------------------------------------------------------------------------- #
# Consistency: the density's moments equal the series moments.
# --------------------------------------------------------------------------- #

_FAST = [
    ("relu", "gaussian", 1.0, 3),
    ("hard_tanh", "orthogonal", 0.25, 8),
    # L (1 - p_a) = 1: no atom, inverse-square-root divergences at both ends of the support
    # (:func:`_singular_points`; the catalog's SELU case has one inside the support).
    ("prelu", "orthogonal", 1 / 64, 2),
]
# Smooth laws with orthogonal weights reach the bottom of the law of d, where the
# solver falls back to the cell law (20-200 s each on two CPU cores).
# The smooth Gaussian law (tanh) costs 30 s here, most of it compiling the cell-law
# fallback; in the default suite the tanh Gaussian law is checked against measured
# width-1,000 networks (test_freeprob_measurement.test_tanh_gaussian, KS within a
# derived bound), and the moment consistency of the density by the other _FAST laws.
_HEAVY = [
    ("leaky_relu", "orthogonal", 0.25, 8),
    ("tanh", "gaussian", 1.0, 3),
    ("tanh", "orthogonal", 0.25, 8),
    ("erf", "orthogonal", 1.0, 3),
    ("selu", "gaussian", 0.25, 8),
]


def _sigma_w2(name, q):
    # Criticality (chi1 = 1) even where no sigma_b2 >= 0 has this q*.
    return 1.0 / float(gaussian.dphi_moment(name, q, 1))


def _check_consistency(name, weights, q, depth):
    sw = _sigma_w2(name, q)
    mass, m1, m2, m3 = _integrate(name, q, depth, weights, sw)
    jm = freeprob.jacobian_moments(name, q, depth, weights, sw, order=3)
    law = freeprob.d2_law(name, q)
    # Exact (finite) laws: limited by the density quadrature; quadrature laws
    # of d: by the node rule (G to 1e-7) and, near the support of d, the cell
    # law (G to 1e-3, on a small part of the spectrum).
    tol = 1e-7 if law.exact else 2e-5
    assert mass == pytest.approx(1.0, rel=tol, abs=tol)
    assert m1 == pytest.approx(float(jm.mean), rel=tol)
    assert m2 == pytest.approx(float(jm.second_moment), rel=tol)
    assert m3 == pytest.approx(float(jm.moments[2]), rel=5 * tol)


@pytest.mark.parametrize(("name", "weights", "q", "depth"), _FAST)
def test_density_moments_match_series(name, weights, q, depth):
    _check_consistency(name, weights, q, depth)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "weights", "q", "depth"), _HEAVY)
def test_density_moments_match_series_heavy(name, weights, q, depth):
    _check_consistency(name, weights, q, depth)


@pytest.mark.slow
@pytest.mark.parametrize("name", activations.names())
@pytest.mark.parametrize("weights", ["gaussian", "orthogonal"])
@pytest.mark.parametrize("q", [1 / 64, 0.25, 1.0])
@pytest.mark.parametrize("depth", [2, 8, 32])
def test_density_moments_match_series_catalog(name, weights, q, depth):
    _check_consistency(name, weights, q, depth)


def test_deep_density_is_fast_and_converged():
    grid = np.linspace(1e-3, 3000.0, 1000)
    r = freeprob.spectral_density("linear", 1.0, 1000, "gaussian", grid)
    assert bool(np.all(np.asarray(r.converged)))
    assert np.all(np.asarray(r.density)[grid > 2720.0] < 1e-8)
    assert np.all(np.asarray(r.density)[grid < 2700.0] > 0)


@pytest.mark.default_emitters  # XLA's element-wise emitters at level 0 solve the subnormal
def test_grid_reaches_the_smallest_normal_float():
    """Points down to the smallest normal float64 are solved (the continuation's level count
    overflowed below about ``1e-295 x edge``); subnormal points are reported, not solved.

    ReLU with Gaussian weights: ``rho ~ c lambda^(1/L - 1)`` near 0 (a Bernoulli law of d)."""
    grid = np.array([1e-200, 1e-300, 2.3e-308, 1e-310, 1.0])
    r = freeprob.spectral_density("relu", 1.0, 3, "gaussian", grid, on_failure="nan")
    np.testing.assert_array_equal(np.asarray(r.converged), [True, True, True, False, True])
    scaled = grid[:3] ** (2 / 3) * np.asarray(r.density)[:3]
    np.testing.assert_allclose(scaled, scaled[0], rtol=1e-10)
    with pytest.raises(freeprob.SolverError, match=r"1 of 5 grid points.*1\.e-310"):
        freeprob.spectral_density("relu", 1.0, 3, "gaussian", grid)


# A finite law of d (hard_tanh) by default; the smooth law (tanh: quadrature nodes and the
# cell fallback, 25 s) is the same jit path with more constants, in the slow suite.
@pytest.mark.parametrize(
    ("name", "q"), [("hard_tanh", 0.25), pytest.param("tanh", 0.1, marks=pytest.mark.slow)]
)
def test_jittable_over_grid(name, q):
    grid = np.linspace(0.05, 3.0, 64)

    @jax.jit
    def f(g):
        return freeprob.spectral_density(name, q, 4, "orthogonal", g, on_failure="nan").density

    np.testing.assert_allclose(
        np.asarray(f(grid)),
        np.asarray(freeprob.spectral_density(name, q, 4, "orthogonal", grid).density),
        rtol=1e-10,
        atol=1e-12,
    )


def test_one_program_serves_every_depth_and_ensemble(caplog):
    """The solver's depth, ensemble and continuation levels are data: after one solve of a
    law, other depths, weights and grid ranges of the same shapes compile nothing."""
    grid = np.linspace(0.1, 5.0, 20)  # test_relu_atom_at_zero's solve: compiled once
    freeprob.spectral_density("relu", 1.0, 4, "gaussian", grid)
    with jax.log_compiles(), caplog.at_level("WARNING", logger="jax"):
        a = freeprob.spectral_density("relu", 1.0, 9, "gaussian", grid * 40.0)
        b = freeprob.spectral_density("relu", 1.0, 5, "orthogonal", grid * 4.0)
    assert not [r for r in caplog.records if "Finished XLA compilation" in r.getMessage()]
    assert bool(np.all(np.asarray(a.converged))) and bool(np.all(np.asarray(b.converged)))


@pytest.mark.slow
def test_singular_value_density_is_the_change_of_variables():
    s = np.linspace(0.05, 2.0, 40)
    a = freeprob.singular_value_density("erf", 0.5, 3, "gaussian", s)
    b = freeprob.spectral_density("erf", 0.5, 3, "gaussian", s**2)
    np.testing.assert_allclose(np.asarray(a.density), 2 * s * np.asarray(b.density), rtol=1e-12)


def test_default_sigma_is_critical_point():
    sw, _ = meanfield.critical_point("tanh", 0.25)
    a = freeprob.jacobian_moments("tanh", 0.25, 5, "gaussian")
    b = freeprob.jacobian_moments("tanh", 0.25, 5, "gaussian", float(sw))
    assert float(a.variance) == float(b.variance)
    assert float(a.mean) == pytest.approx(1.0, rel=1e-12)


# --------------------------------------------------------------------------- #
# Bad input.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"q_star": 0.0}, "q_star"),
        ({"q_star": -1.0}, "q_star"),
        ({"q_star": float("nan")}, "q_star"),
        ({"depth": 0}, "depth"),
        ({"depth": 2.5}, "depth"),
        ({"weights": "uniform"}, "weights"),
        ({"sigma_w2": -1.0}, "sigma_w2"),
        ({"grid": [0.1, float("nan")]}, "grid"),
        ({"grid": [0.1, float("inf")]}, "grid"),
        ({"grid": []}, "grid"),
    ],
)
def test_bad_input(kwargs, match):
    args = {
        "act": "tanh",
        "q_star": 0.25,
        "depth": 3,
        "weights": "gaussian",
        "grid": [0.5, 1.0],
        "sigma_w2": None,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        freeprob.spectral_density(**args)
    if "grid" not in kwargs:
        del args["grid"]
        with pytest.raises(ValueError, match=match):
            freeprob.jacobian_moments(**args)
        with pytest.raises(ValueError, match=match):
            freeprob.max_eigenvalue(**args)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: freeprob.jacobian_moments("tanhh", 0.25, 3, "gaussian"), ValueError, "unknown"),
        (lambda: freeprob.max_eigenvalue("tanh", 0.25, 3, None), ValueError, "weights"),
        (
            lambda: freeprob.max_eigenvalue("tanh", float("inf"), 3, "gaussian"),
            ValueError,
            "q_star",
        ),
        (lambda: freeprob.max_eigenvalue("tanh", [0.1, 0.2], 3, "gaussian"), ValueError, "q_star"),
        (lambda: freeprob.max_eigenvalue("tanh", 0.25, True, "gaussian"), ValueError, "depth"),
        (lambda: freeprob.max_eigenvalue("sigmoid", 0.01, 3, "gaussian"), ValueError, "critical"),
        (
            lambda: freeprob.singular_value_density("tanh", -1.0, 3, "gaussian", [0.5]),
            ValueError,
            "q_star",
        ),
        (
            lambda: freeprob.singular_value_density("tanh", 0.25, 0, "gaussian", [0.5]),
            ValueError,
            "depth",
        ),
        (
            lambda: freeprob.singular_value_density("tanh", 0.25, 3, "orth", [0.5]),
            ValueError,
            "weights",
        ),
        (
            lambda: freeprob.singular_value_density("tanh", 0.25, 3, "gaussian", [float("nan")]),
            ValueError,
            "grid",
        ),
        (
            lambda: freeprob.spectral_density("tanh", 0.25, 3, "gaussian", "abc"),
            TypeError,
            "grid",
        ),
        (
            lambda: freeprob.spectral_density("tanh", 0.25, 3, "gaussian", [1.0], on_failure="x"),
            ValueError,
            "on_failure",
        ),
        (lambda: freeprob.s_transform("tanh", 0.0, "gaussian", 0.1), ValueError, "q_star"),
        (lambda: freeprob.s_transform("tanh", 0.25, "uniform", 0.1), ValueError, "weights"),
        (
            lambda: freeprob.jacobian_moments("tanh", 0.25, 3, "gaussian", order=1),
            ValueError,
            "order",
        ),
    ],
)
def test_bad_input_every_entry_point(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_failure_names_the_points(monkeypatch):
    monkeypatch.setattr(freeprob.density, "_TOL", -1.0)  # nothing can converge
    grid = np.array([0.5, 1.5])
    with pytest.raises(freeprob.SolverError, match=r"2 of 2 grid points.*0\.5"):
        freeprob.spectral_density("relu", 1.0, 2, "gaussian", grid)
    r = freeprob.spectral_density("relu", 1.0, 2, "gaussian", grid, on_failure="nan")
    assert not np.any(np.asarray(r.converged))
    assert np.all(np.isnan(np.asarray(r.density)))


# --------------------------------------------------------------------------- #
# The tabulated law and its CDF.
# --------------------------------------------------------------------------- #


def test_max_eigenvalue_and_moments_are_float64_arrays():
    edge = freeprob.max_eigenvalue("tanh", 0.25, 3, "gaussian")
    m = freeprob.jacobian_moments("tanh", 0.25, 3, "gaussian")
    assert isinstance(edge, jax.Array) and edge.shape == () and edge.dtype == np.float64
    assert m.mean.dtype == np.float64


def test_spectral_law_cdf_with_atoms():
    """Hard-tanh, orthogonal: an atom at 0, an atom at sigma_w2^L and a continuous part."""
    from isometry import spectra

    args = ("hard_tanh", 0.25, 2, "orthogonal")
    zero, locs, masses = freeprob.spectral_atoms(*args)
    r = freeprob.spectral_density(*args, [1.0])
    assert zero == pytest.approx(float(r.atom_at_zero))
    np.testing.assert_allclose(locs, r.atom_locations, rtol=1e-14)
    np.testing.assert_allclose(masses, r.atom_masses, rtol=1e-14)
    edge = float(freeprob.max_eigenvalue(*args))
    a = float(locs[0])
    near = a * (1 + np.geomspace(1e-6, 0.1, 20) * [[-1], [1]])
    grid = np.concatenate([np.geomspace(1e-12, edge, 400), near.ravel()])
    law = freeprob.spectral_law(*args, grid, floor=1e-12)
    assert law.edge == pytest.approx(edge)
    # All mass accounted for: below the floor is the atom at 0 (and a sliver of the density).
    assert law.below == pytest.approx(zero, abs=2e-3)
    x = np.geomspace(1e-12, 1.1 * edge, 2000)
    F = law.cdf(x)
    assert np.all(np.diff(F) >= -1e-12) and F[-1] == pytest.approx(1.0)
    jump = law.cdf(a * (1 + 1e-9)) - law.cdf(a * (1 - 1e-9))
    assert jump == pytest.approx(float(masses[0]), rel=1e-3)
    assert np.isnan(law.cdf(1e-13))
    # A sample at the law's quantiles is close to it; the law of Gaussian weights is not.
    u = (np.arange(4000) + 0.5) / 4000
    sample = np.where(u < law.below, 0.0, np.interp(u, F, x))
    sample[np.abs(u - law.cdf(a) + float(masses[0]) / 2) < float(masses[0]) / 2] = a
    d = spectra.distance_to_law(sample, law)
    assert d.ks < 0.01 and d.atom_mass_difference < 0.01 and d.wasserstein1 < 0.01
    wrong = freeprob.spectral_law("hard_tanh", 0.25, 2, "gaussian", grid, floor=1e-12)
    assert spectra.distance_to_law(sample, wrong).ks > 0.3
