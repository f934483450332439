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
  Schoenholz & Ganguli 2017, 2018). The building blocks are public:
  :func:`dense_layer` (the layer step ``phi(x W + b)`` with ``W, b`` drawn
  from the layer's key, variances possibly traced) and :func:`sphere_inputs`
  (inputs whose first pre-activation has variance ``q*``).

The scan over depth itself lives in :mod:`isometry.depthscan`, shared with
:func:`isometry.spectra.log_singular_values`.

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

from isometry import activations, depthscan, initializers, networks, spectra, validate
from isometry.depthscan import push_tangents

__all__ = [
    "NonFiniteJacobianError",
    "RandomNetwork",
    "batch_jacobian",
    "dense_layer",
    "jacobian",
    "pair_on_sphere",
    "push_tangents",
    "random_layer",
    "random_network_jacobians",
    "random_network_spectra",
    "random_params",
    "sample_inputs",
    "sphere_inputs",
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
    x = depthscan.as_float_input("x", x)
    if mode == "auto":
        out = jax.eval_shape(f, x)
        mode = "fwd" if x.size <= math.prod(out.shape) else "rev"
    return (jax.jacfwd if mode == "fwd" else jax.jacrev)(f)(x)


def batch_jacobian(f, xs, *, mode: str = "auto") -> Array:
    """Per-example Jacobians over the leading axis: ``xs (B, *in) -> (B, *out, *in)`` (``vmap``)."""
    validate.choice("mode", mode, ("auto", "fwd", "rev"))
    f = _as_function(f)
    xs = depthscan.as_float_input("xs", xs)
    if xs.ndim < 2:
        raise ValueError(f"xs must have shape (batch, *input_shape), got {xs.shape}")
    return jax.vmap(lambda x: jacobian(f, x, mode=mode))(xs)


# --------------------------------------------------------------------------- #
# Scanned stacks.
# --------------------------------------------------------------------------- #


def stack_forward(layer, params, x, *, unroll: int = 1) -> Array:
    """The stack's output ``h_L``: ``h_d = layer(params[d-1], h_{d-1})`` by ``lax.scan``."""

    def body(h, p):
        return layer(p, h), None

    h, _ = lax.scan(body, x, params, unroll=unroll)
    return h


def _stack_args(layer, params, x, depths, fn: str):
    """``(layer, params, x, depths)`` from ``(layer, params, x, depths)`` or ``(model, x, depths)``.

    A :class:`isometry.networks.Stack` or a model with ``stack()`` (an MLP,
    a ConvNet) stands for its hidden layers: ``x`` is then one input ``u`` of
    the model, mapped to the stack's ``x^0 = input_map(u)``.
    """
    model = layer
    if not (isinstance(model, networks.Stack) or callable(getattr(model, "stack", None))):
        if not callable(layer):
            raise TypeError(
                f"{fn}: layer must be a function layer(params_l, h), a networks.Stack or a "
                f"model with stack(), got {type(layer).__name__}"
            )
        if x is None:
            raise TypeError(f"{fn}(layer, params, x, depths): x (the input h_0) is missing")
        return layer, params, x, depths
    if x is not None and depths is not None:
        raise TypeError(f"{fn}(model, x, depths): too many positional arguments for a model")
    if params is None:
        raise TypeError(f"{fn}(model, x, depths): x (one input of the model) is missing")
    s = model if isinstance(model, networks.Stack) else model.stack()
    u = depthscan.as_float_input("x", params)
    return s.layer, s.params, s.input_map(u), (x if depths is None else depths)


def stack_jacobians(
    layer,
    params=None,
    x=None,
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

    Also ``stack_jacobians(model, u, depths, ...)`` with a
    :class:`isometry.networks.Stack` or a model with ``stack()`` (``MLP``,
    ``ConvNet``): the Jacobians ``dx^d/dx^0`` of its hidden layers at
    ``x^0 = input_map(u)`` for one model input ``u`` (as
    :func:`isometry.signal.measure` takes a model; put batch-normalized models
    in evaluation mode first).

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
    layer, params, x, depths = _stack_args(layer, params, x, depths, "stack_jacobians")
    plan = depthscan.plan(layer, params, x, depths, tangents)
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
        out = depthscan.scan_emit(plan, init, step, matrix, unroll=unroll)
        in_shape = plan.shape if tangents is None else (k,)
        return out.reshape((len(plan.depths), *plan.shape, *in_shape))
    return depthscan.scan_emit(plan, init, step, lambda c: reduce(matrix(c)), unroll=unroll)


def _check_finite(values, what: str, where: str = "") -> None:
    if not validate.is_concrete(values) or bool(jnp.all(jnp.isfinite(values))):
        return
    raise NonFiniteJacobianError(
        f"the plain Jacobian product gave non-finite {what}{where} (overflow or NaN through "
        "depth); use isometry.spectra.log_singular_values, the stable QR route in log space, "
        "for very deep or off-critical networks"
    )


def _check_squares(lam, what: str, dtype) -> None:
    """Squared singular values that overflow although ``J`` is finite: say so and what to use."""
    if not validate.is_concrete(lam) or bool(jnp.all(jnp.isfinite(lam))):
        return
    big = float(jnp.finfo(dtype).max)
    raise NonFiniteJacobianError(
        f"the squared singular values of {what} overflow {jnp.dtype(dtype).name} (s^2 > {big:.3g}) "
        "although the Jacobian is finite; use dtype=float64 (with jax_enable_x64), "
        "statistic='singular_values', or statistic='log_singular_values' (log space)"
    )


def stack_singular_values(
    layer,
    params=None,
    x=None,
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
    ``stack_jacobians(..., reduce=spectra.singular_values)``. Takes a model
    as :func:`stack_jacobians` does: ``stack_singular_values(model, u, depths)``.

    Raises:
        NonFiniteJacobianError: (a ``ValueError``) the plain product
            overflowed (e.g. 1,000+ layers off criticality); use
            :func:`isometry.spectra.log_singular_values`. Disable with
            ``check_finite=False`` (also skipped under ``jit``).
    """
    validate.choice("method", method, ("svd", "eigh", "gram64"))
    layer, params, x, depths = _stack_args(layer, params, x, depths, "stack_singular_values")
    J = stack_jacobians(layer, params, x, depths, tangents=tangents)
    J = J.reshape(J.shape[0], jnp.asarray(x).size, -1)
    opts = {"method": method, "workers": workers, "check_finite": False}
    if check_finite:
        _check_finite(J, "Jacobian entries")
    if not squared:
        return spectra.singular_values(J, **opts)
    lam = spectra.squared_singular_values(J, **opts)
    if check_finite:
        _check_squares(lam, "the stack's Jacobian", J.dtype)
    return lam


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
        """``(activation, initializer, sigma_w2, sigma_b2, q_star)``, every default filled in.

        The variances come from :func:`isometry.initializers.resolve`: the
        critical point of ``q_star`` when the scheme takes ``sigma_w2`` and none
        is given, else ``sigma_w2``/``sigma_b2`` (or the fans'), with ``q*``
        solved unless ``q_star`` is given (then it is only the inputs' sphere).
        """
        act = activations.get(self.activation)
        base = initializers.get(self.weights)
        fixed = self.sigma_w2 is not None or base.sigma_w2_param is None
        v = initializers.resolve(
            act, base, q_star=None if fixed else self.q_star, sigma_w2=self.sigma_w2,
            sigma_b2=self.sigma_b2, fan_in=self.width, fan_out=self.width,
            fixed_point=self.q_star is None,
        )  # fmt: skip
        q = v.q_star if self.q_star is None else float(self.q_star)
        return act, base.at(v.sigma_w2), v.sigma_w2, v.sigma_b2, q


def dense_layer(activation, init, sigma_w2=None, sigma_b2=0.0, dtype=None):
    """The random dense layer step ``layer(key_l, x) -> phi(x W + b)``, ``W, b`` from ``key_l``.

    ``W (N, N)`` (fan_in, fan_out; ``N = x.shape[-1]``) from
    :func:`isometry.initializers.sample` (``init`` a name or initializer, at
    ``sigma_w2``, ``None`` for fan-based schemes), ``b ~ N(0, sigma_b2)``
    (:func:`isometry.initializers.sample_bias`); ``sigma_w2`` and ``sigma_b2``
    may be traced arrays (a sweep vmaps over them). ``key_l`` is split into
    ``(k_W, k_b)``. Weights are generated inside the step, so a scanned stack
    holds one layer's weights at a time. ``dtype`` defaults to ``x``'s.
    """
    act = activations.get(activation)

    def layer(key_l, x):
        kw, kb = jax.random.split(key_l)
        N = x.shape[-1]
        dt = x.dtype if dtype is None else dtype
        W = initializers.sample(init, kw, (N, N), sigma_w2, dt)
        return act.phi(x @ W + initializers.sample_bias(kb, (N,), sigma_b2, dt))

    return layer


def random_layer(net: RandomNetwork, dtype=None) -> Callable[[Array, Array], Array]:
    """:func:`dense_layer` of the network ``net``: ``layer(key_l, x) -> phi(x W + b)``."""
    act, init, _, sb, _ = net.resolved()
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    return dense_layer(act, init, None, sb, dtype)


def random_params(key: Array, depth: int) -> Array:
    """Per-layer keys ``fold_in(key, l)``, ``l = 0..depth-1``: the stack's params ``(depth,)``."""
    depth = validate.positive_int("depth", depth)
    validate.prng_key("key", key)
    return jax.vmap(lambda l: jax.random.fold_in(key, l))(jnp.arange(depth))


def sphere_inputs(
    key: Array,
    shape,
    q_star=None,
    sigma_w2=1.0,
    sigma_b2=0.0,
    *,
    model=None,
    batch_ndim: int | None = None,
    dtype=None,
) -> Array:
    """Inputs on the sphere that gives the first pre-activation variance ``q*``: ``shape``.

    For a layer ``h^1 = x^0 W + b`` with ``Var W_ij = sigma_w2 / n`` and
    ``Var b_i = sigma_b2``, ``Var h^1_i = sigma_w2 ||x^0||^2 / n + sigma_b2``,
    so each example (the axes after the first ``batch_ndim``; ``n`` entries)
    is drawn uniform on

        ||x^0||^2 = n (q* - sigma_b2) / sigma_w2  (= n E[phi(sqrt(q*) z)^2] at the fixed point)

    and ``h^1``, like every later layer, sits at ``q*`` (Pennington,
    Schoenholz & Ganguli 2017). ``sigma_w2 = 1, sigma_b2 = 0`` give mean
    square ``q*``. Variances may be traced. Computed as ``x * sqrt(n m) /
    ||x||`` with ``m = (q* - sigma_b2) / sigma_w2``, ``x ~ N(0, I)``.

    ``model=`` (an ``MLP``/``ConvNet`` or their config) takes ``(sigma_w2,
    sigma_b2)`` from its ``variances()``, ``q*`` from its ``q_star`` or the
    mean-field fixed point of those variances, the dtype from the model's
    parameters (or the config's ``dtype``), and ``batch_ndim`` defaults to 1:
    ``sphere_inputs(key, (B, in_dim), model=model)`` is a batch at the model's
    ``q*``. With an input map (``in_dim != width``, LeCun, ``Var = 1/in_dim``)
    ``x^0 = u W_in`` has that mean square in expectation over ``W_in``.
    ``batch_ndim`` defaults to 0 without a model.
    """
    validate.prng_key("key", key)
    if model is not None:
        if q_star is not None:
            raise TypeError("sphere_inputs: give q_star (and variances) or model=, not both")
        q_star, sigma_w2, sigma_b2, dtype = _model_sphere(model, dtype)
        batch_ndim = 1 if batch_ndim is None else batch_ndim
    elif q_star is None:
        raise TypeError("sphere_inputs: q_star (or model=) is required")
    batch_ndim = 0 if batch_ndim is None else batch_ndim
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as err:
        raise TypeError(f"shape must be a tuple of integers, got {shape!r}") from err
    for s in shape:
        validate.positive_int("shape entries", s)
    validate.real_array("q_star", q_star, minimum=0.0, strict=True)
    validate.real_array("sigma_w2", sigma_w2, minimum=0.0, strict=True)
    validate.real_array("sigma_b2", sigma_b2, minimum=0.0)
    if not 0 <= batch_ndim < len(shape):
        raise ValueError(f"batch_ndim must be in 0..{len(shape) - 1} for shape {shape}")
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    concrete = validate.is_concrete(q_star) and validate.is_concrete(sigma_b2)
    if concrete and not np.all(np.asarray(q_star) > np.asarray(sigma_b2)):
        raise ValueError(f"q_star ({q_star}) must exceed sigma_b2 ({sigma_b2}) for inputs at q*")
    x = jax.random.normal(key, shape, dtype)
    axes = tuple(range(batch_ndim, len(shape)))
    n = math.prod(shape[batch_ndim:])
    m = (q_star - sigma_b2) / sigma_w2
    return x * jnp.sqrt(n * m) / jnp.sqrt(jnp.sum(x * x, axis=axes, keepdims=True))


def pair_on_sphere(key: Array, width: int, c0, mean_square, dtype=None) -> Array:
    """Two inputs ``(2, N)`` of cosine exactly ``c0``, each of mean square ``mean_square``.

    The correlation-propagation experiment of Poole et al. 2016 and Schoenholz
    et al. 2017 (two inputs through one random network; ``c^l`` of their
    pre-activations decays over ``xi_c`` layers): with ``z_1, z_2 ~ N(0, I_N)``,

        a = z_1 / ||z_1||,   b = unit(z_2 - <z_2, a> a),
        x_1 = sqrt(N m) a,   x_2 = sqrt(N m) (c0 a + sqrt(1 - c0^2) b),

    so ``<x_1, x_2> / (||x_1|| ||x_2||) = c0`` and ``||x_i||^2 / N = m`` exactly
    (up to rounding). ``m = (q* - sigma_b2) / sigma_w2`` puts the first
    pre-activations at ``q*`` (:func:`sphere_inputs`). ``c0`` in ``[-1, 1]`` and
    ``mean_square > 0`` may be traced (a ``vmap`` over them); ``dtype`` defaults
    to JAX's float type.
    """
    validate.prng_key("key", key)
    width = validate.positive_int("width", width, 2)
    validate.real_array("c0", c0, minimum=-1.0, maximum=1.0)
    validate.real_array("mean_square", mean_square, minimum=0.0, strict=True)
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    z = jax.random.normal(key, (2, width), dtype)
    a = z[0] / jnp.linalg.norm(z[0])
    b = z[1] - jnp.dot(z[1], a) * a
    b = c0 * a + jnp.sqrt(1.0 - c0 * c0) * b / jnp.linalg.norm(b)
    return jnp.stack([a, b]) * jnp.sqrt(width * mean_square)


def _model_sphere(model, dtype):
    """``(q*, sigma_w2, sigma_b2, dtype)`` of a model or model config for :func:`sphere_inputs`."""
    cfg = getattr(model, "config", model)
    if not callable(getattr(cfg, "variances", None)):
        raise TypeError(
            "model must be an MLP or ConvNet or their config (with variances()), "
            f"got {type(model).__name__}"
        )
    sw, sb = cfg.variances()
    q = getattr(cfg, "q_star", None)
    if q is None:
        q = initializers.resolve(cfg.act, "gaussian", sigma_w2=sw, sigma_b2=sb, fixed_point=True)
        q = q.q_star
    if dtype is None:
        kernel = getattr(model, "kernel", None)
        dtype = kernel[...].dtype if kernel is not None else getattr(cfg, "dtype", None)
    return float(q), sw, sb, dtype


def sample_inputs(key: Array, net: RandomNetwork, n: int, dtype=None) -> Array:
    """``n`` inputs of ``net`` on its ``q*`` sphere (:func:`sphere_inputs`): ``(n, N)``.

    The layer is ``x^l = phi(x^{l-1} W + b)``, so inputs on
    ``||x^0||^2 = N (q* - sigma_b2) / sigma_w2`` give ``h^1`` variance ``q*``,
    like every later layer, as the free-probability theory assumes.
    """
    n = validate.positive_int("n", n)
    _, _, sw, sb, q = net.resolved()
    return sphere_inputs(key, (n, net.width), q, sw, sb, batch_ndim=1, dtype=dtype)


def _ensemble(key, net, n_seeds, n_inputs, inputs, dtype):
    validate.prng_key("key", key)
    if not isinstance(net, RandomNetwork):
        raise TypeError(f"net must be a RandomNetwork, got {type(net).__name__}")
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
    depthscan.depth_list(depths, net.depth)

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
        method: ``"svd"``, ``"eigh"`` or ``"gram64"`` (see
            :func:`isometry.spectra.singular_values`).

    Returns:
        ``(n_seeds, n_inputs, K, N)`` decreasing, or for ``"moments"`` a dict
        of ``(n_seeds, n_inputs, K)`` arrays.
    """
    validate.choice(
        "statistic",
        statistic,
        ("squared_singular_values", "singular_values", "log_singular_values", "moments"),
    )
    validate.choice("method", method, ("svd", "eigh", "gram64"))
    if statistic == "moments":
        return random_network_jacobians(
            key, net, depths, n_seeds=n_seeds, n_inputs=n_inputs, inputs=inputs,
            reduce=spectra.trace_moments, dtype=dtype,
        )  # fmt: skip
    if statistic == "log_singular_values":
        layer, keys, xs = _ensemble(key, net, n_seeds, n_inputs, inputs, dtype)
        depthscan.depth_list(depths, net.depth)
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
    where = f" for {_describe(net)}"
    _check_finite(J, "Jacobian entries", where)
    opts = {"method": method, "workers": workers, "check_finite": False}
    if statistic == "singular_values":
        return spectra.singular_values(J, **opts)
    lam = spectra.squared_singular_values(J, **opts)
    _check_squares(lam, "the Jacobian" + where, J.dtype)
    return lam


def _describe(net: RandomNetwork) -> str:
    act, _, sw, sb, q = net.resolved()
    return (
        f"RandomNetwork({act.name!r}, {net.weights!r}, sigma_w2={sw:g}, sigma_b2={sb:g}, "
        f"q_star={q:g}, width={net.width}, depth={net.depth})"
    )
