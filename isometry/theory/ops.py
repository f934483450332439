"""Shared pieces of the interpreter's rules: the evaluation's context, values turned into
fields, and the names of an equation (its operation and the module that made it).

Every rule module (:mod:`isometry.theory.elementwise`, :mod:`isometry.theory.structure`,
:mod:`isometry.theory.products`) and the interpreter itself
(:mod:`isometry.theory.interpret`) use these; they import nothing of each other's but
what is public.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from isometry.theory import values as V

__all__ = [
    "Context",
    "ScaledParam",
    "as_field",
    "bind",
    "broadcast",
    "concrete_zero",
    "fieldify",
    "inside",
    "layout",
    "scaled_field",
    "scope",
    "where",
    "zero_field",
]

Array = jax.Array


@dataclasses.dataclass
class Context:
    """What one evaluation shares: its dtype, the algebra, and what it found.

    Attributes:
        alg: the :class:`~isometry.theory.algebra.Algebra` (Grams, means).
        dtype: the theory's floating dtype.
        checks: ``(label, where, value)`` of quantities checked after evaluation
            (fluctuations the limit drops, gains that vary over channels).
        stack: ``(depth, probes)`` for a toolkit scanned stack: the first scan of
            ``depth`` steps is the stack; its carry after step ``l`` is the output
            of cut point ``"layer.l"`` (recorded in ``stack_outputs``), with a zero
            probe added when ``probes``.
    """

    alg: object
    dtype: object
    checks: list = dataclasses.field(default_factory=list)
    stack: tuple | None = None
    stack_outputs: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass(eq=False)
class ScaledParam:
    """A deterministic array times a parameter (layer norm's ``rsqrt(var) * scale``)."""

    param: V.Param
    det: V.Det

    @property
    def shape(self):
        return tuple(jnp.broadcast_shapes(self.param.shape, self.det.shape))


_OUTER = contextvars.ContextVar("isometry_theory_scope", default="")


def scope(eqn) -> str:
    """The innermost module path of ``eqn`` (named scopes nest whole paths); inside a call
    or a scan's body, whose equations' scopes start afresh, that of the enclosing one."""
    stack = f"{_OUTER.get()}/{eqn.source_info.name_stack}"
    parts = [p for p in stack.split("/") if p and "(" not in p]
    return parts[-1] if parts else "the model (top level)"


@contextlib.contextmanager
def inside(eqn):
    """Evaluate the body of ``eqn`` (a call, a scan) under its scope."""
    token = _OUTER.set(f"{_OUTER.get()}/{eqn.source_info.name_stack}")
    try:
        yield
    finally:
        _OUTER.reset(token)


def where(eqn) -> str:
    """An operation's name and the module path it ran in, for error messages."""
    return f"'{eqn.primitive.name}' in {scope(eqn)}"


def _common_float(vals) -> list:
    """Floating operands at one dtype, the widest among them: a float32 model's constants
    meet the theory's float64 values (quadrature nodes, law-of-large-numbers limits)."""
    floats = {jnp.result_type(v) for v in vals if jnp.issubdtype(jnp.result_type(v), jnp.floating)}
    if len(floats) < 2:
        return list(vals)
    wide = jnp.result_type(*floats)
    return [
        jnp.asarray(v, wide) if jnp.issubdtype(jnp.result_type(v), jnp.floating) else v
        for v in vals
    ]


def bind(eqn, vals):
    """``eqn``'s primitive applied to ``vals`` (floating operands promoted to a common dtype)."""
    bound = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
    out = eqn.primitive.bind(*subfuns, *_common_float(vals), **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def broadcast(f: V.Field, shape, where) -> V.Field:
    """The field ``f`` broadcast to ``shape`` (a view: the same random coordinates)."""
    shape = tuple(shape)
    if f.shape == shape:
        return f
    if len(f.shape) != len(shape):
        raise V.TheoryError(f"rank-changing broadcast of a field at {where}")
    if f.axis is not None and f.shape[f.axis] != shape[f.axis]:
        raise V.TheoryError(f"a field broadcast along its width at {where}")
    out_struct = tuple(s for i, s in enumerate(shape) if i != f.axis)

    def apply(Gs):
        G = Gs[0]
        return jnp.broadcast_to(G, out_struct + G.shape[len(out_struct) :])

    return V.Linear(shape, f.axis, where, inputs=(f,), apply=apply, name="broadcast")


def as_field(x, shape, axis, where) -> V.Field | None:
    """``x`` (a Det, Param or Field) as a field of ``shape`` with width ``axis``; ``None`` for
    a structurally zero deterministic array (it adds nothing)."""
    shape = tuple(shape)
    if isinstance(x, V.Field):
        return broadcast(x, shape, where)
    if isinstance(x, V.Det):
        if x.source is None and (x.zero or concrete_zero(x.value)):
            return None
        val = jnp.broadcast_to(x.value, shape)
        jac = None if x.jac is None else jnp.broadcast_to(x.jac, shape + x.jac.shape[-1:])
        return V.Data(shape, axis, where, det=V.Det(val, zero=x.zero, jac=jac, source=x.source))
    if isinstance(x, V.Param):
        if len(x.shape) != len(shape) or axis is None or x.shape[axis] != shape[axis]:
            raise V.TheoryError(
                f"the parameter {x.path} (shape {x.shape}) is added to a field of shape "
                f"{shape} other than along its width at {where}"
            )
        return broadcast(V.Additive(x.shape, axis, where, param=x), shape, where)
    raise V.TheoryError(f"no rule for a {type(x).__name__} at {where}")


def scaled_field(sp: ScaledParam, where) -> V.Field:
    """``det * P`` as a field: deterministic data times a gain ``P`` (a norm's scale applied
    to a deterministic input); the width is the axis along which ``P`` varies."""
    shape = sp.shape
    pshape = (1,) * (len(shape) - len(sp.param.shape)) + tuple(sp.param.shape)
    axes = [i for i, n in enumerate(pshape) if n > 1]
    if len(axes) != 1:
        raise V.TheoryError(f"{where}: a parameter that varies along several axes scales data")
    axis = axes[0]
    data = V.Data(
        shape,
        axis,
        where,
        det=V.Det(jnp.broadcast_to(sp.det.value, shape), jac=_broadcast_jac(sp.det, shape)),
    )
    return V.Gain(shape, axis, where, inp=data, gain=sp.param.view(jnp.ravel(sp.param.value)))


def _broadcast_jac(d: V.Det, shape):
    return None if d.jac is None else jnp.broadcast_to(d.jac, tuple(shape) + d.jac.shape[-1:])


def fieldify(ins, where) -> list:
    """Operands with every :class:`ScaledParam` turned into a field."""
    return [scaled_field(x, where) if isinstance(x, ScaledParam) else x for x in ins]


def concrete_zero(v) -> bool:
    """``v`` is a concrete array of zeros (a buffer such as a running mean at its start)."""
    if isinstance(v, jax.core.Tracer):
        return False
    return not np.any(np.asarray(v))


def layout(ins, where):
    """``(shape, axis)`` shared by the field operands."""
    fields = [x for x in ins if isinstance(x, V.Field)]
    axes = {f.axis for f in fields}
    if len(axes) != 1:
        raise V.TheoryError(f"fields with different width axes combined at {where}")
    return fields[0].axis


def zero_field(shape, axis, where):
    """A deterministic field of zeros of ``shape`` with width axis ``axis``."""
    return V.Data(shape, axis, where, det=V.Det(jnp.zeros(shape), zero=True))
