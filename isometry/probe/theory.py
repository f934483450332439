"""The probe's mean-field prediction: :func:`theory`, matched to :class:`ProbeSignal` fields.

Where the mean-field theory of :mod:`isometry.signal` covers a model (a
toolkit ``networks.MLP``/``ConvNet``, or cut points that are square
``nnx.Linear`` layers of a plain or residual dense network), :func:`theory`
gives its per-block curves under the names of the measured fields.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from isometry import cuts
from isometry import signal as _signal
from isometry.cuts import ProbeError, is_stack

__all__ = ["theory"]

Array = jax.Array


def _dense_layer(block, residual: bool):
    if isinstance(block, nnx.Linear) and not residual:
        return block
    found = [m for _, m in cuts.walk(block) if isinstance(m, nnx.Linear)] if residual else []
    return found[0] if len(found) == 1 else None


def theory(model, x, *, activation=None, at=None, residual_scale: float | None = None) -> dict:
    """Mean-field curves (:func:`isometry.signal.theory`) matched to :class:`ProbeSignal` fields.

    Covered: cut points that are square ``nnx.Linear`` layers of a plain
    dense network ``x^l = phi(W^l x^{l-1} + b^l)`` (the cut output is the
    pre-activation ``h^l``), or, with ``residual_scale=alpha``, blocks
    ``x^l = x^{l-1} + alpha phi(W^l x^{l-1} + b^l)`` holding one square
    ``nnx.Linear`` each (the cut output is ``x^l``). ``sigma_w2 = N mean(W^2)``
    and ``sigma_b2 = mean(b^2)`` are read off the layers, ``p^0, c^0, m^0`` off
    the first block's input for the batch ``x``; ``activation`` names ``phi``.

    A toolkit ``networks.MLP``/``ConvNet`` (:func:`is_stack`) needs no
    ``activation``: the curves are :func:`isometry.signal.model_theory`'s
    (``q^l``, ``c^l``, ``grad_preact_sq``, ``grad_weight_sq`` as ``mean_sq``,
    ``pair_cosine``, ``grad_out_sq``, ``grad_kernel_sq``) at the cut layers;
    it raises for normalizations without a theory (batch norm).

    Returns:
        a dict of ``(K,)`` arrays named like :class:`ProbeSignal` fields:
        ``mean_sq`` and ``pair_cosine`` (``q^l``, ``c^l``; plain only) and
        ``grad_out_sq`` (``||dLoss/dh^l||^2`` plain, ``||dLoss/dx^l||^2``
        residual, relative to the last block), plus ``"theory"``, the
        :class:`isometry.signal.Theory`.

    Raises:
        ProbeError: the cut points are not such layers (no theory here).
    """
    if is_stack(model):
        return _stack_theory(model, x, at)
    if activation is None:
        raise ProbeError("probe.theory: pass activation= (the name of the blocks' nonlinearity)")
    paths = cuts.resolve(model, at)
    residual = residual_scale is not None
    layers = [_dense_layer(cuts.lookup(model, p), residual) for p in paths]
    ok = all(m is not None and m.in_features == m.out_features for m in layers)
    if not ok or len({m.in_features for m in layers}) != 1:
        raise ProbeError(
            "probe.theory covers plain dense networks cut at square nnx.Linear layers of one "
            "width, or residual blocks (residual_scale=...) holding one such layer; "
            f"not the cut points {list(paths)}"
        )
    N = layers[0].in_features
    sw = jnp.mean(jnp.stack([N * jnp.mean(m.kernel[...] ** 2) for m in layers]))
    sb = jnp.mean(jnp.stack([_bias_sq(m) for m in layers]))
    _, x, graphdef, params, rest, _ = cuts.prepare(model, x, paths)
    x0 = cuts.capture(graphdef, (params, rest), paths, x)[0][0]
    p0, c0, m0 = jnp.mean(x0**2), _signal.pair_cosine(x0), jnp.mean(x0)
    th = _signal.theory(
        activation, sw, sb, len(paths), p0, jnp.where(jnp.isnan(c0), 0.0, c0),
        m0=m0, residual_scale=residual_scale,
    )  # fmt: skip
    if residual:
        return {"grad_out_sq": th.grad_state_sq / th.grad_state_sq[-1], "theory": th}
    return {"mean_sq": th.q, "pair_cosine": th.c, "grad_out_sq": th.grad_preact_sq, "theory": th}


def _bias_sq(m) -> Array:
    return jnp.zeros(()) if m.bias is None else jnp.mean(m.bias[...] ** 2)


def _stack_theory(model, x, at) -> dict:
    """:func:`theory` of a toolkit stack: :func:`isometry.signal.model_theory` at its layers."""
    _, idx, x, _ = cuts.prepare_stack(model, x, at)
    try:
        th = _signal.model_theory(model, x)
    except ValueError as err:
        raise ProbeError(f"probe.theory: {err}") from None
    sel = jnp.asarray(idx)
    return {
        "mean_sq": th.q[sel],
        "pair_cosine": th.c[sel],
        "grad_out_sq": th.grad_preact_sq[sel],
        "grad_kernel_sq": th.grad_weight_sq[sel],
        "theory": th,
    }
