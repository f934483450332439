"""The one evaluator: mean loss and accuracy of a model over a whole split.

The split is cut into chunks of ``batch_size`` rows; the last chunk is
padded with zeros and masked, so every split of a dataset runs one compiled
function (jitted once per model structure, loss and chunk shape). Losses
(:func:`per_example_loss`):

    cross_entropy:  l_i = -log softmax(f(x_i))_{y_i},   correct_i = [argmax f(x_i) = y_i]
    mse:            l_i = 0.5 mean_j (f(x_i)_j - y_ij)^2

A non-finite per-example loss counts as ``+inf`` (a diverged model has
infinite loss, never NaN).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from isometry import networks, validate

__all__ = [
    "LOSSES", "evaluate", "evaluate_state", "on_device", "per_example_loss", "split_for_jit",
]  # fmt: skip

LOSSES = ("cross_entropy", "mse")


def per_example_loss(kind: str, out: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(loss (B,), correct (B,))`` of outputs ``out (B, ...)`` against targets ``y``.

    ``cross_entropy``: softmax cross-entropy on integer labels ``y (B,)``
    (computed in float32) and 0/1 correctness; ``mse``: ``0.5`` times the
    mean squared error per example, correctness 0.
    """
    if kind == "cross_entropy":
        per = optax.softmax_cross_entropy_with_integer_labels(out.astype(jnp.float32), y)
        correct = (jnp.argmax(out, -1) == y).astype(jnp.float32)
    else:
        per = 0.5 * jnp.mean(jnp.square(out - y).reshape(out.shape[0], -1), axis=-1)
        correct = jnp.zeros_like(per)
    return per, correct


@functools.partial(jax.jit, static_argnames=("graphdef", "loss"))
def _chunk_sums(graphdef, states, xb, yb, mask, loss):
    """Summed loss and number correct over the rows of one chunk where ``mask`` is set."""
    per, correct = per_example_loss(loss, nnx.merge(graphdef, *states)(xb), yb)
    per = jnp.where(jnp.isfinite(per), per, jnp.inf)
    return jnp.sum(jnp.where(mask, per, 0.0)), jnp.sum(jnp.where(mask, correct, 0.0))


def on_device(a, dtype) -> jax.Array:
    """``a`` as a device array; floating arrays in ``dtype`` (labels keep their integer type)."""
    a = np.asarray(a) if not isinstance(a, jax.Array) else a
    return jnp.asarray(a, dtype) if jnp.issubdtype(a.dtype, jnp.floating) else jnp.asarray(a)


def split_for_jit(model: nnx.Module, *filters):
    """``nnx.split(model, *filters)``, the graph definition holding the
    :func:`isometry.networks.forward_config` of each toolkit network config in the model
    (the model's own ``config`` and its submodules') in place of the config.

    The jitted train step and evaluator are keyed on the graph definition; with the
    initialization options out of it, runs that differ only in them (the points of a
    sweep over ``sigma_w2``) share one compiled function. Merging the graph definition
    gives a model that computes the same function with configs whose initialization
    options are the defaults; ``model`` itself is left as it was. Models without a
    toolkit config split as they are.
    """
    swapped = []
    try:
        for _, module in nnx.iter_modules(model):
            cfg = getattr(module, "config", None)
            fwd = networks.forward_config(cfg)
            if fwd is not cfg:
                swapped.append((module, cfg))
                module.config = fwd
        return nnx.split(model, *filters)
    finally:
        for module, cfg in swapped:
            module.config = cfg


def _float_dtype(states):
    for leaf in jax.tree.leaves(states):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.dtype
    return jnp.result_type(float)


def evaluate_state(
    graphdef, states: tuple, x, y, *, loss: str = "cross_entropy", batch_size: int = 512
) -> dict[str, float]:
    """``{"loss", "accuracy"}``: means over all ``n`` rows of ``x (n, *in)``, ``y (n, ...)``.

    ``nnx.merge(graphdef, *states)`` is the model (split in the mode to
    evaluate in, e.g. evaluation mode); inputs (and regression targets) are
    cast to its floating dtype. Chunks of ``batch_size`` rows, the last one
    zero-padded and masked.
    """
    validate.choice("loss", loss, LOSSES)
    validate.positive_int("batch_size", batch_size)
    n, b = x.shape[0], batch_size
    dtype = _float_dtype(states)
    tot_loss = tot_correct = 0.0
    for i in range(0, n, b):
        xb, yb = on_device(x[i : i + b], dtype), on_device(y[i : i + b], dtype)
        m = xb.shape[0]
        if m < b:
            xb = jnp.pad(xb, [(0, b - m)] + [(0, 0)] * (xb.ndim - 1))
            yb = jnp.pad(yb, [(0, b - m)] + [(0, 0)] * (yb.ndim - 1))
        mask = jnp.arange(b) < m
        sl, sc = _chunk_sums(graphdef, tuple(states), xb, yb, mask, loss)
        tot_loss += float(sl)
        tot_correct += float(sc)
    return {"loss": tot_loss / n, "accuracy": tot_correct / n}


def evaluate(
    model: nnx.Module, x, y, *, loss: str = "cross_entropy", batch_size: int = 512
) -> dict[str, float]:
    """``{"loss", "accuracy"}`` of ``model`` in evaluation mode on ``x, y`` (see
    :func:`evaluate_state`); the model is left in training mode. Split as the training
    loop splits it, so after :func:`isometry.training.train` the same compiled
    evaluator serves (for the same ``batch_size``)."""
    model.eval()
    graphdef, *states = split_for_jit(model, nnx.Param, nnx.BatchStat, ...)  # as the loop
    model.train()
    return evaluate_state(graphdef, tuple(states), x, y, loss=loss, batch_size=batch_size)
