"""Per-cut-point theory of any NNX model: the infinite-width counterpart of the probe.

For each cut point ``l`` (a block, as in :func:`isometry.probe.blocks`) with output
``y^l`` (batch first, width ``C_l``, structure ``(B, *positions)``), the forward
Gram ``G = G(y^l, y^l)`` gives the probe's forward statistics::

    mean_sq         = mean_s G[s, s]
    chan_sq_mean    = mean_{s, t} G[s, t]                (the channel means' square)
    chan_var        = mean_s G[s, s] - chan_sq_mean
    pair_cosine     = mean over pairs (2k, 2k+1) of  sum_p G[(a,p),(b,p)] /
                      sqrt(sum_p G[(a,p),(a,p)] sum_p G[(b,p),(b,p)])
    position_cosine = mean over examples and p != p' of G[(a,p),(a,p')] /
                      sqrt(G[(a,p),(a,p)] G[(a,p'),(a,p')])

Gradients of the probe's random-projection loss ``L = sum_a <v_a, y_a> / B``
(``v ~ N(0, 1)``, :func:`isometry.signal.random_projection_loss`) follow from
forward tangents: ``E_v ||dL/dz||^2 = ||J||_F^2 / B^2`` for ``J = dy/dz``, and
``||J||_F^2 = E_u ||J u||^2`` for a perturbation ``u`` with identity covariance.
So a zero probe added at cut point ``l`` (the probe's own device) and perturbed
isotropically gives, at the model output ``y`` (width ``C``),

    grad_out_sq^l   = C sum_s T_l(y, y)[s, s] / B^2

and the same with the block's parameters perturbed gives ``grad_param_sq^l``
(``grad_kernel_sq^l``: its parameters of rank >= 2), with the input perturbed
``grad_input_sq``. The tangent of a hidden unit or a parameter is independent
of the forward pass in the wide limit, so these are exact there; they equal the
gradient-independence recursions (Schoenholz et al. 2017; Yang 2019) where
those apply. The mean squared singular value of the cumulative Jacobian
``d y^l_i / d x_i`` of example ``i = index`` (``m_l`` outputs, ``n`` inputs) is

    cumulative_mean^l = C_l sum_p T_in(y^l, y^l)[(i,p),(i,p)] / min(m_l, n)

with the input example perturbed; its pointwise rule drops the correlation of
the input's tangent with the forward pass, ``O(1 / n)``.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp

from isometry.theory import algebra as A
from isometry.theory import values as V

__all__ = ["FIELDS", "Profile", "read_profile"]

Array = jax.Array
FIELDS = (
    "mean_sq", "chan_sq_mean", "chan_var", "pair_cosine", "position_cosine",
    "grad_out_sq", "grad_param_sq", "grad_kernel_sq", "cumulative_mean",
)  # fmt: skip


@partial(
    jax.tree_util.register_dataclass,
    data_fields=[*FIELDS, "grad_input_sq"],
    meta_fields=["paths", "shapes"],
)
@dataclasses.dataclass(frozen=True)
class Profile:
    """Per-cut-point infinite-width predictions ``(K,)`` (module docstring for each field).

    Field names are those of :class:`isometry.probe.ProbeSignal` and of
    :func:`isometry.probe.jacobian_spectra`'s ``cumulative_summary["mean"]``
    (here ``cumulative_mean``); ``grad_input_sq`` is at the model input.
    Quantities the engine was not asked for are NaN.
    """

    mean_sq: Array
    chan_sq_mean: Array
    chan_var: Array
    pair_cosine: Array
    position_cosine: Array
    grad_out_sq: Array
    grad_param_sq: Array
    grad_kernel_sq: Array
    cumulative_mean: Array
    grad_input_sq: Array
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def rows(self) -> list[dict]:
        """One dict of Python numbers per cut point."""
        return [
            {"block": p, **{f: float(getattr(self, f)[i]) for f in FIELDS}}
            for i, p in enumerate(self.paths)
        ]


def _flat(G: Array, struct) -> Array:
    k = math.prod(struct)
    return G.reshape(k, k)


def forward_stats(G: Array, struct) -> dict:
    """The forward statistics of one cut point from its Gram ``struct + struct``
    (``struct = (B, *positions)``)."""
    M = _flat(G, struct)
    d = jnp.diagonal(M)
    B, P = struct[0], math.prod(struct[1:])
    mean_sq = jnp.mean(d)
    chan_sq = jnp.mean(M)
    E = M.reshape(B, P, B, P)
    per_ex = jnp.einsum("apbp->ab", E)  # sum over equal positions
    n = B - B % 2
    if n >= 2:
        i = jnp.arange(0, n, 2)
        num = per_ex[i, i + 1]
        pair = jnp.mean(num / jnp.sqrt(per_ex[i, i] * per_ex[i + 1, i + 1]))
    else:
        pair = jnp.full((), jnp.nan, M.dtype)
    if P >= 2:
        Ea = jnp.einsum("apaq->apq", E)  # within each example
        dd = jnp.sqrt(jnp.einsum("app->ap", Ea))
        cos = Ea / (dd[:, :, None] * dd[:, None, :])
        pos = jnp.mean((jnp.sum(cos, axis=(1, 2)) - P) / (P * (P - 1)))
    else:
        pos = jnp.full((), jnp.nan, M.dtype)
    return {
        "mean_sq": mean_sq,
        "chan_sq_mean": chan_sq,
        "chan_var": mean_sq - chan_sq,
        "pair_cosine": pair,
        "position_cosine": pos,
    }


def _traces(alg, y, kinds) -> Array:
    """``C sum_s T_k(y, y)[s, s]`` for each kind: the expected squared norms of ``y``'s
    tangents, ``(len(kinds),)``."""
    if not isinstance(y, V.Field) or not kinds:
        return jnp.zeros((len(kinds),), alg.dtype)
    T = alg.tangent(y, y, kinds)
    k = math.prod(y.struct)
    return y.width * jnp.trace(T.reshape(k, k, len(kinds)))


def _block_params(params, path: str, kernels: bool, depth: int | None) -> frozenset:
    """Keys of the parameters of cut point ``path``: those under its module path, or, for
    a toolkit stack (``depth`` layers), slice ``l`` of every stacked parameter."""
    if depth is not None:
        layer = int(path.rpartition(".")[2])
        return frozenset(
            (*p.key, layer)
            for p in params
            if p.value.ndim >= 1 and p.value.shape[0] == depth
            and (not kernels or p.value.ndim >= 3)
        )  # fmt: skip
    pre = path + "."
    return frozenset(
        p.key for p in params if p.path.startswith(pre) and (not kernels or p.value.ndim >= 2)
    )


def read_profile(run, paths, *, gradients: bool, jacobian: bool, depth=None) -> dict:
    """The :class:`Profile` fields of an engine run (called inside the compiled program)."""
    alg, y, outs = run.alg, run.output, run.cuts
    dtype = alg.dtype
    nan = jnp.full((len(paths),), jnp.nan, dtype)
    rows = []
    for v in outs:
        if not isinstance(v, V.Field):
            raise V.TheoryError("a cut point whose output does not depend on the parameters")
        rows.append(forward_stats(alg.gram(v, v), v.struct))
    out = {k: jnp.stack([r[k] for r in rows]) for k in rows[0]}
    B = run.x.shape[0]
    K = len(paths)
    if gradients:
        kinds = [A.Kind(f"probe {i}", sources=frozenset([("probe", i)])) for i in range(K)]
        for kernels in (False, True):
            kinds += [A.Kind(f"params {p} {kernels}",
                             params=_block_params(run.params, p, kernels, depth))
                      for p in paths]  # fmt: skip
        kinds.append(A.Kind("x", sources=frozenset(["x"])))
        g = _traces(alg, y, tuple(kinds)) / B**2
        out["grad_out_sq"], out["grad_param_sq"] = g[:K], g[K : 2 * K]
        out["grad_kernel_sq"], out["grad_input_sq"] = g[2 * K : 3 * K], g[3 * K]
    else:
        out |= {k: nan for k in ("grad_out_sq", "grad_param_sq", "grad_kernel_sq")}
        out["grad_input_sq"] = jnp.full((), jnp.nan, dtype)
    if jacobian:
        kind = (A.Kind("input", sources=frozenset(["input"])),)
        n = math.prod(run.x.shape[1:])
        vals = []
        for v in outs:
            T = _flat(alg.tangent(v, v, kind)[..., 0], v.struct)
            P = math.prod(v.struct[1:])
            i = run.index
            block = jnp.diagonal(T)[i * P : (i + 1) * P]
            vals.append(v.width * jnp.sum(block) / min(P * v.width, n))
        out["cumulative_mean"] = jnp.stack(vals)
    else:
        out["cumulative_mean"] = nan
    return out
