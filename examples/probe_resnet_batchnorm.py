"""Probe a ResNet-style CNN with batch norm on the embedded digits: gradient growth per block.

Pre-activation residual blocks ``shortcut(x) + conv(relu(BN(conv(relu(BN(x))))))``
(He et al. 2016) in two stages of widths ``c`` and ``2c`` (a 1x1 convolution as
the shortcut where the width changes), written with plain ``flax.nnx`` layers; the
blocks expose their residual branch as ``branch(x)``, so its variance is measured
too. In training mode batch norm makes the gradient grow from the output towards
the input, block after block (Yang et al. 2019); the same network without batch
norm is drawn for comparison, with the theory engine's infinite-width prediction
of every measured field over it (``probe.theory``; batch statistics in training
mode couple the examples and have no rule there, which the run prints). At these
widths (8 and 16 channels) the measurement scatters about the prediction.

    python examples/probe_resnet_batchnorm.py [--tiny] [--out examples/out]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from isometry import data, probe, theory


class ResBlock(nnx.Module):
    def __init__(self, c_in: int, c_out: int, *, norm: bool, rngs: nnx.Rngs, dtype=jnp.float32):
        kw = {"rngs": rngs, "param_dtype": dtype}
        self.conv1 = nnx.Conv(c_in, c_out, (3, 3), **kw)
        self.conv2 = nnx.Conv(c_out, c_out, (3, 3), **kw)
        self.bn1 = nnx.BatchNorm(c_in, dtype=dtype, **kw) if norm else None
        self.bn2 = nnx.BatchNorm(c_out, dtype=dtype, **kw) if norm else None
        self.shortcut = nnx.Conv(c_in, c_out, (1, 1), **kw) if c_in != c_out else None

    def branch(self, x):
        h = self.conv1(nnx.relu(x if self.bn1 is None else self.bn1(x)))
        return self.conv2(nnx.relu(h if self.bn2 is None else self.bn2(h)))

    def __call__(self, x):
        skip = x if self.shortcut is None else self.shortcut(x)
        return skip + self.branch(x)


class Stage(nnx.Module):
    def __init__(self, c_in: int, c_out: int, n: int, *, norm: bool, rngs: nnx.Rngs, dtype):
        self.blocks = nnx.List(
            [
                ResBlock(c_in if i == 0 else c_out, c_out, norm=norm, rngs=rngs, dtype=dtype)
                for i in range(n)
            ]
        )

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class ResNet(nnx.Module):
    """Stem, two stages (widths ``c``, ``2c``), global average pooling, linear head."""

    def __init__(self, c=8, n=2, *, norm=True, seed=0, dtype=jnp.float32):
        rngs = nnx.Rngs(seed)
        kw = {"norm": norm, "rngs": rngs, "dtype": dtype}
        self.stem = nnx.Conv(1, c, (3, 3), rngs=rngs, param_dtype=dtype)
        self.stages = nnx.List([Stage(c, c, n, **kw), Stage(c, 2 * c, n, **kw)])
        self.head = nnx.Linear(2 * c, 10, rngs=rngs, param_dtype=dtype)

    def __call__(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(jnp.mean(x, axis=(1, 2)))


def build() -> ResNet:
    """The factory of ``isometry probe examples/probe_resnet_batchnorm.py:build``."""
    return ResNet()


def _theory(model, x):
    """The engine's prediction per block, or ``None`` (printing why there is none)."""
    try:
        return probe.theory(model, x)
    except theory.TheoryError as err:
        print(f"theory not drawn: {err}")
        return None


def main(out: str = "examples/out", tiny: bool = False) -> dict:
    c, n, batch = (4, 1, 8) if tiny else (8, 2, 16)
    x = jnp.asarray(data.load_digits(images=True).x_train[:batch])
    key = jax.random.key(0)
    runs, growth = [], {}
    for norm in (True, False):
        model = ResNet(c, n, norm=norm)
        sig = probe.signal(model, x, key=key)
        spec = probe.jacobian_spectra(model, x)
        label = "batch norm" if norm else "no normalization"
        runs.append({"signal": sig, "spectra": spec, "label": label, "theory": _theory(model, x)})
        g = np.asarray(sig.grad_out_sq)
        growth[label] = float((g[0] / g[-1]) ** (1 / max(len(g) - 1, 1)))
        print(f"{label}: ||dL/dy||^2 per block {np.round(g, 4)}; mean growth per block "
              f"towards the input {growth[label]:.3f}")  # fmt: skip
    title = f"ResNet on the digits (widths {c}, {2 * c}; batch {batch}, training mode)"
    probe.plot(*runs, path=f"{out}/probe_resnet_batchnorm", title=title)
    return {"growth_per_block": growth, "figure": f"{out}/probe_resnet_batchnorm.png"}


if __name__ == "__main__":
    from common import cli

    cli(main, __doc__)
