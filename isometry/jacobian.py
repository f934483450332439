"""Input-output Jacobians: any function, and every depth of a scanned stack in one pass.

* :func:`jacobian` / :func:`batch_jacobian`: ``J = df/dx`` of a per-example
  function (or a Flax NNX module), forward mode when ``x`` has no more entries
  than ``f(x)``, reverse mode otherwise; batched over inputs with ``vmap``.
* :func:`stack_jacobians`: for a deep network written as a scanned stack
  ``h_d = layer(params[d-1], h_{d-1})`` (params a pytree whose leaves carry a
  leading depth axis ``L``), the Jacobians ``J_d = dh_d/dh_0 = A_d ... A_1``
  at a list of depths in ONE pass over depth: the tangent matrix is pushed
  forward through each layer with ``jax.jvp`` (vmapped over its columns)
  inside ``lax.scan``, and emitted (or reduced, e.g. to singular values) at
  the requested depths. Any layer step works: dense, residual, normalization,
  convolution. :func:`stack_singular_values` returns spectra directly.
* :class:`RandomNetwork` / :func:`random_network_spectra`: the random deep
  networks of mean-field theory, ``x^l = phi(h^l)``, ``h^l = x^{l-1} W^l + b^l``,
  with each layer's weights generated inside the scan from
  ``fold_in(key, l)``, so memory does not grow with depth; vectorized over
  seeds and inputs, inputs scaled so every pre-activation ``h^l``, the first
  included, has variance ``q*`` (see :func:`sample_inputs`; Pennington,
  Schoenholz & Ganguli 2017, 2018).

Example:
    >>> import jax
    >>> from isometry import jacobian
    >>> net = jacobian.RandomNetwork("tanh", "orthogonal", q_star=0.25, width=64, depth=32)
    >>> lam = jacobian.random_network_spectra(jax.random.key(0), net, depths=[2, 32], n_seeds=2)
    >>> lam.shape  # (seeds, inputs, depths, width): squared singular values
    (2, 1, 2, 64)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from isometry import activations, initializers, spectra, validate

__all__ = [
    "NonFiniteJacobianError",
    "RandomNetwork",
    "batch_jacobian",
    "jacobian",
    "push_tangents",
    "random_layer",
    "random_network_jacobians",
    "random_network_spectra",
    "random_params",
    "sample_inputs",
    "stack_forward",
    "stack_jacobians",
    "stack_singular_values",
]

Array = jax.Array


class NonFiniteJacobianError(ValueError):
    """A Jacobian computed by the plain product overflowed or became NaN."""


# --------------------------------------------------------------------------- #
# Jacobians of any function.
# --------------------------------------------------------------------------- #


def _as_function(f):
    """A pure function of the input; Flax NNX modules are split into graph + state."""
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a dependency
        nnx = None
    if nnx is not None and isinstance(f, nnx.Module):
        graphdef, state = nnx.split(f)
        return lambda x: nnx.merge(graphdef, state)(x)
    if not callable(f):
        raise TypeError(f"f must be callable (a function or an nnx.Module), got {type(f).__name__}")
    return f


def _float_input(name, x):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    if x.ndim == 0 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty array with at least one axis, got {x.shape}")
    return x


def jacobian(f, x, *, mode: str = "auto") -> Array:
    """Jacobian ``J = df/dx`` of a per-example function at one input.

    Args:
        f: ``f(x) -> y`` on arrays, or a Flax NNX module (evaluated as is:
            its state is captured, not differentiated).
        x: input of any shape.
        mode: ``"fwd"`` (``jax.jacfwd``, one jvp per input entry), ``"rev"``
            (``jax.jacrev``, one vjp per output entry) or ``"auto"``: forward
            when ``x.size <= y.size``, else reverse.

    Returns:
        ``J`` of shape ``y.shape + x.shape`` (as ``jax.jacfwd``).
    """
    validate.choice("mode", mode, ("auto", "fwd", "rev"))
    f = _as_function(f)
    x = _float_input("x", x)
    if mode == "auto":
        out = jax.eval_shape(f, x)
        mode = "fwd" if x.size <= math.prod(out.shape) else "rev"
    return (jax.jacfwd if mode == "fwd" else jax.jacrev)(f)(x)


def batch_jacobian(f, xs, *, mode: str = "auto") -> Array:
    """Per-example Jacobians over the leading axis: ``xs (B, *in) -> (B, *out, *in)`` (``vmap``)."""
    validate.choice("mode", mode, ("auto", "fwd", "rev"))
    f = _as_function(f)
    xs = _float_input("xs", xs)
    if xs.ndim < 2:
        raise ValueError(f"xs must have shape (batch, *input_shape), got {xs.shape}")
    return jax.vmap(lambda x: jacobian(f, x, mode=mode))(xs)


# --------------------------------------------------------------------------- #
# Scanned stacks.
# --------------------------------------------------------------------------- #


def push_tangents(layer, params_l, h, T) -> tuple[Array, Array]:
    """One layer forward on ``h`` and on the tangent rows ``T (k, *h.shape)``.

    ``h' = layer(params_l, h)``, ``T'_j = A T_j`` with ``A = d layer / d h``
    (``jax.jvp`` vmapped over rows; the primal is computed once, and for a
    dense layer the rows become one ``(k, n) @ (n, n)`` matmul).
    """

    def one(t):
        return jax.jvp(lambda z: layer(params_l, z), (h,), (t,))

    return jax.vmap(one, out_axes=(None, 0))(T)


@dataclasses.dataclass(frozen=True)
class _Plan:
    params: object
    x: Array
    rows: Array
    shape: tuple[int, ...]
    depths: np.ndarray
    L: int


def _depth_list(depths, L: int) -> np.ndarray:
    if depths is None:
        return np.array([L])
    if isinstance(depths, int | np.integer):
        depths = [depths]
    try:
        d = np.asarray(list(depths))
    except TypeError as err:
        raise ValueError(f"depths must be a list of integers in 1..{L}, got {depths!r}") from err
    if d.size == 0:
        raise ValueError("depths must not be empty")
    if d.dtype.kind not in "iu" or d.ndim != 1:
        if d.dtype.kind == "f" and np.all(d == np.round(d)):
            d = d.astype(int)
        else:
            raise ValueError(f"depths must be integers in 1..{L}, got {depths!r}")
    bad = (d < 1) | (d > L)
    if np.any(bad):
        raise ValueError(f"depths must lie in 1..{L} (the stack's depth L), got {d[bad].tolist()}")
    return np.unique(d)


def _plan(layer, params, x, depths, tangents) -> _Plan:
    if not callable(layer):
        raise TypeError(f"layer must be callable layer(params_l, h) -> h, got {type(layer)}")
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError("params must be a pytree with at least one array leaf (leading axis L)")
    lengths = {np.shape(a)[0] if np.ndim(a) else None for a in leaves}
    if None in lengths or len(lengths) != 1:
        shapes = [np.shape(a) for a in leaves]
        raise ValueError(
            f"params leaves must share a leading depth axis L, got leaf shapes {shapes[:6]}"
        )
    (L,) = lengths
    if L < 1:
        raise ValueError("params has depth L = 0; need at least one layer")
    x = _float_input("x", x)
    p0 = jax.tree_util.tree_map(lambda a: a[0], params)
    out = jax.eval_shape(layer, p0, x)
    if not hasattr(out, "shape") or tuple(out.shape) != x.shape:
        got = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"layer must map h to the same shape (a stack of identical-shaped layers): "
            f"input {x.shape} -> output {got}"
        )
    if out.dtype != x.dtype:
        x = x.astype(out.dtype)
    d = _depth_list(depths, L)
    if tangents is None:
        rows = jnp.eye(x.size, dtype=x.dtype).reshape((x.size, *x.shape))
    else:
        rows = jnp.asarray(tangents, dtype=x.dtype)
        if rows.ndim != x.ndim + 1 or rows.shape[1:] != x.shape or rows.shape[0] < 1:
            raise ValueError(
                f"tangents must have shape (k, *x.shape) = (k, {', '.join(map(str, x.shape))}), "
                f"got {rows.shape}"
            )
    dmax = int(d[-1])
    params = jax.tree_util.tree_map(lambda a: a[:dmax], params)
    return _Plan(params=params, x=x, rows=rows, shape=x.shape, depths=d, L=L)


def _scan_emit(plan: _Plan, init, step, emit, *, unroll=1):
    """Scan ``step`` over depth from ``init(x, rows)``; stack ``emit(carry)`` at ``plan.depths``.

    Emission happens inside the scan (under ``lax.cond``, so only at the
    requested depths) into a preallocated ``(K + 1, ...)`` buffer; non-emitting
    layers write the spare slot ``K``. Memory: the carry plus K outputs.
    """
    K = len(plan.depths)
    dmax = int(plan.depths[-1])
    slots = np.full(dmax, K, dtype=np.int32)
    slots[plan.depths - 1] = np.arange(K, dtype=np.int32)
    carry0 = init(plan.x, plan.rows)
    out_shape = jax.eval_shape(emit, carry0)
    buf0 = jax.tree_util.tree_map(lambda s: jnp.zeros((K + 1, *s.shape), s.dtype), out_shape)

    def zeros(_):
        return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)

    def body(state, inp):
        carry, buf = state
        p, slot = inp
        carry = step(carry, p)
        val = lax.cond(slot < K, emit, zeros, carry)
        buf = jax.tree_util.tree_map(
            lambda b, v: lax.dynamic_update_index_in_dim(b, v, slot, 0), buf, val
        )
        return (carry, buf), None

    (_, buf), _ = lax.scan(body, (carry0, buf0), (plan.params, jnp.asarray(slots)), unroll=unroll)
    return jax.tree_util.tree_map(lambda b: b[:K], buf)


def stack_forward(layer, params, x, *, unroll: int = 1) -> Array:
    """The stack's output ``h_L``: ``h_d = layer(params[d-1], h_{d-1})`` by ``lax.scan``."""

    def body(h, p):
        return layer(p, h), None

    h, _ = lax.scan(body, x, params, unroll=unroll)
    return h


def stack_jacobians(
    layer: Callable,
    params,
    x,
    depths: Sequence[int] | None = None,
    *,
    tangents=None,
    reduce: Callable[[Array], object] | None = None,
    unroll: int = 1,
):
    """Jacobians ``J_d = dh_d/dh_0`` of a scanned stack at several depths, in one pass.

    ``h_d = layer(params[d-1], h_{d-1})``; ``J_d = A_d ... A_1 V`` with
    ``A_d = d layer/dh`` at ``h_{d-1}`` and ``V`` the identity (or the
    directions in ``tangents``). Cost for a dense width-``n`` stack: ``2 n^3``
    flops per layer (one matmul of the tangent matrix), for ALL depths together.

    Args:
        layer: ``layer(params_l, h) -> h``; the output must have ``h``'s shape.
        params: pytree whose leaves have leading depth axis ``L``.
        x: one input ``h_0`` of any shape (``n = x.size``). Per-example: use
            ``jax.vmap`` over inputs (and over ``params`` for seeds).
        depths: depths in ``1..L`` (any order, duplicates merged; default ``L``).
            Only ``max(depths)`` layers are run.
        tangents: optional ``(k, *x.shape)`` input directions; then
            ``J_d`` is ``(n_out, k)`` (e.g. a few columns of a wide network).
        reduce: optional ``reduce(J_d)`` applied inside the scan at each
            requested depth to the matrix ``J_d (n, k)`` (e.g.
            :func:`isometry.spectra.singular_values`, :func:`isometry.spectra.trace_moments`):
            memory then holds reduced outputs, not K Jacobians.
        unroll: ``lax.scan`` unroll factor.

    Returns:
        ``(K, *x.shape, *x.shape)`` Jacobians for the ``K`` sorted unique
        depths (``(K, *x.shape, k)`` with tangents), or the stacked pytree of
        ``reduce`` outputs. Same layout as ``jax.jacfwd``.
    """
    plan = _plan(layer, params, x, depths, tangents)
    n = plan.x.size
    k = plan.rows.shape[0]

    def init(h, rows):
        return (h, rows)

    def step(carry, p):
        h, T = carry
        return push_tangents(layer, p, h, T)

    def matrix(carry):
        return carry[1].reshape(k, n).T

    if reduce is None:
        out = _scan_emit(plan, init, step, matrix, unroll=unroll)
        in_shape = plan.shape if tangents is None else (k,)
        return out.reshape((len(plan.depths), *plan.shape, *in_shape))
    return _scan_emit(plan, init, step, lambda c: reduce(matrix(c)), unroll=unroll)


def _check_finite(values, what: str) -> None:
    if not validate.is_concrete(values):
        return
    v = np.asarray(values)
    if not np.all(np.isfinite(v)):
        raise NonFiniteJacobianError(
            f"the plain Jacobian product gave non-finite {what} (overflow or NaN through depth); "
            "use isometry.spectra.log_singular_values, the stable QR route in log space, "
            "for very deep or off-critical networks"
        )


def stack_singular_values(
    layer: Callable,
    params,
    x,
    depths: Sequence[int] | None = None,
    *,
    squared: bool = False,
    method: str = "svd",
    tangents=None,
    check_finite: bool = True,
    workers: int | None = None,
) -> Array:
    """Singular values of the stack's Jacobians at ``depths``: ``(K, min(n, k))``, decreasing.

    One pass over depth emits the ``K`` Jacobians (memory ``K n^2``); their
    SVDs then run as one batch split over CPU cores (``workers``, see
    :func:`isometry.spectra.singular_values`). ``squared=True`` returns the
    eigenvalues of ``J J^T``. For a memory-light pass, use
    ``stack_jacobians(..., reduce=spectra.singular_values)``.

    Raises:
        NonFiniteJacobianError (a ``ValueError``): the plain product
            overflowed (e.g. 1,000+ layers off criticality); use
            :func:`isometry.spectra.log_singular_values`. Disable with
            ``check_finite=False`` (also skipped under ``jit``).
    """
    validate.choice("method", method, ("svd", "eigh"))
    J = stack_jacobians(layer, params, x, depths, tangents=tangents)
    J = J.reshape(J.shape[0], jnp.asarray(x).size, -1)
    if check_finite:
        _check_finite(J, "Jacobian entries")
    if squared:
        return spectra.squared_singular_values(J, method=method, workers=workers)
    return spectra.singular_values(J, method=method, workers=workers)


# --------------------------------------------------------------------------- #
# Random networks.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class RandomNetwork:
    """A random deep fully-connected network of mean-field theory (hashable config).

    ``h^l = x^{l-1} W^l + b^l``, ``x^l = phi(h^l)``, ``l = 1..depth``, width
    ``N`` throughout, ``W^l`` from ``weights`` with effective variance
    ``sigma_w2``, ``b^l_i ~ N(0, sigma_b2)``. ``J = dx^L/dx^0 = prod D^l W^l``.

    Attributes:
        activation: name or :class:`isometry.activations.Activation`.
        weights: ``"gaussian"``, ``"orthogonal"``, or any initializer name
            (``"he_normal"``, ``"xavier_normal"``, ...; these fix ``sigma_w2``).
        sigma_w2, sigma_b2: weight and bias variances. When ``sigma_w2`` is
            omitted and ``q_star`` given, the critical point for ``q_star``
            (``chi1 = 1``) is used; when both are omitted, ``sigma_w2`` is the
            initializer's (1 for gaussian/orthogonal). ``sigma_b2`` defaults to 0.
        q_star: the pre-activation fixed point; default: solved from
            ``(sigma_w2, sigma_b2)`` by mean-field theory. Inputs are drawn on
            the sphere ``||x^0||^2 = width * (q_star - sigma_b2) / sigma_w2``,
            so that ``h^1`` (and every later ``h^l``) has variance ``q_star``.
        width: ``N``.
        depth: ``L``.
    """

    activation: object = "tanh"
    weights: str = "orthogonal"
    sigma_w2: float | None = None
    sigma_b2: float | None = None
    q_star: float | None = None
    width: int = 256
    depth: int = 64

    def __post_init__(self):
        validate.positive_int("width", self.width)
        validate.positive_int("depth", self.depth)
        for name in ("sigma_w2", "q_star"):
            v = getattr(self, name)
            if v is not None:
                validate.real_array(name, v, minimum=0.0, strict=True)
        if self.sigma_b2 is not None:
            validate.real_array("sigma_b2", self.sigma_b2, minimum=0.0)
        activations.get(self.activation)
        if not isinstance(self.weights, str | initializers.Initializer):
            raise TypeError(f"weights must be an initializer name, got {self.weights!r}")

    def resolved(
        self,
    ) -> tuple[activations.Activation, initializers.Initializer, float, float, float]:
        """``(activation, initializer, sigma_w2, sigma_b2, q_star)``, every default filled in."""
        from isometry import meanfield

        act = activations.get(self.activation)
        base = initializers.get(self.weights)
        sw, sb, q = self.sigma_w2, self.sigma_b2, self.q_star
        param_scheme = base.sigma_w2_param is not None
        if not param_scheme and sw is not None:
            raise ValueError(
                f"weights={base.name!r} fixes sigma_w2; use 'gaussian' or 'orthogonal' "
                f"to choose sigma_w2={sw}"
            )
        if param_scheme and sw is None and q is not None:
            if sb is not None:
                raise ValueError(
                    "give sigma_w2 with sigma_b2, or q_star alone (the critical point); not "
                    "sigma_b2 and q_star without sigma_w2"
                )
            sw_, sb_ = meanfield.critical_point(act, q)
            sw, sb = float(sw_), float(sb_)
            if not (math.isfinite(sw) and math.isfinite(sb) and sb >= 0):
                raise ValueError(f"q_star={q}: no critical point for {act.name} at this q*")
        if sw is None:
            sw = 1.0 if param_scheme else base.sigma_w2(self.width, self.width)
        sb = 0.0 if sb is None else float(sb)
        init = initializers.get(base.name, sigma_w2=sw) if param_scheme else base
        if q is None:
            q = float(meanfield.q_star(act, sw, sb))
            if not math.isfinite(q) or q <= 0:
                raise ValueError(
                    f"no finite fixed point q* for {act.name} at sigma_w2={sw}, sigma_b2={sb}; "
                    "pass q_star explicitly"
                )
        return act, init, float(sw), sb, float(q)


def random_layer(net: RandomNetwork, dtype=None) -> Callable[[Array, Array], Array]:
    """The layer step ``layer(key_l, x) -> phi(x W + b)`` with ``W, b`` drawn from ``key_l``.

    Weights are generated inside the step, so a scanned stack holds one
    layer's weights at a time. ``W`` is ``(N, N)`` (fan_in, fan_out), used as
    ``x @ W``; ``b ~ N(0, sigma_b2)``.
    """
    act, init, _, sb, _ = net.resolved()
    N = net.width
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    sqrt_sb = math.sqrt(sb)

    def layer(key_l, x):
        kw, kb = jax.random.split(key_l)
        W = init(kw, (N, N), dtype)
        h = x @ W
        if sb > 0:
            h = h + sqrt_sb * jax.random.normal(kb, (N,), dtype)
        return act.phi(h)

    return layer


def random_params(key: Array, depth: int) -> Array:
    """Per-layer keys ``fold_in(key, l)``, ``l = 0..depth-1``: the stack's params ``(depth,)``."""
    depth = validate.positive_int("depth", depth)
    return jax.vmap(lambda l: jax.random.fold_in(key, l))(jnp.arange(depth))


def sample_inputs(key: Array, net: RandomNetwork, n: int, dtype=None) -> Array:
    """``n`` inputs uniform on a sphere that puts the network at its length fixed point: ``(n, N)``.

    The layer is ``x^l = phi(x^{l-1} W + b)``, so the first pre-activation
    ``h^1 = x^0 W + b`` has variance ``sigma_w2 ||x^0||^2 / N + sigma_b2``.
    Inputs on the sphere

        ||x^0||^2 = N (q* - sigma_b2) / sigma_w2  (= N E[phi(sqrt(q*) z)^2])

    give ``h^1`` variance ``q*``, like every later layer: the pre-activations
    sit on the ``q*`` sphere from the first layer on, as the free-probability
    theory assumes (Pennington, Schoenholz & Ganguli 2017).
    """
    n = validate.positive_int("n", n)
    _, _, sw, sb, q = net.resolved()
    if not q > sb:
        raise ValueError(f"q_star ({q}) must exceed sigma_b2 ({sb}) for inputs at the fixed point")
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    z = jax.random.normal(key, (n, net.width), dtype)
    radius = math.sqrt(net.width * (q - sb) / sw)
    return z / jnp.linalg.norm(z, axis=1, keepdims=True) * jnp.asarray(radius, dtype)


def _ensemble(key, net, n_seeds, n_inputs, inputs, dtype):
    validate.positive_int("n_seeds", n_seeds)
    validate.positive_int("n_inputs", n_inputs)
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    seed_keys = jax.random.split(key, n_seeds)
    layer_keys = jax.vmap(lambda k: random_params(jax.random.fold_in(k, 0), net.depth))(seed_keys)
    if inputs is None:
        xs = jax.vmap(lambda k: sample_inputs(jax.random.fold_in(k, 1), net, n_inputs, dtype))(
            seed_keys
        )
    else:
        xs = jnp.asarray(inputs, dtype=dtype)
        if xs.ndim != 2 or xs.shape[1] != net.width:
            raise ValueError(
                f"inputs must have shape (n_inputs, width={net.width}), got {xs.shape}"
            )
        xs = jnp.broadcast_to(xs, (n_seeds, *xs.shape))
    return random_layer(net, dtype), layer_keys, xs


def random_network_jacobians(
    key: Array,
    net: RandomNetwork,
    depths: Sequence[int] | None = None,
    *,
    n_seeds: int = 1,
    n_inputs: int = 1,
    inputs=None,
    reduce: Callable | None = None,
    dtype=None,
):
    """Jacobians (or ``reduce`` of them) of random networks: ``(n_seeds, n_inputs, K, N, N)``.

    Seed ``s`` draws layer ``l``'s weights from ``fold_in(fold_in(k_s, 0), l)``
    and its inputs from ``fold_in(k_s, 1)`` (``k_s = split(key)[s]``), on the
    ``q*`` sphere unless ``inputs (n_inputs, N)`` are given (shared by seeds).
    Validation of ``depths`` etc. as :func:`stack_jacobians`.
    """
    layer, keys, xs = _ensemble(key, net, n_seeds, n_inputs, inputs, dtype)
    _depth_list(depths, net.depth)

    @jax.jit
    def run(keys, xs):
        def one(k, x):
            return stack_jacobians(layer, k, x, depths, reduce=reduce)

        return jax.vmap(lambda k, x1: jax.vmap(lambda x: one(k, x))(x1))(keys, xs)

    return run(keys, xs)


def random_network_spectra(
    key: Array,
    net: RandomNetwork,
    depths: Sequence[int] | None = None,
    *,
    n_seeds: int = 1,
    n_inputs: int = 1,
    inputs=None,
    statistic: str = "squared_singular_values",
    method: str = "svd",
    dtype=None,
    workers: int | None = None,
):
    """Empirical Jacobian spectra of random deep networks, all depths in one pass.

    The sampler for comparisons with free probability: for each of
    ``n_seeds`` networks (``net``: activation, weights ``"gaussian"`` /
    ``"orthogonal"``, ``sigma_w2``, ``sigma_b2``, width, depth) and
    ``n_inputs`` inputs, the spectrum of ``J_d J_d^T`` at each depth in
    ``depths``.

    Args:
        statistic: ``"squared_singular_values"`` (eigenvalues of ``J J^T``,
            the default), ``"singular_values"``, ``"log_singular_values"``
            (the stable route, :func:`isometry.spectra.log_singular_values`, for
            1,000+ layers), or ``"moments"`` (dict of ``mean``, ``var``,
            ``second_moment``, ``max`` of the squared singular values from
            traces and Lanczos, no SVD: :func:`isometry.spectra.trace_moments`).
        method: ``"svd"`` or ``"eigh"`` (see :func:`isometry.spectra.singular_values`).

    Returns:
        ``(n_seeds, n_inputs, K, N)`` decreasing, or for ``"moments"`` a dict
        of ``(n_seeds, n_inputs, K)`` arrays.
    """
    validate.choice(
        "statistic",
        statistic,
        ("squared_singular_values", "singular_values", "log_singular_values", "moments"),
    )
    validate.choice("method", method, ("svd", "eigh"))
    if statistic == "moments":
        return random_network_jacobians(
            key, net, depths, n_seeds=n_seeds, n_inputs=n_inputs, inputs=inputs,
            reduce=spectra.trace_moments, dtype=dtype,
        )  # fmt: skip
    if statistic == "log_singular_values":
        layer, keys, xs = _ensemble(key, net, n_seeds, n_inputs, inputs, dtype)
        _depth_list(depths, net.depth)
        fn = jax.jit(
            jax.vmap(
                lambda k, x1: jax.vmap(lambda x: spectra.log_singular_values(layer, k, x, depths))(
                    x1
                )
            )
        )
        return fn(keys, xs)
    J = random_network_jacobians(
        key, net, depths, n_seeds=n_seeds, n_inputs=n_inputs, inputs=inputs, dtype=dtype
    )
    _check_finite(J, "Jacobian entries")
    if statistic == "squared_singular_values":
        return spectra.squared_singular_values(J, method=method, workers=workers)
    return spectra.singular_values(J, method=method, workers=workers)
