"""The coordinate check of a transformer written in plain ``nnx``: standard vs muP with Adam.

microsoft/mup's check (Yang et al. 2022, "Tensor Programs V"), for any NNX model:
train the model a few Adam steps at several widths and plot the mean absolute size
of each block's output and of its change since initialization against width.
Under the standard parameterization the change grows with width (slope near 1 after
the first step: Adam moves every weight by about ``eta``, and a hidden layer sums ``n``
such moves; later the output's change no longer grows, as the widest models overshoot);
under muP it does not (slope near 0; the readout starts at 0, so the blocks first move
at the second step). The model's own code makes muP's one forward
change, attention logits ``q.k / d``; :func:`isometry.parameterization.apply` does the
rest (initialization variances and per-parameter learning rates) from the shapes
:func:`isometry.parameterization.infer` finds by building it at two widths.

    python examples/mup_coord_check.py [--tiny] [--out examples/out]
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from isometry import probe


class Block(nnx.Module):
    """Pre-LN block ``x + MHSA(LN x)``, ``x + W_2 relu(W_1 LN x)``; ``heads`` fixed, so the
    head dimension ``d`` grows with the width; logits ``/ d`` (muP) or ``/ sqrt(d)``."""

    def __init__(self, width: int, heads: int, mup: bool, rngs: nnx.Rngs):
        self.ln1, self.ln2 = nnx.LayerNorm(width, rngs=rngs), nnx.LayerNorm(width, rngs=rngs)
        self.qkv = nnx.Linear(width, 3 * width, use_bias=False, rngs=rngs)
        self.out = nnx.Linear(width, width, use_bias=False, rngs=rngs)
        self.mlp_in = nnx.Linear(width, width, rngs=rngs)
        self.mlp_out = nnx.Linear(width, width, use_bias=False, rngs=rngs)
        self.heads, self.mup = heads, mup

    def __call__(self, x):
        *lead, T, N = x.shape
        d = N // self.heads
        q, k, v = jnp.split(self.qkv(self.ln1(x)).reshape(*lead, T, self.heads, 3 * d), 3, -1)
        logits = jnp.einsum("...thd,...shd->...hts", q, k) / (d if self.mup else np.sqrt(d))
        a = jnp.einsum("...hts,...shd->...thd", jax.nn.softmax(logits, -1), v)
        x = x + self.out(a.reshape(*lead, T, N))
        return x + self.mlp_out(jax.nn.relu(self.mlp_in(self.ln2(x))))


class Transformer(nnx.Module):
    """Linear token embedding, ``depth`` blocks, final LN, mean over tokens, readout."""

    def __init__(self, width: int, rngs: nnx.Rngs, *, mup: bool, depth: int = 2, d_in: int = 16):
        self.embed = nnx.Linear(d_in, width, rngs=rngs)
        self.blocks = nnx.List([Block(width, 4, mup, rngs) for _ in range(depth)])
        self.ln = nnx.LayerNorm(width, rngs=rngs)
        self.readout = nnx.Linear(width, 4, rngs=rngs)

    def __call__(self, u):
        x = self.embed(u)
        for block in self.blocks:
            x = block(x)
        return self.readout(jnp.mean(self.ln(x), axis=-2))


def main(out: str = "examples/out", tiny: bool = False) -> dict:
    """Run the check under both parameterizations, save the figure, print the slopes."""
    widths = (32, 64, 128) if tiny else (64, 128, 256, 512)
    seeds = 2 if tiny else 3
    x = jax.random.normal(jax.random.key(0), (8, 8, 16))  # 8 sequences of 8 tokens
    checks = {}
    for kind in ("standard", "mup"):
        checks[kind] = probe.coord_check(
            lambda w, rngs, kind=kind: Transformer(w, rngs, mup=kind == "mup"), widths, x,
            "adam", learning_rate=0.01, parameterization=kind, seeds=seeds, steps=3,
            zero_readout=kind == "mup",
        )  # fmt: skip
    slopes = {}
    for kind, check in checks.items():
        s = check.slopes()
        for t, when in ((1, "first"), (-1, "last")):
            mean, spread = np.asarray(s["change_mean"][t]), np.asarray(s["change_std"][t])
            slopes[kind, when] = mean
            rows = zip(check.blocks, mean, spread, strict=True)
            text = ", ".join(f"{b} {m:+.2f} +- {e:.2f}" for b, m, e in rows)
            print(f"{kind:>8}, {when} step: slope of log mean|change| vs log width: {text}")
    path = Path(out) / "mup_coord_check"
    probe.coord_plot(checks["standard"], checks["mup"], path=path, labels=["SP", "muP"],
                     title="Coordinate check of a plain-nnx transformer (Adam)")  # fmt: skip
    return {"figure": str(path.with_suffix(".png")), "slopes": slopes}  # (kind, step)


if __name__ == "__main__":
    from common import cli

    cli(main, __doc__)
