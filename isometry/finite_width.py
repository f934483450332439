"""Finite-width law of the Jacobian of deep Gaussian linear and ReLU networks.

Mean field and free probability are limits ``N -> infinity`` at fixed depth
``L``. When ``L / N`` is not small, the squared gain of the input-output
Jacobian ``J = prod_l D^l W^l`` along a direction ``u`` fluctuates from network
to network by a factor that does not shrink with ``N`` at fixed ``L / N``.
For Gaussian weights ``W_ij ~ N(0, sigma_w2 / N)``, zero biases and a linear
or ReLU activation the law is exact at every ``N`` (Hanin & Nica 2019,
"Products of many large random matrices and gradients in deep neural
networks", Theorem 1):

    ||J u||^2 / ||u||^2  =d  prod_{l=1}^{L} (sigma_w2 / N) chi^2_{K_l},   independent layers,
    K_l = N (linear),   K_l ~ Binomial(N, 1/2) (ReLU: the active units; a row's sign
    flip leaves the Gaussian law unchanged, so the mask is independent of the rest).

Hence, with ``psi`` the digamma function and ``E log chi^2_k = psi(k/2) + log 2``,
``Var log chi^2_k = psi'(k/2)``, per layer (:func:`log_gain_moments`):

    E log factor   = log(sigma_w2 / N) + E[psi(K/2)] + log 2
    Var log factor = E[psi'(K/2)] + Var[psi(K/2)]              (total variance over K)

and ``L`` times these for the network. As ``N -> infinity`` (``psi(x) = log x -
1/(2x) + O(x^-2)``, ``psi'(x) = 1/x + O(x^-2)``, ``Var(2K/N) = 1/N``) the log gain
is normal with (:func:`log_gain_limit`)

    E log ||J u||^2 / ||u||^2 = L log(sigma_w2 mu1) - a L / N,   Var = b L / N,
    (a, b) = (1, 2) linear,   (5/2, 5) ReLU,    mu1 = 1 (linear), 1/2 (ReLU),

with errors ``O(L / N^2)``. At criticality the mean gain stays 1 at every
``L``, ``E ||J u||^2 = (sigma_w2 mu1)^L ||u||^2``, while the typical gain
``exp E log`` falls as ``exp(-a L / N)`` and the second moment grows as
``E (||J u||^2)^2 = (sigma_w2 mu1)^{2L} (1 + b / N + O(N^-2))^L`` (exactly
``(1 + 2/N)^L`` linear, ``(1 + 5/N)^L`` ReLU: :func:`gain_moments`).

The spectrum of ``J J^T`` for the Gaussian linear network has the exact
finite-``N`` second moment (:func:`linear_spectrum_moments`), from the
one-layer law of two vectors' Gram entries and ``E (u^T M u)^2 = (E tr^2 M + 2
E tr M^2) / (N (N + 2))`` for ``M = J^T J`` (rotation invariant):

    m1 = sigma_w2^L,
    E tr^2 M / sigma_w2^{2L} = N (1 + 2/N)^L + N (N - 1) ((1 + 2/N)^L + 2 (1 - 1/N)^L) / 3,
    m2 = E tr M^2 / N = sigma_w2^{2L} [N (N + 2) (1 + 2/N)^L - E tr^2 M / sigma_w2^{2L}] / (2 N),

which tends to free probability's ``m2 = sigma_w2^{2L} (L + 1)``
(:func:`isometry.freeprob.jacobian_moments`) as ``L / N -> 0`` and is
``N (e^2 - e^-1) / 3 ~ 2.34 N`` at ``L = N`` (free probability: ``N + 1``).
For ReLU the law of the two vectors' Gram entries involves the shared masks;
its finite-``N`` spectral moments are not derived here.

A ReLU layer whose ``N`` units are all off (``K_l = 0``, probability ``2^-N``)
makes ``J = 0``; the moments of the log are those conditional on no such
layer (an event of probability at most ``L 2^-N``).

Like :mod:`isometry.freeprob`, the moments compute in float64 under a local
``jax.enable_x64`` and return float64 JAX scalars whatever the global flag
says; :func:`sample_log_gain` follows the default float dtype.

Example:
    >>> from isometry import finite_width
    >>> mean, var = finite_width.log_gain_moments("relu", depth=64, width=64)
    >>> round(float(mean), 2), round(float(var), 2)  # infinite width: 0 and 0
    (-2.57, 5.31)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from isometry import validate

__all__ = [
    "ACTIVATIONS",
    "gain_moments",
    "layer_dof",
    "linear_spectrum_moments",
    "log_gain_limit",
    "log_gain_moments",
    "sample_log_gain",
]

ACTIVATIONS = ("linear", "relu")
_MU1 = {"linear": 1.0, "relu": 0.5}
_LIMIT = {"linear": (1.0, 2.0), "relu": (2.5, 5.0)}  # (a, b): mean -a L/N, variance b L/N
_SECOND = {"linear": 2.0, "relu": 5.0}  # E factor^2 = (sigma_w2 mu1)^2 (1 + c / N)


def _check(act, depth, width, sigma_w2) -> tuple[str, int, int, float]:
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise ValueError(
            f"act must be one of {', '.join(map(repr, ACTIVATIONS))} (the exact finite-width law "
            f"covers Gaussian linear and ReLU networks), got {act!r}"
        )
    depth = validate.positive_int("depth", depth)
    width = validate.positive_int("width", width, minimum=2)
    sw = 1.0 / _MU1[act] if sigma_w2 is None else sigma_w2
    validate.real_array("sigma_w2", sw, minimum=0.0, strict=True)
    return act, depth, width, float(sw)


def _binomial_half(width: int) -> tuple[np.ndarray, np.ndarray]:
    """``k = 1..N`` and ``Binomial(N, 1/2)`` probabilities renormalized over ``k >= 1``
    (log C(N, k) by the running sum of ``log((N - k + 1) / k)``)."""
    k = np.arange(1, width + 1, dtype=np.float64)
    log_c = np.cumsum(np.log((width - k + 1) / k))
    p = np.exp(log_c - width * math.log(2.0))
    return k, p / p.sum()


def _psi_half(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Digamma and trigamma at ``k / 2`` for ``k = 1..K`` (float64, exact recurrences):
    ``psi(x + 1) = psi(x) + 1/x``, ``psi'(x + 1) = psi'(x) - 1/x^2`` from
    ``psi(1/2) = -gamma - 2 log 2``, ``psi(1) = -gamma``, ``psi'(1/2) = pi^2/2``,
    ``psi'(1) = pi^2/6``."""
    top = int(k[-1])
    psi, tri = np.empty(top), np.empty(top)
    for start, p0, t0 in ((1, -np.euler_gamma - 2 * math.log(2.0), math.pi**2 / 2),
                          (2, -np.euler_gamma, math.pi**2 / 6)):  # fmt: skip
        j = np.arange(start, top + 1, 2, dtype=np.float64)  # x = j / 2
        steps = np.concatenate([[0.0], 2.0 / j[:-1]])
        psi[start - 1 :: 2] = p0 + np.cumsum(steps)
        tri[start - 1 :: 2] = t0 - np.cumsum(steps**2)
    return psi[k.astype(int) - 1], tri[k.astype(int) - 1]


def layer_dof(act: str, width: int) -> tuple[jax.Array, jax.Array]:
    """Degrees of freedom ``k`` of one layer's factor ``(sigma_w2 / N) chi^2_k`` and their
    probabilities (float64): ``([N], [1])`` linear; ``k = 1..N`` with ``Binomial(N, 1/2)``
    probabilities renormalized over ``k >= 1`` (ReLU, no dead layer).
    """
    act, _, width, _ = _check(act, 1, width, None)
    k, p = (np.array([float(width)]), np.array([1.0])) if act == "linear" else _binomial_half(width)
    with jax.enable_x64(True):
        return jnp.asarray(k), jnp.asarray(p)


def log_gain_moments(
    act: str, depth: int, width: int, sigma_w2=None
) -> tuple[jax.Array, jax.Array]:
    """Exact mean and variance of ``log(||J u||^2 / ||u||^2)`` at width ``N``.

        mean = L [log(sigma_w2 / N) + E psi(K/2) + log 2],
        var  = L [E psi'(K/2) + Var psi(K/2)]

    (module docstring; Hanin & Nica 2019). ``sigma_w2`` defaults to the critical
    value (1 linear, 2 ReLU). Valid at every ``L >= 1``, ``N >= 2``.

    Returns:
        ``(mean, variance)``, float64 scalars.
    """
    act, depth, width, sw = _check(act, depth, width, sigma_w2)
    k, p = (np.array([float(width)]), np.array([1.0])) if act == "linear" else _binomial_half(width)
    psi, tri = _psi_half(k)
    e_psi = np.sum(p * psi)
    mean = math.log(sw / width) + e_psi + math.log(2.0)
    var = np.sum(p * tri) + np.sum(p * (psi - e_psi) ** 2)
    with jax.enable_x64(True):
        return jnp.asarray(depth * mean, jnp.float64), jnp.asarray(depth * var, jnp.float64)


def log_gain_limit(act: str, depth: int, width: int, sigma_w2=None) -> tuple[jax.Array, jax.Array]:
    """The ``N -> infinity`` (fixed ``L / N``) limit of :func:`log_gain_moments`:

        mean = L log(sigma_w2 mu1) - a L / N,   var = b L / N,
        (a, b) = (1, 2) linear, (5/2, 5) ReLU,

    from ``psi(x) = log x - 1/(2x)``, ``psi'(x) = 1/x`` and ``E log(2K/N) = -1/(2N)``,
    ``Var log(2K/N) = 1/N`` for ``K ~ Binomial(N, 1/2)``. Error ``O(L / N^2)``;
    the log gain is then normal (a sum of ``L`` independent terms).
    """
    act, depth, width, sw = _check(act, depth, width, sigma_w2)
    a, b = _LIMIT[act]
    with jax.enable_x64(True):
        mean = depth * (math.log(sw * _MU1[act]) - a / width)
        return jnp.asarray(mean, jnp.float64), jnp.asarray(b * depth / width, jnp.float64)


def gain_moments(act: str, depth: int, width: int, sigma_w2=None) -> tuple[jax.Array, jax.Array]:
    """Exact ``(E g, E g^2)`` of the squared gain ``g = ||J u||^2 / ||u||^2``:

        E g = (sigma_w2 mu1)^L,    E g^2 = (sigma_w2 mu1)^{2L} (1 + c / N)^L

    from ``E[(chi^2_k)^2] = k^2 + 2k`` per layer: ``c = 2`` (linear, ``K = N``) and
    ``c = 5`` (ReLU: ``E[K^2 + 2K] = N^2/4 + 5N/4``). (Dead layers included: ``g = 0``.)
    """
    act, depth, width, sw = _check(act, depth, width, sigma_w2)
    m = sw * _MU1[act]
    with jax.enable_x64(True):
        e2 = m ** (2 * depth) * (1 + _SECOND[act] / width) ** depth
        return jnp.asarray(m**depth, jnp.float64), jnp.asarray(e2, jnp.float64)


def linear_spectrum_moments(depth: int, width: int, sigma_w2=1.0) -> tuple[jax.Array, jax.Array]:
    """Exact ``(m1, m2)`` of the eigenvalues of ``J J^T`` for a depth-``L`` width-``N``
    product of Gaussian matrices ``W_ij ~ N(0, sigma_w2 / N)`` (module docstring):
    ``m1 = E tr(J J^T) / N``, ``m2 = E tr((J J^T)^2) / N``. As ``L / N -> 0`` this is
    free probability's ``(sigma_w2^L, sigma_w2^{2L} (L + 1))``.
    """
    _, depth, width, sw = _check("linear", depth, width, sigma_w2)
    up, down = (1 + 2 / width) ** depth, (1 - 1 / width) ** depth
    tr2 = width * up + width * (width - 1) * (up + 2 * down) / 3
    m2 = (width * (width + 2) * up - tr2) / (2 * width)
    with jax.enable_x64(True):
        return jnp.asarray(sw**depth, jnp.float64), jnp.asarray(sw ** (2 * depth) * m2, jnp.float64)


def sample_log_gain(key: jax.Array, act: str, depth: int, width: int, n: int, sigma_w2=None):
    """``n`` samples of ``log(||J u||^2 / ||u||^2)`` from the exact law: ``(n,)``.

    Layer ``l`` (key ``fold_in(key, l)``, one ``lax.scan`` step) draws ``N`` standard
    normals per sample and a mask of ``K`` ones: all ones (linear) or i.i.d. Bernoulli(1/2)
    (ReLU, so ``K ~ Binomial(N, 1/2)``); its factor is ``(sigma_w2 / N)`` times the masked
    sum of squares, a ``chi^2_K``. The log gain is the sum of the factors' logs (``-inf``
    when a ReLU layer is dead, probability ``2^-N`` per layer). Memory ``n N``.
    """
    act, depth, width, sw = _check(act, depth, width, sigma_w2)
    n = validate.positive_int("n", n)
    dtype = jnp.result_type(float)

    def layer(total, l):
        k_z, k_mask = jax.random.split(jax.random.fold_in(key, l))
        z2 = jax.random.normal(k_z, (n, width), dtype) ** 2
        if act == "relu":
            z2 = jnp.where(jax.random.bernoulli(k_mask, 0.5, (n, width)), z2, 0.0)
        return total + jnp.log(sw / width * jnp.sum(z2, axis=1)), None

    return jax.lax.scan(layer, jnp.zeros((n,), dtype), jnp.arange(depth))[0]
