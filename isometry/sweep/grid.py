"""Grids of sweep points: products and zips of parameter lists, point names and keys.

A point is a dict ``{parameter: value}``; :func:`point_id` names it by the
hash of its canonical JSON, :func:`point_key` gives its PRNG key, and
:func:`fingerprint` names a study's configuration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from isometry import atomic

__all__ = [
    "Grid",
    "canonical_json",
    "config_dict",
    "fingerprint",
    "plain_value",
    "point_id",
    "point_key",
    "product",
    "zipped",
]


def plain_value(v):
    """Python scalars/tuples from numpy values (so points hash and serialize the same)."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, list | tuple):
        return tuple(plain_value(x) for x in v)
    return v


@dataclasses.dataclass(frozen=True)
class Grid:
    """A grid of points: the product of *blocks*; a block zips parameter lists.

    ``blocks`` is a tuple of ``(names, rows)``: each row gives values for
    ``names``. :func:`product` makes one block per parameter, :func:`zipped`
    one block for several parameters of equal length; ``g1 * g2`` is the
    product. Points enumerate the last block fastest.
    """

    blocks: tuple[tuple[tuple[str, ...], tuple[tuple, ...]], ...] = ()

    def __post_init__(self):
        seen: set[str] = set()
        for names, _ in self.blocks:
            dup = seen.intersection(names)
            if dup:
                raise ValueError(f"grid parameter {sorted(dup)[0]!r} appears twice")
            seen.update(names)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for names, _ in self.blocks for n in names)

    def __mul__(self, other: Grid) -> Grid:
        if not isinstance(other, Grid):
            return NotImplemented
        return Grid(self.blocks + other.blocks)

    def __len__(self) -> int:
        return math.prod(len(rows) for _, rows in self.blocks)

    def points(self) -> list[dict[str, Any]]:
        """All points as dicts ``{name: value}``, in a fixed order."""
        out = []
        for combo in itertools.product(*(rows for _, rows in self.blocks)):
            p: dict[str, Any] = {}
            for (names, _), row in zip(self.blocks, combo, strict=True):
                p.update(zip(names, row, strict=True))
            out.append(p)
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.points())

    @property
    def shape(self) -> tuple[int, ...]:
        """One axis per block (a zipped block is one axis), its length: :meth:`points` in C
        order fill an array of this shape."""
        return tuple(len(rows) for _, rows in self.blocks)

    def axis(self, name: str) -> int:
        """The axis of parameter ``name`` (its block's position); ``KeyError`` naming the
        parameters otherwise."""
        for i, (names, _) in enumerate(self.blocks):
            if name in names:
                return i
        raise KeyError(f"no grid parameter {name!r}; parameters: {', '.join(self.names)}")

    def values(self, name: str) -> tuple:
        """The values of parameter ``name`` along its axis (:meth:`axis`), in grid order."""
        names, rows = self.blocks[self.axis(name)]
        k = names.index(name)
        return tuple(row[k] for row in rows)


def product(**axes: Iterable) -> Grid:
    """The product grid of parameter lists: ``product(a=[1, 2], b=[3, 4])`` has 4 points."""
    blocks = []
    for name, values in axes.items():
        vals = tuple(plain_value(v) for v in values)
        if not vals:
            raise ValueError(f"grid parameter {name!r} has no values")
        blocks.append(((name,), tuple((v,) for v in vals)))
    return Grid(tuple(blocks))


def zipped(**axes: Iterable) -> Grid:
    """Parameter lists taken together: ``zipped(a=[1, 2], b=[3, 4])`` has 2 points."""
    cols = {k: tuple(plain_value(v) for v in vals) for k, vals in axes.items()}
    lengths = {k: len(v) for k, v in cols.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"zipped parameter lists differ in length: {lengths}")
    if not cols or not next(iter(lengths.values())):
        raise ValueError("zipped needs at least one non-empty parameter list")
    return Grid(((tuple(cols), tuple(zip(*cols.values(), strict=True))),))


def canonical_json(obj) -> str:
    """Compact sorted JSON of :func:`isometry.atomic.jsonable` values: equal values, equal text."""
    return json.dumps(atomic.jsonable(obj), sort_keys=True, separators=(",", ":"))


def point_id(point: Mapping[str, Any]) -> str:
    """A stable 16-hex-digit name of a point (hash of its canonical JSON)."""
    return hashlib.sha256(canonical_json(dict(point)).encode()).hexdigest()[:16]


def point_key(seed: int, index):
    """The PRNG key of grid point ``index`` under base ``seed``: ``fold_in(key(seed), index)``.

    The one key convention of the experiments: a point's randomness depends
    only on the base seed and its index in the grid (not on which device or
    host runs it); split it for the roles inside the point (weights, inputs,
    loss projection). ``index`` may be traced (``vmap`` over points).
    """
    import jax

    return jax.random.fold_in(jax.random.key(seed), index)


def config_dict(config) -> dict[str, Any]:
    """A frozen-dataclass config as a JSON-able dict (tuples become lists)."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"config must be a dataclass instance, got {type(config).__name__}")
    return json.loads(canonical_json(dataclasses.asdict(config)))


def fingerprint(study: str, config) -> str:
    """Hash of the study name and every config field: a store holds one fingerprint."""
    text = canonical_json({"study": study, "config": config_dict(config)})
    return hashlib.sha256(text.encode()).hexdigest()[:16]
