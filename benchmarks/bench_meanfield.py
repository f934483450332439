"""Benchmark: the tanh phase diagram (q*, c*, chi1, xi_q, xi_c) vs a scipy quadrature loop.

    python benchmarks/bench_meanfield.py [--n 201] [--points 6] [--x64]

Reports, in one run: the time of the whole n x n diagram after compilation,
the per-point cost of a straightforward ``scipy.integrate.quad``/``dblquad``
loop computing the same quantities on a subsample of points (and the ratio),
the largest difference between the two on that subsample, and the diagram's
throughput against this machine's measured float32 matmul FLOP/s (how many
2048^3 matmuls the diagram costs).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy import integrate, optimize

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def _gauss(f):
    return integrate.quad(
        lambda z: f(z) * math.exp(-z * z / 2) / math.sqrt(2 * math.pi),
        -10,
        10,
        epsabs=1e-11,
        limit=200,
    )[0]


def scipy_point(sw: float, sb: float) -> dict:
    """What a user writes with scipy: quad for 1-D, dblquad for 2-D, brentq for fixed points."""
    phi, dphi = np.tanh, lambda x: 1 - np.tanh(x) ** 2
    qmap = lambda q: sw * _gauss(lambda z: phi(math.sqrt(q) * z) ** 2) + sb  # noqa: E731
    q = 1.0
    for _ in range(500):  # iterate the length map to its stable fixed point
        q_new = qmap(q)
        if abs(q_new - q) < 1e-12 * max(q, 1e-30) + 1e-30:
            break
        q = q_new
    chi1 = sw * _gauss(lambda z: dphi(math.sqrt(q) * z) ** 2)
    h = 1e-5 * max(q, 1e-8)
    slope = (qmap(q + h) - qmap(max(q - h, 0.0))) / (q + h - max(q - h, 0.0))
    s = math.sqrt(q)

    def kernel(c, f):
        sc = math.sqrt(max(1 - c * c, 0.0))
        g = lambda z2, z1: (  # noqa: E731
            f(s * z1)
            * f(s * (c * z1 + sc * z2))
            * math.exp(-(z1 * z1 + z2 * z2) / 2)
            / (2 * math.pi)
        )
        return integrate.dblquad(g, -10, 10, -10, 10, epsabs=1e-10)[0]

    if chi1 > 1:
        k = lambda c: (sw * kernel(c, phi) + sb) / q - c  # noqa: E731
        c_star = optimize.brentq(k, 0.0, 1 - 1e-9, xtol=1e-12) if k(0.0) > 0 else 0.0
        chi_c = sw * kernel(c_star, dphi)
    else:
        c_star, chi_c = 1.0, chi1
    xi = lambda r: -1 / math.log(r) if r < 1 else math.inf  # noqa: E731
    return {"q_star": q, "c_star": c_star, "chi1": chi1, "xi_q": xi(slope), "xi_c": xi(chi_c)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=201)
    p.add_argument("--points", type=int, default=6, help="scipy subsample size")
    p.add_argument("--x64", action="store_true")
    common.add_device_flag(p)
    args = p.parse_args()
    common.use_device(args.device)
    import jax

    if args.x64:
        jax.config.update("jax_enable_x64", True)
    from isometry import meanfield

    sw = np.linspace(0.5, 5.0, args.n)
    sb = np.linspace(0.0, 2.0, args.n)
    flops = common.matmul_flops()
    t_diagram = common.best_time(lambda: meanfield.phase_diagram("tanh", sw, sb), repeat=2)
    d = meanfield.phase_diagram("tanh", sw, sb)
    rng = np.random.default_rng(0)
    idx = [
        (int(i), int(j))
        for i, j in zip(
            rng.integers(0, args.n, args.points), rng.integers(1, args.n, args.points), strict=True
        )
    ]
    t0 = time.perf_counter()
    ref = [scipy_point(sw[i], sb[j]) for i, j in idx]
    t_scipy = (time.perf_counter() - t0) / len(idx)
    diff = {
        k: max(
            abs(float(getattr(d, k)[i, j]) - r[k]) / max(1.0, abs(r[k]))
            for (i, j), r in zip(idx, ref, strict=True)
            if math.isfinite(r[k])
        )
        for k in ref[0]
    }
    per_point = t_diagram / args.n**2
    dtype = "float64" if args.x64 else "float32"
    print(f"machine: {common.machine()}")
    print(f"matmul float32: {flops / 1e9:.1f} GFLOP/s")
    print(
        f"phase diagram {args.n}x{args.n} ({dtype}): {t_diagram:.2f} s after compilation, "
        f"{per_point * 1e6:.1f} us/point; converged {float(np.mean(d.converged)) * 100:.2f}%"
    )
    print(f"  = {t_diagram * flops / (2 * 2048**3):.0f} float32 2048^3-matmul equivalents")
    print(
        f"scipy quad/dblquad loop: {t_scipy:.3f} s/point ({len(idx)} points); "
        f"per-point ratio {t_scipy / per_point:,.0f}x"
    )
    print(
        "max |isometry - scipy| / max(1, |scipy|) on the subsample: "
        + ", ".join(f"{k} {v:.1e}" for k, v in diff.items())
    )


if __name__ == "__main__":
    main()
