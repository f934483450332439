"""Benchmark: peak memory of ``probe.jacobian_spectra(method="slq")`` on a wide residual CNN.

The model: a 3x3 stem convolution from 16 to ``width`` channels, then
``blocks`` residual blocks ``x + 0.2 conv(relu(conv(x)))`` of ``width``
channels at full resolution (plain ``flax.nnx`` layers), on a batch of two
``size x size x 16`` inputs. At the defaults (16 blocks, width 1,024, 32x32x16)
one block's output has 32 * 32 * 1024 = 1,048,576 entries, so the cumulative
Jacobian of one block is 1,048,576 x 16,384 (64 GiB in float32) and the local
one 1,048,576 x 1,048,576: no dense Jacobian fits in 24 GiB. SLQ needs only
``jvp``/``vjp`` of each sub-network and keeps ``n_probes x n_steps`` Lanczos
vectors of the operator's dimension.

Prints the peak device memory (``memory_stats()["peak_bytes_in_use"]`` where
the backend reports it, else the process's peak resident set), the time and the
spectra's summaries. Run on an accelerator with
``XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/bench_probe.py``;
``--width 32 --size 8 --blocks 4`` runs on a CPU in a minute. ``--memory 8,16,32``
runs each width in a fresh process (its own peak), fits the peaks and prints the
width-dependent bytes of :func:`model_bytes` at width 1,024 for the extrapolation.
``--xla`` compiles the probe's program without running it and prints XLA's buffer
assignment (parameters and input, temporaries): the memory the run will need, in about
a minute at the defaults instead of the run's hours on a CPU.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from isometry import probe


class Block(nnx.Module):
    def __init__(self, width: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
        self.conv1 = nnx.Conv(width, width, (3, 3), kernel_init=init, rngs=rngs)
        self.conv2 = nnx.Conv(width, width, (3, 3), kernel_init=init, rngs=rngs)

    def branch(self, x):
        return 0.2 * self.conv2(nnx.relu(self.conv1(x)))

    def __call__(self, x):
        return x + self.branch(x)


class ResNet(nnx.Module):
    def __init__(self, width: int, blocks: int, *, rngs: nnx.Rngs):
        self.stem = nnx.Conv(16, width, (3, 3), rngs=rngs)
        self.blocks = nnx.List([Block(width, rngs=rngs) for _ in range(blocks)])

    def __call__(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x


def peak_bytes() -> tuple[float, str]:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return float(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0, "process peak RSS"


def memory_sweep(a) -> None:
    """Each width in a fresh process (its own peak RSS), then a fit ``a + b C + c C^2``."""
    import json
    import subprocess
    import sys

    rows = []
    for width in a.memory:
        cmd = [sys.executable, __file__, "--width", str(width), "--blocks", str(a.blocks),
               "--size", str(a.size), "--probes", str(a.probes), "--steps", str(a.steps),
               "--json"]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    C = np.array([r["width"] for r in rows], float)
    peak = np.array([r["peak_gib"] for r in rows])
    if len(rows) >= 3:
        coef = np.polyfit(C, peak, 2)
        print(f"fit peak GiB = {coef[2]:.3f} + {coef[1]:.3e} C + {coef[0]:.3e} C^2; "
              f"at C = 1024: {np.polyval(coef, 1024.0):.2f} GiB")  # fmt: skip
    print("model (float32):", json.dumps(model_bytes(1024, a.blocks, a.size, a.probes, a.steps)))


def model_bytes(width, blocks, size, probes, steps, batch=2) -> dict:
    """GiB of the parts that grow with the width: parameters (two 3x3 convolutions per
    block), the stored activations of one ``vjp`` of the whole network (block input, the
    two convolution outputs and the ReLU, per example of the batch, per probe), and the
    Lanczos vectors of the largest operator (a local Jacobian, ``size^2 width``)."""
    gib = 4.0 / 2**30
    act = size * size * width
    return {
        "params": 2 * 9 * width * width * blocks * gib,
        "vjp_activations": 4 * act * batch * blocks * probes * gib,
        "lanczos_vectors": probes * steps * act * gib,
        "dense_cumulative_J": act * size * size * 16 * gib,
        "dense_local_J": act * act * gib,
    }


def xla_buffers(model, x, probes: int, steps: int) -> dict:
    """GiB of XLA's buffer assignment for the probe's program, from compiling it (no run):
    ``arguments`` (the model's parameters and the input) and ``temporaries`` (every
    intermediate the program holds at once, as XLA schedules it)."""
    graphdef, state = nnx.split(model)

    def run(state, x, key):
        res = probe.jacobian_spectra(
            nnx.merge(graphdef, state), x, method="slq", key=key, n_probes=probes, n_steps=steps
        )
        return res.cumulative_summary["mean"]

    compiled = jax.jit(run).lower(state, x, jax.random.key(2)).compile()
    m = compiled.memory_analysis()
    return {
        "arguments": m.argument_size_in_bytes / 2**30,
        "temporaries": m.temp_size_in_bytes / 2**30,
        "outputs": m.output_size_in_bytes / 2**30,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--probes", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print one JSON line (for --memory)")
    p.add_argument(
        "--xla", action="store_true",
        help="compile only and print XLA's buffer assignment (minutes instead of hours)",
    )  # fmt: skip
    p.add_argument(
        "--memory", type=lambda s: [int(w) for w in s.split(",")], default=None,
        help="widths (e.g. 8,16,32,64), each in a fresh process: peak RSS and its fit",
    )  # fmt: skip
    common.add_device_flag(p)
    a = p.parse_args()
    common.use_device(a.device)
    if a.memory:
        memory_sweep(a)
        return
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
    model = ResNet(a.width, a.blocks, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, a.size, a.size, 16))
    m, n = a.size * a.size * a.width, a.size * a.size * 16
    print(f"block output {m:,} entries; dense cumulative J {m * n * 4 / 2**30:.1f} GiB, "
          f"local J {m * m * 4 / 2**30:.0f} GiB (float32)")  # fmt: skip
    if a.xla:
        t0 = time.perf_counter()
        gib = xla_buffers(model, x, a.probes, a.steps)
        print(f"XLA buffer assignment (compiled in {time.perf_counter() - t0:.0f} s, not run): "
              + ", ".join(f"{k} {v:.3f} GiB" for k, v in gib.items())
              + f"; process peak RSS so far {peak_bytes()[0] / 2**30:.2f} GiB")  # fmt: skip
        return
    matvecs = 2 * a.blocks * a.probes * a.steps
    stage = (f"probe.jacobian_spectra(method='slq'): {2 * a.blocks} Jacobians, {matvecs} SLQ "
             "matvecs, compiled and run as one program: no output until it ends (measured: "
             "1.7 h of one CPU core at the defaults with --probes 2 --steps 2)")  # fmt: skip
    print(stage, flush=True)
    t0 = time.perf_counter()
    res = probe.jacobian_spectra(
        model, x, method="slq", key=jax.random.key(2), n_probes=a.probes, n_steps=a.steps
    )
    jax.block_until_ready(res.cumulative_summary["mean"])
    dt = time.perf_counter() - t0
    peak, what = peak_bytes()
    if a.json:
        import json

        print(json.dumps({"width": a.width, "blocks": a.blocks, "size": a.size,
                          "probes": a.probes, "steps": a.steps, "seconds": round(dt, 1),
                          "peak_gib": round(peak / 2**30, 3), "what": what}))  # fmt: skip
        return
    print(f"{a.blocks} blocks, width {a.width}, {a.size}x{a.size}x16, SLQ {a.probes} probes x "
          f"{a.steps} steps: {dt:.1f} s, {what} {peak / 2**30:.2f} GiB")  # fmt: skip
    for name in ("cumulative", "local"):
        s = res.__getattribute__(f"{name}_summary")
        print(name, "mean s^2", np.round(np.asarray(s["mean"]), 3).tolist())
    print("largest W1 bound", float(jnp.max(res.cumulative_w1_bound)))


if __name__ == "__main__":
    main()
