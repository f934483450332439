"""The scanned-stack representation: :class:`Stack`, :class:`StackedParam`, and the
hand-written JVP of the plain dense stack.

A network is ``output_map . (layer scanned over depth) . input_map``; the
layers' parameters carry a leading depth axis ``L`` (:class:`StackedParam`),
so the stack runs as one ``jax.lax.scan`` (see :mod:`isometry.networks`).
:func:`dense_stack` is that scan for ``x^l = phi(x^{l-1} W^l + b^l)`` (optionally
residual), differentiated by a JVP that takes the weight tangents out of the scan.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

__all__ = [
    "Stack",
    "StackedBatchStat",
    "StackedParam",
    "dense_stack",
    "identity",
    "scan_collect",
]

Array = jax.Array


class StackedParam(nnx.Param):
    """A parameter of the scanned stack: leading axis ``L``, layer ``l``'s slice ``[l]``.

    The type declares the layout, so tools that need per-layer numbers
    (per-layer gradient norms in :mod:`isometry.training`, signal statistics)
    select these with ``nnx.state(model, StackedParam)`` instead of guessing
    from names or shapes. Everything else (input map, readout) is a plain
    ``nnx.Param``. Optimizers see it as an ``nnx.Param``.
    """


class StackedBatchStat(nnx.BatchStat):
    """Batch-norm running statistics of the scanned stack, leading axis ``L``."""


def identity(x):
    """The identity map (the default input and output map of a :class:`Stack`)."""
    return x


@dataclasses.dataclass(frozen=True)
class Stack:
    """A network as ``output_map . (layer scanned over depth) . input_map``.

    Attributes:
        step: ``step(params_l, x, probe) -> (x_next, aux)``; ``probe`` (or
            ``None``) is added to the pre-activation; ``aux`` is a dict of
            per-layer intermediates (``"preact"``, ``"post"``, ``"branch"``;
            any subset).
        params: the stacked layer parameters, every leaf with leading axis ``L``.
        input_map: ``u -> x^0`` (closes over its own parameters).
        output_map: ``x^L -> y``.
        weights: the keys of ``params`` that hold the layers' weight
            matrices (``W^l``, convolution kernels), e.g. ``("kernel",)``;
            ``()`` (the default) means every leaf of ``params`` counts as
            weights. Per-layer weight-gradient norms
            (:func:`isometry.signal.measure`) sum over these.
    """

    step: Callable[[Any, Array, Array | None], tuple[Array, dict]]
    params: Any
    input_map: Callable[[Array], Array] = identity
    output_map: Callable[[Array], Array] = identity
    weights: tuple[str, ...] = ()

    @classmethod
    def from_layer(
        cls,
        layer: Callable[[Any, Array], Array],
        params: Any,
        input_map: Callable[[Array], Array] = identity,
        output_map: Callable[[Array], Array] = identity,
    ) -> Stack:
        """Wrap any ``layer(params_l, x) -> x`` (parameters stacked on axis 0).

        With no visible pre-activation, the probe is added to the layer's
        output, so "pre-activation" statistics are those of ``x^l``.
        """
        if not callable(layer):
            raise TypeError(f"layer must be callable, got {type(layer).__name__}")
        return cls(functools.partial(_probe_output, layer), params, input_map, output_map)

    @property
    def depth(self) -> int:
        """``L``, the leading axis of the stacked parameters."""
        leaves = jax.tree.leaves(self.params)
        if not leaves:
            raise ValueError("Stack.params has no array leaves, so no depth")
        return int(jnp.shape(leaves[0])[0])

    def weight_params(self, params=None):
        """The weight part of ``params`` (default: the stack's): the leaves named in
        :attr:`weights`, or all of ``params`` when none are declared."""
        params = self.params if params is None else params
        if not self.weights:
            return params
        missing = [k for k in self.weights if k not in params]
        if missing:
            raise ValueError(f"Stack.weights names {missing}, not among the params {list(params)}")
        return {k: params[k] for k in self.weights}

    def layer(self, params_l, x: Array) -> Array:
        """One hidden layer ``x^{l-1} -> x^l`` (pure; scan it over ``params``)."""
        return self.step(params_l, x, None)[0]

    def hidden(self, x0: Array) -> Array:
        """``x^L`` from the stack's input ``x^0`` (one ``lax.scan``)."""
        return lax.scan(lambda x, p: (self.layer(p, x), None), x0, self.params)[0]

    def hidden_states(self, x0: Array) -> Array:
        """``x^1..x^L`` stacked, shape ``(L, *x0.shape)``."""
        return lax.scan(lambda x, p: (self.layer(p, x),) * 2, x0, self.params)[1]

    def __call__(self, u: Array) -> Array:
        """The whole network: ``output_map(hidden(input_map(u)))``."""
        return self.output_map(self.hidden(self.input_map(u)))


def _probe_output(layer, params_l, x, probe):
    y = layer(params_l, x)
    return (y if probe is None else y + probe), {}


# --------------------------------------------------------------------------- #
# The plain dense stack, differentiated with the weight tangents out of the scan.
# --------------------------------------------------------------------------- #


def scan_collect(step, params, x0):
    """``(x^L, aux)``: ``step(params_l, x, None)`` scanned over the stacked ``params``."""
    return lax.scan(lambda x, p: step(p, x, None), x0, params)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def dense_stack(step, phi, alpha, x0, params):
    """``x^L`` of a plain dense stack ``x^l = phi(x^{l-1} W^l + b^l)`` (with ``alpha``:
    ``x^{l-1} + alpha phi(...)``): the generic scan of ``step``; only its JVP differs.

    The JVP (:func:`_dense_stack_jvp`) takes the weight tangents out of the
    scan, so reverse mode computes every ``dW^l = x^{l-1 T} g^l`` in one
    batched contraction after the backward scan instead of one small matmul
    per layer inside it (measured in ``benchmarks/bench_training.py``).
    """
    return scan_collect(step, params, x0)[0]


def _is_zero(t) -> bool:
    return isinstance(t, jax.custom_derivatives.SymbolicZero)


def _weight_tangents(xs, params, dparams):
    """``u^l = x^{l-1} dW^l + db^l`` for every layer at once (``None`` if both are zero)."""
    u = None
    if not _is_zero(dparams["kernel"]):
        u = jnp.einsum("l...i,lij->l...j", xs, dparams["kernel"])
    if "bias" in params and not _is_zero(dparams["bias"]):
        db = dparams["bias"]  # (L, N), broadcast over the batch axes of x
        db = db.reshape(db.shape[:1] + (1,) * (xs.ndim - 2) + db.shape[1:])
        u = db if u is None else u + db
    return u


def _dense_stack_jvp(step, phi, alpha, primals, tangents):
    """The forward scan of ``step``, saving ``x^{l-1}`` and ``phi'(h^l)``; the tangent
    ``dx^l = D^l (dx^{l-1} W^l + u^l)`` (plus ``dx^{l-1}`` for residual stacks) is a
    second scan whose only matmul is ``dx W``; ``u`` comes from :func:`_weight_tangents`."""
    (x0, params), (dx0, dparams) = primals, tangents

    def forward(x, p):
        x_next, aux = step(p, x, None)
        h = aux["preact"]
        return x_next, (x, jax.jvp(phi, (h,), (jnp.ones_like(h),))[1])

    def tangent(dx, inputs):
        w, d, u = inputs
        da = d * (dx @ w if u is None else dx @ w + u)
        return (da if alpha is None else dx + alpha * da), None

    xL, (xs, ds) = lax.scan(forward, x0, params)
    u = _weight_tangents(xs, params, dparams)
    dx0 = jnp.zeros_like(x0) if _is_zero(dx0) else dx0
    return xL, lax.scan(tangent, dx0, (params["kernel"], ds, u))[0]


dense_stack.defjvp(_dense_stack_jvp, symbolic_zeros=True)
