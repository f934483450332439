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

from flax import nnx

from isometry import validate

__all__ = ["WeightedResidual"]


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
