"""Shape the activation of your own residual network with DKS and TAT, through its own structure.

A pre-activation ResNet written with plain ``nnx.Linear`` and
``networks.WeightedResidual`` blocks (``w x + sqrt(1 - w^2) f(x)``, two nonlinear
layers per branch, scaled uniform orthogonal weights, zero biases, no
normalization). ``shaping.subnet_max_func`` reads the network's subnetwork
maximizing function off the model through the theory engine; ``shaping.dks`` and
``shaping.tat`` solve their activations through it. The figure draws the
compound C-map ``C_f(c)`` (the cosine of the outputs for inputs of cosine ``c``)
of the network with ReLU, DKS softplus and TAT leaky ReLU: theory (the engine's
kernel of the model) as lines, measurement (the model itself at a finite width,
mean and standard error over seeds) as points. ReLU (unshaped) pulls every pair
of inputs towards the same output (its map is high and flat); DKS's keeps
``C_f(0) = 0`` and the slope ``zeta`` at 1, TAT's the largest ``C_f(0)`` over the
subnetworks at ``eta``. Where points and lines part, it is the finite width: one
network's output cosine fluctuates by about 0.1 here (width 512, 51 layers: the
fluctuation grows with depth over width), so a few seeds leave a visible error bar.

    python examples/shape_your_resnet.py [--tiny] [--out examples/out]
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from isometry import initializers, networks, plotting, shaping, theory


class Branch(nnx.Module):
    """``Dense(phi(Dense(phi(x))))``: the residual branch, pre-activation."""

    def __init__(self, width, act, rngs):
        kw = dict(use_bias=False, kernel_init=initializers.get("suo"), rngs=rngs)
        self.l1, self.l2 = nnx.Linear(width, width, **kw), nnx.Linear(width, width, **kw)
        self.act = act

    def __call__(self, x):
        return self.l2(self.act(self.l1(self.act(x))))


class ResNet(nnx.Module):
    """``x^0 = E u``; ``blocks`` weighted residual blocks; ``y = R phi(x^B)``."""

    def __init__(self, d, width, blocks, act, rngs, w=0.8):
        kw = dict(use_bias=False, kernel_init=initializers.get("suo"), rngs=rngs)
        self.embed = nnx.Linear(d, width, **kw)
        self.blocks = nnx.List(
            [networks.WeightedResidual(Branch(width, act, rngs), w) for _ in range(blocks)]
        )
        self.readout = nnx.Linear(width, width, **kw)
        self.act = act

    def __call__(self, u):
        x = self.embed(u)
        for block in self.blocks:
            x = block(x)
        return self.readout(self.act(x))


def pairs(d: int, cs) -> np.ndarray:
    """``e_1``, then one input at each cosine ``c`` with it; all with ``||u||^2 / d = 1``."""
    e1, e2 = np.eye(d)[0], np.eye(d)[1]
    return np.stack([e1] + [c * e1 + math.sqrt(1 - c * c) * e2 for c in cs]) * math.sqrt(d)


def cosines(y) -> np.ndarray:
    """The cosine of each output with the first one's."""
    y = np.asarray(y, np.float64)
    return (y[1:] @ y[0]) / np.sqrt(np.sum(y[1:] ** 2, axis=1) * np.sum(y[0] ** 2))


def main(out: str = "examples/out", tiny: bool = False) -> dict:
    d, blocks, width, seeds = (8, 3, 64, 2) if tiny else (16, 25, 512, 6)
    cs = np.linspace(-0.9, 0.95, 6 if tiny else 12)
    u = pairs(d, cs)
    m = shaping.subnet_max_func(ResNet(d, 8, blocks, jax.nn.relu, nnx.Rngs(0)), u[:1])
    print(m)
    acts = {
        "ReLU (unshaped)": jax.nn.relu,
        "DKS softplus": shaping.dks("softplus", zeta=1.5, subnet_max_func=m),
        "TAT leaky ReLU": shaping.tat("leaky_relu", eta=0.5 if not tiny else 0.3,
                                      subnet_max_func=m),
    }  # fmt: skip
    plotting.style()
    fig, ax = plt.subplots(figsize=(6.4, 4.8), constrained_layout=True)
    ax.plot([-1, 1], [-1, 1], color=plotting.THEORY_COLOR, ls=":", lw=1, label="identity")
    result = {}
    colors = ("tab:red", "tab:green", "tab:orange")
    for (name, act), color in zip(acts.items(), colors, strict=True):
        K = np.asarray(theory.nngp(ResNet(d, 8, blocks, act, nnx.Rngs(0)), u))
        th = K[0, 1:] / np.sqrt(K[0, 0] * np.diag(K)[1:])
        runs = np.stack(
            [cosines(ResNet(d, width, blocks, act, nnx.Rngs(s))(jnp.asarray(u)))
             for s in range(seeds)]
        )  # fmt: skip
        meas, se = runs.mean(axis=0), runs.std(axis=0, ddof=1) / math.sqrt(seeds)
        ax.plot(cs, th, color=color, label=f"{name}: theory")
        ax.errorbar(cs, meas, yerr=se, fmt="o", color=color, ms=4, capsize=2,
                    label=f"measured, width {width} ({seeds} seeds, mean +- s.e.)")  # fmt: skip
        result[name] = {"theory": th, "measured": meas, "standard_error": se}
        print(f"{name}: C_f(c) theory {np.round(th, 3)}, measured {np.round(meas, 3)}")
    ax.set_xlabel("input cosine $c$")
    ax.set_ylabel(r"output cosine $C_f(c)$")
    ax.set_title(f"Your ResNet: {2 * blocks + 1} nonlinear layers, shaped through its structure")
    ax.legend(fontsize=7.5, loc="lower right")
    png, _ = plotting.save(fig, f"{out}/shape_your_resnet")
    return {"maps": result, "figure": str(png)}


if __name__ == "__main__":
    from common import cli

    cli(main, __doc__)
