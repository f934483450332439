"""Benchmark of isometry.training: steps per second against PyTorch, and against the hardware.

A depth-32, width-256 tanh MLP (64 inputs, 10 classes: the digits dataset),
batch 128, SGD with clipping by global norm 1.0, float32:

1. the isometry train step (jitted, state donated; it also computes the
   per-layer gradient norms, the clipped norm and the non-finite guard)
   called in a Python loop, and the whole :func:`isometry.training.train`
   loop (logging every 10 steps, no evaluation or probe);
2. the equivalent PyTorch loop (``zero_grad``, forward, cross-entropy,
   ``backward``, ``clip_grad_norm_``, ``SGD.step``) on the same CPU, same
   run; skipped when torch is not installed;
3. the step's achieved FLOP/s (``3 x`` the forward matmul flops ``2 B sum
   n_in n_out``) as a fraction of this machine's measured float32 matmul FLOP/s.

Usage:
    python benchmarks/bench_training.py [--steps 300] [--write]

``--write`` replaces the "training" section of BENCHMARKS.md with the results.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, matmul_flops

from isometry import data, networks, training

ROOT = Path(__file__).resolve().parents[1]
DEPTH, WIDTH, BATCH, LR, CLIP = 32, 256, 128, 0.01, 1.0


def step_flops(in_dim: int, out_dim: int) -> float:
    """Matmul flops of one training step: forward ``2 B sum n_in n_out``, backward twice that."""
    fwd = 2 * BATCH * (in_dim * WIDTH + DEPTH * WIDTH * WIDTH + WIDTH * out_dim)
    return 3.0 * fwd


def bench_isometry_step(ds, steps: int) -> float:
    cfg = networks.MLPConfig(
        depth=DEPTH, width=WIDTH, in_dim=ds.in_dim, out_dim=10, activation="tanh",
        init="orthogonal", q_star=0.25,
    )  # fmt: skip
    model = networks.MLP(cfg, rngs=nnx.Rngs(0))
    tc = training.TrainConfig(
        steps=steps, batch_size=BATCH, learning_rate=LR, clip=f"global_norm:{CLIP}"
    )
    tx = training.optimizer(tc)
    clip_tx = training.clipping(tc.clip)
    g_train, _, state = training.init_state(model, tx)
    step = training.make_train_step(g_train, tx, clip_tx, training.schedule(tc))
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    idx = [jnp.asarray(data.batch_indices(0, t, len(ds.x_train), BATCH)) for t in range(steps)]
    for t in range(3):  # compile + warm-up
        state, m = step(state, x, y, idx[t], jnp.int32(t))
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for t in range(steps):
        state, m = step(state, x, y, idx[t], jnp.int32(t))
    jax.block_until_ready((state, m))
    return steps / (time.perf_counter() - t0)


def _train_seconds(ds, cfg, steps: int) -> float:
    tc = training.TrainConfig(
        steps=steps, batch_size=BATCH, learning_rate=LR, clip=f"global_norm:{CLIP}",
        log_every=10, eval_every=0, probe_every=0,
    )  # fmt: skip
    model = networks.MLP(cfg, rngs=nnx.Rngs(0))
    t0 = time.perf_counter()
    training.train(model, ds, tc)
    return time.perf_counter() - t0


def bench_isometry_train(ds, steps: int) -> float:
    """Steps/s of the whole ``train`` loop: runs of ``n`` and ``2n`` steps, differenced
    (each ``train`` call compiles its step; the difference is the steady state)."""
    cfg = networks.MLPConfig(
        depth=DEPTH, width=WIDTH, in_dim=ds.in_dim, out_dim=10, activation="tanh",
        init="orthogonal", q_star=0.25,
    )  # fmt: skip
    t1 = _train_seconds(ds, cfg, steps)
    t2 = _train_seconds(ds, cfg, 2 * steps)
    return steps / max(t2 - t1, 1e-9)


def bench_torch(ds, steps: int, threads: int) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layers = [torch.nn.Linear(ds.in_dim, WIDTH)]
    for _ in range(DEPTH):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh()]
    layers.append(torch.nn.Linear(WIDTH, 10))
    model = torch.nn.Sequential(*layers)
    for m in model:
        if isinstance(m, torch.nn.Linear) and m.in_features == m.out_features:
            torch.nn.init.orthogonal_(m.weight)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train.astype(np.int64))
    idx = [
        torch.from_numpy(data.batch_indices(0, t, len(ds.x_train), BATCH).astype(np.int64))
        for t in range(steps)
    ]

    def step(i):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x[i]), y[i])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        return loss.detach()

    for t in range(3):
        step(idx[t])
    t0 = time.perf_counter()
    for t in range(steps):
        loss = step(idx[t])
    float(loss)
    return steps / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = ap.parse_args(argv)
    ds = data.load_digits()
    peak = matmul_flops(2048)
    flops = step_flops(ds.in_dim, 10)
    sps = bench_isometry_step(ds, args.steps)
    sps_train = bench_isometry_train(ds, args.steps)
    threads = sorted({1, os.cpu_count() or 1})
    tor = {n: bench_torch(ds, args.steps, n) for n in threads}
    tor = {n: v for n, v in tor.items() if v is not None}
    rows = [
        ("isometry train step (jitted, donated), Python loop", sps),
        ("isometry `training.train` loop (log every 10 steps)", sps_train),
    ]
    rows += [(f"PyTorch eager loop, {n} thread(s)", v) for n, v in tor.items()]
    lines = [
        f"`python benchmarks/bench_training.py --steps {args.steps}` ({machine()}; float32; "
        f"depth {DEPTH}, width {WIDTH}, batch {BATCH}, SGD, clip by global norm; "
        f"{args.steps} timed steps after compilation).",
        "",
        "| loop | steps/s | achieved GFLOP/s | fraction of matmul peak |",
        "|---|---|---|---|",
    ]
    for name, v in rows:
        lines.append(f"| {name} | {v:.1f} | {v * flops / 1e9:.1f} | {v * flops / peak:.2f} |")
    lines.append("")
    lines.append(
        f"Measured float32 matmul peak (2048 x 2048, XLA): {peak / 1e9:.1f} GFLOP/s; "
        f"one step = {flops / 1e9:.3f} GFLOP (3 x forward matmuls)."
    )
    if tor:
        best = max(tor.values())
        lines.append(
            f"Ratio isometry / best PyTorch: step {sps / best:.2f}x, "
            f"whole `train` loop {sps_train / best:.2f}x."
        )
    else:
        lines.append("PyTorch not installed: comparison skipped.")
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(text)
    return 0


def write_section(text: str) -> None:
    """Replace (or append) the ``## training`` section of BENCHMARKS.md, re-read just before."""
    path = ROOT / "BENCHMARKS.md"
    old = path.read_text() if path.exists() else ""
    section = f"## training\n\n{text}\n"
    pat = re.compile(r"^## training\n.*?(?=^## |\Z)", re.S | re.M)
    if pat.search(old):
        new = pat.sub(lambda _: section + "\n", old, count=1)
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + section
    path.write_text(new.rstrip("\n") + "\n")


if __name__ == "__main__":
    sys.exit(main())
