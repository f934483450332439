"""The probe's Jacobian spectra: cumulative and per-block Jacobians of one example.

:func:`jacobian_spectra` gives the squared singular values of ``d y^l_i / d x_i``
(input to cut point ``l``) and ``d y^l_i / d u^l_i`` (block ``l`` on its own)
for example ``i`` of a batch, dense (``jax.jacfwd``, exact) or by stochastic
Lanczos quadrature (:func:`isometry.spectra.slq`) with the error bar
:func:`slq_w1_bound`. The toolkit's scanned stacks are differentiated through
:func:`isometry.jacobian.stack_jacobians` at their layers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from isometry import cuts, depthscan, spectra, validate
from isometry import jacobian as _jacobian
from isometry.cuts import ProbeError, is_stack

__all__ = ["METHODS", "ProbeSpectra", "cumulative_fn", "jacobian_spectra", "slq_w1_bound"]

Array = jax.Array
METHODS = ("auto", "dense", "slq")


@partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "cumulative", "local", "cumulative_weights", "local_weights",
        "cumulative_summary", "local_summary", "cumulative_w1_bound", "local_w1_bound",
    ],
    meta_fields=["paths", "method", "index", "dims"],
)  # fmt: skip
@dataclasses.dataclass(frozen=True)
class ProbeSpectra:
    """Squared singular values of the cumulative and local Jacobians of one example.

    For block ``l`` with output ``y^l`` (``m_l`` entries per example), input
    ``u^l`` (``k_l``) and model input ``x`` (``n``): ``cumulative[l]`` is the
    spectrum of ``d y^l_i / d x_i`` (``m_l x n``) and ``local[l]`` that of
    ``d y^l_i / d u^l_i`` (``m_l x k_l``), both of ``min`` dimension.

    ``method == "dense"``: ``cumulative[l]`` has shape ``(min(m_l, n),)``,
    decreasing (exact SVD); the weights are ``None`` and the W1 bounds 0.
    ``method == "slq"``: the arrays are the Ritz values ``(P, S)`` of the SLQ
    measure of ``J^T J`` or ``J J^T`` (the smaller), with its quadrature
    weights ``(P, S)`` (rows sum to 1) and :func:`slq_w1_bound`, the stated
    Wasserstein-1 distance to the exact spectrum.

    Summaries: dicts of ``(K,)`` arrays ``mean``, ``var``, ``max``, ``min`` of
    ``s^2`` and ``log_spread``, the standard deviation of ``ln s^2`` over the
    values above ``1e-12 max``. ``dims``: ``(m_l, n, k_l)`` per block.
    """

    cumulative: tuple
    local: tuple
    cumulative_weights: tuple | None
    local_weights: tuple | None
    cumulative_summary: dict
    local_summary: dict
    cumulative_w1_bound: Array
    local_w1_bound: Array
    paths: tuple[str, ...]
    method: str
    index: int
    dims: tuple[tuple[int, int, int], ...]


def cumulative_fn(graphdef, states, paths, x, index):
    """``f(x0) -> (y^1_index, ..., y^K_index)`` (each flattened): the outputs of the cut
    blocks ``paths`` for example ``index`` of the batch ``x`` with that example replaced by
    ``x0``, the others held fixed (``index`` may be traced)."""

    def f(x0):
        _, rec = cuts.tapped_call(graphdef, states, paths, x.at[index].set(x0))
        return tuple(o[index].reshape(-1) for o in rec.outputs)

    return f


def _local_fn(graphdef, states, path, u, extras, index):
    args, kwargs = extras

    def g(u0):
        block = cuts.lookup(nnx.merge(graphdef, *states, copy=True), path)
        return block(u.at[index].set(u0), *args, **kwargs)[index].reshape(-1)

    return g


def _atom_summary(nodes: Array, weights: Array | None) -> dict:
    """``mean, var, max, min, log_spread`` of a (weighted) sample of ``s^2``."""
    v = nodes.ravel()
    w = jnp.full(v.shape, 1.0 / v.size, v.dtype) if weights is None else weights.ravel()
    w = w / jnp.sum(w)
    out = spectra.summary(v)  # max and min; mean and var are weighted below
    mean = jnp.sum(w * v)
    keep = v > 1e-12 * jnp.max(v)
    logv = jnp.log(jnp.where(keep, v, 1.0))
    wk = jnp.where(keep, w, 0.0) / jnp.maximum(jnp.sum(jnp.where(keep, w, 0.0)), 1e-300)
    lmean = jnp.sum(wk * logv)
    return {
        "mean": mean,
        "var": jnp.sum(w * (v - mean) ** 2),
        "max": out["max"],
        "min": out["min"],
        "log_spread": jnp.sqrt(jnp.sum(wk * (logv - lmean) ** 2)),
    }


def slq_w1_bound(result: spectra.SLQResult, dim: int, *, delta: float = 0.05) -> Array:
    """A Wasserstein-1 error bar of an SLQ spectrum of ``dim`` values, holding w.p. ``1 - delta``.

        W1(rho, rho_SLQ) <= R (pi / (4 S) [S < dim] + 1 / sqrt(2 delta dim P))

    for ``P`` Rademacher probes, ``S`` Lanczos steps and ``R`` the width of the
    spectrum, estimated by the range of the Ritz values (they lie inside
    ``[lambda_min, lambda_max]`` and the extreme ones converge first, so this
    is ``R`` from below, by little once ``S`` is a few tens). Derivation, after
    Chen, Trogdon & Ubaru 2021 ("Analysis of stochastic Lanczos quadrature for
    spectrum approximation", ICML): by the triangle inequality and convexity
    of W1 in mixtures, the error is at most the probes' term plus the mean of
    the quadrature terms.

    * Quadrature: ``S`` Lanczos steps from probe ``v`` give the ``S``-node
      Gauss rule of ``psi_v = sum_i <v, u_i>^2 delta(lambda_i)``, exact for
      polynomials of degree ``2S - 1``. W1 is the supremum of
      ``|int f d(psi - gauss)|`` over 1-Lipschitz ``f`` (Kantorovich-Rubinstein);
      Jackson's theorem gives a polynomial of that degree within
      ``pi R / (8 S)`` of ``f`` on an interval of length ``R``, and both
      measures have mass 1, so the error is ``<= pi R / (4 S)``; it is 0 once
      ``S >= dim`` (the rule is the measure itself).
    * Probes: ``F_v(t) = v^T P_t v`` (``P_t`` the spectral projector below
      ``t``, rank ``r``) has mean ``F(t) = r / dim`` and, for Rademacher ``v``,
      variance ``2 (||P_t||_F^2 - sum_i (P_t)_ii^2) / dim^2 <= 2 F (1 - F) / dim
      <= 1 / (2 dim)``, divided by ``P`` for the mean of ``P`` probes. With
      ``W1 = int |F - F_P| dt`` over the spectrum and Cauchy-Schwarz,
      ``E W1^2 <= R int E (F - F_P)^2 dt <= R^2 / (2 dim P)``, and Markov's
      inequality on ``W1^2`` gives the term above with probability ``1 - delta``.

    At the defaults (16 probes, 64 steps) the bound is ``0.79 R / sqrt(dim)``
    plus ``0.0123 R`` for ``dim > 64``: below ``R`` for every ``dim``, 0.10 ``R``
    at ``dim = 64`` and 0.06 ``R`` at ``dim = 256``.
    """
    if not 0.0 < float(delta) < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    dim = validate.positive_int("dim", dim)
    P, S = result.nodes.shape
    spread = jnp.max(result.nodes) - jnp.min(result.nodes)
    quadrature = math.pi / (4.0 * S) if S < dim else 0.0
    return spread * (quadrature + 1.0 / math.sqrt(2.0 * delta * dim * P))


@partial(jax.jit, static_argnums=(0, 3, 4))
def _gram_slq(f, x, key, n_probes, n_steps):
    """SLQ of ``J J^T`` (``m < n``): ``u -> J (J^T u)`` by ``vjp`` then ``jvp``."""
    y, f_vjp = jax.vjp(f, x)
    _, f_jvp = jax.linearize(f, x)

    def matvec(u):
        (g,) = f_vjp(u.astype(y.dtype))
        return f_jvp(g).astype(x.dtype)

    r = spectra.slq(matvec, y.size, key, n_probes=n_probes, n_steps=n_steps, dtype=x.dtype)
    return r.nodes, r.weights


def _slq(f, x0, key, n_probes, n_steps):
    """``(nodes, weights, w1_bound)`` of the SLQ measure of the smaller Gram operator."""
    m, n = math.prod(jax.eval_shape(f, x0).shape), x0.size
    if n <= m:
        r = spectra.jacobian_slq(
            f, x0, key, n_probes=n_probes, n_steps=min(n_steps, n), dtype=x0.dtype
        )
    else:
        nodes, weights = _gram_slq(f, x0, key, n_probes, min(n_steps, m))
        r = spectra.SLQResult(nodes=nodes, weights=weights, n=m)
    return r.nodes, r.weights, slq_w1_bound(r, min(m, n))


def _dense(Js) -> list[Array]:
    return [spectra.squared_singular_values(J.reshape(J.shape[0], -1)) for J in Js]


def _choose(method, dims, max_dense) -> str:
    validate.choice("method", method, METHODS)
    if method != "auto":
        return method
    largest = max(max(m * n, m * k) for m, n, k in dims)
    return "dense" if largest <= max_dense else "slq"


def jacobian_spectra(
    model,
    x,
    *,
    at=None,
    method: str = "auto",
    key=None,
    index: int = 0,
    n_probes: int = 16,
    n_steps: int = 64,
    max_dense: int = 2**22,
) -> ProbeSpectra:
    """Cumulative and local Jacobian spectra at every cut point, for example ``x[index]``.

    Args:
        model: any ``flax.nnx.Module``, left unmodified.
        x: a batch ``(B, ...)``; the Jacobians are with respect to example
            ``index``, the other examples held fixed (they matter only to batch
            statistics).
        at: cut points (module paths); default :func:`blocks`.
        method: ``"dense"`` (``jax.jacfwd`` of the function up to every cut
            point in one pass, local ones by :func:`isometry.jacobian.jacobian`,
            then an SVD), ``"slq"`` (matrix-free, ``jvp``/``vjp`` only, memory of
            a forward/backward pass; needs ``key``) or ``"auto"``: dense when
            every Jacobian has at most ``max_dense`` entries.
        key: PRNG key of the SLQ probes (block ``l`` uses ``fold_in(key, l)``,
            its local Jacobian ``fold_in(key, K + l)``).
        n_probes, n_steps: SLQ probes and Lanczos steps (capped at the dimension).

    A toolkit ``networks.MLP``/``ConvNet`` gives the spectra of ``d x^l / d u``
    (all cut layers in one :func:`isometry.jacobian.stack_jacobians` pass) and
    ``d x^l / d x^{l-1}``; ``x`` is cast to the model's parameter dtype.

    Returns:
        a :class:`ProbeSpectra` (``*_w1_bound``: :func:`slq_w1_bound` for SLQ).

    Raises:
        ProbeError: as :func:`isometry.probe.signal` for ``at`` and ``x`` (a NaN
            or inf in ``x`` names the first example holding one); ``index``
            outside the batch; SLQ without ``key``; a non-finite spectrum
            (names the first block).
    """
    options = {"at": at, "method": method, "index": index, "n_probes": n_probes,
               "n_steps": n_steps, "max_dense": max_dense}  # fmt: skip
    result = cuts.compiled(_spectra_impl, model, x, key, **options)
    _check_finite_spectra(result)
    return result


def _spectra_impl(model, x, key, *, at, method, index, n_probes, n_steps, max_dense):
    parts = (_stack_parts if is_stack(model) else _model_parts)(model, x, at, index)
    method = _choose(method, parts.dims, max_dense)
    if method == "dense":
        cum, loc = parts.dense()
        cw = lw = None
        cb = lb = jnp.zeros((len(parts.paths),), parts.x0.dtype)
    else:
        (cum, cw, cb), (loc, lw, lb) = _slq_all(parts, key, n_probes, n_steps)
    return ProbeSpectra(
        cumulative=tuple(cum),
        local=tuple(loc),
        cumulative_weights=cw,
        local_weights=lw,
        cumulative_summary=_stack_summaries(cum, cw),
        local_summary=_stack_summaries(loc, lw),
        cumulative_w1_bound=cb,
        local_w1_bound=lb,
        paths=parts.paths,
        method=method,
        index=index,
        dims=parts.dims,
    )


def _stack_summaries(values, weights) -> dict:
    ws = [None] * len(values) if weights is None else weights
    rows = [_atom_summary(v, w) for v, w in zip(values, ws, strict=True)]
    return {k: jnp.stack([r[k] for r in rows]) for k in rows[0]}


def _check_finite_spectra(result: ProbeSpectra) -> None:
    if not validate.is_concrete(result.cumulative_summary["mean"]):
        return
    for name in ("cumulative", "local"):
        for path, v in zip(result.paths, getattr(result, name), strict=True):
            if not bool(jnp.all(jnp.isfinite(v))):
                raise ProbeError(
                    f"jacobian_spectra: the {name} spectrum at block {path!r} is not finite"
                )


def _slq_all(parts: _Parts, key, n_probes, n_steps):
    """SLQ of every cumulative and local Jacobian: two ``(nodes, weights, bounds)``."""
    if key is None:
        raise ProbeError("jacobian_spectra: method='slq' needs key for its probes")
    K = len(parts.paths)
    n_probes = validate.positive_int("n_probes", n_probes)
    n_steps = validate.positive_int("n_steps", n_steps)
    cum = [
        _slq(f, parts.x0, jax.random.fold_in(key, i), n_probes, n_steps)
        for i, f in enumerate(parts.cumulative)
    ]
    loc = [
        _slq(g, u0, jax.random.fold_in(key, K + i), n_probes, n_steps)
        for i, (g, u0) in enumerate(zip(parts.local, parts.local_inputs, strict=True))
    ]
    return tuple(
        (tuple(r[0] for r in rs), tuple(r[1] for r in rs), jnp.stack([r[2] for r in rs]))
        for rs in (cum, loc)
    )


@dataclasses.dataclass(frozen=True)
class _Parts:
    """What :func:`jacobian_spectra` needs of a model, for example ``index`` of ``x``.

    ``dims``: ``(m_l, n, k_l)`` per cut point; ``dense()``: the exact
    ``(cumulative, local)`` spectra; ``cumulative[l]``: ``x0 -> y^l_index``
    (flat) and ``local[l]``: ``u0 -> y^l_index`` at ``local_inputs[l]``, for SLQ.
    """

    paths: tuple[str, ...]
    dims: tuple
    dense: Callable
    cumulative: list
    local: list
    x0: Array
    local_inputs: list


def _check_index(index, x) -> int:
    index = validate.positive_int("index", index, minimum=0)
    if index >= x.shape[0]:
        raise ProbeError(f"index must be < the batch size {x.shape[0]}, got {index}")
    return index


def _model_parts(model, x, at, index) -> _Parts:
    """:class:`_Parts` of any model, cut by swapping its blocks for taps."""
    paths, x, graphdef, params, rest, (_, out_shapes) = cuts.prepare(model, x, at)
    index = _check_index(index, x)
    states = (params, rest)
    inputs, extras = cuts.capture(graphdef, states, paths, x)
    n = math.prod(x.shape[1:])
    dims = tuple(
        (math.prod(s.shape[1:]), n, math.prod(u.shape[1:]))
        for s, u in zip(out_shapes, inputs, strict=True)
    )
    f = cumulative_fn(graphdef, states, paths, x, index)
    locals_ = [
        _local_fn(graphdef, states, p, u, e, index)
        for p, u, e in zip(paths, inputs, extras, strict=True)
    ]

    def dense():
        cum = _dense(jax.jacfwd(f)(x[index]))
        loc = [_jacobian.jacobian(g, u[index]) for g, u in zip(locals_, inputs, strict=True)]
        return cum, _dense(loc)

    cums = [lambda x0, i=i: f(x0)[i] for i in range(len(paths))]
    return _Parts(paths, dims, dense, cums, locals_, x[index], [u[index] for u in inputs])


# --------------------------------------------------------------------------- #
# The toolkit's scanned stacks (networks.MLP, networks.ConvNet).
# --------------------------------------------------------------------------- #


def _example_basis(x, index) -> Array:
    """``(n, *x.shape)``: the unit directions of example ``index``'s ``n`` entries."""
    n = math.prod(x.shape[1:])
    eye = jnp.eye(n, dtype=x.dtype).reshape(n, *x.shape[1:])
    return jnp.zeros((n, *x.shape), x.dtype).at[:, index].set(eye)


def _stack_parts(model, x, at, index) -> _Parts:
    """:class:`_Parts` of a toolkit stack: the cumulative Jacobians ``dx^l/du`` in one
    :func:`isometry.jacobian.stack_jacobians` pass (tangents of example ``index``
    pushed through the input map), the local ones ``dx^l/dx^{l-1}`` by
    :func:`isometry.depthscan.push_tangents` at the layer inputs."""
    paths, idx, x, s = cuts.prepare_stack(model, x, at)
    index = _check_index(index, x)
    x0 = s.input_map(x)
    B, n, m = x.shape[0], math.prod(x.shape[1:]), math.prod(x0.shape[1:])
    sel = jnp.asarray(idx)
    params = jax.tree.map(lambda a: a[sel], s.params)
    prev = jnp.concatenate([x0[None], s.hidden_states(x0)[:-1]])[sel]

    def rows(J):  # (B m, k) -> (m, k): the rows of example `index`
        return J.reshape(B, m, -1)[index]

    def dense():
        order = sorted(set(idx))
        t0 = jax.vmap(lambda t: jax.jvp(s.input_map, (x,), (t,))[1])(_example_basis(x, index))
        J = _jacobian.stack_jacobians(
            s.layer, s.params, x0, [l + 1 for l in order], tangents=t0, reduce=rows
        )
        e = _example_basis(x0, index)

        def local(a):
            T = depthscan.push_tangents(s.layer, a[0], a[1], e)[1]
            return rows(T.reshape(T.shape[0], -1).T)

        loc = jax.lax.map(local, (params, prev))
        return _dense([J[order.index(l)] for l in idx]), _dense(list(loc))

    def cumulative(u0, l):
        xl = _jacobian.stack_forward(
            s.layer, jax.tree.map(lambda a: a[: l + 1], s.params), s.input_map(x.at[index].set(u0))
        )
        return xl[index].reshape(-1)

    def local_fn(h0, i):
        p = jax.tree.map(lambda a: a[i], params)
        return s.layer(p, prev[i].at[index].set(h0))[index].reshape(-1)

    return _Parts(
        paths, ((m, n, m),) * len(idx), dense, [partial(cumulative, l=l) for l in idx],
        [partial(local_fn, i=i) for i in range(len(idx))], x[index], [h[index] for h in prev],
    )  # fmt: skip
