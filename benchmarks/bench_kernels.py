"""Benchmark: NNGP and NTK kernels (n = 256 inputs, depth 32, float64) vs numpy/scipy recursions.

    python benchmarks/bench_kernels.py [--n 256] [--depth 32] [--scipy-n 3] [--scipy-depth 4]

Reports, in one run:

* ReLU: :func:`isometry.kernels.layers` (closed-form arc-cosine kernels) against
  the neural-tangents-style numpy recursion (elementwise arc-cosine formulas on
  the whole ``(n, n)`` matrix per layer), both at full size; time ratio and
  largest relative difference.
* tanh (no closed form): the Hermite-series route (``method="series"``) at full
  size; the 2-D quadrature route on ``--quad-n`` inputs; a ``scipy.integrate``
  loop (``quad`` on the diagonal, ``dblquad`` per entry) on ``--scipy-n`` inputs
  and ``--scipy-depth`` layers. Costs are compared per off-diagonal pair and layer
  (every route is linear in both), and the largest difference between the
  routes on the scipy subsample is printed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np
from scipy import integrate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

SW, SB = 1.7, 0.1


def numpy_relu(x, depth, sw, sb):
    """NNGP and NTK of a ReLU network: elementwise arc-cosine kernels (Cho & Saul 2009)."""
    k = sw * x @ x.T / x.shape[1] + sb
    theta = k
    for _ in range(depth - 1):
        norms = np.sqrt(np.outer(np.diag(k), np.diag(k)))
        cos = np.clip(k / norms, -1.0, 1.0)
        angle = np.arccos(cos)
        k_dot = (np.pi - angle) / (2 * np.pi)
        k = sw * norms * (np.sin(angle) + (np.pi - angle) * cos) / (2 * np.pi) + sb
        theta = k + sw * k_dot * theta
    return k, theta


def _gauss2(f, qi, qj, kij):
    """``E[f(u) f(u')]``, ``(u, u') ~ N(0, [[qi, kij], [kij, qj]])`` by ``dblquad``."""
    si, sj = math.sqrt(qi), math.sqrt(qj)
    c = max(-1.0, min(1.0, kij / (si * sj)))
    sc = math.sqrt(max(1.0 - c * c, 0.0))

    def g(z2, z1):
        return f(si * z1) * f(sj * (c * z1 + sc * z2)) * math.exp(-(z1 * z1 + z2 * z2) / 2)

    return integrate.dblquad(g, -10, 10, -10, 10, epsabs=1e-11)[0] / (2 * math.pi)


def _gauss1(f, q):
    s = math.sqrt(q)
    w = lambda z: f(s * z) ** 2 * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    return integrate.quad(w, -10, 10, epsabs=1e-12, limit=200)[0]


def scipy_tanh(x, depth, sw, sb):
    """NNGP and NTK of a tanh network by a scipy quadrature loop over entries and layers."""
    phi = math.tanh
    dphi = lambda u: 1.0 - math.tanh(u) ** 2  # noqa: E731
    n = x.shape[0]
    k = sw * x @ x.T / x.shape[1] + sb
    theta = k.copy()
    for _ in range(depth - 1):
        e, e_dot = np.empty_like(k), np.empty_like(k)
        for i in range(n):
            e[i, i], e_dot[i, i] = _gauss1(phi, k[i, i]), _gauss1(dphi, k[i, i])
            for j in range(i + 1, n):
                args = (k[i, i], k[j, j], k[i, j])
                e[i, j] = e[j, i] = _gauss2(phi, *args)
                e_dot[i, j] = e_dot[j, i] = _gauss2(dphi, *args)
        k = sw * e + sb
        theta = k + sw * e_dot * theta
    return k, theta


def _isometry(name, x, depth, **options):
    from isometry import kernels

    f = jax.jit(lambda x: kernels.layers(name, x, depth, SW, SB, **options))
    r = f(x)
    return common.best_time(f, x, repeat=2), np.asarray(r.nngp[-1]), np.asarray(r.ntk[-1])


def _rel(a, b) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--quad-n", type=int, default=8)
    p.add_argument("--scipy-n", type=int, default=3)
    p.add_argument("--scipy-depth", type=int, default=4)
    common.add_device_flag(p)
    a = p.parse_args(argv)
    common.use_device(a.device)
    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.n, 16)) * rng.uniform(0.5, 1.5, (a.n, 1))
    print(f"machine: {common.machine()}")
    print(f"n = {a.n} inputs, depth {a.depth}, float64, sigma_w2 = {SW}, sigma_b2 = {SB}")

    t_iso, k_iso, th_iso = _isometry("relu", x, a.depth)
    t0 = time.perf_counter()
    k_np, th_np = numpy_relu(x, a.depth, SW, SB)
    t_np = time.perf_counter() - t0
    print(f"relu  isometry (closed form)      {t_iso:8.4f} s")
    print(
        f"relu  numpy arc-cosine recursion  {t_np:8.4f} s   ratio numpy/isometry {t_np / t_iso:.2f}"
    )
    rel = f"NNGP {_rel(k_iso, k_np):.1e}, NTK {_rel(th_iso, th_np):.1e}"
    print(f"relu  max relative difference: {rel}")

    # seconds per off-diagonal pair and layer (the diagonal's 1-D integrals are negligible)
    per = lambda t, n, depth: t / (n * (n - 1) / 2 * (depth - 1))  # noqa: E731
    t_ser, *_ = _isometry("tanh", x, a.depth, method="series")
    xq = x[: a.quad_n]
    t_quad, *_ = _isometry("tanh", xq, a.depth)
    xs = x[: a.scipy_n]
    t0 = time.perf_counter()
    k_sp, th_sp = scipy_tanh(xs, a.scipy_depth, SW, SB)
    t_sp = time.perf_counter() - t0
    _, k_s, th_s = _isometry("tanh", xs, a.scipy_depth, method="series")
    _, k_q, th_q = _isometry("tanh", xs, a.scipy_depth)
    c_ser, c_quad = per(t_ser, a.n, a.depth), per(t_quad, a.quad_n, a.depth)
    c_sp = per(t_sp, a.scipy_n, a.scipy_depth)
    full = a.n * (a.n - 1) / 2 * (a.depth - 1)
    print(f"tanh  isometry series, n = {a.n}: {t_ser:.3f} s, {c_ser * 1e6:.2f} us/pair-layer")
    print(
        f"tanh  isometry quadrature, n = {a.quad_n}: {t_quad:.3f} s, {c_quad * 1e6:.0f} "
        f"us/pair-layer (n = {a.n}: ~{c_quad * full:.0f} s)"
    )
    print(
        f"tanh  scipy quad/dblquad loop, n = {a.scipy_n}, depth {a.scipy_depth}: {t_sp:.1f} s, "
        f"{c_sp * 1e6:.0f} us/pair-layer (n = {a.n}: ~{c_sp * full / 3600:.1f} h)"
    )
    print(f"tanh  per pair-layer ratio scipy/series {c_sp / c_ser:.0f}")
    print(f"tanh  per pair-layer ratio scipy/quadrature {c_sp / c_quad:.1f}")
    print(
        f"tanh  max relative difference to scipy: series NNGP {_rel(k_s, k_sp):.1e} "
        f"NTK {_rel(th_s, th_sp):.1e}; quadrature NNGP {_rel(k_q, k_sp):.1e} "
        f"NTK {_rel(th_q, th_sp):.1e}"
    )


if __name__ == "__main__":
    main()
