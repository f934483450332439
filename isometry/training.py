"""Training linked to isometry: Flax NNX models, optax optimizers, gradient clipping.

A run trains any model of :mod:`isometry.networks` (anything ``nnx.Module``
whose call maps a batch of inputs to logits or outputs) with

    updates = opt( clip( grad L(theta) ) )       (optax.chain(clip, opt))
    theta  <- theta + updates

* optimizers ``sgd``, ``momentum``, ``rmsprop``, ``adam`` (:func:`optimizer`);
  learning-rate schedules ``constant``, ``cosine``, ``linear``,
  ``exponential`` with linear warm-up (:func:`schedule`);
* clipping (:func:`clipping`): ``none``; ``global_norm:c`` (``g <- g *
  min(1, c / ||g||)``, Pascanu, Mikolov & Bengio 2013); ``value:c``
  (``g_i <- clamp(g_i, -c, c)``); ``agc:c`` (adaptive, unit-wise,
  ``G_i <- G_i * min(1, c max(||W_i||, eps) / ||G_i||)``, Brock, De, Smith
  & Simonyan 2021; :func:`adaptive_grad_clip`, computed per layer of the
  scanned stack).

Logged (``metrics.jsonl``, one JSON record per logged step; ``step`` counts
completed updates):

* every ``log_every`` steps: ``loss``, ``accuracy`` (of the batch, before the
  update), ``lr``, ``grad_norm`` (global norm before clipping),
  ``grad_norm_clipped`` (after), ``clipped`` (bool), ``clip_ratio``
  (after / before), ``grad_norm_input``, ``grad_norm_output`` and
  ``grad_norm_layers`` (the ``L`` per-layer gradient norms of the stack);
* every ``eval_every`` steps (and at step 0): ``eval_loss``, ``eval_accuracy``
  on the whole held-out split;
* every ``probe_every`` steps (and at step 0): the Jacobian probe
  ``jac_sv2_mean``, ``jac_sv2_var``, ``jac_sv2_max``: mean, variance and
  maximum of the squared singular values ``lambda_i`` of the stack's
  input-output Jacobian ``J = dx^L/dx^0`` (Pennington, Schoenholz & Ganguli
  2017), computed in one pass over depth (:func:`isometry.jacobian.stack_jacobians`)
  at ``probe_inputs`` held-out inputs, in evaluation mode; mean and variance
  are averaged over the inputs, the maximum is over all of them.

Output directory: ``config.json``, ``metrics.jsonl`` (records appended and
fsynced; a resumed run first truncates records past its checkpoint, so its
metrics equal an uninterrupted run's), ``summary.json`` (atomic), and orbax
checkpoints in ``checkpoints/`` every ``checkpoint_every`` steps and at the
end. Calling :func:`train` again on the same directory resumes from the last
checkpoint; the data order is a function of ``(seed, step)``
(:func:`isometry.data.batch_indices`), so the final parameters are bitwise
those of an uninterrupted run.

A non-finite loss, gradient or update leaves the parameters at their last
finite values (the step is a no-op from then on) and the run stops at the
next check (every log or checkpoint step) with :class:`NonFiniteError`
naming the step; the metrics and the last good checkpoint are kept.

The train step is one jitted function of ``(graphdef, params, batch_stats,
optimizer state)`` (``nnx.split``), with the state donated; it runs on CPU and
GPU unchanged.

Example:
    >>> from flax import nnx
    >>> from isometry import data, networks, training
    >>> ds = data.load_digits()
    >>> model = networks.MLP(networks.MLPConfig(depth=4, width=64, in_dim=64, out_dim=10),
    ...                      rngs=nnx.Rngs(0))
    >>> cfg = training.TrainConfig(steps=100, learning_rate=0.05, clip="global_norm:1.0")
    >>> result = training.train(model, ds, cfg)          # doctest: +SKIP
    >>> result.summary["eval_accuracy"]                  # doctest: +SKIP

References:
    Pascanu, Mikolov & Bengio 2013, "On the difficulty of training recurrent
    neural networks" (clipping by norm). Brock, De, Smith & Simonyan 2021,
    "High-performance large-scale image recognition without normalization"
    (adaptive gradient clipping). Pennington, Schoenholz & Ganguli 2017,
    "Resurrecting the sigmoid in deep learning through dynamical isometry".
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from isometry import atomic, jacobian, networks, spectra, validate
from isometry import data as _data

__all__ = [
    "CLIPS",
    "OPTIMIZERS",
    "SCHEDULES",
    "MetricsLog",
    "NonFiniteError",
    "RunConfig",
    "TrainConfig",
    "TrainResult",
    "adaptive_grad_clip",
    "clipping",
    "evaluate",
    "init_state",
    "jacobian_probe",
    "layer_grad_norms",
    "make_train_step",
    "optimizer",
    "parse_clip",
    "run",
    "schedule",
    "train",
]

OPTIMIZERS = ("sgd", "momentum", "rmsprop", "adam")
SCHEDULES = ("constant", "cosine", "linear", "exponential")
CLIPS = ("none", "global_norm", "value", "agc")

# Names of the parameters outside the scanned stack (networks.MLP / ConvNet).
_INPUT_PARAMS = ("embed",)
_OUTPUT_PARAMS = ("readout", "readout_bias")


class NonFiniteError(FloatingPointError):
    """The loss, gradient or update became NaN/Inf; ``step`` is the update that failed."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


# --------------------------------------------------------------------------- #
# Configuration.
# --------------------------------------------------------------------------- #


def parse_clip(spec: str) -> tuple[str, float | None]:
    """``"none"`` | ``"global_norm:C"`` | ``"value:C"`` | ``"agc:C"`` -> ``(kind, C)``."""
    if not isinstance(spec, str):
        raise TypeError(f"clip must be a string like 'global_norm:1.0', got {spec!r}")
    kind, _, value = spec.strip().partition(":")
    kind = kind.strip().lower().replace("-", "_")
    validate.choice("clip", kind, CLIPS)
    if kind == "none":
        if value:
            raise ValueError(f"clip 'none' takes no threshold, got {spec!r}")
        return "none", None
    try:
        c = float(value)
    except ValueError as err:
        raise ValueError(f"clip must be '{kind}:THRESHOLD' with a number, got {spec!r}") from err
    validate.real_array("clip threshold", c, minimum=0.0, strict=True)
    return kind, c


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of a training run (frozen, hashable; JSON via ``to_dict``/``from_dict``).

    Attributes:
        steps: number of updates.
        batch_size: training examples per update (an epoch drops the remainder).
        optimizer: ``sgd``, ``momentum`` (heavy ball, ``momentum``), ``rmsprop``
            (``decay``, ``eps``) or ``adam`` (``b1``, ``b2``, ``eps``).
        learning_rate: the peak learning rate ``eta``.
        schedule: ``constant``, ``cosine``, ``linear`` or ``exponential`` decay
            from ``eta`` to ``final_lr_fraction * eta`` over the steps after warm-up.
        warmup_steps: linear warm-up from 0 to ``eta``.
        final_lr_fraction: end of the decay, as a fraction of ``eta`` (in ``(0, 1]``
            for ``exponential``).
        momentum, decay, b1, b2, eps: optimizer constants.
        weight_decay: decoupled weight decay added to the update (0 = off).
        clip: ``"none"``, ``"global_norm:C"``, ``"value:C"`` or ``"agc:C"``.
        agc_eps: ``eps`` of adaptive clipping (floor of the parameter norm).
        seed: seed of the data order (and, in :func:`run`, of the initialization).
        log_every: log training metrics every this many steps (and at the last).
        eval_every: evaluate on the held-out split every this many steps (0 = only at the end).
        probe_every: Jacobian probe every this many steps (0 = off).
        probe_inputs: held-out inputs of the Jacobian probe.
        checkpoint_every: orbax checkpoint every this many steps (and at the end).
        keep_checkpoints: checkpoints kept on disk.
        eval_batch_size: chunk size of evaluation.
    """

    steps: int = 1000
    batch_size: int = 128
    optimizer: str = "sgd"
    learning_rate: float = 0.01
    schedule: str = "constant"
    warmup_steps: int = 0
    final_lr_fraction: float = 0.01
    momentum: float = 0.9
    decay: float = 0.9
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip: str = "none"
    agc_eps: float = 1e-3
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    probe_every: int = 100
    probe_inputs: int = 4
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    eval_batch_size: int = 1024

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            validate.positive_int(name, getattr(self, name))
        for name in ("eval_every", "probe_every", "warmup_steps"):
            validate.positive_int(name, getattr(self, name), minimum=0)
        validate.positive_int("probe_inputs", self.probe_inputs)
        validate.positive_int("eval_batch_size", self.eval_batch_size)
        validate.positive_int("seed", self.seed, minimum=0)
        validate.choice("optimizer", self.optimizer, OPTIMIZERS)
        validate.choice("schedule", self.schedule, SCHEDULES)
        validate.real_array("learning_rate", self.learning_rate, minimum=0.0, strict=True)
        validate.real_array("final_lr_fraction", self.final_lr_fraction, minimum=0.0, maximum=1.0)
        if self.schedule == "exponential" and self.final_lr_fraction <= 0:
            raise ValueError("final_lr_fraction must be > 0 for the exponential schedule")
        for name in ("momentum", "decay", "b1", "b2"):
            validate.real_array(name, getattr(self, name), minimum=0.0, maximum=1.0)
        validate.real_array("eps", self.eps, minimum=0.0)
        validate.real_array("weight_decay", self.weight_decay, minimum=0.0)
        validate.real_array("agc_eps", self.agc_eps, minimum=0.0, strict=True)
        kind, c = parse_clip(self.clip)
        object.__setattr__(self, "clip", kind if c is None else f"{kind}:{c:g}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**_known_fields(cls, d, "TrainConfig"))


def _known_fields(cls, d, owner) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{owner}: unknown field(s) {', '.join(unknown)}; known: {sorted(names)}")
    return dict(d)


# --------------------------------------------------------------------------- #
# Optimizer, schedule, clipping.
# --------------------------------------------------------------------------- #


def schedule(config: TrainConfig) -> optax.Schedule:
    """The learning rate ``eta_t`` at step ``t``: linear warm-up, then the chosen decay."""
    lr, warm = config.learning_rate, config.warmup_steps
    n = max(config.steps - warm, 1)
    end = config.final_lr_fraction * lr
    main = {
        "constant": lambda: optax.constant_schedule(lr),
        "cosine": lambda: optax.cosine_decay_schedule(lr, n, alpha=config.final_lr_fraction),
        "linear": lambda: optax.linear_schedule(lr, end, n),
        "exponential": lambda: optax.exponential_decay(lr, n, config.final_lr_fraction),
    }[config.schedule]()
    if warm == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])


def _unitwise_norm(x: jax.Array) -> jax.Array:
    """Norm per output unit (Brock et al. 2021): ``|x|`` for vectors, over fan-in otherwise."""
    if x.ndim <= 1:
        return jnp.abs(x)
    axes = (0,) if x.ndim == 2 else tuple(range(x.ndim - 1))
    return jnp.sqrt(jnp.sum(x * x, axis=axes, keepdims=True))


def adaptive_grad_clip(
    clipping: float,
    eps: float = 1e-3,
    is_stacked: Callable[[tuple, jax.Array], bool] | None = None,
) -> optax.GradientTransformation:
    """Adaptive gradient clipping (AGC), unit-wise, per layer of a scanned stack.

    ``G_i <- G_i * min(1, clipping * max(||W_i||, eps) / ||G_i||)`` for every
    output unit ``i`` of every layer (Brock, De, Smith & Simonyan 2021).
    ``is_stacked(path, leaf)`` marks parameters with a leading depth axis;
    their norms are taken per layer (``vmap`` over the axis), not across
    layers as a plain ``optax.adaptive_grad_clip`` would.
    """
    validate.real_array("clipping", clipping, minimum=0.0, strict=True)
    validate.real_array("eps", eps, minimum=0.0, strict=True)

    def clip_leaf(path, g, p):
        norm = _unitwise_norm
        if is_stacked is not None and is_stacked(path, p):
            norm = jax.vmap(_unitwise_norm)
        g_norm, p_norm = norm(g), norm(p)
        max_norm = clipping * jnp.maximum(p_norm, eps)
        scale = jnp.where(g_norm > max_norm, max_norm / jnp.maximum(g_norm, 1e-30), 1.0)
        return g * scale.astype(g.dtype)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("adaptive_grad_clip needs params (tx.update(grads, state, params))")
        return jax.tree_util.tree_map_with_path(clip_leaf, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def clipping(
    spec: str, *, agc_eps: float = 1e-3, is_stacked: Callable | None = None
) -> optax.GradientTransformation:
    """The stateless clipping transformation named by ``spec`` (see :func:`parse_clip`)."""
    kind, c = parse_clip(spec)
    if kind == "none":
        return optax.identity()
    if kind == "global_norm":
        return optax.clip_by_global_norm(c)
    if kind == "value":
        return optax.clip(c)
    return adaptive_grad_clip(c, agc_eps, is_stacked)


def optimizer(
    config: TrainConfig, *, is_stacked: Callable | None = None
) -> optax.GradientTransformation:
    """``optax.chain(clip, [weight decay], optimizer(schedule))``."""
    lr = schedule(config)
    opt = {
        "sgd": lambda: optax.sgd(lr),
        "momentum": lambda: optax.sgd(lr, momentum=config.momentum),
        "rmsprop": lambda: optax.rmsprop(lr, decay=config.decay, eps=config.eps),
        "adam": lambda: optax.adam(lr, b1=config.b1, b2=config.b2, eps=config.eps),
    }[config.optimizer]()
    parts = [clipping(config.clip, agc_eps=config.agc_eps, is_stacked=is_stacked)]
    if config.weight_decay > 0:
        parts.append(optax.add_decayed_weights(config.weight_decay))
    return optax.chain(*parts, opt)


# --------------------------------------------------------------------------- #
# Per-layer gradient norms.
# --------------------------------------------------------------------------- #


def _top_name(path) -> str:
    k = path[0]
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def _stacked_predicate(depth: int | None) -> Callable[[tuple, Any], bool]:
    def is_stacked(path, leaf) -> bool:
        name = _top_name(path)
        if depth is None or name in _INPUT_PARAMS + _OUTPUT_PARAMS:
            return False
        return jnp.ndim(leaf) >= 1 and jnp.shape(leaf)[0] == depth

    return is_stacked


def layer_grad_norms(grads, depth: int | None) -> dict[str, jax.Array]:
    """Gradient norms of the input map, each stacked layer, and the readout.

    Returns ``{"input": (), "layers": (L,), "output": ()}`` (``layers`` empty
    when ``depth`` is ``None``); parameters named ``embed`` are the input
    map, ``readout``/``readout_bias`` the output map, and the others with a
    leading axis of length ``depth`` the stack. Anything else counts as input.
    """
    is_stacked = _stacked_predicate(depth)
    sq_in = sq_out = jnp.zeros(())
    sq_layers = jnp.zeros((depth or 0,))
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        g = jnp.asarray(g, jnp.float32)
        if _top_name(path) in _OUTPUT_PARAMS:
            sq_out = sq_out + jnp.sum(g * g)
        elif is_stacked(path, g):
            sq_layers = sq_layers + jnp.sum((g * g).reshape(depth, -1), axis=1)
        else:
            sq_in = sq_in + jnp.sum(g * g)
    return {"input": jnp.sqrt(sq_in), "layers": jnp.sqrt(sq_layers), "output": jnp.sqrt(sq_out)}


# --------------------------------------------------------------------------- #
# The jitted pieces.
# --------------------------------------------------------------------------- #


def _loss(kind: str, out, y):
    """Mean loss and number correct: softmax cross-entropy on labels, or 0.5 * MSE."""
    if kind == "cross_entropy":
        per = optax.softmax_cross_entropy_with_integer_labels(out.astype(jnp.float32), y)
        correct = (jnp.argmax(out, -1) == y).astype(jnp.float32)
    else:
        per = 0.5 * jnp.mean(jnp.square(out - y).reshape(out.shape[0], -1), axis=-1)
        correct = jnp.zeros_like(per)
    return per, correct


def _graphdefs(model: nnx.Module):
    """``(train graphdef, eval graphdef, state dict)``; the model is left in training mode."""
    model.eval()
    g_eval = nnx.split(model, nnx.Param, nnx.BatchStat, ...)[0]
    model.train()
    g_train, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    return g_train, g_eval, {"params": params, "batch_stats": stats, "rest": rest}


def init_state(model: nnx.Module, tx: optax.GradientTransformation):
    """``(graphdef_train, graphdef_eval, state)``: the training state as one pytree.

    ``state = {"params", "batch_stats", "rest", "opt_state", "bad_step"}``;
    ``bad_step`` is ``-1``, or the 0-based index of the first non-finite step.
    """
    g_train, g_eval, s = _graphdefs(model)
    s["opt_state"] = tx.init(s["params"])
    s["bad_step"] = jnp.asarray(-1, jnp.int32)
    return g_train, g_eval, s


def make_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    clip_tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    *,
    loss: str = "cross_entropy",
    depth: int | None = None,
):
    """The jitted train step ``(state, x_all, y_all, idx, step) -> (state, metrics)``.

    ``x_all (n, *in)``, ``y_all (n, ...)`` stay on the device; ``idx (B,)``
    selects the batch. ``state`` is donated. ``clip_tx`` is the clipping part
    of ``tx``, re-applied to measure the clipped norm (stateless). A step
    whose loss, gradient or update is non-finite (or any step after one)
    leaves the state unchanged and records its index in ``bad_step``.
    """
    validate.choice("loss", loss, ("cross_entropy", "mse"))

    def loss_fn(params, stats, rest, x, y):
        model = nnx.merge(graphdef, params, stats, rest, copy=True)
        out = model(x)
        per, correct = _loss(loss, out, y)
        _, _, new_stats, new_rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
        return jnp.mean(per), (jnp.mean(correct), new_stats, new_rest)

    def step_fn(state, x_all, y_all, idx, step):
        x, y = x_all[idx], y_all[idx]
        p = state["params"]
        (value, (acc, stats, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            p, state["batch_stats"], state["rest"], x, y
        )
        g_norm = optax.tree.norm(grads)
        clipped, _ = clip_tx.update(grads, clip_tx.init(p), p)
        c_norm = optax.tree.norm(clipped)
        updates, opt_state = tx.update(grads, state["opt_state"], p)
        new = {
            "params": optax.apply_updates(p, updates),
            "batch_stats": stats,
            "rest": rest,
            "opt_state": opt_state,
        }
        finite = jnp.isfinite(value) & jnp.isfinite(g_norm) & jnp.isfinite(optax.tree.norm(updates))
        ok = finite & (state["bad_step"] < 0)
        old = {k: state[k] for k in new}
        out = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        out["bad_step"] = jnp.where(
            state["bad_step"] >= 0, state["bad_step"], jnp.where(finite, -1, step)
        ).astype(jnp.int32)
        norms = layer_grad_norms(grads, depth)
        metrics = {
            "loss": value,
            "accuracy": acc,
            "lr": jnp.asarray(lr_schedule(step), jnp.float32),
            "grad_norm": g_norm,
            "grad_norm_clipped": c_norm,
            "clipped": c_norm < g_norm * (1 - 1e-6),
            "clip_ratio": c_norm / jnp.maximum(g_norm, 1e-30),
            "grad_norm_input": norms["input"],
            "grad_norm_output": norms["output"],
            "grad_norm_layers": norms["layers"],
        }
        return out, metrics

    return jax.jit(step_fn, donate_argnums=0)


def _make_eval(graphdef_eval, loss: str):
    @jax.jit
    def chunk(params, stats, rest, x, y, mask):
        out = nnx.merge(graphdef_eval, params, stats, rest)(x)
        per, correct = _loss(loss, out, y)
        return jnp.sum(per * mask), jnp.sum(correct * mask)

    return chunk


def evaluate(eval_chunk, state, x, y, batch_size: int) -> dict[str, float]:
    """Mean loss and accuracy over all of ``x, y`` in fixed-size (padded) chunks."""
    n = x.shape[0]
    b = min(batch_size, n)
    tot_loss = tot_correct = 0.0
    for i in range(0, n, b):
        xb, yb = x[i : i + b], y[i : i + b]
        m = xb.shape[0]
        mask = jnp.arange(b) < m
        if m < b:
            pad = [(0, b - m)] + [(0, 0)] * (xb.ndim - 1)
            xb = jnp.pad(xb, pad)
            yb = jnp.pad(yb, [(0, b - m)] + [(0, 0)] * (yb.ndim - 1))
        sl, sc = eval_chunk(state["params"], state["batch_stats"], state["rest"], xb, yb, mask)
        tot_loss += float(sl)
        tot_correct += float(sc)
    return {"loss": tot_loss / n, "accuracy": tot_correct / n}


def jacobian_probe(graphdef_eval):
    """A jitted ``probe(params, batch_stats, rest, u) -> {"mean", "var", "max"}``.

    ``u (P, *in)``: probe inputs. For each, ``J = dx^L/dx^0`` of the model's
    scanned stack (``model.stack()``, evaluation mode) at ``x^0 =
    input_map(u)``, pushed forward in one pass over depth
    (:func:`isometry.jacobian.stack_jacobians`); ``lambda = eig(J J^T)``
    summarized by :func:`isometry.spectra.summary`. Returns the mean over
    inputs of the mean and variance of ``lambda``, and the maximum of
    ``lambda`` over all inputs. Dynamical isometry: mean near 1, small
    variance and maximum (Pennington et al. 2017).
    """

    @jax.jit
    def probe(params, stats, rest, u):
        s = nnx.merge(graphdef_eval, params, stats, rest).stack()
        x0 = s.input_map(u)
        n = math.prod(x0.shape[1:])
        J = jax.vmap(lambda x: jacobian.stack_jacobians(s.layer, s.params, x))(x0)
        J = J.reshape(x0.shape[0], n, n)
        lam = jnp.linalg.svd(J, compute_uv=False) ** 2
        summ = spectra.summary(lam)
        return {"mean": summ["mean"].mean(), "var": summ["var"].mean(), "max": summ["max"].max()}

    return probe


# --------------------------------------------------------------------------- #
# Output directory: metrics log and checkpoints.
# --------------------------------------------------------------------------- #


def _plain(x):
    """JSON-safe: arrays to lists, numpy scalars to Python, non-finite floats to strings/None."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray | np.generic | jax.Array):
        return _plain(np.asarray(x).tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


class MetricsLog:
    """``metrics.jsonl``: one JSON record per line, each with an integer ``"step"``.

    ``append`` writes whole lines and fsyncs; ``truncate(step)`` atomically
    rewrites the file keeping the records with ``"step" <= step`` (and
    dropping a partial last line left by a crash), which a resumed run calls
    with its checkpoint step.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a partial line from an interrupted write
            if isinstance(rec, dict) and "step" in rec:
                out.append(rec)
        return out

    def truncate(self, step: int) -> list[dict]:
        kept = [r for r in self.read() if r["step"] <= step]
        atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(_plain(r)) + "\n" for r in records)
        with open(self.path, "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def _checkpoint_manager(out_dir: Path, keep: int):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=False, create=True
    )
    return ocp.CheckpointManager((out_dir / "checkpoints").absolute(), options=options)


def _save(mngr, step: int, state) -> None:
    import orbax.checkpoint as ocp

    if mngr is not None and step not in mngr.all_steps():
        mngr.save(step, args=ocp.args.StandardSave(state))


def _restore(mngr, state):
    """``(step, state)`` from the latest checkpoint, or ``(0, state)`` if there is none."""
    import orbax.checkpoint as ocp

    step = None if mngr is None else mngr.latest_step()
    if step is None:
        return 0, state
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return int(step), mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _prepare_dir(out_dir: Path, config_dict: dict) -> None:
    """Write ``config.json``, or check that a resumed directory has the same config."""
    path = out_dir / "config.json"
    normalized = json.loads(json.dumps(_plain(config_dict)))
    if path.exists():
        old = json.loads(path.read_text())
        if old != normalized:
            a, b = _flat(old), _flat(normalized)
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise ValueError(
                f"out_dir {out_dir} holds a run with a different config (differs in: "
                f"{', '.join(diff)}); use a new output directory to start a new run"
            )
        return
    atomic.write_json(path, normalized)


# --------------------------------------------------------------------------- #
# The training loop.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained model (an ``nnx.Module`` at the final parameters).
        state: the final state pytree (see :func:`init_state`).
        records: the metric records of the whole run (as in ``metrics.jsonl``).
        summary: final evaluation, probe, status and timing.
    """

    model: nnx.Module
    state: dict
    records: list[dict]
    summary: dict


class _Batches:
    """Training batch indices by step, caching the current epoch's permutation."""

    def __init__(self, seed: int, n: int, batch_size: int):
        if batch_size > n:
            raise ValueError(f"batch_size must be <= the {n} training examples, got {batch_size}")
        self.seed, self.n, self.b = seed, n, batch_size
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, None

    def __call__(self, step: int) -> np.ndarray:
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, _data.epoch_permutation(self.seed, epoch, self.n)
        return self._perm[pos * self.b : (pos + 1) * self.b]


def _config_dict(cfg) -> dict | None:
    """A model config dataclass as a JSON-able dict (``None`` if it is not a dataclass)."""
    if dataclasses.is_dataclass(cfg):
        d = dataclasses.asdict(cfg)
        if not isinstance(d.get("activation", ""), str):
            d["activation"] = getattr(d["activation"], "name", repr(d["activation"]))
        return d
    return None


def _param_dtype(params):
    for leaf in jax.tree.leaves(params):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.dtype
    return jnp.result_type(float)


def _on_device(a: np.ndarray, dtype):
    a = np.asarray(a)
    return jnp.asarray(a, dtype) if np.issubdtype(a.dtype, np.floating) else jnp.asarray(a)


class _Run:
    """One training run's machinery (jitted functions, data on device, output files)."""

    def __init__(self, model, data: _data.Dataset, config: TrainConfig, out_dir, extra_config):
        self.cfg, self.data = config, data
        self.loss = "cross_entropy" if data.num_classes is not None else "mse"
        depth = getattr(getattr(model, "config", None), "depth", None)
        is_stacked = _stacked_predicate(depth)
        self.tx = optimizer(config, is_stacked=is_stacked)
        clip_tx = clipping(config.clip, agc_eps=config.agc_eps, is_stacked=is_stacked)
        self.lr = schedule(config)
        self.g_train, self.g_eval, self.state = init_state(model, self.tx)
        self.step_fn = make_train_step(
            self.g_train, self.tx, clip_tx, self.lr, loss=self.loss, depth=depth
        )
        self.eval_chunk = _make_eval(self.g_eval, self.loss)
        self.probe = jacobian_probe(self.g_eval) if hasattr(model, "stack") else None
        # inputs (and regression targets) in the parameters' float dtype
        dt = _param_dtype(self.state["params"])
        self.x, self.y = _on_device(data.x_train, dt), _on_device(data.y_train, dt)
        self.x_test, self.y_test = _on_device(data.x_test, dt), _on_device(data.y_test, dt)
        self.u_probe = self.x_test[: config.probe_inputs]
        self.batches = _Batches(config.seed, data.x_train.shape[0], config.batch_size)
        self.out = None if out_dir is None else Path(out_dir)
        self.log = self.mngr = None
        self.records: list[dict] = []
        if self.out is not None:
            config_dict = {"train": config.to_dict(), "dataset": data.name}
            model_cfg = _config_dict(getattr(model, "config", None))
            if model_cfg is not None:
                config_dict["model"] = model_cfg
            config_dict.update(extra_config or {})
            self.out.mkdir(parents=True, exist_ok=True)
            _prepare_dir(self.out, config_dict)
            self.log = MetricsLog(self.out / "metrics.jsonl")
            self.mngr = _checkpoint_manager(self.out, config.keep_checkpoints)

    def resume(self) -> int:
        step, self.state = _restore(self.mngr, self.state)
        if self.log is not None:
            self.records = self.log.truncate(step if step > 0 else -1)
        return step

    def measure(self, step: int, record: dict) -> dict:
        """Add evaluation and Jacobian-probe results due at ``step`` to ``record``."""
        cfg, s = self.cfg, self.state
        final = step == cfg.steps
        if step == 0 or final or (cfg.eval_every and step % cfg.eval_every == 0):
            ev = evaluate(self.eval_chunk, s, self.x_test, self.y_test, cfg.eval_batch_size)
            record["eval_loss"] = ev["loss"]
            if self.loss == "cross_entropy":
                record["eval_accuracy"] = ev["accuracy"]
        probe_due = cfg.probe_every and (step % cfg.probe_every == 0 or final)
        if self.probe is not None and probe_due:
            pr = jax.device_get(self.probe(s["params"], s["batch_stats"], s["rest"], self.u_probe))
            record.update({f"jac_sv2_{k}": float(v) for k, v in pr.items()})
        return record

    def write(self, records: list[dict]) -> None:
        records = [_plain(r) for r in records]
        self.records.extend(records)
        if self.log is not None:
            self.log.append(records)

    def check_finite(self, last_good: int) -> None:
        bad = int(self.state["bad_step"])
        if bad < 0:
            return
        where = ""
        if self.out is not None:
            ckpt = self.mngr.latest_step()
            where = (
                f"; last good checkpoint: step {ckpt}" if ckpt is not None else "; no checkpoint"
            ) + f"; metrics kept in {self.log.path}"
            self.summary("non_finite", failed_step=bad + 1, last_logged_step=last_good)
        raise NonFiniteError(
            f"training stopped: non-finite loss or gradient at step {bad + 1} "
            f"(the parameters are kept at their values before that step){where}",
            bad + 1,
        )

    def summary(self, status: str, **extra) -> dict:
        last = {}
        for r in self.records:
            last.update(r)
        summ = {"status": status, "steps": self.cfg.steps, **extra}
        for k in ("eval_loss", "eval_accuracy", "loss", "accuracy", "step"):
            if k in last:
                summ[k if k != "step" else "last_step"] = last[k]
        for k in ("jac_sv2_mean", "jac_sv2_var", "jac_sv2_max"):
            if k in last:
                summ[k] = last[k]
        if self.out is not None:
            atomic.write_json(self.out / "summary.json", _plain(summ))
        return summ


def _train_record(step: int, metrics) -> dict:
    m = jax.device_get(metrics)
    rec = {"step": step}
    for k, v in m.items():
        rec[k] = np.asarray(v).tolist()
    return rec


def train(
    model: nnx.Module,
    data: _data.Dataset,
    config: TrainConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    progress: bool = False,
    extra_config: dict | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``model`` on ``data`` (see the module docstring); resume if ``out_dir`` has a run.

    Args:
        model: an ``nnx.Module`` mapping ``(B, *in)`` to logits ``(B, classes)``
            (or outputs for a regression dataset); trained in place.
        data: a :class:`isometry.data.Dataset`.
        config: a :class:`TrainConfig`.
        out_dir: output directory (config, metrics, summary, checkpoints);
            ``None`` keeps everything in memory.
        progress: show a progress bar (tqdm) with the running loss.
        extra_config: more entries for ``config.json`` (e.g. dataset options).
        stop_after: for tests: return right after this many steps without a
            final checkpoint or summary, like a killed run.

    Returns:
        A :class:`TrainResult`.

    Raises:
        NonFiniteError: the loss or a gradient became NaN/Inf (names the step).
        ValueError: ``out_dir`` holds a run with a different configuration.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    r = _Run(model, data, config, out_dir, extra_config)
    try:
        return _loop(r, model, config, progress, stop_after)
    finally:  # the model holds the last (good) state, also after an error
        final = nnx.merge(r.g_train, r.state["params"], r.state["batch_stats"], r.state["rest"])
        nnx.update(model, nnx.state(final))


def _loop(r: _Run, model, config: TrainConfig, progress: bool, stop_after) -> TrainResult:
    start = r.resume()
    t0 = time.perf_counter()
    if start == 0:
        r.write([r.measure(0, {"step": 0})])
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    bar = _progress(progress, config.steps, start)
    step, last_logged = start, start
    try:
        for step in range(start + 1, end + 1):
            idx = r.batches(step - 1)
            r.state, metrics = r.step_fn(r.state, r.x, r.y, idx, jnp.int32(step - 1))
            logging = step % config.log_every == 0 or step == config.steps
            if logging or step % config.checkpoint_every == 0:
                r.check_finite(last_logged)
            if logging:
                rec = r.measure(step, _train_record(step, metrics))
                r.write([rec])
                last_logged = step
                bar.set_postfix(loss=f"{rec['loss']:.4g}", refresh=False)
            if r.mngr is not None and (step % config.checkpoint_every == 0 or step == config.steps):
                _save(r.mngr, step, r.state)
            bar.update(1)
    except KeyboardInterrupt:
        if r.mngr is not None and int(r.state["bad_step"]) < 0:
            _save(r.mngr, step, r.state)
            r.log.truncate(step)
        raise
    finally:
        bar.close()
    r.check_finite(last_logged)
    elapsed = time.perf_counter() - t0
    status = "completed" if end == config.steps else "stopped"
    summ = (
        r.summary(status, wall_time_s=elapsed, steps_per_second=(end - start) / max(elapsed, 1e-9))
        if status == "completed"
        else {"status": status, "step": end}
    )
    if r.mngr is not None:
        r.mngr.close()
    return TrainResult(model, r.state, r.records, summ)


def _progress(enabled: bool, total: int, initial: int):
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, initial=initial, desc="train", mininterval=1.0)
        except ImportError:  # pragma: no cover
            pass
    return _NoBar()


class _NoBar:
    def set_postfix(self, *a, **k):
        pass

    def update(self, n=1):
        pass

    def close(self):
        pass


# --------------------------------------------------------------------------- #
# A whole run from one config (the command's and sweeps' entry point).
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Dataset + MLP + training: everything a run needs, as one JSON-able config.

    ``model.in_dim``/``model.out_dim`` left ``None`` are filled from the data.
    ``dataset`` is one of :data:`isometry.data.DATASETS`; ``data_dir`` the
    local directory of file datasets; ``data_options`` keyword arguments of
    the loader (e.g. ``{"n_train": 2048}`` for the teacher-student task).
    """

    model: networks.MLPConfig
    train: TrainConfig = TrainConfig()
    dataset: str = "digits"
    data_dir: str | None = None
    data_options: tuple = ()

    def __post_init__(self):
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", networks.MLPConfig(**self.model))
        if isinstance(self.train, dict):
            object.__setattr__(self, "train", TrainConfig.from_dict(self.train))
        if isinstance(self.data_options, dict):
            object.__setattr__(self, "data_options", tuple(sorted(self.data_options.items())))
        else:
            object.__setattr__(self, "data_options", tuple(tuple(p) for p in self.data_options))
        validate.choice("dataset", self.dataset, _data.DATASETS)

    def to_dict(self) -> dict:
        return {
            "model": _config_dict(self.model),
            "train": self.train.to_dict(),
            "dataset": self.dataset,
            "data_dir": self.data_dir,
            "data_options": dict(self.data_options),
        }

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        d = _known_fields(cls, d, "RunConfig")
        if "model" not in d:
            raise ValueError("RunConfig: 'model' (the MLPConfig fields) is required")
        return cls(**d)

    def to_json(self, path: str | os.PathLike) -> Path:
        return atomic.write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> RunConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def load_data(self) -> _data.Dataset:
        return _data.load(
            self.dataset, root=self.data_dir, seed=self.train.seed, **dict(self.data_options)
        ).flatten()

    def build_model(self, ds: _data.Dataset) -> networks.MLP:
        m = self.model
        m = dataclasses.replace(
            m,
            in_dim=ds.in_dim if m.in_dim is None else m.in_dim,
            out_dim=ds.out_dim if m.out_dim is None else m.out_dim,
        )
        return networks.MLP(m, rngs=nnx.Rngs(self.train.seed))


def run(
    config: RunConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    progress: bool = False,
    stop_after: int | None = None,
) -> TrainResult:
    """Load the data, build the MLP (seeded by ``config.train.seed``) and :func:`train` it."""
    ds = config.load_data()
    model = config.build_model(ds)
    d = config.to_dict()
    extra = {"dataset": d["dataset"], "data_dir": d["data_dir"], "data_options": d["data_options"]}
    return train(
        model, ds, config.train, out_dir, progress=progress, extra_config=extra,
        stop_after=stop_after,
    )  # fmt: skip
