"""The training state, the jitted train step, per-layer gradient norms, the non-finite guard.

The train step is one jitted function of ``(graphdef, params, batch_stats,
optimizer state)`` (``nnx.split``), with the state donated; it runs on CPU
and GPU unchanged. Logged per step: ``loss``, ``accuracy`` (of the batch,
before the update), ``lr``, ``grad_norm`` (global norm before clipping),
``grad_norm_clipped`` (after), ``clipped``, ``clip_ratio`` (after / before),
``grad_norm_input``, ``grad_norm_output`` and ``grad_norm_layers`` (the
``L`` per-layer gradient norms of the stack, :func:`layer_grad_norms`).

The per-layer norms and the clipped norm are computed at log steps only
(``log=True``; one compiled function, a ``lax.cond``); the guard runs at
every step.

A step whose loss, gradient or update is non-finite (or any step after one)
leaves the state unchanged and records its index in ``bad_step``; the loop
then stops with :class:`NonFiniteError`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from isometry import validate
from isometry.training.evaluation import LOSSES, per_example_loss, split_for_jit
from isometry.training.optim import stacked_mask

__all__ = [
    "OUTPUT_PARAMS",
    "NonFiniteError",
    "init_state",
    "jit_graphdefs",
    "layer_grad_norms",
    "make_train_step",
]

OUTPUT_PARAMS = ("readout", "readout_bias")
"""Top-level names of the output map's parameters (:class:`isometry.networks.MLP`, ConvNet)."""


class NonFiniteError(FloatingPointError):
    """The loss, gradient or update became NaN/Inf; ``step`` is the update that failed."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def _top_key(path) -> str:
    k = path[0]
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def layer_grad_norms(grads) -> dict[str, jax.Array]:
    """Gradient norms of the input map, each stacked layer, and the readout.

    Returns ``{"input": (), "layers": (L,), "output": ()}``: ``layers[l] =
    ||dLoss/dtheta^l||`` over the variables of type
    :class:`~isometry.networks.StackedParam` (leading axis ``L``; ``(0,)``
    when there are none), ``output`` over the variables named in
    :data:`OUTPUT_PARAMS`, ``input`` over all others.
    """
    mask = stacked_mask(grads)
    flags = jax.tree.leaves(jax.tree.map(lambda s, v: jax.tree.map(lambda _: s, v), mask, grads))
    leaves = jax.tree_util.tree_flatten_with_path(grads)[0]
    depths = {jnp.shape(g)[0] for (_, g), s in zip(leaves, flags, strict=True) if s}
    depth = depths.pop() if depths else 0
    if depths:
        raise ValueError("the StackedParam variables of a model must share their leading axis")
    sq_in = sq_out = jnp.zeros(())
    sq_layers = jnp.zeros((depth,))
    for (path, g), stacked in zip(leaves, flags, strict=True):
        g = jnp.asarray(g, jnp.float32)
        if stacked:
            sq_layers = sq_layers + jnp.sum((g * g).reshape(depth, -1), axis=1)
        elif _top_key(path) in OUTPUT_PARAMS:
            sq_out = sq_out + jnp.sum(g * g)
        else:
            sq_in = sq_in + jnp.sum(g * g)
    return {"input": jnp.sqrt(sq_in), "layers": jnp.sqrt(sq_layers), "output": jnp.sqrt(sq_out)}


def _graphdefs(model: nnx.Module, split=nnx.split):
    """``(train graphdef, eval graphdef, state dict)``; the model is left in training mode."""
    model.eval()
    g_eval = split(model, nnx.Param, nnx.BatchStat, ...)[0]
    model.train()
    g_train, params, stats, rest = split(model, nnx.Param, nnx.BatchStat, ...)
    return g_train, g_eval, {"params": params, "batch_stats": stats, "rest": rest}


def jit_graphdefs(model: nnx.Module):
    """``(train graphdef, eval graphdef)`` for the jitted step and evaluator: those of
    :func:`init_state` with a toolkit network's initialization options out of its config
    (:func:`isometry.training.evaluation.split_for_jit`), so runs that differ only in them
    share the compiled functions."""
    return _graphdefs(model, split_for_jit)[:2]


def init_state(model: nnx.Module, tx: optax.GradientTransformation):
    """``(graphdef_train, graphdef_eval, state)``: the training state as one pytree.

    ``state = {"params", "batch_stats", "rest", "opt_state", "bad_step"}``;
    ``bad_step`` is ``-1``, or the 0-based index of the first non-finite step.
    """
    g_train, g_eval, s = _graphdefs(model)
    s["opt_state"] = tx.init(s["params"])
    s["bad_step"] = jnp.asarray(-1, jnp.int32)
    return g_train, g_eval, s


def _guard(new: dict, state: dict, finite, step) -> dict:
    """``new`` where ``finite`` and no earlier step failed, else ``state``; ``bad_step`` set."""
    ok = finite & (state["bad_step"] < 0)
    old = {k: state[k] for k in new}
    out = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    out["bad_step"] = jnp.where(
        state["bad_step"] >= 0, state["bad_step"], jnp.where(finite, -1, step)
    ).astype(jnp.int32)
    return out


def _diagnostics(grads, params, clip_tx, g_norm) -> dict:
    """The log-step-only metrics: the clipped norm and the per-layer gradient norms."""
    clipped, _ = clip_tx.update(grads, clip_tx.init(params), params)
    c_norm = optax.tree.norm(clipped)
    norms = layer_grad_norms(grads)
    return {
        "grad_norm_clipped": c_norm,
        "clipped": c_norm < g_norm * (1 - 1e-6),
        "clip_ratio": c_norm / jnp.maximum(g_norm, 1e-30),
        "grad_norm_input": norms["input"],
        "grad_norm_output": norms["output"],
        "grad_norm_layers": norms["layers"],
    }


def _step_metrics(value, acc, lr, g_norm, grads, params, clip_tx, log) -> dict:
    """The step's metrics; the diagnostics (:func:`_diagnostics`) only where ``log``, else zeros."""
    diag = functools.partial(_diagnostics, clip_tx=clip_tx, g_norm=g_norm)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(diag, grads, params))
    extra = jax.lax.cond(log, diag, lambda *_: zeros, grads, params)
    return {
        "loss": value,
        "accuracy": acc,
        "lr": jnp.asarray(lr, jnp.float32),
        "grad_norm": g_norm,
        **extra,
    }


def make_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    clip_tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    *,
    loss: str = "cross_entropy",
):
    """The jitted train step ``(state, x_all, y_all, idx, step, log=True) -> (state, metrics)``.

    ``x_all (n, *in)``, ``y_all (n, ...)`` stay on the device; ``idx (B,)``
    selects the batch. ``state`` is donated. ``clip_tx`` is the clipping part
    of ``tx``, re-applied to measure the clipped norm (stateless). A step
    whose loss, gradient or update is non-finite (or any step after one)
    leaves the state unchanged and records its index in ``bad_step``.

    ``log`` (a traced bool) selects the diagnostics: where it is false the
    clipped norm and the per-layer gradient norms are skipped (one
    ``lax.cond``, one compilation) and read as zeros; the state and the other
    metrics are bit-identical either way. The loop passes ``log`` true at its
    log steps only.
    """
    validate.choice("loss", loss, LOSSES)

    def loss_fn(params, stats, rest, x, y):
        model = nnx.merge(graphdef, params, stats, rest, copy=True)
        per, correct = per_example_loss(loss, model(x), y)
        _, _, new_stats, new_rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
        return jnp.mean(per), (jnp.mean(correct), new_stats, new_rest)

    def step_fn(state, x_all, y_all, idx, step, log=True):
        x, y = x_all[idx], y_all[idx]
        p = state["params"]
        (value, (acc, stats, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            p, state["batch_stats"], state["rest"], x, y
        )
        g_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], p)
        new = {
            "params": optax.apply_updates(p, updates),
            "batch_stats": stats,
            "rest": rest,
            "opt_state": opt_state,
        }
        finite = jnp.isfinite(value) & jnp.isfinite(g_norm) & jnp.isfinite(optax.tree.norm(updates))
        out = _guard(new, state, finite, step)
        metrics = _step_metrics(value, acc, lr_schedule(step), g_norm, grads, p, clip_tx, log)
        return out, metrics

    return jax.jit(step_fn, donate_argnums=0)
