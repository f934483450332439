"""Rules for products over the width: contractions with a parameter (dense layers,
multi-head projections, convolutions: :mod:`isometry.theory.contractions`), and the
product of two fields over their widths (attention logits ``q . k``), whose
deterministic limit is ``C G(q, k)`` at paired positions by the law of large numbers;
the fluctuation that limit drops, of variance ``C (q_a q_b + G^2)``, is recorded so
that the engine can say how far from the limit a model is.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from isometry.theory import contractions as C
from isometry.theory import ops as O
from isometry.theory import structure as S
from isometry.theory import values as V

__all__ = ["conv", "dot_general"]


def dot_general(eqn, ins, ctx):
    """The rule of ``dot_general``: a contraction of a field with a parameter or with data."""
    where = O.where(eqn)
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
            u = O.as_field(u, u.shape, cu[-1], where)
            if u is None:  # zeros times a parameter: zeros (an RNN's initial state)
                return V.Det(np.zeros(out_shape, eqn.outvars[0].aval.dtype), zero=True)
        try:
            rule, w_out = C.dense_rule(u.shape, u.axis, w.shape, dn, u_is_lhs)
        except V.TheoryError as err:
            raise V.TheoryError(f"{where}: {err}") from None
        return V.Contraction(out_shape, w_out, where, param=w, inp=u, rule=rule)
    if isinstance(a, V.Field) and isinstance(b, V.Field):
        return _field_product(eqn, a, b, ctx, where)
    return S.dot_det(eqn, ins, ctx, where)


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


def conv(eqn, ins, ctx):
    """The rule of ``conv_general_dilated``: a convolution of a field with a parameter."""
    where = O.where(eqn)
    u, w = ins
    if not isinstance(w, V.Param):
        raise V.TheoryError(f"{where}: a convolution by a fixed (non-parameter) kernel has no rule")
    out_shape = tuple(eqn.outvars[0].aval.shape)
    if isinstance(u, V.Det):
        u = O.as_field(u, u.shape, eqn.params["dimension_numbers"].lhs_spec[1], where)
        if u is None:
            return V.Det(np.zeros(out_shape, eqn.outvars[0].aval.dtype), zero=True)
    try:
        rule, w_out = C.conv_rule(u.shape, u.axis, w.shape, out_shape, eqn.params)
    except V.TheoryError as err:
        raise V.TheoryError(f"{where}: {err}") from None
    return V.Contraction(out_shape, w_out, where, param=w, inp=u, rule=rule)
