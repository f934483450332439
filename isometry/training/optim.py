"""Learning-rate schedule, gradient clipping (incl. adaptive, per layer) and the optimizer.

    updates = opt( clip( grad L(theta) ) )       (optax.chain(clip, [decay], opt))

Clipping (:func:`clipping`): ``none``; ``global_norm:c`` (``g <- g * min(1,
c / ||g||)``, Pascanu, Mikolov & Bengio 2013); ``value:c`` (``g_i <-
clamp(g_i, -c, c)``); ``agc:c`` (adaptive, unit-wise, ``G_i <- G_i * min(1,
c max(||W_i||, eps) / ||G_i||)``, Brock, De, Smith & Simonyan 2021;
:func:`adaptive_grad_clip`, computed per layer of the scanned stack).

The parameters of the scanned stack are those of type
:class:`isometry.networks.StackedParam` (:func:`stacked_mask`); their norms
are taken per layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from isometry import networks, validate
from isometry.training.config import TrainConfig, is_transformation, parse_clip

__all__ = ["adaptive_grad_clip", "clipping", "optimizer", "schedule", "stacked_mask"]


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


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def stacked_mask(params):
    """``True`` for each variable of ``params`` that is a :class:`~isometry.networks.StackedParam`.

    ``params``: an ``nnx.State`` (or any pytree; plain arrays count as not
    stacked). Returns a pytree of bools that is a prefix of ``params`` (one
    bool per variable), for ``jax.tree.map(f, mask, params, ...)``.
    """
    return jax.tree.map(
        lambda v: isinstance(v, networks.StackedParam), params, is_leaf=_is_variable
    )


def _unitwise_norm(x: jax.Array) -> jax.Array:
    """Norm per output unit (Brock et al. 2021): ``|x|`` for vectors, over fan-in otherwise."""
    if x.ndim <= 1:
        return jnp.abs(x)
    axes = (0,) if x.ndim == 2 else tuple(range(x.ndim - 1))
    return jnp.sqrt(jnp.sum(x * x, axis=axes, keepdims=True))


def adaptive_grad_clip(clipping: float, eps: float = 1e-3) -> optax.GradientTransformation:
    """Adaptive gradient clipping (AGC), unit-wise, per layer of a scanned stack.

    ``G_i <- G_i * min(1, clipping * max(||W_i||, eps) / ||G_i||)`` for every
    output unit ``i`` of every layer (Brock, De, Smith & Simonyan 2021).
    Parameters of type :class:`~isometry.networks.StackedParam` carry a
    leading depth axis; their norms are taken per layer (``vmap`` over the
    axis), not across layers as a plain ``optax.adaptive_grad_clip`` would.
    """
    validate.real_array("clipping", clipping, minimum=0.0, strict=True)
    validate.real_array("eps", eps, minimum=0.0, strict=True)

    def clip_leaf(norm, g, p):
        g_norm, p_norm = norm(g), norm(p)
        max_norm = clipping * jnp.maximum(p_norm, eps)
        scale = jnp.where(g_norm > max_norm, max_norm / jnp.maximum(g_norm, 1e-30), 1.0)
        return g * scale.astype(g.dtype)

    def clip_variable(stacked, g, p):
        norm = jax.vmap(_unitwise_norm) if stacked else _unitwise_norm
        return jax.tree.map(lambda gl, pl: clip_leaf(norm, gl, pl), g, p)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("adaptive_grad_clip needs params (tx.update(grads, state, params))")
        return jax.tree.map(clip_variable, stacked_mask(params), updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def clipping(spec, *, agc_eps: float = 1e-3) -> optax.GradientTransformation:
    """The stateless clipping transformation named by ``spec`` (see :func:`parse_clip`).

    ``spec`` may also be an optax ``GradientTransformation``, returned as is.
    """
    if is_transformation(spec):
        return spec
    kind, c = parse_clip(spec)
    if kind == "none":
        return optax.identity()
    if kind == "global_norm":
        return optax.clip_by_global_norm(c)
    if kind == "value":
        return optax.clip(c)
    return adaptive_grad_clip(c, agc_eps)


def optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """``optax.chain(clip, [weight decay], optimizer(schedule))``.

    ``config.optimizer`` (and ``config.clip``) may be optax transformations: a
    user's optimizer is used as given (its own learning rate), after the
    clipping and weight decay.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    parts = [clipping(config.clip, agc_eps=config.agc_eps)]
    if config.weight_decay > 0:
        parts.append(optax.add_decayed_weights(config.weight_decay))
    if is_transformation(config.optimizer):
        return optax.chain(*parts, config.optimizer)
    lr = schedule(config)
    opt = {
        "sgd": lambda: optax.sgd(lr),
        "momentum": lambda: optax.sgd(lr, momentum=config.momentum),
        "rmsprop": lambda: optax.rmsprop(lr, decay=config.decay, eps=config.eps),
        "adam": lambda: optax.adam(lr, b1=config.b1, b2=config.b2, eps=config.eps),
    }[config.optimizer]()
    return optax.chain(*parts, opt)
