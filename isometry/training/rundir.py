"""A run's output directory: ``config.json``, ``metrics.jsonl``, orbax checkpoints.

``metrics.jsonl`` holds one JSON record per logged step (appended and
fsynced; :class:`MetricsLog`); a resumed run first truncates the records past
its checkpoint, so its metrics equal an uninterrupted run's. ``config.json``
is written once and checked on resume (:func:`prepare_dir`). Checkpoints
live in ``checkpoints/``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax
import numpy as np

from isometry import atomic

__all__ = [
    "MetricsLog",
    "checkpoint_manager",
    "plain",
    "prepare_dir",
    "restore_checkpoint",
    "save_checkpoint",
]


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
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a partial line from an interrupted write
            if isinstance(rec, dict) and "step" in rec:
                out.append(rec)
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


def checkpoint_manager(out_dir: Path, keep: int):
    """An orbax ``CheckpointManager`` of ``out_dir/checkpoints`` keeping ``keep`` steps."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=False, create=True
    )
    return ocp.CheckpointManager((out_dir / "checkpoints").absolute(), options=options)


def save_checkpoint(mngr, step: int, state) -> None:
    """Save ``state`` at ``step`` (no-op without a manager or when the step is saved)."""
    import orbax.checkpoint as ocp

    if mngr is not None and step not in mngr.all_steps():
        mngr.save(step, args=ocp.args.StandardSave(state))


def restore_checkpoint(mngr, state):
    """``(step, state)`` from the latest checkpoint, or ``(0, state)`` if there is none."""
    import orbax.checkpoint as ocp

    step = None if mngr is None else mngr.latest_step()
    if step is None:
        return 0, state
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return int(step), mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def prepare_dir(out_dir: Path, config_dict: dict) -> None:
    """Write ``config.json``, or check that a resumed directory has the same config."""
    path = out_dir / "config.json"
    normalized = json.loads(json.dumps(plain(config_dict)))
    if path.exists():
        old = json.loads(path.read_text())
        if old != normalized:
            a, b = _flat(old), _flat(normalized)
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise ValueError(
                f"out_dir {out_dir} holds a run with a different config (differs in: "
                f"{', '.join(diff)}); use a new output directory to start a new run"
            )
        return
    atomic.write_json(path, normalized)
