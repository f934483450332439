"""Rules for sums, products and elementwise functions of fields.

* ``add``/``sub``/``neg`` of fields, deterministic arrays and parameters: a
  :class:`values.Sum` (a parameter added is a fresh Gaussian, a deterministic array
  a :class:`values.Data` atom);
* a product with a deterministic array constant over the width: a linear map of
  the structure (a number: a scaled sum); constant over the structure: a gain;
  with a parameter vector over the width (a norm's scale): a gain;
* every other elementwise operation, and sums and products of functions of one
  and the same field: composed into one :class:`values.Pointwise` function of its
  leaves, identified later by :mod:`isometry.theory.expectations`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from isometry.theory import ops as O
from isometry.theory import structure as S
from isometry.theory import values as V

__all__ = ["add", "compose", "div", "gain", "identity", "mul", "neg", "pointwise", "scale", "sub"]


def _leaf_set(x):
    if isinstance(x, V.Pointwise):
        return x.leaves
    return (x,)


def compose(eqn, ins, ctx, shape, axis, where):
    """The elementwise function ``eqn`` of its field operands, as one :class:`Pointwise`."""
    fields = [O.broadcast(x, shape, where) if isinstance(x, V.Field) else x for x in ins]
    leaves: list = []
    for x in fields:
        if isinstance(x, V.Field):
            for leaf in _leaf_set(x):
                if not any(leaf is y for y in leaves):
                    leaves.append(leaf)
    for x in fields:
        if isinstance(x, V.Det) and math.prod(x.shape) != 1:
            raise V.TheoryError(
                f"{where}: an elementwise function of a field and a deterministic array that "
                "varies over positions or units has no rule (constants only)"
            )
        if isinstance(x, (V.Param, O.ScaledParam)):
            raise V.TheoryError(f"{where}: a parameter inside an elementwise function")
    getters, sigs = [], []
    for x in fields:
        if isinstance(x, V.Pointwise):
            pos = [next(k for k, y in enumerate(leaves) if y is leaf) for leaf in x.leaves]
            getters.append(lambda vals, f=x.fn, pos=pos: f(*(vals[k] for k in pos)))
            sigs.append(None if x.sig is None else (x.sig, tuple(pos)))
        elif isinstance(x, V.Field):
            k = next(k for k, y in enumerate(leaves) if y is x)
            getters.append(lambda vals, k=k: vals[k])
            sigs.append(("leaf", k))
        else:
            getters.append(_constant(x.value.reshape(())))
            sigs.append(_constant_sig(x.value))
    params = tuple(sorted((k, repr(v)) for k, v in eqn.params.items()))
    sig = None if None in sigs else (eqn.primitive.name, params, tuple(sigs))

    def fn(*vals):
        return O.bind(eqn, [g(vals) for g in getters])[0]

    name = eqn.primitive.name
    product = (
        (name == "mul" and all(isinstance(x, V.Field) and not isinstance(x, V.Pointwise)
                               for x in fields))
        or ((name == "square" or (name == "integer_pow" and eqn.params.get("y") == 2))
        and not isinstance(fields[0], V.Pointwise))
    )  # fmt: skip
    return V.Pointwise(
        shape, axis, where, fn=fn, leaves=tuple(leaves), name=name, product=bool(product), sig=sig
    )


def _constant(v):
    return lambda vals: v


def _constant_sig(v):
    """A hashable stand-in for a constant's value (``None`` when it is traced)."""
    try:
        a = np.asarray(v)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None
    return ("const", str(a.dtype), a.tobytes())


def pointwise(eqn, ins, ctx):
    """The rule of an elementwise function of one field: its Gaussian expectations."""
    where = O.where(eqn)
    shape = tuple(eqn.outvars[0].aval.shape)
    if eqn.primitive.name == "select_n" and isinstance(ins[0], V.Det):
        return S.structural(eqn, ins, ctx)
    if any(isinstance(x, (V.Param, O.ScaledParam)) for x in ins):
        raise V.TheoryError(f"no rule for {where} applied to a parameter")
    return compose(eqn, ins, ctx, shape, O.layout(ins, where), where)


def _one_leaf(ins) -> bool:
    """All field operands are functions of one and the same field, and one is nonlinear."""
    fields = [x for x in ins if isinstance(x, V.Field)]
    if any(not isinstance(x, V.Field) and math.prod(x.shape) != 1 for x in ins):
        return False
    leaves = {id(leaf) for x in fields for leaf in _leaf_set(x)}
    return len(leaves) == 1 and any(isinstance(x, V.Pointwise) for x in fields)


def _shifted(ins) -> bool:
    """One Gaussian field plus constants (an activation's input shift, ``alpha x + beta``):
    an elementwise function of that field, whose mean is no longer zero."""
    fields = [x for x in ins if isinstance(x, V.Field)]
    return (
        len(fields) == 1
        and fields[0].gaussian
        and not isinstance(fields[0], V.Pointwise)
        and all(isinstance(x, V.Det) and math.prod(x.shape) == 1 for x in ins if x is not fields[0])
    )


def add(eqn, ins, ctx, sign=1.0):
    """The rule of ``add`` (and ``sub`` with ``sign=-1``): two fields, or a field and data."""
    where = O.where(eqn)
    shape = tuple(eqn.outvars[0].aval.shape)
    axis = O.layout(ins, where)
    if _one_leaf(ins) or _shifted(ins):
        return compose(eqn, ins, ctx, shape, axis, where)
    terms = [O.as_field(x, shape, axis, where) for x in ins]
    coefs = [1.0, sign][: len(terms)]
    pairs = [(t, c) for t, c in zip(terms, coefs, strict=True) if t is not None]
    if len(pairs) == 1 and pairs[0][1] == 1.0:
        return pairs[0][0]
    return V.Sum(shape, axis, where, terms=tuple(t for t, _ in pairs),
                 coefs=tuple(c for _, c in pairs))  # fmt: skip


def sub(eqn, ins, ctx):
    """The rule of ``sub``: :func:`add` with the second operand's sign flipped."""
    return add(eqn, ins, ctx, sign=-1.0)


def neg(eqn, ins, ctx):
    """The rule of ``neg``: the field with its sign flipped."""
    f = ins[0]
    if isinstance(f, V.Pointwise):
        return compose(eqn, ins, ctx, f.shape, f.axis, O.where(eqn))
    return V.Sum(f.shape, f.axis, O.where(eqn), terms=(f,), coefs=(-1.0,))


def identity(eqn, ins, ctx):
    """The rule of operations that leave a field unchanged (dtype conversions, copies)."""
    x = ins[0]
    if isinstance(x, V.Param):
        return x.view(O.bind(eqn, [x.value])[0])
    return x


def mul(eqn, ins, ctx):
    """The rule of ``mul``: a field times deterministic data, or times a gain."""
    where = O.where(eqn)
    shape = tuple(eqn.outvars[0].aval.shape)
    a, b = ins
    if not isinstance(a, V.Field) and not isinstance(b, V.Field):
        if isinstance(a, O.ScaledParam) or isinstance(b, O.ScaledParam):
            out = _mul_nonfield(eqn, a, b, where)
            if out is not None:
                return out
            raise V.TheoryError(f"no rule for {where}")
        return _mul_param(eqn, a, b, where)
    if isinstance(a, V.Field) and isinstance(b, V.Field):
        return compose(eqn, ins, ctx, shape, O.layout(ins, where), where)
    f, other = (a, b) if isinstance(a, V.Field) else (b, a)
    f = O.broadcast(f, shape, where)
    if isinstance(other, V.Det):
        if isinstance(f, V.Pointwise) and math.prod(other.shape) == 1:
            return compose(eqn, ins, ctx, shape, f.axis, where)
        return scale(f, other.value, where)
    if isinstance(other, V.Param):
        return gain(f, other, where)
    if isinstance(other, O.ScaledParam):
        return gain(scale(f, other.det.value, where), other.param, where)
    raise V.TheoryError(f"no rule for {where}")


def _mul_nonfield(eqn, a, b, where):
    if isinstance(a, O.ScaledParam) or isinstance(b, O.ScaledParam):
        sp, d = (a, b) if isinstance(a, O.ScaledParam) else (b, a)
        if isinstance(d, V.Det):
            return O.ScaledParam(sp.param, V.Det(sp.det.value * d.value))
        return gain(O.scaled_field(sp, where), d, where) if isinstance(d, V.Param) else None
    raise V.TheoryError(f"no rule for {where}")


def div(eqn, ins, ctx):
    """The rule of ``div``: a field divided by deterministic data."""
    where = O.where(eqn)
    a, b = ins
    if isinstance(a, V.Field) and isinstance(b, V.Det) and not isinstance(a, V.Pointwise):
        shape = tuple(eqn.outvars[0].aval.shape)
        return scale(O.broadcast(a, shape, where), 1.0 / b.value, where)
    if isinstance(a, V.Param) and isinstance(b, V.Det) and math.prod(b.shape) == 1:
        return a.view(a.value / b.value)
    return pointwise(eqn, ins, ctx)


def _mul_param(eqn, a, b, where):
    p, d = (a, b) if isinstance(a, V.Param) else (b, a)
    if not (isinstance(p, V.Param) and isinstance(d, V.Det)):
        raise V.TheoryError(f"no rule for {where}: a product of parameters")
    if math.prod(d.shape) == 1:
        return p.view(p.value * d.value)
    return O.ScaledParam(p, d)


def scale(f: V.Field, s, where) -> V.Field:
    """``f * s`` for a deterministic ``s`` broadcastable to ``f``."""
    traced = isinstance(s, jax.core.Tracer)
    xp = jnp if traced else np  # concrete factors stay concrete (folded, tested for constancy)
    s = xp.asarray(s)
    if s.ndim == 0 or math.prod(s.shape) == 1:
        return V.Sum(f.shape, f.axis, where, terms=(f,), coefs=(s.reshape(()),))
    s = s.reshape((1,) * (len(f.shape) - s.ndim) + s.shape)
    if f.axis is not None and s.shape[f.axis] != 1:
        if all(n == 1 for i, n in enumerate(s.shape) if i != f.axis):
            flat = s.reshape(-1)
            if not traced and np.all(flat == flat[0]):
                return scale(f, flat[:1], where)  # a constant over the channels: a number
            return V.Gain(f.shape, f.axis, where, inp=f, gain=V.Det(flat))
        raise V.TheoryError(
            f"{where}: a product with a deterministic array that varies over both the width "
            "and the structure has no rule"
        )
    struct = s if f.axis is None else xp.squeeze(s, axis=f.axis)
    struct = xp.broadcast_to(struct, f.struct)

    def apply(Gs):
        G = Gs[0]
        return G * struct.reshape(struct.shape + (1,) * (G.ndim - struct.ndim))

    return V.Linear(f.shape, f.axis, where, inputs=(f,), apply=apply, name="scale")


def gain(f: V.Field, p: V.Param, where) -> V.Field:
    """The field ``f`` multiplied entrywise by the parameter ``p`` (a learnable gain)."""
    shape = p.shape
    if f.axis is None or len(shape) > len(f.shape):
        raise V.TheoryError(f"{where}: a parameter multiplies a field other than along its width")
    shape = (1,) * (len(f.shape) - len(shape)) + tuple(shape)
    if any(n != 1 for i, n in enumerate(shape) if i != f.axis):
        raise V.TheoryError(
            f"{where}: the parameter {p.path} multiplies a field along its structure axes "
            "(a per-position gain) and has no rule"
        )
    return V.Gain(f.shape, f.axis, where, inp=f, gain=p.view(jnp.ravel(p.value)))
