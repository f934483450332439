"""Plain-nnx models for the parameterization and coordinate-check tests: an MLP equivalent to
the toolkit's ``networks.MLP`` and a small pre-LN transformer (Xiong et al. 2020), each with
the forward changes of a parameterization written by hand (muP's ``1/d`` attention logits,
depth-muP's ``1/sqrt(L)`` branch multiplier)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from isometry import networks

IN_DIM, OUT_DIM = 16, 4


class PlainMLP(nnx.Module):
    """``u W_in``, ``depth`` layers ``phi(x W + b)``, readout ``x W_out + b_out``: the toolkit's
    ``MLP(MLPConfig(depth, width, in_dim, out_dim, activation="relu"))`` with Gaussian
    ``Var = 1/fan_in`` weights."""

    def __init__(self, width: int, rngs: nnx.Rngs, depth: int = 2):
        self.embed = nnx.Linear(IN_DIM, width, use_bias=False, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(depth)])
        self.readout = nnx.Linear(width, OUT_DIM, rngs=rngs)

    def __call__(self, u):
        x = self.embed(u)
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return self.readout(x)


def toolkit_mlp(width: int, rngs: nnx.Rngs, kind: str = "standard", depth: int = 2, **kw):
    kw = {"activation": "relu", **kw}
    cfg = networks.MLPConfig(
        depth=depth, width=width, in_dim=IN_DIM, out_dim=OUT_DIM, parameterization=kind, **kw
    )
    return networks.MLP(cfg, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head self-attention, ``heads`` fixed (the head dimension grows with width);
    logits ``q.k / sqrt(d)`` or, under muP, ``q.k / d``."""

    def __init__(self, width: int, heads: int, logits: str, rngs: nnx.Rngs):
        def lin():
            return nnx.Linear(width, width, use_bias=False, rngs=rngs)

        self.query, self.key, self.value, self.out = lin(), lin(), lin(), lin()
        self.heads, self.logits = heads, logits

    def __call__(self, z):
        *lead, T, N = z.shape
        d = N // self.heads

        def split(f):
            return f(z).reshape(*lead, T, self.heads, d)

        q, k, v = split(self.query), split(self.key), split(self.value)
        scale = d if self.logits == "1/d" else d**0.5
        a = jax.nn.softmax(jnp.einsum("...thd,...shd->...hts", q, k) / scale, axis=-1)
        return self.out(jnp.einsum("...hts,...shd->...thd", a, v).reshape(*lead, T, N))


class Block(nnx.Module):
    """``x + alpha MHSA(LN x)``, then ``x + alpha W_2 relu(W_1 LN x + b_1)``."""

    def __init__(self, width, heads, logits, alpha, rngs):
        self.ln1 = nnx.LayerNorm(width, rngs=rngs)
        self.attn = Attention(width, heads, logits, rngs)
        self.ln2 = nnx.LayerNorm(width, rngs=rngs)
        self.mlp_in = nnx.Linear(width, width, rngs=rngs)
        self.mlp_out = nnx.Linear(width, width, use_bias=False, rngs=rngs)
        self.alpha = alpha

    def __call__(self, x):
        x = x + self.alpha * self.attn(self.ln1(x))
        return x + self.alpha * self.mlp_out(jax.nn.relu(self.mlp_in(self.ln2(x))))


class PlainTransformer(nnx.Module):
    """Pre-LN transformer on real tokens ``(B, T, IN_DIM)``: linear embedding, ``depth``
    blocks, final layer norm, mean over tokens, linear readout ``OUT_DIM``."""

    def __init__(self, width, rngs, *, depth=2, heads=4, kind="standard"):
        logits = "1/d" if kind in ("mup", "depth_mup") else "1/sqrt(d)"
        alpha = depth**-0.5 if kind == "depth_mup" else 1.0
        self.embed = nnx.Linear(IN_DIM, width, rngs=rngs)
        self.blocks = nnx.List([Block(width, heads, logits, alpha, rngs) for _ in range(depth)])
        self.ln = nnx.LayerNorm(width, rngs=rngs)
        self.readout = nnx.Linear(width, OUT_DIM, rngs=rngs)

    def __call__(self, u):
        x = self.embed(u)
        for block in self.blocks:
            x = block(x)
        return self.readout(jnp.mean(self.ln(x), axis=-2))
