"""Apply a parameterization to any NNX model: :func:`apply` and :class:`Parameterization`.

:func:`apply` rescales the model's parameters to the initialization variance of
the kind (the standard form of :mod:`isometry.parameterization.table`) and
returns the per-parameter learning-rate scales, the branch multiplier and the
attention scaling; :meth:`Parameterization.tx` builds the optax optimizer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import optax
from flax import nnx

from isometry import networks, validate
from isometry.parameterization import optim, table
from isometry.parameterization.shapes import Shapes, path_name

__all__ = ["Parameterization", "apply", "block_params"]


@dataclasses.dataclass(frozen=True, eq=False)
class Parameterization:
    """A parameterization applied to a model.

    Attributes:
        kind: ``"standard"``, ``"ntk"``, ``"mup"`` or ``"depth_mup"``.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"`` (the scales depend on it).
        roles: ``{path: role}`` (``"base"`` for every parameter when no shapes were
            given: the model is at its base width).
        variance_scale: ``{path: factor}`` applied to each parameter's
            initialization variance (its entries were multiplied by ``sqrt(factor)``).
        lr_scale: ``{path: s_p}``, the learning-rate factor of each parameter.
        in_block: ``{path: bool}``, whether the parameter is in a residual block.
        branch_scale: the residual branch multiplier (``1/sqrt(L)`` under
            depth-muP, else 1): a forward change the model must make itself (the
            toolkit's configs make it under ``parameterization=``).
        attention: the attention logits' scaling, ``"1/sqrt(d)"`` or ``"1/d"``
            (muP), likewise a forward change.
        depth: ``L`` for depth-muP, else ``None``.
    """

    kind: str
    optimizer: str
    roles: dict
    variance_scale: dict
    lr_scale: dict
    in_block: dict
    branch_scale: float
    attention: str
    depth: int | None

    def tx(self, learning_rate, **options) -> optax.GradientTransformation:
        """The optax optimizer ``Delta p = -eta s_p u_p`` of :func:`optim.optimizer`;
        ``learning_rate`` may be traced (build it inside the ``vmap``-ped function)."""
        return optim.optimizer(self.optimizer, learning_rate, self.lr_scale, **options)


def block_params(model) -> Callable[[str, nnx.Variable], bool]:
    """The default test of "in a residual block": the toolkit's stacked parameters
    (:class:`isometry.networks.StackedParam`, leading depth axis) for its own models;
    for a plain model, a parameter whose path has an integer part (an item of a
    list of blocks, ``"blocks.3.mlp.kernel"``)."""
    if isinstance(getattr(model, "config", None), networks.MLPConfig | networks.TransformerConfig):
        return lambda path, var: isinstance(var, networks.StackedParam)
    return lambda path, var: any(part.isdigit() for part in path.split("."))


def _forward_kind(cfg, kind: str) -> bool:
    """Whether ``kind`` changes the forward pass of a toolkit model of config ``cfg``."""
    transformer = isinstance(cfg, networks.TransformerConfig)
    return kind == "depth_mup" or (transformer and kind == "mup")


def _check_config(model, kind: str) -> None:
    cfg = getattr(model, "config", None)
    built = getattr(cfg, "parameterization", None)
    if built is None or built == kind:
        return
    if _forward_kind(cfg, kind) or _forward_kind(cfg, built):
        raise ValueError(
            f"kind {kind!r} needs the model's forward pass built for it, but its config has "
            f"parameterization={built!r}: build it with {type(cfg).__name__}(..., "
            f"parameterization={kind!r})"
        )


def _depth(model, kind, depth):
    if kind != "depth_mup":
        return None
    if depth is None:
        depth = getattr(getattr(model, "config", None), "depth", None)
    if depth is None:
        raise ValueError("kind 'depth_mup' needs depth= (the number of residual blocks L)")
    return validate.positive_int("depth", depth)


def _multipliers(shapes: Shapes | None, path: str, shape) -> tuple[str, float, float]:
    if shapes is None:
        return "base", 1.0, 1.0
    ps = shapes.params.get(path)
    if ps is None:
        raise ValueError(
            f"parameter {path!r} is not in shapes (inferred for the parameters "
            f"{sorted(shapes.params)}); infer the shapes from this model's factory"
        )
    fixed = [i for i in range(len(shape)) if i not in ps.grows]
    if len(shape) != len(ps.shape) or any(shape[i] != ps.shape[i] for i in fixed):
        raise ValueError(
            f"parameter {path!r} has shape {tuple(shape)}, but shapes say {ps.shape} with "
            f"axes {ps.grows} growing: only those axes may differ from the base width"
        )
    m_in, m_out = ps.multipliers(shape)
    return ps.role, m_in, m_out


def apply(
    model: nnx.Module,
    kind: str,
    shapes: Shapes | None = None,
    *,
    optimizer: str = "adam",
    depth: int | None = None,
    blocks: Callable[[str, nnx.Variable], bool] | None = None,
    zero_readout: bool = False,
) -> Parameterization:
    """Put ``model`` in parameterization ``kind`` (in place) and return its learning-rate
    scales (the table of :mod:`isometry.parameterization.table`).

    Each parameter ``p`` of role ``r`` with width multipliers ``(m_in, m_out)``
    relative to the base width of ``shapes`` is rescaled
    ``p <- sqrt(v_kind(r, m_in, m_out)) p`` (so ``Var p = v * Var_standard``; the
    model's own initialization is taken as standard, ``Var ~ 1/fan_in``; call
    this once, on a freshly built model, as mup's ``set_base_shapes``) and gets
    the learning-rate factor ``s_p = lr_kind(r, rule, m_in, m_out)`` times, for
    depth-muP with Adam and ``p`` in a residual block, ``1/sqrt(L)``.

    Args:
        model: any ``nnx.Module``; its ``nnx.Param`` leaves are parameterized.
        kind: ``"standard"``, ``"ntk"``, ``"mup"`` or ``"depth_mup"``.
        shapes: :func:`isometry.parameterization.infer` of the model's factory;
            ``None``: the model is at its base width (every width multiplier 1,
            e.g. a check over depth at one width).
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        depth: ``L`` for depth-muP (default: ``model.config.depth`` of a toolkit model).
        blocks: ``blocks(path, variable) -> bool``, the parameters of the residual
            blocks (default :func:`block_params`).
        zero_readout: initialize the output weights (role ``"output"``) at 0
            (mup's ``readout_zero_init``; TP5: under muP the output at
            initialization is ``O(1/sqrt(m_in))``, a transient that biases the
            coordinate check of the output at small widths; at 0 it is gone).

    Returns:
        :class:`Parameterization`; ``.tx(learning_rate)`` is the optax optimizer
        (use with ``nnx.Optimizer(model, p.tx(lr), wrt=nnx.Param)``).

    Raises:
        ValueError: an unknown kind or optimizer, a parameter missing from
            ``shapes`` or of a shape it does not allow, depth-muP without a depth
            or without block parameters, a toolkit model built for another kind.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
    validate.choice("kind", kind, table.KINDS)
    validate.choice("optimizer", optimizer, optim.OPTIMIZERS)
    if shapes is not None and not isinstance(shapes, Shapes):
        raise TypeError(f"shapes must come from parameterization.infer, got {shapes!r}")
    _check_config(model, kind)
    L = _depth(model, kind, depth)
    in_block_fn = block_params(model) if blocks is None else blocks
    flat = [(path_name(p), v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    if shapes is not None:
        missing = sorted(set(shapes.params) - {k for k, _ in flat})
        if missing:
            raise ValueError(f"shapes has parameters {missing} that the model does not have")
    roles, var, lr, inb = _scales(flat, kind, shapes, optim.RULE[optimizer], in_block_fn, L)
    if zero_readout:
        if shapes is None:
            raise ValueError("zero_readout needs shapes (the roles say which weights are outputs)")
        var.update({k: 0.0 for k, r in roles.items() if r == "output"})
    _rescale(model, var)
    return Parameterization(
        kind, optimizer, roles, var, lr, inb, table.branch_multiplier(kind, L),
        table.ATTENTION[kind], L,
    )  # fmt: skip


def _scales(flat, kind, shapes, rule, in_block_fn, L):
    """``(roles, variance factors, learning-rate factors, in_block)`` per parameter path."""
    roles, var, lr, inb = {}, {}, {}, {}
    for path, v in flat:
        roles[path], m_in, m_out = _multipliers(shapes, path, v[...].shape)
        base = roles[path] == "base"  # every width factor is 1 at the base width
        var[path] = 1.0 if base else table.variance_scale(kind, roles[path], m_in, m_out)
        inb[path] = bool(in_block_fn(path, v))
        lr[path] = 1.0 if base else table.lr_scale(kind, roles[path], rule, m_in, m_out)
        if inb[path]:
            lr[path] *= table.depth_lr_scale(kind, rule, L)
    if kind == "depth_mup" and not any(inb.values()):
        raise ValueError(
            "kind 'depth_mup' found no parameter in a residual block; pass blocks=(path, "
            "variable) -> bool (default: paths with an integer part, e.g. 'blocks.3.kernel')"
        )
    return roles, var, lr, inb


def _rescale(model, var) -> None:
    """``p <- sqrt(var[path]) p`` for every ``nnx.Param`` of ``model`` (in place)."""
    state = nnx.state(model, nnx.Param)
    for p, v in nnx.to_flat_state(state):
        factor = var[path_name(p)]
        if factor != 1.0:
            v[...] = v[...] * math.sqrt(factor)
    nnx.update(model, state)
