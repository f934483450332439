"""Argument validation at the public boundary (one concern: clear errors).

Every public function of the library, the experiments and the command checks
its arguments with these helpers, so a bad value gets a ``ValueError`` or
``TypeError`` naming the parameter and what is allowed, never a traceback from
inside jax. Checks run only on concrete values; under ``jit`` tracing they are
skipped, so validated functions stay jittable.
"""

from __future__ import annotations

import numpy as np
from jax import core

__all__ = [
    "broadcastable",
    "choice",
    "finite_values",
    "int_fields",
    "is_concrete",
    "names",
    "positive_int",
    "positive_ints",
    "prng_key",
    "real_array",
    "reals",
]


def is_concrete(x) -> bool:
    """Whether ``x`` is a concrete value rather than a tracer inside ``jit``."""
    return not isinstance(x, core.Tracer)


def real_array(name: str, x, *, minimum=None, strict=False, maximum=None, nonempty=False):
    """Raise ``ValueError`` naming ``name`` unless ``x`` is finite and in range."""
    if not is_concrete(x):
        return x
    if x is None or isinstance(x, str | bytes) or _has_string(x):
        raise TypeError(f"{name} must be a real number or array, got {type(x).__name__} {x!r}")
    try:
        a = np.asarray(x, dtype=float)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a real number or array, got {type(x).__name__}") from err
    if nonempty and a.size == 0:
        raise ValueError(f"{name} must not be empty")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite, got {_show(a)}")
    if minimum is not None:
        bad = a <= minimum if strict else a < minimum
        if np.any(bad):
            rel = ">" if strict else ">="
            raise ValueError(f"{name} must be {rel} {minimum}, got {_show(a[bad])}")
    if maximum is not None and np.any(a > maximum):
        raise ValueError(f"{name} must be <= {maximum}, got {_show(a[a > maximum])}")
    return x


def _has_string(x) -> bool:
    """A list or tuple holding a string or ``None`` (``np.asarray(["1"], float)`` accepts it)."""
    if isinstance(x, list | tuple):
        return any(v is None or isinstance(v, str | bytes) or _has_string(v) for v in x)
    return False


def finite_values(name: str, x, *, nonempty: bool = True):
    """Raise ``ValueError`` naming ``name`` if the concrete array ``x`` is empty or has NaN/inf.

    Measured values (spectra, samples) go through this before a statistic that
    would turn one NaN into a silent NaN or a wrong number. Skipped under
    ``jit`` tracing (the value is unknown); returns ``x``.
    """
    if not is_concrete(x):
        return x
    a = np.asarray(x)
    if a.dtype.kind not in "biufc":
        raise TypeError(f"{name} must be a real number or array, got {a.dtype} values {_show(a)}")
    if nonempty and a.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {a.shape}")
    if a.dtype.kind in "fc" and not np.all(np.isfinite(a)):
        bad = ~np.isfinite(a)
        raise ValueError(
            f"{name} must be finite: {int(bad.sum())} of {a.size} entries are NaN or inf "
            f"(e.g. {_show(a[bad])})"
        )
    return x


def broadcastable(**arrays) -> tuple:
    """The broadcast shape of the named arrays; ``ValueError`` naming them and their shapes."""
    shapes = {k: np.shape(v) for k, v in arrays.items()}
    try:
        return np.broadcast_shapes(*shapes.values())
    except ValueError:
        shown = ", ".join(f"{k} {s}" for k, s in shapes.items())
        raise ValueError(
            f"{', '.join(shapes)} must broadcast together, got shapes {shown}"
        ) from None


def prng_key(name: str, key):
    """``key`` is a JAX PRNG key (``jax.random.key(seed)`` or a legacy ``PRNGKey``).

    Raises ``TypeError`` naming ``name`` and how to make one otherwise (an
    integer seed, ``None``, a float array); traced keys pass.
    """
    import jax

    if not is_concrete(key):
        return key
    if isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    legacy = isinstance(key, jax.Array | np.ndarray) and key.dtype == np.uint32
    if legacy and key.shape[-1:] == (2,):
        return key
    raise TypeError(
        f"{name} must be a JAX PRNG key such as jax.random.key(0), got "
        f"{type(key).__name__} {_show(np.asarray(key)) if legacy else repr(key)[:60]}"
    )


def positive_int(name: str, x, minimum: int = 1) -> int:
    """``x`` if it is an integer ``>= minimum``, else a ``ValueError`` naming ``name``."""
    if isinstance(x, bool) or not isinstance(x, int | np.integer) or x < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {x!r}")
    return int(x)


def choice(name: str, x, allowed) -> str:
    """``x`` if it is one of ``allowed``, else a ``ValueError`` naming ``name`` and the choices."""
    if x not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {x!r}")
    return x


def names(field: str, values, allowed) -> tuple:
    """``values`` is a non-empty tuple of entries of ``allowed`` (config fields of names)."""
    if not isinstance(values, tuple) or not values:
        raise ValueError(f"{field} must be a non-empty tuple, got {values!r}")
    for v in values:
        choice(field, v, allowed)
    return values


def positive_ints(field: str, values, minimum: int = 1) -> tuple:
    """``values`` is a non-empty tuple of integers ``>= minimum``."""
    if not isinstance(values, tuple) or not values:
        raise ValueError(f"{field} must be a non-empty tuple, got {values!r}")
    for v in values:
        positive_int(field, v, minimum)
    return values


def int_fields(config, *fields: str, minimum: int = 1) -> None:
    """Each named field of ``config`` is an integer ``>= minimum`` (:func:`positive_int`)."""
    for field in fields:
        positive_int(field, getattr(config, field), minimum)


def reals(field: str, values, *, minimum=None, strict=False) -> tuple:
    """``values`` is a non-empty tuple of finite reals in range (:func:`real_array`)."""
    if not isinstance(values, tuple) or not values:
        raise ValueError(f"{field} must be a non-empty tuple, got {values!r}")
    real_array(field, values, minimum=minimum, strict=strict)
    return values


def _show(a) -> str:
    a = np.ravel(a)
    return np.array2string(a[:5]) + (" ..." if a.size > 5 else "")
