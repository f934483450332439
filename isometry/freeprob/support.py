"""The support of the eigenvalue law of ``J J^T``: its right edge and its atoms.

:func:`max_eigenvalue` is where ``lambda(m) = (1 + m) / (m S_J(m))``, ``m > 0``,
turns; :func:`spectral_atoms` the atom at 0 and, for orthogonal weights, the
atoms ``sigma_w2^L a^L`` of an atom ``a`` of ``d``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from isometry.activations import Activation
from isometry.freeprob.law import RUN_ONCE, WEIGHT_EXPONENT, d2_law, host_eval, law_arrays, setup

__all__ = ["edge_of", "jacobian_atoms", "max_eigenvalue", "spectral_atoms"]

Array = jax.Array


def jacobian_atoms(law, depth, weights, sw):
    """``(locations (k,), masses (k,))`` of the atoms of ``J J^T`` away from 0: for orthogonal
    weights, ``sigma_w2^L a^L`` of mass ``max(0, 1 - L (1 - p_a))`` per atom ``a`` of ``d``."""
    locs, masses = [], []
    if weights == "orthogonal":
        for a, pa in law.atoms:
            mass = 1.0 - depth * (1.0 - pa)
            if mass > 1e-14:
                locs.append(sw**depth * a**depth)
                masses.append(mass)
    return np.array(locs, dtype=np.float64), np.array(masses, dtype=np.float64)


def spectral_atoms(act: Activation | str, q_star, depth: int, weights: str, sigma_w2=None):
    """``(atom_at_zero, locations (k,), masses (k,))`` of the eigenvalue law of ``J J^T``.

    The atom at 0 has mass ``P(d = 0)`` (``1 - p`` for ReLU-like laws); for
    orthogonal weights an atom ``a`` of ``d`` of mass ``p_a`` puts
    ``max(0, 1 - L (1 - p_a))`` at ``sigma_w2^L a^L`` (see :func:`spectral_density`).
    No solve: floats and NumPy float64 arrays.
    """
    act, q, depth, weights, sw = setup(act, q_star, depth, weights, sigma_w2)
    law = d2_law(act, q)
    locs, masses = jacobian_atoms(law, depth, weights, sw)
    return float(law.zero_mass), locs, masses


def _log_lambda_real(t, dmax, nodes, w, depth, s, logsig):
    """``log lambda`` on the real axis at ``u = dmax + exp(t)`` (``m > 0``)."""
    u = dmax + jnp.exp(t)
    m = jnp.sum(w * nodes / (u - nodes))
    return (
        jnp.log1p(m)
        - jnp.log(m)
        + depth * (logsig + jnp.log(m) + jnp.log(u))
        + depth * (s - 1) * jnp.log1p(m)
    )


@functools.partial(jax.jit, compiler_options=RUN_ONCE)
def _edge(nodes, w, dmax, logsig, depth, s):
    """Minimum over real ``u > dmax`` of ``lambda(u)``: the right edge (log), and the limit flag."""
    f = functools.partial(
        _log_lambda_real, dmax=dmax, nodes=nodes, w=w, depth=depth, s=s, logsig=logsig
    )
    scale = jnp.maximum(dmax, 1e-300)
    ts = jnp.log(scale) + jnp.linspace(-34.0, 25.0, 600)
    vals = jax.vmap(f)(ts)
    vals = jnp.where(jnp.isfinite(vals), vals, jnp.inf)
    i = jnp.argmin(vals)
    lo = ts[jnp.maximum(i - 1, 0)]
    hi = ts[jnp.minimum(i + 1, ts.size - 1)]
    df = jax.grad(f)

    def body(_, ab):
        a, b = ab
        c = 0.5 * (a + b)
        g = df(c)
        return jnp.where(g > 0, a, c), jnp.where(g > 0, c, b)

    a, b = jax.lax.fori_loop(0, 80, body, (lo, hi))
    t = 0.5 * (a + b)
    at_boundary = i == 0
    return jnp.minimum(f(t), vals[i]), at_boundary


def edge_of(law, depth, weights, sw):
    """The right edge (a float): ``_edge`` on the host, in one context for every caller."""
    with host_eval():
        nodes, w = law_arrays(law)
        dmax = float(law.nodes.max())
        log_edge, at_boundary = _edge(
            nodes, w, np.float64(dmax), np.float64(math.log(sw)), np.float64(depth),
            np.float64(WEIGHT_EXPONENT[weights]),
        )  # fmt: skip
        edge = math.exp(float(log_edge))
        if bool(at_boundary) and law.exact and weights == "orthogonal":
            edge = (sw * dmax) ** depth  # the atom at the top of the support
    return edge


def max_eigenvalue(act: Activation | str, q_star, depth: int, weights: str, sigma_w2=None) -> Array:
    """The right edge of the support of the eigenvalue law of ``J J^T``.

    The edge is where the real function ``lambda(m) = (1 + m) / (m S_J(m))``,
    ``m > 0``, turns (``d lambda / dm = 0``): the minimum of ``lambda`` over
    the real subordination point ``u = z_D > max d`` (or its limit at
    ``u -> max d``, an atom, for orthogonal weights with an atom of ``d`` at
    its top). Linear Gaussian: ``(L + 1)^(L + 1) / L^L``.
    (Pennington, Schoenholz & Ganguli 2018, sec. 3.) Returns a 0-d float64 array.
    """
    act, q, depth, weights, sw = setup(act, q_star, depth, weights, sigma_w2)
    with jax.enable_x64(True):
        return jnp.asarray(edge_of(d2_law(act, q), depth, weights, sw))
