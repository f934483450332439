"""Cross-Gram matrices and width means of random fields: the engine's equations.

For fields ``a, b`` (:mod:`isometry.theory.values`) the engine computes, lazily
and once per pair, the forward cross-Gram

    G(a, b)[s, t] = lim (1/C) sum_c a[s, c] b[t, c]          shape a.struct + b.struct

and, for a *tangent kind* ``k`` (a perturbation: of the input example, of a cut
point's output, or of a set of parameters), the tangent cross-Gram
``T_k(a, b)``, the same statistic of the first-order changes of ``a`` and
``b``. The rules, one per kind of node (Lee et al. 2018; Jacot et al. 2018;
Yang 2019 "Tensor Programs I" for the general case of shared weights):

* linear structural maps and sums: linear, ``G(L a, b) = L G(a, b)``;
* independent fields (no parameter in common, not both holding
  deterministic data): ``G(a, b) = mean(a) mean(b)^T``;
* deterministic data ``x, y``: ``G = x . y / C`` exactly;
* a parameter added, ``P``: ``G(P, P) = mean(P^2)`` where both positions read
  the same entries of ``P`` (a fresh Gaussian);
* contractions with the same parameter ``W`` of variance ``sigma^2 = fan_in
  mean(W^2)``: ``G(W u, W v) = sigma^2 R[G(u, v)]`` with ``R`` the contraction's
  structure map (a dense layer: identity; a convolution: the sum over taps of
  shifted Grams; a flatten: the average over merged positions);
* an elementwise function of Gaussian fields: the Gaussian expectations
  ``G(f(z), g(w)) = E[f(u) g(v)]``, ``(u, v)`` with variances
  ``G(z, z)_ss, G(w, w)_tt`` and covariance ``G(z, w)_st``; against a
  contraction (Stein's lemma) ``G(W u, f(z)) = G(W u, z) E[f'(z)]``;
* tangents: the same maps, elementwise functions by ``E[f'(u) g'(v)]
  T_k(z, w)`` (the tangent is independent of the primal in the limit: exact
  for perturbations of hidden units and parameters, ``O(1 / d_in)`` for the
  input's), plus each perturbed parameter's own term: ``fan_in R[G(u, v)]``
  for a weight, ``1`` for an added parameter, ``G(a, b)`` for a gain (standard
  parameterization; times the parameter's mean square in the NTK one).

Width means: ``mean(W u) = 0``, ``mean(f(z)) = E[f(z)]``, ``mean(a b) =
diag G(a, b)``; linear maps apply.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from isometry.theory import values as V

__all__ = ["Algebra", "Kind", "swap_sides"]

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Kind:
    """A tangent kind: which perturbation's first-order change is followed.

    Attributes:
        name: a label.
        sources: data sources perturbed (``"input"``: the input example followed by
            its Jacobian; ``"x"``: every input entry; a cut probe's tag), each with an
            identity covariance per coordinate.
        params: keys of the parameters perturbed (i.i.d. unit-variance changes).
        ntk: scale each parameter's change by its root mean square (the NTK
            parameterization) instead of 1 (standard).
    """

    name: str
    sources: frozenset = frozenset()
    params: frozenset = frozenset()
    ntk: bool = False


def swap_sides(G: Array, n_left: int, n_right: int) -> Array:
    """``G (left + right + extra) -> (right + left + extra)``."""
    n = n_left + n_right
    perm = tuple(range(n_left, n)) + tuple(range(n_left)) + tuple(range(n, G.ndim))
    return jnp.transpose(G, perm)


def _fresh(z: V.Field, used: frozenset) -> bool:
    """``z`` is a linear map of contractions and added parameters none of which is in
    ``used`` (their inputs may be anything)."""
    if isinstance(z, (V.Contraction, V.Additive)):
        return z.param.key not in used
    if isinstance(z, V.Sum):
        return all(_fresh(t, used) for t in z.terms)
    if isinstance(z, V.Linear):
        return all(_fresh(t, used) for t in z.inputs)
    if isinstance(z, (V.Split, V.Gain)):
        return _fresh(z.inp, used)
    return False


def _outer(ma, mb, sa, sb, dtype) -> Array:
    if ma is None or mb is None:
        return jnp.zeros(tuple(sa) + tuple(sb), dtype)
    return jnp.reshape(ma, tuple(sa) + (1,) * len(sb)) * jnp.reshape(mb, (1,) * len(sa) + tuple(sb))


def _trail(x: Array, n: int) -> Array:
    """``x`` with ``n`` trailing unit axes (to broadcast against a kinds axis)."""
    return jnp.reshape(x, jnp.shape(x) + (1,) * n)


class Algebra:
    """The memoized cross-Grams, tangent Grams and width means of one evaluation.

    Tangent Grams of several kinds are computed together: ``tangent(a, b, kinds)`` has a
    trailing axis over ``kinds`` (they share every linear map; only where a perturbation
    enters do they differ), so following ``K`` perturbations costs about one pass.

    Args:
        dtype: the floating dtype of the theory (float64 under ``jax_enable_x64``).
        override: ``override(param) -> sigma^2 or None``: a variance given by the user
            (``fan_in E[W^2]`` of a weight, ``E[b^2]`` of an added parameter) instead of
            the one read from the parameter's values.
        kernels: the elementwise expectations
            (:class:`isometry.theory.expectations.Expectations`).
    """

    def __init__(self, dtype, override, kernels):
        self.dtype = dtype
        self.override = override
        self.kernels = kernels
        self._gram: dict = {}
        self._mean: dict = {}

    # ------------------------------------------------------------------ means

    def mean(self, a: V.Field) -> Array | None:
        """``mean(a)`` over the width, shape ``a.struct``; ``None`` when structurally zero."""
        if a.zero_mean:
            return None
        key = a
        if key not in self._mean:
            self._mean[key] = self._mean_of(a)
        return self._mean[key]

    def _mean_of(self, a):
        if isinstance(a, V.Data):
            return jnp.mean(jnp.asarray(a.det.value, self.dtype), axis=a.axis)
        if isinstance(a, V.Sum):
            parts = [(c, self.mean(t)) for c, t in zip(a.coefs, a.terms, strict=True)]
            parts = [c * m for c, m in parts if m is not None]
            return sum(parts[1:], parts[0]) if parts else None
        if isinstance(a, V.Linear):
            ms = [self._zeros_if_none(self.mean(i), i) for i in a.inputs]
            return a.apply([m[..., None] for m in ms])[..., 0]
        if isinstance(a, V.Pointwise):
            return self.kernels.mean(self, a)
        if isinstance(a, V.Gain):
            return self._gain_mean(a.gain) * self.mean(a.inp)
        if isinstance(a, V.Merge):
            return jnp.mean(self.mean(a.inp), axis=a.merged)
        if isinstance(a, V.Split):
            m = jnp.expand_dims(self.mean(a.inp), a.head_axis)
            return jnp.broadcast_to(m, a.struct)
        raise V.TheoryError(f"no width mean for {type(a).__name__} at {a.where}")

    def _zeros_if_none(self, m, f: V.Field):
        return jnp.zeros(f.struct, self.dtype) if m is None else m

    def variances(self, a: V.Field) -> Array:
        """``G(a, a)`` at equal positions: the per-coordinate second moment, ``a.struct``."""
        G = self.gram(a, a)
        k = math.prod(a.struct)
        return jnp.diagonal(G.reshape(k, k)).reshape(a.struct)

    # ------------------------------------------------------------------ grams

    def gram(self, a: V.Field, b: V.Field) -> Array:
        """``G(a, b)``: ``a.struct + b.struct``."""
        return self._cross(a, b, None)

    def tangent(self, a: V.Field, b: V.Field, kinds: tuple) -> Array:
        """``T_k(a, b)`` for each ``k`` in ``kinds``: ``a.struct + b.struct + (len(kinds),)``."""
        return self._cross(a, b, tuple(kinds))

    def _cross(self, a, b, kinds):
        key = (a, b, kinds)  # the nodes themselves: kept alive, so no id is reused
        if key not in self._gram:
            self._gram[key] = jnp.asarray(self._cross_of(a, b, kinds), self.dtype)
        return self._gram[key]

    def _zeros(self, a, b, kinds) -> Array:
        extra = () if kinds is None else (len(kinds),)
        return jnp.zeros(a.struct + b.struct + extra, self.dtype)

    def _independent(self, a, b) -> bool:
        return not (a.params & b.params) and not (a.data and b.data)

    def _tangent_free(self, a, b, kinds) -> bool:
        """Under every kind, the tangents of ``a`` and ``b`` are uncorrelated for sure."""
        touched = frozenset().union(*(k.sources | k.params for k in kinds))
        sources = frozenset().union(*(k.sources for k in kinds))
        if not (touched & (a.sources | a.params)) or not (touched & (b.sources | b.params)):
            return True
        return not (a.params & b.params) and not (sources & a.sources & b.sources)

    def _fresh_pointwise(self, f, other) -> bool:
        """``f = g(z)`` with ``z`` built from parameters that ``other`` does not use (a
        fresh contraction, its bias): given ``other``, ``z``'s coordinates are fresh
        Gaussians, so ``G(g(z), other) = mean(g(z)) mean(other)`` and tangents decouple."""
        return (
            isinstance(f, V.Pointwise) and len(f.leaves) == 1 and _fresh(f.leaves[0], other.params)
        )

    def _cross_of(self, a, b, kinds):
        if kinds is not None and self._tangent_free(a, b, kinds):
            return self._zeros(a, b, kinds)
        if kinds is None and self._independent(a, b):
            return _outer(self.mean(a), self.mean(b), a.struct, b.struct, self.dtype)
        if self._fresh_pointwise(a, b) or self._fresh_pointwise(b, a):
            if kinds is not None:
                return self._zeros(a, b, kinds)
            return _outer(self.mean(a), self.mean(b), a.struct, b.struct, self.dtype)
        for side, node in ((0, a), (1, b)):
            out = self._unfold(side, node, a, b, kinds)
            if out is not None:
                return out
        return self._atoms(a, b, kinds)

    def _unfold(self, side, node, a, b, kinds):
        """Cross-Gram through a composite on ``side`` (0: left ``a``, 1: right ``b``)."""
        other = b if side == 0 else a
        no, nn = len(other.struct), len(node.struct)

        def g(x):  # cross of an input of `node` with the other field, node's side first
            if side == 0:
                return self._cross(x, other, kinds)
            return swap_sides(self._cross(other, x, kinds), no, len(x.struct))

        def back(G):  # node's side first -> (a, b) order
            return G if side == 0 else swap_sides(G, nn, no)

        if isinstance(node, V.Sum):
            parts = [c * g(t) for c, t in zip(node.coefs, node.terms, strict=True)]
            return back(sum(parts[1:], parts[0]))
        if isinstance(node, V.Linear):
            return back(node.apply([g(i) for i in node.inputs]))
        if isinstance(node, V.Gain) and not isinstance(other, V.Gain):
            return back(self._gain_mean(node.gain) * g(node.inp))
        return None

    def _gain_mean(self, gain) -> Array:
        return jnp.mean(jnp.asarray(gain.value, self.dtype))

    def _gain_sq(self, gain) -> Array:
        return jnp.mean(jnp.asarray(gain.value, self.dtype) ** 2)

    def _mask(self, kinds, test) -> Array:
        """``(len(kinds),)``: 1 where ``test(kind)``, else 0."""
        return jnp.asarray([1.0 if test(k) else 0.0 for k in kinds], self.dtype)

    # ------------------------------------------------------------------ atoms

    def _atoms(self, a, b, kinds):
        if isinstance(a, V.Gain) and isinstance(b, V.Gain):
            return self._gains(a, b, kinds)
        if isinstance(a, V.Merge) and isinstance(b, V.Merge):
            return self._merged(a, b, kinds)
        if isinstance(a, V.Split) and isinstance(b, V.Split):
            return self._split(a, b, kinds)
        if isinstance(a, V.Data) and isinstance(b, V.Data):
            return self._data(a, b, kinds)
        if isinstance(a, V.Additive) and isinstance(b, V.Additive):
            return self._additive(a, b, kinds)
        if isinstance(a, V.Contraction) and isinstance(b, V.Contraction):
            return self._contractions(a, b, kinds)
        if isinstance(a, V.Pointwise) or isinstance(b, V.Pointwise):
            return self.kernels.cross(self, a, b, kinds)
        if kinds is None and not (a.data and b.data):
            return _outer(self.mean(a), self.mean(b), a.struct, b.struct, self.dtype)
        gaussian = (V.Contraction, V.Additive)
        if kinds is not None and (isinstance(a, gaussian) or isinstance(b, gaussian)):
            return self._zeros(a, b, kinds)
        raise V.TheoryError(
            f"no rule for the cross-Gram of {type(a).__name__} ({a.where}) and "
            f"{type(b).__name__} ({b.where})"
        )

    def _data(self, a, b, kinds):
        if a.axis is None or b.axis is None:
            raise V.TheoryError(f"deterministic data without a width axis at {a.where}")
        if kinds is None:
            x = jnp.moveaxis(jnp.asarray(a.det.value, self.dtype), a.axis, -1)
            y = jnp.moveaxis(jnp.asarray(b.det.value, self.dtype), b.axis, -1)
            return jnp.tensordot(x, y, axes=((-1,), (-1,))) / a.width
        out = []
        for k in kinds:
            T = self._zeros(a, b, None)
            src = a.det.source
            if src is not None and src == b.det.source and src in k.sources:
                T = T + self._identity(a)
            if "input" in k.sources and a.det.jac is not None and b.det.jac is not None:
                ja = jnp.moveaxis(jnp.asarray(a.det.jac, self.dtype), a.axis, -2)
                jb = jnp.moveaxis(jnp.asarray(b.det.jac, self.dtype), b.axis, -2)
                T = T + jnp.tensordot(ja, jb, axes=((-2, -1), (-2, -1))) / a.width
            out.append(T)
        return jnp.stack(out, axis=-1)

    def _identity(self, a) -> Array:
        k = math.prod(a.struct)
        return jnp.eye(k, dtype=self.dtype).reshape(a.struct + a.struct)

    def _additive(self, a, b, kinds):
        if a.param.key != b.param.key or a.shape != b.shape:
            return self._zeros(a, b, kinds)
        var = self.additive_variance(a.param)
        eye = self._identity(a)
        if kinds is None:
            return var * eye
        scale = jnp.stack([(var if k.ntk else 1.0) * (a.param.key in k.params) for k in kinds])
        return eye[..., None] * jnp.asarray(scale, self.dtype)

    def additive_variance(self, p: V.Param) -> Array:
        """``E[P^2]`` of an added parameter: the override, else its mean square."""
        o = self.override(p)
        return jnp.mean(jnp.asarray(p.value, self.dtype) ** 2) if o is None else o

    def _contractions(self, a, b, kinds):
        if a.param.key != b.param.key:
            return self._zeros(a, b, kinds)
        if a.rule != b.rule:
            raise V.TheoryError(
                f"the parameter {a.param.path} is contracted in two different ways "
                f"({a.where}; {b.where}): no rule for that weight sharing"
            )
        W = jnp.asarray(a.param.value, self.dtype)
        sigma2 = self.override(a.param)
        out = a.rule.forward(self._cross(a.inp, b.inp, kinds), W, sigma2)
        if kinds is not None and any(a.param.key in k.params for k in kinds):
            G = self.gram(a.inp, b.inp)
            own = [a.rule.weight(G, W, k.ntk, sigma2) * (a.param.key in k.params) for k in kinds]
            out = out + jnp.stack(own, axis=-1)
        return out

    def _gains(self, a, b, kinds):
        e = 0 if kinds is None else 1
        if a.gain is not b.gain and getattr(a.gain, "key", 0) != getattr(b.gain, "key", 1):
            ma, mb = self._gain_mean(a.gain), self._gain_mean(b.gain)
            return ma * mb * self._cross(a.inp, b.inp, kinds)
        out = self._gain_sq(a.gain) * self._cross(a.inp, b.inp, kinds)
        if e and isinstance(a.gain, V.Param) and any(a.gain.key in k.params for k in kinds):
            G = self.gram(a.inp, b.inp)
            sq = self._gain_sq(a.gain)
            scale = jnp.stack(
                [jnp.asarray((sq if k.ntk else 1.0) * (a.gain.key in k.params)) for k in kinds]
            )
            out = out + G[..., None] * scale.astype(self.dtype)
        return out

    def _merged(self, a, b, kinds):
        if a.merged != b.merged or a.inp.struct != b.inp.struct:
            raise V.TheoryError(f"fields flattened differently at {a.where} and {b.where}")
        G = self._cross(a.inp, b.inp, kinds)
        n = len(a.inp.struct)
        extra = tuple(range(2 * n, G.ndim))
        keep = [i for i in range(n) if i not in a.merged]
        perm = keep + list(a.merged) + [n + i for i in keep] + [n + i for i in a.merged]
        Gp = jnp.transpose(G, tuple(perm) + extra)
        kl = [a.inp.struct[i] for i in keep]
        M = math.prod(a.inp.struct[i] for i in a.merged)
        tail = G.shape[2 * n :]
        Gp = Gp.reshape(*kl, M, *kl, M, *tail)
        Gp = jnp.diagonal(Gp, axis1=len(kl), axis2=2 * len(kl) + 1)  # diagonal moved last
        return jnp.mean(Gp, axis=-1).reshape(a.struct + b.struct + tail)

    def _split(self, a, b, kinds):
        if a.head_axis != b.head_axis or a.struct != b.struct:
            raise V.TheoryError(f"widths split differently at {a.where} and {b.where}")
        G = self._cross(a.inp, b.inp, kinds)
        H = a.struct[a.head_axis]
        na = len(a.inp.struct)
        G = jnp.expand_dims(jnp.expand_dims(G, na + b.head_axis), a.head_axis)
        shape = [1] * G.ndim
        shape[a.head_axis] = H
        shape[na + 1 + b.head_axis] = H
        eye = jnp.eye(H, dtype=self.dtype).reshape(shape)
        out = G * eye
        if kinds is None:
            off = _outer(self.mean(a), self.mean(b), a.struct, b.struct, self.dtype)
            out = out + off * (1.0 - eye)
        return out
