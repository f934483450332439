"""Scanning a stack of layers over depth, emitting results at chosen depths.

The machinery shared by :mod:`isometry.jacobian` (Jacobians and plain
singular values) and :mod:`isometry.spectra` (stable log singular values):
a deep network is a stack ``h_d = layer(params[d-1], h_{d-1})`` whose
parameters carry a leading depth axis ``L`` (see the design's "a deep network
is a scanned stack"). :func:`plan` checks a stack and its input once;
:func:`scan_emit` runs one ``lax.scan`` over depth carrying any state (e.g.
the tangent matrix pushed forward by :func:`push_tangents`) and stores a
reduction of it at the requested depths only.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["Plan", "as_float_input", "depth_list", "plan", "push_tangents", "scan_emit"]

Array = jax.Array


def as_float_input(name: str, x) -> Array:
    """``x`` as a floating array with at least one axis (integers become the default float)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    if x.ndim == 0 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty array with at least one axis, got {x.shape}")
    return x


def push_tangents(layer, params_l, h, T) -> tuple[Array, Array]:
    """One layer forward on ``h`` and on the tangent rows ``T (k, *h.shape)``.

    ``h' = layer(params_l, h)``, ``T'_j = A T_j`` with ``A = d layer / d h``
    (``jax.jvp`` vmapped over rows; the primal is computed once, and for a
    dense layer the rows become one ``(k, n) @ (n, n)`` matmul).
    """

    def one(t):
        return jax.jvp(lambda z: layer(params_l, z), (h,), (t,))

    return jax.vmap(one, out_axes=(None, 0))(T)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A checked stack: its parameters cut to the deepest requested depth.

    Attributes:
        params: pytree, leaves ``(max(depths), ...)``.
        x: the input ``h_0`` in the layer's output dtype.
        rows: the tangent rows ``(k, *x.shape)`` (the identity by default).
        shape: ``x.shape``.
        depths: sorted unique depths in ``1..L``.
        L: the stack's full depth.
    """

    params: object
    x: Array
    rows: Array
    shape: tuple[int, ...]
    depths: np.ndarray
    L: int


def depth_list(depths, L: int) -> np.ndarray:
    """``depths`` (an int, a sequence, or ``None``: ``L``) as sorted unique integers in ``1..L``."""
    if depths is None:
        return np.array([L])
    if isinstance(depths, int | np.integer):
        depths = [depths]
    try:
        d = np.asarray(list(depths))
    except TypeError as err:
        raise ValueError(f"depths must be a list of integers in 1..{L}, got {depths!r}") from err
    if d.size == 0:
        raise ValueError("depths must not be empty")
    if d.dtype.kind not in "iu" or d.ndim != 1:
        if d.dtype.kind == "f" and np.all(d == np.round(d)):
            d = d.astype(int)
        else:
            raise ValueError(f"depths must be integers in 1..{L}, got {depths!r}")
    bad = (d < 1) | (d > L)
    if np.any(bad):
        raise ValueError(f"depths must lie in 1..{L} (the stack's depth L), got {d[bad].tolist()}")
    return np.unique(d)


def _stack_depth(params) -> int:
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError("params must be a pytree with at least one array leaf (leading axis L)")
    lengths = {np.shape(a)[0] if np.ndim(a) else None for a in leaves}
    if None in lengths or len(lengths) != 1:
        shapes = [np.shape(a) for a in leaves]
        raise ValueError(
            f"params leaves must share a leading depth axis L, got leaf shapes {shapes[:6]}"
        )
    (L,) = lengths
    if L < 1:
        raise ValueError("params has depth L = 0; need at least one layer")
    return L


def _tangent_rows(tangents, x) -> Array:
    if tangents is None:
        return jnp.eye(x.size, dtype=x.dtype).reshape((x.size, *x.shape))
    rows = jnp.asarray(tangents, dtype=x.dtype)
    if rows.ndim != x.ndim + 1 or rows.shape[1:] != x.shape or rows.shape[0] < 1:
        raise ValueError(
            f"tangents must have shape (k, *x.shape) = (k, {', '.join(map(str, x.shape))}), "
            f"got {rows.shape}"
        )
    return rows


def plan(layer, params, x, depths, tangents=None) -> Plan:
    """Check the stack ``layer(params_l, h) -> h`` on ``x``; see :class:`Plan`.

    Raises:
        TypeError: ``layer`` is not callable.
        ValueError: params without a common leading depth axis, a layer that
            changes the shape of ``h``, depths outside ``1..L``, tangents not
            ``(k, *x.shape)``.
    """
    if not callable(layer):
        raise TypeError(f"layer must be callable layer(params_l, h) -> h, got {type(layer)}")
    L = _stack_depth(params)
    x = as_float_input("x", x)
    p0 = jax.tree_util.tree_map(lambda a: a[0], params)
    out = jax.eval_shape(layer, p0, x)
    if not hasattr(out, "shape") or tuple(out.shape) != x.shape:
        got = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"layer must map h to the same shape (a stack of identical-shaped layers): "
            f"input {x.shape} -> output {got}"
        )
    if out.dtype != x.dtype:
        x = x.astype(out.dtype)
    d = depth_list(depths, L)
    rows = _tangent_rows(tangents, x)
    dmax = int(d[-1])
    params = jax.tree_util.tree_map(lambda a: a[:dmax], params)
    return Plan(params=params, x=x, rows=rows, shape=x.shape, depths=d, L=L)


def scan_emit(plan: Plan, init, step, emit, *, unroll=1):
    """Scan ``step`` over depth from ``init(x, rows)``; stack ``emit(carry)`` at ``plan.depths``.

    ``carry_d = step(carry_{d-1}, params[d-1])``; returns the pytree of
    ``emit(carry_d)`` stacked over the ``K`` requested depths (leading axis ``K``).
    One requested depth (the last layer run) is emitted after the scan from
    the final carry. Several are emitted inside the scan into a preallocated
    ``(K, ...)`` buffer updated in place, under ``lax.cond`` when some depths
    are skipped (those neither emit nor touch the buffer). Memory: the carry
    plus K outputs.
    """
    K = len(plan.depths)
    dmax = int(plan.depths[-1])
    carry0 = init(plan.x, plan.rows)
    if K == 1:
        carry, _ = lax.scan(lambda c, p: (step(c, p), None), carry0, plan.params, unroll=unroll)
        return jax.tree_util.tree_map(lambda v: v[None], emit(carry))
    slots = np.full(dmax, K, dtype=np.int32)  # K: this depth is not emitted
    slots[plan.depths - 1] = np.arange(K, dtype=np.int32)
    out_shape = jax.eval_shape(emit, carry0)
    buf0 = jax.tree_util.tree_map(lambda s: jnp.zeros((K, *s.shape), s.dtype), out_shape)

    def write(buf, carry, slot):
        return jax.tree_util.tree_map(
            lambda b, v: lax.dynamic_update_index_in_dim(b, v, slot, 0), buf, emit(carry)
        )

    def body(state, inp):
        carry, buf = state
        p, slot = inp
        carry = step(carry, p)
        if K < dmax:
            buf = lax.cond(slot < K, write, lambda b, c, s: b, buf, carry, slot)
        else:
            buf = write(buf, carry, slot)
        return (carry, buf), None

    init_state = (carry0, buf0)
    (_, buf), _ = lax.scan(body, init_state, (plan.params, jnp.asarray(slots)), unroll=unroll)
    return buf
