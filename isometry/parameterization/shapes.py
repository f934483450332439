"""Which dimensions of each parameter grow with width: :func:`infer` (muP's base shapes).

A model is built at two (or more) widths by ``factory(width, rngs)``; a
dimension of a parameter *grows* when its size differs between the widths
(microsoft/mup's ``make_base_shapes`` / ``InfShape``: a dimension is "infinite"
when the delta model changes it). Flax kernels are ``(..., in, out)`` (dense
``(in, out)``, the toolkit's stacks ``(L, in, out)``, convolutions
``(kh, kw, in, out)``), so the growing dimensions name the parameter's role::

    role      growing axes     examples                                mup's name
    "input"   out (last) only  input weights, embeddings, biases,     vector-like
                               norm gains and offsets, positions
    "hidden"  in and out       hidden weights (fan_in and fan_out)    matrix-like
    "output"  in only          readout weights                        (MuReadout)
    "fixed"   none             readout bias, scalars                  finite

Anything else (a growing axis that is neither of the last two, e.g. a
multi-head kernel ``(N, heads, d)``) is an error naming the parameter: write the
layer with ``(in, out)`` kernels, or reshape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from flax import nnx

from isometry import validate

__all__ = ["ROLES", "ParamShape", "Shapes", "infer", "param_paths", "path_name"]

ROLES = ("input", "hidden", "output", "fixed")


@dataclasses.dataclass(frozen=True)
class ParamShape:
    """One parameter's shape at the base width and what grows.

    Attributes:
        path: the parameter's path in ``nnx.state(model, nnx.Param)``, dotted
            (``"layers.0.kernel"``).
        shape: its shape at the base width (the first of ``widths``).
        grows: the growing axes, as non-negative indices.
        role: one of :data:`ROLES`.
    """

    path: str
    shape: tuple[int, ...]
    grows: tuple[int, ...]
    role: str

    def fans(self, shape: Sequence[int]) -> tuple[int, int]:
        """``(fan_in, fan_out)`` of a parameter of this role at ``shape``: the sizes of the
        growing in/out axes (1 for an axis that does not grow)."""
        n = len(shape)
        fan_in = shape[n - 2] if (n - 2) in self.grows else 1
        fan_out = shape[n - 1] if (n - 1) in self.grows else 1
        return int(fan_in), int(fan_out)

    def multipliers(self, shape: Sequence[int]) -> tuple[float, float]:
        """The width multipliers ``(m_in, m_out) = (fan_in / base fan_in, fan_out / base
        fan_out)`` of a parameter of this role at ``shape`` (mup's ``width_mult``)."""
        fi, fo = self.fans(shape)
        bi, bo = self.fans(self.shape)
        return fi / bi, fo / bo


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What :func:`infer` found: ``params`` maps each parameter's path to its
    :class:`ParamShape`; ``base_width`` is the width the multipliers are relative to."""

    params: dict
    base_width: int

    def roles(self) -> dict[str, str]:
        """``{path: role}``."""
        return {k: v.role for k, v in self.params.items()}


def path_name(path) -> str:
    """A flat-state path ``('layers', 0, 'kernel')`` as ``"layers.0.kernel"``."""
    return ".".join(str(p) for p in path)


def param_paths(model) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of every ``nnx.Param`` of ``model`` (or of an abstract model)."""
    state = nnx.state(model, nnx.Param)
    return {path_name(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(state)}


def _role(path: str, a: tuple, b: tuple) -> ParamShape:
    grows = tuple(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
    n = len(a)
    allowed = {(): "fixed", (n - 1,): "input", (n - 2,): "output", (n - 2, n - 1): "hidden"}
    if grows not in allowed:
        raise ValueError(
            f"parameter {path!r} of shape {a} grows along axes {grows} (shape {b} at the "
            "second width); allowed: none, the last axis (fan_out), the second-to-last "
            "(fan_in) or both, as in Flax kernels (..., in, out)"
        )
    return ParamShape(path, a, grows, allowed[grows])


def infer(factory: Callable, widths: Sequence[int]) -> Shapes:
    """The growing dimensions and role of every parameter of ``factory(width, rngs)``.

    Args:
        factory: ``factory(width, rngs) -> nnx.Module``; built abstractly
            (``nnx.eval_shape``), so no parameter is drawn.
        widths: two or more distinct positive widths; the first is the base width
            that width multipliers are relative to (mup's base model), the others
            check that the same dimensions grow (mup's delta model).

    Returns:
        :class:`Shapes`: per parameter path its :class:`ParamShape` (base shape,
        growing axes, role).

    Raises:
        ValueError: fewer than two widths, parameter trees that differ between
            widths (naming the paths), no dimension growing at all, or a
            parameter growing along axes a role does not allow.

    Example:
        >>> from flax import nnx
        >>> from isometry import networks, parameterization
        >>> def factory(width, rngs):
        ...     return networks.MLP(networks.MLPConfig(depth=2, width=width, in_dim=8,
        ...                                            out_dim=2), rngs=rngs)
        >>> parameterization.infer(factory, (64, 128)).roles()["readout"]
        'output'
    """
    if not callable(factory):
        raise TypeError(f"factory must be callable as factory(width, rngs), got {factory!r}")
    widths = validate.positive_ints("widths", widths)
    if len(widths) < 2 or len(set(widths)) != len(widths):
        raise ValueError(f"widths must be two or more distinct widths, got {widths}")
    trees = [_abstract(factory, w) for w in widths]
    base = trees[0]
    for w, tree in zip(widths[1:], trees[1:], strict=True):
        if set(tree) != set(base):
            diff = sorted(set(tree) ^ set(base))
            raise ValueError(
                f"factory builds different parameters at widths {widths[0]} and {w}: "
                f"{diff} (the parameter trees must match; only sizes may change)"
            )
        bad = [k for k in base if len(tree[k]) != len(base[k])]
        if bad:
            raise ValueError(f"parameters {bad} change rank between widths {widths[0]} and {w}")
    params = {k: _role(k, base[k], trees[1][k]) for k in base}
    for w, tree in zip(widths[2:], trees[2:], strict=True):
        for k, ps in params.items():
            if _role(k, base[k], tree[k]).grows != ps.grows:
                raise ValueError(
                    f"parameter {k!r} grows along different axes at width {w} than at "
                    f"{widths[1]}: {tree[k]} vs {trees[1][k]} (base {base[k]})"
                )
    if all(p.role == "fixed" for p in params.values()):
        raise ValueError(
            f"no parameter dimension grows between widths {widths}: factory(width, rngs) "
            "must build wider models for larger widths"
        )
    return Shapes(params, widths[0])


def _abstract(factory, width) -> dict:
    try:
        model = nnx.eval_shape(lambda: factory(width, nnx.Rngs(0)))
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"factory(width={width}, rngs) failed: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(model, nnx.Module):
        raise TypeError(f"factory must return an nnx.Module, got {type(model).__name__}")
    return param_paths(model)
