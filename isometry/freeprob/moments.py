"""Moments of the eigenvalue law of ``J J^T``: closed forms and the S-transform's series.

:func:`jacobian_moments` gives ``m1 = (sigma_w2 mu1)^L``, ``m2`` in closed form
and ``m_1 .. m_order`` from the power series of ``S_{J J^T} = (S_W S_{D^2})^L``
(Pennington, Schoenholz & Ganguli 2018, eqs. 14-18).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from isometry import validate
from isometry.activations import Activation
from isometry.freeprob.law import WEIGHT_EXPONENT, d_moments, setup

__all__ = ["JacobianMoments", "jacobian_moments"]

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class JacobianMoments:
    """Moments of the eigenvalue law of ``J J^T``.

    Attributes:
        mean: ``m1 = (sigma_w2 mu1)^L``.
        second_moment: ``m2 = m1^2 [1 + L (mu2 / mu1^2 - 1 - s1)]``.
        variance: ``m2 - m1^2`` (``L (mu2/mu1^2 - 1 - s1)`` at criticality).
        moments: ``(order,)`` array ``m_1 .. m_order`` from the S-transform series.
    """

    mean: Array
    second_moment: Array
    variance: Array
    moments: Array


def _series_inverse(a, order):
    """Compositional inverse of ``f(x) = sum_{k>=1} a[k] x^k`` (``a[0] = 0``), truncated."""
    # Newton iteration on power series: solve f(g(y)) = y.
    g = np.zeros(order + 1)
    g[1] = 1.0 / a[1]
    for _ in range(order + 2):
        fg = _compose(a, g, order)
        dfg = _compose(_deriv(a), g, order)
        r = fg.copy()
        r[1] -= 1.0
        g = g - _mul(r, _inv(dfg, order), order)
    return g


def _mul(a, b, order):
    return np.convolve(a, b)[: order + 1]


def _inv(a, order):
    out = np.zeros(order + 1)
    out[0] = 1.0 / a[0]
    for k in range(1, order + 1):
        out[k] = -np.dot(a[1 : k + 1], out[k - 1 :: -1][:k]) / a[0]
    return out


def _deriv(a):
    d = np.zeros_like(a)
    d[:-1] = a[1:] * np.arange(1, len(a))
    return d


def _compose(a, g, order):
    out = np.zeros(order + 1)
    power = np.zeros(order + 1)
    power[0] = 1.0
    for k in range(order + 1):
        out += a[k] * power
        power = _mul(power, g, order)
    return out


def _log_series(a, order):
    """``log(a(x))`` for ``a[0] > 0``."""
    b = a / a[0]
    da = _deriv(b)
    out = np.zeros(order + 1)
    out[1:] = (_mul(da, _inv(b, order), order)[:order]) / np.arange(1, order + 1)
    out[0] = math.log(a[0])
    return out


def _exp_series(a, order):
    out = np.zeros(order + 1)
    out[0] = 1.0
    da = _deriv(a)
    for k in range(1, order + 1):
        out[k] = np.dot(da[:k], out[k - 1 :: -1][:k]) / k
    return out * math.exp(a[0])


def _moment_series(mu, depth, s, sw, order):
    """``m_1..m_order`` of ``J J^T`` from ``mu_1..mu_order`` of ``d``, by series.

    With ``psi(x) = sum m_k x^k = M(1/x)``, its inverse is
    ``chi(m) = m S(m) / (1 + m)``; ``S_J = (S_W S_D)^L`` is formed as
    ``exp(L log(S_W S_D))``.
    """
    psi_d = np.zeros(order + 2)
    psi_d[1:] = mu[: order + 1]
    chi_d = _series_inverse(psi_d, order + 1)  # chi_d(m) = m S_D(m)/(1+m)
    # S_D(m) = chi_d(m) (1 + m) / m
    s_d = _mul(chi_d[1:], np.array([1.0, 1.0]), order)
    # S_W(m) = 1/(sw (1+m)^s)
    one_plus = np.zeros(order + 1)
    one_plus[:2] = 1.0
    s_w = _inv(one_plus, order) / sw if s == 1 else np.eye(1, order + 1)[0] / sw
    layer = _mul(s_w, s_d, order)
    s_j = _exp_series(depth * _log_series(layer, order), order)
    # chi_J(m) = m S_J(m) / (1 + m)
    chi_j = np.zeros(order + 1)
    chi_j[1:] = _mul(s_j, _inv(one_plus, order), order)[:order]
    psi_j = _series_inverse(chi_j, order)
    return psi_j[1:]


def jacobian_moments(
    act: Activation | str, q_star, depth: int, weights: str, sigma_w2=None, *, order: int = 4
) -> JacobianMoments:
    """Moments of the eigenvalues of ``J J^T`` for a depth-``depth`` network at ``q*``.

        m1 = (sigma_w2 mu1)^L,   m2 = m1^2 [1 + L (mu2 / mu1^2 - 1 - s1)],
        mu_k = E_z[phi'(sqrt(q*) z)^(2k)],   s1 = -1 (Gaussian), 0 (orthogonal).

    Higher moments (``moments``, up to ``order``) come from the power series
    of ``S_{J J^T} = (S_W S_{D^2})^L`` (Pennington, Schoenholz & Ganguli
    2018, eqs. 14-18). ``sigma_w2`` defaults to the critical point for ``q*``.

    Raises:
        ValueError: ``q_star <= 0``, ``depth < 1``, unknown ``weights``, bad ``sigma_w2``.
    """
    act, q, depth, weights, sw = setup(act, q_star, depth, weights, sigma_w2)
    order = validate.positive_int("order", order, minimum=2)
    mu = np.array(d_moments(act, q, order + 1))
    s1 = -1.0 if weights == "gaussian" else 0.0
    m1 = (sw * mu[0]) ** depth
    m2 = m1**2 * (1.0 + depth * (mu[1] / mu[0] ** 2 - 1.0 - s1))
    ms = _moment_series(mu, depth, WEIGHT_EXPONENT[weights], sw, order)
    with jax.enable_x64(True):
        return JacobianMoments(
            mean=jnp.asarray(m1),
            second_moment=jnp.asarray(m2),
            variance=jnp.asarray(m2 - m1**2),
            moments=jnp.asarray(ms),
        )
