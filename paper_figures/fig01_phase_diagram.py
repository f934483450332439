"""Order-to-chaos phase diagram of tanh networks: chi1 with the edge of chaos, q* and c* (Poole et al. 2016; Schoenholz et al. 2017, Fig. 1)."""

from __future__ import annotations

import jax
import numpy as np

from isometry import meanfield, plotting

KEYS = ("sigma_w2", "sigma_b2", "chi1", "q_star", "c_star", "xi_c", "critical_sigma_w2")

COST = {"quick": 8}
"""Seconds of one CPU core for the quick tier from empty stores (a scheduling hint)."""

TIERS = {
    "tiny": {"sigma_w2": (0.5, 5.0, 9), "sigma_b2": (0.0, 2.0, 5)},
    "quick": {"sigma_w2": (0.5, 5.0, 181), "sigma_b2": (0.0, 2.0, 121)},
    "full": {"sigma_w2": (0.5, 5.0, 401), "sigma_b2": (0.0, 2.0, 401)},
}


def compute(sigma_w2, sigma_b2) -> dict:
    """The diagram in float32 (accurate to ~1e-5, ample for a heat map; see BENCHMARKS.md)."""
    sw = np.linspace(*sigma_w2[:2], int(sigma_w2[2]), dtype=np.float32)
    sb = np.linspace(*sigma_b2[:2], int(sigma_b2[2]), dtype=np.float32)
    with jax.enable_x64(False):
        return {
            k: np.asarray(v) for k, v in meanfield.phase_diagram("tanh", sw, sb).as_dict().items()
        }


def plot(data, params):
    return plotting.phase_diagram_figure(data, "tanh", panels=("chi1", "q_star", "c_star"))
