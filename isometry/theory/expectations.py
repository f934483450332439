"""Elementwise functions of Gaussian fields: the expectations of :mod:`isometry.gaussian`.

An elementwise function ``f(z)`` of a Gaussian field ``z`` (a pre-activation)
has, in the wide limit (Neal 1996; Lee et al. 2018; Matthews et al. 2018),

    G(f(z), g(w))[s, t] = E[f(u) g(v)],     (u, v) ~ N(0, [[q_s, k_st], [k_st, r_t]])
    mean(f(z))[s]       = E[f(u)],          u ~ N(0, q_s)
    G(W x, f(z))[s, t]  = G(W x, z)[s, t] E[f'(u_t)]          (Stein's lemma)
    T(f(z), g(w))[s, t] = E[f'(u) g'(v)] T(z, w)[s, t]         (tangents)

with ``q = G(z, z)``, ``r = G(w, w)`` at equal positions and ``k = G(z, w)``.
The function is recognised as an activation of :mod:`isometry.activations` when
it equals one on a dense grid (closed-form kernels: ReLU's arc-cosine kernels,
erf's arcsine kernel, ...; float64-accurate quadrature otherwise); any other
composition of elementwise operations becomes an :func:`activations.custom`
activation, integrated by the feature-aware quadrature (accurate for functions
smooth away from 0).

Width means of a product of two fields need no Gaussian law: ``mean(a b)[s] =
G(a, b)[s, s]`` (the law of large numbers), which is how norms' statistics
(``mean(x^2)``) are read.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from isometry import activations as acts
from isometry import gaussian as gs
from isometry.theory import algebra as A
from isometry.theory import values as V

__all__ = ["Expectations", "identify"]

Array = jax.Array
_CANDIDATES = ("relu", "tanh", "erf", "sigmoid", "sin", "linear", "gelu", "silu", "softplus")
_IDENTIFIED: dict = {}  # composed functions already identified, by their description
_CHUNK = 512  # Gram entries per quadrature batch: bounds memory at (chunk x nodes^2)


def _grid(dtype) -> np.ndarray:
    g = np.concatenate([np.linspace(-20, 20, 4001), np.geomspace(1e-6, 1.0, 50)])
    return np.concatenate([g, -g]).astype(dtype)


def _matches(fn, act, grid, tol, scale=1.0) -> bool:
    try:
        got = np.asarray(fn(jnp.asarray(grid)), float)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return False
    want = scale * np.asarray(act.phi(jnp.asarray(grid)), float)
    return bool(np.all(np.abs(got - want) <= tol * (1.0 + np.abs(want))))


def identify(fn, name: str, dtype) -> acts.Activation:
    """The catalog activation equal to ``fn`` on a dense grid, else a custom one.

    Evaluated eagerly (also while a program is being traced), so a function whose
    constants are traced values is never matched.
    """
    with jax.ensure_compile_time_eval():
        return _identify(fn, name, dtype)


def _identify(fn, name, dtype):
    tol = 1e-12 if jnp.dtype(dtype) == jnp.float64 else 1e-6
    grid = _grid(jnp.dtype(dtype))
    try:
        f1, fm1 = (float(np.asarray(fn(jnp.asarray(v, dtype)))) for v in (1.0, -1.0))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return acts.custom(name or "elementwise", fn, kinks=(0.0,))
    names = [name] if name in acts.names() else []
    cands = [acts.get(c) for c in dict.fromkeys([*names, *_CANDIDATES])]
    if f1 > 0 and fm1 < 0 and 0 < -fm1 / f1 < 1:  # leaky ReLU, slope read off the sides
        cands.append(acts.get("leaky_relu", negative_slope=-fm1 / f1))
    for act in cands:
        ref = float(np.asarray(act.phi(jnp.asarray(1.0, dtype))))
        scale = f1 / ref if ref != 0 else 1.0
        if scale > 0 and _matches(fn, act, grid, tol, scale):
            return act if abs(scale - 1.0) <= tol else scaled(act, scale)
    return acts.custom(name or "elementwise", fn, kinks=(0.0,))


def scaled(act: acts.Activation, s: float) -> acts.Activation:
    """``s * act`` (``s > 0``) with the closed forms of ``act`` scaled (kernels by ``s^2``)."""

    def times(f, power):
        if f is None:
            return None
        return lambda *a, **p: s**power * f(*a, **p)

    return dataclasses.replace(
        act,
        name=f"{s:g}*{act.name}",
        fn=times(act.fn, 1),
        deriv=times(act.deriv, 1),
        kernel=times(act.kernel, 2),
        second_moment=times(act.second_moment, 2),
        deriv_kernel=times(act.deriv_kernel, 2),
        first_moment=times(act.first_moment, 1),
        deriv_mean=times(act.deriv_mean, 1),
        bernoulli_p=None,
    )


def _chunked(fn, *args):
    """``fn`` of broadcast arrays, mapped in chunks of entries (bounded memory)."""
    arrs = jnp.broadcast_arrays(*args)
    shape = arrs[0].shape
    flat = [a.reshape(-1) for a in arrs]
    n = flat[0].size
    if n <= _CHUNK:
        return fn(*flat).reshape(shape)
    out = lax.map(lambda t: fn(*t), tuple(flat), batch_size=_CHUNK)
    return out.reshape(shape)


class Expectations:
    """Elementwise rules of one evaluation (activations identified once per node)."""

    def __init__(self, dtype, method: str = "auto", order: int | None = None):
        self.dtype = dtype
        self.method = method
        self.order = order or (192 if jnp.dtype(dtype) == jnp.float64 else 96)
        self.checks: list = []  # (label, where, value): gains under an elementwise function

    def activation(self, node: V.Pointwise) -> acts.Activation:
        if not node.univariate:
            what = node.name or "an elementwise function"
            if any(leaf.coupled for leaf in node.leaves):
                why = (
                    "it takes statistics over the batch (batch norm in training mode couples "
                    "the examples: its theory is isometry.batchnorm_theory; in evaluation mode "
                    "batch norm is affine and covered)"
                )
            elif len(node.leaves) > 1:
                why = f"it combines {len(node.leaves)} different fields (a gate?)"
            else:
                leaf = node.leaves[0]
                why = (
                    f"its input ({leaf.where}) is not Gaussian: it was not made by a "
                    "contraction with a parameter (statistics over the batch, as batch norm "
                    "computes in training mode; deterministic data; a sum of a "
                    "nonlinearity's output and another field)"
                )
            raise V.TheoryError(
                f"{what} at {node.where} has no rule: {why}; only functions of one Gaussian "
                "field (a pre-activation) have Gaussian expectations"
            )
        if node.act is None:
            for g in _gains(node.leaves[0]):
                v = jnp.asarray(g.gain.value, self.dtype)
                self.checks.append(("gain", g.where, jnp.var(v) / jnp.mean(v) ** 2))
            key = None if node.sig is None else (node.sig, node.name, str(jnp.dtype(self.dtype)))
            if key is not None and key in _IDENTIFIED:
                node.act = _IDENTIFIED[key]
            else:
                node.act = identify(node.fn, node.name, self.dtype)
                if key is not None:
                    _IDENTIFIED[key] = node.act
        return node.act

    # ------------------------------------------------------------------ means

    def mean(self, alg: A.Algebra, node: V.Pointwise) -> Array:
        if node.product:
            a, b = (node.leaves * 2)[:2] if len(node.leaves) == 1 else node.leaves
            G = alg.gram(a, b)
            k = math.prod(a.struct)
            return jnp.diagonal(G.reshape(k, k)).reshape(a.struct)
        act = self.activation(node)
        q = alg.variances(node.leaves[0])
        if act.first_moment is not None:
            return gs.first_moment(act, q)
        return _chunked(lambda t: gs.first_moment(act, t), q)

    def slope(self, alg, node) -> Array:
        """``E[f'(z_s)]`` (Stein's factor), shape ``node.struct``."""
        act = self.activation(node)
        q = alg.variances(node.leaves[0])
        if act.deriv_mean is not None:
            return gs.deriv_mean(act, q)
        return _chunked(lambda t: gs.deriv_mean(act, t), q)

    # ------------------------------------------------------------------ grams

    def cross(self, alg: A.Algebra, a, b, kinds) -> Array:
        """``G(a, b)`` (``kinds is None``) or the tangent Grams, one of ``a, b`` elementwise."""
        pa, pb = isinstance(a, V.Pointwise), isinstance(b, V.Pointwise)
        if pa and pb:
            return self._both(alg, a, b, kinds)
        node, other = (a, b) if pa else (b, a)
        if not other.gaussian or isinstance(other, V.Merge):
            raise V.TheoryError(
                f"no rule for the cross-Gram of {node.name or 'an elementwise function'} "
                f"({node.where}) with {type(other).__name__} ({other.where})"
            )
        self.activation(node)
        z = node.leaves[0]
        slope = self.slope(alg, node)
        e = 0 if kinds is None else 1
        no = len(other.struct)
        if pa:  # G(f(z), other) = E[f'(z)] G(z, other): slope on the left axes
            G = alg._cross(z, other, kinds)
            return G * slope.reshape(slope.shape + (1,) * (no + e))
        G = alg._cross(other, z, kinds)
        return G * slope.reshape((1,) * no + slope.shape + (1,) * e)

    def _both(self, alg, a, b, kinds):
        fa, fb = self.activation(a), self.activation(b)
        z, w = a.leaves[0], b.leaves[0]
        q = alg.variances(z)
        r = alg.variances(w)
        na, nb = len(a.struct), len(b.struct)
        q1 = q.reshape(q.shape + (1,) * nb)
        q2 = r.reshape((1,) * na + r.shape)
        c = jnp.clip(alg.gram(z, w) / jnp.sqrt(q1 * q2), -1.0, 1.0)
        if kinds is None:
            out = self._kernel(fa, fb, q, r, c, deriv=False)
            if a is b:  # the 1-D moment: exact where the kernel is ill-conditioned at c = 1
                out = _with_diagonal(out, _moment(gs.second_moment, fa, q, fa.second_moment))
            return out
        D = self._kernel(fa, fb, q, r, c, deriv=True)
        if a is b:
            D = _with_diagonal(D, _moment(gs.dphi_moment, fa, q, fa.bernoulli_p))
        return D[..., None] * alg.tangent(z, w, kinds)

    def _kernel(self, fa, fb, q, r, c, *, deriv: bool) -> Array:
        """``E[f(u) g(v)]`` (or of the derivatives) on the Gram: ``q (a.struct)``,
        ``r (b.struct)`` variances, ``c (a.struct + b.struct)`` correlations."""
        q1 = q.reshape(q.shape + (1,) * r.ndim)
        q2 = r.reshape((1,) * q.ndim + r.shape)
        if fa == fb:
            closed = fa.deriv_kernel if deriv else fa.kernel
            if closed is not None:
                kern = gs.deriv_kernel if deriv else gs.phi_kernel
                return kern(fa, q1, q2, c)
        f, g = (fa.dphi, fb.dphi) if deriv else (fa.phi, fb.phi)
        if self.method == "series" or (self.method == "auto" and not (fa.kinks or fb.kinks)):
            return _mehler(f, g, q, r, c, self.order)

        def e2(x, y, t):
            return gs.expect2(f, g, x, y, t, kinks_f=fa.kinks, kinks_g=fb.kinks)

        return _chunked(e2, q1, q2, c)


def _gains(z: V.Field) -> list:
    """The gains inside a Gaussian field's linear composites (a norm's scale before an
    activation): exact for a constant gain, an approximation otherwise."""
    if isinstance(z, V.Gain):
        return [z, *_gains(z.inp)]
    if isinstance(z, V.Sum):
        return [g for t in z.terms for g in _gains(t)]
    if isinstance(z, V.Linear):
        return [g for t in z.inputs for g in _gains(t)]
    if isinstance(z, V.Split):
        return _gains(z.inp)
    return []


def _moment(fn, act, q, closed) -> Array:
    """``fn(act, q)`` directly where ``act`` has the closed form, else in chunks."""
    if closed is not None:
        return fn(act, q)
    return _chunked(lambda t: fn(act, t), q)


def _mehler(f, g, q, r, c, order) -> Array:
    """Mehler's formula ``E[f(u) g(v)] = sum_k a_k(q) b_k(r) c^k`` (normalized Hermite
    coefficients of ``f(sqrt(q) z)`` and ``g(sqrt(r) z)``), by Horner's scheme over ``k``."""
    a = gs.hermite_coefficients(f, q, order)  # q.shape + (K,)
    b = gs.hermite_coefficients(g, r, order)
    na, nb = q.ndim, r.ndim

    def step(acc, k):
        ak = jnp.take(a, k, axis=-1).reshape(q.shape + (1,) * nb)
        bk = jnp.take(b, k, axis=-1).reshape((1,) * na + r.shape)
        return acc * c + ak * bk, None

    acc, _ = lax.scan(step, jnp.zeros_like(c), jnp.arange(order, -1, -1))
    return acc


def _with_diagonal(G: Array, diag: Array) -> Array:
    """``G (s + s)`` with its diagonal (equal positions) replaced by ``diag (s)``."""
    k = diag.size
    i = jnp.arange(k)
    return G.reshape(k, k).at[i, i].set(diag.reshape(-1).astype(G.dtype)).reshape(G.shape)
