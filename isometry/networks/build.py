"""Building the models: stacked kernels, LeCun maps, the readout, input checks, and
:class:`ScannedNet`, the one construction path of ``MLP`` and ``ConvNet``.

``MLP`` and ``ConvNet`` are the same network but for their layer: ``depth``
hidden layers with stacked ``kernel`` and ``bias``, an optional input map
``embed``, an optional dense readout. :class:`ScannedNet` draws these (in that
order, from ``rngs.params()``) and builds the :class:`~isometry.networks.Stack`
view; a subclass gives its layer step, its input map and its output map.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from isometry import initializers as _initializers
from isometry.networks.config import resolve_dtype
from isometry.networks.stack import Stack, StackedParam

__all__ = ["ScannedNet", "check_input", "lecun", "readout_params", "stacked"]

Array = jax.Array


def stacked(init, key, depth, shape, dtype):
    """``depth`` kernels of ``shape`` from ``init``, keys ``split(key, depth)``: ``(L, *shape)``.

    The same bits as ``jax.vmap`` of the draw over the ``depth`` keys. An eager ``vmap``
    compiles its draws for the batched shape ``(depth, *shape)``, so one over all the layers
    would compile again at every new depth; eagerly on the CPU the layers are drawn in chunks
    and the draws compile once per chunk of layers
    (:func:`isometry.initializers.draw_layers`) and kernel shape,
    whatever the depth.
    """

    def draw(k):
        return _initializers.sample(init, k, shape, dtype=dtype)

    return _initializers.draw_layers(draw, key, depth, shape)


def lecun(key, shape, dtype) -> nnx.Param:
    """An input map or readout: LeCun normal, ``Var = 1 / fan_in``."""
    return nnx.Param(_initializers.sample("lecun_normal", key, shape, dtype=dtype))


def readout_params(rngs: nnx.Rngs, width: int, out_dim: int | None, dtype):
    """``(W_out (width, out_dim) LeCun, b_out (out_dim,) zero)``; ``(None, None)`` (and no
    key drawn) when ``out_dim`` is ``None``."""
    if out_dim is None:
        return None, None
    return lecun(rngs.params(), (width, out_dim), dtype), nnx.Param(jnp.zeros((out_dim,), dtype))


def check_input(name, u, last):
    """Raise ``ValueError`` naming ``name`` unless ``u`` has the last axis ``last``."""
    if jnp.ndim(u) < 1 or jnp.shape(u)[-1] != last:
        raise ValueError(f"{name} must have last axis {last}, got shape {jnp.shape(u)}")


def _biases(cfg, rngs, shape, sigma_b2, dtype) -> StackedParam | None:
    """The stack's biases ``b ~ N(0, sigma_b2)``; ``None`` (and no key drawn) without biases."""
    if not cfg.bias:
        return None
    return StackedParam(_initializers.sample_bias(rngs.params(), shape, sigma_b2, dtype))


class ScannedNet(nnx.Module):
    """What ``MLP`` and ``ConvNet`` share: their parameters and their :class:`Stack` view.

    Parameters (drawn in this order from ``rngs.params()``): ``kernel (L,
    *kernel_shape)`` from the config's initializer and ``bias (L, width)``
    (:class:`StackedParam`), the input map ``embed`` (``nnx.Param`` or ``None``)
    and the readout ``readout (width, out_dim)``, ``readout_bias (out_dim,)``.

    A subclass calls ``super().__init__`` from its own ``__init__`` (after
    checking its config) and defines

        embed_spec(init) -> (shape, initializer) or None   # the input map
        layer_step() -> step(params_l, x, probe)          # Stack.step
        input_fn(embed) -> input_map;  output_fn(readout) -> output_map

    where ``embed`` is the input map's array (or ``None``) and ``readout`` the
    pair ``(W_out, b_out)`` (or ``None``). ``STACKED`` names further stacked
    parameters: ``(key in stacked_params(), attribute)`` pairs.
    """

    STACKED: tuple[tuple[str, str], ...] = (("bias", "bias"),)

    def __init__(self, config, rngs: nnx.Rngs, dtype, *, width: int, kernel_shape):
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs must be an nnx.Rngs such as nnx.Rngs(0), got {rngs!r}")
        dtype = resolve_dtype(config, dtype)
        self.config = config
        L = config.depth
        init = config.initializer()
        _, sb = config.variances()
        self.kernel = StackedParam(stacked(init, rngs.params(), L, kernel_shape, dtype))
        self.bias = _biases(config, rngs, (L, width), sb, dtype)
        spec = self.embed_spec(init)
        self.embed = (
            None
            if spec is None
            else nnx.Param(_initializers.sample(spec[1], rngs.params(), spec[0], dtype=dtype))
        )
        self.readout, self.readout_bias = readout_params(rngs, width, config.out_dim, dtype)

    def stacked_params(self) -> dict[str, Array]:
        """The hidden layers' parameters as a dict of arrays with leading axis ``L``."""
        p = {"kernel": self.kernel[...]}
        for key, attr in self.STACKED:
            var = getattr(self, attr)
            if var is not None:
                p[key] = var[...]
        return p

    def _embed_value(self):
        return None if self.embed is None else self.embed[...]

    def _readout_value(self):
        return None if self.readout is None else (self.readout[...], self.readout_bias[...])

    def input_map(self, u: Array) -> Array:
        """``x^0`` from the input ``u``, in the model's dtype."""
        return self.input_fn(self._embed_value())(u)

    def output_map(self, x: Array) -> Array:
        """``y`` from the stack's output ``x^L``."""
        return self.output_fn(self._readout_value())(x)

    def stack(self) -> Stack:
        """The pure scanned-stack view at the current parameters and mode."""
        return Stack(
            self.layer_step(),
            self.stacked_params(),
            self.input_fn(self._embed_value()),
            self.output_fn(self._readout_value()),
            weights=("kernel",),
        )
