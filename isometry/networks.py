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
training mode, which needs the batch. ``nnx.split(model)`` gives
``(graphdef, state)`` for ``jit``, ``vmap`` over seeds and training;
``model.train()`` / ``model.eval()`` switch batch normalization between batch
statistics and running statistics.

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
    "MLP",
    "NORMS",
    "NORM_POSITIONS",
    "PADDINGS",
    "ConvConfig",
    "ConvNet",
    "MLPConfig",
    "Stack",
    "StackedBatchStat",
    "StackedParam",
    "conv",
]

Array = jax.Array

NORMS = ("none", "batch", "layer")
NORM_POSITIONS = ("pre", "post")
PADDINGS = ("circular", "same")


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


def _check_common(owner: str, cfg) -> None:
    validate.positive_int("depth", cfg.depth)
    dtype = str(jnp.dtype(cfg.dtype)) if _is_dtype(cfg.dtype) else cfg.dtype
    object.__setattr__(cfg, "dtype", validate.choice("dtype", dtype, DTYPES))
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


@dataclasses.dataclass(frozen=True)
class MLPConfig:
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
        residual_scale: the branch scale ``alpha`` (> 0).
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
    residual_scale: float = 1.0
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
        validate.real_array("residual_scale", self.residual_scale, minimum=0.0, strict=True)
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
        branch = cfg.residual_scale * a
        aux["branch"] = branch
        return x + branch, aux
    return a, aux


def _scan_collect(step, params, x0):
    return lax.scan(lambda x, p: step(p, x, None), x0, params)


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
        s = self.stack()
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
class ConvConfig:
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
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "activation_params", _activation_params(self.activation_params))
        validate.positive_int("channels", self.channels)
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
    return a, {"preact": h, "post": a}


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
