"""Benchmark: one ``probe.monitor`` call against one training step of the same model.

Three plain-``flax.nnx`` models, each trained by Adam in a hand-written step
(``nnx.jit``, ``nnx.Optimizer``) on a batch of ``--batch`` examples:

* ``mlp``: 8 blocks ``tanh(Linear(256 -> 256))`` on 256 inputs;
* ``resnet-bn``: a 3x3 stem to 16 channels and 4 residual blocks
  ``relu(x + BN(conv(relu(BN(conv(x))))))`` (batch norm in training mode) on 8x8x3 inputs;
* ``transformer``: ``examples/monitor_transformer.py``'s pre-LN transformer
  (d = 32, 4 blocks, 16 tokens of 4 values).

The ResNet is monitored twice: as it trains (batch norm in training mode) and
in evaluation mode (``nnx.clone(model).eval()``: the running statistics, so the
examples do not interact and the Jacobian is taken in a batch of one).

The monitor (:func:`isometry.probe.monitor_fn`, compiled once) runs on a probe
batch of 8 held-out inputs at the defaults (4 probes x 16 Lanczos steps, the
Jacobian of one example at every block); the examples of the MLP and the
transformer do not interact, so their Jacobians are taken in a batch of one
(``jacobian_batch=1``), the ResNet's in the whole probe batch (batch norm couples
them). Reported: the median wall time of 20 calls of each after a warm-up,
their ratio (the monitor in training steps), and the same for the monitor
without the Jacobian (``jacobian_at=()``). Calling the monitor every ``k``
steps adds ``ratio / k`` of a step per step.

    python benchmarks/bench_monitor.py [--device cpu|gpu] [--batch 64] [--repeat 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1] / "examples"))
import common
from monitor_transformer import Transformer

from isometry import probe


class MLP(nnx.Module):
    def __init__(self, width=256, depth=8, *, rngs):
        self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(depth)])
        self.head = nnx.Linear(width, 10, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return self.head(x)


class ResBlock(nnx.Module):
    def __init__(self, c, *, rngs):
        self.conv1, self.conv2 = (
            nnx.Conv(c, c, (3, 3), rngs=rngs),
            nnx.Conv(c, c, (3, 3), rngs=rngs),
        )
        self.bn1, self.bn2 = nnx.BatchNorm(c, rngs=rngs), nnx.BatchNorm(c, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(x + self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x))))))


class ResNet(nnx.Module):
    def __init__(self, c=16, blocks=4, *, rngs):
        self.stem = nnx.Conv(3, c, (3, 3), rngs=rngs)
        self.blocks = nnx.List([ResBlock(c, rngs=rngs) for _ in range(blocks)])
        self.head = nnx.Linear(c, 10, rngs=rngs)

    def __call__(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.head(jnp.mean(x, axis=(1, 2)))


def models():
    """``(name, model, input shape, jacobian_batch, monitored in evaluation mode)``."""
    return [
        ("mlp", MLP(rngs=nnx.Rngs(0)), (256,), 1, False),
        ("resnet-bn", ResNet(rngs=nnx.Rngs(0)), (8, 8, 3), None, False),
        ("resnet-bn, monitored in eval mode", ResNet(rngs=nnx.Rngs(0)), (8, 8, 3), 1, True),
        ("transformer", Transformer(32, 4, 4), (16, 4), 1, False),
    ]


@nnx.jit
def train_step(model, optimizer, x, y):
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def median_time(fn, repeat: int) -> float:
    jax.block_until_ready(fn(0))  # compile
    times = []
    for i in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(i + 1))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(name, model, shape, jacobian_batch, eval_mode, batch: int, repeat: int) -> dict:
    x = jax.random.normal(jax.random.key(0), (batch, *shape))
    y = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
    x_probe = x[:8]
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    step = median_time(lambda i: train_step(model, opt, x, y), repeat)
    key = jax.random.key(2)
    watched = nnx.clone(model)  # the monitor's copy: evaluation mode leaves the model's alone
    if eval_mode:
        watched.eval()
    out = {"model": name, "step_ms": 1e3 * step}
    for label, options in (("monitor", {}), ("no_jacobian", {"jacobian_at": ()})):
        fn = probe.monitor_fn(watched, x_probe, jacobian_batch=jacobian_batch, **options)
        t = median_time(lambda i, fn=fn: fn(watched, x_probe, jax.random.fold_in(key, i)), repeat)
        out[f"{label}_ms"] = 1e3 * t
        out[f"{label}_ratio"] = t / step
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=common.DEVICES)
    p.add_argument("--batch", type=int, default=64, help="training batch")
    p.add_argument("--repeat", type=int, default=20, help="timed calls of each")
    a = p.parse_args()
    common.use_device(a.device)
    print(common.machine())
    print(f"\nbatch {a.batch}; median of {a.repeat} calls after a warm-up\n")
    print("| model | train step | monitor | monitor / step | without Jacobian | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, model, shape, jb, eval_mode in models():
        r = bench(name, model, shape, jb, eval_mode, a.batch, a.repeat)
        print(f"| {r['model']} | {r['step_ms']:.2f} ms | {r['monitor_ms']:.2f} ms | "
              f"{r['monitor_ratio']:.2f} | {r['no_jacobian_ms']:.2f} ms | "
              f"{r['no_jacobian_ratio']:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
