"""Free probability against measured networks: spectra of sampled Jacobians vs the predicted law.

Networks come from the library sampler (:class:`isometry.jacobian.RandomNetwork`,
:func:`isometry.jacobian.random_network_spectra`): width ``N``, critical point of
``q*``, inputs on the sphere that gives every pre-activation variance ``q*``,
one pass to the deepest depth, float64 plain Jacobian products, squared
singular values by SVD. The prediction is :func:`isometry.freeprob.spectral_law`
(the density of :func:`isometry.freeprob.spectral_density` with its atoms, as a CDF),
the statistic :func:`isometry.spectra.distance_to_law`.

**The statistic.** The Kolmogorov-Smirnov distance ``D = sup |F_meas - F|``
between the empirical law of the eigenvalues of ``J J^T`` pooled over seeds
and the predicted CDF, over ``lambda >= floor``:

* the floor is ``1e-24 lambda_max``. Plain float64 products resolve squared
  singular values down to about ``1e-30 lambda_max`` at width 1,000 and depth
  128 (checked against the QR route :func:`isometry.spectra.log_singular_values`;
  the Gram-matrix route ``method="eigh"`` would stop at ``1e-16``). Deep
  Gaussian and ReLU laws put much of their mass below (the CDF near 0 goes like
  ``lambda^(1/(L+1))``); that mass is compared as one number.
* the law splits into the mass below the floor, the atoms (orthogonal weights
  with hard-tanh: ``sigma_w2^L`` with mass ``1 - L (1 - p)``; measured values
  within ``1e-6`` of it count as the atom) and the continuous part above the
  floor; with ``w`` their weights,
  ``D <= sum |w_meas - w| + w_cont KS(continuous parts)``, the last by
  :func:`isometry.spectra.ks_distance_cdf` against the normalized continuous CDF.
* the predicted CDF is ``1 - int_lambda^edge rho - (atoms above lambda)``,
  integrated from the right edge down by the trapezoid rule in ``log lambda``
  on a grid geometric from the floor, linear in ``lambda``, at the measured
  quantiles and clustered at the edge and the atoms, so no mass below the floor
  is needed. The solver's density within ``1e-6`` (relative) of an atom holds
  round-off of the subtracted pole and is left out. The grid's continuous mass
  is checked not to exceed ``1 - atoms``.

**The bound** ``D <= k F / sqrt(S) + B``, both parts from the measurement and
the law, none tuned to the outcome:

* ``F``, the sampling fluctuation of one network's spectrum, measured: the mean
  two-sample KS distance between seeds, divided by ``sqrt(2)`` (two independent
  deviations add in quadrature). The ``N`` eigenvalues of one network are not
  independent: they are rigid (fluctuations ``O(log N / N)``, not ``N^-1/2``),
  but every layer's empirical law of ``d = phi'(h)^2`` and its ``q^l`` deviate
  from their limits by ``O(N^-1/2)``, and since the length map relaxes slowly
  these deviations persist over many layers: each network's spectrum is rescaled
  by a random factor ``m1 = (1/N) tr J J^T`` (tanh, orthogonal, ``q* = 1/4``,
  ``N = 1000``: ``log m1`` has standard deviation 0.03, 0.09, 0.19 over networks at
  ``L = 8, 32, 128``, and mean zero within its standard error). This common mode
  dominates ``D``; it averages out only over seeds, hence ``1 / sqrt(S)``.
* ``k``: with a common mode, ``D sqrt(S) / F`` is distributed like
  ``|mean| sqrt(S) / (mean |e_i - e_j| / sqrt(2))`` for ``S`` standard normals
  ``e`` (a Student-like ratio: ``F`` is itself estimated from the ``S`` seeds);
  ``k`` is its 99.9% quantile, computed by simulation (:func:`critical_ratio`:
  8.0 for the 6 seeds used here; 31.5 for 3 seeds, which is why 3 are too few).
* ``B``, the bias of the finite-width law, which does not average out. For a law
  of ``d`` with an atom at 0 (ReLU, hard-tanh) the kernel of ``J`` is at least as
  large as the largest kernel of the ``L`` diagonal factors, whose sizes are
  ``Binomial(N, 1 - p)``: the atom at 0 exceeds ``1 - p`` by about
  ``sqrt(p (1 - p) / N) E[max of L standard normals] <= sqrt(2 p (1 - p) ln(L) / N)``,
  and the continuous part loses that mass. ``B`` is twice that (the atom's excess
  plus the continuous part's deficit it shifts), plus ``2 / N`` for the ``O(1/N)``
  corrections of every law (at ``N = 1000``: ``B = 0.002`` for smooth laws,
  ``0.067`` for ReLU at ``L = 8``). The common mode also smooths the pooled law
  (to second order, ``var(log m1) / 2 <= 0.02`` in ``log lambda`` at ``L = 128``),
  negligible beside a spectrum that spans decades there.

Default run: tanh Gaussian at ``q* = 1/4``, depth 2, ``N = 1000``. ``-m slow`` adds
hard-tanh orthogonal with its atoms and a check that the statistic rejects the wrong
law (the law of Gaussian weights), and the whole matrix, depths 2, 8, 32, 128, six seeds
each (a different base seed per case).
"""

from __future__ import annotations

import functools
import itertools
import math
import zlib

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)

from isometry import freeprob, jacobian, spectra  # noqa: E402

WIDTH = 1000
FLOOR = 1e-24
"""Squared singular values below ``FLOOR * lambda_max`` are compared as one mass."""
ATOM_WINDOW = 1e-6
"""Relative half-width of an atom: measured values inside count as it, theory's grid skips it."""
SEEDS = 6


def measure(name, weights, q_star, depths, width, seeds, seed=0) -> np.ndarray:
    """Squared singular values ``(seeds, K, N)`` of sampled networks (float64, SVD)."""
    net = jacobian.RandomNetwork(
        activation=name, weights=weights, q_star=q_star, width=width, depth=max(depths)
    )
    lam = jacobian.random_network_spectra(
        jax.random.key(seed), net, depths, n_seeds=seeds, method="svd", dtype=np.float64
    )
    return np.asarray(lam)[:, 0]


GRID = 1200
"""Theory grids are padded to this length: one compilation of the solver per law."""


def theory_law(name, q_star, depth, weights, floor, measured) -> freeprob.SpectralLaw:
    """The predicted law above ``floor`` (see the module docstring); ``measured`` places nodes."""
    edge = float(freeprob.max_eigenvalue(name, q_star, depth, weights))
    _, atoms, _ = freeprob.spectral_atoms(name, q_star, depth, weights)
    inside = np.sort(measured[(measured > floor) & (measured < edge)])
    parts = [
        np.geomspace(floor, edge, 300),
        np.linspace(0.0, edge, 301)[1:],
        inside[np.linspace(0, inside.size - 1, min(inside.size, 300)).astype(int)],
        edge * (1.0 - np.geomspace(1e-9, 0.1, 30)),
    ]
    for a in atoms:  # cluster nodes at the atoms (the law skips their window)
        parts += [a * (1.0 - np.geomspace(ATOM_WINDOW, 0.2, 30))]
        parts += [a * (1.0 + np.geomspace(ATOM_WINDOW, 0.2, 30))]
    x = np.concatenate(parts)
    # Where the discretized law of d cannot resolve the spectrum (reported by the
    # solver, deep in the lower tail), the law's floor moves above.
    return freeprob.spectral_law(
        name, q_star, depth, weights, x[(x >= floor) & (x <= edge)], floor=floor,
        atom_window=ATOM_WINDOW, pad_to=GRID,
    )  # fmt: skip


def distance(lam, law: freeprob.SpectralLaw) -> float:
    """``sup_{lambda >= floor} |F_meas - F|`` (bounded above as in the module docstring)."""
    return spectra.distance_to_law(lam, law, atom_window=ATOM_WINDOW).ks


def fluctuation(lam, law: freeprob.SpectralLaw) -> float:
    """``F``: the mean two-sample KS distance between seeds ``lam (S, N)``, over ``sqrt(2)``.

    Values below the floor are set to the floor, values at an atom to the atom (each
    compared as one mass, as in :func:`distance`).
    """
    x = np.maximum(lam, law.floor)
    for a in law.atom_locations:
        x = np.where(np.abs(x - a) <= ATOM_WINDOW * a, a, x)
    pairs = [float(spectra.ks_distance(a, b)) for a, b in itertools.combinations(x, 2)]
    return float(np.mean(pairs)) / math.sqrt(2.0)


@functools.cache
def critical_ratio(seeds: int, level: float = 0.999) -> float:
    """``k``: the ``level`` quantile of ``|mean(e)| sqrt(S) / (mean_{i<j} |e_i - e_j| / sqrt(2))``.

    ``e``: ``S`` independent standard normals (the seeds' common-mode deviations);
    200,000 draws from a fixed generator.
    """
    e = np.random.default_rng(0).standard_normal((200_000, seeds))
    pairs = [np.abs(e[:, i] - e[:, j]) for i, j in itertools.combinations(range(seeds), 2)]
    ratio = np.abs(e.mean(1)) * math.sqrt(seeds) / (np.mean(pairs, axis=0) / math.sqrt(2.0))
    return float(np.quantile(ratio, level))


def bias(name, q_star, depth, width) -> float:
    """``B``: the finite-width bias allowance (module docstring)."""
    law = freeprob.d2_law(name, q_star)
    p = 1.0 - law.zero_mass
    atom = 2.0 * math.sqrt(2.0 * p * (1.0 - p) * math.log(depth) / width) if depth > 1 else 0.0
    return atom + 2.0 / width


def check(name, weights, q_star, depths, width=WIDTH, seeds=SEEDS, report=print):
    """Measure, compare every depth, and assert ``D <= k F / sqrt(S) + B``.

    Returns the records (one per depth) and the spectra ``(seeds, K, N)``.
    """
    seed = zlib.crc32(f"{name} {weights} {q_star!r}".encode())
    lam = measure(name, weights, q_star, depths, width, seeds, seed)
    ratio = critical_ratio(seeds)
    records = []
    for k, depth in enumerate(depths):
        sample = lam[:, k]
        floor = FLOOR * float(sample.max())
        law = theory_law(name, q_star, depth, weights, floor, sample.ravel())
        # The continuous mass on the grid cannot exceed what the atoms leave.
        assert law.below >= law.atom_at_zero - 1e-3, (name, weights, q_star, depth, law.below)
        rec = {
            "case": f"{name} {weights} q*={q_star:g} L={depth}",
            "D": distance(sample, law),
            "D_seeds": [distance(s, law) for s in sample],
            "F": fluctuation(sample, law),
            "B": bias(name, q_star, depth, width),
            "below_measured": float(np.mean(sample <= law.floor)),
            "below_theory": law.below,
        }
        rec["bound"] = ratio * rec["F"] / math.sqrt(seeds) + rec["B"]
        report(
            f"{rec['case']:36s} D={rec['D']:.4f} bound={rec['bound']:.4f} "
            f"[kF/sqrt(S)={ratio * rec['F'] / math.sqrt(seeds):.4f}, B={rec['B']:.4f}] "
            f"per seed {np.min(rec['D_seeds']):.4f}-{np.max(rec['D_seeds']):.4f}; "
            f"below floor {rec['below_measured']:.3f} vs {rec['below_theory']:.3f}"
        )
        records.append(rec)
    for rec in records:
        assert rec["D"] <= rec["bound"], rec
    return records, lam


# --------------------------------------------------------------------------- #
# Default subset (<= 30 s): a smooth law at width 1,000 (and, marked slow, an exact
# law with atoms and the statistic's power).
# (Linear Gaussian networks: the slow matrix; their closed forms: test_freeprob.py.)
# --------------------------------------------------------------------------- #


@pytest.mark.slow  # 13 s idle (six networks, two laws); with the next, past 30 s under load
def test_hard_tanh_orthogonal_with_its_atom():
    """Atoms at 0 and at sigma_w2^L, and a continuous part; then the statistic's power:
    the same spectra are far from the law of Gaussian weights."""
    _, lam = check("hard_tanh", "orthogonal", 0.25, (2,))
    sample = lam[:, 0]
    wrong = theory_law("hard_tanh", 0.25, 2, "gaussian", FLOOR * sample.max(), sample.ravel())
    assert distance(sample, wrong) > 0.5


@pytest.mark.slow  # by default test_spectrum_theory compares measured spectra with the laws
def test_tanh_gaussian():
    check("tanh", "gaussian", 0.25, (2,))


def test_critical_ratio():
    """The simulated quantile: 3 seeds need a bound nearly 4x wider than 6."""
    assert 7.5 < critical_ratio(6) < 8.5
    assert critical_ratio(3) > 3.5 * critical_ratio(6)


# --------------------------------------------------------------------------- #
# The full matrix (slow).
# --------------------------------------------------------------------------- #

DEPTHS = (2, 8, 32, 128)
# Linear and ReLU networks: the law of phi' does not depend on q* (one case each).
MATRIX = [
    ("linear", "gaussian", 1.0),
    ("relu", "orthogonal", 1.0),
    *[("hard_tanh", "orthogonal", q) for q in (1 / 64, 0.25, 1.0)],
    *[
        (name, weights, q)
        for name in ("tanh", "erf")
        for weights in ("orthogonal", "gaussian")
        for q in (1 / 64, 0.25, 1.0)
    ],
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "weights", "q_star"), MATRIX)
def test_measured_spectra_matrix(name, weights, q_star):
    check(name, weights, q_star, DEPTHS)
