"""The Jacobian probe: spectrum of ``J J^T`` of the scanned stack during training.

``J = dx^L/dx^0`` of the model's stack (``model.stack()``, evaluation mode)
at ``x^0 = input_map(u)``, pushed forward in one pass over depth
(:func:`isometry.jacobian.stack_jacobians`); ``lambda = eig(J J^T)``.
Dynamical isometry: mean near 1, small variance and maximum (Pennington,
Schoenholz & Ganguli 2017, "Resurrecting the sigmoid in deep learning
through dynamical isometry").
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from isometry import jacobian, spectra

__all__ = ["jacobian_probe"]


def jacobian_probe(graphdef_eval):
    """A jitted ``probe(params, batch_stats, rest, u) -> {"mean", "var", "max"}``.

    ``u (P, *in)``: probe inputs. For each, ``lambda`` (the ``n`` squared
    singular values of ``J``) summarized by :func:`isometry.spectra.summary`.
    Returns the mean over inputs of the mean and variance of ``lambda``, and
    the maximum of ``lambda`` over all inputs.
    """

    @jax.jit
    def probe(params, stats, rest, u):
        s = nnx.merge(graphdef_eval, params, stats, rest).stack()
        x0 = s.input_map(u)
        n = math.prod(x0.shape[1:])
        J = jax.vmap(lambda x: jacobian.stack_jacobians(s.layer, s.params, x))(x0)
        J = J.reshape(x0.shape[0], n, n)
        lam = spectra.squared_singular_values(J, check_finite=False)
        summ = spectra.summary(lam)
        return {"mean": summ["mean"].mean(), "var": summ["var"].mean(), "max": summ["max"].max()}

    return probe
