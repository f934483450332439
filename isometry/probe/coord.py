"""The coordinate check (microsoft/mup's ``coord_check``) for any Flax NNX model, over
width or over depth: :func:`coord_check` and :class:`CoordCheck`.

For each size ``n`` (a width, or a depth at fixed width), seed and step
``t = 0..steps`` of training on one fixed batch, the mean absolute entry of
each block's output and of its change since initialization::

    size^l_t(n)   = mean |y^l_t|,        change^l_t(n) = mean |y^l_t - y^l_0|,

(mup's ``l1`` statistic; Yang et al. 2022, "Tensor Programs V"; the README of
microsoft/mup, "Coord Check"), summarized per block and
step by the least-squares slope of ``log size`` and ``log change`` against
``log n``. In a parameterization with a feature-learning limit (muP over width,
depth-muP over depth) the change stays Theta(1): slope 0. Under the standard
parameterization with Adam the change of a hidden block grows like ``n``
(``Delta W`` has entries ``~ eta`` whatever the width, so ``Delta W x ~ eta n``):
slope near 1 until the activation saturates. Under muP the network output at
initialization shrinks like ``1/sqrt(m)`` (its variance is ``1/m`` times the
standard one; mup's README notes it), so the output's *size* at ``t = 0``
has slope ``-1/2``; its change has slope 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from isometry import cuts, networks, validate
from isometry import parameterization as _param

__all__ = ["OVER", "CoordCheck", "coord_check", "log_slopes"]

Array = jax.Array
OVER = ("width", "depth")
_DEPTH_LABELS = ("first block", "middle block", "last block")


def log_slopes(sizes: Array, values: Array) -> Array:
    """Least-squares slopes of ``log values`` against ``log sizes`` along axis 1.

    ``values (seeds, S, ...)`` against ``sizes (S,)``: ``(seeds, ...)``, with
    ``slope = sum_i (u_i - u_bar)(v_i - v_bar) / sum_i (u_i - u_bar)^2``,
    ``u = log n``, ``v = log value`` (NaN where a value is 0).
    """
    u = jnp.log(jnp.asarray(sizes, jnp.float32))
    u = u - jnp.mean(u)
    v = jnp.log(jnp.where(values > 0, values, jnp.nan))
    v = v - jnp.mean(v, axis=1, keepdims=True)
    shape = (1, -1) + (1,) * (values.ndim - 2)
    return jnp.sum(u.reshape(shape) * v, axis=1) / jnp.sum(u * u)


@dataclasses.dataclass(frozen=True)
class CoordCheck:
    """A coordinate check's measurements.

    Attributes:
        sizes: ``(S,)`` the widths (or depths).
        over: ``"width"`` or ``"depth"``.
        blocks: ``K`` labels: the cut points (``"layer.0"``, ``"blocks.3"``) and
            ``"output"``; over depth ``"first block"``, ``"middle block"``,
            ``"last block"``, ``"output"``.
        size: ``(seeds, S, steps + 1, K)``, ``mean |y^l_t|``.
        change: ``(seeds, S, steps + 1, K)``, ``mean |y^l_t - y^l_0|`` (0 at ``t = 0``).
        kind: the parameterization (``None`` when the optimizer was given as a
            transformation or a function of the model).
    """

    sizes: Array
    over: str
    blocks: tuple[str, ...]
    size: Array
    change: Array
    kind: str | None

    def slopes(self) -> dict[str, Array]:
        """Slopes of ``log size`` and ``log change`` vs ``log n`` per block and step.

        Returns ``{"size", "change"}`` ``(seeds, steps + 1, K)`` (the change's
        slope at ``t = 0`` is NaN) and their mean and standard deviation over
        seeds (``ddof = 1``; NaN for one seed): ``"size_mean"``, ``"size_std"``,
        ``"change_mean"``, ``"change_std"`` ``(steps + 1, K)``.
        """
        out = {}
        for name in ("size", "change"):
            s = log_slopes(self.sizes, getattr(self, name))
            out[name] = s
            out[f"{name}_mean"] = jnp.mean(s, axis=0)
            n = s.shape[0]
            out[f"{name}_std"] = (
                jnp.std(s, axis=0, ddof=1) if n > 1 else jnp.full(s.shape[1:], jnp.nan)
            )
        return out


def _is_stack(model) -> bool:
    return isinstance(model, networks.MLP | networks.ConvNet | networks.Transformer)


def _block_paths(model, over: str, at) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(paths to record, their labels)``; over depth, the first, middle and last block."""
    if _is_stack(model):
        paths = tuple(f"layer.{i}" for i in range(model.config.depth)) if at is None else at
    else:
        paths = cuts.resolve(model, at)
    paths = tuple(paths)
    if over == "width":
        return paths, paths
    k = len(paths)
    pick = tuple(paths[i] for i in (0, (k - 1) // 2, k - 1))
    return pick, _DEPTH_LABELS


def _forward(graphdef, params, rest, x, paths, stack: bool):
    """``(y, [y^l for l in paths])`` of one forward pass."""
    if stack:
        s = nnx.merge(graphdef, params, rest, copy=True).stack()
        xl = s.input_map(x)

        def body(h, p):
            h, _ = s.step(p, h, None)
            return h, h

        xL, hs = jax.lax.scan(body, xl, s.params)
        idx = [int(p.rpartition(".")[2]) for p in paths]
        outs = [hs[i] for i in idx]
        return s.output_map(xL), outs
    y, rec = cuts.tapped_call(graphdef, (params, rest), paths, x)
    return y, list(rec.outputs)


def _run_fn(graphdef, rest, x, paths, stack, tx, steps, loss):
    """The jitted check of one size, ``vmap``-ped over seeds: ``(params, target) -> (size,
    change)``, each ``(steps + 1, K)``; the training steps are one ``lax.scan``."""

    def stats(params):
        y, outs = _forward(graphdef, params, rest, x, paths, stack)
        return [*outs, y]

    def objective(params, target):
        return loss(nnx.merge(graphdef, params, rest, copy=True)(x), target)

    def run(params, target):
        first = stats(params)

        def record(now):
            size = jnp.stack([jnp.mean(jnp.abs(a)) for a in now])
            change = jnp.stack([jnp.mean(jnp.abs(a - b)) for a, b in zip(now, first, strict=True)])
            return size, change

        def step(carry, _):
            params, opt_state = carry
            grads = jax.grad(objective)(params, target)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, opt_state), record(stats(params))

        _, (size, change) = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
        size0, change0 = record(first)
        return jnp.concatenate([size0[None], size]), jnp.concatenate([change0[None], change])

    return jax.jit(jax.vmap(run))


def _mse(y, target):
    """``0.5 mean_batch sum_out (y - target)^2``."""
    return 0.5 * jnp.mean(jnp.sum(jnp.reshape(y - target, (y.shape[0], -1)) ** 2, axis=-1))


def _optimizer_fn(optimizer, learning_rate, kind, shapes, over, depth, zero_readout):
    """``(model, size) -> tx``, applying the parameterization ``kind`` to the model in place
    when ``optimizer`` is a name."""
    if isinstance(optimizer, str):
        validate.choice("optimizer", optimizer, _param.OPTIMIZERS)

        def build(model, n):
            d = n if over == "depth" else depth
            p = _param.apply(
                model, kind, shapes, optimizer=optimizer, depth=d, zero_readout=zero_readout
            )
            return p.tx(learning_rate)

        return build
    if isinstance(optimizer, optax.GradientTransformation):
        return lambda model, n: optimizer
    if callable(optimizer):
        return lambda model, n: optimizer(model)
    raise TypeError(
        f"optimizer must be one of {_param.OPTIMIZERS}, an optax.GradientTransformation or a "
        f"function model -> GradientTransformation, got {optimizer!r}"
    )


def _check_args(factory, sizes, over, steps, seeds, kind):
    if not callable(factory):
        raise TypeError(f"factory must be callable as factory(size, rngs), got {factory!r}")
    validate.choice("over", over, OVER)
    sizes = validate.positive_ints("sizes", sizes)
    if len(sizes) < 2 or len(set(sizes)) != len(sizes):
        raise ValueError(f"sizes must be two or more distinct {over}s, got {sizes}")
    validate.positive_int("steps", steps)
    validate.positive_int("seeds", seeds)
    validate.choice("parameterization", kind, _param.KINDS)
    return sizes


def _one_size(factory, n, x, build, *, over, at, seeds, steps, loss, key):
    """``(labels, size, change)`` of one width or depth; ``size, change (seeds, T+1, K)``."""
    models = [factory(n, nnx.Rngs(seed)) for seed in range(seeds)]
    if not all(isinstance(m, nnx.Module) for m in models):
        raise TypeError(f"factory({n}, rngs) must return an nnx.Module")
    txs = [build(m, n) for m in models]
    x = cuts.as_batch(models[0], x)
    paths, labels = _block_paths(models[0], over, at)
    split = [nnx.split(m, nnx.Param, ...) for m in models]
    graphdef, _, rest = split[0]
    params = jax.tree.map(lambda *a: jnp.stack(a), *[s[1] for s in split])
    y = jax.eval_shape(lambda: models[0](x))
    targets = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), y.shape, y.dtype))(
        jnp.arange(seeds)
    )
    stack = _is_stack(models[0])

    def loss_fn(out, target):
        return _mse(out, target) if loss is None else loss(out)

    run = _run_fn(graphdef, rest, x, paths, stack, txs[0], steps, loss_fn)
    size, change = run(params, targets)
    return (*labels, "output"), size, change


def coord_check(
    factory: Callable,
    sizes: Sequence[int],
    x,
    optimizer="adam",
    *,
    learning_rate: float = 1e-2,
    parameterization: str = "standard",
    steps: int = 4,
    seeds: int = 3,
    over: str = "width",
    loss: Callable | None = None,
    key=None,
    at=None,
    depth: int | None = None,
    zero_readout: bool = False,
) -> CoordCheck:
    """The coordinate check of ``factory(size, rngs)`` over ``sizes`` (module docstring).

    For each size and seed ``s`` (``rngs = nnx.Rngs(s)``), the model is put in
    ``parameterization`` (:func:`isometry.parameterization.apply`, with the shapes
    :func:`~isometry.parameterization.infer` finds over ``sizes``, the first the
    base; over depth at the model's own width, with ``depth = size``) and trained
    ``steps`` steps on the batch ``x`` with ``optimizer``; every block's output is
    recorded before the first step and after each.

    Args:
        factory: ``factory(size, rngs) -> nnx.Module``: the width (or depth) ``size``.
        sizes: two or more distinct widths (or depths).
        x: one batch ``(B, ...)``, used at every step.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"`` (scaled as
            ``parameterization`` says, at ``learning_rate``); or an
            ``optax.GradientTransformation`` / a function ``model ->
            GradientTransformation`` used as given (the factory then builds the
            parameterization itself).
        parameterization: ``"standard"``, ``"ntk"``, ``"mup"``, ``"depth_mup"``.
        steps: training steps (the records are ``t = 0..steps``).
        seeds: the number of seeds ``0..seeds-1`` (models and targets).
        over: ``"width"`` or ``"depth"`` (cut points: all blocks over width; the
            first, middle and last over depth).
        loss: ``loss(y) -> scalar``; default ``0.5 mean_batch ||y - t||^2`` with
            targets ``t ~ N(0, 1)`` drawn from ``fold_in(key, seed)``.
        key: the targets' key (default ``jax.random.key(0)``).
        at: the cut points (module paths; ``"layer.l"`` for the toolkit's stacks).
        depth: ``L`` for ``"depth_mup"`` over width on a model without a config.
        zero_readout: output weights initialized at 0 (see
            :func:`isometry.parameterization.apply`; needs ``over="width"``).

    Returns:
        :class:`CoordCheck`; ``.slopes()`` summarizes it.

    Raises:
        ValueError: bad sizes, steps, seeds, ``over``, an unknown
            optimizer or parameterization, a factory that is not callable or
            builds no module, different cut points at two widths, a run that
            diverged (non-finite activations: lower ``learning_rate``).
    """
    sizes = _check_args(factory, sizes, over, steps, seeds, parameterization)
    key = jax.random.key(0) if key is None else validate.prng_key("key", key)
    named = isinstance(optimizer, str) and over == "width"
    scaled = named and (parameterization != "standard" or zero_readout)
    shapes = _param.infer(factory, sizes) if scaled else None
    build = _optimizer_fn(
        optimizer, learning_rate, parameterization, shapes, over, depth, zero_readout
    )
    labels, size, change = None, [], []
    for n in sizes:
        lab, s, c = _one_size(factory, n, x, build, over=over, at=at, seeds=seeds, steps=steps,
                              loss=loss, key=key)  # fmt: skip
        if labels is not None and lab != labels:
            raise ValueError(f"the cut points differ between sizes: {labels} vs {lab} at {n}")
        labels, size, change = lab, [*size, s], [*change, c]
    size, change = jnp.stack(size, axis=1), jnp.stack(change, axis=1)
    _check_finite(size, sizes)
    kind = parameterization if isinstance(optimizer, str) else None
    return CoordCheck(jnp.asarray(sizes), over, labels, size, change, kind)


def _check_finite(size, sizes) -> None:
    bad = ~np.isfinite(np.asarray(size))
    if bad.any():
        _, i, t, _ = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(
            f"the run at size {sizes[i]} diverged at step {t} (non-finite activations); "
            "lower learning_rate"
        )
