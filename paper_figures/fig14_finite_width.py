"""Finite width: the Jacobian gain log ||J u||^2 / ||u||^2 of critical Gaussian ReLU and linear networks and the second moment of J J^T's spectrum against L / N, measured (markers) against the exact finite-width law (lines) and infinite width (dashed) (Hanin & Nica 2019).

Measurement: width-``N`` random networks (Gaussian weights at ``chi1 = 1``, zero biases;
``measure``), the Jacobian at every depth in one pass (:mod:`isometry.jacobian`);
per network the squared gain along one input direction and the moments ``m_k = tr (J J^T)^k / N``;
markers are seed means with bars of two standard errors. Theory
(:mod:`isometry.finite_width`): the law of ``||J u||^2 / ||u||^2`` is a product of ``L``
independent ``(sigma_w2 / N) chi^2_K`` factors, ``K = N`` (linear) or ``Binomial(N, 1/2)``
(ReLU), whose log has the exact mean and variance drawn as lines (dotted: the scaling limit
``-a L/N`` and ``b L/N``, ``(a, b) = (1, 2)`` linear, ``(5/2, 5)`` ReLU); for the linear
network the exact finite-``N`` second moment of the spectrum. Infinite width (mean field and
free probability) puts the typical gain at ``E g = 1`` (log 0), its log-variance at 0 and
``m2`` at ``L + 1``.

What to see: the mean gain stays 1 at every depth, but the typical gain ``exp E log g`` falls
as ``exp(-5 L / 2N)`` for ReLU, a factor of about 12 below infinite width at ``L = N``
(``exp(-L/N)`` linear), and the log gain spreads with variance ``5 L / N`` (ReLU) and
``2 L / N`` (linear): at ``L / N`` near 1 one network's gain differs from another's by
factors of 10. The linear network's ``m2`` is ``2.3 N`` at ``L = N`` against free
probability's ``N + 1``. This is why figures 5 and 6 measure less than free probability in
deep narrow networks: their markers are typical values (geometric means over a few seeds),
which sit below the heavy-tailed mean that the wide-network theory gives. Measurement and
theory agree within the seed error everywhere; they part from infinite width once ``L / N``
exceeds about 0.1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from isometry import finite_width, freeprob, initializers, jacobian, plotting

KEYS = (
    "ratio",
    "activations",
    "log_mean",
    "log_mean_se",
    "log_var",
    "log_var_se",
    "m2",
    "m2_se",
    "theory_ratio",
    "theory_log_mean",
    "theory_log_var",
    "limit_log_mean",
    "limit_log_var",
    "theory_m2",
    "free_m2",
)

COST = {"quick": 3}
"""Single-core CPU seconds of the quick tier from empty stores (a scheduling hint for
``isometry figures --jobs``; estimated from loaded runs, see BENCHMARKS.md)."""

TIERS = {
    "tiny": {"width": 8, "depths": (1, 2, 4, 8), "seeds": 16},
    "quick": {"width": 32, "depths": (1, 2, 4, 8, 16, 24, 32), "seeds": 400},
    "full": {"width": 128, "depths": (2, 4, 8, 16, 32, 64, 96, 128), "seeds": 2000},
}

ACTIVATIONS = ("relu", "linear")
_SIGMA_W2 = {"relu": 2.0, "linear": 1.0}


def measure(width: int, depths, seeds: int, key) -> np.ndarray:
    """Per activation (``ACTIVATIONS``), network and depth: ``(log ||J e_1||^2, m1, m2)``,
    ``(2, seeds, K, 3)`` (float64 out).

    Critical Gaussian networks (``sigma_w2 = 1 / mu1``, no biases) of width ``N``, the
    layer ``x W`` followed by ``max(h, s h)`` with slope ``s = 0`` (ReLU) or 1 (linear),
    one compiled program for both (the slope and ``sigma_w2`` are data); the Jacobian
    ``J`` at each depth in one pass (:func:`isometry.jacobian.stack_jacobians`), reduced
    to the gain of the first input direction (any fixed direction has the same law) and
    ``m_k = tr (J J^T)^k / N``. Layer ``l`` of seed ``s`` uses ``fold_in(k_s, l)``, its input
    ``fold_in(k_s, L)``.
    """
    depths = tuple(int(d) for d in depths)
    dtype = jnp.result_type(float)  # host constants: no program to build them
    slopes = np.array([0.0 if a == "relu" else 1.0 for a in ACTIVATIONS], dtype)
    scale = np.array([1.0, width, width], dtype)

    def reduce(J):
        M = J @ J.T
        return jnp.stack([jnp.log(jnp.sum(J[:, 0] ** 2)), jnp.trace(M), jnp.sum(M * M)]) / scale

    def one(slope, k):
        def layer(key_l, x):
            W = initializers.sample("gaussian", key_l, (width, width), 2.0 / (1.0 + slope**2))
            h = x @ W
            return jnp.maximum(h, slope * h)

        params = jacobian.random_params(k, max(depths))
        x = jax.random.normal(jax.random.fold_in(k, max(depths)), (width,))
        return jacobian.stack_jacobians(layer, params, x, depths, reduce=reduce)

    def run(slopes, key):
        keys = jax.random.split(key, seeds)
        return jax.vmap(lambda s: jax.vmap(lambda k: one(s, k))(keys))(slopes)

    # The seeds' keys are split inside the program: one compilation in all.
    return np.asarray(jax.jit(run)(slopes, key), np.float64)


def _theory(act, width, depths):
    exact = np.array([[float(v) for v in finite_width.log_gain_moments(act, d, width)]
                      for d in depths])  # fmt: skip
    limit = np.array([[float(v) for v in finite_width.log_gain_limit(act, d, width)]
                      for d in depths])  # fmt: skip
    m2 = [float(finite_width.linear_spectrum_moments(d, width)[1]) if act == "linear" else np.nan
          for d in depths]  # fmt: skip
    free = [float(freeprob.jacobian_moments(act, 1.0, d, "gaussian", _SIGMA_W2[act]).second_moment)
            for d in depths]  # fmt: skip
    return exact, limit, np.asarray(m2), np.asarray(free)


def compute(width, depths, seeds) -> dict:
    depths = tuple(int(d) for d in depths)
    rows = {k: [] for k in KEYS}
    dt = np.unique(np.round(np.linspace(1, max(depths), 40)).astype(int))
    measured = measure(width, depths, seeds, jax.random.key(14))
    for i, act in enumerate(ACTIVATIONS):
        lg, m2 = measured[i, ..., 0], measured[i, ..., 2]
        var = lg.var(axis=0, ddof=1)
        rows["log_mean"].append(lg.mean(0))
        rows["log_mean_se"].append(np.sqrt(var / seeds))
        rows["log_var"].append(var)
        rows["log_var_se"].append(var * np.sqrt(2.0 / (seeds - 1)))
        rows["m2"].append(m2.mean(0))
        rows["m2_se"].append(m2.std(0, ddof=1) / np.sqrt(seeds))
        exact, limit, th_m2, free = _theory(act, width, dt)
        rows["theory_log_mean"].append(exact[:, 0])
        rows["theory_log_var"].append(exact[:, 1])
        rows["limit_log_mean"].append(limit[:, 0])
        rows["limit_log_var"].append(limit[:, 1])
        rows["theory_m2"].append(th_m2)
        rows["free_m2"].append(free)
    out = {k: np.stack(v) for k, v in rows.items() if v}
    return out | {
        "ratio": np.asarray(depths) / width,
        "theory_ratio": dt / width,
        "activations": np.asarray(ACTIVATIONS),
    }


def plot(data, params):
    import matplotlib.pyplot as plt

    plotting.style()
    fig, axes = plt.subplots(1, 3, figsize=(11.5, 3.5), constrained_layout=True)
    x, xt = data["ratio"], data["theory_ratio"]
    colors = {"relu": "C3", "linear": "0.3"}
    panels = (
        ("log_mean", r"$E \log \|J u\|^2 / \|u\|^2$", "typical gain"),
        ("log_var", r"$\mathrm{Var} \log \|J u\|^2 / \|u\|^2$", "spread of the gain"),
    )
    for ax, (key, ylabel, title) in zip(axes[:2], panels, strict=True):
        for i, act in enumerate(map(str, data["activations"])):
            c = colors[act]
            ax.errorbar(x, data[key][i], 2 * data[f"{key}_se"][i], fmt="o", ms=4, color=c,
                        mfc="none", capsize=2, label=f"{act}, measured")  # fmt: skip
            ax.plot(xt, data[f"theory_{key}"][i], "-", color=c, lw=1.2,
                    label=f"{act}, exact finite width")  # fmt: skip
            ax.plot(xt, data[f"limit_{key}"][i], ":", color=c, lw=1.2)
        ax.plot([], [], ":", color="0.5", label="scaling limit ($N \\to \\infty$, $L/N$ fixed)")
        ax.axhline(0.0, color="C0", ls="--", lw=1.1, label="infinite width")
        ax.set_xlabel("depth / width  $L / N$")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
    axes[0].legend(fontsize=7, frameon=False, loc="lower left")
    ax = axes[2]
    i = list(map(str, data["activations"])).index("linear")
    width = params["width"]
    ax.errorbar(x, data["m2"][i], 2 * data["m2_se"][i], fmt="o", ms=4, color="0.3", mfc="none",
                capsize=2, label="linear, measured")  # fmt: skip
    ax.plot(xt, data["theory_m2"][i], "-", color="0.3", lw=1.2, label="exact finite width")
    ax.plot(xt, data["free_m2"][i], "--", color="C0", lw=1.1, label="free probability $L + 1$")
    ax.set_xlabel("depth / width  $L / N$")
    ax.set_ylabel(r"$m_2 = E\, \mathrm{tr} (J J^T)^2 / N$")
    ax.set_title(f"spectrum of $J J^T$, linear, $N = {width}$")
    ax.legend(fontsize=7, frameon=False, loc="upper left")
    fig.suptitle(f"Finite width: Gaussian networks at criticality, $N = {width}$", fontsize=10)
    return fig
