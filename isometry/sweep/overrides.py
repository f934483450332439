"""Config overrides from text (``--set key=value``), typed by the config's annotations.

``parse_overrides(Config, ["depth=8", "train.steps=300"])`` reads each value
as its field's type; :func:`apply_overrides` returns the frozen config with
them applied (dotted keys reach nested config dataclasses).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["apply_overrides", "parse_overrides"]

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse_value(name: str, text: str, tp) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.strip().lower() in ("none", "null"):
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _parse_value(name, text, a)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise TypeError(f"{name}: cannot read {text!r} as {_type_name(tp)}")
    if origin is tuple:
        item = args[0] if args else str
        if (len(args) == 2 and args[1] is Ellipsis) or len(args) <= 1:
            parts = [t.strip() for t in text.split(",") if t.strip()]
            return tuple(_parse_value(name, t, item) for t in parts)
        parts = [t.strip() for t in text.split(",")]
        if len(parts) != len(args):
            raise TypeError(f"{name}: expected {len(args)} comma-separated values, got {text!r}")
        return tuple(_parse_value(name, t, a) for t, a in zip(parts, args, strict=True))
    if origin is typing.Literal:
        for a in args:
            if str(a) == text.strip():
                return a
        raise ValueError(f"{name}: expected one of {list(args)}, got {text!r}")
    if tp is bool:
        t = text.strip().lower()
        if t in _TRUE:
            return True
        if t in _FALSE:
            return False
        raise TypeError(f"{name}: expected true or false, got {text!r}")
    if tp is int:
        try:
            return int(text.strip())
        except ValueError:
            raise TypeError(f"{name}: expected an integer, got {text!r}") from None
    if tp is float:
        try:
            return float(text.strip())
        except ValueError:
            raise TypeError(f"{name}: expected a number, got {text!r}") from None
    if tp is str:
        return text.strip()
    raise TypeError(f"{name}: parameters of type {_type_name(tp)} cannot be set from text")


def _type_name(tp) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def parse_overrides(
    config_type: type, items: Sequence[str], *, name: str | None = None
) -> dict[str, Any]:
    """``["depth=8", "activations=tanh,relu", "train.steps=300"]`` -> typed values by field.

    Types come from the dataclass annotations: ``int``, ``float``, ``bool``
    (true/false/yes/no/1/0), ``str``, ``tuple[T, ...]`` (comma-separated),
    ``T | None`` (``none``). A dotted key ``outer.inner`` sets field ``inner``
    of the nested dataclass field ``outer`` (e.g. an experiment's
    ``train: TrainConfig``); its values come back as ``{"outer": {"inner": v}}``.
    Raises ``ValueError`` for a malformed item or an unknown field (naming the
    close matches), ``TypeError`` for a value of the wrong type.
    """
    if not (isinstance(config_type, type) and dataclasses.is_dataclass(config_type)):
        raise TypeError(f"config_type must be a dataclass type, got {config_type!r}")
    out: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"expected key=value, got {item!r}")
        key, text = item.split("=", 1)
        path = [k.strip().replace("-", "_") for k in key.split(".")]
        target, tp = out, config_type
        for depth, k in enumerate(path):
            hints, fields = _fields(tp)
            if k not in fields:
                close = difflib.get_close_matches(k, fields, n=3)
                hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
                where = ".".join(path[:depth]) or name or config_type.__name__
                raise ValueError(
                    f"unknown parameter {k!r} for {where}{hint} (parameters: {', '.join(fields)})"
                )
            if depth == len(path) - 1:
                target[k] = _parse_value(".".join(path), text, hints[k])
            elif dataclasses.is_dataclass(hints[k]):
                target, tp = target.setdefault(k, {}), hints[k]
            else:
                raise ValueError(f"{'.'.join(path[: depth + 1])} has no fields (got {key!r})")
    return out


def _fields(tp: type) -> tuple[dict[str, Any], list[str]]:
    return typing.get_type_hints(tp), [f.name for f in dataclasses.fields(tp) if f.init]


def _replace(config, values: Mapping[str, Any]):
    nested = {
        k: _replace(getattr(config, k), v) if isinstance(v, dict) else v for k, v in values.items()
    }
    return dataclasses.replace(config, **nested)


def apply_overrides(config, items: Sequence[str], *, name: str | None = None):
    """A copy of the frozen ``config`` with ``key=value`` items applied (:func:`parse_overrides`).

    Dotted keys reach into nested config dataclasses. The configs' own
    validation (``__post_init__``) runs on the result.
    """
    return _replace(config, parse_overrides(type(config), items, name=name))
