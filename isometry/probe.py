"""Probe any Flax NNX model: per-block signal propagation, gradients and Jacobian spectra.

The other measurement modules take a network as a scanned stack. This one
takes the researcher's own ``flax.nnx`` model as written (a ResNet with batch
norm, a pre-LN transformer, blocks of different widths) and measures it at
*cut points*: module paths such as ``"layers.3"`` or ``"stages.1.blocks.0"``.

* :func:`blocks` finds the cut points: the direct children of an
  ``nnx.Sequential``, or the items of a list / ``nnx.List`` attribute named
  ``blocks`` or ``layers`` (searched through nested modules and lists, in
  definition order). Any list of module paths may be passed as ``at=``.
* :func:`signal` (-> :class:`ProbeSignal`): per cut point the forward
  statistics of the block's output ``y^l`` (batch first, channels last)

      mean_sq^l      = mean (y^l)^2
      chan_sq_mean^l = mean_ch (mean_{batch, positions} y^l)^2
      chan_var^l     = mean_ch  var_{batch, positions} y^l
      branch_var^l   = chan_var of ``block.branch(input)`` when the block has a
                       ``branch`` method (residual blocks), else NaN
      pair_cosine^l  = mean cosine of the example pairs (0, 1), (2, 3), ...
      position_cosine^l = mean cosine between distinct positions (tokens,
                       pixels) of one example, averaged over examples (NaN for
                       ``(B, N)`` outputs); 1 is rank collapse

  (the signal-propagation plots of Brock, De & Smith 2021, "Characterizing
  signal propagation to close the performance gap in unnormalized ResNets",
  with the definitions of :mod:`isometry.signal`), and for a scalar
  ``loss(model(x))`` (default: the random projection of
  :func:`isometry.signal.random_projection_loss`) the squared gradient norms

      grad_out_sq^l    = ||dLoss/dy^l||_F^2          (zero probes added to y^l)
      grad_param_sq^l  = ||dLoss/dtheta^l||_F^2     (every nnx.Param of the block)
      grad_kernel_sq^l = the same over its parameters of rank >= 2 (kernels)

  from one forward and one backward pass.
* :func:`jacobian_spectra` (-> :class:`ProbeSpectra`): for one example ``x_i``
  of the batch (the others held fixed, so batch norm in training mode is
  included), the squared singular values of the cumulative Jacobian
  ``d y^l_i / d x_i`` and of each block on its own, ``d y^l_i / d u^l_i`` at
  its input ``u^l`` of the same forward pass; dense (``jax.jacfwd``, exact)
  or matrix-free stochastic Lanczos quadrature (:func:`isometry.spectra.slq`).
* :func:`theory`: the mean-field prediction (:func:`isometry.signal.theory`)
  where it covers the model: a toolkit ``networks.MLP``/``ConvNet``, or cut
  points that are square ``nnx.Linear`` layers of a plain dense network.

The toolkit's own scanned stacks (``networks.MLP``, ``networks.ConvNet``,
:func:`is_stack`) hold their layers in stacked parameters, so there is no
module to cut: their cut points are the layers ``"layer.0"`` ..
``"layer.{L-1}"``, measured by the stack tools themselves.
:func:`signal` returns :func:`isometry.signal.measure`'s numbers: ``mean_sq``,
``pair_cosine``, ``position_cosine`` and ``grad_out_sq`` are those of the
pre-activation ``h^l`` (``q^l``, ``c^l``, ``grad_preact_sq``), ``chan_*`` and
``branch_var`` those of the layer output ``x^l``, ``grad_kernel_sq`` is
``grad_weight_sq``, ``grad_param_sq`` counts every stacked parameter of the
layer, and ``grad_input_sq`` is at the stack input ``x^0`` (after the input
map). :func:`jacobian_spectra` gives the spectra of ``d x^l / d u`` (through
the input map) and ``d x^l / d x^{l-1}``, by
:func:`isometry.jacobian.stack_jacobians` (dense) or SLQ.
* :func:`plot`: all of it per block in one figure (PNG + PDF).

The model is never modified: every pass runs on a copy
(``nnx.merge(..., copy=True)``), in training or evaluation mode as the user
set it (batch norm in training mode normalizes with batch statistics; the
copy's running statistics are discarded). Everything is jittable
(``jax.jit(lambda x: probe.signal(model, x, key=key))``); the non-finite check
runs when the values are concrete.

Example:
    >>> import jax
    >>> from flax import nnx
    >>> from isometry import probe
    >>> model = nnx.Sequential(*[nnx.Linear(16, 16, rngs=nnx.Rngs(i)) for i in range(4)])
    >>> x = jax.random.normal(jax.random.key(0), (8, 16))
    >>> probe.blocks(model)
    ['layers.0', 'layers.1', 'layers.2', 'layers.3']
    >>> probe.signal(model, x, key=jax.random.key(1)).grad_out_sq.shape
    (4,)
    >>> probe.jacobian_spectra(model, x).cumulative[3].shape
    (16,)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from isometry import cuts, depthscan, networks, spectra, validate
from isometry import jacobian as _jacobian
from isometry import signal as _signal

__all__ = [
    "ProbeError",
    "ProbeSignal",
    "ProbeSpectra",
    "blocks",
    "is_stack",
    "jacobian_spectra",
    "load_factory",
    "plot",
    "position_cosine",
    "save",
    "signal",
    "slq_w1_bound",
    "theory",
]

Array = jax.Array
ProbeError = cuts.ProbeError
blocks = cuts.blocks
is_stack = cuts.is_stack
METHODS = ("auto", "dense", "slq")


# --------------------------------------------------------------------------- #
# Signal propagation and gradients.
# --------------------------------------------------------------------------- #

_FORWARD = ("mean_sq", "chan_sq_mean", "chan_var", "branch_var", "pair_cosine", "position_cosine")
_BACKWARD = ("grad_out_sq", "grad_param_sq", "grad_kernel_sq")


@partial(
    jax.tree_util.register_dataclass,
    data_fields=[*_FORWARD, *_BACKWARD, "grad_input_sq", "loss"],
    meta_fields=["paths", "shapes"],
)
@dataclasses.dataclass(frozen=True)
class ProbeSignal:
    """Per-block statistics ``(K,)`` for the ``K`` cut points ``paths`` (module docstring).

    ``shapes``: the blocks' output shapes ``(B, ...)``; ``grad_input_sq``:
    ``||dLoss/dx||_F^2`` at the model input; ``loss``: its value.
    """

    mean_sq: Array
    chan_sq_mean: Array
    chan_var: Array
    branch_var: Array
    pair_cosine: Array
    position_cosine: Array
    grad_out_sq: Array
    grad_param_sq: Array
    grad_kernel_sq: Array
    grad_input_sq: Array
    loss: Array
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def rows(self) -> list[dict]:
        """One dict of Python numbers per block (for tables and JSON)."""
        fields = (*_FORWARD, *_BACKWARD)
        return [
            {"block": p, **{f: float(getattr(self, f)[i]) for f in fields}}
            for i, p in enumerate(self.paths)
        ]


def position_cosine(y: Array) -> Array:
    """Mean cosine between distinct positions of one example, averaged over examples.

    ``y (B, *positions, C)``: the ``T = prod(positions)`` vectors of length ``C``
    of each example; ``(sum_{s != t} cos(y_s, y_t)) / (T (T - 1))``. NaN when
    there is no position axis or ``T < 2``. Values near 1: rank collapse of
    the tokens (Dong, Cordonnier & Loukas 2021; Noci et al. 2022).
    """
    if y.ndim < 3 or math.prod(y.shape[1:-1]) < 2:
        return jnp.full((), jnp.nan, y.dtype)
    f = y.reshape(y.shape[0], -1, y.shape[-1])
    norm = jnp.linalg.norm(f, axis=-1, keepdims=True)
    u = f / jnp.maximum(norm, jnp.finfo(f.dtype).tiny)  # a zero vector has cosine 0
    s = jnp.sum(jnp.sum(u, axis=1) ** 2, axis=-1)  # sum over s, t of cos, per example
    T = f.shape[1]
    return jnp.mean((s - T) / (T * (T - 1)))


def _block_stats(y: Array, branch) -> dict:
    sq_mean, var = _signal.channel_stats(y)
    nan = jnp.full((), jnp.nan, y.dtype)
    return {
        "mean_sq": jnp.mean(y**2),
        "chan_sq_mean": sq_mean,
        "chan_var": var,
        "branch_var": nan if branch is None else _signal.channel_stats(branch)[1],
        "pair_cosine": _signal.pair_cosine(y),
        "position_cosine": position_cosine(y),
    }


def _sub_state(state, path: str):
    cur = state
    for part in path.split("."):
        key = int(part) if part.isdigit() else part
        try:
            cur = cur[key]
        except (KeyError, IndexError, TypeError):
            return None
    return cur


def _param_sq(grads, path: str) -> tuple[Array, Array]:
    leaves = jax.tree.leaves(_sub_state(grads, path)) if _sub_state(grads, path) else []
    zero = jnp.zeros(())
    total = sum((jnp.sum(g**2) for g in leaves), zero)
    kernels = sum((jnp.sum(g**2) for g in leaves if g.ndim >= 2), zero)
    return total, kernels


def _loss_fn(loss, key, y_shape):
    if loss is None:
        if key is None:
            raise ProbeError("probe.signal: pass loss, or key for the random-projection loss")
        return _signal.random_projection_loss(key, y_shape.shape, y_shape.dtype)
    if not callable(loss):
        raise TypeError(f"loss must be callable, got {type(loss).__name__}")
    return loss


def signal(model, x, *, at=None, loss: Callable | None = None, key=None) -> ProbeSignal:
    """Forward statistics and squared gradient norms per cut point (one forward/backward pass).

    The whole pass is compiled as one program (also when called under the
    user's ``jax.jit``). A toolkit ``networks.MLP``/``ConvNet`` is measured by
    :func:`isometry.signal.measure` (two backward passes: kernels alone and
    every parameter); see the module docstring for its fields.

    Args:
        model: any ``flax.nnx.Module``, left unmodified.
        x: a batch of model inputs ``(B, ...)`` (pairs ``(0, 1), (2, 3), ...``
            for ``pair_cosine``), cast to the model's parameter dtype.
        at: cut points (module paths); default :func:`blocks`.
        loss: ``loss(model(x)) -> scalar``; default the random projection
            ``sum_a <v_a, y_a> / B`` with ``v ~ N(0, 1)`` drawn from ``key``.
        key: PRNG key of the random projection.

    Returns:
        a :class:`ProbeSignal`.

    Raises:
        ProbeError: unknown path in ``at`` (lists the available ones), blocks
            not discoverable, ``x`` not of the model's input shape, or a
            non-finite statistic (names the first block where it appears).
    """
    result, has_branch = _compiled(_signal_impl, model, x, key, at=at, loss=loss)
    _check_finite_signal(result, has_branch)
    return result


def _compiled(impl, model, x, key, **options):
    """``impl(model, x, key, **options)`` compiled as one program (the model's state an argument).

    Run eagerly, every operation of the instrumented passes would compile on
    its own (tens of seconds for a small model); under an outer ``jit`` it is
    traced as it is.
    """
    cuts.check_model(model)
    if not (validate.is_concrete(x) and validate.is_concrete(key)):
        return impl(model, x, key, **options)
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, x, key: impl(nnx.merge(graphdef, state), x, key, **options))
    return run(state, jnp.asarray(x), key)


def _signal_impl(model, x, key, *, at, loss) -> tuple[ProbeSignal, Array]:
    """:func:`signal` and whether each block exposes a residual branch."""
    if is_stack(model):
        return _stack_signal(model, x, at, loss, key)
    paths, x, graphdef, params, rest, (y_shape, out_shapes) = cuts.prepare(model, x, at)
    loss_fn = _loss_fn(loss, key, y_shape)
    deltas = [jnp.zeros(s.shape, s.dtype) for s in out_shapes]

    def f(params, deltas, x):
        y, rec = cuts.tapped_call(graphdef, (params, rest), paths, x, deltas, want_branch=True)
        return loss_fn(y), (rec.outputs, rec.branch)

    grad = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)
    (value, (outs, branch)), (g_params, g_out, g_x) = grad(params, deltas, x)
    stats = [_block_stats(y, b) for y, b in zip(outs, branch, strict=True)]
    p_sq = [_param_sq(g_params, p) for p in paths]
    result = ProbeSignal(
        **{k: jnp.stack([s[k] for s in stats]) for k in _FORWARD},
        grad_out_sq=jnp.stack([jnp.sum(g**2) for g in g_out]),
        grad_param_sq=jnp.stack([t for t, _ in p_sq]).astype(value.dtype),
        grad_kernel_sq=jnp.stack([k for _, k in p_sq]).astype(value.dtype),
        grad_input_sq=jnp.sum(g_x**2),
        loss=value,
        paths=paths,
        shapes=tuple(tuple(y.shape) for y in outs),
    )
    return result, jnp.asarray([b is not None for b in branch])


def _check_finite_signal(result: ProbeSignal, has_branch) -> None:
    """Raise naming the first block (forward order; backward order for gradients) and statistic."""
    if not validate.is_concrete(result.mean_sq):
        return
    optional = {"branch_var", "pair_cosine", "position_cosine"}
    for i, path in enumerate(result.paths):
        for name in _FORWARD:
            v = getattr(result, name)[i]
            skip = name in optional and (name != "branch_var" or not has_branch[i])
            if not skip and not bool(jnp.isfinite(v)):
                raise ProbeError(f"probe.signal: {name} is {float(v)} at block {path!r}")
    for i in reversed(range(len(result.paths))):
        for name in _BACKWARD:
            v = getattr(result, name)[i]
            if not bool(jnp.isfinite(v)):
                raise ProbeError(
                    f"probe.signal: {name} is {float(v)} at block {result.paths[i]!r} "
                    "(the last such block: the backward pass runs from the output)"
                )


# --------------------------------------------------------------------------- #
# Jacobian spectra.
# --------------------------------------------------------------------------- #


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


def _cumulative_fn(graphdef, states, paths, x, index):
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
    """
    options = {"at": at, "method": method, "index": index, "n_probes": n_probes,
               "n_steps": n_steps, "max_dense": max_dense}  # fmt: skip
    result = _compiled(_spectra_impl, model, x, key, **options)
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
    f = _cumulative_fn(graphdef, states, paths, x, index)
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


def _stack_prepare(model, x, at):
    """``(paths, layer indices, x, stack)`` of a toolkit stack, ``x`` checked against it."""
    paths = cuts.resolve(model, at)
    x = cuts.as_batch(model, x)
    s = _signal.as_stack(model)
    try:
        jax.eval_shape(s, x)
    except (TypeError, ValueError) as err:
        raise ProbeError(
            f"x of shape {x.shape} does not fit {type(model).__name__}: it takes "
            f"{_stack_input(model.config)} ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from err
    return paths, tuple(int(p.rpartition(".")[2]) for p in paths), x, s


def _stack_input(cfg) -> str:
    if isinstance(cfg, networks.MLPConfig):
        return f"inputs (B, {cfg.in_dim or cfg.width})"
    spatial = ", ".join(["S"] * cfg.spatial_dims)
    return f"inputs (B, {spatial}, {cfg.in_channels or cfg.channels})"


def _stack_position_cosine(s, x0) -> Array:
    """:func:`position_cosine` of every layer's pre-activation (NaN for ``(B, N)`` inputs)."""
    if x0.ndim < 3:
        return jnp.full((s.depth,), jnp.nan, x0.dtype)

    def body(h, p):
        h_new, aux = s.step(p, h, None)
        return h_new, position_cosine(aux.get("preact", h_new))

    return jax.lax.scan(body, x0, s.params)[1]


def _stack_signal(model, x, at, loss, key) -> tuple[ProbeSignal, Array]:
    """:func:`signal` of a toolkit stack: :func:`isometry.signal.measure` at its layers."""
    paths, idx, x, s = _stack_prepare(model, x, at)
    loss_fn = _loss_fn(loss, key, jax.eval_shape(s, x))
    fwd, bwd = _signal.measure(s, x, loss_fn)
    every = _signal.backward(dataclasses.replace(s, weights=()), x, loss_fn)
    x0 = s.input_map(x)
    sel = jnp.asarray(idx)
    result = ProbeSignal(
        mean_sq=fwd.q[sel],
        chan_sq_mean=fwd.chan_sq_mean[sel],
        chan_var=fwd.chan_var[sel],
        branch_var=fwd.branch_var[sel],
        pair_cosine=fwd.c[sel],
        position_cosine=_stack_position_cosine(s, x0)[sel],
        grad_out_sq=bwd.grad_preact_sq[sel],
        grad_param_sq=every.grad_weight_sq[sel],
        grad_kernel_sq=bwd.grad_weight_sq[sel],
        grad_input_sq=bwd.grad_input_sq,
        loss=bwd.loss,
        paths=paths,
        shapes=(tuple(x0.shape),) * len(paths),
    )
    residual = bool(getattr(model.config, "residual", False))
    return result, jnp.full((len(paths),), residual)


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
    paths, idx, x, s = _stack_prepare(model, x, at)
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


def _stack_theory(model, x, at) -> dict:
    """:func:`theory` of a toolkit stack: :func:`isometry.signal.model_theory` at its layers."""
    _, idx, x, _ = _stack_prepare(model, x, at)
    try:
        th = _signal.model_theory(model, x)
    except ValueError as err:
        raise ProbeError(f"probe.theory: {err}") from None
    sel = jnp.asarray(idx)
    return {
        "mean_sq": th.q[sel],
        "pair_cosine": th.c[sel],
        "grad_out_sq": th.grad_preact_sq[sel],
        "grad_kernel_sq": th.grad_weight_sq[sel],
        "theory": th,
    }


# --------------------------------------------------------------------------- #
# Theory and figure.
# --------------------------------------------------------------------------- #


def _dense_layer(block, residual: bool):
    if isinstance(block, nnx.Linear) and not residual:
        return block
    found = [m for _, m in cuts.walk(block) if isinstance(m, nnx.Linear)] if residual else []
    return found[0] if len(found) == 1 else None


def theory(model, x, *, activation=None, at=None, residual_scale: float | None = None) -> dict:
    """Mean-field curves (:func:`isometry.signal.theory`) matched to :class:`ProbeSignal` fields.

    Covered: cut points that are square ``nnx.Linear`` layers of a plain
    dense network ``x^l = phi(W^l x^{l-1} + b^l)`` (the cut output is the
    pre-activation ``h^l``), or, with ``residual_scale=alpha``, blocks
    ``x^l = x^{l-1} + alpha phi(W^l x^{l-1} + b^l)`` holding one square
    ``nnx.Linear`` each (the cut output is ``x^l``). ``sigma_w2 = N mean(W^2)``
    and ``sigma_b2 = mean(b^2)`` are read off the layers, ``p^0, c^0, m^0`` off
    the first block's input for the batch ``x``; ``activation`` names ``phi``.

    A toolkit ``networks.MLP``/``ConvNet`` (:func:`is_stack`) needs no
    ``activation``: the curves are :func:`isometry.signal.model_theory`'s
    (``q^l``, ``c^l``, ``grad_preact_sq``, ``grad_weight_sq`` as ``mean_sq``,
    ``pair_cosine``, ``grad_out_sq``, ``grad_kernel_sq``) at the cut layers;
    it raises for normalizations without a theory (batch norm).

    Returns:
        a dict of ``(K,)`` arrays named like :class:`ProbeSignal` fields:
        ``mean_sq`` and ``pair_cosine`` (``q^l``, ``c^l``; plain only) and
        ``grad_out_sq`` (``||dLoss/dh^l||^2`` plain, ``||dLoss/dx^l||^2``
        residual, relative to the last block), plus ``"theory"``, the
        :class:`isometry.signal.Theory`.

    Raises:
        ProbeError: the cut points are not such layers (no theory here).
    """
    if is_stack(model):
        return _stack_theory(model, x, at)
    if activation is None:
        raise ProbeError("probe.theory: pass activation= (the name of the blocks' nonlinearity)")
    paths = cuts.resolve(model, at)
    residual = residual_scale is not None
    layers = [_dense_layer(cuts.lookup(model, p), residual) for p in paths]
    ok = all(m is not None and m.in_features == m.out_features for m in layers)
    if not ok or len({m.in_features for m in layers}) != 1:
        raise ProbeError(
            "probe.theory covers plain dense networks cut at square nnx.Linear layers of one "
            "width, or residual blocks (residual_scale=...) holding one such layer; "
            f"not the cut points {list(paths)}"
        )
    N = layers[0].in_features
    sw = jnp.mean(jnp.stack([N * jnp.mean(m.kernel[...] ** 2) for m in layers]))
    sb = jnp.mean(jnp.stack([_bias_sq(m) for m in layers]))
    _, x, graphdef, params, rest, _ = cuts.prepare(model, x, paths)
    x0 = cuts.capture(graphdef, (params, rest), paths, x)[0][0]
    p0, c0, m0 = jnp.mean(x0**2), _signal.pair_cosine(x0), jnp.mean(x0)
    th = _signal.theory(
        activation, sw, sb, len(paths), p0, jnp.where(jnp.isnan(c0), 0.0, c0),
        m0=m0, residual_scale=residual_scale,
    )  # fmt: skip
    if residual:
        return {"grad_out_sq": th.grad_state_sq / th.grad_state_sq[-1], "theory": th}
    return {"mean_sq": th.q, "pair_cosine": th.c, "grad_out_sq": th.grad_preact_sq, "theory": th}


def _bias_sq(m) -> Array:
    return jnp.zeros(()) if m.bias is None else jnp.mean(m.bias[...] ** 2)


_SIGNAL_PANELS = (
    ("forward statistics of the block output", "mean_sq", "chan_var", "chan_sq_mean", "branch_var"),
    ("cosines", "pair_cosine", "position_cosine"),
    ("squared gradient norms", "grad_out_sq", "grad_param_sq"),
)
_LABELS = {
    "mean_sq": "mean square",
    "chan_var": "avg. channel variance",
    "chan_sq_mean": "avg. channel squared mean",
    "branch_var": "residual-branch variance",
    "pair_cosine": "pair cosine (examples)",
    "position_cosine": "position cosine (tokens)",
    "grad_out_sq": r"$\|\partial L/\partial y^l\|^2$",
    "grad_param_sq": r"$\|\partial L/\partial \theta^l\|^2$",
}


def _as_run(run) -> dict:
    if isinstance(run, ProbeSignal):
        return {"signal": run}
    if isinstance(run, ProbeSpectra):
        return {"spectra": run}
    if isinstance(run, tuple):
        return {"signal": run[0], "spectra": run[1] if len(run) > 1 else None}
    if isinstance(run, dict):
        return run
    raise TypeError(f"probe.plot: a run is a ProbeSignal, ProbeSpectra, tuple or dict, got {run!r}")


def plot(*runs, path=None, title: str = ""):
    """One figure of everything per block; saved as ``path.png`` and ``path.pdf`` if given.

    Each run is a :class:`ProbeSignal`, a ``(ProbeSignal, ProbeSpectra)``
    pair, or a dict with any of ``"signal"``, ``"spectra"``, ``"theory"`` (the
    dict of :func:`theory`) and ``"label"``. Panels: forward statistics,
    cosines, gradients (Brock, De & Smith 2021), and the mean and the
    spread (standard deviation of ``ln s^2``) of the squared singular values
    of the cumulative and local Jacobians. Measurement is drawn as markers,
    mean-field theory as black lines (dashed for the first run, dotted for
    the others; relative gradient curves scaled to the measurement at the last
    block). Several runs share the axes, told apart by line style and label.

    Returns:
        the matplotlib figure (closed after saving when ``path`` is given).
    """
    import matplotlib.pyplot as plt

    from isometry import plotting

    runs = [_as_run(r) for r in runs]
    if not runs:
        raise ValueError("probe.plot: pass at least one run")
    plotting.style()
    fig, axes = plt.subplots(1, 5, figsize=(22, 4.4), constrained_layout=True)
    styles = ("-", "--", ":", "-.")
    for r_i, run in enumerate(runs):
        ls, label = styles[r_i % len(styles)], run.get("label", "")
        if run.get("signal") is not None:
            _signal_panels(axes[:3], run["signal"], run.get("theory"), ls, label)
        if run.get("spectra") is not None:
            _jacobian_panel(axes[3:], run["spectra"], ls, label)
    if axes[4].has_data():
        axes[4].set_ylim(bottom=0)
    ref = next((r.get("signal") or r.get("spectra") for r in runs), None)
    for ax in axes:
        _block_axis(ax, ref.paths if ref is not None else ())
        if ax.has_data():
            ax.legend(loc="best", fontsize=7)
    if title:
        fig.suptitle(title)
    if path is not None:
        plotting.save(fig, path)
    return fig


def _signal_panels(axes, sig: ProbeSignal, th, ls: str, label: str) -> None:
    import numpy as np

    k = np.arange(1, len(sig.paths) + 1)
    colors = ("C0", "C1", "C2", "C3")
    suffix = f" ({label})" if label else ""
    th_ls = "--" if ls == "-" else ":"  # each run's theory told apart too
    for ax, (ptitle, *fields) in zip(axes, _SIGNAL_PANELS, strict=True):
        for c, f in zip(colors, fields, strict=False):
            v = np.asarray(getattr(sig, f), float)
            if np.all(np.isnan(v)):
                continue
            ax.plot(k, v, ls, marker="o", ms=3.5, lw=1, color=c, label=_LABELS[f] + suffix)
            if th is not None and f in th:
                t = np.asarray(th[f], float)
                if f.startswith("grad"):
                    t = t * v[-1] / t[-1]
                ax.plot(
                    k, t, th_ls, color="black", lw=1.2, label=f"{_LABELS[f]} mean field{suffix}"
                )
        ax.set_title(ptitle)
        if ptitle != "cosines":
            ax.set_yscale("log")
    axes[0].set_ylabel("value")
    axes[1].set_ylim(-0.1, 1.05)


def _jacobian_panel(axes, spec: ProbeSpectra, ls: str, label: str) -> None:
    import numpy as np

    k = np.arange(1, len(spec.paths) + 1)
    suffix = f" ({label})" if label else ""
    for name, color in (("cumulative", "C4"), ("local", "C5")):
        s = {key: np.asarray(v, float) for key, v in getattr(spec, f"{name}_summary").items()}
        kw = {"marker": "s", "ms": 3.5, "color": color}
        axes[0].plot(k, s["mean"], ls, **kw, label=f"{name} mean $s^2$" + suffix)
        axes[1].plot(k, s["log_spread"], ls, **kw, label=f"{name}" + suffix)
    axes[0].set_yscale("log")
    axes[0].set_title(f"Jacobian mean $s^2$, one example ({spec.method})")
    axes[1].set_title(r"Jacobian spread: std of $\ln s^2$")


def _block_axis(ax, paths) -> None:
    k = range(1, len(paths) + 1)
    if 0 < len(paths) <= 16:
        ax.set_xticks(list(k), list(paths), rotation=60, ha="right", fontsize=7)
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block (cut point)")


# --------------------------------------------------------------------------- #
# Factories and files (for the ``isometry probe`` command).
# --------------------------------------------------------------------------- #


def load_factory(spec: str) -> Callable:
    """The callable named by ``"package.module:name"`` or ``"path/to/file.py:name"``.

    Raises:
        ProbeError: the text has no ``:``, the module or file cannot be
            imported, or it has no callable of that name (the message names it).
    """
    import importlib
    import importlib.util
    from pathlib import Path

    module_name, sep, attr = str(spec).rpartition(":")
    if not sep or not module_name or not attr:
        raise ProbeError(f"factory must be MODULE:NAME or FILE.py:NAME, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            loc = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if loc is None or not Path(module_name).is_file():
                raise FileNotFoundError(f"no file {module_name}")
            module = importlib.util.module_from_spec(loc)
            loc.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as err:  # any failure of the user's import is reported with its name
        raise ProbeError(
            f"cannot import the factory {spec!r}: {type(err).__name__}: {err}"
        ) from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ProbeError(f"the factory {spec!r}: {module_name} has no callable named {attr!r}")
    return factory


def save(out, sig: ProbeSignal | None = None, spec: ProbeSpectra | None = None) -> list:
    """Write ``out/probe.json`` (per-block rows and summaries) and ``out/probe.npz`` (spectra).

    The npz holds ``cumulative_<l>``/``local_<l>`` (and ``*_weights_<l>`` for
    SLQ) for block ``l``, with the per-block statistics under their field names.
    """
    from pathlib import Path

    from isometry import atomic

    out = Path(out)
    doc, arrays = {}, {}
    if sig is not None:
        doc["signal"] = sig.rows()
        doc["grad_input_sq"], doc["loss"] = float(sig.grad_input_sq), float(sig.loss)
        arrays |= {f: getattr(sig, f) for f in (*_FORWARD, *_BACKWARD)}
    if spec is not None:
        doc["spectra"] = {"method": spec.method, "index": spec.index, "paths": spec.paths,
                          "dims": spec.dims, "cumulative": spec.cumulative_summary,
                          "local": spec.local_summary,
                          "cumulative_w1_bound": spec.cumulative_w1_bound,
                          "local_w1_bound": spec.local_w1_bound}  # fmt: skip
        for name in ("cumulative", "local"):
            weights = getattr(spec, f"{name}_weights")
            for i, v in enumerate(getattr(spec, name)):
                arrays[f"{name}_{i}"] = v
                if weights is not None:
                    arrays[f"{name}_weights_{i}"] = weights[i]
    return [
        atomic.write_json(out / "probe.json", doc),
        atomic.write_npz(out / "probe.npz", **arrays),
    ]
