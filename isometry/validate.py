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
    "choice",
    "int_fields",
    "is_concrete",
    "names",
    "positive_int",
    "positive_ints",
    "real_array",
    "reals",
]


def is_concrete(x) -> bool:
    return not isinstance(x, core.Tracer)


def real_array(name: str, x, *, minimum=None, strict=False, maximum=None, nonempty=False):
    """Raise ``ValueError`` naming ``name`` unless ``x`` is finite and in range."""
    if not is_concrete(x):
        return x
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


def positive_int(name: str, x, minimum: int = 1) -> int:
    if isinstance(x, bool) or not isinstance(x, int | np.integer) or x < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {x!r}")
    return int(x)


def choice(name: str, x, allowed) -> str:
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
