"""Jacobian spectra of random deep networks: empirical and free-probability theory.

Sweep: activation x weights (Gaussian / orthogonal) x ``q*`` x seed, every
depth of ``depths`` in one pass. Each network sits at the critical point of
its ``q*`` (``sigma_w2 = 1 / E[phi'(h)^2]``, ``sigma_b2`` so that ``q*`` is
the length fixed point; ReLU: ``(2, 0)``), its input on the sphere
``||x^0||^2 = N (q* - sigma_b2) / sigma_w2``, so that ``h^1`` (like every
later pre-activation) has variance ``q*``, as the theory assumes, and

    h^l = x^{l-1} W^l + b^l,  x^l = phi(h^l),  J_d = dx^d/dx^0 = prod_{l<=d} D^l W^l,

with ``W^l`` Gaussian (``Var = sigma_w2 / N``) or ``sqrt(sigma_w2)`` times Haar
orthogonal, generated inside the scan from ``fold_in(key, l)``. The squared
singular values of ``J_d`` (eigenvalues of ``J_d J_d^T``) are summarized per
depth (mean, variance, max, min) beside the wide-network theory
(:func:`isometry.freeprob.jacobian_moments`: ``m1 = (sigma_w2 mu1)^L = 1``,
variance ``L (mu2/mu1^2 - 1 - s1)``; :func:`isometry.freeprob.max_eigenvalue`).
The squared singular values themselves are kept per point (``.npz``).

Vectorized: ``q*``, seeds and the activation (an index into the catalog,
:func:`any_activation`) vary inside one compiled function per weights; the
points are sharded over all devices.

Table columns: ``activation, weights, q_star, seed, depth, mean, var, max,
min, sigma_w2, sigma_b2, theory_mean, theory_var, theory_max``.

Reference: Pennington, Schoenholz & Ganguli 2017, "Resurrecting the sigmoid
in deep learning through dynamical isometry" (Figure 2); 2018, "The
emergence of spectral universality in deep networks".
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import numpy as np

from isometry import activations, freeprob, initializers, jacobian, spectra, sweep, validate
from isometry.experiments import Experiment, harness

__all__ = [
    "EXPERIMENT",
    "PRESETS",
    "Config",
    "any_activation",
    "run",
    "run_cases",
    "sweep_function",
]

WEIGHTS = ("gaussian", "orthogonal")
ACTIVATIONS = tuple(activations.names())


@dataclasses.dataclass(frozen=True)
class Config:
    """Jacobian-spectra sweep.

    Attributes:
        activations: activation names.
        weights: ``"gaussian"`` and/or ``"orthogonal"``.
        q_stars: fixed points ``q*`` (> 0); the critical point of each is used.
        depths: depths at which the spectrum is taken (one pass to the deepest).
        width: ``N``.
        seeds: independent networks per (activation, weights, q*).
        seed: base seed (point ``i`` uses ``fold_in(key(seed), i)``).
    """

    activations: tuple[str, ...] = ("tanh", "relu")
    weights: tuple[str, ...] = WEIGHTS
    q_stars: tuple[float, ...] = (0.25, 1.0)
    depths: tuple[int, ...] = (2, 8, 32)
    width: int = 64
    seeds: int = 2
    seed: int = 0

    def __post_init__(self):
        validate.names("activations", self.activations, ACTIVATIONS)
        validate.names("weights", self.weights, WEIGHTS)
        validate.reals("q_stars", self.q_stars, minimum=0.0, strict=True)
        validate.positive_ints("depths", self.depths)
        validate.positive_int("width", self.width, 2)
        validate.positive_int("seeds", self.seeds)
        validate.positive_int("seed", self.seed, 0)


PRESETS = {
    "quick": Config(),
    "full": Config(
        activations=("tanh", "hard_tanh", "relu", "erf"),
        q_stars=(1 / 64, 0.25, 1.0, 4.0),
        depths=(2, 8, 32, 128),
        width=400,
        seeds=8,
    ),
}


def grid(cfg: Config) -> sweep.Grid:
    """``activation x weights x q_star x seed``."""
    return sweep.product(
        activation=cfg.activations,
        weights=cfg.weights,
        q_star=cfg.q_stars,
        seed=range(cfg.seeds),
    )


@functools.cache
def critical(activation: str, q_star: float) -> tuple[float, float]:
    """``(sigma_w2, sigma_b2)`` of the critical point with fixed point ``q*`` (floats)."""
    v = initializers.resolve(activation, "gaussian", q_star=q_star)
    return v.sigma_w2, v.sigma_b2


@functools.cache
def theory(activation: str, q_star: float, depth: int, weights: str) -> dict[str, float]:
    """Wide-network mean, variance and right edge of the eigenvalues of ``J J^T``."""
    m = freeprob.jacobian_moments(activation, q_star, depth, weights)
    edge = freeprob.max_eigenvalue(activation, q_star, depth, weights)
    return {
        "theory_mean": float(m.mean),
        "theory_var": float(m.variance),
        "theory_max": float(edge),
    }


_CATALOG = [activations.get(a) for a in ACTIVATIONS]


@jax.custom_jvp
def _phi_any(index, x):
    return jax.lax.switch(index, [a.phi for a in _CATALOG], x)


def _dphi_any(index, x):
    return jax.lax.switch(index, [a.dphi for a in _CATALOG], x)


@_phi_any.defjvp
def _phi_any_jvp(primals, tangents):
    # phi'(x) t: a tangent (a Jacobian's columns) meets one elementwise factor, not the
    # tangents of every branch.
    index, x = primals
    return _phi_any(index, x), _dphi_any(index, x) * tangents[1]


def any_activation(index) -> activations.Activation:
    """``ACTIVATIONS[index]`` for a traced integer ``index`` (``lax.switch`` over the catalog).

    Under ``vmap`` every branch is evaluated on the pre-activations (elementwise, small
    next to a layer's matmul) while tangents see only ``phi'(x)`` (a custom JVP), so one
    compiled program serves every activation of a sweep at the cost of one.
    """
    return activations.custom("any", lambda x: _phi_any(index, x), lambda x: _dphi_any(index, x))


def sweep_function(cfg: Config, weights: str):
    """``f(q_star, sigma_w2, sigma_b2, index, activation) -> (K, N)`` squared singular values,
    decreasing; ``activation`` is the position in ``ACTIVATIONS`` (traced).

    The layers are :func:`isometry.jacobian.dense_layer` with the traced
    variances and activation (:func:`any_activation`), the input on the ``q*``
    sphere (:func:`isometry.jacobian.sphere_inputs`).
    """
    N, depths = cfg.width, sorted(set(cfg.depths))

    def f(q_star, sigma_w2, sigma_b2, index, activation):
        k_w, k_x = jax.random.split(sweep.point_key(cfg.seed, index))
        layer = jacobian.dense_layer(any_activation(activation), weights, sigma_w2, sigma_b2)
        keys = jacobian.random_params(k_w, max(depths))
        # ||x0||^2 = N (q* - sigma_b2) / sigma_w2: Var h^1 = sigma_w2 ||x0||^2 / N + sigma_b2 = q*.
        x0 = jacobian.sphere_inputs(k_x, (N,), q_star, sigma_w2, sigma_b2)
        return jacobian.stack_jacobians(
            layer,
            keys,
            x0,
            depths,
            reduce=lambda J: spectra.squared_singular_values(J, check_finite=False),
        )

    return f


def point_function(cfg: Config, activation: str, weights: str):
    """``f(q_star, sigma_w2, sigma_b2, index) -> (K, N)``: :func:`sweep_function` at one
    activation."""
    g, a = sweep_function(cfg, weights), ACTIVATIONS.index(activation)
    return lambda q_star, sigma_w2, sigma_b2, index: g(q_star, sigma_w2, sigma_b2, index, a)


def run(
    cfg: Config, out, *, per_device: int = 4, optimize: bool = True, progress: bool = True
) -> Path:
    """Run the sweep into the store ``out``; returns the aggregate csv path."""
    g = grid(cfg)
    store = sweep.Store(out, "spectra", cfg)
    depths = sorted(set(cfg.depths))
    index = {sweep.point_id(p): i for i, p in enumerate(g.points())}

    def inputs(p):
        sw, sb = critical(p["activation"], p["q_star"])
        return {
            "q_star": p["q_star"],
            "sigma_w2": sw,
            "sigma_b2": sb,
            "index": index[sweep.point_id(p)],
            "activation": ACTIVATIONS.index(p["activation"]),
        }

    def rows(p, lam):
        sw, sb = critical(p["activation"], p["q_star"])
        out = spectra.summary_rows(depths, lam)
        for r in out:
            r.update(sigma_w2=sw, sigma_b2=sb)
            r.update(theory(p["activation"], p["q_star"], r["depth"], p["weights"]))
        return out

    return sweep.run_vectorized(
        store,
        g,
        lambda s: sweep_function(cfg, s["weights"]),
        rows,
        static=("weights",),
        inputs=inputs,
        arrays=lambda p, lam: {"depths": np.asarray(depths), "sq_singular_values": lam},
        per_device=per_device,
        optimize=optimize,
        progress=progress,
        label="spectra",
    )


def run_cases(
    cases, depths, width: int, seeds: int, root, *, preset: str = "quick", progress: bool = False
) -> dict[tuple[str, str], harness.StoredRun]:
    """Run the sweep for ``cases`` ``(activation, weights, q*)``: one store per activation/weights.

    Each group's ``q*`` values share one sweep, in
    ``root/<activation>_<weights>_<fingerprint>`` (resumable; a changed
    configuration gets a new directory), computed in float32. Returns
    ``{(activation, weights): run}``, each read back on its grid
    (:func:`isometry.experiments.harness.stored_run`: the table's columns per
    point and depth with ``run.array(column, rows=True)``, the spectra with
    ``run.arrays(point)``). The groups' programs differ only in data (the
    activation is traced), so in :func:`harness.compile_cache` one compiles per
    weights and shapes.
    """
    groups: dict[tuple[str, str], list[float]] = {}
    for act, w, q in cases:
        groups.setdefault((act, w), []).append(float(q))
    runs = {}
    with harness.compile_cache():
        for (act, w), qs in groups.items():
            over = [
                f"activations={act}",
                f"weights={w}",
                "q_stars=" + ",".join(repr(q) for q in qs),
                "depths=" + ",".join(str(d) for d in depths),
                f"width={width}",
                f"seeds={seeds}",
            ]
            cfg = EXPERIMENT.preset_config(preset, over)
            out = Path(root) / f"{act}_{w}_{sweep.fingerprint('spectra', cfg)[:10]}"
            with jax.enable_x64(False):
                runs[(act, w)] = harness.stored_run(
                    EXPERIMENT, preset, over, out, progress=progress
                )
    return runs


EXPERIMENT = Experiment(
    "spectra",
    Config,
    PRESETS,
    run,
    "Jacobian spectra, empirical and free-probability theory",
    grid=grid,
)
