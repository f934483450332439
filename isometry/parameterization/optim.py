"""Per-parameter learning-rate scales as optax transformations: :func:`scale_by_path` and
:func:`optimizer` (SGD, Adam, AdamW).

The update of parameter ``p`` is ``-eta * s_p * u_p``, with ``u_p`` the base
optimizer's direction (the gradient for SGD, ``m_hat / (sqrt(v_hat) + eps)`` for
Adam; Kingma & Ba 2015) and ``s_p`` the scale of
:func:`isometry.parameterization.apply` (microsoft/mup's ``MuSGD``/``MuAdam``
parameter groups, as one transformation). AdamW's decoupled decay
(Loshchilov & Hutter 2019) is added after the scaling, ``-eta (s_p u_p + wd p)``,
so ``eta * wd`` is the same for every parameter (mup's default,
``decoupled_wd=False``).

The learning rate may be a number, an optax schedule, or a traced array: build
the transformation inside the function that is ``vmap``-ped over learning
rates and use ``tx.init`` / ``tx.update`` on the parameters (``nnx.split``).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from isometry import validate

__all__ = ["OPTIMIZERS", "RULE", "optimizer", "scale_by_path"]

OPTIMIZERS = ("sgd", "adam", "adamw")
RULE = {"sgd": "sgd", "adam": "adam", "adamw": "adam"}


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _lookup(scales: Mapping[str, float], path) -> float:
    parts = [_key_name(k) for k in path]
    for n in range(len(parts), 0, -1):  # a Variable's leaf adds a trailing "value"
        name = ".".join(parts[:n])
        if name in scales:
            return scales[name]
    raise ValueError(
        f"parameter {'.'.join(parts)!r} has no learning-rate scale; the scales were made "
        f"for the parameters {sorted(scales)} (apply the parameterization to this model)"
    )


def scale_by_path(scales: Mapping[str, float]) -> optax.GradientTransformation:
    """Multiply the update of each parameter by ``scales[path]`` (paths dotted as in
    ``nnx.state(model, nnx.Param)``: ``"layers.0.kernel"``).

    ``u_p -> s_p u_p``; stateless. A parameter without a scale is an error naming it.
    """
    scales = {str(k): float(v) for k, v in scales.items()}

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        out = jax.tree_util.tree_map_with_path(
            lambda path, u: u * jnp.asarray(_lookup(scales, path), jnp.result_type(u)), updates
        )
        return out, state

    return optax.GradientTransformation(init_fn, update_fn)


def optimizer(
    name: str,
    learning_rate,
    scales: Mapping[str, float],
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    momentum: float | None = None,
) -> optax.GradientTransformation:
    """SGD, Adam or AdamW whose update of each parameter is scaled by ``scales[path]``.

    ``sgd``:   ``Delta p = -eta s_p g_p`` (with ``momentum``: ``g_p`` its trace);
    ``adam``:  ``Delta p = -eta s_p m_hat_p / (sqrt(v_hat_p) + eps)``;
    ``adamw``: ``Delta p = -eta (s_p m_hat_p / (sqrt(v_hat_p) + eps) + wd p)``.

    Args:
        name: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        learning_rate: ``eta``: a number > 0, a (possibly traced) array, or an
            optax schedule ``step -> eta``.
        scales: ``{path: s_p}`` for every parameter
            (:attr:`Parameterization.lr_scale`).
        b1, b2, eps: Adam's moments and epsilon; weight_decay: AdamW's ``wd``;
        momentum: SGD's heavy-ball momentum (``None``: plain SGD).

    Raises:
        ValueError: an optimizer not in :data:`OPTIMIZERS`, a learning rate <= 0.
    """
    validate.choice("optimizer", name, OPTIMIZERS)
    if not callable(learning_rate):
        validate.real_array("learning_rate", learning_rate, minimum=0.0, strict=True)
    if name == "sgd":
        base = optax.identity() if momentum is None else optax.trace(decay=momentum)
        parts = [base, scale_by_path(scales)]
    else:
        parts = [optax.scale_by_adam(b1=b1, b2=b2, eps=eps), scale_by_path(scales)]
        if name == "adamw":
            parts.append(optax.add_decayed_weights(weight_decay))
    return optax.chain(*parts, optax.scale_by_learning_rate(learning_rate))
