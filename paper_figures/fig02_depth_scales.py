"""Depth scales xi_q and xi_c of tanh networks vs sigma_w2 at sigma_b2 = 0.05: xi_c diverges at the edge of chaos, and the decay length of the correlation of two inputs propagated through sampled finite networks sits on the theory (Schoenholz et al. 2017, Fig. 2).

Theory (lines, :func:`isometry.meanfield.depth_scales`): ``1/xi_q = -log``
of the slope of the length map at ``q*``, ``1/xi_c = -log chi_c`` with
``chi_c = sigma_w2 E[phi'(u_1) phi'(u_2)]`` at ``c*``.

Measurement (markers, mean and standard error over seeds), as Schoenholz et
al. 2017 did it: two inputs of cosine 0.5 on the ``q*`` sphere
(:func:`isometry.jacobian.pair_on_sphere`) propagated through sampled
width-``N`` tanh networks (:func:`isometry.jacobian.dense_layer`, one compiled
function ``vmap``-ped over seeds and ``sigma_w2``); per layer the cosine ``c^l``
of the two pre-activations ``h^l``; per network a least-squares fit of
``log |c^l - c*| = a - l / xi_c`` over the layers where the distance lies
between 1e-2 (past the nonlinear transient) and 1e-9 (at least 6 layers;
:func:`isometry.signal.fit_decay_length`).

Finite width (dashed line). In the ordered phase (``c* = 1``) ``1 - c^l``
is the squared distance of two collapsing signals, multiplied per layer by
``|W D u|^2`` (``u`` the unit difference direction); at width ``N`` its
logarithm averages ``log chi1 - v/2`` with variance
``v = (2 + 3 (mu2/mu1^2 - 1)) / N`` (``chi^2_N`` of the weights,
``mu_k = E[phi'(h)^(2k)]``), so the measured decay length is

    1 / xi_c(N) = 1 / xi_c + (2 + 3 (mu2/mu1^2 - 1)) / (2 N)

(derived here, a Lyapunov-exponent correction; 4-6% at ``N = 256`` near
``sigma_w2 = 1.1-1.4``). The markers sit on it within their error bars.

Where measurement and theory part, and why (right panel): in the chaotic
phase ``c^l`` of a finite network does not settle at ``c*`` but fluctuates
around it by ~0.1 at ``N = 256`` (about ``(1 - c*^2)/sqrt(N)`` and more), as
large as the distance left after one ``xi_c``, so no decay length can be
fitted at quick sizes; the wide-network assumption of the theory fails
there, and the measurement is drawn only in the ordered phase. Near the edge
of chaos ``xi_c`` exceeds the depth and the seed spread grows. Quick tier:
``N = 256``, depth 160, 4 seeds, 12 values of ``sigma_w2`` below the edge;
the full tier uses ``N = 1,000``, depth 600 and 8 seeds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from isometry import gaussian, jacobian, meanfield, plotting, signal

KEYS = (
    "sigma_w2", "xi_q", "xi_c", "xi_c_width", "critical_sigma_w2", "sigma_w2_net", "xi_c_net",
    "demo_sigma_w2", "demo_c", "demo_c_star", "demo_xi_c",
)  # fmt: skip

# net: (points below the edge, width N, depth, seeds; 0 points: theory only);
# DEMO: sigma_w2 of the curves drawn on the right (ordered, chaotic).
COST = {"quick": 38}
"""Seconds of one CPU core for the quick tier from empty stores (a scheduling hint)."""

TIERS = {
    "tiny": {"sigma_w2": (0.5, 4.0, 15), "sigma_b2": 0.05, "net": (0, 64, 60, 2)},
    "quick": {"sigma_w2": (0.5, 4.0, 351), "sigma_b2": 0.05, "net": (12, 256, 160, 4)},
    "full": {"sigma_w2": (0.5, 4.0, 2001), "sigma_b2": 0.05, "net": (30, 1000, 600, 8)},
}
DEMO = (1.3, 2.5)

ORDERED_FLOOR = 1e-9


def network_correlations(key, sigma_w2, sigma_b2, q_star, c0, width: int, depth: int):
    """Cosine ``c^l`` of the pre-activations of two inputs, ``l = 1..depth``: ``(depth,)``.

    One sampled tanh network ``h^l = x^{l-1} W^l + b^l``, ``x^l = tanh(h^l)``
    (Gaussian ``W``, ``b`` from :func:`isometry.jacobian.dense_layer`; layer
    ``l`` from ``fold_in(key, l)``); inputs of cosine ``c0`` with mean square
    ``(q* - sigma_b2)/sigma_w2``, so ``h^1`` sits at ``q*``. Variances may be traced.
    """
    k_x, k_w = jax.random.split(key)
    affine = jacobian.dense_layer("linear", "gaussian", sigma_w2, sigma_b2)
    x0 = jacobian.pair_on_sphere(k_x, width, c0, (q_star - sigma_b2) / sigma_w2)

    def body(x, k):
        h = affine(k, x)
        c = jnp.dot(h[0], h[1]) / jnp.sqrt(jnp.dot(h[0], h[0]) * jnp.dot(h[1], h[1]))
        return jnp.tanh(h), c

    return lax.scan(body, x0, jacobian.random_params(k_w, depth))[1]


def sampled_correlations(sigma_w2, sigma_b2, q_star, c0, width, depth, seeds, seed=0):
    """``c^l`` of ``seeds`` sampled networks per ``sigma_w2 (K,)`` (with its ``q*``): ``(S, K, depth)``."""
    sw, q = (jnp.asarray(v, jnp.float64) for v in (sigma_w2, q_star))
    c0 = jnp.broadcast_to(jnp.asarray(c0, jnp.float64), sw.shape)
    keys = jax.random.split(jax.random.key(seed), seeds)

    def one(key, s, qi, ci):
        return network_correlations(key, s, sigma_b2, qi, ci, width, depth)

    f = jax.jit(jax.vmap(jax.vmap(one, (None, 0, 0, 0)), (0, None, None, None)))
    return np.asarray(f(keys, sw, q, c0))


def _ordered(sigma_w2, sigma_b2, q_star=None):
    """``(q*, chi1, mu2/mu1^2)`` per ``sigma_w2``."""
    sw = np.asarray(sigma_w2, np.float64)
    q = meanfield.q_star("tanh", sw, sigma_b2) if q_star is None else q_star
    mu1, mu2 = (np.asarray(gaussian.dphi_moment("tanh", jnp.asarray(q), k)) for k in (1, 2))
    return np.asarray(q), sw * mu1, mu2 / mu1**2


def measure_xi_c(sigma_w2, sigma_b2, width, depth, seeds, seed=0) -> np.ndarray:
    """Per-seed measured ``xi_c`` in the ordered phase: ``(S, K)`` for ``sigma_w2 (K,)``.

    Raises ``ValueError`` unless every ``sigma_w2`` is ordered (``chi1 < 1``, ``c* = 1``).
    """
    q, chi1, _ = _ordered(sigma_w2, sigma_b2)
    if np.any(chi1 >= 1.0):
        raise ValueError("measure_xi_c: sigma_w2 must lie in the ordered phase (chi1 < 1)")
    c = sampled_correlations(sigma_w2, sigma_b2, q, 0.5, width, depth, seeds, seed)
    return signal.fit_decay_length(c, np.ones(np.shape(sigma_w2)), ORDERED_FLOOR)


def xi_c_finite_width(sigma_w2, sigma_b2, width, q_star=None) -> np.ndarray:
    """``xi_c(N)``: ``1/xi_c(N) = -log chi1 + (2 + 3 (mu2/mu1^2 - 1)) / (2N)`` (ordered; NaN else)."""
    _, chi1, ratio = _ordered(sigma_w2, sigma_b2, q_star)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = -np.log(chi1) + (2.0 + 3.0 * (ratio - 1.0)) / (2.0 * width)
        return np.where(chi1 < 1.0, 1.0 / inv, np.nan)


def compute(sigma_w2, sigma_b2, net) -> dict:
    with jax.enable_x64(True):
        return _compute(sigma_w2, sigma_b2, net)


def _compute(sigma_w2, sigma_b2, net) -> dict:
    sw = np.linspace(*sigma_w2[:2], int(sigma_w2[2]))
    d = meanfield.phase_diagram("tanh", sw, np.array([sigma_b2]))
    points, width, depth, seeds = (int(v) for v in net)
    crit = float(np.asarray(d.critical_sigma_w2).ravel()[0])
    sw_net = np.linspace(sw[0], 0.95 * crit, points)
    demo = np.asarray(DEMO if points else ())
    # One compiled run: the ordered points (from c0 = 0.5) and the two demo curves.
    both = np.concatenate([sw_net, demo])
    q = np.asarray(meanfield.q_star("tanh", both, sigma_b2))
    c0 = np.concatenate([np.full(points, 0.5), [0.5, 0.95][: demo.size]])
    c = sampled_correlations(both, sigma_b2, q, c0, width, depth, seeds) if points else None
    empty = np.zeros((seeds, 0, depth))
    return {
        "sigma_w2": sw,
        "xi_q": np.asarray(d.xi_q[:, 0]),
        "xi_c": np.asarray(d.xi_c[:, 0]),
        "xi_c_width": xi_c_finite_width(sw, sigma_b2, width, np.asarray(d.q_star[:, 0])),
        "critical_sigma_w2": np.asarray(d.critical_sigma_w2),
        "sigma_w2_net": sw_net,
        "xi_c_net": signal.fit_decay_length(c[:, :points], 1.0, ORDERED_FLOOR)
        if points
        else empty[..., 0],
        "demo_sigma_w2": demo,
        "demo_c": c[:, points:] if points else empty,
        "demo_c_star": np.asarray(meanfield.c_star("tanh", demo, sigma_b2)) if points else demo,
        "demo_xi_c": (
            np.asarray(meanfield.depth_scales("tanh", demo, sigma_b2)[1]) if points else demo
        ),
        "net": np.asarray(net),
    }


def plot(data, params):
    import matplotlib.pyplot as plt

    plotting.style()
    fig, (ax, ax1) = plt.subplots(
        1, 2, figsize=(11.0, 4.3), constrained_layout=True, width_ratios=(1.25, 1)
    )
    _, width, depth, seeds = (int(v) for v in data["net"])
    sw = np.asarray(data["sigma_w2"])
    ax.semilogy(sw, data["xi_c"], color="C3", lw=1.6, label=r"$\xi_c$ (theory)")
    ax.semilogy(
        sw, data["xi_c_width"], "--", color="C3", lw=1.1,
        label=rf"$\xi_c$ at width $N={width}$ (finite-width correction)",
    )  # fmt: skip
    ax.semilogy(sw, data["xi_q"], color="C0", lw=1.6, label=r"$\xi_q$ (theory)")
    xi = np.asarray(data["xi_c_net"], np.float64)
    n = np.sum(np.isfinite(xi), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(np.where(np.isfinite(xi), xi, 0.0), axis=0) / n
        dev = np.where(np.isfinite(xi), xi - mean, 0.0)
        sem = np.sqrt(np.sum(dev**2, axis=0) / np.maximum(n - 1, 1) / n)
    ax.errorbar(
        data["sigma_w2_net"], mean, yerr=sem, fmt="o", color="C3", ms=4, mfc="none", capsize=2,
        label=rf"$\xi_c$ measured: sampled networks ($N={width}$, $L={depth}$, {seeds} seeds)",
    )  # fmt: skip
    crit = float(np.asarray(data["critical_sigma_w2"]).ravel()[0])
    for a in (ax, ax1):
        a.set_xlabel(r"weight variance $\sigma_w^2$")
    ax.axvline(
        crit, color=plotting.THEORY_COLOR, ls="--", lw=1,
        label=rf"edge of chaos $\sigma_w^2={crit:.3f}$",
    )  # fmt: skip
    ax.set_ylabel("depth scale (layers)")
    ax.set_title(rf"Depth scales, tanh, $\sigma_b^2={params['sigma_b2']}$")
    ax.set_ylim(0.3, None)
    ax.legend(fontsize=7.5)
    # Right: the measured distances themselves, one ordered and one chaotic sigma_w2.
    layers = np.arange(1, np.asarray(data["demo_c"]).shape[-1] + 1)
    for k, (s, cs, xk) in enumerate(
        zip(data["demo_sigma_w2"], data["demo_c_star"], data["demo_xi_c"], strict=True)
    ):
        dist = np.abs(np.asarray(data["demo_c"])[:, k] - cs)
        color = f"C{k + 4}"
        for i, dl in enumerate(dist):
            ax1.semilogy(
                layers,
                dl,
                color=color,
                lw=0.8,
                alpha=0.6,
                label=rf"$\sigma_w^2={s:g}$ ($c^*={cs:.2f}$), seeds" if i == 0 else None,
            )
        start = 10 if cs > 1 - 1e-9 else 20
        ref = np.median(dist[:, start - 1]) * np.exp(-(layers - start) / xk)
        ax1.semilogy(
            layers[start - 1 :],
            ref[start - 1 :],
            "--",
            color="k",
            lw=1.0,
            label=r"theory slope $e^{-l/\xi_c}$" if k == 0 else None,
        )
    ax1.set_xlabel("layer $l$")
    ax1.set_ylabel(r"$|c^l - c^*|$ (pre-activation cosine)")
    ax1.set_ylim(1e-12, 2)
    ax1.set_title("ordered: clean decay; chaotic: finite-width floor")
    if np.asarray(data["demo_sigma_w2"]).size:
        ax1.legend(fontsize=7.5)
    return fig
