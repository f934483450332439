"""The probe's signal propagation: per-block forward statistics and squared gradient norms.

:func:`signal` measures any Flax NNX model at its cut points in one forward
and one backward pass (the fields are defined in :mod:`isometry.probe`);
the toolkit's scanned stacks (``networks.MLP``/``ConvNet``) are measured by
:func:`isometry.signal.measure` at their layers. :func:`position_cosine` is
the rank-collapse statistic of one block output.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp

from isometry import cuts, validate
from isometry import signal as _signal
from isometry.cuts import ProbeError, is_stack

__all__ = ["BACKWARD", "FORWARD", "ProbeSignal", "position_cosine", "signal"]

Array = jax.Array

FORWARD = ("mean_sq", "chan_sq_mean", "chan_var", "branch_var", "pair_cosine", "position_cosine")
"""The forward statistics of :class:`ProbeSignal`, in the order of its fields."""
BACKWARD = ("grad_out_sq", "grad_param_sq", "grad_kernel_sq")
"""Its squared gradient norms per block."""


@partial(
    jax.tree_util.register_dataclass,
    data_fields=[*FORWARD, *BACKWARD, "grad_input_sq", "loss"],
    meta_fields=["paths", "shapes"],
)
@dataclasses.dataclass(frozen=True)
class ProbeSignal:
    """Per-block statistics ``(K,)`` for the ``K`` cut points ``paths`` (module docstring).

    ``shapes``: the blocks' output shapes ``(B, ...)``; ``grad_input_sq``:
    ``||dLoss/dx||_F^2`` at the model input; ``loss``: its value.
    """

    mean_sq: Array
    chan_sq_mean: Array
    chan_var: Array
    branch_var: Array
    pair_cosine: Array
    position_cosine: Array
    grad_out_sq: Array
    grad_param_sq: Array
    grad_kernel_sq: Array
    grad_input_sq: Array
    loss: Array
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def rows(self) -> list[dict]:
        """One dict of Python numbers per block (for tables and JSON)."""
        fields = (*FORWARD, *BACKWARD)
        return [
            {"block": p, **{f: float(getattr(self, f)[i]) for f in fields}}
            for i, p in enumerate(self.paths)
        ]


def position_cosine(y: Array) -> Array:
    """Mean cosine between distinct positions of one example, averaged over examples.

    ``y (B, *positions, C)``: the ``T = prod(positions)`` vectors of length ``C``
    of each example; ``(sum_{s != t} cos(y_s, y_t)) / (T (T - 1))``. NaN when
    there is no position axis or ``T < 2``. Values near 1: rank collapse of
    the tokens (Dong, Cordonnier & Loukas 2021; Noci et al. 2022).
    """
    if y.ndim < 3 or math.prod(y.shape[1:-1]) < 2:
        return jnp.full((), jnp.nan, y.dtype)
    f = y.reshape(y.shape[0], -1, y.shape[-1])
    norm = jnp.linalg.norm(f, axis=-1, keepdims=True)
    u = f / jnp.maximum(norm, jnp.finfo(f.dtype).tiny)  # a zero vector has cosine 0
    s = jnp.sum(jnp.sum(u, axis=1) ** 2, axis=-1)  # sum over s, t of cos, per example
    T = f.shape[1]
    return jnp.mean((s - T) / (T * (T - 1)))


def _block_stats(y: Array, branch) -> dict:
    sq_mean, var = _signal.channel_stats(y)
    nan = jnp.full((), jnp.nan, y.dtype)
    return {
        "mean_sq": jnp.mean(y**2),
        "chan_sq_mean": sq_mean,
        "chan_var": var,
        "branch_var": nan if branch is None else _signal.channel_stats(branch)[1],
        "pair_cosine": _signal.pair_cosine(y),
        "position_cosine": position_cosine(y),
    }


def _sub_state(state, path: str):
    cur = state
    for part in path.split("."):
        key = int(part) if part.isdigit() else part
        try:
            cur = cur[key]
        except (KeyError, IndexError, TypeError):
            return None
    return cur


def _param_sq(grads, path: str) -> tuple[Array, Array]:
    leaves = jax.tree.leaves(_sub_state(grads, path)) if _sub_state(grads, path) else []
    zero = jnp.zeros(())
    total = sum((jnp.sum(g**2) for g in leaves), zero)
    kernels = sum((jnp.sum(g**2) for g in leaves if g.ndim >= 2), zero)
    return total, kernels


def _loss_fn(loss, key, y_shape):
    if loss is None:
        if key is None:
            raise ProbeError("probe.signal: pass loss, or key for the random-projection loss")
        return _signal.random_projection_loss(key, y_shape.shape, y_shape.dtype)
    if not callable(loss):
        raise TypeError(f"loss must be callable, got {type(loss).__name__}")
    return loss


def signal(model, x, *, at=None, loss: Callable | None = None, key=None) -> ProbeSignal:
    """Forward statistics and squared gradient norms per cut point (one forward/backward pass).

    The whole pass is compiled as one program (also when called under the
    user's ``jax.jit``). A toolkit ``networks.MLP``/``ConvNet`` is measured by
    :func:`isometry.signal.measure` (two backward passes: kernels alone and
    every parameter); see :mod:`isometry.probe` for its fields.

    Args:
        model: any ``flax.nnx.Module``, left unmodified.
        x: a batch of model inputs ``(B, ...)`` (pairs ``(0, 1), (2, 3), ...``
            for ``pair_cosine``), cast to the model's parameter dtype.
        at: cut points (module paths); default :func:`blocks`.
        loss: ``loss(model(x)) -> scalar``; default the random projection
            ``sum_a <v_a, y_a> / B`` with ``v ~ N(0, 1)`` drawn from ``key``.
        key: PRNG key of the random projection.

    Returns:
        a :class:`ProbeSignal`.

    Raises:
        ProbeError: unknown path in ``at`` (lists the available ones), blocks
            not discoverable, ``x`` not of the model's input shape, a NaN or
            inf in ``x`` (names the first example holding one), or a
            non-finite statistic (names the first block where it appears).
    """
    result, has_branch = cuts.compiled(_signal_impl, model, x, key, at=at, loss=loss)
    _check_finite_signal(result, has_branch)
    return result


def _signal_impl(model, x, key, *, at, loss) -> tuple[ProbeSignal, Array]:
    """:func:`signal` and whether each block exposes a residual branch."""
    if is_stack(model):
        return _stack_signal(model, x, at, loss, key)
    paths, x, graphdef, params, rest, (y_shape, out_shapes) = cuts.prepare(model, x, at)
    loss_fn = _loss_fn(loss, key, y_shape)
    deltas = [jnp.zeros(s.shape, s.dtype) for s in out_shapes]

    def f(params, deltas, x):
        y, rec = cuts.tapped_call(graphdef, (params, rest), paths, x, deltas, want_branch=True)
        return loss_fn(y), (rec.outputs, rec.branch)

    grad = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)
    (value, (outs, branch)), (g_params, g_out, g_x) = grad(params, deltas, x)
    stats = [_block_stats(y, b) for y, b in zip(outs, branch, strict=True)]
    p_sq = [_param_sq(g_params, p) for p in paths]
    result = ProbeSignal(
        **{k: jnp.stack([s[k] for s in stats]) for k in FORWARD},
        grad_out_sq=jnp.stack([jnp.sum(g**2) for g in g_out]),
        grad_param_sq=jnp.stack([t for t, _ in p_sq]).astype(value.dtype),
        grad_kernel_sq=jnp.stack([k for _, k in p_sq]).astype(value.dtype),
        grad_input_sq=jnp.sum(g_x**2),
        loss=value,
        paths=paths,
        shapes=tuple(tuple(y.shape) for y in outs),
    )
    return result, jnp.asarray([b is not None for b in branch])


def _check_finite_signal(result: ProbeSignal, has_branch) -> None:
    """Raise naming the first block (forward order; backward order for gradients) and statistic."""
    if not validate.is_concrete(result.mean_sq):
        return
    optional = {"branch_var", "pair_cosine", "position_cosine"}
    for i, path in enumerate(result.paths):
        for name in FORWARD:
            v = getattr(result, name)[i]
            skip = name in optional and (name != "branch_var" or not has_branch[i])
            if not skip and not bool(jnp.isfinite(v)):
                raise ProbeError(f"probe.signal: {name} is {float(v)} at block {path!r}")
    for i in reversed(range(len(result.paths))):
        for name in BACKWARD:
            v = getattr(result, name)[i]
            if not bool(jnp.isfinite(v)):
                raise ProbeError(
                    f"probe.signal: {name} is {float(v)} at block {result.paths[i]!r} "
                    "(the last such block: the backward pass runs from the output)"
                )


# --------------------------------------------------------------------------- #
# The toolkit's scanned stacks (networks.MLP, networks.ConvNet).
# --------------------------------------------------------------------------- #


def _stack_position_cosine(s, x0) -> Array:
    """:func:`position_cosine` of every layer's pre-activation (NaN for ``(B, N)`` inputs)."""
    if x0.ndim < 3:
        return jnp.full((s.depth,), jnp.nan, x0.dtype)

    def body(h, p):
        h_new, aux = s.step(p, h, None)
        return h_new, position_cosine(aux.get("preact", h_new))

    return jax.lax.scan(body, x0, s.params)[1]


def _stack_signal(model, x, at, loss, key) -> tuple[ProbeSignal, Array]:
    """:func:`signal` of a toolkit stack: :func:`isometry.signal.measure` at its layers."""
    paths, idx, x, s = cuts.prepare_stack(model, x, at)
    loss_fn = _loss_fn(loss, key, jax.eval_shape(s, x))
    fwd, bwd = _signal.measure(s, x, loss_fn)
    every = _signal.backward(dataclasses.replace(s, weights=()), x, loss_fn)
    x0 = s.input_map(x)
    sel = jnp.asarray(idx)
    result = ProbeSignal(
        mean_sq=fwd.q[sel],
        chan_sq_mean=fwd.chan_sq_mean[sel],
        chan_var=fwd.chan_var[sel],
        branch_var=fwd.branch_var[sel],
        pair_cosine=fwd.c[sel],
        position_cosine=_stack_position_cosine(s, x0)[sel],
        grad_out_sq=bwd.grad_preact_sq[sel],
        grad_param_sq=every.grad_weight_sq[sel],
        grad_kernel_sq=bwd.grad_weight_sq[sel],
        grad_input_sq=bwd.grad_input_sq,
        loss=bwd.loss,
        paths=paths,
        shapes=(tuple(x0.shape),) * len(paths),
    )
    residual = bool(getattr(model.config, "residual", False))
    return result, jnp.full((len(paths),), residual)
