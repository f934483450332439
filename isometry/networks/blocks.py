"""Building blocks for a researcher's own NNX model: the weighted residual block of DKS/TAT.

``WeightedResidual(branch, shortcut_weight=w)`` computes

    y = w s(x) + sqrt(1 - w^2) f(x)

with ``f`` the residual branch and ``s`` the identity (or a projection): when the
branch ends in a fresh linear layer of variance 1, the two terms are uncorrelated
over the weights, so ``q_y = w^2 q_s + (1 - w^2) q_f`` stays 1 and the cosine of two
inputs is the weighted average ``w^2 c_s + (1 - w^2) c_f``: the normalized sum of
Martens et al. 2021 (section 5; dks's modified ResNet, ``shortcut_weight``) that
``isometry.shaping.subnet_max_func`` reads off a model. ``w = 0`` is the branch
alone; ``w = 1`` the shortcut alone.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from isometry import activations, initializers, validate

__all__ = ["WeightedResNet", "WeightedResidual"]


class WeightedResidual(nnx.Module):
    """``w shortcut(x) + sqrt(1 - w^2) branch(x)`` (see the module docstring).

    Args:
        branch: the residual branch, any callable (an ``nnx.Module``: its parameters are
            the block's).
        shortcut_weight: ``w`` in ``[0, 1]``.
        shortcut: a projection applied on the shortcut path (``None``: identity).

    Shapes: ``branch(x)`` and ``shortcut(x)`` must have the same shape.
    """

    def __init__(self, branch, shortcut_weight: float, shortcut=None):
        validate.real_array("shortcut_weight", shortcut_weight, minimum=0.0, maximum=1.0)
        self.branch = branch
        self.shortcut = shortcut
        self.shortcut_weight = float(shortcut_weight)

    def __call__(self, x):
        w = self.shortcut_weight
        s = x if self.shortcut is None else self.shortcut(x)
        return w * s + math.sqrt(1.0 - w * w) * self.branch(x)


class WeightedResNet(nnx.Module):
    """A dense residual network of weighted blocks, DKS/TAT's ResNet without convolutions:

        x^0 = E u,   x^b = w x^{b-1} + sqrt(1 - w^2) f_b(x^{b-1})  (b = 1..blocks),   y = R phi(x^B)

    with the branch ``f_b = (Dense o norm o phi)^k`` (``k = branch_layers``; pre-activation,
    as dks's ResNet V2), ``norm`` the identity or batch norm (``norm="batch"``: the
    normalized baseline), the blocks' parameters stacked and run by ``nnx.scan`` (compile
    time does not grow with depth; the theory engine unrolls it), weights scaled uniform
    orthogonal (:func:`isometry.initializers.get` ``("suo")``), zero-initialized biases;
    ``E`` is a dense input map (so that the first activation sees a Gaussian field, as after
    dks's initial convolution).
    ``blocks * branch_layers + 1`` nonlinear layers lie on the longest path.

    Args:
        in_dim: the input's features.
        width: ``N``, the hidden width.
        blocks: the number of residual blocks ``B >= 1``.
        activation: an activation (a catalog name, a shaped one) or any callable.
        out_dim: the readout's width.
        shortcut_weight: ``w`` in ``[0, 1]``.
        branch_layers: ``k >= 1``.
        norm: ``"none"`` or ``"batch"``.
        rngs: ``nnx.Rngs``.
        dtype: parameter and computation dtype.
    """

    def __init__(
        self,
        in_dim: int,
        width: int,
        blocks: int,
        activation,
        out_dim: int,
        *,
        shortcut_weight: float = 0.8,
        branch_layers: int = 2,
        norm: str = "none",
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        validate.positive_int("in_dim", in_dim)
        validate.positive_int("width", width)
        validate.positive_int("blocks", blocks)
        validate.positive_int("branch_layers", branch_layers)
        validate.choice("norm", norm, ("none", "batch"))
        self.act = activations.get(activation) if isinstance(activation, str) else activation
        kw = dict(kernel_init=initializers.get("suo"), param_dtype=dtype, dtype=dtype)
        self.embed = nnx.Linear(in_dim, width, **kw, rngs=rngs)

        @nnx.split_rngs(splits=blocks)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            branch = _Branch(width, branch_layers, self.act, norm, kw, rngs)
            return WeightedResidual(branch, shortcut_weight)

        self.blocks = make(rngs)  # parameters stacked over the blocks (leading axis)
        self.readout = nnx.Linear(width, out_dim, **kw, rngs=rngs)

    def __call__(self, u):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def step(x, block):
            return block(x)

        return self.readout(self.act(step(self.embed(u), self.blocks)))


class _Branch(nnx.Module):
    """``(Dense o norm o phi)^k``."""

    def __init__(self, width, k, act, norm, kw, rngs):
        self.layers = nnx.List([nnx.Linear(width, width, **kw, rngs=rngs) for _ in range(k)])
        bn = dict(param_dtype=kw["param_dtype"], dtype=kw["dtype"], rngs=rngs)
        self.norms = nnx.List(
            [nnx.BatchNorm(width, **bn) for _ in range(k)] if norm == "batch" else []
        )
        self.act = act

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(self.act(self.norms[i](x) if len(self.norms) else x))
        return x
