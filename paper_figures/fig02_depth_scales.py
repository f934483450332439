"""Depth scales xi_q and xi_c of tanh networks vs sigma_w2 at sigma_b2 = 0.05: xi_c diverges at the edge of chaos (Schoenholz et al. 2017, Fig. 2)."""

from __future__ import annotations

import jax
import numpy as np

from isometry import meanfield, plotting

KEYS = ("sigma_w2", "xi_q", "xi_c", "xi_c_iter", "critical_sigma_w2")

TIERS = {
    "tiny": {"sigma_w2": (0.5, 4.0, 15), "sigma_b2": 0.05, "depth": 120},
    "quick": {"sigma_w2": (0.5, 4.0, 351), "sigma_b2": 0.05, "depth": 1000},
    "full": {"sigma_w2": (0.5, 4.0, 2001), "sigma_b2": 0.05, "depth": 6000},
}


def _measured_xi_c(sw, sb, q, c_star, depth, c0):
    """Decay length of ``|c^l - c*|`` along the iterated c-map.

    A least-squares fit of ``log |c^l - c*|`` against ``l`` over the layers
    where the distance lies between 1e-3 (past the nonlinear transient) and
    1e-9 (far above float64 rounding).
    """
    cl = np.asarray(meanfield.iterate_c_map("tanh", c0, q, sw, sb, depth))
    dist = np.abs(cl - c_star[None])
    layers = np.arange(1, depth + 1, dtype=float)[:, None]
    use = (dist < 1e-3) & (dist > 1e-9)
    n = use.sum(0)
    logd = np.log(np.where(use, dist, 1.0))
    lbar = (layers * use).sum(0) / np.maximum(n, 1)
    ybar = (logd * use).sum(0) / np.maximum(n, 1)
    slope = ((layers - lbar) * (logd - ybar) * use).sum(0) / np.maximum(
        ((layers - lbar) ** 2 * use).sum(0), 1e-300
    )
    return np.where((n >= 10) & (slope < 0), -1.0 / np.where(slope < 0, slope, -1.0), np.nan)


def compute(sigma_w2, sigma_b2, depth) -> dict:
    with jax.enable_x64(True):
        return _compute(sigma_w2, sigma_b2, depth)


def _compute(sigma_w2, sigma_b2, depth) -> dict:
    sw = np.linspace(*sigma_w2[:2], int(sigma_w2[2]))
    d = meanfield.phase_diagram("tanh", sw, np.array([sigma_b2]))
    q, c_star = np.asarray(d.q_star[:, 0]), np.asarray(d.c_star[:, 0])
    # Measurement side: iterate the c-map (ordered phase from c = 0.5, chaotic from c = 0).
    c0 = np.where(c_star < 1.0, 0.0, 0.5)
    sub = slice(None, None, max(1, sw.size // 40))
    return {
        "sigma_w2": sw,
        "xi_q": np.asarray(d.xi_q[:, 0]),
        "xi_c": np.asarray(d.xi_c[:, 0]),
        "critical_sigma_w2": np.asarray(d.critical_sigma_w2),
        "sigma_w2_iter": sw[sub],
        "xi_c_iter": _measured_xi_c(sw[sub], sigma_b2, q[sub], c_star[sub], depth, c0[sub]),
    }


def plot(data, params):
    return plotting.depth_scales_figure(data, "tanh", params["sigma_b2"])
