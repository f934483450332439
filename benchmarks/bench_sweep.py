"""Sweep benchmark: weak scaling over simulated devices, and the store's overhead per point.

Weak scaling: a vectorizable sweep (Jacobian spectra of random tanh networks,
width 64, depth 16, one point per seed) with ``per_device`` points per
device, run in a fresh process with ``D = 1, 2, 4`` simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=D``), so the total work
grows with ``D``. Efficiency ``= t(1) / t(D)`` (1 is perfect weak scaling).
Simulated devices share this machine's cores: efficiency measures the
sharding overhead plus how well the cores are used, not a cluster.

Store overhead: wall time per point of ``Store.write`` (atomic json with
``fsync``), ``Store.done`` and the aggregate csv, for small rows.

Usage: ``python benchmarks/bench_sweep.py [--per-device 8] [--write]``
(``--write`` prints the markdown table for BENCHMARKS.md).
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

CHILD = """
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from isometry import sweep, jacobian
per_device, N, L = int(sys.argv[1]), 64, 16
D = jax.device_count()
def f(seed):
    k_w, k_x = jax.random.split(jax.random.key(seed))
    def layer(k, x):
        return jnp.tanh(x @ (jax.random.normal(k, (N, N)) * jnp.sqrt(1.5 / N)))
    keys = jax.vmap(lambda l: jax.random.fold_in(k_w, l))(jnp.arange(L))
    x0 = jax.random.normal(k_x, (N,))
    return jacobian.stack_jacobians(layer, keys, x0, [L],
        reduce=lambda J: jnp.linalg.svd(J, compute_uv=False) ** 2)
n = D * per_device
seeds = np.arange(5 * n)  # 5 chunks: the first compiles, the other 4 are timed
stamps = [time.perf_counter()]
for _, o in sweep.map_sharded(f, {"seed": seeds}, per_device=per_device):
    stamps.append(time.perf_counter())
best = float(np.min(np.diff(stamps)[1:]))
print(json.dumps({"devices": D, "points": int(n), "time_s": best}))
"""


def weak_scaling(per_device: int) -> list[dict]:
    out = []
    for d in (1, 2, 4):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={d}",
                   JAX_PLATFORMS="cpu")  # fmt: skip
        r = subprocess.run([sys.executable, "-c", CHILD, str(per_device)], env=env,
                           capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
        out.append(json.loads(r.stdout.strip().splitlines()[-1]))
    t1 = out[0]["time_s"]
    for r in out:
        r["efficiency"] = t1 / r["time_s"]
    return out


def store_overhead(n: int = 200) -> dict:
    from isometry import sweep

    @dataclasses.dataclass(frozen=True)
    class C:
        n: int = n

    grid = sweep.product(i=range(n))
    with tempfile.TemporaryDirectory() as tmp:
        store = sweep.Store(tmp, "bench", C())
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
    ap.add_argument("--write", action="store_true", help="print markdown")
    args = ap.parse_args()
    ws = weak_scaling(args.per_device)
    st = store_overhead()
    if args.write:
        print("| devices | points | time | efficiency t(1)/t(D) |\n|---|---|---|---|")
        for r in ws:
            print(f"| {r['devices']} | {r['points']} | {r['time_s'] * 1e3:.0f} ms "
                  f"| {r['efficiency']:.2f} |")  # fmt: skip
        print("\n| store, per point | write (atomic json + fsync) | done? | aggregate csv |")
        print("|---|---|---|---|")
        print(f"| ms | {st['write_ms']:.2f} | {st['done_ms']:.3f} | {st['csv_ms']:.2f} |")
    else:
        print(json.dumps({"weak_scaling": ws, "store": st}, indent=2))


if __name__ == "__main__":
    main()
