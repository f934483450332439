"""Theory of any model: per-block infinite-width theory read by the theory engine from three models written in plain nnx (a convolutional ResNet, a pre-LN transformer, a vanilla RNN), drawn over measurement at growing widths.

Models (written as a researcher would, in this module): a ResNet of residual blocks
``x + conv(relu(conv(x)))`` on 8x8x3 images; a pre-LN transformer of
``nnx.MultiHeadAttention`` and GELU MLP blocks on 8 tokens (query/key kernels scaled by
0.1, the near-uniform attention whose limit the engine takes); an RNN
``h_t = tanh(W h_{t-1} + U x_t + b)`` with ``W, U`` shared over its 8 steps, cut at every
step. Measurement (markers: seed mean, bars two standard errors): :func:`isometry.probe.signal`
of each model drawn at each width, per block the mean square of the block output, the cosine
of the example pairs (0, 1), (2, 3), and the squared gradient norm of the probe's random
projection loss (averaged over 8 projections per drawn model). Theory (black line): :func:`isometry.theory.profile` of the same model, its
variances read from its own parameters, nothing written for the architecture.

What to see: measurement approaches the line as the width grows; each column's title gives
the largest relative gap of the mean squares and gradient norms, and the largest absolute gap
of the cosines, at the smallest and the largest width. Where they part at the smallest width:
finite-width corrections, which grow with depth over width, and the transformer's attention,
whose logits fluctuate at ``O(1 / sqrt(d))`` around the uniform limit the engine takes; the
gradient norms' estimate (a random projection of the loss) adds scatter at every width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from isometry import plotting, probe, theory

KEYS = ("widths", "models", "fields", "measured", "measured_se", "theory", "gap")

COST = {"quick": 66}
"""Single-core CPU seconds of the quick tier (a scheduling hint for ``--jobs``)."""

TIERS = {
    "tiny": {"widths": (16, 32), "seeds": 2, "depth": 2},
    "quick": {"widths": (64, 256, 512), "seeds": 4, "depth": 4},
    "full": {"widths": (64, 256, 1024, 4096), "seeds": 16, "depth": 8},
}

FIELDS = ("mean_sq", "pair_cosine", "grad_out_sq")
LABELS = {
    "mean_sq": "mean square of the block output",
    "pair_cosine": "cosine of input pairs",
    "grad_out_sq": r"$\|\partial L / \partial y^l\|^2$",
}
MODELS = ("conv ResNet", "pre-LN transformer", "RNN")


class _ConvBlock(nnx.Module):
    def __init__(self, width, rngs):
        self.c1 = nnx.Conv(width, width, (3, 3), padding="SAME", rngs=rngs)
        self.c2 = nnx.Conv(width, width, (3, 3), padding="SAME", rngs=rngs)

    def __call__(self, x):
        return x + self.c2(jax.nn.relu(self.c1(x)))


class ConvResNet(nnx.Module):
    """A stem convolution, ``depth`` residual blocks, global average pooling, a readout."""

    def __init__(self, width, depth, rngs):
        self.stem = nnx.Conv(3, width, (3, 3), padding="SAME", rngs=rngs)
        self.blocks = nnx.List([_ConvBlock(width, rngs) for _ in range(depth)])
        self.out = nnx.Linear(width, 10, rngs=rngs)

    def __call__(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.out(jnp.mean(x, axis=(1, 2)))


class _TransformerBlock(nnx.Module):
    def __init__(self, width, rngs):
        self.ln1 = nnx.LayerNorm(width, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(4, width, decode=False, rngs=rngs)
        for lin in (self.attn.query, self.attn.key):
            lin.kernel[...] = 0.1 * lin.kernel[...]
        self.ln2 = nnx.LayerNorm(width, rngs=rngs)
        self.fc1 = nnx.Linear(width, width, rngs=rngs)
        self.fc2 = nnx.Linear(width, width, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class Transformer(nnx.Module):
    """A token embedding, ``depth`` pre-LN blocks, a readout of the mean token."""

    def __init__(self, width, depth, rngs):
        self.embed = nnx.Linear(8, width, rngs=rngs)
        self.blocks = nnx.List([_TransformerBlock(width, rngs) for _ in range(depth)])
        self.out = nnx.Linear(width, 10, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.out(jnp.mean(x, axis=1))


class _Cell(nnx.Module):
    def __init__(self, width, rngs):
        self.W = nnx.Linear(width, width, use_bias=False, rngs=rngs)
        self.U = nnx.Linear(4, width, rngs=rngs)

    def __call__(self, h, x_t):
        return jnp.tanh(self.W(h) + self.U(x_t))


class RNN(nnx.Module):
    """``h_t = tanh(W h_{t-1} + U x_t + b)``, ``h_0 = 0``, over ``steps`` steps sharing one
    cell; each step is a block (a cut point); the readout of the last state."""

    def __init__(self, width, steps, rngs):
        cell = _Cell(width, rngs)
        self.width = width
        self.blocks = nnx.List([_StepBlock(cell, t) for t in range(steps)])
        self.out = nnx.Linear(width, 10, rngs=rngs)

    def __call__(self, x):
        h = jnp.zeros((x.shape[0], self.width), x.dtype)
        for block in self.blocks:
            h = block(h, x)
        return self.out(h)


class _StepBlock(nnx.Module):
    def __init__(self, cell, t):
        self.cell, self.t = cell, t

    def __call__(self, h, x):
        return self.cell(h, x[:, self.t])


def _factories(depth):
    return {
        "conv ResNet": (lambda w, r: ConvResNet(w, depth, r), (4, 8, 8, 3)),
        "pre-LN transformer": (lambda w, r: Transformer(w, depth, r), (4, 8, 8)),
        "RNN": (lambda w, r: RNN(w, 2 * depth, r), (4, 2 * depth, 4)),
    }


def _inputs(shape, key):
    """Inputs in pairs of cosine about 0.5 (the pair cosine's starting point)."""
    a, b = jax.random.normal(key, (2, shape[0] // 2, *shape[1:]))
    pairs = jnp.stack([a, 0.5 * a + jnp.sqrt(0.75) * b], axis=1)
    return pairs.reshape(shape)


PROJECTIONS = 8
"""Random projections of the loss averaged per drawn model (the gradient norms' estimate)."""


def _measure(factory, x, width, seeds):
    """``(seeds, fields, blocks)``: the probe's statistics of ``factory(width)`` per seed
    (gradients averaged over :data:`PROJECTIONS` loss projections), one compiled program
    for all seeds."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: factory(width, nnx.Rngs(0))))  # no draw

    @jax.jit
    def one(state, key):
        def stats(k):
            sig = probe.signal(nnx.merge(graphdef, state), x, key=k)
            return jnp.stack([getattr(sig, f) for f in FIELDS])

        return jnp.mean(jax.vmap(stats)(jax.random.split(key, PROJECTIONS)), axis=0)

    rows = []
    for s in range(seeds):
        state = nnx.split(factory(width, nnx.Rngs(1000 + s)))[1]
        rows.append(np.asarray(one(state, jax.random.key(2000 + s))))
    return np.stack(rows)


def compute(widths, seeds, depth) -> dict:
    widths = tuple(int(w) for w in widths)
    measured, se, th, gap = [], [], [], []
    for i, (factory, shape) in enumerate(_factories(depth).values()):
        x = _inputs(shape, jax.random.key(15 + i))
        pr = theory.profile(factory(widths[-1], nnx.Rngs(0)), x, jacobian=False)
        t = np.stack([np.asarray(getattr(pr, f)) for f in FIELDS])
        rows = [_measure(factory, x, w, seeds) for w in widths]
        measured.append(np.stack([r.mean(0) for r in rows]))
        se.append(np.stack([r.std(0, ddof=1) / np.sqrt(seeds) for r in rows]))
        th.append(t)
        gap.append([_gap(r.mean(0), t) for r in rows])
    return {
        "widths": np.asarray(widths),
        "models": np.asarray(MODELS),
        "fields": np.asarray(FIELDS),
        "measured": _padded(measured),  # (model, width, field, block), NaN past a model's end
        "measured_se": _padded(se),
        "theory": _padded(th),  # (model, field, block)
        "gap": np.asarray(gap),  # (model, width, 2): largest relative / cosine gap
    }


def _gap(measured, theory) -> tuple[float, float]:
    """The largest relative gap of the mean squares and gradient norms, and the largest
    absolute gap of the cosines (``(field, block)`` arrays in ``FIELDS`` order)."""
    rel = [np.nanmax(np.abs(measured[i] / theory[i] - 1)) for i in (0, 2)]
    return max(rel), float(np.nanmax(np.abs(measured[1] - theory[1])))


def _padded(arrays) -> np.ndarray:
    """Stack arrays whose last axis (blocks) differs, padding with NaN."""
    n = max(a.shape[-1] for a in arrays)
    pad = [np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, n - a.shape[-1])], constant_values=np.nan)
           for a in arrays]  # fmt: skip
    return np.stack(pad)


def plot(data, params):
    import matplotlib.pyplot as plt

    plotting.style()
    models, fields, widths = list(data["models"]), list(data["fields"]), data["widths"]
    fig, axes = plt.subplots(len(fields), len(models), figsize=(11, 8.5),
                             constrained_layout=True, squeeze=False)  # fmt: skip
    colors = plt.cm.viridis(np.linspace(0.15, 0.85, len(widths)))
    for j, model in enumerate(models):
        th = data["theory"][j]
        th = th[:, : int(np.sum(~np.isnan(th[0])))]
        blocks = np.arange(1, th.shape[-1] + 1)
        for i, field in enumerate(fields):
            ax = axes[i, j]
            for k, w in enumerate(widths):
                m = data["measured"][j, k, i, : len(blocks)]
                e = data["measured_se"][j, k, i, : len(blocks)]
                ax.errorbar(blocks + 0.08 * (k - 1), m, 2 * e, fmt="o", ms=3.5, mfc="none",
                            color=colors[k], capsize=2, label=f"measured, width {w}")  # fmt: skip
            ax.plot(blocks, th[i], "-", color="black", lw=1.3, label="theory (engine)")
            if field != "pair_cosine":
                ax.set_yscale("log")
            ax.set_ylabel(LABELS[field])
            ax.set_xticks(blocks)
            if i == len(fields) - 1:
                ax.set_xlabel("time step" if model == "RNN" else "block")
            if i == 0:
                g = data["gap"][j]
                arrow = "\u2192"
                ax.set_title(f"{model}\nlargest gap, width {widths[0]} {arrow} {widths[-1]}: "
                             f"{g[0][0]:.0%} {arrow} {g[-1][0]:.0%}, cosine {g[0][1]:.2f} "
                             f"{arrow} {g[-1][1]:.2f}", fontsize=8.5)  # fmt: skip
    axes[-1, 0].legend(fontsize=7, frameon=False, loc="upper right")
    fig.suptitle("Theory read from the model (isometry.theory) over measurement "
                 "(isometry.probe)", fontsize=10)  # fmt: skip
    return fig
