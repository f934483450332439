"""Interpreting a model's jaxpr in the infinite-width limit: one rule per kind of operation.

:func:`evaluate` walks the equations of a jaxpr (the model's forward pass with
its parameters as inputs) and maps each to the engine's values
(:mod:`isometry.theory.values`):

* every input deterministic: the operation is evaluated exactly (its
  Jacobian with respect to the perturbed input example is carried along when
  the input Jacobian is followed);
* ``dot_general`` / ``conv_general_dilated`` with a parameter: a contraction
  (:mod:`isometry.theory.contractions`), a fresh Gaussian field;
* ``dot_general`` of two fields over their widths: the law of large numbers,
  a deterministic array (attention logits ``q . k``: their deterministic limit;
  the fluctuation that limit drops is recorded and reported);
* ``reduce_sum`` over the width: the law of large numbers (``C`` times the
  width mean; layer norm's mean and variance);
* addition of fields, data and parameters: a sum (a parameter added is a
  fresh Gaussian, :class:`values.Additive`); products with deterministic
  arrays constant over the width, transposes, reshapes, broadcasts, slices,
  pads, concatenation, pooling, products with deterministic matrices over
  structure axes (uniform attention): linear maps of the structure
  (:class:`values.Linear`), applied to Grams by the operation itself;
* products with a vector over the width (a norm's scale): a gain;
* any other elementwise operation: composed into an elementwise function of
  its fields (:class:`values.Pointwise`), whose Gaussian expectations
  :mod:`isometry.theory.expectations` computes;
* calls (``jit``, ``custom_jvp``, ``custom_vjp``, ``checkpoint``): their
  bodies; ``scan``: unrolled (weights shared across steps stay one parameter);
* anything else touching a field or a parameter (``while``, ``cond``, random
  numbers, ``max`` pooling, ...): :class:`values.TheoryError` naming the
  operation and the module path (the model's submodules are traced under
  ``jax.named_scope`` of their paths).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from isometry.theory import contractions as C
from isometry.theory import values as V

__all__ = ["Context", "evaluate"]

Array = jax.Array

_CALLS = {
    "pjit": "jaxpr",
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat": "jaxpr",
    "checkpoint": "jaxpr",
    "named_call": "call_jaxpr",
}
_IDENTITY = {"convert_element_type", "copy", "copy_p", "reduce_precision", "optimization_barrier"}
_ELEMENTWISE = {
    "tanh", "logistic", "exp", "exp2", "log", "log1p", "expm1", "sin", "cos", "tan", "atan",
    "asinh", "sinh", "cosh", "erf", "erfc", "erf_inv", "abs", "sign", "sqrt", "rsqrt", "cbrt",
    "integer_pow", "square", "pow", "max", "min", "ge", "gt", "le", "lt", "eq", "ne", "and",
    "or", "not", "clamp", "floor", "ceil", "round", "nextafter", "is_finite", "atan2",
    "select_n",
}  # fmt: skip
_SAME_AXIS = {"slice", "pad", "rev", "dynamic_slice", "reduce_window_sum", "cumsum", "select_n",
              "concatenate", "mul", "div"}  # fmt: skip
_NOISE_LINEAR = {"add", "sub", "neg", "mul", "div", "convert_element_type", "reshape",
                 "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "copy",
                 "stop_gradient"}  # fmt: skip
_PERMUTATIONS = {"convert_element_type", "reshape", "transpose", "copy", "squeeze",
                 "expand_dims"}  # fmt: skip
_ZERO_FIRST = {"neg", "convert_element_type", "reshape", "transpose", "broadcast_in_dim",
               "squeeze", "expand_dims", "copy", "reduce_sum", "square", "integer_pow",
               "dot_general", "slice", "rev", "stop_gradient", "div"}  # fmt: skip


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


# --------------------------------------------------------------------------- #
# Walking a jaxpr.
# --------------------------------------------------------------------------- #


def evaluate(jaxpr, consts, args, ctx: Context) -> list:
    """The values of ``jaxpr``'s outputs given values of its constants and inputs."""
    env = {}

    def read(v):
        if hasattr(v, "val"):  # a Literal: kept concrete (numpy), folded at trace time
            return V.Det(np.asarray(v.val))
        return env[v]

    for v, val in zip(jaxpr.constvars, consts, strict=True):
        env[v] = val if _is_value(val) else V.Det(jnp.asarray(val))
    for v, val in zip(jaxpr.invars, args, strict=True):
        env[v] = val
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        failed = next((x for x in ins if isinstance(x, V.Failed)), None)
        if failed is not None:
            outs = [failed] * len(eqn.outvars)
        else:
            try:
                outs = _apply(eqn, ins, ctx)
            except V.TheoryError as err:  # raised where (if) the value is used
                outs = [V.Failed(err)] * len(eqn.outvars)
        for v, val in zip(eqn.outvars, outs, strict=True):
            env[v] = val
    return [read(v) for v in jaxpr.outvars]


def used(value):
    """``value``, or raise the error of the operation that could not make it."""
    if isinstance(value, V.Failed):
        raise value.error
    return value


def _is_value(x) -> bool:
    return isinstance(x, (V.Det, V.Param, V.Field, ScaledParam))


def _scope(eqn) -> str:
    """The innermost module path of ``eqn`` (named scopes nest whole paths)."""
    parts = [p for p in str(eqn.source_info.name_stack).split("/") if p and "(" not in p]
    return parts[-1] if parts else "the model (top level)"


def _where(eqn) -> str:
    return f"'{eqn.primitive.name}' in {_scope(eqn)}"


def _apply(eqn, ins, ctx) -> list:
    name = eqn.primitive.name
    if all(isinstance(x, V.Det) for x in ins):
        return _det(eqn, ins, ctx)
    if name in _CALLS:
        return _call(eqn, ins, ctx)
    if name == "scan":
        return _scan(eqn, ins, ctx)
    rule = _RULES.get(name)
    if rule is None:
        rule = _pointwise if name in _ELEMENTWISE else _no_rule
    if name != "mul" and any(isinstance(x, ScaledParam) for x in ins):
        ins = _fieldify(ins, _where(eqn))
    out = rule(eqn, ins, ctx)
    return out if isinstance(out, list) else [out]


def _no_rule(eqn, ins, ctx):
    kinds = ", ".join(sorted({type(x).__name__ for x in ins if not isinstance(x, V.Det)}))
    hint = ""
    if eqn.primitive.name in ("while", "cond"):
        hint = ": data-dependent control flow"
    elif "random" in eqn.primitive.name or "rng" in eqn.primitive.name:
        hint = ": randomness in the forward pass (dropout in training mode?)"
    elif eqn.primitive.name in (
        "reduce_max", "reduce_min", "argmax", "argmin", "reduce_window_max", "reduce_window_min"
    ):  # fmt: skip
        hint = ": a maximum over positions or units (max pooling) is not Gaussian in the limit"
    raise V.TheoryError(f"no rule for {_where(eqn)} applied to a {kinds}{hint}")


# --------------------------------------------------------------------------- #
# Deterministic values.
# --------------------------------------------------------------------------- #


def _bind(eqn, vals):
    bound = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
    out = eqn.primitive.bind(*subfuns, *vals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _det(eqn, ins, ctx) -> list:
    vals = [d.value for d in ins]
    if all(not isinstance(v, jax.core.Tracer) for v in vals):
        with jax.ensure_compile_time_eval():  # constants fold while the program is traced
            outs = _bind(eqn, vals)
    else:
        outs = _bind(eqn, vals)
    name = eqn.primitive.name
    zero = _zero(name, ins)
    noise = _noise(eqn, ins, ctx)
    jacs = _jacobians(eqn, ins, vals) if any(d.jac is not None for d in ins) else None
    source = ins[0].source if name in _PERMUTATIONS and len(ins) == 1 else None
    return [
        V.Det(o, zero=zero, noise=noise if len(outs) == 1 else None,
              jac=None if jacs is None else jacs[i], source=source)
        for i, o in enumerate(outs)
    ]  # fmt: skip


def _zero(name, ins) -> bool:
    if name == "mul":
        return any(d.zero for d in ins)
    if name in ("add", "sub", "select_n", "concatenate", "max", "min"):
        return (
            all(d.zero for d in ins[1:] if name == "select_n")
            if name == "select_n"
            else all(d.zero for d in ins)
        )
    if name in _ZERO_FIRST:
        return ins[0].zero
    return False


def _noise(eqn, ins, ctx):
    noisy = [d for d in ins if d.noise is not None]
    if not noisy:
        return None
    name = eqn.primitive.name
    if name not in _NOISE_LINEAR:
        std = jnp.sqrt(jnp.max(jnp.concatenate([jnp.ravel(d.noise) for d in noisy])))
        ctx.checks.append(("fluctuation", _scope(eqn), std))
        return None
    if name in ("mul", "div"):
        a, b = ins
        if a.noise is not None and b.noise is not None:
            return None
        if name == "div" and a.noise is None:
            return None
        d, other = (a, b) if a.noise is not None else (b, a)
        factor = jnp.asarray(other.value)
        return d.noise * (factor**2 if name == "mul" else 1.0 / factor**2)
    if name in ("add", "sub"):
        parts = [d.noise for d in ins if d.noise is not None]
        return sum(parts[1:], parts[0]) * jnp.ones(jnp.broadcast_shapes(*(d.shape for d in ins)))
    return _bind(eqn, [d.noise if d.noise is not None else d.value for d in ins])[0]


def _jacobians(eqn, ins, vals):
    """``d out / d x_index`` of a deterministic operation, ``out.shape + (n,)``, by ``jvp``."""
    idx = [i for i, d in enumerate(ins) if d.jac is not None]
    if any(not jnp.issubdtype(jnp.result_type(vals[i]), jnp.floating) for i in idx):
        return None

    def f(*xs):
        full = list(vals)
        for i, x in zip(idx, xs, strict=True):
            full[i] = x
        return _bind(eqn, full)

    primals = [vals[i] for i in idx]

    def tangent(*ts):
        return jax.jvp(f, primals, list(ts))[1]

    tans = [ins[i].jac for i in idx]
    out = jax.vmap(tangent, in_axes=-1, out_axes=-1)(*tans)
    return [o if jnp.issubdtype(o.dtype, jnp.floating) else None for o in out]


# --------------------------------------------------------------------------- #
# Calls and scans.
# --------------------------------------------------------------------------- #


def _inner(eqn):
    sub = eqn.params[_CALLS[eqn.primitive.name]]
    if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):
        return sub.jaxpr, [V.Det(jnp.asarray(c)) for c in sub.consts]
    return sub, []


def _call(eqn, ins, ctx) -> list:
    jaxpr, consts = _inner(eqn)
    outs = evaluate(jaxpr, consts, ins, ctx)
    name = eqn.params.get("name")
    fields = [x for x in ins if isinstance(x, V.Field)]
    for o in outs:
        if isinstance(o, V.Pointwise) and name and len(fields) == 1 and o.leaves == (fields[0],):
            o.name = str(name)
    return outs


def _scan(eqn, ins, ctx) -> list:
    p = eqn.params
    nc, nk, length = p["num_consts"], p["num_carry"], p["length"]
    jaxpr, consts = p["jaxpr"].jaxpr, [V.Det(jnp.asarray(c)) for c in p["jaxpr"].consts]
    body_consts, carry, xs = ins[:nc], list(ins[nc : nc + nk]), ins[nc + nk :]
    steps = range(length - 1, -1, -1) if p["reverse"] else range(length)
    ys = []
    where = _where(eqn)
    tap = ctx.stack is not None and length == ctx.stack[0] and not ctx.stack_outputs
    for i in steps:
        xi = [_index(x, i, where) for x in xs]
        out = evaluate(jaxpr, consts, [*body_consts, *carry, *xi], ctx)
        carry, y = out[:nk], out[nk:]
        if tap:
            carry[0] = _stack_tap(carry[0], i, ctx, where)
        ys.append(y)
    if p["reverse"]:
        ys = ys[::-1]
    stacked = [_stack([y[j] for y in ys], where) for j in range(len(eqn.outvars) - nk)]
    return [*carry, *stacked]


def _stack_tap(h, i, ctx, where):
    """Record the stack's carry after step ``i`` (adding the cut point's probe)."""
    if not isinstance(h, V.Field):
        raise V.TheoryError(f"the stack's state after layer {i} does not depend on parameters")
    if ctx.stack[1]:
        probe = V.Det(jnp.zeros(h.shape, ctx.dtype), zero=True, source=("probe", i))
        h = V.Sum(h.shape, h.axis, where, terms=(h, _as_field(probe, h.shape, h.axis, where)),
                  coefs=(1.0, 1.0))  # fmt: skip
    ctx.stack_outputs.append(h)
    return h


def _index(x, i, where):
    """Step ``i`` of a scanned-over value (axis 0)."""
    if isinstance(x, V.Det):
        return V.Det(
            x.value[i],
            zero=x.zero,
            noise=None if x.noise is None else x.noise[i],
            jac=None if x.jac is None else x.jac[i],
        )
    if isinstance(x, V.Param):
        return V.Param((*x.key, i), f"{x.path}[{i}]", x.value[i])
    if isinstance(x, V.Field):
        if x.axis == 0:
            raise V.TheoryError(f"a scan over the width axis of a field at {where}")
        shape = x.shape[1:]
        return V.Linear(
            shape, None if x.axis is None else x.axis - 1, where,
            inputs=(x,), apply=lambda Gs, i=i: Gs[0][i], name="scan step",
        )  # fmt: skip
    raise V.TheoryError(f"no rule for scanning over a {type(x).__name__} at {where}")


def _stack(vals, where):
    if all(isinstance(v, V.Det) for v in vals):
        jac = None if any(v.jac is None for v in vals) else jnp.stack([v.jac for v in vals])
        return V.Det(jnp.stack([v.value for v in vals]), zero=all(v.zero for v in vals), jac=jac)
    fields = [_field_like(v, vals, where) for v in vals]
    f0 = fields[0]
    return V.Linear(
        (len(vals), *f0.shape), None if f0.axis is None else f0.axis + 1, where,
        inputs=tuple(fields), apply=lambda Gs: jnp.stack(Gs, axis=0), name="scan output",
    )  # fmt: skip


def _field_like(v, vals, where):
    if isinstance(v, V.Field):
        return v
    like = next(x for x in vals if isinstance(x, V.Field))
    f = _as_field(v, like.shape, like.axis, where)
    if f is None:
        return V.Data(like.shape, like.axis, where, det=V.Det(jnp.zeros(like.shape), zero=True))
    return f


# --------------------------------------------------------------------------- #
# Turning values into fields.
# --------------------------------------------------------------------------- #


def _broadcast(f: V.Field, shape, where) -> V.Field:
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


def _as_field(x, shape, axis, where) -> V.Field | None:
    """``x`` (a Det, Param or Field) as a field of ``shape`` with width ``axis``; ``None`` for
    a structurally zero deterministic array (it adds nothing)."""
    shape = tuple(shape)
    if isinstance(x, V.Field):
        return _broadcast(x, shape, where)
    if isinstance(x, V.Det):
        if x.source is None and (x.zero or _concrete_zero(x.value)):
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
        return _broadcast(V.Additive(x.shape, axis, where, param=x), shape, where)
    raise V.TheoryError(f"no rule for a {type(x).__name__} at {where}")


def _scaled_field(sp: ScaledParam, where) -> V.Field:
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


def _fieldify(ins, where) -> list:
    """Operands with every :class:`ScaledParam` turned into a field."""
    return [_scaled_field(x, where) if isinstance(x, ScaledParam) else x for x in ins]


def _concrete_zero(v) -> bool:
    """``v`` is a concrete array of zeros (a buffer such as a running mean at its start)."""
    if isinstance(v, jax.core.Tracer):
        return False
    return not np.any(np.asarray(v))


def _layout(ins, where):
    """``(shape, axis)`` shared by the field operands."""
    fields = [x for x in ins if isinstance(x, V.Field)]
    axes = {f.axis for f in fields}
    if len(axes) != 1:
        raise V.TheoryError(f"fields with different width axes combined at {where}")
    return fields[0].axis


# --------------------------------------------------------------------------- #
# Sums, products, elementwise functions.
# --------------------------------------------------------------------------- #


def _leaf_set(x):
    if isinstance(x, V.Pointwise):
        return x.leaves
    return (x,)


def _compose(eqn, ins, ctx, shape, axis, where):
    """The elementwise function ``eqn`` of its field operands, as one :class:`Pointwise`."""
    fields = [_broadcast(x, shape, where) if isinstance(x, V.Field) else x for x in ins]
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
        if isinstance(x, (V.Param, ScaledParam)):
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
        return _bind(eqn, [g(vals) for g in getters])[0]

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


def _pointwise(eqn, ins, ctx):
    where = _where(eqn)
    shape = tuple(eqn.outvars[0].aval.shape)
    if eqn.primitive.name == "select_n" and isinstance(ins[0], V.Det):
        return _structural(eqn, ins, ctx)
    if any(isinstance(x, (V.Param, ScaledParam)) for x in ins):
        raise V.TheoryError(f"no rule for {where} applied to a parameter")
    return _compose(eqn, ins, ctx, shape, _layout(ins, where), where)


def _one_leaf(ins) -> bool:
    """All field operands are functions of one and the same field, and one is nonlinear."""
    fields = [x for x in ins if isinstance(x, V.Field)]
    if any(not isinstance(x, V.Field) and math.prod(x.shape) != 1 for x in ins):
        return False
    leaves = {id(leaf) for x in fields for leaf in _leaf_set(x)}
    return len(leaves) == 1 and any(isinstance(x, V.Pointwise) for x in fields)


def _add(eqn, ins, ctx, sign=1.0):
    where = _where(eqn)
    shape = tuple(eqn.outvars[0].aval.shape)
    axis = _layout(ins, where)
    if _one_leaf(ins):
        return _compose(eqn, ins, ctx, shape, axis, where)
    terms = [_as_field(x, shape, axis, where) for x in ins]
    coefs = [1.0, sign][: len(terms)]
    pairs = [(t, c) for t, c in zip(terms, coefs, strict=True) if t is not None]
    if len(pairs) == 1 and pairs[0][1] == 1.0:
        return pairs[0][0]
    return V.Sum(shape, axis, where, terms=tuple(t for t, _ in pairs),
                 coefs=tuple(c for _, c in pairs))  # fmt: skip


def _sub(eqn, ins, ctx):
    return _add(eqn, ins, ctx, sign=-1.0)


def _neg(eqn, ins, ctx):
    f = ins[0]
    if isinstance(f, V.Pointwise):
        return _compose(eqn, ins, ctx, f.shape, f.axis, _where(eqn))
    return V.Sum(f.shape, f.axis, _where(eqn), terms=(f,), coefs=(-1.0,))


def _identity(eqn, ins, ctx):
    x = ins[0]
    if isinstance(x, V.Param):
        return x.view(_bind(eqn, [x.value])[0])
    return x


def _mul(eqn, ins, ctx):
    where = _where(eqn)
    shape = tuple(eqn.outvars[0].aval.shape)
    a, b = ins
    if not isinstance(a, V.Field) and not isinstance(b, V.Field):
        if isinstance(a, ScaledParam) or isinstance(b, ScaledParam):
            out = _mul_nonfield(eqn, a, b, where)
            if out is not None:
                return out
            raise V.TheoryError(f"no rule for {where}")
        return _mul_param(eqn, a, b, where)
    if isinstance(a, V.Field) and isinstance(b, V.Field):
        return _compose(eqn, ins, ctx, shape, _layout(ins, where), where)
    f, other = (a, b) if isinstance(a, V.Field) else (b, a)
    f = _broadcast(f, shape, where)
    if isinstance(other, V.Det):
        if isinstance(f, V.Pointwise) and math.prod(other.shape) == 1:
            return _compose(eqn, ins, ctx, shape, f.axis, where)
        return _scale(f, other.value, where)
    if isinstance(other, V.Param):
        return _gain(f, other, where)
    if isinstance(other, ScaledParam):
        return _gain(_scale(f, other.det.value, where), other.param, where)
    raise V.TheoryError(f"no rule for {where}")


def _mul_nonfield(eqn, a, b, where):
    if isinstance(a, ScaledParam) or isinstance(b, ScaledParam):
        sp, d = (a, b) if isinstance(a, ScaledParam) else (b, a)
        if isinstance(d, V.Det):
            return ScaledParam(sp.param, V.Det(sp.det.value * d.value))
        return _gain(_scaled_field(sp, where), d, where) if isinstance(d, V.Param) else None
    raise V.TheoryError(f"no rule for {where}")


def _div(eqn, ins, ctx):
    where = _where(eqn)
    a, b = ins
    if isinstance(a, V.Field) and isinstance(b, V.Det) and not isinstance(a, V.Pointwise):
        shape = tuple(eqn.outvars[0].aval.shape)
        return _scale(_broadcast(a, shape, where), 1.0 / b.value, where)
    if isinstance(a, V.Param) and isinstance(b, V.Det) and math.prod(b.shape) == 1:
        return a.view(a.value / b.value)
    return _pointwise(eqn, ins, ctx)


def _mul_param(eqn, a, b, where):
    p, d = (a, b) if isinstance(a, V.Param) else (b, a)
    if not (isinstance(p, V.Param) and isinstance(d, V.Det)):
        raise V.TheoryError(f"no rule for {where}: a product of parameters")
    if math.prod(d.shape) == 1:
        return p.view(p.value * d.value)
    return ScaledParam(p, d)


def _scale(f: V.Field, s, where) -> V.Field:
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
                return _scale(f, flat[:1], where)  # a constant over the channels: a number
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


def _gain(f: V.Field, p: V.Param, where) -> V.Field:
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


# --------------------------------------------------------------------------- #
# Linear maps of the structure.
# --------------------------------------------------------------------------- #


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
            return _bind(eqn, vals)[0]

        out = jax.vmap(run)(*packed)  # (k, *out_shape)
        out = jnp.moveaxis(out, 0, w_out)  # chunks next to the width
        out = out.reshape((*out.shape[:w_out], k * Cw, *out.shape[w_out + 2 :]))
        out = lax.slice_in_dim(out, 0, r, axis=w_out)
        out = jnp.moveaxis(out, w_out, -1)
        return out.reshape(out_struct + R)

    return apply


def _structural(eqn, ins, ctx, w_out=None):
    """A width-separable linear operation of its field operands (the others deterministic)."""
    where = _where(eqn)
    out_shape = tuple(eqn.outvars[0].aval.shape)
    name = eqn.primitive.name
    if any(isinstance(x, (V.Param, ScaledParam)) for x in ins):
        raise V.TheoryError(f"no rule for {where} applied to a parameter")
    fields = [x for x in ins if isinstance(x, V.Field)]
    axis = _layout(fields, where)
    if axis is None:
        raise V.TheoryError(f"{where} on a field without a width axis has no rule")
    shape = fields[0].shape
    if name in ("concatenate", "select_n", "stack"):
        ins = [
            _as_field(x, x.shape, axis, where)
            if isinstance(x, V.Det) and (name != "select_n" or i > 0) else x
            for i, x in enumerate(ins)
        ]  # fmt: skip
        ins = [x if x is not None else _zero_field(shape, axis, where) for x in ins]
        if name == "select_n" and isinstance(ins[0], V.Det):
            _check_constant_over_width(ins[0].value, axis, where)
    pos = [i for i, x in enumerate(ins) if isinstance(x, V.Field)]
    w_out = axis if w_out is None else w_out
    if out_shape[w_out] != shape[axis]:
        raise V.TheoryError(f"{where} changes the width of a field (a slice of its units?)")
    apply = _chunked_apply(eqn, ins, pos, shape, axis, out_shape, w_out)
    return V.Linear(out_shape, w_out, where, inputs=tuple(ins[i] for i in pos), apply=apply,
                    name=name)  # fmt: skip


def _zero_field(shape, axis, where):
    return V.Data(shape, axis, where, det=V.Det(jnp.zeros(shape), zero=True))


def _check_constant_over_width(pred, axis, where):
    pred = jnp.asarray(pred)
    if pred.ndim and pred.shape[axis] != 1:
        raise V.TheoryError(
            f"{where}: a selection that differs between units (a dropout mask? call "
            "model.eval() or make the dropout deterministic) has no rule"
        )


def _transpose(eqn, ins, ctx):
    f = ins[0]
    if isinstance(f, V.Param):
        return f.view(_bind(eqn, [f.value])[0])
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

    return V.Linear(out_shape, w_out, _where(eqn), inputs=(f,), apply=apply, name="transpose")


def _broadcast_in_dim(eqn, ins, ctx):
    x = ins[0]
    if isinstance(x, V.Param):
        return x.view(_bind(eqn, [x.value])[0])
    if not isinstance(x, V.Field):
        raise V.TheoryError(f"no rule for {_where(eqn)}")
    shape = tuple(eqn.params["shape"])
    dims = tuple(eqn.params["broadcast_dimensions"])
    if x.axis is None:
        raise V.TheoryError(f"{_where(eqn)}: broadcast of a field without a width axis")
    w_out = dims[x.axis]
    if shape[w_out] != x.shape[x.axis]:
        raise V.TheoryError(f"{_where(eqn)}: a field broadcast along its width")
    out_struct = tuple(s for i, s in enumerate(shape) if i != w_out)
    out_pos = [i for i in range(len(shape)) if i != w_out]
    sdims = tuple(out_pos.index(dims[i]) for i in range(len(x.shape)) if i != x.axis)

    def apply(Gs):
        G = Gs[0]
        n = len(sdims)
        R = G.shape[n:]
        rdims = tuple(len(out_struct) + j for j in range(len(R)))
        return lax.broadcast_in_dim(G, out_struct + R, sdims + rdims)

    return V.Linear(shape, w_out, _where(eqn), inputs=(x,), apply=apply, name="broadcast")


def _reshape(eqn, ins, ctx):
    x = ins[0]
    if isinstance(x, V.Param):
        return x.view(_bind(eqn, [x.value])[0])
    if not isinstance(x, V.Field):
        raise V.TheoryError(f"no rule for {_where(eqn)}")
    out_shape = tuple(eqn.outvars[0].aval.shape)
    return reshape_field(x, out_shape, _where(eqn))


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


def _squeeze(eqn, ins, ctx):
    x = ins[0]
    if isinstance(x, V.Param):
        return x.view(_bind(eqn, [x.value])[0])
    return reshape_field(x, tuple(eqn.outvars[0].aval.shape), _where(eqn))


def _reduce_sum(eqn, ins, ctx):
    x = ins[0]
    where = _where(eqn)
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


def _dot_general(eqn, ins, ctx):
    where = _where(eqn)
    a, b = ins
    dn = eqn.params["dimension_numbers"]
    out_shape = tuple(eqn.outvars[0].aval.shape)
    if isinstance(b, V.Param) or isinstance(a, V.Param):
        u, w = (a, b) if isinstance(b, V.Param) else (b, a)
        if isinstance(u, V.Param):
            raise V.TheoryError(f"{where}: a product of two parameters has no rule")
        u_is_lhs = u is a
        if isinstance(u, V.Det):
            (lc, rc), _ = dn
            cu = lc if u_is_lhs else rc
            u = _as_field(u, u.shape, cu[-1], where)
            if u is None:  # zeros times a parameter: zeros (an RNN's initial state)
                return V.Det(np.zeros(out_shape, eqn.outvars[0].aval.dtype), zero=True)
        try:
            rule, w_out = C.dense_rule(u.shape, u.axis, w.shape, dn, u_is_lhs)
        except V.TheoryError as err:
            raise V.TheoryError(f"{where}: {err}") from None
        return V.Contraction(out_shape, w_out, where, param=w, inp=u, rule=rule)
    if isinstance(a, V.Field) and isinstance(b, V.Field):
        return _field_product(eqn, a, b, ctx, where)
    return _dot_det(eqn, ins, ctx, where)


def _dot_det(eqn, ins, ctx, where):
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
    return _structural(eqn, ins, ctx, w_out=pos)


def _field_product(eqn, a, b, ctx, where):
    """``sum_c a_c b_c`` over the widths: ``C G(a, b)`` at paired positions (law of large
    numbers); the dropped fluctuation's variance ``C (q_a q_b + G^2)`` is recorded."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if a.axis not in lc or b.axis not in rc or lc.index(a.axis) != rc.index(b.axis):
        raise V.TheoryError(f"{where}: a product of two fields that does not pair their widths")
    G = ctx.alg.gram(a, b)
    qa, qb = ctx.alg.variances(a), ctx.alg.variances(b)
    sa = [i for i in range(len(a.shape)) if i != a.axis]
    sb = [i for i in range(len(b.shape)) if i != b.axis]
    letters = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    la = {i: next(letters) for i in sa}
    lb_ = {i: next(letters) for i in sb}
    for x, y in zip(lc, rc, strict=True):
        if x != a.axis:
            lb_[y] = la[x]
    for x, y in zip(lb, rb, strict=True):
        lb_[y] = la[x]
    fa = [i for i in sa if i not in lc and i not in lb]
    fb = [i for i in sb if i not in rc and i not in rb]
    out = [la[i] for i in lb] + [la[i] for i in fa] + [lb_[i] for i in fb]
    spec_in = "".join(la[i] for i in sa) + "".join(lb_[i] for i in sb)
    spec = spec_in + "->" + "".join(out)
    Cw = a.shape[a.axis]
    value = Cw * jnp.einsum(spec, G)
    outer = qa.reshape(qa.shape + (1,) * qb.ndim) * qb.reshape((1,) * qa.ndim + qb.shape)
    noise = Cw * jnp.einsum(spec, outer + G**2)
    shape = tuple(eqn.outvars[0].aval.shape)
    zero = a.zero_mean and b.zero_mean and not (a.params & b.params)
    return V.Det(value.reshape(shape), zero=zero, noise=noise.reshape(shape))


def _conv(eqn, ins, ctx):
    where = _where(eqn)
    u, w = ins
    if not isinstance(w, V.Param):
        raise V.TheoryError(f"{where}: a convolution by a fixed (non-parameter) kernel has no rule")
    out_shape = tuple(eqn.outvars[0].aval.shape)
    if isinstance(u, V.Det):
        u = _as_field(u, u.shape, eqn.params["dimension_numbers"].lhs_spec[1], where)
        if u is None:
            return V.Det(np.zeros(out_shape, eqn.outvars[0].aval.dtype), zero=True)
    try:
        rule, w_out = C.conv_rule(u.shape, u.axis, w.shape, out_shape, eqn.params)
    except V.TheoryError as err:
        raise V.TheoryError(f"{where}: {err}") from None
    return V.Contraction(out_shape, w_out, where, param=w, inp=u, rule=rule)


def _slice(eqn, ins, ctx):
    x = ins[0]
    if isinstance(x, V.Param):
        key = (*x.key, ("slice", tuple(eqn.params["start_indices"]),
                        tuple(eqn.params["limit_indices"])))  # fmt: skip
        return V.Param(key, x.path + "[slice]", _bind(eqn, [x.value])[0])
    return _structural(eqn, ins, ctx)


def _stack_rule(eqn, ins, ctx):
    axis = _layout([x for x in ins if isinstance(x, V.Field)], _where(eqn))
    return _structural(eqn, ins, ctx, w_out=axis + (eqn.params["axis"] <= axis))


def _stop_gradient(eqn, ins, ctx):
    return ins[0]


_RULES: dict[str, Callable] = {
    "add": _add,
    "add_any": _add,
    "sub": _sub,
    "neg": _neg,
    "mul": _mul,
    "div": _div,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "transpose": _transpose,
    "broadcast_in_dim": _broadcast_in_dim,
    "reshape": _reshape,
    "squeeze": _squeeze,
    "expand_dims": _squeeze,
    "reduce_sum": _reduce_sum,
    "slice": _slice,
    "stop_gradient": _stop_gradient,
    "stack": _stack_rule,
    **{name: _identity for name in _IDENTITY},
    **{
        name: _structural
        for name in ("pad", "rev", "dynamic_slice", "reduce_window_sum", "cumsum", "concatenate")
    },
}
