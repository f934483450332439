"""Benchmark: the theory engine's NNGP of a CNN vs neural-tangents' analytic kernel and Monte Carlo.

    python benchmarks/bench_theory.py [--n 64] [--size 16] [--depth 6] [--peers PYTHON] [--x64]

The model: ``depth`` 3x3 SAME convolutions with ReLU, global average pooling and
a dense readout, on ``n`` inputs of ``size x size x 3`` (the NNGP needs the full
pixel-by-pixel covariance of every pair of inputs: ``(n size^2)^2`` entries per
layer). Each route runs in its own process (its peak resident memory is its
own) and is timed twice, the first call including compilation:

* ``isometry.theory.nngp`` on the ``nnx`` model;
* neural-tangents' ``stax`` kernel of the same network, jitted, in a separate
  environment with jax 0.4.30 and neural-tangents 0.6.5 (``--peers``: its
  Python; skipped when not given). The project never imports it;
* Monte Carlo: the per-unit output Gram of the ``nnx`` model drawn at width
  ``--mc-width`` over seeds, until its error against the analytic kernel
  falls below ``--mc-target`` (relative to the kernel's largest entry); the
  time to reach the engine's own accuracy is extrapolated (error ~ 1/sqrt(seeds)).

Printed, in one run: each route's times and peak memory, the largest relative
difference between the engine and neural-tangents, and the machine's matmul
FLOP/s with the engine's effective rate on its main cost (the convolution's
Gram map, ``2 k (n size^2)^2`` flops per layer).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

ENGINE = r"""
import json, resource, sys, time
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
a = json.loads(sys.argv[1])
jax.config.update("jax_enable_x64", a["x64"])
from isometry import theory

class CNN(nnx.Module):
    def __init__(self, c, depth, rngs):
        self.layers = nnx.List([nnx.Conv(3 if i == 0 else c, c, (3, 3), padding="SAME",
                                         rngs=rngs) for i in range(depth)])
        self.out = nnx.Linear(c, 10, rngs=rngs)
    def __call__(self, x):
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return self.out(jnp.mean(x, axis=(1, 2)))

x = np.load(a["x"])
model = CNN(8, a["depth"], nnx.Rngs(0))
v = {"layers.*.kernel": 2.0, "out.kernel": 1.0, "*bias": 0.0}
times = []
for _ in range(2):
    t = time.perf_counter()
    K = theory.nngp(model, x, variances=v).block_until_ready()
    times.append(time.perf_counter() - t)
np.save(a["out"], np.asarray(K))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"first": times[0], "second": times[1], "rss_gb": rss}))
"""

PEERS = r"""
import json, resource, sys, time
import jax, jax.numpy as jnp, numpy as np
a = json.loads(sys.argv[1])
jax.config.update("jax_enable_x64", a["x64"])
from neural_tangents import stax
layers = []
for _ in range(a["depth"]):
    layers += [stax.Conv(8, (3, 3), padding="SAME", W_std=2.0**0.5, b_std=None), stax.Relu()]
_, _, kernel_fn = stax.serial(*layers, stax.GlobalAvgPool(), stax.Dense(10, W_std=1.0, b_std=None))
kernel_fn = jax.jit(kernel_fn, static_argnames="get")
x = jnp.asarray(np.load(a["x"]))
times = []
for _ in range(2):
    t = time.perf_counter()
    K = kernel_fn(x, None, "nngp").block_until_ready()
    times.append(time.perf_counter() - t)
np.save(a["out"], np.asarray(K))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"first": times[0], "second": times[1], "rss_gb": rss}))
"""

MONTE_CARLO = r"""
import json, resource, sys, time
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
a = json.loads(sys.argv[1])
jax.config.update("jax_enable_x64", a["x64"])

class CNN(nnx.Module):
    def __init__(self, c, depth, rngs):
        init = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
        self.layers = nnx.List([nnx.Conv(3 if i == 0 else c, c, (3, 3), padding="SAME",
                                         kernel_init=init, use_bias=False, rngs=rngs)
                                for i in range(depth)])
        self.out = nnx.Linear(c, c, use_bias=False, rngs=rngs,
                              kernel_init=nnx.initializers.variance_scaling(1.0, "fan_in",
                                                                            "normal"))
    def __call__(self, x):
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return self.out(jnp.mean(x, axis=(1, 2)))

x = np.load(a["x"])
K = np.load(a["kernel"])
scale = np.max(np.abs(K))
graphdef, _ = nnx.split(CNN(a["width"], a["depth"], nnx.Rngs(0)))
run = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
total, seeds, t0 = 0.0, 0, time.perf_counter()
errors = []
while seeds < a["max_seeds"]:
    y = run(nnx.split(CNN(a["width"], a["depth"], nnx.Rngs(seeds)))[1], x)
    total = total + np.asarray(y @ y.T / y.shape[-1])
    seeds += 1
    err = float(np.max(np.abs(total / seeds - K)) / scale)
    errors.append(err)
    if err < a["target"] and seeds >= 4:
        break
elapsed = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"seconds": elapsed, "seeds": seeds, "error": errors[-1], "rss_gb": rss,
                  "per_seed": elapsed / seeds}))
"""


def run(python: str, code: str, args: dict) -> dict:
    out = subprocess.run(
        [python, "-c", code, json.dumps(args)], capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise SystemExit(f"a route failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64, help="inputs")
    p.add_argument("--size", type=int, default=16, help="image side")
    p.add_argument("--depth", type=int, default=6, help="convolutions")
    p.add_argument("--peers", default=None, help="Python of the neural-tangents environment")
    p.add_argument("--x64", action="store_true", help="float64 (default float32)")
    p.add_argument("--mc-width", type=int, default=256, help="Monte Carlo width")
    p.add_argument("--mc-target", type=float, default=0.05, help="Monte Carlo target error")
    p.add_argument("--mc-max-seeds", type=int, default=200)
    a = p.parse_args()
    import numpy as np

    print(common.machine())
    peak = common.matmul_flops()
    print(f"matmul peak: {peak / 1e9:.0f} GFLOP/s (float32)")
    work = Path(tempfile.mkdtemp())
    x = np.random.default_rng(0).standard_normal((a.n, a.size, a.size, 3))
    np.save(work / "x.npy", x.astype(np.float64 if a.x64 else np.float32))
    base = {"x": str(work / "x.npy"), "depth": a.depth, "x64": a.x64}
    pixels = a.n * a.size**2
    print(f"CNN depth {a.depth}, {a.n} inputs of {a.size}x{a.size}x3: {pixels**2:.3g} Gram "
          f"entries per layer, {'float64' if a.x64 else 'float32'}")  # fmt: skip
    eng = run(sys.executable, ENGINE, {**base, "out": str(work / "engine.npy")})
    flops = a.depth * 2 * 9 * pixels**2
    print(f"engine          first {eng['first']:8.2f} s  second {eng['second']:8.2f} s  "
          f"peak {eng['rss_gb']:.2f} GiB  conv Gram maps at {flops / eng['second'] / peak:.3f} "
          "of matmul peak")  # fmt: skip
    K = np.load(work / "engine.npy")
    if a.peers:
        nt = run(a.peers, PEERS, {**base, "out": str(work / "nt.npy")})
        Knt = np.load(work / "nt.npy")
        diff = float(np.max(np.abs(K - Knt)) / np.max(np.abs(Knt)))
        print(f"neural-tangents first {nt['first']:8.2f} s  second {nt['second']:8.2f} s  "
              f"peak {nt['rss_gb']:.2f} GiB  max rel diff {diff:.2e}")  # fmt: skip
        print(f"engine / neural-tangents: time {eng['second'] / nt['second']:.2f} "
              f"(first call {eng['first'] / nt['first']:.2f}), "
              f"memory {eng['rss_gb'] / nt['rss_gb']:.2f}")  # fmt: skip
    else:
        print("neural-tangents: skipped (pass --peers PYTHON of its environment)")
    mc = run(sys.executable, MONTE_CARLO, {**base, "kernel": str(work / "engine.npy"),
                                           "width": a.mc_width, "target": a.mc_target,
                                           "max_seeds": a.mc_max_seeds})  # fmt: skip
    print(f"Monte Carlo     width {a.mc_width}: {mc['seeds']} seeds, {mc['seconds']:.1f} s to "
          f"error {mc['error']:.3f} ({mc['per_seed']:.2f} s per seed); to reach 1e-3 by "
          f"1/sqrt(seeds): ~{mc['per_seed'] * mc['seeds'] * (mc['error'] / 1e-3) ** 2:.3g} s "
          f"(and width bias O(1/N) remains)")  # fmt: skip


if __name__ == "__main__":
    main()
