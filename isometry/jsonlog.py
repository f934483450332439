"""Append-only JSON-lines logs that an interruption cannot break: :class:`MetricsLog`.

One JSON record per line, each with an integer ``"step"``. ``MetricsLog.append``
writes whole lines, then ``flush`` and ``fsync``, so a crash leaves at most one
partial last line; :meth:`MetricsLog.read` drops it, and
``MetricsLog.truncate`` (``step``) atomically rewrites the file keeping the
records with ``"step" <= step``, which a resumed run calls with the step it
resumes from, so its log equals an uninterrupted run's. Used by the training
loop's ``metrics.jsonl`` and the probe monitor's log. :func:`plain` makes a
record JSON-safe (arrays to lists, non-finite floats to ``None``/``"inf"``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax
import numpy as np

from isometry import atomic

__all__ = ["MetricsLog", "plain"]


def plain(x):
    """JSON-safe: arrays to lists, numpy scalars to Python, non-finite floats to strings/None."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [plain(v) for v in x]
    if isinstance(x, np.ndarray | np.generic | jax.Array):
        return plain(np.asarray(x).tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


class MetricsLog:
    """``metrics.jsonl``: one JSON record per line, each with an integer ``"step"``.

    ``append`` writes whole lines and fsyncs; ``truncate(step)`` atomically
    rewrites the file keeping the records with ``"step" <= step`` (and
    dropping a partial last line left by a crash), which a resumed run calls
    with its checkpoint step.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def read(self) -> list[dict]:
        """The records; a partial last line (an interrupted write) is dropped.

        Raises:
            ValueError: a line before the last is not a JSON record with a
                ``"step"`` (names the file and the line).
        """
        if not self.path.exists():
            return []
        lines = self.path.read_text(errors="replace").splitlines()
        out = []
        for n, line in enumerate(lines, 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                out.append(rec)
            elif n < len(lines):
                raise ValueError(
                    f"{self.path} line {n} is not a metrics record ({line[:60]!r}); "
                    "remove or repair that line to resume the run"
                )
        return out

    def truncate(self, step: int) -> list[dict]:
        kept = [r for r in self.read() if r["step"] <= step]
        atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(plain(r)) + "\n" for r in records)
        with open(self.path, "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
