"""Plain Flax NNX models the theory engine is tested on (written as a researcher would).

Each is parameterized by its width so that Monte Carlo checks can grow it, and
by ``dtype`` (float64 in theory tests). Weights are ``nnx`` defaults (LeCun
normal for dense and convolution kernels, zero biases) unless a test overrides
their variances through ``theory.nngp(..., variances=...)``;
:func:`uniform_taps` rescales a convolution kernel so that every tap has the same
mean square (the i.i.d. Gaussian convolution of neural-tangents, exactly).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from isometry import initializers, networks

F64 = jnp.float64


def dense(n_in, n_out, rngs, dtype=F64, **kw):
    return nnx.Linear(n_in, n_out, rngs=rngs, param_dtype=dtype, dtype=dtype, **kw)


def conv(c_in, c_out, rngs, padding="SAME", dtype=F64, **kw):
    return nnx.Conv(c_in, c_out, (3, 3), padding=padding, rngs=rngs, param_dtype=dtype,
                    dtype=dtype, **kw)  # fmt: skip


class MLP(nnx.Module):
    """``Dense -> phi -> ... -> Dense`` (``depth`` dense layers), optionally layer norm
    before each activation."""

    def __init__(self, d, width, depth, rngs, act=jax.nn.relu, out=None, norm=False, dtype=F64):
        sizes = [d] + [width] * (depth - 1) + [out or width]
        self.layers = nnx.List([dense(a, b, rngs, dtype) for a, b in itertools.pairwise(sizes)])
        self.norms = nnx.List(
            [nnx.LayerNorm(width, epsilon=1e-12, rngs=rngs, param_dtype=dtype, dtype=dtype)
             for _ in range(depth - 1)]
        ) if norm else None  # fmt: skip
        self.act = act

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            if i:
                x = self.act(self.norms[i - 1](x) if self.norms is not None else x)
            x = layer(x)
        return x


class DenseBlock(nnx.Module):
    """``x + W2 phi(W1 LN?(x))``."""

    def __init__(self, width, rngs, act=jax.nn.relu, norm=False, dtype=F64):
        self.norm = (
            nnx.LayerNorm(width, epsilon=1e-12, rngs=rngs, param_dtype=dtype, dtype=dtype)
            if norm else None
        )  # fmt: skip
        self.fc1 = dense(width, width, rngs, dtype)
        self.fc2 = dense(width, width, rngs, dtype)
        self.act = act

    def __call__(self, x):
        z = self.norm(x) if self.norm is not None else x
        return x + self.fc2(self.act(self.fc1(z)))


class ResMLP(nnx.Module):
    def __init__(self, d, width, depth, rngs, act=jax.nn.relu, norm=False, dtype=F64):
        self.embed = dense(d, width, rngs, dtype)
        self.blocks = nnx.List([DenseBlock(width, rngs, act, norm, dtype) for _ in range(depth)])

    def __call__(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return x


class CNN(nnx.Module):
    """Convolutions with ``padding`` each followed by ``phi``, an average pool after the
    first, then global average pooling (``head="pool"``) or a flatten (``"flatten"``)
    and a dense readout."""

    def __init__(self, c_in, width, rngs, act=jax.nn.relu, padding="SAME", head="pool",
                 size=8, dtype=F64):  # fmt: skip
        self.layers = nnx.List(
            [conv(c_in, width, rngs, padding, dtype), conv(width, width, rngs, padding, dtype),
             conv(width, width, rngs, padding, dtype)]
        )  # fmt: skip
        s = size // 2 if padding == "SAME" else (size - 2) // 2 - 4
        n = width if head == "pool" else width * s * s
        self.out = dense(n, width, rngs, dtype)
        self.act, self.head = act, head

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = self.act(layer(x))
            if i == 0:
                x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
        x = jnp.mean(x, axis=(1, 2)) if self.head == "pool" else x.reshape(x.shape[0], -1)
        return self.out(x)


class ConvBlock(nnx.Module):
    def __init__(self, width, rngs, act=jax.nn.relu, dtype=F64):
        self.c1 = conv(width, width, rngs, "SAME", dtype)
        self.c2 = conv(width, width, rngs, "SAME", dtype)
        self.act = act

    def __call__(self, x):
        return x + self.c2(self.act(self.c1(x)))


class ConvResNet(nnx.Module):
    def __init__(self, c_in, width, depth, rngs, act=jax.nn.relu, dtype=F64):
        self.stem = conv(c_in, width, rngs, "SAME", dtype)
        self.blocks = nnx.List([ConvBlock(width, rngs, act, dtype) for _ in range(depth)])
        self.out = dense(width, width, rngs, dtype)

    def __call__(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.out(jnp.mean(x, axis=(1, 2)))


class RNN(nnx.Module):
    """``h_t = tanh(W h_{t-1} + U x_t + b)`` with ``W, U`` shared over time; the readout
    of the mean over time."""

    def __init__(self, d, width, rngs, act=jnp.tanh, dtype=F64):
        self.U = dense(d, width, rngs, dtype)
        self.W = dense(width, width, rngs, dtype, use_bias=False)
        self.out = dense(width, width, rngs, dtype)
        self.act = act

    def __call__(self, x):
        h = self.act(self.U(x[:, 0]))
        hs = [h]
        for t in range(1, x.shape[1]):
            h = self.act(self.W(h) + self.U(x[:, t]))
            hs.append(h)
        return self.out(jnp.mean(jnp.stack(hs, axis=1), axis=1))


class TransformerBlock(nnx.Module):
    """Pre-LN ``x + A(LN x); x + MLP(LN x)`` or post-LN ``LN(x + A(x)); LN(x + MLP(x))``
    with ``nnx.MultiHeadAttention``; ``qk_scale`` scales the query and key kernels
    (small: the uniform-attention limit)."""

    def __init__(self, width, heads, rngs, pre=True, qk_scale=1.0, dtype=F64):
        self.attn = nnx.MultiHeadAttention(
            num_heads=heads, in_features=width, qkv_features=width, decode=False, rngs=rngs,
            param_dtype=dtype, dtype=dtype,
        )  # fmt: skip
        for lin in (self.attn.query, self.attn.key):
            lin.kernel[...] = lin.kernel[...] * qk_scale
        self.ln1 = nnx.LayerNorm(width, epsilon=1e-12, rngs=rngs, param_dtype=dtype, dtype=dtype)
        self.ln2 = nnx.LayerNorm(width, epsilon=1e-12, rngs=rngs, param_dtype=dtype, dtype=dtype)
        self.fc1 = dense(width, width, rngs, dtype)
        self.fc2 = dense(width, width, rngs, dtype)
        self.pre = pre

    def __call__(self, x):
        if self.pre:
            x = x + self.attn(self.ln1(x))
            return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.fc2(jax.nn.gelu(self.fc1(x))))


class Transformer(nnx.Module):
    def __init__(self, d, width, depth, heads, rngs, pre=True, qk_scale=1.0, dtype=F64):
        self.embed = dense(d, width, rngs, dtype)
        self.blocks = nnx.List(
            [TransformerBlock(width, heads, rngs, pre, qk_scale, dtype) for _ in range(depth)]
        )

    def __call__(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return x


def uniform_taps(model) -> None:
    """Rescale every convolution kernel of ``model`` (in place) so that each tap has the
    kernel's overall mean square: an i.i.d. Gaussian convolution's exact per-tap profile."""
    for _, m in nnx.iter_graph(model):
        if isinstance(m, nnx.Conv):
            W = m.kernel[...]
            taps = jnp.mean(W**2, axis=(-2, -1), keepdims=True)
            m.kernel[...] = W * jnp.sqrt(jnp.mean(W**2) / taps)


class _Bottleneck(nnx.Module):
    """dks's pre-activation bottleneck branch, dense: ``(phi -> Dense) x 3``; ``proj``: the
    projection a group's first block applies to its first activation on the shortcut."""

    def __init__(self, width, act, proj, rngs, dtype):
        init = initializers.get("scaled_uniform_orthogonal")
        kw = dict(use_bias=False, kernel_init=init)
        self.layers = nnx.List([dense(width, width, rngs, dtype, **kw) for _ in range(3)])
        self.proj = dense(width, width, rngs, dtype, **kw) if proj else None
        self.act = act

    def __call__(self, x):
        h = x
        for layer in self.layers:
            h = layer(self.act(h))
        return h


class DKSResNet(nnx.Module):
    """DeepMind dks's modified ResNet V2 (bottleneck, three nonlinear layers per branch, a
    projection shortcut taking the block's first activation at each group's first block,
    ``w x + sqrt(1 - w^2) f(x)`` sums, a final activation, mean pooling, a readout), dense
    and at one width, with scaled uniform orthogonal weights and no biases."""

    def __init__(self, d, width, rngs, act=jax.nn.relu, groups=(3, 4, 23, 3), w=0.6,
                 dtype=F64):  # fmt: skip
        init = initializers.get("scaled_uniform_orthogonal")
        kw = dict(use_bias=False, kernel_init=init)
        self.inp = dense(d, width, rngs, dtype, **kw)
        blocks = []
        for g in groups:
            for j in range(g):
                branch = _Bottleneck(width, act, j == 0, rngs, dtype)
                proj = None if j else _Projection(branch)
                blocks.append(networks.WeightedResidual(branch, w, shortcut=proj))
        self.blocks = nnx.List(blocks)
        self.out = dense(width, 3, rngs, dtype, **kw)
        self.act = act

    def __call__(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out(jnp.mean(self.act(x)[:, None, :], axis=1))


class _Projection(nnx.Module):
    """The projection shortcut of a group's first block: ``Dense(phi(x))``."""

    def __init__(self, branch):
        self.branch = branch

    def __call__(self, x):
        return self.branch.proj(self.branch.act(x))
