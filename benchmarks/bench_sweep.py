"""Sweep benchmark: weak scaling over simulated devices, the baseline loop, and the store's cost.

Workload: a vectorizable analysis sweep, the spectral moments of the
input-output Jacobian of random critical tanh networks (width ``N``, depth
``L``, one network per seed),

    m1 = tr(J J^T) / N,   m2 = tr((J J^T)^2) / N,   J = prod_l D^l W^l,

computed by pushing the ``N x N`` tangent through the scanned stack
(:func:`isometry.jacobian.stack_jacobians`): about ``2 N^3 (L + 1)`` flops a
point, all matmuls (no LAPACK call, see :func:`isometry.sweep.map_sharded`).

* Weak scaling: :func:`isometry.sweep.map_sharded` with ``per_device``
  points per device, in a fresh process with ``D = 1, 2, 4`` simulated CPU
  devices (``XLA_FLAGS=--xla_force_host_platform_device_count=D``); total
  work grows with ``D``. Efficiency ``= t(1) / t(D)`` (1 is perfect weak
  scaling). Simulated devices share this machine's cores, so beyond the core
  count the efficiency measures how the cores are shared, not a cluster.
* Baseline: what one would otherwise write, a Python loop calling a jitted
  per-point function (same computation) point by point; ratio = loop time /
  sweep time for the same points on one device.
* Roofline: achieved flop rate over this machine's measured matmul FLOP/s
  (same run).
* Store: wall time per point of ``Store.write`` (atomic json with ``fsync``),
  ``Store.pending`` and the aggregate csv, for small rows.

Usage: ``python benchmarks/bench_sweep.py [--width 128] [--depth 16] [--per-device 4] [--write]``
(``--write`` prints the markdown tables for BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

CHILD = """
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from isometry import sweep, jacobian
per_device, N, L = (int(a) for a in sys.argv[1:4])
D = jax.device_count()

def moments(seed):
    k_w, k_x = jax.random.split(jax.random.key(seed))
    def layer(k, x):
        return jnp.tanh(x @ (jax.random.normal(k, (N, N)) * jnp.sqrt(1.3 / N)))
    keys = jax.vmap(lambda l: jax.random.fold_in(k_w, l))(jnp.arange(L))
    x0 = jax.random.normal(k_x, (N,)) * 0.5
    def reduce(J):
        JJ = J @ J.T
        return jnp.stack([jnp.trace(JJ), jnp.sum(JJ * JJ)]) / N
    return jacobian.stack_jacobians(layer, keys, x0, [L], reduce=reduce)

n = D * per_device
seeds = np.arange(6 * n)  # 6 chunks: the first compiles, the best of the other 5 is kept
stamps = [time.perf_counter()]
sweep_out = []
for _, o in sweep.map_sharded(moments, {"seed": seeds}, per_device=per_device):
    sweep_out.append(o)
    stamps.append(time.perf_counter())
best = float(np.min(np.diff(stamps)[1:]))
res = {"devices": D, "points": int(n), "time_s": best}
if D == 1:
    one = jax.jit(moments)
    jax.block_until_ready(one(0))
    loop = []
    for _ in range(3):
        t0 = time.perf_counter()
        for s in range(n):
            jax.block_until_ready(one(s))
        loop.append(time.perf_counter() - t0)
    res["loop_time_s"] = min(loop)
    ref = np.stack([np.asarray(one(s)) for s in range(n)])
    res["max_rel_diff_vs_loop"] = float(np.max(np.abs(sweep_out[0] - ref) / np.abs(ref)))
    a = jax.random.normal(jax.random.key(0), (2048, 2048))
    mm = jax.jit(lambda a: a @ a)
    jax.block_until_ready(mm(a))
    t = []
    for _ in range(5):
        t0 = time.perf_counter(); jax.block_until_ready(mm(a)); t.append(time.perf_counter() - t0)
    res["matmul_flops"] = 2 * 2048**3 / min(t)
print(json.dumps(res))
"""


def weak_scaling(per_device: int, width: int, depth: int, device: str = "cpu") -> list[dict]:
    """1, 2, 4 forced host devices on CPU; the one GPU with ``device="gpu"``."""
    out = []
    for d in (1, 2, 4) if device == "cpu" else (1,):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={d}",
                   JAX_PLATFORMS="cpu")  # fmt: skip
        if device == "gpu":
            env = dict(os.environ, JAX_PLATFORMS="cuda")
        print(f"[bench_sweep] {d} device(s) ...", file=sys.stderr, flush=True)
        r = subprocess.run([sys.executable, "-c", CHILD, str(per_device), str(width), str(depth)],
                           env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"child with {d} devices failed:\n{r.stderr[-3000:]}")
        out.append(json.loads(r.stdout.strip().splitlines()[-1]))
    t1 = out[0]["time_s"]
    flops = 2 * width**3 * (depth + 1) * per_device
    for r in out:
        r["efficiency"] = t1 / r["time_s"]
        r["flop_rate"] = flops * r["devices"] / r["time_s"]
        r["roofline"] = r["flop_rate"] / out[0]["matmul_flops"]
    return out


def store_overhead(n: int = 200) -> dict:
    from isometry import sweep

    @dataclasses.dataclass(frozen=True)
    class C:
        points: int = 0

    grid = sweep.product(i=range(n))
    with tempfile.TemporaryDirectory() as tmp:
        store = sweep.Store(tmp, "bench", C(points=n))
        pts = grid.points()
        rows = [{"depth": d, "mean": 1.0, "var": 0.5, "max": 3.0} for d in range(4)]
        t0 = time.perf_counter()
        for p in pts:
            store.write(p, rows)
        t_write = (time.perf_counter() - t0) / n
        t0 = time.perf_counter()
        pending = store.pending(pts)
        t_done = (time.perf_counter() - t0) / n
        assert not pending
        t0 = time.perf_counter()
        store.write_csv(pts)
        t_csv = (time.perf_counter() - t0) / n
    return {"write_ms": 1e3 * t_write, "done_ms": 1e3 * t_done, "csv_ms": 1e3 * t_csv}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-device", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--write", action="store_true", help="print markdown")
    common.add_device_flag(ap)
    args = ap.parse_args()
    common.use_device(args.device)
    ws = weak_scaling(args.per_device, args.width, args.depth, args.device)
    st = store_overhead()
    if not args.write:
        print(json.dumps({"weak_scaling": ws, "store": st}, indent=2))
        return
    one = ws[0]
    print(f"Matmul (2048^2, float32): {one['matmul_flops'] / 1e9:.1f} GFLOP/s.\n")
    print("| devices | points | time per chunk | efficiency t(1)/t(D) | GFLOP/s | of matmul |")
    print("|---|---|---|---|---|---|")
    for r in ws:
        rate = r["flop_rate"] / 1e9
        print(f"| {r['devices']} | {r['points']} | {r['time_s'] * 1e3:.1f} ms "
              f"| {r['efficiency']:.2f} | {rate:.1f} | {r['roofline']:.2f} |")  # fmt: skip
    print(f"\nBaseline (Python loop over a jitted per-point function, {one['points']} points, "
          f"1 device): {one['loop_time_s'] * 1e3:.1f} ms; sweep {one['time_s'] * 1e3:.1f} ms: "
          f"{one['loop_time_s'] / one['time_s']:.2f}x; max relative difference "
          f"{one['max_rel_diff_vs_loop']:.1e}.\n")  # fmt: skip
    print("| store, per point | write (atomic json + fsync) | pending? | aggregate csv |")
    print("|---|---|---|---|")
    print(f"| ms | {st['write_ms']:.2f} | {st['done_ms']:.3f} | {st['csv_ms']:.2f} |")


if __name__ == "__main__":
    main()
