"""The probe's monitor: per-block summaries of any NNX model, cheap enough for a training loop.

:func:`monitor` measures at every cut point ``l`` (:func:`isometry.cuts.blocks`)
of the model, block output ``y^l``, model input ``x``, in one compiled program:

    mean_sq^l       = mean (y^l)^2                         (the batch, :func:`probe.signal`)
    grad_out_sq^l   = ||dLoss/dy^l||_F^2                   (the batch, :func:`probe.signal`)
    grad_param_sq^l = ||dLoss/dtheta^l||_F^2               (the batch, :func:`probe.signal`)
    jac_sv2_mean^l  = tr(J_l^T J_l) / r_l                  (Hutchinson; exact for P >= n)
    jac_sv2_var^l   = max(tr((J_l^T J_l)^2) / r_l - (jac_sv2_mean^l)^2, 0)
    jac_sv2_max^l   = lambda_max(J_l^T J_l)                (Lanczos' top Ritz value)

for the cumulative Jacobian ``J_l = d y^l_i / d x_i`` (``m_l x n``) of example
``i`` of the batch (the others held fixed), ``r_l = min(m_l, n)`` its number of
singular values: the mean, variance and largest of the squared singular values
``s^2`` (Pennington, Schoenholz & Ganguli 2017, "Resurrecting the sigmoid in deep
learning through dynamical isometry": isometry is mean near 1, small variance
and maximum). The first ``examples`` examples are measured; the mean and the
variance are averaged over them and the maximum is their largest.

Estimators (matrix-free: ``A v = J^T J v`` by one ``jvp`` and one ``vjp``, ``A = J_l^T
J_l``): the traces by Hutchinson's estimator over ``P = n_probes`` Rademacher probes
``z_p`` (entries ``+-1``), ``tr A^k ~ mean_p z_p^T A^k z_p`` for ``k = 1, 2`` (one
``A z_p`` each: ``z^T A z`` and ``||A z||^2``), unbiased with variance
``2 (||A^k||_F^2 - sum_i (A^k)_ii^2) / P`` (Hutchinson 1990; Avron & Toledo 2011),
and exact when ``P >= n``: the probes are then the ``n`` unit vectors. The largest
eigenvalue by ``S = min(lanczos_steps, n)`` Lanczos steps from one Rademacher start
(:func:`isometry.spectra.max_eigenvalue`): its top Ritz value is a lower bound that
converges geometrically in ``S`` (Kaniel-Paige-Saad), exact once ``S >= n``. The
variance, a difference of two estimates, is biased by ``Var(tr A estimate) / r^2`` when
``P < n``. Cost:
``examples * K * (P + S)`` products ``A v``, each running the model on the
``jacobian_batch`` examples.

For the toolkit's scanned stacks (``networks.MLP``/``ConvNet``, cut points
``"layer.l"``) the signal fields are :func:`probe.signal`'s (those of the
pre-activation ``h^l``) and the Jacobian is that of the stack,
``J_l = d x^l / d x^0`` at ``x^0 = input_map(x)``, the Jacobian of mean-field
theory and free probability (``r_l = n`` the width).

Compiled once per model structure (``nnx.graphdef``), cut points and options:
:func:`monitor_fn` returns ``fn(model, x, key)`` to call every ``k`` steps of
a training loop; :func:`monitor` is the same function called once. Before the
compiled program runs, the model's state and the input batch are checked
finite (a :class:`isometry.cuts.ProbeError`, a ``ValueError``, naming the first
non-finite variable or example). Under the user's own ``nnx.jit`` the monitor
is traced as it is (no checks: the values are not known). The model is never
modified (every pass runs on a copy); the monitor's randomness is its ``key``
alone.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from isometry import cuts, spectra, validate
from isometry.cuts import ProbeError, is_stack
from isometry.probe.signal import signal
from isometry.probe.spectra import cumulative_fn

__all__ = ["FIELDS", "MonitorSummary", "check_finite_state", "monitor", "monitor_fn"]

Array = jax.Array

FIELDS = ("mean_sq", "grad_out_sq", "grad_param_sq", "jac_sv2_mean", "jac_sv2_var", "jac_sv2_max")
"""The per-block fields of :class:`MonitorSummary`, in order."""


@partial(
    jax.tree_util.register_dataclass,
    data_fields=[*FIELDS, "loss"],
    meta_fields=["paths"],
)
@dataclasses.dataclass(frozen=True)
class MonitorSummary:
    """Per-block summaries ``(K,)`` at the ``K`` cut points ``paths`` (module docstring).

    The Jacobian fields are NaN at the cut points outside ``jacobian_at``.
    ``loss``: the scalar loss of the gradient fields. A pytree of arrays
    (``paths`` is static), so it can be returned from ``jax.jit``.
    """

    mean_sq: Array
    grad_out_sq: Array
    grad_param_sq: Array
    jac_sv2_mean: Array
    jac_sv2_var: Array
    jac_sv2_max: Array
    loss: Array
    paths: tuple[str, ...]

    def record(self, step: int) -> dict:
        """One JSON-ready record: ``step``, ``blocks`` (the paths), ``loss`` and each
        field as a list of ``K`` Python floats (NaN kept; the log writes it as null)."""
        step = validate.positive_int("step", step, minimum=0)
        rec = {"step": step, "blocks": list(self.paths), "loss": float(self.loss)}
        rec.update({f: np.asarray(getattr(self, f), np.float64).tolist() for f in FIELDS})
        return rec


def monitor(
    model,
    x,
    *,
    key,
    at=None,
    loss=None,
    jacobian_at=None,
    examples: int = 1,
    jacobian_batch: int | None = None,
    n_probes: int = 4,
    lanczos_steps: int = 16,
) -> MonitorSummary:
    """Per-block mean square, gradient norms and cumulative Jacobian summaries of ``model``.

    Args:
        model: any ``flax.nnx.Module``, left unmodified (training or evaluation
            mode as the user set it).
        x: a batch of model inputs ``(B, ...)``, cast to the model's parameter dtype.
        key: PRNG key: the random-projection loss (when ``loss`` is ``None``) and
            the probes and Lanczos starts (split in two).
        at: cut points (module paths); default :func:`isometry.probe.blocks`.
        loss: ``loss(model(x)) -> scalar`` of the gradient fields; default the
            random projection of :func:`isometry.probe.signal`.
        jacobian_at: the cut points (among ``at``) whose Jacobian is measured;
            default all of them, ``()`` none (the cheapest monitor).
        examples: the first ``examples`` examples of the batch get their Jacobian
            measured (cost proportional).
        jacobian_batch: the Jacobian of example ``i`` is taken in the batch of the
            first ``jacobian_batch`` examples (``>= examples``), the others held
            fixed; default the whole batch. Every Jacobian-vector product runs the
            model on that batch, so a model whose examples do not interact (no
            batch norm in training mode) is measured exactly and ``B / examples``
            times cheaper with ``jacobian_batch=examples``.
        n_probes: Hutchinson probes ``P`` of the traces (exact when ``P >= n``, the
            input dimension).
        lanczos_steps: Lanczos steps ``S`` of the largest value (capped at ``n``;
            exact when ``S >= n``). Cost: ``examples * K * (P + S)`` products
            ``J^T J v``.

    Returns:
        a :class:`MonitorSummary`.

    Raises:
        ProbeError: a NaN or inf in the model's state (names the variable) or in
            ``x`` (names the example); ``at``, ``jacobian_at`` or ``x`` that do not
            fit the model; ``examples`` larger than the batch.
        TypeError: ``key`` is not a PRNG key; ``model`` is not an ``nnx.Module``.
    """
    options = {"at": at, "loss": loss, "jacobian_at": jacobian_at, "examples": examples,
               "jacobian_batch": jacobian_batch, "n_probes": n_probes,
               "lanczos_steps": lanczos_steps}  # fmt: skip
    return monitor_fn(model, x, **options)(model, x, key)


def monitor_fn(
    model,
    x,
    *,
    at=None,
    loss=None,
    jacobian_at=None,
    examples: int = 1,
    jacobian_batch: int | None = None,
    n_probes: int = 4,
    lanczos_steps: int = 16,
):
    """``fn(model, x, key) -> MonitorSummary``: :func:`monitor` compiled for models of this
    structure and batches of this shape (the arguments as :func:`monitor`'s).

    Compiled on its first call, reused for a model of the same structure (the same model after
    training steps) and a batch of the same shape; the finite checks run on every call.

    Example (a training loop of your own; ``probe.MonitorLog`` writes the records)::

        fn = probe.monitor_fn(model, x_probe)
        for step in range(steps):
            model, opt_state = train_step(model, opt_state, batch(step))
            if step % 50 == 0:
                log.write(step, fn(model, x_probe, jax.random.fold_in(key, step)))

    At a small size:

        >>> import jax
        >>> from flax import nnx
        >>> from isometry import probe
        >>> model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)),
        ...                        nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
        >>> x = jax.random.normal(jax.random.key(0), (8, 8))
        >>> fn = probe.monitor_fn(model, x)
        >>> s = fn(model, x, jax.random.key(1))
        >>> s.paths, s.jac_sv2_max.shape
        (('layers.0', 'layers.1'), (2,))
    """
    cuts.check_model(model)
    paths = cuts.resolve(model, at)
    mask = _jacobian_mask(paths, jacobian_at)
    xb = cuts.as_batch(model, x)
    examples = validate.positive_int("examples", examples)
    jb = xb.shape[0] if jacobian_batch is None else jacobian_batch
    jb = validate.positive_int("jacobian_batch", jb)
    if any(mask) and not examples <= jb <= xb.shape[0]:
        raise ProbeError(
            f"need examples <= jacobian_batch <= the batch size {xb.shape[0]}, got examples "
            f"{examples} and jacobian_batch {jb}"
        )
    if loss is not None and not callable(loss):
        raise TypeError(f"loss must be callable, got {type(loss).__name__}")
    options = (
        ("paths", paths),
        ("mask", mask),
        ("loss", loss),
        ("examples", examples),
        ("jacobian_batch", jb),
        ("n_probes", validate.positive_int("n_probes", n_probes)),
        ("lanczos_steps", validate.positive_int("lanczos_steps", lanczos_steps, minimum=2)),
    )
    graphdef = nnx.graphdef(model)
    program = _program(graphdef, options)

    def fn(model, x, key):
        if not (validate.is_concrete(x) and validate.is_concrete(key)):
            return _impl(model, x, key, **dict(options))  # traced by the caller's jit
        g, state = nnx.split(model)
        if g != graphdef:
            raise ProbeError(
                "monitor_fn: the model's structure differs from the one this function was "
                "made for; call probe.monitor_fn again for this model"
            )
        validate.prng_key("key", key)
        x = cuts.as_batch(model, x)
        check_finite_state(model)
        return program(state, x, key)

    return fn


@functools.lru_cache(maxsize=16)
def _program(graphdef, options):
    """The jitted monitor of a model structure and options (cached: compiled once)."""

    def run(state, x, key):
        return _impl(nnx.merge(graphdef, state), x, key, **dict(options))

    return jax.jit(run)


def _jacobian_mask(paths, jacobian_at) -> tuple[bool, ...]:
    if jacobian_at is None:
        return (True,) * len(paths)
    chosen = (jacobian_at,) if isinstance(jacobian_at, str) else tuple(jacobian_at)
    unknown = [p for p in chosen if p not in paths]
    if unknown:
        raise ProbeError(
            f"jacobian_at: {unknown} are not among the cut points {list(paths)} (set at= too)"
        )
    return tuple(p in chosen for p in paths)


def check_finite_state(model) -> None:
    """Raise :class:`ProbeError` naming the first floating variable of ``model`` holding a NaN
    or inf (one compiled reduction per leaf, then only the flags cross to the host)."""
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
    floats = [(p, v) for p, v in leaves if jnp.issubdtype(jnp.result_type(v), jnp.inexact)]
    if not floats or not all(validate.is_concrete(v) for _, v in floats):
        return
    flags = np.asarray(_finite_flags([v for _, v in floats]))
    if flags.all():
        return
    path, v = floats[int(np.argmin(flags))]
    name = ".".join(_key_name(k) for k in path)
    n_bad = int(np.sum(~np.isfinite(np.asarray(v))))
    raise ProbeError(
        f"the model state must be finite: {name!r} {tuple(np.shape(v))} holds {n_bad} NaN or "
        f"inf entries ({int(np.sum(~flags))} of the {len(floats)} floating variables do); "
        "the training step that produced it diverged"
    )


@jax.jit
def _finite_flags(leaves):
    return jnp.stack([jnp.all(jnp.isfinite(v)) for v in leaves])


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


# --------------------------------------------------------------------------- #
# The compiled measurement.
# --------------------------------------------------------------------------- #


def _impl(model, x, key, *, paths, mask, loss, examples, jacobian_batch, n_probes, lanczos_steps):
    k_signal, k_jacobian = jax.random.split(key)
    sig = signal(model, x, at=paths, loss=loss, key=k_signal)
    dtype = sig.mean_sq.dtype
    jac = [p for p, m in zip(paths, mask, strict=True) if m]
    nan = jnp.full((len(paths),), jnp.nan, dtype)
    fields = {"jac_sv2_mean": nan, "jac_sv2_var": nan, "jac_sv2_max": nan}
    if jac:
        f, rows, out_dims = _block_outputs(model, x[:jacobian_batch], tuple(jac))
        tr1, tr2, top = _jacobian_moments(f, rows, k_jacobian, examples, n_probes, lanczos_steps)
        n = math.prod(rows.shape[1:])
        r = jnp.asarray([min(m, n) for m in out_dims], tr1.dtype)
        mean = tr1 / r  # (E, K')
        var = jnp.maximum(tr2 / r - mean**2, 0.0)
        sel = jnp.asarray([i for i, m in enumerate(mask) if m])
        for name, v in (("jac_sv2_mean", jnp.mean(mean, 0)), ("jac_sv2_var", jnp.mean(var, 0)),
                        ("jac_sv2_max", jnp.max(top, 0))):  # fmt: skip
            fields[name] = nan.at[sel].set(v.astype(dtype))
    return MonitorSummary(
        mean_sq=sig.mean_sq,
        grad_out_sq=sig.grad_out_sq,
        grad_param_sq=sig.grad_param_sq,
        **fields,
        loss=sig.loss,
        paths=paths,
    )


def _block_outputs(model, x, paths):
    """``(f, rows, out_dims)``: ``f(u0, i)`` the flat outputs ``y^l_i`` at ``paths`` with
    example ``i`` of ``rows`` (the batch, or a stack's ``x^0``) replaced by ``u0``."""
    if is_stack(model):
        _, idx, xb, s = cuts.prepare_stack(model, x, paths)
        x0 = s.input_map(xb)

        def f_stack(u0, i):
            hs = s.hidden_states(x0.at[i].set(u0))
            return tuple(hs[l, i].reshape(-1) for l in idx)

        return f_stack, x0, (math.prod(x0.shape[1:]),) * len(idx)
    _, xb, graphdef, params, rest, (_, outs) = cuts.prepare(model, x, paths)

    def f_model(u0, i):
        return cumulative_fn(graphdef, (params, rest), paths, xb, i)(u0)

    return f_model, xb, tuple(math.prod(o.shape[1:]) for o in outs)


def _jacobian_moments(f, rows, key, examples, n_probes, lanczos_steps):
    """``(tr A, tr A^2, lambda_max A)`` estimates, each ``(examples, K)``, ``A = J_l^T J_l``.

    ``A v`` is one ``jvp`` and one ``vjp`` (the ``jvp`` is the transpose of the one
    linearization): the tangent is pushed through every block's output and the
    cotangent of block ``k`` alone pulled back, so every block shares one compiled
    program (vmapped over blocks and examples). Hutchinson: ``z^T A z`` and
    ``||A z||^2`` per probe; Lanczos: :func:`isometry.spectra.max_eigenvalue`.
    """
    n = math.prod(rows.shape[1:])
    steps = min(lanczos_steps, n)
    exact = n_probes >= n

    def one_example(i, key):
        u0 = rows[i]
        ys, f_vjp = jax.vjp(partial(f, i=i), u0)
        f_jvp = jax.linear_transpose(f_vjp, ys)

        def gram(k, v):
            (t,) = f_jvp((v.reshape(u0.shape).astype(u0.dtype),))
            cot = tuple(jnp.where(k == j, tj, 0).astype(y.dtype)
                        for j, (tj, y) in enumerate(zip(t, ys, strict=True)))  # fmt: skip
            return f_vjp(cot)[0].reshape(-1).astype(u0.dtype)

        def one_block(k, key):
            k_probes, k_start = jax.random.split(key)
            if exact:  # the n unit vectors: the traces themselves
                z = jnp.eye(n, dtype=u0.dtype)
            else:
                z = jax.random.rademacher(k_probes, (n_probes, n), dtype=u0.dtype)
            w = jax.vmap(partial(gram, k))(z)
            reduce = jnp.sum if exact else jnp.mean
            tr1, tr2 = reduce(jnp.sum(z * w, axis=1)), reduce(jnp.sum(w * w, axis=1))
            v0 = jax.random.rademacher(k_start, (n,), dtype=u0.dtype)
            return tr1, tr2, spectra.max_eigenvalue(partial(gram, k), v0, steps)

        keys = jax.random.split(key, len(ys))
        return jax.vmap(one_block)(jnp.arange(len(ys)), keys)

    return jax.vmap(one_example)(jnp.arange(examples), jax.random.split(key, examples))
