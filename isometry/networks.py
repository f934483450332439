"""Flax NNX networks built as scanned layer stacks.

A deep network here is three pieces (see the design's "a deep network is a
scanned stack"):

    u  --input_map-->  x^0  --layer(params_1)--> x^1 ... --layer(params_L)--> x^L  --output_map--> y

The ``L`` hidden layers share one pure step function and their parameters
carry a leading depth axis, so the stack runs as one ``jax.lax.scan``
(compile time does not grow with depth) and every depth-wise tool
(Jacobians at every depth, signal-propagation statistics, mean-field theory)
works on the same representation.

Models:

* :class:`MLP` (:class:`MLPConfig`): fully connected, mean-field convention
  ``h^l = W^l x^{l-1} + b^l`` with ``Var(W_ij) = sigma_w2 / N`` and
  ``b_i ~ N(0, sigma_b2)``; ``x^l = phi(h^l)``, or with options

      normalization before the activation:  x^l = phi(norm(h^l))
      normalization after the activation:   x^l = norm(phi(h^l))
      residual connection:                  x^l = x^{l-1} + alpha * branch(x^{l-1})

  Any activation of :mod:`isometry.activations`; ``"prelu"`` gets a learnable
  channel-wise slope (He et al. 2015). Normalization ``"batch"`` (Ioffe &
  Szegedy 2015; running statistics in ``nnx.BatchStat``) or ``"layer"`` (Ba
  et al. 2016). Initializers of :mod:`isometry.initializers`, or the critical
  point of a chosen ``q_star`` (Pennington et al. 2017) via ``q_star=``.
* :class:`ConvNet` (:class:`ConvConfig`): a deep vanilla CNN (Xiao et al.
  2018) with delta-orthogonal (or any) initialization, circular or same
  padding, and an optional global-average-pooling head.

The scanned-stack view. ``model.stack()`` returns a :class:`Stack`:

    stack.layer(params_l, x) -> x           # one hidden layer, pure
    stack.params                             # pytree, leaves (L, ...)
    stack.input_map(u) -> x^0,  stack.output_map(x^L) -> y
    stack.step(params_l, x, probe) -> (x, aux)

``step`` is ``layer`` with instrumentation: ``probe`` (an array shaped like
the pre-activation, or ``None``) is added to the pre-activation ``h^l``, so
the gradient of a loss with respect to ``probe`` is ``dLoss/dh^l``; ``aux``
holds ``"preact"`` (``h^l``), ``"post"`` (the activation ``phi``) and, for
residual networks, ``"branch"`` (``alpha * branch``). Any user network in
this form is wrapped with :meth:`Stack.from_layer`.

``layer`` accepts a single example (``(N,)``; ``(*spatial, C)`` for
convolutions) or a batch (leading batch axes), except batch normalization in
training mode, which needs the batch.

Differentiation. Calling an :class:`MLP` whose stack is plain (no
normalization, no learnable slope; residual or not) runs the same scan, but
its JVP is written with the weight tangents taken out of the scan: ``u^l =
x^{l-1} dW^l + db^l`` for all layers in one batched contraction, then a scan
whose only matmul is ``dx W``. Forward mode, reverse mode and higher orders
all work; in reverse mode every ``dW^l`` is one batched product after the
backward scan, which makes the training step of
``benchmarks/bench_training.py`` about 10% faster on a CPU. The ``Stack``
view keeps the plain scan.

``nnx.split(model)`` gives ``(graphdef, state)`` for ``jit``, ``vmap`` over
seeds and training; ``model.train()`` / ``model.eval()`` switch batch
normalization between batch statistics and running statistics.

Example:
    >>> from flax import nnx
    >>> from isometry import networks
    >>> cfg = networks.MLPConfig(depth=20, width=256, activation="tanh", q_star=0.5)
    >>> model = networks.MLP(cfg, rngs=nnx.Rngs(0))
    >>> s = model.stack()
    >>> s.params["kernel"].shape
    (20, 256, 256)

References:
    Poole et al. 2016; Schoenholz et al. 2017 (mean-field convention).
    Pennington, Schoenholz & Ganguli 2017 (critical point for a chosen q*).
    Xiao, Bahri, Sohl-Dickstein, Schoenholz & Pennington 2018, "Dynamical
    isometry and a mean field theory of CNNs" (delta-orthogonal kernels).
    He, Zhang, Ren & Sun 2015 (PReLU, He initialization).
    Ioffe & Szegedy 2015 (batch normalization); Ba, Kiros & Hinton 2016
    (layer normalization); He et al. 2016 (residual connections).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from isometry import activations as _activations
from isometry import initializers as _initializers
from isometry import validate

__all__ = [
    "BRANCH_SCALES",
    "MLP",
    "NORMS",
    "NORM_POSITIONS",
    "PADDINGS",
    "TRANSFORMER_NORMS",
    "ConvConfig",
    "ConvNet",
    "MLPConfig",
    "Stack",
    "StackedBatchStat",
    "StackedParam",
    "Transformer",
    "TransformerConfig",
    "attention",
    "branch_scale",
    "check_branch_scale",
    "conv",
    "transformer_params",
]

Array = jax.Array

NORMS = ("none", "batch", "layer")
NORM_POSITIONS = ("pre", "post")
PADDINGS = ("circular", "same")
BRANCH_SCALES = ("1/sqrt(L)",)


def check_branch_scale(name: str, value) -> None:
    """``value`` is a residual branch scale: a finite number > 0 or a name in ``BRANCH_SCALES``."""
    if isinstance(value, str):
        validate.choice(name, value, BRANCH_SCALES)
        return
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number > 0 or one of {BRANCH_SCALES}, got {value!r}")
    validate.real_array(name, value, minimum=0.0, strict=True)


def branch_scale(value, depth: int) -> float:
    """The residual branch scale ``alpha`` as a number.

    ``"1/sqrt(L)"`` gives ``alpha = depth ** -0.5``, the depth scaling under which
    the residual stream's variance and each block's update stay O(1) as
    ``L -> infinity`` (Hayou et al. 2021; Bordelon et al. 2023; Yang et al. 2023,
    depth-muP); a number is returned as a float.
    """
    check_branch_scale("residual_scale", value)
    validate.positive_int("depth", depth)
    return depth**-0.5 if isinstance(value, str) else float(value)


# --------------------------------------------------------------------------- #
# The scanned-stack representation.
# --------------------------------------------------------------------------- #


class StackedParam(nnx.Param):
    """A parameter of the scanned stack: leading axis ``L``, layer ``l``'s slice ``[l]``.

    The type declares the layout, so tools that need per-layer numbers
    (per-layer gradient norms in :mod:`isometry.training`, signal statistics)
    select these with ``nnx.state(model, StackedParam)`` instead of guessing
    from names or shapes. Everything else (input map, readout) is a plain
    ``nnx.Param``. Optimizers see it as an ``nnx.Param``.
    """


class StackedBatchStat(nnx.BatchStat):
    """Batch-norm running statistics of the scanned stack, leading axis ``L``."""


def _identity(x):
    return x


@dataclasses.dataclass(frozen=True)
class Stack:
    """A network as ``output_map . (layer scanned over depth) . input_map``.

    Attributes:
        step: ``step(params_l, x, probe) -> (x_next, aux)``; ``probe`` (or
            ``None``) is added to the pre-activation; ``aux`` is a dict of
            per-layer intermediates (``"preact"``, ``"post"``, ``"branch"``;
            any subset).
        params: the stacked layer parameters, every leaf with leading axis ``L``.
        input_map: ``u -> x^0`` (closes over its own parameters).
        output_map: ``x^L -> y``.
        weights: the keys of ``params`` that hold the layers' weight
            matrices (``W^l``, convolution kernels), e.g. ``("kernel",)``;
            ``()`` (the default) means every leaf of ``params`` counts as
            weights. Per-layer weight-gradient norms
            (:func:`isometry.signal.measure`) sum over these.
    """

    step: Callable[[Any, Array, Array | None], tuple[Array, dict]]
    params: Any
    input_map: Callable[[Array], Array] = _identity
    output_map: Callable[[Array], Array] = _identity
    weights: tuple[str, ...] = ()

    @classmethod
    def from_layer(
        cls,
        layer: Callable[[Any, Array], Array],
        params: Any,
        input_map: Callable[[Array], Array] = _identity,
        output_map: Callable[[Array], Array] = _identity,
    ) -> Stack:
        """Wrap any ``layer(params_l, x) -> x`` (parameters stacked on axis 0).

        With no visible pre-activation, the probe is added to the layer's
        output, so "pre-activation" statistics are those of ``x^l``.
        """
        if not callable(layer):
            raise TypeError(f"layer must be callable, got {type(layer).__name__}")
        return cls(functools.partial(_probe_output, layer), params, input_map, output_map)

    @property
    def depth(self) -> int:
        """``L``, the leading axis of the stacked parameters."""
        leaves = jax.tree.leaves(self.params)
        if not leaves:
            raise ValueError("Stack.params has no array leaves, so no depth")
        return int(jnp.shape(leaves[0])[0])

    def weight_params(self, params=None):
        """The weight part of ``params`` (default: the stack's): the leaves named in
        :attr:`weights`, or all of ``params`` when none are declared."""
        params = self.params if params is None else params
        if not self.weights:
            return params
        missing = [k for k in self.weights if k not in params]
        if missing:
            raise ValueError(f"Stack.weights names {missing}, not among the params {list(params)}")
        return {k: params[k] for k in self.weights}

    def layer(self, params_l, x: Array) -> Array:
        """One hidden layer ``x^{l-1} -> x^l`` (pure; scan it over ``params``)."""
        return self.step(params_l, x, None)[0]

    def hidden(self, x0: Array) -> Array:
        """``x^L`` from the stack's input ``x^0`` (one ``lax.scan``)."""
        return lax.scan(lambda x, p: (self.layer(p, x), None), x0, self.params)[0]

    def hidden_states(self, x0: Array) -> Array:
        """``x^1..x^L`` stacked, shape ``(L, *x0.shape)``."""
        return lax.scan(lambda x, p: (self.layer(p, x),) * 2, x0, self.params)[1]

    def __call__(self, u: Array) -> Array:
        """The whole network: ``output_map(hidden(input_map(u)))``."""
        return self.output_map(self.hidden(self.input_map(u)))


def _probe_output(layer, params_l, x, probe):
    y = layer(params_l, x)
    return (y if probe is None else y + probe), {}


# --------------------------------------------------------------------------- #
# Configuration shared by both models.
# --------------------------------------------------------------------------- #


def _activation_params(value) -> tuple[tuple[str, float], ...]:
    if isinstance(value, Mapping):
        value = value.items()
    try:
        return tuple(sorted((str(k), float(v)) for k, v in value))
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"activation_params must be a mapping or (name, value) pairs, got {value!r}"
        ) from err


def _resolve_init(
    owner: str, cfg, *, conv: bool
) -> tuple[_initializers.Initializer, _initializers.Variances]:
    """Check the initialization options; return ``(initializer, variances)``.

    ``init="critical"`` is Gaussian (dense) or delta-orthogonal (convolution)
    weights at the critical point of ``q_star``; the variances come from
    :func:`isometry.initializers.resolve` (the fans of the hidden layer's kernel).
    """
    name = cfg.init
    if isinstance(name, str) and name.strip().lower() == "critical":
        name = "delta_orthogonal" if conv else "gaussian"
    shape = cfg.kernel_shape if conv else (cfg.width, cfg.width)
    fan_in, fan_out = _initializers.fans(shape)
    try:
        v = _initializers.resolve(
            cfg.act, name, q_star=cfg.q_star, sigma_w2=cfg.sigma_w2, sigma_b2=cfg.sigma_b2,
            fan_in=fan_in, fan_out=fan_out,
        )  # fmt: skip
    except ValueError as err:
        raise ValueError(f"{owner}: {err}") from None
    return _initializers.get(name).at(v.sigma_w2), v


DTYPES = ("float32", "float64", "bfloat16", "float16")


def _check_dtype(cfg) -> None:
    """Normalize ``cfg.dtype`` to its name, one of :data:`DTYPES`."""
    dtype = str(jnp.dtype(cfg.dtype)) if _is_dtype(cfg.dtype) else cfg.dtype
    object.__setattr__(cfg, "dtype", validate.choice("dtype", dtype, DTYPES))


def _check_common(owner: str, cfg) -> None:
    validate.positive_int("depth", cfg.depth)
    _check_dtype(cfg)
    for name in ("in_dim", "out_dim", "in_channels"):
        if getattr(cfg, name, None) is not None:
            validate.positive_int(name, getattr(cfg, name))
    if not isinstance(cfg.bias, bool):
        raise TypeError(f"bias must be True or False, got {cfg.bias!r}")
    _activations.get(cfg.activation, **dict(cfg.activation_params))  # validates
    _, v = _resolve_init(owner, cfg, conv=isinstance(cfg, ConvConfig))
    sb = v.sigma_b2
    if not cfg.bias and sb > 0:
        raise ValueError(
            f"{owner}: bias=False is incompatible with sigma_b2 = {sb:g} > 0 "
            "(a critical q_star may need a bias: pass bias=True)"
        )


def _act_of(cfg) -> _activations.Activation:
    return _activations.get(cfg.activation, **dict(cfg.activation_params))


def _stacked(init, key, depth, shape, dtype):
    """``depth`` kernels of ``shape`` from ``init``, keys ``split(key, depth)``: ``(L, *shape)``."""
    keys = jax.random.split(key, depth)
    return jax.vmap(lambda k: _initializers.sample(init, k, shape, dtype=dtype))(keys)


def _lecun(key, shape, dtype) -> nnx.Param:
    """An input map or readout: LeCun normal, ``Var = 1 / fan_in``."""
    return nnx.Param(_initializers.sample("lecun_normal", key, shape, dtype=dtype))


def _biases(cfg, rngs, shape, sigma_b2, dtype) -> StackedParam | None:
    """The stack's biases ``b ~ N(0, sigma_b2)``; ``None`` (and no key drawn) without biases."""
    if not cfg.bias:
        return None
    return StackedParam(_initializers.sample_bias(rngs.params(), shape, sigma_b2, dtype))


def _is_dtype(x) -> bool:
    try:
        return x is not None and jnp.issubdtype(jnp.dtype(x), jnp.floating)
    except TypeError:
        return False


def _dtype(cfg, dtype):
    """The parameters' dtype: the constructor's ``dtype``, else the config's (default float32).

    float64 needs ``jax_enable_x64`` (jax would silently make float32 arrays).
    """
    if dtype is not None and not _is_dtype(dtype):
        raise TypeError(f"dtype must be a floating dtype ({', '.join(DTYPES)}), got {dtype!r}")
    dt = jnp.dtype(cfg.dtype if dtype is None else dtype)
    if dt == jnp.float64 and not jax.config.read("jax_enable_x64"):
        raise ValueError(
            "dtype float64 needs jax.config.update('jax_enable_x64', True) first "
            "(or jax.enable_x64() around the model's use)"
        )
    return dt


# --------------------------------------------------------------------------- #
# MLP.
# --------------------------------------------------------------------------- #


class _BranchScaled:
    """Configs with ``residual_scale`` and ``depth``: the branch scale as a number."""

    @property
    def branch_scale(self) -> float:
        """``alpha`` as a number (``"1/sqrt(L)"`` at this depth; see :func:`branch_scale`)."""
        return branch_scale(self.residual_scale, self.depth)


@dataclasses.dataclass(frozen=True)
class MLPConfig(_BranchScaled):
    """A fully connected network: input map, ``depth`` square hidden layers, readout.

    Attributes:
        depth: ``L``, the number of hidden layers in the scanned stack (>= 1).
        width: ``N``, the hidden width.
        in_dim: input dimension; ``None`` or ``width`` means no input map
            (``x^0 = u``); otherwise a linear map with ``Var = 1/in_dim``
            (LeCun), which keeps the mean squared entry.
        out_dim: readout dimension; ``None`` means ``y = x^L``; otherwise a
            linear readout with ``Var = 1/width`` and zero bias.
        activation: a catalog name or an :class:`~isometry.activations.Activation`;
            ``"prelu"`` has a learnable channel-wise slope, initialized at its
            ``negative_slope`` parameter.
        activation_params: parameters of the activation, e.g.
            ``{"negative_slope": 0.1}``.
        init: an initializer name (``gaussian``, ``orthogonal``, ``xavier_normal``,
            ``he_normal``, ``lecun_normal``, ... see :mod:`isometry.initializers`),
            or ``"critical"`` (Gaussian weights at the critical point of ``q_star``).
        sigma_w2: weight variance for ``gaussian``/``orthogonal`` (default 1).
        sigma_b2: bias variance (default 0).
        q_star: critical initialization: ``(sigma_w2, sigma_b2) =
            meanfield.critical_point(activation, q_star)``.
        bias: use biases.
        norm: ``"none"``, ``"batch"`` or ``"layer"``.
        norm_position: ``"pre"`` (``phi(norm(h))``) or ``"post"`` (``norm(phi(h))``).
        residual: ``x^l = x^{l-1} + residual_scale * branch(x^{l-1})``.
        residual_scale: the branch scale ``alpha``: a number > 0, or
            ``"1/sqrt(L)"`` (``alpha = 1/sqrt(depth)``; Hayou et al. 2021,
            Bordelon et al. 2023, Yang et al. 2023).
        norm_eps: added to the variance in normalization.
        momentum: running-statistics momentum of batch normalization.
        dtype: the parameters' dtype, ``"float32"`` (default, whatever
            ``jax_enable_x64`` says) or ``"float64"`` (needs ``jax_enable_x64``),
            ``"bfloat16"``, ``"float16"``; the model's ``dtype=`` argument overrides it.

    :meth:`variances` gives the hidden layers' effective ``(sigma_w2,
    sigma_b2)`` (resolved from ``init``, ``q_star`` or the fans); inputs on the
    network's ``q*`` sphere come from
    ``isometry.jacobian.sphere_inputs(key, shape, model=cfg)``.
    """

    depth: int
    width: int
    in_dim: int | None = None
    out_dim: int | None = None
    activation: str | _activations.Activation = "tanh"
    activation_params: Any = ()
    init: str = "gaussian"
    sigma_w2: float | None = None
    sigma_b2: float | None = None
    q_star: float | None = None
    bias: bool = True
    norm: str = "none"
    norm_position: str = "pre"
    residual: bool = False
    residual_scale: float | str = 1.0
    norm_eps: float = 1e-5
    momentum: float = 0.99
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "activation_params", _activation_params(self.activation_params))
        validate.positive_int("width", self.width)
        validate.choice("norm", self.norm, NORMS)
        validate.choice("norm_position", self.norm_position, NORM_POSITIONS)
        if not isinstance(self.residual, bool):
            raise TypeError(f"residual must be True or False, got {self.residual!r}")
        check_branch_scale("residual_scale", self.residual_scale)
        validate.real_array("norm_eps", self.norm_eps, minimum=0.0)
        validate.real_array("momentum", self.momentum, minimum=0.0, maximum=1.0)
        if _initializers.get(
            "gaussian" if str(self.init).lower() == "critical" else self.init
        ).name == ("delta_orthogonal"):
            raise ValueError(
                "MLPConfig: init 'delta_orthogonal' is for convolution kernels; "
                "use 'orthogonal' for dense layers (or ConvNet)"
            )
        _check_common("MLPConfig", self)

    @property
    def act(self) -> _activations.Activation:
        """The activation (at its initial parameters, for a learnable PReLU)."""
        return _act_of(self)

    @property
    def learnable_slope(self) -> bool:
        return self.act.name == "prelu"

    def initializer(self) -> _initializers.Initializer:
        """The hidden layers' weight initializer."""
        return _resolve_init("MLPConfig", self, conv=False)[0]

    def variances(self) -> tuple[float, float]:
        """The effective ``(sigma_w2, sigma_b2)`` of the hidden layers (mean-field convention).

        ``Var W_ij = sigma_w2 / width``, ``Var b_i = sigma_b2`` (0 without
        biases): from ``q_star`` (the critical point), ``sigma_w2``/``sigma_b2``,
        or the fans of a fan-based ``init`` (He: 2, Xavier: 1 for square layers).
        """
        _, v = _resolve_init("MLPConfig", self, conv=False)
        return v.sigma_w2, (v.sigma_b2 if self.bias else 0.0)


def _normalize(kind, v, p, train, eps):
    """Batch or layer normalization of ``v`` (channels last) with gain/offset.

    Layer: ``(v - mean_i v) / sqrt(var_i v + eps)`` over the channel axis.
    Batch: the same over the batch (and spatial) axes with batch statistics
    in training, running statistics in evaluation. Returns ``(out, stats)``.
    """
    if kind == "layer":
        mu = jnp.mean(v, axis=-1, keepdims=True)
        var = jnp.var(v, axis=-1, keepdims=True)
        stats = None
    elif train:
        if v.ndim < 2:
            raise ValueError(
                "batch normalization in training mode needs a batch axis (x of shape (B, N)); "
                "use model.eval() for per-example functions"
            )
        axes = tuple(range(v.ndim - 1))
        mu, var = jnp.mean(v, axis=axes), jnp.var(v, axis=axes)
        stats = (mu, var)
    else:
        mu, var = p["mean"], p["var"]
        stats = None
    return (v - mu) * lax.rsqrt(var + eps) * p["scale"] + p["offset"], stats


def _phi(act, p, z):
    if "slope" in p:  # learnable PReLU
        return jnp.where(z > 0, z, p["slope"] * z)
    return act.phi(z)


def _mlp_step(cfg: MLPConfig, act, train: bool, p, x, probe):
    """One hidden layer; see the module docstring for the equations."""
    h = x @ p["kernel"]
    if "bias" in p:
        h = h + p["bias"]
    if probe is not None:
        h = h + probe
    aux = {"preact": h}
    z = h
    if cfg.norm != "none" and cfg.norm_position == "pre":
        z, stats = _normalize(cfg.norm, z, p, train, cfg.norm_eps)
    a = _phi(act, p, z)
    aux["post"] = a
    if cfg.norm != "none" and cfg.norm_position == "post":
        a, stats = _normalize(cfg.norm, a, p, train, cfg.norm_eps)
    if cfg.norm == "batch" and train:
        aux["batch_mean"], aux["batch_var"] = stats
    if cfg.residual:
        branch = cfg.branch_scale * a
        aux["branch"] = branch
        return x + branch, aux
    return a, aux


def _scan_collect(step, params, x0):
    return lax.scan(lambda x, p: step(p, x, None), x0, params)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _dense_stack(step, phi, alpha, x0, params):
    """``x^L`` of a plain dense stack ``x^l = phi(x^{l-1} W^l + b^l)`` (with ``alpha``:
    ``x^{l-1} + alpha phi(...)``): the generic scan of ``step``; only its JVP differs.

    The JVP (:func:`_dense_stack_jvp`) takes the weight tangents out of the
    scan, so reverse mode computes every ``dW^l = x^{l-1 T} g^l`` in one
    batched contraction after the backward scan instead of one small matmul
    per layer inside it (measured in ``benchmarks/bench_training.py``).
    """
    return _scan_collect(step, params, x0)[0]


def _is_zero(t) -> bool:
    return isinstance(t, jax.custom_derivatives.SymbolicZero)


def _weight_tangents(xs, params, dparams):
    """``u^l = x^{l-1} dW^l + db^l`` for every layer at once (``None`` if both are zero)."""
    u = None
    if not _is_zero(dparams["kernel"]):
        u = jnp.einsum("l...i,lij->l...j", xs, dparams["kernel"])
    if "bias" in params and not _is_zero(dparams["bias"]):
        db = dparams["bias"]  # (L, N), broadcast over the batch axes of x
        db = db.reshape(db.shape[:1] + (1,) * (xs.ndim - 2) + db.shape[1:])
        u = db if u is None else u + db
    return u


def _dense_stack_jvp(step, phi, alpha, primals, tangents):
    """The forward scan of ``step``, saving ``x^{l-1}`` and ``phi'(h^l)``; the tangent
    ``dx^l = D^l (dx^{l-1} W^l + u^l)`` (plus ``dx^{l-1}`` for residual stacks) is a
    second scan whose only matmul is ``dx W``; ``u`` comes from :func:`_weight_tangents`."""
    (x0, params), (dx0, dparams) = primals, tangents

    def forward(x, p):
        x_next, aux = step(p, x, None)
        h = aux["preact"]
        return x_next, (x, jax.jvp(phi, (h,), (jnp.ones_like(h),))[1])

    def tangent(dx, inputs):
        w, d, u = inputs
        da = d * (dx @ w if u is None else dx @ w + u)
        return (da if alpha is None else dx + alpha * da), None

    xL, (xs, ds) = lax.scan(forward, x0, params)
    u = _weight_tangents(xs, params, dparams)
    dx0 = jnp.zeros_like(x0) if _is_zero(dx0) else dx0
    return xL, lax.scan(tangent, dx0, (params["kernel"], ds, u))[0]


_dense_stack.defjvp(_dense_stack_jvp, symbolic_zeros=True)


def _plain_dense(cfg: MLPConfig) -> bool:
    """The stack is ``phi(x W + b)`` (optionally residual): no normalization, fixed slope."""
    return cfg.norm == "none" and not cfg.learnable_slope


class MLP(nnx.Module):
    """A deep fully connected network as a scanned stack (see the module docstring).

    Shapes: input ``(..., in_dim)``, output ``(..., out_dim)`` (or ``(..., width)``).
    Stacked parameters (:class:`StackedParam`) carry a leading depth axis ``L``:
    ``kernel (L, N, N)``, ``bias (L, N)``, ``slope (L, N)`` (PReLU),
    ``norm_scale, norm_offset (L, N)``; batch norm's running statistics
    ``running_mean, running_var (L, N)`` are :class:`StackedBatchStat`. The
    input map ``embed`` and the readout are plain ``nnx.Param``.

    Args:
        config: an :class:`MLPConfig`.
        rngs: ``nnx.Rngs`` (the ``params`` stream is used).
        dtype: parameter dtype; default the config's ``dtype`` (float32).
    """

    def __init__(self, config: MLPConfig, *, rngs: nnx.Rngs, dtype=None):
        if not isinstance(config, MLPConfig):
            raise TypeError(f"config must be an MLPConfig, got {type(config).__name__}")
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs must be an nnx.Rngs such as nnx.Rngs(0), got {rngs!r}")
        cfg = config
        dtype = _dtype(cfg, dtype)
        self.config = cfg
        self.use_running_average = False
        L, N = cfg.depth, cfg.width
        init = cfg.initializer()
        _, sb = cfg.variances()
        self.kernel = StackedParam(_stacked(init, rngs.params(), L, (N, N), dtype))
        self.bias = _biases(cfg, rngs, (L, N), sb, dtype)
        self.slope = (
            StackedParam(jnp.full((L, N), cfg.act.kwargs["negative_slope"], dtype))
            if cfg.learnable_slope
            else None
        )
        if cfg.norm != "none":
            self.norm_scale = StackedParam(jnp.ones((L, N), dtype))
            self.norm_offset = StackedParam(jnp.zeros((L, N), dtype))
        else:
            self.norm_scale = self.norm_offset = None
        if cfg.norm == "batch":
            self.running_mean = StackedBatchStat(jnp.zeros((L, N), dtype))
            self.running_var = StackedBatchStat(jnp.ones((L, N), dtype))
        else:
            self.running_mean = self.running_var = None
        if cfg.in_dim is not None and cfg.in_dim != N:
            self.embed = _lecun(rngs.params(), (cfg.in_dim, N), dtype)
        else:
            self.embed = None
        if cfg.out_dim is not None:
            self.readout = _lecun(rngs.params(), (N, cfg.out_dim), dtype)
            self.readout_bias = nnx.Param(jnp.zeros((cfg.out_dim,), dtype))
        else:
            self.readout = self.readout_bias = None

    # -- the pure view ------------------------------------------------------ #

    def stacked_params(self) -> dict[str, Array]:
        """The hidden layers' parameters as a dict of arrays with leading axis ``L``."""
        p = {"kernel": self.kernel[...]}
        for name, var in (
            ("bias", self.bias),
            ("slope", self.slope),
            ("scale", self.norm_scale),
            ("offset", self.norm_offset),
            ("mean", self.running_mean),
            ("var", self.running_var),
        ):
            if var is not None:
                p[name] = var[...]
        return p

    def input_map(self, u: Array) -> Array:
        """``x^0 = u W_in`` (or ``u`` if ``in_dim`` is ``None``/``width``), in the model's dtype."""
        embed = None if self.embed is None else self.embed[...]
        return _matmul(embed, self.config.width, self.kernel.dtype, u)

    def output_map(self, x: Array) -> Array:
        """``y = x^L W_out + b_out`` (or ``x^L`` when ``out_dim`` is ``None``)."""
        if self.readout is None:
            return x
        return x @ self.readout[...] + self.readout_bias[...]

    def stack(self) -> Stack:
        """The pure scanned-stack view at the current parameters and mode."""
        train = not self.use_running_average
        step = functools.partial(_mlp_step, self.config, self.config.act, train)
        embed = None if self.embed is None else self.embed[...]
        readout = None if self.readout is None else (self.readout[...], self.readout_bias[...])
        return Stack(
            step,
            self.stacked_params(),
            functools.partial(_matmul, embed, self.config.width, self.kernel.dtype),
            _identity if readout is None else functools.partial(_affine, *readout),
            weights=("kernel",),
        )

    def __call__(self, u: Array) -> Array:
        """Forward pass; in training mode batch norm updates its running statistics."""
        _check_input("u", u, self.config.in_dim or self.config.width)
        s, cfg = self.stack(), self.config
        if _plain_dense(cfg):
            alpha = cfg.branch_scale if cfg.residual else None
            return s.output_map(_dense_stack(s.step, cfg.act.phi, alpha, s.input_map(u), s.params))
        xL, aux = _scan_collect(s.step, s.params, s.input_map(u))
        if self.config.norm == "batch" and not self.use_running_average:
            m = self.config.momentum
            self.running_mean[...] = m * self.running_mean[...] + (1 - m) * aux["batch_mean"]
            self.running_var[...] = m * self.running_var[...] + (1 - m) * aux["batch_var"]
        return s.output_map(xL)


def _matmul(w, width, dtype, u):
    """The input map ``u W`` (``u`` when ``w`` is ``None``) in the model's ``dtype``; the
    input's last axis is checked."""
    _check_input("u", u, width if w is None else w.shape[0])
    u = jnp.asarray(u).astype(dtype)
    return u if w is None else u @ w


def _affine(w, b, x):
    return x @ w + b


def _check_input(name, u, last):
    if jnp.ndim(u) < 1 or jnp.shape(u)[-1] != last:
        raise ValueError(f"{name} must have last axis {last}, got shape {jnp.shape(u)}")


# --------------------------------------------------------------------------- #
# ConvNet.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class ConvConfig(_BranchScaled):
    """A deep vanilla CNN (Xiao et al. 2018): ``depth`` convolutions ``C -> C``.

    ``h^l = conv(x^{l-1}, K^l) + b^l``, ``x^l = phi(h^l)``, kernels
    ``K^l (*kernel, C, C)`` with ``sigma_w2 = fan_in Var(K)`` (``fan_in = C k^d``);
    delta-orthogonal kernels put ``sqrt(sigma_w2)`` times a Haar-orthogonal
    ``C x C`` matrix at the centre tap, zeros elsewhere.

    Attributes:
        depth: ``L``, the number of convolutions in the stack.
        channels: ``C``, the hidden channel count.
        kernel_size: spatial kernel extent (the same along every axis).
        spatial_dims: 1, 2 or 3 spatial axes (data ``(B, *spatial, C)``).
        in_channels: input channels; ``None`` or ``channels`` means no input
            map, otherwise one linear convolution ``in_channels -> channels``
            (delta-orthogonal with ``sigma_w2 = 1`` when ``init`` is
            delta-orthogonal, else LeCun).
        out_dim: with ``pool``, a dense readout to ``out_dim``.
        pool: global average pooling head (``(B, *spatial, C) -> (B, C)``).
        padding: ``"circular"`` (periodic) or ``"same"`` (zeros).
        activation, activation_params, init, sigma_w2, sigma_b2, q_star, bias,
            dtype: as in :class:`MLPConfig`; ``init`` defaults to ``delta_orthogonal``
            and ``"critical"`` means delta-orthogonal at the critical point of
            ``q_star``.
        residual, residual_scale: ``x^l = x^{l-1} + alpha phi(h^l)`` with
            ``alpha`` a number > 0 or ``"1/sqrt(L)"``, as in :class:`MLPConfig`.
    """

    depth: int
    channels: int
    kernel_size: int = 3
    spatial_dims: int = 2
    in_channels: int | None = None
    out_dim: int | None = None
    pool: bool = False
    padding: str = "circular"
    activation: str | _activations.Activation = "tanh"
    activation_params: Any = ()
    init: str = "delta_orthogonal"
    sigma_w2: float | None = None
    sigma_b2: float | None = None
    q_star: float | None = None
    bias: bool = True
    residual: bool = False
    residual_scale: float | str = 1.0
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "activation_params", _activation_params(self.activation_params))
        validate.positive_int("channels", self.channels)
        if not isinstance(self.residual, bool):
            raise TypeError(f"residual must be True or False, got {self.residual!r}")
        check_branch_scale("residual_scale", self.residual_scale)
        validate.positive_int("kernel_size", self.kernel_size)
        if self.spatial_dims not in (1, 2, 3) or isinstance(self.spatial_dims, bool):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {self.spatial_dims!r}")
        validate.choice("padding", self.padding, PADDINGS)
        if not isinstance(self.pool, bool):
            raise TypeError(f"pool must be True or False, got {self.pool!r}")
        if self.out_dim is not None and not self.pool:
            raise ValueError("ConvConfig: out_dim needs the pooling head (pool=True)")
        _check_common("ConvConfig", self)
        if self.in_channels is not None and self.in_channels > self.channels:
            if self.initializer().name == "delta_orthogonal":
                raise ValueError(
                    "ConvConfig: delta_orthogonal needs in_channels <= channels (an orthogonal "
                    f"centre tap), got in_channels={self.in_channels}, channels={self.channels}"
                )

    @property
    def act(self) -> _activations.Activation:
        return _act_of(self)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return (self.kernel_size,) * self.spatial_dims + (self.channels, self.channels)

    def initializer(self) -> _initializers.Initializer:
        return _resolve_init("ConvConfig", self, conv=True)[0]

    def variances(self) -> tuple[float, float]:
        """Effective ``(sigma_w2, sigma_b2)``: ``sigma_w2 = fan_in Var(K)`` (Xiao et al. 2018)."""
        _, v = _resolve_init("ConvConfig", self, conv=True)
        return v.sigma_w2, (v.sigma_b2 if self.bias else 0.0)


_SPATIAL = {1: "W", 2: "HW", 3: "DHW"}


def conv(x: Array, kernel: Array, padding: str = "circular") -> Array:
    """Stride-1 convolution of ``x (B, *spatial, C_in)`` (or ``(*spatial, C_in)``)
    with ``kernel (*k, C_in, C_out)``, circular (periodic) or same (zero) padding, in the
    promoted dtype of the two."""
    d = kernel.ndim - 2
    dt = jnp.result_type(x, kernel)  # promoted as a matmul is (lax.conv wants one dtype)
    x, kernel = jnp.asarray(x).astype(dt), kernel.astype(dt)
    single = x.ndim == d + 1
    if single:
        x = x[None]
    lead = x.shape[: x.ndim - d - 1]
    x = x.reshape((-1, *x.shape[-d - 1 :]))
    if padding == "circular":
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in kernel.shape[:d]] + [(0, 0)]
        x = jnp.pad(x, pads, mode="wrap")
        pad = "VALID"
    else:
        pad = "SAME"
    sp = _SPATIAL[d]
    dn = lax.conv_dimension_numbers(x.shape, kernel.shape, (f"N{sp}C", f"{sp}IO", f"N{sp}C"))
    y = lax.conv_general_dilated(x, kernel, (1,) * d, pad, dimension_numbers=dn)
    y = y.reshape((*lead, *y.shape[1:]))
    return y[0] if single else y


def _conv_step(cfg: ConvConfig, act, p, x, probe):
    h = conv(x, p["kernel"], cfg.padding)
    if "bias" in p:
        h = h + p["bias"]
    if probe is not None:
        h = h + probe
    a = act.phi(h)
    aux = {"preact": h, "post": a}
    if cfg.residual:
        aux["branch"] = cfg.branch_scale * a
        return x + aux["branch"], aux
    return a, aux


def _pool_head(cfg, readout, x):
    d = cfg.spatial_dims
    y = jnp.mean(x, axis=tuple(range(x.ndim - d - 1, x.ndim - 1)))
    if readout is not None:
        y = y @ readout[0] + readout[1]
    return y


class ConvNet(nnx.Module):
    """A deep vanilla CNN as a scanned stack (Xiao et al. 2018).

    Shapes: input ``(B, *spatial, in_channels)``; output ``(B, *spatial, C)``
    without the pooling head, ``(B, C)`` or ``(B, out_dim)`` with it.
    Parameters: ``kernel (L, *k, C, C)``, ``bias (L, C)``.
    """

    def __init__(self, config: ConvConfig, *, rngs: nnx.Rngs, dtype=None):
        if not isinstance(config, ConvConfig):
            raise TypeError(f"config must be a ConvConfig, got {type(config).__name__}")
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs must be an nnx.Rngs such as nnx.Rngs(0), got {rngs!r}")
        cfg = config
        dtype = _dtype(cfg, dtype)
        self.config = cfg
        L, C = cfg.depth, cfg.channels
        init = cfg.initializer()
        _, sb = cfg.variances()
        self.kernel = StackedParam(_stacked(init, rngs.params(), L, cfg.kernel_shape, dtype))
        self.bias = _biases(cfg, rngs, (L, C), sb, dtype)
        if cfg.in_channels is not None and cfg.in_channels != C:
            shape = (cfg.kernel_size,) * cfg.spatial_dims + (cfg.in_channels, C)
            first = (
                _initializers.get("delta_orthogonal", sigma_w2=1.0)
                if init.name == "delta_orthogonal"
                else _initializers.get("lecun_normal")
            )
            self.embed = nnx.Param(_initializers.sample(first, rngs.params(), shape, dtype=dtype))
        else:
            self.embed = None
        if cfg.out_dim is not None:
            self.readout = _lecun(rngs.params(), (C, cfg.out_dim), dtype)
            self.readout_bias = nnx.Param(jnp.zeros((cfg.out_dim,), dtype))
        else:
            self.readout = self.readout_bias = None

    def stacked_params(self) -> dict[str, Array]:
        p = {"kernel": self.kernel[...]}
        if self.bias is not None:
            p["bias"] = self.bias[...]
        return p

    def input_map(self, u: Array) -> Array:
        embed = None if self.embed is None else self.embed[...]
        return _conv_in(self.config.padding, embed, self.kernel.dtype, u)

    def output_map(self, x: Array) -> Array:
        if not self.config.pool:
            return x
        readout = None if self.readout is None else (self.readout[...], self.readout_bias[...])
        return _pool_head(self.config, readout, x)

    def stack(self) -> Stack:
        cfg = self.config
        embed = None if self.embed is None else self.embed[...]
        readout = None if self.readout is None else (self.readout[...], self.readout_bias[...])
        return Stack(
            functools.partial(_conv_step, cfg, cfg.act),
            self.stacked_params(),
            functools.partial(_conv_in, cfg.padding, embed, self.kernel.dtype),
            functools.partial(_pool_head, cfg, readout) if cfg.pool else _identity,
            weights=("kernel",),
        )

    def __call__(self, u: Array) -> Array:
        c = self.config
        if jnp.ndim(u) < c.spatial_dims + 1:
            raise ValueError(
                f"u must have shape (B, *spatial, C) with {c.spatial_dims} spatial axes, "
                f"got {jnp.shape(u)}"
            )
        _check_input("u", u, c.in_channels or c.channels)
        return self.stack()(u)


def _conv_in(padding, kernel, dtype, u):
    """The input map in the model's ``dtype``: ``u`` itself, or one convolution."""
    u = jnp.asarray(u).astype(dtype)
    return u if kernel is None else conv(u, kernel, padding)


# --------------------------------------------------------------------------- #
# Transformer encoder.
# --------------------------------------------------------------------------- #

TRANSFORMER_NORMS = ("pre", "post", "none")
POOLS = ("mean", "last", "none")


@dataclasses.dataclass(frozen=True)
class TransformerConfig(_BranchScaled):
    """A transformer encoder: token embedding, ``depth`` blocks, readout.

    A block maps the tokens ``x (T, N)`` (one sequence; leading batch axes
    allowed) through two residual sublayers, each ``x -> x + alpha f(x)``
    with the layer norm ``LN`` (over the ``N`` features of each token, unit
    gain, zero offset at initialization) placed

        "pre":   x + alpha f(LN(x))       (Xiong et al. 2020; GPT-2)
        "post":  LN(x + alpha f(x))       (Vaswani et al. 2017)
        "none":  x + alpha f(x)

    and, without the residual path (``residual=False``), ``f(LN(x))``,
    ``LN(f(x))`` or ``f(x)``. The sublayers are multi-head self-attention

        MHSA(z) = concat_h softmax(Q_h K_h^T / sqrt(d) + mask) V_h  W_O,
        Q_h = z W_Q^h, K_h = z W_K^h, V_h = z W_V^h,   d = N / heads

    (``mask``: ``-inf`` above the diagonal when ``causal``) and the MLP
    ``MLP(z) = phi(z W_1 + b_1) W_2``. The probe of :class:`Stack` is added to
    the MLP pre-activation ``h = z W_1 + b_1`` (``aux["preact"]``).

    Attributes:
        depth: ``L``, the number of blocks (>= 1).
        width: ``N``, the model (residual-stream) width.
        heads: attention heads; must divide ``width``.
        mlp_width: ``M``, the MLP hidden width (default ``width``).
        in_dim: patch dimension of real-valued tokens ``u (T, in_dim)``
            (linear embedding, LeCun, ``Var = 1/in_dim``); ``None`` with
            ``vocab_size`` for symbols.
        vocab_size: number of symbols of integer tokens ``u (T,)``
            (embedding table entries ``N(0, 1)``).
        seq_len: with a value, a learned positional embedding ``(seq_len, N)``
            (entries ``N(0, 1)``) is added to the token embedding.
        out_dim: readout dimension (``None``: the readout is the identity).
        pool: ``"mean"`` over tokens, the ``"last"`` token, or ``"none"``
            (a readout per token).
        activation, activation_params: the MLP's ``phi``.
        init, sigma_w2, sigma_b2, q_star: ``W_1``'s scheme and variances,
            resolved by :func:`isometry.initializers.resolve` (fans ``(N, M)``).
        value_sigma_w2: ``N Var`` of ``W_V``, ``W_O`` and ``W_2`` (the linear
            maps; Gaussian, or orthogonal when ``init``'s ensemble is).
        qk_sigma_w2: ``N Var`` of ``W_Q`` and ``W_K`` (Gaussian). Small values
            make attention close to uniform at initialization, the regime
            of :mod:`isometry.transformer_theory` (Noci et al. 2022).
        bias: a bias ``b_1`` in the MLP (variance ``sigma_b2``).
        norm_position: ``"pre"``, ``"post"`` or ``"none"``.
        residual: residual paths around both sublayers.
        residual_scale: ``alpha``, a number > 0 or ``"1/sqrt(L)"``.
        causal: mask attention to earlier tokens.
        norm_eps: added to the variance in layer normalization.
        dtype: the parameters' dtype, as in :class:`MLPConfig` (default
            ``"float32"``; the model's ``dtype=`` argument overrides it).
    """

    depth: int
    width: int
    heads: int = 4
    mlp_width: int | None = None
    in_dim: int | None = None
    vocab_size: int | None = None
    seq_len: int | None = None
    out_dim: int | None = None
    pool: str = "mean"
    activation: str | _activations.Activation = "relu"
    activation_params: Any = ()
    init: str = "he_normal"
    sigma_w2: float | None = None
    sigma_b2: float | None = None
    q_star: float | None = None
    value_sigma_w2: float = 1.0
    qk_sigma_w2: float = 1.0
    bias: bool = False
    norm_position: str = "pre"
    residual: bool = True
    residual_scale: float | str = 1.0
    causal: bool = False
    norm_eps: float = 1e-5
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "activation_params", _activation_params(self.activation_params))
        validate.int_fields(self, "depth", "width", "heads")
        _check_dtype(self)
        if self.width % self.heads:
            raise ValueError(f"heads must divide width, got heads={self.heads}, width={self.width}")
        for name in ("mlp_width", "in_dim", "vocab_size", "seq_len", "out_dim"):
            if getattr(self, name) is not None:
                validate.positive_int(name, getattr(self, name))
        if (self.in_dim is None) == (self.vocab_size is None) and self.in_dim is not None:
            raise ValueError("TransformerConfig: give in_dim (patches) or vocab_size, not both")
        validate.choice("pool", self.pool, POOLS)
        validate.choice("norm_position", self.norm_position, TRANSFORMER_NORMS)
        for name in ("bias", "residual", "causal"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        check_branch_scale("residual_scale", self.residual_scale)
        validate.real_array("value_sigma_w2", self.value_sigma_w2, minimum=0.0, strict=True)
        validate.real_array("qk_sigma_w2", self.qk_sigma_w2, minimum=0.0)
        validate.real_array("norm_eps", self.norm_eps, minimum=0.0)
        _activations.get(self.activation, **dict(self.activation_params))
        self.variances()  # validates init / sigma_w2 / sigma_b2 / q_star

    @property
    def act(self) -> _activations.Activation:
        return _act_of(self)

    @property
    def hidden(self) -> int:
        """``M``, the MLP hidden width."""
        return self.width if self.mlp_width is None else self.mlp_width

    def _resolved(self):
        name = "gaussian" if str(self.init).strip().lower() == "critical" else self.init
        try:
            v = _initializers.resolve(
                self.act, name, q_star=self.q_star, sigma_w2=self.sigma_w2,
                sigma_b2=self.sigma_b2, fan_in=self.width, fan_out=self.hidden,
            )  # fmt: skip
        except ValueError as err:
            raise ValueError(f"TransformerConfig: {err}") from None
        if not self.bias and v.sigma_b2 > 0:
            raise ValueError(
                f"TransformerConfig: bias=False is incompatible with sigma_b2 = {v.sigma_b2:g}"
            )
        return _initializers.get(name).at(v.sigma_w2), v

    def initializer(self) -> _initializers.Initializer:
        """``W_1``'s initializer."""
        return self._resolved()[0]

    def variances(self) -> tuple[float, float]:
        """``W_1``'s effective ``(sigma_w2, sigma_b2)`` (mean-field convention)."""
        v = self._resolved()[1]
        return v.sigma_w2, (v.sigma_b2 if self.bias else 0.0)


def _layer_norm(x, scale, offset, eps):
    """``(x - mean x) / sqrt(var x + eps) * scale + offset`` over the last axis."""
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.var(x, axis=-1, keepdims=True)
    return (x - mu) * lax.rsqrt(var + eps) * scale + offset


def attention(z: Array, wq: Array, wk: Array, wv: Array, wo: Array, heads: int, causal: bool):
    """Multi-head self-attention of the tokens ``z (..., T, N)``; weights ``(N, N)``.

    ``concat_h softmax(Q_h K_h^T / sqrt(d) + mask) V_h W_O`` with ``d = N / heads``.
    Returns ``(out (..., T, N), weights (..., heads, T, T))``.
    """
    *lead, T, N = z.shape
    d = N // heads

    def split(w):
        return (z @ w).reshape(*lead, T, heads, d)

    q, k, v = split(wq), split(wk), split(wv)
    logits = jnp.einsum("...thd,...shd->...hts", q, k) / jnp.sqrt(jnp.asarray(d, z.dtype))
    if causal:
        mask = jnp.tril(jnp.ones((T, T), bool))
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    a = jax.nn.softmax(logits, axis=-1)
    o = jnp.einsum("...hts,...shd->...thd", a, v).reshape(*lead, T, N)
    return o @ wo, a


def _sublayer(cfg: TransformerConfig, alpha, f, x, scale, offset):
    """``x -> x + alpha f(LN x)`` (pre), ``LN(x + alpha f(x))`` (post), ... (the config's doc)."""
    ln = functools.partial(_layer_norm, scale=scale, offset=offset, eps=cfg.norm_eps)
    z = ln(x) if cfg.norm_position == "pre" else x
    out, aux = f(z)
    y = x + alpha * out if cfg.residual else out
    return (ln(y) if cfg.norm_position == "post" else y), aux


def _block_step(cfg: TransformerConfig, act, alpha, p, x, probe):
    """One transformer block ``x^{l-1} -> x^l`` (see :class:`TransformerConfig`)."""

    def attn(z):
        out, _ = attention(z, p["query"], p["key"], p["value"], p["out"], cfg.heads, cfg.causal)
        return out, {}

    def mlp(z):
        h = z @ p["mlp_in"]
        if "mlp_bias" in p:
            h = h + p["mlp_bias"]
        if probe is not None:
            h = h + probe
        a = act.phi(h)
        out = a @ p["mlp_out"]
        return out, {"preact": h, "post": a, "branch": alpha * out}

    y, _ = _sublayer(cfg, alpha, attn, x, p["ln1_scale"], p["ln1_offset"])
    x_new, aux = _sublayer(cfg, alpha, mlp, y, p["ln2_scale"], p["ln2_offset"])
    if not cfg.residual:
        del aux["branch"]
    return x_new, aux


_TRANSFORMER_WEIGHTS = ("query", "key", "value", "out", "mlp_in", "mlp_out")


def _linear_init(cfg: TransformerConfig, sigma_w2) -> _initializers.Initializer:
    ensemble = cfg.initializer().ensemble
    return _initializers.get("orthogonal" if ensemble == "orthogonal" else "gaussian", sigma_w2)


def transformer_params(cfg: TransformerConfig, key, dtype=None) -> dict[str, Array]:
    """The stacked block parameters of :class:`Transformer` drawn from ``key`` (may be traced,
    so seeds can be ``vmap``-ped): ``{name: (L, ...)}`` as in :meth:`Transformer.stacked_params`.
    ``dtype`` defaults to the config's."""
    dtype = _dtype(cfg, dtype)
    L, N, M = cfg.depth, cfg.width, cfg.hidden
    k = jax.random.split(key, 7)
    lin = _linear_init(cfg, cfg.value_sigma_w2)
    p = {
        "value": _stacked(lin, k[2], L, (N, N), dtype),
        "out": _stacked(lin, k[3], L, (N, N), dtype),
        "mlp_in": _stacked(cfg.initializer(), k[4], L, (N, M), dtype),
        "mlp_out": _stacked(lin, k[5], L, (M, N), dtype),
    }
    for i, name in enumerate(("query", "key")):
        p[name] = jax.vmap(
            lambda kk: _initializers.sample_gaussian(kk, (N, N), cfg.qk_sigma_w2, dtype)
        )(jax.random.split(k[i], L))
    if cfg.bias:
        p["mlp_bias"] = _initializers.sample_bias(k[6], (L, M), cfg.variances()[1], dtype)
    for i in (1, 2):
        p[f"ln{i}_scale"] = jnp.ones((L, N), dtype)
        p[f"ln{i}_offset"] = jnp.zeros((L, N), dtype)
    return p


class Transformer(nnx.Module):
    """A transformer encoder as a scanned stack of blocks (see :class:`TransformerConfig`).

    Shapes: input ``(..., T, in_dim)`` (patches) or integer ``(..., T)``
    (symbols); the stack's state ``x (..., T, N)``; output ``(..., out_dim)``
    (``(..., T, out_dim)`` with ``pool="none"``). Stacked parameters
    (:class:`StackedParam`, leading axis ``L``): ``query, key, value, out
    (L, N, N)``, ``mlp_in (L, N, M)``, ``mlp_out (L, M, N)``, ``mlp_bias
    (L, M)``, ``ln{1,2}_scale, ln{1,2}_offset (L, N)``; ``Stack.weights`` are
    the six matrices. ``model.stack()`` is a :class:`Stack`, so
    :func:`isometry.jacobian.stack_jacobians` and :func:`isometry.signal.measure`
    work unchanged on per-example states ``(T, N)``.
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs, dtype=None):
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
        cfg = config
        dtype = _dtype(cfg, dtype)
        self.config = cfg
        N = cfg.width
        params = transformer_params(cfg, rngs.params(), dtype)
        self.blocks = nnx.Dict({k: StackedParam(v) for k, v in params.items()})
        if cfg.in_dim is not None:
            self.embed = _lecun(rngs.params(), (cfg.in_dim, N), dtype)
        elif cfg.vocab_size is not None:
            self.embed = nnx.Param(jax.random.normal(rngs.params(), (cfg.vocab_size, N), dtype))
        else:
            self.embed = None
        self.position = (
            None
            if cfg.seq_len is None
            else nnx.Param(jax.random.normal(rngs.params(), (cfg.seq_len, N), dtype))
        )
        if cfg.out_dim is not None:
            self.readout = _lecun(rngs.params(), (N, cfg.out_dim), dtype)
            self.readout_bias = nnx.Param(jnp.zeros((cfg.out_dim,), dtype))
        else:
            self.readout = self.readout_bias = None

    def stacked_params(self) -> dict[str, Array]:
        return {k: v[...] for k, v in self.blocks.items()}

    def stack(self) -> Stack:
        cfg = self.config
        embed = None if self.embed is None else self.embed[...]
        pos = None if self.position is None else self.position[...]
        readout = None if self.readout is None else (self.readout[...], self.readout_bias[...])
        return Stack(
            functools.partial(_block_step, cfg, cfg.act, cfg.branch_scale),
            self.stacked_params(),
            functools.partial(_token_embed, cfg.vocab_size is not None, embed, pos),
            functools.partial(_token_readout, cfg.pool, readout),
            weights=_TRANSFORMER_WEIGHTS,
        )

    def __call__(self, u: Array) -> Array:
        cfg = self.config
        if cfg.vocab_size is not None:
            if jnp.ndim(u) < 1 or not jnp.issubdtype(jnp.asarray(u).dtype, jnp.integer):
                raise TypeError(f"u must be integer tokens (..., T), got {jnp.asarray(u).dtype}")
        else:
            _check_input("u", u, cfg.in_dim or cfg.width)
        T = jnp.shape(u)[-1 if cfg.vocab_size is not None else -2]
        if cfg.seq_len is not None and T > cfg.seq_len:
            raise ValueError(f"u has {T} tokens, more than seq_len={cfg.seq_len}")
        return self.stack()(u)


def _token_embed(symbols: bool, embed, pos, u):
    """``x^0``: embedded tokens (table lookup or linear map) plus positions."""
    if embed is None:
        x = u
    elif symbols:
        x = jnp.take(embed, u, axis=0)
    else:
        x = u @ embed
    if pos is not None:
        x = x + pos[: x.shape[-2]]
    return x


def _token_readout(pool: str, readout, x):
    """Pool the tokens ``x (..., T, N)`` (mean, last or none), then the linear readout."""
    if pool == "mean":
        x = jnp.mean(x, axis=-2)
    elif pool == "last":
        x = x[..., -1, :]
    return x if readout is None else x @ readout[0] + readout[1]
