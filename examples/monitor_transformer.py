"""Watch isometry while training a plain-nnx pre-LN transformer with a hand-written optax loop.

The model is written with plain ``nnx.MultiHeadAttention``, ``nnx.LayerNorm``
and ``nnx.Linear`` (no toolkit network): each 8x8 digit is read as 16 tokens
of 2x2 pixels, embedded with a learned position embedding, passed through
pre-LN blocks ``x + attn(LN(x))``, ``x + mlp(LN(x))`` and classified from the
mean token. It is trained by Adam in a loop of our own (``nnx.Optimizer``, one
``nnx.jit`` step). Every ``every`` steps :func:`isometry.probe.monitor_fn`'s
compiled function measures, per block, the mean square of the block output,
the squared gradient norms at the output and of the block's parameters, and
the mean and the largest squared singular value of the cumulative Jacobian
``d y^l / d x`` (by SLQ, for one held-out example); each call appends one line
to ``monitor_transformer.jsonl`` (:class:`isometry.probe.MonitorLog`), drawn
over the steps by :func:`isometry.probe.plot_history`. The run prints what one
monitor call costs in training steps.

    python examples/monitor_transformer.py [--tiny] [--out examples/out]
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from isometry import data, probe


class Block(nnx.Module):
    """``x + attn(LN(x))`` then ``x + mlp(LN(x))`` (pre-LN)."""

    def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.fc1 = nnx.Linear(d, 4 * d, rngs=rngs)
        self.fc2 = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class Transformer(nnx.Module):
    """Tokens ``(B, 16, 4)`` -> logits ``(B, 10)``; the cut points are ``blocks.0`` ...."""

    def __init__(self, d: int, depth: int, heads: int, *, tokens: int = 16, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.embed = nnx.Linear(4, d, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (tokens, d)))
        self.blocks = nnx.List([Block(d, heads, rngs=rngs) for _ in range(depth)])
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, 10, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x) + self.pos[...]
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(self.ln(x), axis=1))


def patches(images):
    """``(B, 8, 8, 1)`` digits -> ``(B, 16, 4)``: 2x2 patches in raster order."""
    b = images.shape[0]
    return images.reshape(b, 4, 2, 4, 2).transpose(0, 1, 3, 2, 4).reshape(b, 16, 4)


@nnx.jit
def train_step(model, optimizer, x, y):
    def loss_fn(model):
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def main(out: str = "examples/out", tiny: bool = False) -> dict:
    d, depth, heads, steps, every, batch = (8, 2, 2, 12, 4, 16) if tiny else (32, 4, 4, 200, 20, 64)
    ds = data.load_digits(images=True)
    x_train, y_train = patches(jnp.asarray(ds.x_train)), jnp.asarray(ds.y_train)
    x_probe = patches(jnp.asarray(ds.x_test[:8]))  # held-out inputs of the monitor
    model = Transformer(d, depth, heads)
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    # compiled on its first call; the examples do not interact (no batch norm), so the
    # Jacobian of example 0 is taken in a batch of one
    watch = probe.monitor_fn(model, x_probe, jacobian_batch=1)
    log = probe.MonitorLog(Path(out) / "monitor_transformer.jsonl")
    log.resume(-1)  # a fresh log (a resumed run would pass its checkpoint step)
    key = jax.random.key(1)  # the monitor's own key: the training's randomness is untouched
    losses, t_step, t_mon = [], [], []
    for step in range(steps + 1):
        if step % every == 0:
            t0 = time.perf_counter()
            summary = jax.block_until_ready(watch(model, x_probe, jax.random.fold_in(key, step)))
            t_mon.append(time.perf_counter() - t0)
            log.write(step, summary)
        if step == steps:
            break
        idx = jax.random.permutation(jax.random.fold_in(jax.random.key(0), step), len(y_train))
        t0 = time.perf_counter()
        losses.append(
            float(train_step(model, optimizer, x_train[idx[:batch]], y_train[idx[:batch]]))
        )
        t_step.append(time.perf_counter() - t0)
    h = probe.read_history(log)
    title = f"pre-LN transformer (d = {d}, {depth} blocks) trained by Adam on the digits as tokens"
    probe.plot_history(h, path=f"{out}/monitor_transformer", title=title)
    # the first call of each compiles; the medians of the others are the steady costs
    ratio = _median(t_mon[1:]) / _median(t_step[1:]) if len(t_mon) > 1 else float("nan")
    result = {
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "monitor_calls": len(h["step"]),
        "final_jac_sv2_max": [round(float(v), 3) for v in h["jac_sv2_max"][-1]],
        "monitor_cost_in_steps": round(ratio, 2),
        "log": str(log.path),
    }
    print(result)
    return result | {"figure": f"{out}/monitor_transformer.png"}


def _median(v):
    v = sorted(v)
    return v[len(v) // 2] if v else float("nan")


if __name__ == "__main__":
    from common import cli

    cli(main, __doc__)
