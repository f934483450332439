"""Running the engine on a model: trace it, interpret its jaxpr, read Grams off the outputs.

:func:`trace` turns ``model(x)`` into a jaxpr whose inputs are the model's
parameters (``nnx.Param`` leaves, with their paths), its other state, the
input batch and, optionally, one zero *probe* per cut point added to the
block's output (the engine's handle on gradients there); the model's
submodules are traced under ``jax.named_scope`` of their paths so that an
operation without a rule is reported with the module that used it.

:func:`run` evaluates it in the infinite-width limit inside one ``jax.jit``
program and hands the output values to a reader that computes what the caller
wants (kernels, per-cut-point summaries).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import sys
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from isometry import cuts, networks, validate
from isometry.theory import algebra as A
from isometry.theory import expectations as E
from isometry.theory import interpret as I
from isometry.theory import values as V

__all__ = [
    "Run", "Traced", "cut_shapes", "is_stack", "resolve_cuts", "run", "theory_dtype", "trace",
]  # fmt: skip

Array = jax.Array
FLUCTUATION_TOL = 0.05  # std of a dropped fluctuation (e.g. attention logits) worth a warning
OPTIMIZE_ENTRIES = 2**20  # Gram entries from which compiling with optimizations pays
RECURSION_LIMIT = 100_000  # the lazy Gram recursion follows the model's depth
GAIN_TOL = 1e-4  # relative variance of a gain over channels worth a warning


def theory_dtype():
    """float64 under ``jax_enable_x64``, else float32."""
    return jnp.result_type(float)


@dataclasses.dataclass(frozen=True)
class Traced:
    """A model's forward pass as a jaxpr over (parameters, other state, input, probes).

    Attributes:
        jaxpr, consts: the closed jaxpr's parts.
        param_paths: the path of each parameter leaf, in input order.
        n_rest: number of other state leaves.
        paths: the cut points (module paths), ``()`` when none are tapped.
        out_shapes: the shapes of the cut points' outputs.
        probes: whether probe inputs follow the input batch.
    """

    jaxpr: object
    consts: tuple
    param_paths: tuple[str, ...]
    n_rest: int
    paths: tuple[str, ...]
    out_shapes: tuple
    probes: bool


def _path(keypath) -> str:
    """``"blocks.0.mlp.kernel"`` of a parameter leaf's key path (the variable's own value
    attribute dropped)."""
    keys = list(keypath)
    while (
        keys
        and isinstance(keys[-1], jax.tree_util.GetAttrKey)
        and keys[-1].name
        in (
            "value",
            "raw_value",
        )
    ):
        keys.pop()
    parts = []
    for k in keys:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def trace(model, x, *, at=(), probes: bool = False):
    """``(Traced, params, rest, x)`` of ``model`` on the batch ``x`` (checked and cast)."""
    cuts.check_model(model)
    x = cuts.as_batch(model, x)
    paths = () if at == () else cuts.resolve(model, at)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    p_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    r_leaves = jax.tree.leaves(rest)
    out_shapes = ()
    if paths:
        _, _, _, _, _, (_, out_shapes) = cuts.prepare(model, x, paths)
    deltas = [jnp.zeros(s.shape, s.dtype) for s in out_shapes] if probes else None

    def fn(params, rest, x, deltas):
        y, rec = cuts.tapped_call(graphdef, (params, rest), paths, x, deltas, scopes=True)
        return y, tuple(rec.outputs)

    try:
        closed = jax.make_jaxpr(fn)(params, rest, x, deltas)
    except cuts.ProbeError:
        raise
    except (TypeError, ValueError) as err:
        raise V.TheoryError(
            f"x of shape {x.shape} does not fit {type(model).__name__} "
            f"({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from err
    traced = Traced(
        closed.jaxpr,
        tuple(closed.consts),
        tuple(_path(kp) for kp, _ in p_leaves),
        len(r_leaves),
        tuple(paths),
        tuple(tuple(s.shape) for s in out_shapes),
        probes,
    )
    return traced, [v for _, v in p_leaves], r_leaves, x


@dataclasses.dataclass
class Run:
    """What a reader sees: the algebra, the output value, the cut points' values, the
    parameters, and the tangent sources."""

    alg: A.Algebra
    output: object
    cuts: list
    params: list
    x: Array
    index: int | None


def _override_fn(variances):
    if variances is None:
        return lambda p: None
    if not isinstance(variances, dict):
        raise TypeError(f"variances must be a dict of path pattern -> variance, got {variances!r}")
    for k, v in variances.items():
        if not isinstance(k, str):
            raise TypeError(f"variances: keys are parameter path patterns, got {k!r}")
        validate.real_array(f"variances[{k!r}]", v, minimum=0.0)

    def override(p: V.Param):
        base = p.path.split("[", 1)[0]
        for pat, v in variances.items():
            if fnmatch.fnmatchcase(base, pat):
                return jnp.asarray(v, theory_dtype())
        return None

    return override


def _input_jacobian(x, index):
    n = math.prod(x.shape[1:])
    eye = jnp.eye(n, dtype=x.dtype).reshape(*x.shape[1:], n)
    return jnp.zeros((*x.shape, n), x.dtype).at[index].set(eye)


def run(
    model, x, read: Callable, *, at=(), variances=None, probes=False, index=None, optimize=None
):
    """Evaluate ``model`` on ``x`` in the limit and return ``read(Run)`` (arrays).

    Args:
        model: any ``flax.nnx.Module``, left unmodified.
        x: the input batch ``(B, ...)``.
        read: ``read(Run) -> pytree of arrays``, called inside the compiled program.
        at: cut points to tap (module paths), ``()`` for none, ``None`` for the default.
        variances: ``{path pattern: sigma^2}`` overriding variances read from parameters.
        probes: add a zero probe at each cut point (gradients there).
        index: follow the input Jacobian of example ``index`` (``None``: not at all).
        optimize: compile with XLA's default optimizations (``True``: faster runs on
            large Grams) or at backend level 0 (``False``: a fraction of the compile
            time, for the small programs of typical use); ``None``: optimize when the
            Gram of the input's positions has at least ``OPTIMIZE_ENTRIES`` entries.
    """
    override = _override_fn(variances)
    _check_finite_inputs(model, x)
    stack = is_stack(model) and at != ()
    traced, params, rest, x = trace(model, x, at=() if stack else at, probes=probes and not stack)
    dtype = theory_dtype()
    if index is not None:
        index = validate.positive_int("index", index, minimum=0)
        if index >= x.shape[0]:
            raise ValueError(f"index must be < the batch size {x.shape[0]}, got {index}")

    def program(params, x):
        alg = A.Algebra(dtype, override, E.Expectations(dtype))
        ctx = I.Context(alg, dtype, stack=(model.config.depth, probes) if stack else None)
        p_vals = [
            V.Param((path,), path, v) for path, v in zip(traced.param_paths, params, strict=True)
        ]
        jac = None if index is None else _input_jacobian(x, index)
        args = [*p_vals, *(V.Det(_constant(r)) for r in rest), V.Det(x, jac=jac, source="x")]
        if traced.probes:
            args += [
                V.Det(jnp.zeros(s, x.dtype), zero=True, source=("probe", i))
                for i, s in enumerate(traced.out_shapes)
            ]
        consts = [V.Det(jnp.asarray(c)) for c in traced.consts]
        outs = [I.used(o) for o in I.evaluate(traced.jaxpr, consts, args, ctx)]
        cut_values = _stack_cuts(ctx, at) if stack else outs[1:]
        result = read(Run(alg, outs[0], cut_values, p_vals, x, index))
        checks = [(label, where, value) for label, where, value in ctx.checks]
        checks += _gain_checks(alg)
        return result, [c[2] for c in checks], [(c[0], c[1]) for c in checks]

    labels = []

    def compiled(params, x):  # buffers (batch statistics, ...) are constants, folded
        result, values, meta = program(params, x)
        labels[:] = meta
        return result, values

    if optimize is None:
        positions = x.shape[0] * math.prod(x.shape[1:-1])
        optimize = positions**2 >= OPTIMIZE_ENTRIES
    options = None if optimize else {"xla_backend_optimization_level": 0}
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, RECURSION_LIMIT))  # Grams unfold through deep models
    try:
        result, values = jax.jit(compiled, compiler_options=options)(params, x)
    finally:
        sys.setrecursionlimit(limit)
    _report(labels, values)
    return result


def _check_finite_inputs(model, x) -> None:
    """A non-finite input or parameter is named at the boundary (not a NaN kernel later)."""
    cuts.check_model(model)
    x = cuts.as_batch(model, x)  # the batch's shape and finiteness (ProbeError naming x)
    for path, v in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]:
        if validate.is_concrete(v) and not np.all(np.isfinite(np.asarray(v))):
            raise V.TheoryError(f"the parameter {_path(path)} has non-finite entries")


def _constant(a):
    """A buffer as a concrete numpy constant where it is a numeric array (folded at trace
    time), else as it is (random keys)."""
    try:
        return np.asarray(a)
    except TypeError:
        return a


def _stack_cuts(ctx, at) -> list:
    """The values at a stack's cut points ``"layer.l"`` (its carries)."""
    if len(ctx.stack_outputs) != ctx.stack[0]:
        raise V.TheoryError("the toolkit stack's scan over its layers was not found")
    return [ctx.stack_outputs[int(p.rpartition(".")[2])] for p in at]


def _gain_checks(alg) -> list:
    return list(alg.kernels.checks)


def _report(labels, values) -> None:
    seen = set()
    for (label, where), v in zip(labels, values, strict=True):
        v = float(np.asarray(v))
        if label == "fluctuation" and v > FLUCTUATION_TOL and where not in seen:
            seen.add(where)
            warnings.warn(
                f"theory: at {where} the infinite-width limit drops a fluctuation of standard "
                f"deviation {v:.3g} (e.g. attention logits q.k/sqrt(d) with independent "
                "query and key weights, whose limit is uniform attention): the prediction is "
                "the limit where that fluctuation vanishes (small query/key variance, or "
                "1/d scaling; Hron et al. 2020)",
                stacklevel=3,
            )
        if label == "gain" and v > GAIN_TOL and where not in seen:
            seen.add(where)
            warnings.warn(
                f"theory: the gain at {where} varies over the channels (relative variance "
                f"{v:.3g}); the field it scales is then not Gaussian and the elementwise "
                "function after it is computed as if it were (exact for a constant gain, "
                "as at initialization)",
                stacklevel=3,
            )


def is_stack(model) -> bool:
    """A toolkit scanned stack (``networks.MLP``, ``ConvNet``, ``Transformer``): its cut
    points are its layers ``"layer.0"`` .. ``"layer.{L-1}"``, the carries of its scan."""
    return cuts.is_stack(model) or isinstance(model, networks.Transformer)


def resolve_cuts(model, at) -> tuple[str, ...]:
    """The cut points ``at`` of ``model`` (default :func:`isometry.cuts.blocks`), checked."""
    cuts.check_model(model)
    if not is_stack(model) or cuts.is_stack(model):
        return tuple(cuts.resolve(model, at))
    layers = [f"layer.{l}" for l in range(model.config.depth)]
    paths = tuple(layers) if at is None else ((at,) if isinstance(at, str) else tuple(at))
    bad = [p for p in paths if p not in layers]
    if bad or not paths:
        raise cuts.ProbeError(f"at: {bad or paths} are not layers of the Transformer; "
                              f"available: {', '.join(layers)}")  # fmt: skip
    return paths


def cut_shapes(model, x, paths) -> tuple:
    """The output shapes ``(B, ...)`` of the cut points."""
    if is_stack(model):
        s = jax.eval_shape(model.stack().input_map, cuts.as_batch(model, x))
        return (tuple(s.shape),) * len(paths)
    _, _, _, _, _, (_, shapes) = cuts.prepare(model, x, paths)
    return tuple(tuple(s.shape) for s in shapes)
