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
with ``fan_in = in * prod(spatial)``.

| name                 | Var(W_ij)            | sigma_w2             | ensemble |
|----------------------|----------------------|----------------------|----------------------|
| gaussian(sigma_w2)   | sigma_w2 / fan_in    | sigma_w2             | gaussian |
| orthogonal(sigma_w2) | sqrt(sigma_w2) * Haar | sigma_w2 (square)    | orthogonal |
| xavier/glorot (n, u) | 2 / (fan_in + fan_out) | 2 fan_in / (fan_in+fan_out) | gaussian |
| he/kaiming (n, u)    | 2 / fan_in           | 2                    | gaussian |
| lecun (n, u)         | 1 / fan_in           | 1                    | gaussian |
| delta_orthogonal(s2) | centre tap sqrt(s2) * Haar | s2                   | orthogonal |

("ensemble" is the random-matrix class free probability uses: uniform
entries behave like Gaussian ones at large width.)

References: Glorot & Bengio 2010; He et al. 2015; Saxe et al. 2014;
Xiao et al. 2018 (delta-orthogonal).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Initializer", "fans", "get", "names"]


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
        return "orthogonal" if self.name in ("orthogonal", "delta_orthogonal") else "gaussian"

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
        shape = tuple(int(s) for s in shape)
        if any(s <= 0 for s in shape):
            raise ValueError(f"shape must have positive dimensions, got {shape}")
        return _sampler(self)(key, shape, dtype)

    def __repr__(self) -> str:
        extra = "" if self.sigma_w2_param is None else f", sigma_w2={self.sigma_w2_param}"
        return f"Initializer({self.name}{extra})"


_BASE = {
    "gaussian": "param",
    "orthogonal": "param",
    "delta_orthogonal": "param",
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
}


def _sampler(init: Initializer):
    ji = jax.nn.initializers
    s2 = init.sigma_w2_param
    return {
        "gaussian": lambda: ji.variance_scaling(s2, "fan_in", "normal"),
        "orthogonal": lambda: ji.orthogonal(scale=math.sqrt(s2)),
        "delta_orthogonal": lambda: _delta_orthogonal(s2),
        # Untruncated normals, so Var(W_ij) is exactly the tabulated value.
        "xavier_normal": lambda: ji.variance_scaling(1.0, "fan_avg", "normal"),
        "xavier_uniform": lambda: ji.glorot_uniform(),
        "he_normal": lambda: ji.variance_scaling(2.0, "fan_in", "normal"),
        "he_uniform": lambda: ji.he_uniform(),
        "lecun_normal": lambda: ji.variance_scaling(1.0, "fan_in", "normal"),
        "lecun_uniform": lambda: ji.lecun_uniform(),
    }[init.name]()


def _delta_orthogonal(sigma_w2: float):
    base = jax.nn.initializers.delta_orthogonal(scale=math.sqrt(sigma_w2))

    def init(key, shape, dtype=jnp.float32):
        if len(shape) not in (3, 4, 5):
            raise ValueError(
                f"delta_orthogonal: kernel must be 3-, 4- or 5-D (*spatial, in, out), got {shape}"
            )
        if shape[-2] > shape[-1]:
            raise ValueError(
                "delta_orthogonal: needs in_channels <= out_channels "
                f"(an orthogonal centre tap), got in={shape[-2]}, out={shape[-1]}"
            )
        return base(key, shape, dtype)

    return init


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
