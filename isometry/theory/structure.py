"""Rules for linear maps of the structure: operations that treat every width coordinate
alike (transpose, reshape, broadcast, slice, pad, concatenate, pooling, sums over
positions, products with deterministic matrices over positions such as attention
weights).

A map ``L`` of a field ``x`` maps its cross-Grams as ``G(L x, y) = L G(x, y)``:
:func:`structural` applies the operation itself to the Gram, packing the other side's
``R`` columns into the width axis in chunks of ``C`` (the operation's parameters stay
valid). Reshapes are read as groups of axes: of the structure only, the width split
into heads (:class:`values.Split`), or structure axes merged into the width, a flatten
(:class:`values.Merge`). A sum over the width is the law of large numbers: ``C`` times
the width mean, a deterministic array.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from isometry.theory import ops as O
from isometry.theory import values as V

__all__ = [
    "broadcast_in_dim",
    "dot_det",
    "reduce_sum",
    "reshape",
    "reshape_field",
    "slice_",
    "squeeze",
    "stack",
    "stop_gradient",
    "structural",
    "transpose",
]


def _chunked_apply(eqn, ins, field_pos, in_shape, w_in, out_shape, w_out):
    """The structure map of a width-separable operation, applied to Grams: each Gram's
    other side (``R``, flattened) is packed into the width axis in chunks of ``C``
    columns and the operation itself is run on them (its deterministic operands fixed)."""
    Cw = in_shape[w_in]
    n_struct = len(in_shape) - 1
    out_struct = tuple(s for i, s in enumerate(out_shape) if i != w_out)

    def apply(Gs):
        R = Gs[0].shape[n_struct:]
        r = math.prod(R)
        k = -(-r // Cw)
        packed = []
        for G in Gs:
            g = jnp.moveaxis(G.reshape((*G.shape[:n_struct], r)), -1, w_in)
            pad = [(0, 0)] * g.ndim
            pad[w_in] = (0, k * Cw - r)
            g = jnp.pad(g, pad)
            g = g.reshape((*g.shape[:w_in], k, Cw, *g.shape[w_in + 1 :]))
            packed.append(jnp.moveaxis(g, w_in, 0))

        def run(*cols):
            vals = [x.value if isinstance(x, V.Det) else None for x in ins]
            for j, c in zip(field_pos, cols, strict=True):
                vals[j] = c.astype(c.dtype)
            return O.bind(eqn, vals)[0]

        out = jax.vmap(run)(*packed)  # (k, *out_shape)
        out = jnp.moveaxis(out, 0, w_out)  # chunks next to the width
        out = out.reshape((*out.shape[:w_out], k * Cw, *out.shape[w_out + 2 :]))
        out = lax.slice_in_dim(out, 0, r, axis=w_out)
        out = jnp.moveaxis(out, w_out, -1)
        return out.reshape(out_struct + R)

    return apply


def structural(eqn, ins, ctx, w_out=None):
    """A width-separable linear operation of its field operands (the others deterministic)."""
    where = O.where(eqn)
    out_shape = tuple(eqn.outvars[0].aval.shape)
    name = eqn.primitive.name
    if any(isinstance(x, (V.Param, O.ScaledParam)) for x in ins):
        raise V.TheoryError(f"no rule for {where} applied to a parameter")
    fields = [x for x in ins if isinstance(x, V.Field)]
    axis = O.layout(fields, where)
    if axis is None:
        raise V.TheoryError(f"{where} on a field without a width axis has no rule")
    shape = fields[0].shape
    if name in ("concatenate", "select_n", "stack"):
        ins = [
            O.as_field(x, x.shape, axis, where)
            if isinstance(x, V.Det) and (name != "select_n" or i > 0) else x
            for i, x in enumerate(ins)
        ]  # fmt: skip
        ins = [x if x is not None else O.zero_field(shape, axis, where) for x in ins]
        if name == "select_n" and isinstance(ins[0], V.Det):
            _check_constant_over_width(ins[0].value, axis, where)
    pos = [i for i, x in enumerate(ins) if isinstance(x, V.Field)]
    w_out = axis if w_out is None else w_out
    if out_shape[w_out] != shape[axis]:
        raise V.TheoryError(f"{where} changes the width of a field (a slice of its units?)")
    apply = _chunked_apply(eqn, ins, pos, shape, axis, out_shape, w_out)
    return V.Linear(out_shape, w_out, where, inputs=tuple(ins[i] for i in pos), apply=apply,
                    name=name)  # fmt: skip


def _check_constant_over_width(pred, axis, where):
    pred = jnp.asarray(pred)
    if pred.ndim and pred.shape[axis] != 1:
        raise V.TheoryError(
            f"{where}: a selection that differs between units (a dropout mask? call "
            "model.eval() or make the dropout deterministic) has no rule"
        )


def _views_parameters(rule):
    """A shape rule that, applied to a parameter, gives a view of the same draw (its
    variance and identity unchanged); applied to a field, the rule itself."""

    @functools.wraps(rule)
    def wrapped(eqn, ins, ctx):
        x = ins[0]
        if isinstance(x, V.Param):
            return x.view(O.bind(eqn, [x.value])[0])
        if not isinstance(x, V.Field):
            raise V.TheoryError(f"no rule for {O.where(eqn)}")
        return rule(eqn, ins, ctx)

    return wrapped


@_views_parameters
def transpose(eqn, ins, ctx):
    """The rule of ``transpose``: structure axes permuted, the width axis followed."""
    f = ins[0]
    perm = tuple(eqn.params["permutation"])
    out_shape = tuple(f.shape[p] for p in perm)
    if f.axis is None:
        w_out, sperm = None, perm
    else:
        w_out = perm.index(f.axis)
        struct_idx = [i for i in range(len(f.shape)) if i != f.axis]
        sperm = tuple(struct_idx.index(p) for p in perm if p != f.axis)

    def apply(Gs):
        G = Gs[0]
        n = len(sperm)
        return jnp.transpose(G, sperm + tuple(range(n, G.ndim)))

    return V.Linear(out_shape, w_out, O.where(eqn), inputs=(f,), apply=apply, name="transpose")


@_views_parameters
def broadcast_in_dim(eqn, ins, ctx):
    """The rule of ``broadcast_in_dim``: a view of the field on a larger shape."""
    x = ins[0]
    shape = tuple(eqn.params["shape"])
    dims = tuple(eqn.params["broadcast_dimensions"])
    if x.axis is None:
        raise V.TheoryError(f"{O.where(eqn)}: broadcast of a field without a width axis")
    w_out = dims[x.axis]
    if shape[w_out] != x.shape[x.axis]:
        raise V.TheoryError(f"{O.where(eqn)}: a field broadcast along its width")
    out_struct = tuple(s for i, s in enumerate(shape) if i != w_out)
    out_pos = [i for i in range(len(shape)) if i != w_out]
    sdims = tuple(out_pos.index(dims[i]) for i in range(len(x.shape)) if i != x.axis)

    def apply(Gs):
        G = Gs[0]
        n = len(sdims)
        R = G.shape[n:]
        rdims = tuple(len(out_struct) + j for j in range(len(R)))
        return lax.broadcast_in_dim(G, out_struct + R, sdims + rdims)

    return V.Linear(shape, w_out, O.where(eqn), inputs=(x,), apply=apply, name="broadcast")


@_views_parameters
def reshape(eqn, ins, ctx):
    """The rule of ``reshape``: structure axes merged or split, the width axis kept."""
    x = ins[0]
    out_shape = tuple(eqn.outvars[0].aval.shape)
    return reshape_field(x, out_shape, O.where(eqn))


def reshape_field(x: V.Field, out_shape, where) -> V.Field:
    """A reshape of a field: of its structure only, a split of its width into heads, or a
    merge of structure axes into its width (a flatten)."""
    groups = _reshape_groups(x.shape, out_shape)
    if x.axis is None:
        raise V.TheoryError(f"{where}: reshape of a field without a width axis")
    gi = next(k for k, (ins_, _) in enumerate(groups) if x.axis in ins_)
    g_in, g_out = groups[gi]
    if len(g_in) == 1 and len(g_out) == 1:  # the width is untouched
        w_out = g_out[0]
        out_struct = tuple(s for i, s in enumerate(out_shape) if i != w_out)

        def apply(Gs):
            G = Gs[0]
            n = len(x.struct)
            return G.reshape(out_struct + G.shape[n:])

        return V.Linear(out_shape, w_out, where, inputs=(x,), apply=apply, name="reshape")
    if len(g_in) == 1 and len(g_out) == 2:  # the width split into (heads, width)
        if x.data:
            raise V.TheoryError(f"{where}: deterministic data split into heads has no rule")
        inter = _with_unit_groups(x, groups, gi, out_shape, where)
        return V.Split(out_shape, g_out[1], where, inp=inter, head_axis=_struct_index(
            out_shape, g_out[1], g_out[0]))  # fmt: skip
    if (len(g_out) == 1 and g_in[-1] == x.axis) or len(g_out) == 1:  # merged into the width
        merged_full = [i for i in g_in if i != x.axis]
        struct_idx = [i for i in range(len(x.shape)) if i != x.axis]
        pre = _restructure_for_merge(x, groups, gi, out_shape, where)
        merged = tuple(struct_idx.index(i) for i in merged_full)
        if pre is not x:
            raise V.TheoryError(f"{where}: a reshape that merges and reshapes at once")
        return V.Merge(out_shape, g_out[0], where, inp=x, merged=merged)
    raise V.TheoryError(f"{where}: a reshape of {x.shape} to {out_shape} mixing the width axis")


def _struct_index(shape, width_axis, axis):
    return axis if axis < width_axis else axis - 1


def _with_unit_groups(x, groups, gi, out_shape, where):
    """``x`` reshaped so that every group but the width's is already in its output form."""
    if all(len(a) == len(b) == 1 for k, (a, b) in enumerate(groups) if k != gi):
        # structure untouched except unit axes: reshape structure only, width kept whole
        mid = list(out_shape)
        g_out = groups[gi][1]
        mid[g_out[0] : g_out[-1] + 1] = [x.shape[x.axis]]
        mid = tuple(mid)
        if mid == x.shape:
            return x
        return reshape_field(x, mid, where)
    raise V.TheoryError(f"{where}: a reshape that splits the width and reshapes structure")


def _restructure_for_merge(x, groups, gi, out_shape, where):
    if all(len(a) == len(b) == 1 for k, (a, b) in enumerate(groups) if k != gi):
        return x
    raise V.TheoryError(f"{where}: a flatten combined with other reshapes")


def _reshape_groups(a, b):
    """Contiguous groups ``(in axes, out axes)`` with equal products (unit axes alone)."""
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        if i < len(a) and a[i] == 1 and (j >= len(b) or b[j] != 1):
            groups.append(((i,), ()))
            i += 1
            continue
        if j < len(b) and b[j] == 1 and (i >= len(a) or a[i] != 1):
            groups.append(((), (j,)))
            j += 1
            continue
        gi, gj = [i], [j]
        pa, pb = a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                pa *= a[i]
                gi.append(i)
                i += 1
            else:
                pb *= b[j]
                gj.append(j)
                j += 1
        groups.append((tuple(gi), tuple(gj)))
    return groups


@_views_parameters
def squeeze(eqn, ins, ctx):
    """The rule of ``squeeze``: unit structure axes removed."""
    x = ins[0]
    return reshape_field(x, tuple(eqn.outvars[0].aval.shape), O.where(eqn))


def reduce_sum(eqn, ins, ctx):
    """The rule of ``reduce_sum``: a sum over structure axes or the width."""
    x = ins[0]
    where = O.where(eqn)
    axes = tuple(eqn.params["axes"])
    if isinstance(x, V.Param):
        raise V.TheoryError(f"no rule for {where} applied to the parameter {x.path}")
    struct_idx = [i for i in range(len(x.shape)) if i != x.axis]
    saxes = tuple(struct_idx.index(a) for a in axes if a != x.axis)
    if x.axis is not None and x.axis in axes:  # law of large numbers: C times the width mean
        if x.axis != 0 and 0 in axes:
            raise V.TheoryError(f"{where}: a sum over the batch and the width at once")
        m = ctx.alg.mean(x)
        if m is None:
            out = jnp.zeros(eqn.outvars[0].aval.shape, ctx.dtype)
            return V.Det(out, zero=True)
        return V.Det(x.width * jnp.sum(m, axis=saxes).reshape(eqn.outvars[0].aval.shape))
    out_shape = tuple(eqn.outvars[0].aval.shape)
    w_out = x.axis - sum(1 for a in axes if a < x.axis)

    def apply(Gs):
        return jnp.sum(Gs[0], axis=saxes)

    out = V.Linear(out_shape, w_out, where, inputs=(x,), apply=apply, name="sum")
    out.coupled = out.coupled or (0 in axes and x.axis != 0)  # statistics over the batch
    return out


def dot_det(eqn, ins, ctx, where):
    """A field times a deterministic array over structure axes (attention weights)."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    a, b = ins
    f_is_lhs = isinstance(a, V.Field)
    f = a if f_is_lhs else b
    fc, fb = (lc, lb) if f_is_lhs else (rc, rb)
    if f.axis in fc or f.axis in fb:
        raise V.TheoryError(
            f"{where}: a field's width contracted with a fixed array (not a parameter) has no rule"
        )
    free = [i for i in range(len(f.shape)) if i not in fc and i not in fb]
    other = b if f_is_lhs else a
    o_free = len(other.shape) - len(fc) - len(fb)
    pos = len(fb) + (free.index(f.axis) if f_is_lhs else o_free + free.index(f.axis))
    return structural(eqn, ins, ctx, w_out=pos)


def slice_(eqn, ins, ctx):
    """The rule of ``slice``: a slice of the structure axes."""
    x = ins[0]
    if isinstance(x, V.Param):
        key = (*x.key, ("slice", tuple(eqn.params["start_indices"]),
                        tuple(eqn.params["limit_indices"])))  # fmt: skip
        return V.Param(key, x.path + "[slice]", O.bind(eqn, [x.value])[0])
    return structural(eqn, ins, ctx)


def stack(eqn, ins, ctx):
    """The rule of ``concatenate``: fields joined along a structure axis."""
    axis = O.layout([x for x in ins if isinstance(x, V.Field)], O.where(eqn))
    return structural(eqn, ins, ctx, w_out=axis + (eqn.params["axis"] <= axis))


def stop_gradient(eqn, ins, ctx):
    """The rule of ``stop_gradient``: the field unchanged (the forward pass)."""
    return ins[0]
