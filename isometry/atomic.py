"""Atomic file writes (a temporary file in the target's directory, then ``os.replace``); digests.

A reader never sees a half-written file, and an interrupted run leaves either
the old file or the new one; the file gets the mode a plain ``open()`` gives
(``0o666`` less the umask). :func:`sha256` and :func:`tree_digests` give the
checksums that let a reader tell an intact file or directory from a damaged
one (truncated, overwritten, a file missing).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
from pathlib import Path

import numpy as np

__all__ = [
    "jsonable",
    "sha256",
    "tree_digests",
    "write_bytes",
    "write_json",
    "write_npz",
    "write_text",
]


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new file beside ``path`` opened for writing: ``(fd, temp path)``.

    Created by ``os.open`` with mode ``0o666``, as a plain ``open()`` creates a
    file, so the process's umask gives the final file its usual mode (0644
    under umask 022; ``tempfile.mkstemp`` would make it 0600).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {path}")


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; the file gets the mode ``open()`` would give."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return write_bytes(path, text.encode())


def jsonable(x):
    """``x`` as JSON-able values: dicts (keys as text), lists, numbers, text.

    Tuples and arrays become lists (numpy scalars Python numbers); non-finite
    floats become ``"inf"``/``"-inf"``/``None`` (JSON has no infinities or NaN).
    """
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return jsonable(np.asarray(x).tolist())
    if isinstance(x, float) and not np.isfinite(x):
        return None if np.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def write_json(path: str | os.PathLike, obj) -> Path:
    """JSON with arrays as lists and non-finite floats as ``"inf"``/``"-inf"``/``null``."""
    return write_text(path, json.dumps(jsonable(obj), indent=2, sort_keys=True) + "\n")


def write_npz(path: str | os.PathLike, **arrays) -> Path:
    """Write ``arrays`` to an ``.npz`` file atomically (temp file + rename); returns the path."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return write_bytes(path, buf.getvalue())


def sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_digests(directory: str | os.PathLike) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``directory`` (POSIX paths, sorted)."""
    root = Path(directory)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): sha256(p) for p in files}
