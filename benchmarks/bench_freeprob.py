"""Benchmark: free-probability spectral density vs a Monte Carlo estimate of it.

Times (a) the theory density on a 1,000-point grid at depth 1,000 (after
compilation, best of 3) for three laws, and (b) for tanh with orthogonal
weights at ``q* = 1/4`` and depth ``L``: the theory on 4,000-point grids (linear
in lambda; and reaching 1e-12 of the edge, for the CDF) against Monte Carlo,
one width-``N`` network sampled two ways (the numpy idiom a user would write:
float64 Jacobian products and an SVD; and the library sampler
:func:`isometry.jacobian.random_network_spectra`, same arithmetic), with the
Kolmogorov-Smirnov distance of each sample to the theory.

Run: OPENBLAS_NUM_THREADS=1 python benchmarks/bench_freeprob.py [--width 1000] [--depth 8]
(one BLAS thread per LAPACK call: on a shared machine, threaded QR and SVD are
many times slower).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from isometry import activations, freeprob, jacobian, meanfield, spectra  # noqa: E402


def _time(f, repeat=3):
    f()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def monte_carlo_numpy(name, q, weights, depth, width, seed):
    """The numpy idiom: Haar/Gaussian weights, float64 products, squared singular values."""
    act = activations.get(name)
    sw, sb = (float(v) for v in meanfield.critical_point(act, q))
    rng = np.random.default_rng(seed)
    x = np.asarray(act.phi(np.sqrt(q) * rng.standard_normal(width)))
    jac = np.eye(width)
    for _ in range(depth):
        if weights == "gaussian":
            w = rng.standard_normal((width, width)) * np.sqrt(sw / width)
        else:
            qm, rm = np.linalg.qr(rng.standard_normal((width, width)))
            w = qm * np.sign(np.diag(rm)) * np.sqrt(sw)
        h = w @ x + rng.standard_normal(width) * np.sqrt(sb)
        jac = np.asarray(act.dphi(h))[:, None] * (w @ jac)
        x = np.asarray(act.phi(h))
    return np.linalg.svd(jac, compute_uv=False) ** 2


def monte_carlo_library(name, q, weights, depth, width, seed):
    net = jacobian.RandomNetwork(
        activation=name, weights=weights, q_star=q, width=width, depth=depth
    )
    lam = jacobian.random_network_spectra(jax.random.key(seed), net, [depth], method="svd")
    return np.asarray(lam).ravel()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=int, default=1000)
    p.add_argument("--depth", type=int, default=8)
    common.add_device_flag(p)
    args = p.parse_args()
    common.use_device(args.device)
    print(f"machine: {platform.processor() or platform.machine()}, jax {jax.__version__}")
    for name, weights in (("linear", "gaussian"), ("relu", "gaussian"), ("tanh", "orthogonal")):
        edge = freeprob.max_eigenvalue(name, 0.25, 1000, weights)
        grid = np.linspace(1e-3 * edge, 1.02 * edge, 1000)

        def run(name=name, weights=weights, grid=grid):
            r = freeprob.spectral_density(name, 0.25, 1000, weights, grid, on_failure="nan")
            return np.asarray(r.density)

        t = _time(run)
        ok = float(np.mean(np.isfinite(run())))
        print(f"theory  {name:7s} {weights:10s} L=1000, 1000 points: {t:.3f} s (converged {ok})")

    name, weights, q, depth = "tanh", "orthogonal", 0.25, args.depth
    edge = freeprob.max_eigenvalue(name, q, depth, weights)

    def theory(grid):
        return freeprob.spectral_density(name, q, depth, weights, grid, on_failure="nan")

    # (i) 4,000 points linear in lambda; (ii) 4,000 points, half geometric from 1e-12 x edge:
    # the small-lambda region, where the solver falls back to the cell law of d, costs most.
    linear = edge * np.linspace(0, 1.02, 4001)[1:]
    deep = edge * np.unique(np.concatenate([np.geomspace(1e-12, 1, 2000), np.linspace(0, 1, 2001)]))
    deep = deep[deep > 0]
    t_th = _time(lambda: theory(linear))
    t_deep = _time(lambda: theory(deep))
    dens = np.nan_to_num(np.asarray(theory(deep).density))
    # CDF = 1 - int_lambda^edge rho (trapezoid from the edge down; no atoms for this law).
    seg = 0.5 * (dens[1:] + dens[:-1]) * np.diff(deep)
    cdf = 1.0 - np.concatenate([np.cumsum(seg[::-1])[::-1], [0.0]])
    grid = deep
    head = f"theory  {name} {weights} q*={q} L={depth}"
    print(f"{head}, 4,000 points linear in lambda: {t_th:.3f} s")
    print(f"{head}, 4,000 points down to 1e-12 x edge: {t_deep:.3f} s (mass {1 - cdf[0]:.5f})")

    def ks(ev):
        return float(spectra.ks_distance_cdf(ev, lambda x: np.interp(x, grid, cdf)))

    t0 = time.perf_counter()
    ev_np = monte_carlo_numpy(name, q, weights, depth, args.width, 0)
    t_np = time.perf_counter() - t0
    monte_carlo_library(name, q, weights, depth, args.width, 1)  # compile
    t0 = time.perf_counter()
    ev_lib = monte_carlo_library(name, q, weights, depth, args.width, 0)
    t_lib = time.perf_counter() - t0
    for label, t, ev in (("numpy idiom", t_np, ev_np), ("library sampler", t_lib, ev_lib)):
        print(
            f"Monte Carlo ({label}, one network, N={args.width}, L={depth}): {t:.2f} s, "
            f"KS to theory {ks(ev):.4f}; time / theory's (linear grid) {t / t_th:.2f}"
        )


if __name__ == "__main__":
    main()
