"""Benchmark: free-probability spectral density vs a Monte Carlo estimate of it.

Times (a) the theory density on a 1,000-point grid at depth 1,000 (after
compilation) and (b) the theory density vs sampled networks (width N, float64
Jacobian products, squared singular values) for the same law at depth L,
reporting the Kolmogorov-Smirnov distance of the Monte Carlo estimate.

Run: python benchmarks/bench_freeprob.py [--width 1000] [--depth 8]
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

from isometry import activations, freeprob, meanfield  # noqa: E402


def _time(f, repeat=3):
    f()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def monte_carlo(name, q, weights, depth, width, seed):
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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=int, default=1000)
    p.add_argument("--depth", type=int, default=8)
    args = p.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, jax {jax.__version__}")
    for name, weights in (("linear", "gaussian"), ("tanh", "orthogonal"), ("relu", "gaussian")):
        edge = freeprob.max_eigenvalue(name, 0.25, 1000, weights)
        grid = np.linspace(1e-3 * edge, 1.02 * edge, 1000)

        def run(name=name, weights=weights, grid=grid):
            r = freeprob.spectral_density(name, 0.25, 1000, weights, grid, on_failure="nan")
            return np.asarray(r.density)

        t = _time(run)
        ok = float(np.mean(np.isfinite(run())))
        print(
            f"theory  {name:7s} {weights:10s} L=1000, 1000 points: {t:.3f} s (converged {ok:.3f})"
        )
    name, weights, q, depth = "tanh", "orthogonal", 0.25, args.depth
    t0 = time.perf_counter()
    ev = monte_carlo(name, q, weights, depth, args.width, 0)
    t_mc = time.perf_counter() - t0
    edge = freeprob.max_eigenvalue(name, q, depth, weights)
    grid = np.linspace(0, 1.02 * edge, 4001)[1:]
    t_th = _time(lambda: freeprob.spectral_density(name, q, depth, weights, grid, on_failure="nan"))
    dens = np.nan_to_num(
        np.asarray(
            freeprob.spectral_density(name, q, depth, weights, grid, on_failure="nan").density
        )
    )
    cdf = np.cumsum(dens) * (grid[1] - grid[0])
    ev = np.sort(ev)
    theory = np.interp(ev, grid, cdf)
    ks = np.max(np.abs(theory - np.arange(1, ev.size + 1) / ev.size))
    print(
        f"{name} {weights} q*={q} L={depth}: Monte Carlo (one network, N={args.width}) "
        f"{t_mc:.2f} s, KS to theory {ks:.4f} (~ the Monte Carlo's own accuracy); "
        f"theory on 4,000 points {t_th:.3f} s; ratio {t_mc / t_th:.0f}x"
    )


if __name__ == "__main__":
    main()
