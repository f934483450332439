"""Weight initializers that know the mean-field variance they imply.

Every scheme is a frozen, hashable :class:`Initializer` with the signature of
``jax.nn.initializers`` (``init(key, shape, dtype)``) and a method
``sigma_w2(fan_in, fan_out)`` giving the *effective weight variance*

    sigma_w2 = fan_in * Var(W_ij),

the quantity of mean-field theory (Poole et al. 2016): ``h = W x`` with
``W_ij ~ N(0, sigma_w2 / fan_in)``. So theory and networks speak one language:
He initialization is ``sigma_w2 = 2``, the ReLU critical point.

Shapes follow ``jax.nn.initializers``/Flax: a dense kernel is ``(fan_in,
fan_out)`` (used as ``x @ W``); a convolution kernel is ``(*spatial, in, out)``
with ``fan_in = in * prod(spatial)``. The schemes::

| name                 | Var(W_ij)            | sigma_w2             | ensemble |
|----------------------|----------------------|----------------------|----------------------|
| gaussian(sigma_w2)   | sigma_w2 / fan_in    | sigma_w2             | gaussian |
| orthogonal(sigma_w2) | sqrt(sigma_w2) * Haar | sigma_w2 (square)    | orthogonal |
| xavier/glorot (n, u) | 2 / (fan_in + fan_out) | 2 fan_in / (fan_in+fan_out) | gaussian |
| he/kaiming (n, u)    | 2 / fan_in           | 2                    | gaussian |
| lecun (n, u)         | 1 / fan_in           | 1                    | gaussian |
| delta_orthogonal(s2) | centre tap sqrt(s2) * Haar | s2                   | orthogonal |
| suo(s2)              | sqrt(s2 max(1, out/in)) Haar | s2           | orthogonal |

(``suo``: ``scaled_uniform_orthogonal``; a convolution gets it at the centre tap.)

("ensemble" is the random-matrix class free probability uses: uniform
entries behave like Gaussian ones at large width.)

Sampling: :func:`sample` (any scheme), :func:`sample_gaussian`,
:func:`sample_orthogonal`, :func:`sample_delta_orthogonal` and
:func:`sample_bias` take the variance as an argument that may be a traced
array, so a sweep can ``vmap`` over ``sigma_w2`` inside one compiled function;
for concrete values the samples equal ``jax.nn.initializers``' to the bit.

Variances: :func:`resolve` turns (activation, scheme, ``q*`` or
``sigma_w2``/``sigma_b2``) into :class:`Variances` ``(sigma_w2, sigma_b2,
q_star)``: the critical point of ``q*`` (:func:`critical_variances`), the
given values, or the scheme's own.

References: Glorot & Bengio 2010; He et al. 2015; Saxe et al. 2014;
Xiao et al. 2018 (delta-orthogonal); Martens et al. 2021 (scaled uniform
orthogonal, "SUO", the initialization of DKS and TAT).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from isometry import activations, meanfield, validate

__all__ = [
    "Initializer",
    "Variances",
    "critical_variances",
    "draw_layers",
    "fans",
    "get",
    "names",
    "resolve",
    "sample",
    "sample_bias",
    "sample_delta_orthogonal",
    "sample_gaussian",
    "sample_orthogonal",
    "sample_scaled_uniform_orthogonal",
    "standard_normal",
]


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a kernel shape, as ``jax.nn.initializers`` counts them."""
    if len(shape) < 2:
        raise ValueError(f"shape must have at least 2 dimensions (in, out), got {shape}")
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    return shape[-2] * receptive, shape[-1] * receptive


@dataclasses.dataclass(frozen=True)
class Initializer:
    """A weight initializer with its effective ``sigma_w2``.

    Attributes:
        name: scheme name (see :func:`names`).
        sigma_w2_param: the variance parameter for ``gaussian``, ``orthogonal``
            and ``delta_orthogonal``; ``None`` for fan-based schemes.
    """

    name: str
    sigma_w2_param: float | None = None

    @property
    def ensemble(self) -> str:
        """``"orthogonal"`` or ``"gaussian"``: the weights' random-matrix class."""
        return "gaussian" if self.name in ("gaussian", *_FAN_SAMPLERS) else "orthogonal"

    def sigma_w2(self, fan_in: int, fan_out: int | None = None) -> float:
        """The effective ``sigma_w2 = fan_in * Var(W_ij)`` for these fans."""
        fan_out = fan_in if fan_out is None else fan_out
        if fan_in <= 0 or fan_out <= 0:
            raise ValueError(f"fan_in and fan_out must be positive, got {fan_in}, {fan_out}")
        base = _BASE[self.name]
        if base == "param":
            return float(self.sigma_w2_param)
        if base == "xavier":
            return 2.0 * fan_in / (fan_in + fan_out)
        return float(base)

    def __call__(self, key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        """Sample a kernel of ``shape``; ``jax.nn.initializers`` signature."""
        return sample(self, key, shape, dtype=dtype)

    def at(self, sigma_w2: float) -> Initializer:
        """This scheme at ``sigma_w2`` (``gaussian``/``orthogonal``/``delta_orthogonal``);
        a fan-based scheme fixes its own and is returned as it is."""
        return self if self.sigma_w2_param is None else get(self.name, sigma_w2=sigma_w2)

    def __repr__(self) -> str:
        extra = "" if self.sigma_w2_param is None else f", sigma_w2={self.sigma_w2_param}"
        return f"Initializer({self.name}{extra})"


_BASE = {
    "gaussian": "param",
    "orthogonal": "param",
    "delta_orthogonal": "param",
    "scaled_uniform_orthogonal": "param",
    "xavier_normal": "xavier",
    "xavier_uniform": "xavier",
    "he_normal": 2.0,
    "he_uniform": 2.0,
    "lecun_normal": 1.0,
    "lecun_uniform": 1.0,
}
_ALIASES = {
    "glorot_normal": "xavier_normal",
    "glorot_uniform": "xavier_uniform",
    "xavier": "xavier_normal",
    "glorot": "xavier_normal",
    "kaiming_normal": "he_normal",
    "kaiming_uniform": "he_uniform",
    "he": "he_normal",
    "kaiming": "he_normal",
    "lecun": "lecun_normal",
    "normal": "gaussian",
    "suo": "scaled_uniform_orthogonal",
}


_JNN = jax.nn.initializers
# Fan-based schemes sample as jax.nn.initializers does; untruncated normals, so
# Var(W_ij) is exactly the tabulated value.
_FAN_SAMPLERS = {
    "xavier_normal": _JNN.variance_scaling(1.0, "fan_avg", "normal"),
    "xavier_uniform": _JNN.glorot_uniform(),
    "he_normal": _JNN.variance_scaling(2.0, "fan_in", "normal"),
    "he_uniform": _JNN.he_uniform(),
    "lecun_normal": _JNN.variance_scaling(1.0, "fan_in", "normal"),
    "lecun_uniform": _JNN.lecun_uniform(),
}


def _variance(name: str, value):
    """A concrete scalar as a Python float (the arithmetic of ``jax.nn.initializers``:
    scales in float64, then cast); a traced or array value as it is."""
    validate.real_array(name, value, minimum=0.0)
    if validate.is_concrete(value) and np.ndim(value) == 0:
        return float(value)
    return value


def _shape(shape) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if any(s <= 0 for s in shape):
        raise ValueError(f"shape must have positive dimensions, got {shape}")
    return shape


# Eager draws at bucketed sizes. Under ``jax_threefry_partitionable`` (jax's default) a
# threefry draw of ``n`` values, or a split into ``n`` keys, is the start of a longer one from
# the same key, so a draw at a power-of-two size, cut, has the same bits and compiles once per
# size bucket rather than once per shape (an eager draw compiles for its shape). Only on the
# CPU, where the bit-identity is checked (and the cut is a numpy copy, which compiles nothing).
_BUCKET = 1024


def _on_cpu(x) -> bool:
    """Whether ``x`` is a concrete ``jax.Array`` (not traced, not staged) on the CPU."""
    return (
        isinstance(x, jax.Array)
        and validate.is_concrete(x)
        and all(d.platform == "cpu" for d in x.devices())
    )


def _bucket(key, n: int) -> int | None:
    """The size (a power of two, at least ``_BUCKET``) to draw ``n`` values of ``key`` at;
    ``None`` where a longer draw need not start with the same values or is not checked to (a
    key traced or off the CPU, another PRNG than threefry, ``jax_threefry_partitionable``
    off)."""
    if not (_on_cpu(key) and jax.config.jax_threefry_partitionable):
        return None
    if str(jax.random.key_impl(key)) != "threefry2x32":
        return None
    return max(_BUCKET, 1 << (n - 1).bit_length())


def standard_normal(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """``jax.random.normal(key, shape, dtype)`` to the bit, compiled once per size bucket.

    An eager draw compiles for its shape. Under ``jax_threefry_partitionable`` (jax's
    default) a threefry draw of ``n`` values is the start of a longer one from the same key,
    so eagerly on the CPU this draws a power-of-two size (at least 1024) and cuts it to
    ``shape`` (with numpy, which compiles nothing); traced, on an accelerator or with
    another PRNG it is ``jax.random.normal`` itself.
    """
    shape = tuple(shape)
    n = math.prod(shape)
    size = _bucket(key, n)
    if size is not None:
        z = jax.random.normal(key, (size,), dtype)
        if _on_cpu(z):  # not staged into an enclosing trace
            return jax.device_put(np.asarray(z)[:n].reshape(shape))
    return jax.random.normal(key, shape, dtype)


def _keys(key: jax.Array, num: int) -> jax.Array:
    """At least ``num`` keys, the first ``num`` those of ``jax.random.split(key, num)``: a
    size bucket of them (:func:`_bucket`), else exactly ``num``."""
    size = _bucket(key, num)
    return jax.random.split(key, num if size is None else size)


# Layers per eager draw of stacked parameters (see draw_layers): at most _CHUNK, fewer (a
# power of two) where _CHUNK layers would pass _CHUNK_ENTRIES entries.
_CHUNK = 16
_CHUNK_ENTRIES = 2**18


def draw_layers(draw, key, depth, shape):
    """``jax.vmap(draw)(jax.random.split(key, depth))`` to the bit: ``draw(key_l)``, an array
    of ``shape``, stacked.

    An eager ``jax.vmap`` compiles each jitted primitive of ``draw`` (the normal draw, the QR
    of an orthogonal one) for its batched shape, so drawing all ``depth`` layers at once
    would compile again at every new depth. For a concrete ``key`` on the CPU the layers are
    drawn in chunks of 16 or, for layers of more than ``2**14`` entries, fewer (the last
    chunk filled up with further keys, the extra layers dropped), so the draws compile once
    per chunk and layer shape; the keys are split at a power-of-two size (as
    :func:`standard_normal` draws) and the chunks joined with numpy, which compiles
    nothing. Traced (``jit``, a ``vmap`` over keys) or on an accelerator (whose batched QR
    can change with the batch size), it is the plain ``vmap``.
    """
    if depth > 0 and _on_cpu(key):
        c = _chunk_size(shape)
        keys = _chunk_keys(key, depth, c)
        if _on_cpu(keys):  # not staged into an enclosing trace
            starts = range(0, depth, c)
            parts = [jax.vmap(draw)(lax.dynamic_slice_in_dim(keys, s, c)) for s in starts]
            return _join(parts, depth)
    return jax.vmap(draw)(jax.random.split(key, depth))


def _chunk_size(shape) -> int:
    """Layers of ``shape`` per eager draw: ``_CHUNK`` (16), halved (down to 1) while a chunk
    would hold more than ``_CHUNK_ENTRIES`` (``2**18``) entries, so that the layers drawn to
    fill the last chunk cost little."""
    c = _CHUNK
    while c > 1 and c * math.prod(shape) > _CHUNK_ENTRIES:
        c //= 2
    return c


def _chunk_keys(key, depth, c):
    """Keys for whole chunks of ``c``, the first ``depth`` those of ``split(key, depth)``; an
    unbucketed split is filled up with its last key."""
    keys = _keys(key, depth)
    n = -(-depth // c) * c
    return keys if keys.shape[0] >= n else keys[np.minimum(np.arange(n), depth - 1)]


def _join(parts, depth):
    """The chunks along the first axis, cut to ``depth``: with numpy, which compiles nothing
    (a jnp concatenate and cut compile at every depth), unless ``draw`` made them traced."""
    if all(_on_cpu(p) for p in parts):
        return jax.device_put(np.concatenate([np.asarray(p) for p in parts])[:depth])
    return jnp.concatenate(parts)[:depth]


def sample_gaussian(key: jax.Array, shape, sigma_w2, dtype=jnp.float32) -> jax.Array:
    """``W = sqrt(sigma_w2 / fan_in) * N(0, 1)`` of ``shape`` (``fan_in`` as :func:`fans`).

    ``sigma_w2`` may be a traced scalar (``vmap``/``jit`` over it). For a
    concrete value the samples equal ``jax.nn.initializers.variance_scaling(
    sigma_w2, "fan_in", "normal")`` to the bit.
    """
    shape = _shape(shape)
    fan_in, _ = fans(shape)
    s = _variance("sigma_w2", sigma_w2)
    var = s / fan_in if isinstance(s, float) else jnp.asarray(s, dtype) / fan_in
    return standard_normal(key, shape, dtype) * jnp.sqrt(jnp.asarray(var, dtype))


def _sqrt(value, dtype):
    """``sqrt(value)``: float64 for a Python float (``scale=math.sqrt(s)``), else in ``dtype``."""
    return math.sqrt(value) if isinstance(value, float) else jnp.sqrt(jnp.asarray(value, dtype))


def sample_orthogonal(key: jax.Array, shape, sigma_w2, dtype=jnp.float32) -> jax.Array:
    """``W = sqrt(sigma_w2) * Q``, ``Q`` Haar orthogonal (orthonormal rows or columns).

    ``Q`` is drawn as ``jax.nn.initializers.orthogonal`` draws it (QR of a
    normal matrix, signs fixed by ``diag R``; for a square matrix the same as
    ``jax.random.orthogonal``), so for a concrete ``sigma_w2`` the samples equal
    ``jax.nn.initializers.orthogonal(math.sqrt(sigma_w2))`` to the bit.
    ``sigma_w2`` may be traced. Saxe, McClelland & Ganguli 2014.
    """
    shape = _shape(shape)
    q = _JNN.orthogonal(1.0)(key, shape, dtype)
    return _sqrt(_variance("sigma_w2", sigma_w2), dtype) * q


def sample_delta_orthogonal(key: jax.Array, shape, sigma_w2, dtype=jnp.float32) -> jax.Array:
    """Delta-orthogonal kernel ``(*spatial, in, out)``: centre ``sqrt(sigma_w2) Q``, 0 elsewhere.

    ``Q (in, out)`` from :func:`sample_orthogonal`; the centre tap is
    ``(k - 1) // 2`` along each spatial axis, as
    ``jax.nn.initializers.delta_orthogonal`` (equal to it to the bit for a
    concrete ``sigma_w2``). ``sigma_w2`` may be traced. Xiao et al. 2018.

    Raises:
        ValueError: a kernel that is not 3-, 4- or 5-D, or ``in > out``.
    """
    shape = _shape(shape)
    if len(shape) not in (3, 4, 5):
        raise ValueError(
            f"delta_orthogonal: kernel must be 3-, 4- or 5-D (*spatial, in, out), got {shape}"
        )
    if shape[-2] > shape[-1]:
        raise ValueError(
            "delta_orthogonal: needs in_channels <= out_channels "
            f"(an orthogonal centre tap), got in={shape[-2]}, out={shape[-1]}"
        )
    return _centre_tap(shape, sample_orthogonal(key, shape[-2:], sigma_w2, dtype), dtype)


def _centre_tap(shape, tap, dtype) -> jax.Array:
    """A kernel ``(*spatial, in, out)`` of zeros with ``tap`` at the centre (``(k - 1) // 2``)."""
    centre = tuple((k - 1) // 2 for k in shape[:-2])
    return jnp.zeros(shape, dtype).at[centre].set(tap)


def sample_bias(key: jax.Array, shape, sigma_b2, dtype=jnp.float32) -> jax.Array:
    """``b = sqrt(sigma_b2) * N(0, 1)`` of ``shape``; zeros for a concrete ``sigma_b2 = 0``.

    ``sigma_b2`` may be traced.
    """
    shape = tuple(int(s) for s in shape)
    s = _variance("sigma_b2", sigma_b2)
    if isinstance(s, float) and s == 0.0:
        return jnp.zeros(shape, dtype)
    return _sqrt(s, dtype) * standard_normal(key, shape, dtype)


def sample_scaled_uniform_orthogonal(
    key: jax.Array, shape, sigma_w2, dtype=jnp.float32
) -> jax.Array:
    """Scaled uniform orthogonal (SUO; Martens et al. 2021, "Parameter distributions"):
    ``sqrt(sigma_w2 max(1, out / in)) Q`` with ``Q`` Haar orthogonal
    (:func:`sample_orthogonal`), so that the layer keeps ``q`` when it widens; a
    convolution kernel ``(*spatial, in, out)`` gets it at the centre tap
    (``(k - 1) // 2``, a delta initialization) and zeros elsewhere. ``fan_in Var(W_ij) =
    sigma_w2`` for every shape. As dks's ``scaled_uniform_orthogonal``; use zero biases.
    """
    shape = _shape(shape)
    if len(shape) < 2:
        raise ValueError(f"scaled_uniform_orthogonal: kernel must be 2-D or more, got {shape}")
    n_in, n_out = shape[-2:]
    s2 = _variance("sigma_w2", sigma_w2) * max(1.0, n_out / n_in)
    tap = sample_orthogonal(key, shape[-2:], s2, dtype)
    return tap if len(shape) == 2 else _centre_tap(shape, tap, dtype)


_ENSEMBLE_SAMPLERS = {
    "gaussian": sample_gaussian,
    "orthogonal": sample_orthogonal,
    "delta_orthogonal": sample_delta_orthogonal,
    "scaled_uniform_orthogonal": sample_scaled_uniform_orthogonal,
}


def sample(init, key: jax.Array, shape, sigma_w2=None, dtype=jnp.float32) -> jax.Array:
    """A kernel of ``shape`` from the scheme ``init`` (a name or :class:`Initializer`).

    ``gaussian``, ``orthogonal`` and ``delta_orthogonal`` use ``sigma_w2``
    (default: the initializer's own), which may be a traced array, so a sweep
    can ``vmap`` over it; fan-based schemes (xavier, he, lecun) fix it and
    take ``sigma_w2=None``. For concrete values the samples equal
    ``jax.nn.initializers``' to the bit.

    Raises:
        ValueError: ``sigma_w2`` given to a fan-based scheme; a bad shape.
    """
    init = get(init)
    shape = _shape(shape)
    if init.sigma_w2_param is None:
        if sigma_w2 is not None:
            raise ValueError(
                f"initializer {init.name!r} fixes sigma_w2 from the fans; use 'gaussian' or "
                "'orthogonal' to choose sigma_w2"
            )
        return _FAN_SAMPLERS[init.name](key, shape, dtype)
    s2 = init.sigma_w2_param if sigma_w2 is None else sigma_w2
    return _ENSEMBLE_SAMPLERS[init.name](key, shape, s2, dtype)


def names() -> tuple[str, ...]:
    """Scheme names accepted by :func:`get` (aliases included)."""
    return tuple(sorted(set(_BASE) | set(_ALIASES)))


def get(name: str | Initializer, sigma_w2: float | None = None) -> Initializer:
    """Look up an initializer, e.g. ``get("he_normal")`` or ``get("orthogonal", sigma_w2=1.5)``.

    ``gaussian``, ``orthogonal`` and ``delta_orthogonal`` take ``sigma_w2``
    (default 1); fan-based schemes (xavier, he, lecun) fix it themselves.

    Raises:
        ValueError: unknown name (lists the known ones), a ``sigma_w2`` that is
            not a positive finite number, or ``sigma_w2`` given to a fan-based scheme.
    """
    if isinstance(name, Initializer):
        if sigma_w2 is not None:
            raise ValueError("get: sigma_w2 cannot be applied to an Initializer instance")
        return name
    if not isinstance(name, str):
        raise TypeError(f"initializer must be a name or an Initializer, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _BASE:
        raise ValueError(f"unknown initializer {name!r}; known: {', '.join(names())}")
    if _BASE[key] == "param":
        s2 = 1.0 if sigma_w2 is None else sigma_w2
        if not isinstance(s2, int | float) or not math.isfinite(s2) or s2 <= 0:
            raise ValueError(f"sigma_w2 must be a positive finite number, got {sigma_w2!r}")
        return Initializer(key, float(s2))
    if sigma_w2 is not None:
        raise ValueError(
            f"initializer {key!r} fixes sigma_w2 from the fans; use 'gaussian' or "
            f"'orthogonal' to choose sigma_w2={sigma_w2}"
        )
    return Initializer(key)


# --------------------------------------------------------------------------- #
# Variances: (activation, init, q* or sigma_w2/sigma_b2) -> (sigma_w2, sigma_b2).
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Variances:
    """The mean-field variances of a layer (Poole et al. 2016).

    Attributes:
        sigma_w2: ``fan_in * Var(W_ij)``.
        sigma_b2: ``Var(b_i)``.
        q_star: the pre-activation length fixed point ``q*`` of
            ``q = sigma_w2 E[phi(sqrt(q) z)^2] + sigma_b2``; ``None`` when not
            asked for (see :func:`resolve`).
    """

    sigma_w2: float
    sigma_b2: float
    q_star: float | None = None


def critical_variances(activation, q_star) -> Variances:
    """The critical point of ``q*``: ``chi_1 = sigma_w2 E[phi'(sqrt(q*) z)^2] = 1`` and
    ``q*`` the length fixed point (:func:`isometry.meanfield.critical_point`;
    Pennington, Schoenholz & Ganguli 2017).

    Raises:
        ValueError: ``q_star`` not positive, or no critical point at this ``q*``
            (non-finite, or ``sigma_b2 < 0``).
    """
    validate.real_array("q_star", q_star, minimum=0.0, strict=True)
    act = activations.get(activation)
    q = float(q_star)
    sw, sb = (float(v) for v in meanfield.critical_point(act, q))
    if not (math.isfinite(sw) and math.isfinite(sb) and sb >= 0):
        raise ValueError(
            f"q_star={q}: no critical point for {act.name} at this q* "
            f"(it would need sigma_w2={sw:.6g}, sigma_b2={sb:.6g})"
        )
    return Variances(sw, sb, q)


def _fixed_point(act, sw: float, sb: float) -> float:
    q = float(meanfield.q_star(act, sw, sb))
    if not math.isfinite(q) or q <= 0:
        raise ValueError(
            f"no finite fixed point q* for {act.name} at sigma_w2={sw}, sigma_b2={sb}; "
            "pass q_star explicitly"
        )
    return q


def resolve(
    activation,
    init,
    *,
    q_star=None,
    sigma_w2=None,
    sigma_b2=None,
    fan_in: int | None = None,
    fan_out: int | None = None,
    fixed_point: bool = False,
) -> Variances:
    """The variances of a layer from one of two descriptions.

    ``activation`` (a name or :class:`~isometry.activations.Activation`) is
    needed for ``q_star`` and ``fixed_point`` only; ``None`` otherwise.

    * ``q_star``: the critical point of ``q*`` (:func:`critical_variances`);
      needs an ``init`` that takes ``sigma_w2`` (``gaussian``, ``orthogonal``,
      ``delta_orthogonal``).
    * otherwise ``sigma_w2`` (for those schemes; default the initializer's,
      1) or the fans' (fan-based schemes: ``sigma_w2(fan_in, fan_out)``), and
      ``sigma_b2`` (default 0). ``fixed_point=True`` also solves ``q*``
      (:func:`isometry.meanfield.q_star`).

    Raises:
        ValueError: ``q_star`` with ``sigma_w2`` or ``sigma_b2``; ``q_star`` or
            ``sigma_w2`` with a fan-based ``init``; no critical point; bad
            values; no finite ``q*`` when ``fixed_point``.
    """
    act = None if activation is None else activations.get(activation)
    if act is None and (q_star is not None or fixed_point):
        raise ValueError("resolve: q_star and fixed_point need the activation (got None)")
    base = get(init)
    if q_star is not None:
        if sigma_w2 is not None or sigma_b2 is not None:
            raise ValueError(
                "give either q_star (critical initialization) or sigma_w2/sigma_b2, not both"
            )
        if base.sigma_w2_param is None:
            raise ValueError(
                "q_star (critical initialization) needs init 'gaussian', 'orthogonal' or "
                f"'delta_orthogonal', got {base.name!r} (which fixes sigma_w2 from the fans)"
            )
        return critical_variances(act, q_star)
    if base.sigma_w2_param is None:
        get(base.name, sigma_w2=sigma_w2)  # a fan-based scheme: sigma_w2 must be None
        if fan_in is None:
            raise ValueError(f"initializer {base.name!r} needs fan_in (and fan_out) for sigma_w2")
        sw = base.sigma_w2(fan_in, fan_out)
    else:
        sw = base.sigma_w2_param if sigma_w2 is None else get(base.name, sigma_w2).sigma_w2_param
    sb = 0.0 if sigma_b2 is None else sigma_b2
    validate.real_array("sigma_b2", sb, minimum=0.0)
    sw, sb = float(sw), float(sb)
    return Variances(sw, sb, _fixed_point(act, sw, sb) if fixed_point else None)
