"""Benchmark of isometry.training: steps per second against PyTorch, and against the hardware.

A depth-32, width-256 tanh MLP (64 inputs, 10 classes: the digits dataset),
batch 128, SGD with clipping by global norm 1.0, float32:

1. the isometry train step (jitted, state donated) called in a Python
   loop, as at an ordinary step (``log=False``: the non-finite guard only)
   and as at a log step (``log=True``: also the per-layer gradient norms and
   the clipped norm), and the whole :func:`isometry.training.train` loop
   (logging every 10 steps, no evaluation or probe);
2. the equivalent PyTorch loop (``zero_grad``, forward, cross-entropy,
   ``backward``, ``clip_grad_norm_``, ``SGD.step``) on the same CPU, same
   run, best of 4 rounds; skipped when torch is not installed;
3. the cost of each diagnostic as a fraction of the ordinary step's time:
   the guard (the step against a bare ``value_and_grad`` + update step built
   here), the per-layer norms and the clipped norm (each jitted alone on the
   step's gradients, best of interleaved repeats);
4. the bare step through the model's ``Stack`` view, whose plain scan is
   differentiated as it stands: the gain of the model call's hoisted JVP
   (:mod:`isometry.networks`, "Differentiation") in the same run;
5. the step's achieved FLOP/s (``3 x`` the forward matmul flops ``2 B sum
   n_in n_out``) as a fraction of this machine's measured float32 matmul FLOP/s.

Usage:
    python benchmarks/bench_training.py [--steps 300] [--device {cpu,gpu}] [--write]

``--write`` replaces the "training" section of BENCHMARKS.md (``--device gpu``:
the "training (gpu)" section) with the results.
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
import optax
from flax import nnx
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_device_flag, best_time, machine, matmul_flops, use_device

from isometry import data, networks, training
from isometry.training.evaluation import per_example_loss

ROOT = Path(__file__).resolve().parents[1]
DEPTH, WIDTH, BATCH, LR, CLIP = 32, 256, 128, 0.01, 1.0


def step_flops(in_dim: int, out_dim: int) -> float:
    """Matmul flops of one training step: forward ``2 B sum n_in n_out``, backward twice that."""
    fwd = 2 * BATCH * (in_dim * WIDTH + DEPTH * WIDTH * WIDTH + WIDTH * out_dim)
    return 3.0 * fwd


def _setup(ds):
    """``(graphdef, tx, clip_tx, train config, state)`` of the benchmark's MLP."""
    cfg = networks.MLPConfig(
        depth=DEPTH, width=WIDTH, in_dim=ds.in_dim, out_dim=10, activation="tanh",
        init="orthogonal", q_star=0.25,
    )  # fmt: skip
    model = networks.MLP(cfg, rngs=nnx.Rngs(0))
    tc = training.TrainConfig(
        steps=1, batch_size=BATCH, learning_rate=LR, clip=f"global_norm:{CLIP}"
    )
    tx = training.optimizer(tc)
    g_train, _, state = training.init_state(model, tx)
    return g_train, tx, training.clipping(tc.clip), tc, state


def bare_step(graphdef, tx, generic: bool = False):
    """The step without guard or diagnostics: ``value_and_grad``, ``tx.update``, apply.

    ``generic``: the forward pass through the model's ``Stack`` view, whose plain
    scan is differentiated as it stands (the weight gradients inside the backward
    scan) instead of through the model call's hoisted JVP."""

    def loss_fn(params, stats, rest, x, y):
        model = nnx.merge(graphdef, params, stats, rest, copy=True)
        out = model.stack()(x) if generic else model(x)
        return per_example_loss("cross_entropy", out, y)[0].mean()

    def step(state, x_all, y_all, idx, step):
        p, x, y = state["params"], x_all[idx], y_all[idx]
        value, grads = jax.value_and_grad(loss_fn)(p, state["batch_stats"], state["rest"], x, y)
        updates, opt_state = tx.update(grads, state["opt_state"], p)
        return {**state, "params": optax.apply_updates(p, updates), "opt_state": opt_state}, value

    return jax.jit(step, donate_argnums=0)


def bench_steps(ds, steps: int, rounds: int = 4) -> dict[str, float]:
    """Steps/s of the lean, log and bare steps and of the bare step through the plain scan
    (``"plain"``): best of interleaved rounds."""
    g, tx, clip_tx, tc, state = _setup(ds)
    step = training.make_train_step(g, tx, clip_tx, training.schedule(tc))
    lean = lambda s, x, y, i, t: step(s, x, y, i, t, False)  # noqa: E731
    logged = lambda s, x, y, i, t: step(s, x, y, i, t, True)  # noqa: E731
    fns = {"lean": lean, "log": logged, "bare": bare_step(g, tx), "plain": bare_step(g, tx, True)}
    states = {k: jax.tree.map(jnp.copy, state) for k in fns}
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    idx = [jnp.asarray(data.batch_indices(0, t, len(ds.x_train), BATCH)) for t in range(steps)]
    best = dict.fromkeys(fns, float("inf"))
    for r in range(rounds + 1):  # round 0 compiles and warms up; the order alternates
        for k in list(fns) if r % 2 else list(fns)[::-1]:
            f, s = fns[k], states[k]
            t0 = time.perf_counter()
            for t in range(steps if r else 3):
                s, m = f(s, x, y, idx[t], jnp.int32(t))
            jax.block_until_ready((s, m))
            states[k] = s
            if r:
                best[k] = min(best[k], time.perf_counter() - t0)
    return {k: steps / v for k, v in best.items()}


def same_shape_matmuls(repeat: int = 20) -> float:
    """FLOP/s of the step's matmuls alone: per layer ``h W``, ``g W^T`` and ``h^T g`` at
    the step's shapes ``(B, N) x (N, N)``, ``DEPTH`` layers in one scan (no activation,
    no update): what XLA attains on these shapes, the step's own roofline."""
    k1, k2 = jax.random.split(jax.random.key(0))
    w = jax.random.normal(k1, (DEPTH, WIDTH, WIDTH)) / WIDTH**0.5
    h0 = jax.random.normal(k2, (BATCH, WIDTH))

    def body(carry, wl):
        h, acc = carry
        h = h @ wl
        return (h, acc + h.T @ (h @ wl.T)), None

    chain = jax.jit(lambda w, h: lax.scan(body, (h, jnp.zeros((WIDTH, WIDTH))), w)[0])
    return 3 * 2 * BATCH * WIDTH**2 * DEPTH / best_time(chain, w, h0, repeat=repeat)


def diagnostic_seconds(ds) -> dict[str, float]:
    """Seconds of the per-layer norms and of the clipped norm, each jitted alone on gradients."""
    *_, clip_tx, _, state = _setup(ds)
    p = state["params"]
    grads = jax.tree.map(lambda a: jnp.full_like(a, 1e-3), p)
    norms = jax.jit(training.layer_grad_norms)
    clipped = jax.jit(lambda gr: optax.tree.norm(clip_tx.update(gr, clip_tx.init(p), p)[0]))
    return {
        "norms": best_time(norms, grads, repeat=20),
        "clip": best_time(clipped, grads, repeat=20),
    }


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
    return steps / (t2 - t1) if t2 > t1 else float("nan")  # nan: swamped by load


def bench_torch(ds, steps: int, threads: int, device: str = "cpu", rounds: int = 4) -> float | None:
    """Steps/s of the PyTorch eager loop, best of ``rounds`` (``device="gpu"``: on CUDA;
    ``None`` if unavailable)."""
    try:
        import torch
    except ImportError:
        return None
    dev = "cuda" if device == "gpu" else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        return None
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layers = [torch.nn.Linear(ds.in_dim, WIDTH)]
    for _ in range(DEPTH):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh()]
    layers.append(torch.nn.Linear(WIDTH, 10))
    model = torch.nn.Sequential(*layers).to(dev)
    for m in model:
        if isinstance(m, torch.nn.Linear) and m.in_features == m.out_features:
            torch.nn.init.orthogonal_(m.weight)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x = torch.from_numpy(ds.x_train).to(dev)
    y = torch.from_numpy(ds.y_train.astype(np.int64)).to(dev)
    idx = [
        torch.from_numpy(data.batch_indices(0, t, len(ds.x_train), BATCH).astype(np.int64)).to(dev)
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
    best = float("inf")
    for _ in range(rounds):  # best of rounds, as the isometry rows
        t0 = time.perf_counter()
        for t in range(steps):
            loss = step(idx[t])
        float(loss)
        best = min(best, time.perf_counter() - t0)
    return steps / best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    add_device_flag(ap)
    args = ap.parse_args(argv)
    use_device(args.device)
    ds = data.load_digits()
    peak = matmul_flops(2048)
    flops = step_flops(ds.in_dim, 10)
    sps = bench_steps(ds, args.steps)
    shapes = same_shape_matmuls()
    diag = diagnostic_seconds(ds)
    sps_train = bench_isometry_train(ds, args.steps)
    threads = sorted({1, os.cpu_count() or 1}) if args.device == "cpu" else [1]
    tor = {n: bench_torch(ds, args.steps, n, args.device) for n in threads}
    tor = {n: v for n, v in tor.items() if v is not None}
    rows = [
        ("isometry train step, ordinary step (`log=False`), Python loop", sps["lean"]),
        ("isometry train step, log step (`log=True`), Python loop", sps["log"]),
        ("isometry `training.train` loop (log every 10 steps)", sps_train),
        ("bare step (no guard, no diagnostics; reference)", sps["bare"]),
        ("bare step through the plain scan's JVP (`model.stack()`)", sps["plain"]),
    ]
    torch_dev = "CUDA" if args.device == "gpu" else "{n} thread(s)"
    rows += [(f"PyTorch eager loop, {torch_dev.format(n=n)}", v) for n, v in tor.items()]
    lines = [
        f"`python benchmarks/bench_training.py --steps {args.steps} --device {args.device}` "
        f"({machine()}; float32; depth {DEPTH}, width {WIDTH}, batch {BATCH}, SGD, clip by "
        f"global norm; {args.steps} timed steps after compilation, best of 4 rounds, isometry's "
        f"interleaved).",
        "",
        "| loop | steps/s | achieved GFLOP/s | fraction of matmul peak |",
        "|---|---|---|---|",
    ]
    for name, v in rows:
        lines.append(f"| {name} | {v:.1f} | {v * flops / 1e9:.1f} | {v * flops / peak:.2f} |")
    t_lean = 1 / sps["lean"]
    lines += [
        "",
        f"Measured float32 matmul peak (2048 x 2048, XLA): {peak / 1e9:.1f} GFLOP/s; "
        f"one step = {flops / 1e9:.3f} GFLOP (3 x forward matmuls).",
        f"The step's matmuls alone at its shapes (({BATCH}, {WIDTH}) x ({WIDTH}, {WIDTH}), "
        f"forward and both backward products, {DEPTH} layers in one scan): "
        f"{shapes / 1e9:.1f} GFLOP/s = {shapes / peak:.2f} of peak, the most this workload "
        f"can reach; the ordinary step is {sps['lean'] * flops / shapes:.2f} of it.",
        f"Cost as a fraction of the ordinary step: non-finite guard "
        f"{(t_lean - 1 / sps['bare']) / t_lean:+.3f} (ordinary vs bare step); at log steps "
        f"per-layer norms {diag['norms'] / t_lean:.3f}, clipped norm {diag['clip'] / t_lean:.3f} "
        f"(each jitted alone), whole log step {(1 / sps['log'] - t_lean) / t_lean:+.3f}.",
        f"The hoisted JVP of the model call (every weight gradient in one batched product "
        f"after the backward scan) against the plain scan's: bare step "
        f"{sps['bare'] / sps['plain']:.2f}x.",
    ]
    if tor:
        best = max(tor.values())
        lines.append(
            f"Ratio isometry / best PyTorch: ordinary step {sps['lean'] / best:.2f}x, "
            f"log step {sps['log'] / best:.2f}x, whole `train` loop {sps_train / best:.2f}x."
        )
    else:
        lines.append("PyTorch (or its CUDA build) not installed: comparison skipped.")
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(text, "training" if args.device == "cpu" else "training (gpu)")
    return 0


def write_section(text: str, name: str = "training") -> None:
    """Replace (or append) the ``## name`` section of BENCHMARKS.md, re-read just before."""
    path = ROOT / "BENCHMARKS.md"
    old = path.read_text() if path.exists() else ""
    section = f"## {name}\n\n{text}\n"
    pat = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pat.search(old):
        new = pat.sub(lambda _: section + "\n", old, count=1)
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + section
    path.write_text(new.rstrip("\n") + "\n")


if __name__ == "__main__":
    sys.exit(main())
