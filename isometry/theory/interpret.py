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

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from isometry.theory import elementwise as EW
from isometry.theory import ops as O
from isometry.theory import products as P
from isometry.theory import structure as S
from isometry.theory import values as V

__all__ = ["evaluate", "used"]

Array = jax.Array
Context = O.Context


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

_NOISE_LINEAR = {"add", "sub", "neg", "mul", "div", "convert_element_type", "reshape",
                 "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "copy",
                 "stop_gradient"}  # fmt: skip

_PERMUTATIONS = {"convert_element_type", "reshape", "transpose", "copy", "squeeze",
                 "expand_dims"}  # fmt: skip

_ZERO_FIRST = {"neg", "convert_element_type", "reshape", "transpose", "broadcast_in_dim",
               "squeeze", "expand_dims", "copy", "reduce_sum", "square", "integer_pow",
               "dot_general", "slice", "rev", "stop_gradient", "div"}  # fmt: skip


def evaluate(jaxpr, consts, args, ctx: O.Context) -> list:
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
    return isinstance(x, (V.Det, V.Param, V.Field, O.ScaledParam))


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
        rule = EW.pointwise if name in _ELEMENTWISE else _no_rule
    if name != "mul" and any(isinstance(x, O.ScaledParam) for x in ins):
        ins = O.fieldify(ins, O.where(eqn))
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
    raise V.TheoryError(f"no rule for {O.where(eqn)} applied to a {kinds}{hint}")


def _det(eqn, ins, ctx) -> list:
    vals = [d.value for d in ins]
    if all(not isinstance(v, jax.core.Tracer) for v in vals):
        with jax.ensure_compile_time_eval():  # constants fold while the program is traced
            outs = O.bind(eqn, vals)
    else:
        outs = O.bind(eqn, vals)
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
        ctx.checks.append(("fluctuation", O.scope(eqn), std))
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
    return O.bind(eqn, [d.noise if d.noise is not None else d.value for d in ins])[0]


def _jacobians(eqn, ins, vals):
    """``d out / d x_index`` of a deterministic operation, ``out.shape + (n,)``, by ``jvp``."""
    idx = [i for i, d in enumerate(ins) if d.jac is not None]
    if any(not jnp.issubdtype(jnp.result_type(vals[i]), jnp.floating) for i in idx):
        return None

    def f(*xs):
        full = list(vals)
        for i, x in zip(idx, xs, strict=True):
            full[i] = x
        return O.bind(eqn, full)

    primals = [vals[i] for i in idx]

    def tangent(*ts):
        return jax.jvp(f, primals, list(ts))[1]

    tans = [ins[i].jac for i in idx]
    out = jax.vmap(tangent, in_axes=-1, out_axes=-1)(*tans)
    return [o if jnp.issubdtype(o.dtype, jnp.floating) else None for o in out]


def _inner(eqn):
    sub = eqn.params[_CALLS[eqn.primitive.name]]
    if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):
        return sub.jaxpr, [V.Det(jnp.asarray(c)) for c in sub.consts]
    return sub, []


def _call(eqn, ins, ctx) -> list:
    jaxpr, consts = _inner(eqn)
    with O.inside(eqn):
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
    where = O.where(eqn)
    tap = ctx.stack is not None and length == ctx.stack[0] and not ctx.stack_outputs
    for i in steps:
        xi = [_index(x, i, where) for x in xs]
        with O.inside(eqn):
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
        h = V.Sum(h.shape, h.axis, where, terms=(h, O.as_field(probe, h.shape, h.axis, where)),
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
    f = O.as_field(v, like.shape, like.axis, where)
    if f is None:
        return V.Data(like.shape, like.axis, where, det=V.Det(jnp.zeros(like.shape), zero=True))
    return f


_RULES: dict[str, Callable] = {
    "add": EW.add,
    "add_any": EW.add,
    "sub": EW.sub,
    "neg": EW.neg,
    "mul": EW.mul,
    "div": EW.div,
    "dot_general": P.dot_general,
    "conv_general_dilated": P.conv,
    "transpose": S.transpose,
    "broadcast_in_dim": S.broadcast_in_dim,
    "reshape": S.reshape,
    "squeeze": S.squeeze,
    "expand_dims": S.squeeze,
    "reduce_sum": S.reduce_sum,
    "slice": S.slice_,
    "stop_gradient": S.stop_gradient,
    "stack": S.stack,
    **{name: EW.identity for name in _IDENTITY},
    **{
        name: S.structural
        for name in ("pad", "rev", "dynamic_slice", "reduce_window_sum", "cumsum", "concatenate")
    },
}
