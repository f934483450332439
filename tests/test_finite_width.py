"""The finite-width law of ||J u||^2 (Hanin & Nica 2019) three ways.

* closed forms and limits: the digamma/trigamma moments tend to the scaling
  limit (errors O(L / N^2)) and to mean field as N -> infinity; one Wishart
  layer's second spectral moment is 2 + 1/N;
* Monte Carlo: sampled networks (:mod:`isometry.jacobian`, through figure 14's
  ``measure``) and the law's own
  sampler against the exact moments, within Z standard errors of the seed
  spread (the log gain is a sum of L independent terms, nearly normal, so
  the sample variance has standard error ``var sqrt(2 / (S - 1))``);
* consistency: as L / N -> 0 the second moments tend to free probability's
  (:func:`isometry.freeprob.jacobian_moments`).
"""

import jax
import numpy as np
import pytest

from isometry import finite_width as fw
from isometry import freeprob
from isometry.paper_figures.fig14_finite_width import ACTIVATIONS, measure

Z = 4.5


def test_exact_moments_tend_to_the_scaling_limit_and_mean_field():
    for act in fw.ACTIVATIONS:
        for width in (64, 4096):
            L = width  # L / N = 1
            mean, var = fw.log_gain_moments(act, L, width)
            m_lim, v_lim = fw.log_gain_limit(act, L, width)
            # The next terms are O(L / N^2): scaled by N^2 / L they stay bounded.
            assert abs(mean - m_lim) * width**2 / L < 15
            assert abs(var - v_lim) * width**2 / L < 25
        # N -> infinity at fixed L: E log g -> L log(sigma_w2 mu1) = 0 at criticality, Var -> 0.
        mean, var = fw.log_gain_moments(act, 10, 10**6)
        assert abs(mean) < 1e-4 and 0 < var < 1e-4
        # Off criticality the mean gain is mean field's (sigma_w2 mu1)^L at every width.
        np.testing.assert_allclose(fw.gain_moments(act, 7, 3, sigma_w2=1.3)[0], 1.3**7 / 2 ** (
            7 * (act == "relu")), rtol=1e-12)  # fmt: skip
    # Linear: one layer's exact per-layer moments, psi(N/2) + log 2 - log N and psi'(N/2).
    mean, var = fw.log_gain_moments("linear", 1, 2)  # psi(1) + log 2 - log 2, psi'(1)
    np.testing.assert_allclose([mean, var], [-np.euler_gamma, np.pi**2 / 6], rtol=1e-12)
    # One Gaussian layer: E tr (W W^T)^2 / N = 2 + 1/N (Wishart).
    np.testing.assert_allclose(fw.linear_spectrum_moments(1, 10), [1.0, 2.1], rtol=1e-12)


def test_second_moments_tend_to_free_probability():
    for L in (1, 3, 8):
        fp = freeprob.jacobian_moments("linear", 1.0, L, "gaussian", 1.0)
        for width in (10**3, 10**5):
            m1, m2 = fw.linear_spectrum_moments(L, width)
            assert m1 == 1.0
            assert abs(m2 - fp.second_moment) < 2 * L * L / width
            # A fixed direction's gain: E g^2 - 1 = (2 / N) Var_spectrum + O(1/N^2).
            e2 = fw.gain_moments("linear", L, width)[1]
            assert abs(width * (e2 - 1) / 2 - fp.variance) < 2 * L * L / width
    # At L = N the exact second moment is 2.34 N, free probability's N + 1.
    m2 = fw.linear_spectrum_moments(1000, 1000)[1]
    np.testing.assert_allclose(m2 / 1000, (np.e**2 - np.exp(-1)) / 3, rtol=0.01)


def check_log_gain(samples, act, depth, width):
    S = len(samples)
    mean, var = (float(v) for v in fw.log_gain_moments(act, depth, width))
    se = np.sqrt(var / S)
    assert abs(samples.mean() - mean) < Z * se, (samples.mean(), mean, se)
    assert abs(samples.var(ddof=1) - var) < Z * var * np.sqrt(2 / (S - 1))
    return se


def test_sampler_matches_the_exact_moments():
    """ReLU (the linear law is the same with every mask on), L = 24, N = 12."""
    S = 4000
    s = np.asarray(fw.sample_log_gain(jax.random.key(3), "relu", 24, 12, S), np.float64)
    # A dead relu layer (probability 2^-N each) gives g = 0; the moments are without.
    dead = 1 - (1 - 2.0**-12) ** 24
    assert abs(np.mean(np.isinf(s)) - dead) <= Z * np.sqrt(dead / S)
    check_log_gain(s[np.isfinite(s)], "relu", 24, 12)


def test_networks_follow_the_law_at_depth_equal_to_width():
    """Width 16, depths 4 and 16, 300 ReLU and 300 linear networks: the exact law within
    the seed error, while infinite width (E log g = 0) is off by many standard errors at
    L / N = 1."""
    width, depths = 16, (4, 16)
    out = measure(width, depths, 300, jax.random.key(1))
    for i, act in enumerate(ACTIVATIONS):
        for k, L in enumerate(depths):
            se = check_log_gain(out[i, :, k, 0], act, L, width)
        assert abs(out[i, :, -1, 0].mean()) > 10 * se


@pytest.mark.slow
@pytest.mark.parametrize("width, depth", [(16, 16), (32, 32), (64, 16)])
def test_networks_follow_the_law_and_the_finite_width_second_moment(width, depth):
    out = measure(width, (depth // 4, depth), 1000, jax.random.key(width + depth))
    for i, act in enumerate(ACTIVATIONS):
        for k, L in enumerate((depth // 4, depth)):
            check_log_gain(out[i, :, k, 0], act, L, width)
    m2 = out[ACTIVATIONS.index("linear"), :, -1, 2]
    exact = float(fw.linear_spectrum_moments(depth, width)[1])
    assert abs(m2.mean() - exact) < Z * m2.std(ddof=1) / np.sqrt(len(m2))
    free = float(freeprob.jacobian_moments("linear", 1, depth, "gaussian", 1).second_moment)
    assert exact > (2 if depth == width else 1) * free


def test_bad_input():
    with pytest.raises(ValueError, match="width must be an integer >= 2"):
        fw.log_gain_moments("relu", 4, 1)
    with pytest.raises(ValueError, match="act must be one of 'linear', 'relu'"):
        fw.log_gain_limit("tanh", 4, 8)
    with pytest.raises(ValueError, match="depth"):
        fw.gain_moments("linear", 0, 8)
    with pytest.raises(ValueError, match="sigma_w2"):
        fw.linear_spectrum_moments(3, 8, sigma_w2=-1.0)
    with pytest.raises(ValueError, match="n must be"):
        fw.sample_log_gain(jax.random.key(0), "relu", 3, 8, 0)
