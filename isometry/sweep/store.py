"""The resumable results store: one atomically written file per finished point.

See the package docstring (:mod:`isometry.sweep`) for the layout. A
:class:`Store` refuses a directory holding another study or configuration
(:class:`ConfigMismatchError`); :func:`load_table` reads the aggregate csv.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from isometry import atomic
from isometry.sweep.grid import config_dict, fingerprint, plain_value, point_id

__all__ = ["STORE_FORMAT", "ConfigMismatchError", "Store", "load_table"]

STORE_FORMAT = 1


class ConfigMismatchError(ValueError):
    """A store directory already holds results of a different study or configuration."""


def _rows(rows) -> list[dict[str, Any]]:
    if isinstance(rows, Mapping):
        rows = [rows]
    out = []
    for r in rows:
        if not isinstance(r, Mapping):
            raise TypeError(f"a result row must be a dict, got {type(r).__name__}")
        out.append({str(k): plain_value(np.asarray(v).item() if np.ndim(v) == 0 else v)
                    for k, v in r.items()})  # fmt: skip
    return out


class Store:
    """One sweep's results directory: a file per finished point, atomic, resumable.

    ``Store(root, study, config)`` creates the directory (writing
    ``sweep.json``) or reopens it; it raises :class:`ConfigMismatchError` when
    the directory holds results of another study or of a config with a
    different :func:`fingerprint`, naming the fields that differ.
    """

    def __init__(self, root: str | os.PathLike, study: str, config):
        self.root = Path(root)
        self.study = str(study)
        self.config = config
        self.fingerprint = fingerprint(self.study, config)
        manifest = self.root / "sweep.json"
        new = {
            "format": STORE_FORMAT,
            "study": self.study,
            "fingerprint": self.fingerprint,
            "config": config_dict(config),
        }
        if manifest.exists():
            try:
                old = json.loads(manifest.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise ConfigMismatchError(
                    f"{manifest} is not a readable sweep manifest ({err})"
                ) from None
            self._check(old, new)
        else:
            foreign = [
                e.name
                for e in (self.root.iterdir() if self.root.exists() else ())
                if not e.name.startswith(".") and e.name != "points"
            ]
            if foreign:
                raise ConfigMismatchError(
                    f"{self.root} exists and is not a sweep store (no sweep.json); "
                    "choose an empty or new directory"
                )
            atomic.write_json(manifest, new)
        (self.root / "points").mkdir(parents=True, exist_ok=True)

    def _check(self, old: dict, new: dict) -> None:
        if old.get("study") != new["study"]:
            raise ConfigMismatchError(
                f"{self.root} holds results of study {old.get('study')!r}, not "
                f"{new['study']!r}; refusing to mix them (use another output directory)"
            )
        if old.get("fingerprint") == new["fingerprint"]:
            return
        a, b = old.get("config", {}), new["config"]
        diff = [
            f"{k}: {a.get(k, '<absent>')!r} (stored) vs {b.get(k, '<absent>')!r} (now)"
            for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)
        ]
        raise ConfigMismatchError(
            f"{self.root} holds results of a different {new['study']} configuration; "
            f"refusing to mix them. Differences: {'; '.join(diff) or 'format'}. "
            "Use another output directory, or remove this one to start over."
        )

    def path(self, point: Mapping[str, Any], suffix: str = ".json") -> Path:
        return self.root / "points" / f"{point_id(point)}{suffix}"

    def done(self, point: Mapping[str, Any]) -> bool:
        """Whether ``point`` is finished (its ``.json`` exists)."""
        return self.path(point).exists()

    def pending(self, points: Sequence[Mapping[str, Any]]) -> list[int]:
        """Indices of the points not yet finished."""
        return [i for i, p in enumerate(points) if not self.done(p)]

    def write(self, point, rows, *, arrays: Mapping[str, Any] | None = None, elapsed_s=None):
        """Record a finished point: ``rows`` (a dict or a list of dicts) and optional arrays.

        Arrays go to ``<id>.npz`` first; the ``.json`` (the finished marker) last.
        """
        point = {k: plain_value(v) for k, v in point.items()}
        if arrays:
            atomic.write_npz(self.path(point, ".npz"), **arrays)
        rec = {"point": point, "rows": _rows(rows), "elapsed_s": elapsed_s}
        atomic.write_json(self.path(point), rec)

    def read(self, point: Mapping[str, Any]) -> dict[str, Any]:
        """The record of a finished point: ``{"point", "rows", "elapsed_s"}``."""
        return json.loads(self.path(point).read_text())

    def arrays(self, point: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The arrays saved with a point (empty if none)."""
        p = self.path(point, ".npz")
        if not p.exists():
            return {}
        with np.load(p) as z:
            return {k: z[k] for k in z.files}

    def table(self, points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Rows ``{**point, **row}`` of the finished ``points``, in their order."""
        out = []
        for p in points:
            if self.done(p):
                for r in self.read(p)["rows"]:
                    out.append({**p, **r})
        return out

    def write_csv(self, points: Sequence[Mapping[str, Any]], name: str = "results.csv") -> Path:
        """Write the aggregate table of ``points`` (atomically); columns: point keys, then rows'."""
        rows = self.table(points)
        cols: list[str] = []
        for r in rows:
            cols.extend(k for k in r if k not in cols)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(cols)
        for r in rows:
            w.writerow([_cell(r.get(c)) for c in cols])
        return atomic.write_text(self.root / name, buf.getvalue())


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list | tuple):
        return json.dumps(v)
    return str(v)


def _column(values: list[str]) -> np.ndarray:
    for conv in (int, float):
        try:
            return np.asarray([conv(v) if v != "" else np.nan for v in values])
        except (ValueError, TypeError):
            continue
    return np.asarray(values, dtype=object)


def load_table(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The aggregate table as columns ``{name: array}`` (numbers typed, text as objects).

    ``path`` is a store directory or its ``results.csv``. pandas users:
    ``pandas.DataFrame(load_table(path))`` (or ``pandas.read_csv``).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "results.csv"
    if not path.exists():
        raise FileNotFoundError(f"no aggregate table at {path} (has the sweep finished?)")
    with path.open(newline="") as f:
        r = csv.reader(f)
        header = next(r, None)
        if header is None:
            return {}
        data = list(r)
    return {c: _column([row[i] for row in data]) for i, c in enumerate(header)}
