"""Cut points of any Flax NNX model: module paths, lookup, and a tapped forward pass.

The probe (:mod:`isometry.probe`) measures a researcher's own model, and the
theory engine (:mod:`isometry.theory`) predicts it, at *cut points*: module
paths such as ``"layers.3"`` or ``"stages.1.blocks.0"``. This module is what
both share:

* :func:`blocks` finds the default cut points (the children of an
  ``nnx.Sequential``, or the items of list attributes named ``blocks`` or
  ``layers``); :func:`resolve` checks a user's ``at=``.
* :func:`walk` and :func:`lookup` read module paths.
* :func:`tapped_call` runs the model on a copy whose cut blocks are replaced
  by taps that record each block's input and output (and add a probe
  ``deltas[i]`` to block ``i``'s output, so that a gradient with respect to
  it is the gradient at the cut).
* :func:`as_batch` and :func:`prepare` check an input batch against the model
  (shape, dtype, finite entries); :func:`prepare_stack` does it for the
  toolkit's scanned stacks, whose cut points are their layers.
* :func:`compiled` runs a measurement of the model as one compiled program.

The model is never modified: every pass runs on ``nnx.merge(..., copy=True)``.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from isometry import networks, validate

__all__ = [
    "ProbeError",
    "Record",
    "as_batch",
    "available",
    "blocks",
    "capture",
    "check_finite_input",
    "check_model",
    "compiled",
    "is_list",
    "is_stack",
    "lookup",
    "model_dtype",
    "prepare",
    "prepare_stack",
    "resolve",
    "scope_modules",
    "tapped_call",
    "walk",
]

Array = jax.Array
_LIST_NAMES = ("blocks", "layers")
_STACK_PREFIX = "layer"


class ProbeError(ValueError):
    """A model or input the probe cannot measure (the message says why and what to pass)."""


# --------------------------------------------------------------------------- #
# Cut points.
# --------------------------------------------------------------------------- #


def is_list(obj) -> bool:
    """Whether ``obj`` is a list of submodules (a list, tuple or ``nnx.List``)."""
    return isinstance(obj, (list, tuple, nnx.List))


def _attrs(obj) -> list:
    if is_list(obj):
        return [(str(i), v) for i, v in enumerate(obj)]
    if not isinstance(obj, nnx.Module):
        return []
    return [(k, v) for k, v in vars(obj).items() if not k.startswith("_")]


def walk(obj, prefix: str = ""):
    """``(path, module)`` of every nested module, depth first in definition order."""
    for name, value in _attrs(obj):
        path = f"{prefix}{name}"
        if isinstance(value, nnx.Module) and not is_list(value):
            yield path, value
        if isinstance(value, nnx.Module) or is_list(value):
            yield from walk(value, path + ".")


def _discover(obj, prefix: str) -> list[str]:
    if isinstance(obj, nnx.Sequential):
        return [f"{prefix}layers.{i}" for i in range(len(obj.layers))]
    found = []
    for name, value in _attrs(obj):
        if is_list(value) and name in _LIST_NAMES:
            found += [f"{prefix}{name}.{i}" for i in range(len(value))]
        elif is_list(value) or isinstance(value, nnx.Module):
            found += _discover(value, f"{prefix}{name}.")
    return found


def available(model) -> str:
    """The model's cut points, as one line for an error message."""
    paths = [p for p, _ in walk(model)]
    return ", ".join(paths) if paths else "(none: the model has no submodules)"


def blocks(model) -> list[str]:
    """The cut points of ``model`` in forward order (module paths joined by ``"."``).

    The direct children of an ``nnx.Sequential`` (``"layers.0"``, ...), else
    the items of every list / ``nnx.List`` attribute named ``blocks`` or
    ``layers``, found through nested modules and lists in definition order
    (``"stages.0.blocks.0"``, ``"stages.0.blocks.1"``, ``"stages.1.blocks.0"``).

    Raises:
        ProbeError: nothing found; the message lists the module paths to pass as ``at=``.
    """
    check_model(model)
    if is_stack(model):
        return [f"{_STACK_PREFIX}.{l}" for l in range(model.config.depth)]
    found = _discover(model, "")
    if not found:
        raise ProbeError(
            f"probe.blocks: cannot find the blocks of {type(model).__name__}: it is not an "
            "nnx.Sequential and has no list or nnx.List attribute named 'blocks' or 'layers'; "
            f"pass the cut points as at=[...], module paths among: {available(model)}"
        )
    return found


def is_stack(model) -> bool:
    """Whether ``model`` is one of the toolkit's scanned stacks (``networks.MLP``/``ConvNet``).

    Their layers live in stacked parameters, not in a list of modules, so the
    probe measures them through :func:`isometry.signal.measure` and
    :func:`isometry.jacobian.stack_jacobians`, with cut points ``"layer.0"`` ..
    ``"layer.{L-1}"`` (see :func:`signal`, :func:`jacobian_spectra`, :func:`theory`).
    """
    return isinstance(model, (networks.MLP, networks.ConvNet))


def check_model(model) -> None:
    """Raise a ``TypeError`` unless ``model`` is a ``flax.nnx.Module``."""
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}")


def _child(obj, part: str):
    if is_list(obj):
        if not part.isdigit() or int(part) >= len(obj):
            raise KeyError(part)
        return obj[int(part)]
    if part.startswith("_") or not isinstance(obj, nnx.Module) or not hasattr(obj, part):
        raise KeyError(part)
    return getattr(obj, part)


def lookup(model, path: str):
    """The submodule of ``model`` at the dotted ``path`` (``"blocks.3"``)."""
    obj = model
    for part in path.split("."):
        obj = _child(obj, part)
    return obj


def resolve(model, at) -> tuple[str, ...]:
    """The cut points ``at`` names (``None``: :func:`blocks`), checked against the model."""
    check_model(model)
    if at is None:
        return tuple(blocks(model))
    paths = (at,) if isinstance(at, str) else tuple(at)
    if not paths or not all(isinstance(p, str) for p in paths):
        raise ProbeError(f"at must be a non-empty list of module paths (strings), got {at!r}")
    if len(set(paths)) != len(paths):
        raise ProbeError(f"at names a path twice: {list(paths)}")
    if is_stack(model):
        layers = blocks(model)
        for p in paths:
            if p not in layers:
                raise ProbeError(
                    f"at: {p!r} is not a layer of the scanned {type(model).__name__}; "
                    f"available: {', '.join(layers)}"
                )
        return paths
    for p in paths:
        try:
            target = lookup(model, p)
        except (KeyError, IndexError):
            raise ProbeError(
                f"at: {p!r} is not a module path of {type(model).__name__}; "
                f"available: {available(model)}"
            ) from None
        if not callable(target):
            raise ProbeError(f"at: {p!r} is a {type(target).__name__}, not a callable block")
    return paths


# --------------------------------------------------------------------------- #
# The instrumented forward pass.
# --------------------------------------------------------------------------- #


class _Tap(nnx.Module):
    """Stands in for a block in the probe's copy of the model and reports to ``hook``."""

    def __init__(self, inner, hook):
        self.inner = inner
        self.hook = hook

    def __call__(self, x, *args, **kwargs):
        return self.hook(self.inner, x, args, kwargs)


@dataclasses.dataclass
class Record:
    inputs: list
    outputs: list
    extras: list
    branch: list


def _hook(rec: Record, i: int, path: str, deltas, want_branch: bool):
    def hook(inner, x, args, kwargs):
        if rec.outputs[i] is not None:
            raise ProbeError(f"block {path!r} is called more than once in the forward pass")
        y = inner(x, *args, **kwargs)
        if not isinstance(y, jax.Array) or not isinstance(x, jax.Array):
            raise ProbeError(f"block {path!r} must map an array to an array")
        if want_branch and callable(getattr(inner, "branch", None)):
            rec.branch[i] = jax.lax.stop_gradient(inner.branch(x, *args, **kwargs))
        if deltas is not None:
            y = y + deltas[i]
        rec.inputs[i], rec.extras[i], rec.outputs[i] = x, (args, kwargs), y
        return y

    return hook


def _install(m, path: str, tap) -> None:
    parent_path, _, key = path.rpartition(".")
    parent = lookup(m, parent_path) if parent_path else m
    if isinstance(parent, tuple):
        raise ProbeError(f"cannot cut at {path!r}: its parent is a tuple; use a list or nnx.List")
    if is_list(parent):
        parent[int(key)] = nnx.data(tap)
    else:
        setattr(parent, key, nnx.data(tap))


def tapped_call(graphdef, states, paths, x, deltas=None, want_branch=False, scopes=False):
    """``(y, record)``: the model's output on ``x`` and every block's input/output.

    ``scopes``: trace every submodule's call under ``jax.named_scope`` of its
    path, so that a jaxpr's equations name the module that made them.
    """
    m = nnx.merge(graphdef, *states, copy=True)
    if scopes:
        scope_modules(m)
    K = len(paths)
    rec = Record([None] * K, [None] * K, [None] * K, [None] * K)
    for i, path in enumerate(paths):
        _install(m, path, _Tap(lookup(m, path), _hook(rec, i, path, deltas, want_branch)))
    y = m(x)
    missing = [paths[i] for i in range(K) if rec.outputs[i] is None]
    if missing:
        raise ProbeError(f"the blocks {missing} are not called in the model's forward pass")
    return y, rec


def scope_modules(model) -> None:
    """Make every submodule of ``model`` (a copy: it is changed in place) call itself under
    ``jax.named_scope(path)``; a module reachable by two paths takes the first."""
    seen = set()
    for path, mod in list(walk(model)):
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        cls = type(mod)
        scoped = _SCOPED.get((cls, path))
        if scoped is None:
            scoped = type(cls.__name__, (cls,), {"__call__": _scoped_call(cls.__call__, path)})
            _SCOPED[(cls, path)] = scoped
        try:
            object.__setattr__(mod, "__class__", scoped)
        except TypeError:  # a class whose layout forbids it: traced without its scope
            continue


_SCOPED: dict = {}


def _scoped_call(call, path):
    def __call__(self, *args, **kwargs):
        with jax.named_scope(path):
            return call(self, *args, **kwargs)

    return __call__


def _expected_input(model) -> str:
    for path, mod in walk(model):
        n = getattr(mod, "in_features", None)
        if isinstance(n, int):
            return f"; its first layer {path!r} ({type(mod).__name__}) takes inputs (B, ..., {n})"
    return ""


def model_dtype(model):
    """The promoted floating dtype of the parameters of ``model`` (``None``: it has none)."""
    kinds = {
        jnp.dtype(v.dtype)
        for v in jax.tree.leaves(nnx.state(model, nnx.Param))
        if jnp.issubdtype(v.dtype, jnp.floating)
    }
    return jnp.result_type(*kinds) if kinds else None


def as_batch(model, x) -> Array:
    """``x`` as a floating batch ``(B, ...)`` in the model's parameter dtype, checked finite.

    An input of another floating dtype is cast to the parameters' dtype: the
    model computes in that precision anyway (a float64 input does not make a
    float32 model exact), and layers that write the input into their own
    buffers (batch norm) would otherwise mix the two. A NaN or inf entry is
    refused here, naming the first example that holds one, rather than blamed
    on the first block it passes through (checked when ``x`` is concrete).
    """
    x = jnp.asarray(x)
    if x.ndim < 2 or x.shape[0] < 1:
        raise ProbeError(f"x must be a batch (B, ...) with B >= 1, got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating-point array, got {x.dtype}")
    check_finite_input(x)
    dtype = model_dtype(model)
    return x if dtype is None or x.dtype == dtype else x.astype(dtype)


def check_finite_input(x: Array) -> None:
    """Raise :class:`ProbeError` naming the first entry of the batch ``x`` that is NaN or inf.

    Skipped while tracing (the values are not known then).
    """
    if not validate.is_concrete(x):
        return
    bad = ~np.isfinite(np.asarray(x))
    if not bad.any():
        return
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    n = int(bad.reshape(bad.shape[0], -1).any(axis=1).sum())
    raise ProbeError(
        f"x must be finite: x[{', '.join(map(str, first))}] is {float(np.asarray(x)[first])} "
        f"(example {first[0]} is the first of {n} of the {x.shape[0]} examples with a NaN or inf)"
    )


def _float_as(dtype, a):
    """``a`` in ``dtype`` if it is a floating array (the probe's copies of buffers such as
    ``nnx.BatchNorm``'s float32 running statistics, which a float64 model in training mode
    would otherwise update with float64 values; the copies are discarded)."""
    return a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a


def prepare(model, x, at):
    """Validated ``(paths, x, graphdef, params, rest, shapes)``; shapes of ``(y, outputs)``."""
    paths = resolve(model, at)
    x = as_batch(model, x)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rest = jax.tree.map(partial(_float_as, x.dtype), rest)
    try:
        shapes = jax.eval_shape(
            lambda p, r, x: _shapes(tapped_call(graphdef, (p, r), paths, x)), params, rest, x
        )
    except ProbeError:
        raise
    except (TypeError, ValueError) as err:
        raise ProbeError(
            f"x of shape {x.shape} does not fit {type(model).__name__}{_expected_input(model)} "
            f"({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from err
    for p, s in zip(paths, shapes[1], strict=True):
        if s.ndim < 1 or s.shape[0] != x.shape[0]:
            raise ProbeError(f"block {p!r} output {s.shape} has no batch axis of size {x.shape[0]}")
    return paths, x, graphdef, params, rest, shapes


def _shapes(out):
    y, rec = out
    return y, tuple(rec.outputs)


def capture(graphdef, states, paths, x):
    """Every block's ``(input, extra args)`` of one forward pass on ``x``."""
    _, rec = tapped_call(graphdef, states, paths, x)
    return rec.inputs, rec.extras


# --------------------------------------------------------------------------- #
# The toolkit's scanned stacks (networks.MLP, networks.ConvNet).
# --------------------------------------------------------------------------- #


def _stack_input(cfg) -> str:
    """The input shape a toolkit stack of config ``cfg`` takes, as text for messages."""
    if isinstance(cfg, networks.MLPConfig):
        return f"inputs (B, {cfg.in_dim or cfg.width})"
    spatial = ", ".join(["S"] * cfg.spatial_dims)
    return f"inputs (B, {spatial}, {cfg.in_channels or cfg.channels})"


def prepare_stack(model, x, at):
    """``(paths, layer indices, x, stack)`` of a toolkit stack, ``x`` checked against it.

    The cut points are layers ``"layer.l"``; ``stack`` is ``model.stack()``.
    """
    paths = resolve(model, at)
    x = as_batch(model, x)
    s = model.stack()
    try:
        jax.eval_shape(s, x)
    except (TypeError, ValueError) as err:
        raise ProbeError(
            f"x of shape {x.shape} does not fit {type(model).__name__}: it takes "
            f"{_stack_input(model.config)} ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from err
    return paths, tuple(int(p.rpartition(".")[2]) for p in paths), x, s


# --------------------------------------------------------------------------- #
# One compiled program.
# --------------------------------------------------------------------------- #


def compiled(impl, model, x, key, **options):
    """``impl(model, x, key, **options)`` compiled as one program (the model's state an argument).

    Run eagerly, every operation of the instrumented passes would compile on
    its own (tens of seconds for a small model); under an outer ``jit`` it is
    traced as it is. A concrete ``x`` is checked (:func:`as_batch`) before
    compiling, so a bad batch is named at the boundary.
    """
    check_model(model)
    if not (validate.is_concrete(x) and validate.is_concrete(key)):
        return impl(model, x, key, **options)
    x = as_batch(model, x)
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, x, key: impl(nnx.merge(graphdef, state), x, key, **options))
    return run(state, x, key)
