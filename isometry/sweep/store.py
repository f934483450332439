"""The resumable results store: one atomically written file per finished point.

See the package docstring (:mod:`isometry.sweep`) for the layout. A
:class:`Store` refuses a directory holding another study or configuration
(:class:`ConfigMismatchError`); :func:`load_table` reads the aggregate csv,
:func:`typed_column` a column of the point records as one typed array.

Each point's ``.json`` carries the SHA-256 of its own content and of its
``.npz``; a point counts as finished only when both verify
(:meth:`Store.verify`). A damaged point (truncated or overwritten ``.npz``,
unreadable or altered ``.json``) is reported on stderr with its file and
computed again; reading one raises a ``ValueError`` naming the file. Points
of stores written before the checksums are verified by loading them whole.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from isometry import atomic
from isometry.sweep.grid import config_dict, fingerprint, plain_value, point_id

__all__ = ["STORE_FORMAT", "ConfigMismatchError", "Store", "load_table", "typed_column"]

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
        """Whether ``point`` is finished: its ``.json`` exists and verifies.

        A damaged point is reported on stderr (file and reason) and counts as
        not finished, so a sweep computes it again.
        """
        if not self.path(point).exists():
            return False
        reason = self.verify(point)
        if reason is not None:
            print(f"[{self.study}] {reason}; computing that point again", file=sys.stderr,
                  flush=True)  # fmt: skip
        return reason is None

    def verify(self, point: Mapping[str, Any]) -> str | None:
        """``None`` if the files of a finished ``point`` are intact, else what is wrong.

        The ``.json`` must parse to a point record whose checksum matches; its
        ``.npz`` must match the checksum in the record (a store written before
        checksums: the ``.npz`` must load whole).
        """
        path = self.path(point)
        try:
            rec = _read_record(path)
        except ValueError as err:
            return str(err)
        npz = self.path(point, ".npz")
        meta = rec.get("arrays")
        if meta is None:
            return _npz_loads(npz) if npz.exists() else None
        if not npz.exists():
            return f"{npz} is missing (named in {path.name})"
        if atomic.sha256(npz) != meta.get("sha256"):
            return f"{npz} fails its checksum (truncated or overwritten)"
        return None

    def pending(self, points: Sequence[Mapping[str, Any]]) -> list[int]:
        """Indices of the points not yet finished."""
        return [i for i, p in enumerate(points) if not self.done(p)]

    def write(self, point, rows, *, arrays: Mapping[str, Any] | None = None, elapsed_s=None):
        """Record a finished point: ``rows`` (a dict or a list of dicts) and optional arrays.

        Arrays go to ``<id>.npz`` first; the ``.json`` (the finished marker) last.
        The record holds the SHA-256 of the ``.npz`` and of its own content.
        """
        point = {k: plain_value(v) for k, v in point.items()}
        rec = {"point": point, "rows": _rows(rows), "elapsed_s": elapsed_s}
        if arrays:
            npz = atomic.write_npz(self.path(point, ".npz"), **arrays)
            rec["arrays"] = {"file": npz.name, "sha256": atomic.sha256(npz)}
        rec = atomic.jsonable(rec)
        atomic.write_json(self.path(point), {**rec, "sha256": _record_digest(rec)})

    def read(self, point: Mapping[str, Any]) -> dict[str, Any]:
        """The record of a finished point: ``{"point", "rows", "elapsed_s", ...}``.

        Raises:
            ValueError: the ``.json`` is damaged (names the file).
        """
        return _read_record(self.path(point))

    def arrays(self, point: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The arrays saved with a point (empty if none).

        Raises:
            ValueError: the point's files are damaged (names the file).
        """
        p = self.path(point, ".npz")
        if not p.exists():
            return {}
        reason = self.verify(point) if self.path(point).exists() else _npz_loads(p)
        if reason is not None:
            raise ValueError(reason)
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


def _record_digest(rec: Mapping[str, Any]) -> str:
    """SHA-256 of a point record's content (without its own ``"sha256"``), canonical JSON."""
    body = {k: v for k, v in rec.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _read_record(path: Path) -> dict[str, Any]:
    """A point's ``.json``, checked; a ``ValueError`` naming the file if it is damaged."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable point record ({err})") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("rows"), list):
        raise ValueError(f"{path} is not a point record (no list of rows)")
    if "sha256" in rec and rec["sha256"] != _record_digest(rec):
        raise ValueError(f"{path} fails its checksum (its content was changed)")
    return rec


def _npz_loads(path: Path) -> str | None:
    """``None`` if the ``.npz`` at ``path`` loads whole, else what is wrong with it."""
    try:
        with np.load(path) as z:
            for k in z.files:
                z[k]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        return f"{path} does not load ({type(err).__name__}: {err})"
    return None


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


_NON_FINITE = {"inf": np.inf, "-inf": -np.inf, "nan": np.nan}
"""Text that :func:`isometry.atomic.jsonable` writes for non-finite floats (NaN is ``None``)."""


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def typed_column(values: Sequence) -> np.ndarray:
    """One column of point-record values (``None`` where a row has none) as a typed array.

    The values as :meth:`Store.read` gives them (JSON: non-finite floats are
    ``"inf"``, ``"-inf"`` or ``None``), shape ``(n,)``:

    * only booleans: ``bool``;
    * only integers: ``int64``;
    * numbers with ``None`` or non-finite text: ``float64`` (``None`` is NaN);
    * booleans with ``None``: ``float64`` (1, 0, NaN);
    * only text: ``str``; anything else (lists, mixtures): ``object``.

    The same numbers :func:`load_table` reads from the csv, without the text
    round trip (a boolean stays a boolean).
    """
    vals = list(values)
    present = [v for v in vals if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        if len(present) == len(vals):
            return np.asarray(vals, dtype=bool)
        return np.asarray([np.nan if v is None else float(v) for v in vals])
    numeric = [v for v in present if not (isinstance(v, str) and v in _NON_FINITE)]
    if all(_number(v) for v in numeric):
        if vals and len(numeric) == len(vals) and all(isinstance(v, int) for v in numeric):
            return np.asarray(vals, dtype=np.int64)
        floats = [np.nan if v is None else _NON_FINITE.get(v, v) if isinstance(v, str) else v
                  for v in vals]  # fmt: skip
        return np.asarray(floats, dtype=np.float64)
    if all(isinstance(v, str) for v in vals):
        return np.asarray(vals, dtype=str)
    out = np.empty(len(vals), dtype=object)
    out[:] = vals
    return out


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
    try:
        with path.open(newline="") as f:
            r = csv.reader(f)
            header = next(r, None)
            data = list(r)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path} is not a readable table ({err})") from None
    if header is None:
        return {}
    for n, row in enumerate(data, 2):
        if len(row) != len(header):
            raise ValueError(
                f"{path} line {n} has {len(row)} fields, its header {len(header)} (a damaged "
                "table: run the sweep again to rewrite it)"
            )
    return {c: _column([row[i] for row in data]) for i, c in enumerate(header)}
