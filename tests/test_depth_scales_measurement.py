"""Figure 2's measured depth scale: sampled finite tanh networks against mean-field xi_c.

Schoenholz et al. 2017 measure xi_c as the decay length of |c^l - c*| of two inputs
propagated through sampled networks (inputs from :func:`isometry.jacobian.pair_on_sphere`,
the fit :func:`isometry.signal.fit_decay_length`, both tested in their modules' tests); the
figure's measurement, at a size that runs in seconds, agrees with the finite-width theory
within 4 standard errors of the seed mean.
"""

from __future__ import annotations

import numpy as np

from isometry.paper_figures import fig02_depth_scales as fig


def test_measured_xi_c_matches_finite_width_theory():
    sw, sb, width = np.array([0.8, 1.2]), 0.05, 96
    xi = fig.measure_xi_c(sw, sb, width=width, depth=48, seeds=6)
    assert np.all(np.isfinite(xi))
    se = xi.std(axis=0, ddof=1) / np.sqrt(xi.shape[0])
    theory = fig.xi_c_finite_width(sw, sb, width)
    assert np.all(np.abs(xi.mean(axis=0) - theory) < 4 * se), (xi.mean(0), theory, se)
    # The derived correction is O(1/N) and lowers xi_c by a few percent here.
    wide = fig.xi_c_finite_width(sw, sb, 10**12)
    assert np.all((theory < wide) & (theory > 0.85 * wide))
