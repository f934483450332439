"""Contractions with a parameter: dense layers, multi-head projections, convolutions.

A field ``u`` contracted over its width with a parameter ``W`` whose entries are
independent with mean zero gives, in the wide limit, a fresh Gaussian field
(Neal 1996; Lee et al. 2018; Novak et al. 2019 for convolutions):

    dense       G(W u, W v)[s, t] = sigma^2 mean_c G(u, v)[(s, c), (t, c)]
    convolution G(W * u, W * v)[p, q] = sum_o v_o G(u, v)[p S + o D - P, q S + o D - P]

``sigma^2 = fan_in mean(W^2)``; ``mean_c`` averages the diagonal over any
structure axes contracted with the width (a flatten followed by a dense layer,
the heads of a multi-head output projection); axes of ``W`` that are batch
dimensions of the product (an ensemble, a ``vmap``) or extra output axes (the
heads of a multi-head input projection) give ``delta`` factors: their slices are
independent. For a convolution with window offset ``o`` (dilation ``D``, stride
``S``, padding ``P``; zero outside the input), ``v_o = C_in mean_ij W[o, i, j]^2``
is the variance of tap ``o`` (``sum_o v_o = sigma^2``): a Gaussian kernel spreads
it evenly, a delta-orthogonal one (Xiao et al. 2018) puts it all at the centre.

Each rule is a frozen dataclass: equal rules are the same contraction, which is
what weight sharing (an RNN over time, a convolution over positions) needs.
``forward(G, W, sigma2=None)`` is the map above (``sigma2`` overrides the
variance read from ``W``); ``weight(G, W, ntk)`` is the weight's own term of a
tangent Gram: ``sum_ij dy/dW_ij dy'/dW_ij`` per output unit, ``fan_in R[G]``
(times ``mean(W^2)`` in the NTK parameterization).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import string

import jax
import jax.numpy as jnp

from isometry.theory.values import TheoryError

__all__ = ["ConvRule", "DenseRule"]

Array = jax.Array


def _mean_sq(W) -> Array:
    return jnp.mean(jnp.asarray(W) ** 2)


def _ntk_scale(W, ntk: bool, sigma2, fan_in: int):
    """The factor of a weight's own tangent term: 1 (standard), ``E[W^2]`` (NTK)."""
    if not ntk:
        return 1.0
    return _mean_sq(W) if sigma2 is None else sigma2 / fan_in


@dataclasses.dataclass(frozen=True)
class DenseRule:
    """``dot_general`` of a field (or data) ``u`` with a parameter ``W``.

    Attributes:
        n_in: structure axes of ``u`` (one side of the input Gram).
        roles: per structure axis of ``u``: ``("b", j)`` batch axis ``j`` of the
            product, ``("f", j)`` free axis ``j`` of ``u``'s free axes,
            ``("c", j)`` contracted with the width.
        out_order: the output structure axes in output order, each
            ``("b", j)``, ``("f", j)`` or ``("w", j)`` (free axis ``j`` of ``W``
            other than the new width: a ``delta`` axis).
        w_sizes: sizes of ``W``'s ``delta`` free axes, by ``j``.
        fan_in: product of the contracted sizes (the width included).
        n_contracted: number of contracted structure positions.
    """

    n_in: int
    roles: tuple
    out_order: tuple
    w_sizes: tuple
    fan_in: int
    n_contracted: int
    gaussian: bool = True

    def structure(self, G: Array) -> Array:
        """``R[G]``: the unit-variance map of an input Gram ``(u.struct, v.struct)``."""
        letters = iter(string.ascii_letters)
        left = [next(letters) for _ in range(self.n_in)]
        right = [left[i] if r[0] == "c" else next(letters) for i, r in enumerate(self.roles)]
        named = {r: (left[i], right[i]) for i, r in enumerate(self.roles) if r[0] != "c"}
        kept = [r for r in self.out_order if r[0] != "w"]
        subs = "".join(named[r][0] for r in kept) + "".join(named[r][1] for r in kept)
        spec = "".join(left) + "".join(right) + "...->" + subs + "..."
        out = jnp.einsum(spec, G) / self.n_contracted
        tail = out.shape[2 * len(kept) :]
        sizes = [self.w_sizes[r[1]] if r[0] == "w" else None for r in self.out_order]
        it = iter(out.shape[: len(kept)])
        shape = [1 if s is not None else next(it) for s in sizes]
        out = out.reshape(shape + shape + list(tail))
        n = len(self.out_order)
        for pos, r in enumerate(self.out_order):
            if r[0] in ("b", "w"):
                size = out.shape[pos] if r[0] == "b" else sizes[pos]
                eye = [1] * out.ndim
                eye[pos] = eye[n + pos] = size
                out = out * jnp.eye(size, dtype=out.dtype).reshape(eye)
        return out

    def forward(self, G: Array, W, sigma2=None) -> Array:
        s2 = self.fan_in * _mean_sq(W) if sigma2 is None else sigma2
        return s2 * self.structure(G)

    def weight(self, G: Array, W, ntk: bool, sigma2=None) -> Array:
        scale = _ntk_scale(W, ntk, sigma2, self.fan_in)
        return self.fan_in * scale * self.structure(G)


def dense_rule(u_shape, u_axis, W_shape, dimension_numbers, u_is_lhs: bool) -> tuple:
    """The :class:`DenseRule` of ``dot_general(u, W)`` (or ``(W, u)``) and the output's
    width axis, or raise :class:`TheoryError` where the product is not a width contraction."""
    (lc, rc), (lb, rb) = dimension_numbers
    uc, wc = (lc, rc) if u_is_lhs else (rc, lc)
    ub, wb = (lb, rb) if u_is_lhs else (rb, lb)
    uc, wc, ub, wb = map(tuple, (uc, wc, ub, wb))
    if u_axis is None or u_axis not in uc:
        raise TheoryError(
            "a parameter contracts structure axes but not the width (mixing tokens or "
            "positions with one shared matrix): no infinite-width rule"
        )
    u_free = [i for i in range(len(u_shape)) if i not in uc and i not in ub]
    w_free = [i for i in range(len(W_shape)) if i not in wc and i not in wb]
    if not w_free:
        raise TheoryError("a parameter contraction without an output axis")
    struct_axes = [i for i in range(len(u_shape)) if i != u_axis]
    roles = []
    for i in struct_axes:
        if i in ub:
            roles.append(("b", ub.index(i)))
        elif i in uc:
            roles.append(("c", uc.index(i)))
        else:
            roles.append(("f", u_free.index(i)))
    # output axes of dot_general: batch, lhs free, rhs free
    w_roles = [("w", j) for j in range(len(w_free) - 1)] + [("width", 0)]
    u_roles = [("f", j) for j in range(len(u_free))]
    b_roles = [("b", j) for j in range(len(ub))]
    order = b_roles + (u_roles + w_roles if u_is_lhs else w_roles + u_roles)
    out_axis = order.index(("width", 0))
    out_order = tuple(r for r in order if r[0] != "width")
    fan_in = math.prod(u_shape[i] for i in uc)
    n_contracted = math.prod(u_shape[i] for i in uc if i != u_axis)
    w_sizes = tuple(W_shape[i] for i in w_free[:-1])
    rule = DenseRule(len(struct_axes), tuple(roles), out_order, w_sizes, fan_in, n_contracted)
    return rule, out_axis


@dataclasses.dataclass(frozen=True)
class ConvRule:
    """``conv_general_dilated(u, W)`` with ``u``'s feature axis its width.

    Attributes:
        n_in: structure axes of ``u`` (batch and spatial, in ``u``'s order).
        batch: index of the batch axis among them; ``spatial``: indices of the
            spatial axes, in the kernel's spatial order.
        out_perm: output structure order, as indices into (batch, spatial...).
        strides, padding, dilation: per spatial axis.
        window: the kernel's spatial shape; ``taps_axes``: ``W``'s spatial axes,
            ``in_axis``: its input-feature axis.
        fan_in: ``C_in prod(window)``.
    """

    n_in: int
    batch: int
    spatial: tuple
    out_perm: tuple
    strides: tuple
    padding: tuple
    dilation: tuple
    window: tuple
    taps_axes: tuple
    in_axis: int
    out_sizes: tuple
    fan_in: int
    gaussian: bool = True

    def taps(self, W) -> Array:
        """``v_o / sigma^2``-free per-tap second moments ``C_in mean_ij W[o, i, j]^2``,
        shape ``window``."""
        W = jnp.asarray(W)
        sq = jnp.moveaxis(W**2, self.taps_axes, range(len(self.taps_axes)))
        c_in = W.shape[self.in_axis]
        return c_in * jnp.mean(sq.reshape(*self.window, -1), axis=-1)

    def structure(self, G: Array, tap_weights: Array) -> Array:
        """``sum_o t_o G[shift_o(p), shift_o(q)]`` on an input Gram ``(u.struct, v.struct)``."""
        n = self.n_in
        order = (self.batch, *self.spatial)
        extra = tuple(range(2 * n, G.ndim))
        G = jnp.transpose(G, order + tuple(n + i for i in order) + extra)
        d = len(self.spatial)
        pad = [(0, 0), *self.padding]
        G = jnp.pad(G, pad + pad + [(0, 0)] * len(extra))
        out = 0.0
        for o in itertools.product(*(range(k) for k in self.window)):
            sl = [slice(None)]
            for i in range(d):
                start = o[i] * self.dilation[i]
                stop = start + (self.out_sizes[i] - 1) * self.strides[i] + 1
                sl.append(slice(start, stop, self.strides[i]))
            out = out + tap_weights[o] * G[tuple(sl + sl)]
        m = 1 + d
        perm = self.out_perm + tuple(m + i for i in self.out_perm)
        return jnp.transpose(out, perm + tuple(range(2 * m, out.ndim)))

    def forward(self, G: Array, W, sigma2=None) -> Array:
        t = self.taps(W)
        if sigma2 is not None:
            total = jnp.sum(t)
            uniform = jnp.full(self.window, 1.0 / math.prod(self.window), t.dtype)
            t = sigma2 * jnp.where(total > 0, t / jnp.where(total > 0, total, 1.0), uniform)
        return self.structure(G, t)

    def weight(self, G: Array, W, ntk: bool, sigma2=None) -> Array:
        c_in = jnp.asarray(W).shape[self.in_axis]
        scale = c_in * _ntk_scale(W, ntk, sigma2, self.fan_in)
        return self.structure(G, jnp.full(self.window, scale))


def conv_rule(u_shape, u_axis, W_shape, out_shape, params) -> tuple:
    """The :class:`ConvRule` of a convolution of ``u`` by a parameter and the output's width
    axis; raise :class:`TheoryError` for what it does not cover."""
    dn = params["dimension_numbers"]
    lhs, rhs, out = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    if u_axis != lhs[1]:
        raise TheoryError("a convolution whose input features are not the field's width")
    if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
        raise TheoryError(
            "a grouped or depthwise convolution: each output sums a finite number of "
            "inputs, so it is not Gaussian in the wide limit (no rule)"
        )
    if any(lo < 0 or hi < 0 for lo, hi in params["padding"]):
        raise TheoryError("a convolution with negative padding (cropping) has no rule")
    if any(v != 1 for v in params["lhs_dilation"]):
        raise TheoryError("a transposed (input-dilated) convolution has no rule")
    struct_axes = [i for i in range(len(u_shape)) if i != u_axis]
    batch = struct_axes.index(lhs[0])
    spatial = tuple(struct_axes.index(a) for a in lhs[2:])
    out_struct = [i for i in range(len(out_shape)) if i != out[1]]
    # output structure in output order, as indices into (batch, spatial...) of out_spec
    canon = [out[0], *out[2:]]
    out_perm = tuple(canon.index(a) for a in out_struct)
    window = tuple(W_shape[a] for a in rhs[2:])
    rule = ConvRule(
        n_in=len(struct_axes),
        batch=batch,
        spatial=spatial,
        out_perm=out_perm,
        strides=tuple(params["window_strides"]),
        padding=tuple(tuple(p) for p in params["padding"]),
        dilation=tuple(params["rhs_dilation"]),
        window=window,
        taps_axes=tuple(rhs[2:]),
        in_axis=rhs[1],
        out_sizes=tuple(out_shape[a] for a in out[2:]),
        fan_in=W_shape[rhs[1]] * math.prod(window),
    )
    return rule, out[1]
