"""A run's output directory: ``config.json``, ``metrics.jsonl``, orbax checkpoints, a lock.

``metrics.jsonl`` holds one JSON record per logged step (appended and
fsynced; :class:`MetricsLog`); a resumed run first truncates the records past
its checkpoint, so its metrics equal an uninterrupted run's. ``config.json``
is written once and checked on resume (:func:`prepare_dir`; only a longer
run of a constant learning rate may continue a shorter one). Checkpoints
live in ``checkpoints/<step>/`` (orbax), each with ``checkpoints/<step>.sha256.json``
beside it: the SHA-256 of every file of the step directory, written atomically
after the save completed (:func:`save_checkpoint`). :func:`restore_checkpoint`
verifies a checkpoint against it before restoring and falls back to the newest
intact one, reporting each one it skipped and why (empty step directory, a
file missing, truncated or overwritten, an orbax restore error). A checkpoint
without a checksum (written before checksums existed, or its save was cut
short just after orbax committed it) is used only if orbax restores it whole
and finite, with a note saying it was not verified.
One process at a time writes a directory: :func:`lock_run` takes an OS file
lock (``fcntl.flock`` on ``.lock``), released when the process exits or dies.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from isometry import atomic
from isometry.jsonlog import MetricsLog, plain

__all__ = [
    "MetricsLog",
    "Restored",
    "RunLockedError",
    "checkpoint_manager",
    "lock_run",
    "plain",
    "prepare_dir",
    "read_json",
    "restore_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
]


class RunLockedError(RuntimeError):
    """Another process is writing the run directory."""


def lock_run(out_dir: str | os.PathLike):
    """Lock ``out_dir`` for this process: an open file to close when done (the lock goes with it).

    ``fcntl.flock`` on ``out_dir/.lock``, exclusive and non-blocking; the OS
    releases it when the file is closed or the process ends, also by a crash.

    Raises:
        RunLockedError: another process holds the lock (names the directory).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    f = open(out_dir / ".lock", "a+")  # held open: the lock lives as long as the file
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise RunLockedError(
            f"out_dir {out_dir} is in use by another training process"
            f"{f' (pid {holder})' if holder.isdigit() else ''}; wait for it to finish or "
            "use another output directory"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def read_json(path: Path, what: str):
    """``json.loads`` of ``path``; a ``ValueError`` naming the file if it is damaged."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable {what} ({err})") from None


def checkpoint_manager(out_dir: Path, keep: int):
    """An orbax ``CheckpointManager`` of ``out_dir/checkpoints`` keeping ``keep`` steps.

    Temporary directories of a save that never finished are removed on opening.
    """
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=False, create=True,
        cleanup_tmp_directories=True,
    )  # fmt: skip
    return ocp.CheckpointManager((out_dir / "checkpoints").absolute(), options=options)


def _step_dir(mngr, step: int) -> Path:
    return Path(str(mngr.directory)) / str(step)


def _checksum_path(mngr, step: int) -> Path:
    return Path(str(mngr.directory)) / f"{step}.sha256.json"


def save_checkpoint(mngr, step: int, state) -> None:
    """Save ``state`` at ``step`` with its checksum (no-op without a manager or when saved).

    The checksum file ``<step>.sha256.json`` (SHA-256 of each file of the step
    directory) is written atomically once orbax has finished the save, so a
    checkpoint without one is one whose save did not complete. Checksums of
    steps orbax has since removed (``keep_checkpoints``) are removed too.
    """
    import orbax.checkpoint as ocp

    if mngr is None or step in mngr.all_steps():
        return
    mngr.save(step, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()
    digests = atomic.tree_digests(_step_dir(mngr, step))
    atomic.write_json(_checksum_path(mngr, step), {"step": step, "sha256": digests})
    kept = {str(s) for s in mngr.all_steps()}
    for p in Path(str(mngr.directory)).glob("*.sha256.json"):
        if p.name.split(".")[0] not in kept:
            p.unlink(missing_ok=True)


def _names(kind: str, names: list[str]) -> str:
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"{kind} {shown}"


NO_CHECKSUM = "it has no checksum file"


def verify_checkpoint(mngr, step: int) -> str | None:
    """``None`` if checkpoint ``step`` matches its checksum, else what is wrong with it.

    A missing checksum file gives a reason starting with ``NO_CHECKSUM``.
    """
    d, cpath = _step_dir(mngr, step), _checksum_path(mngr, step)
    if not d.is_dir() or not any(d.iterdir()):
        return "its step directory is empty"
    if not cpath.exists():
        return f"{NO_CHECKSUM} {cpath.name}"
    try:
        want = json.loads(cpath.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its checksum file {cpath.name} is unreadable ({err})"
    have = atomic.tree_digests(d)
    problems = [
        _names(kind, names)
        for kind, names in (
            ("missing:", sorted(set(want) - set(have))),
            ("changed (truncated or overwritten):",
             sorted(k for k in want if k in have and have[k] != want[k])),
            ("unexpected:", sorted(set(have) - set(want))),
        )
        if names
    ]  # fmt: skip
    return f"it fails its checksum ({'; '.join(problems)})" if problems else None


def _finite(tree) -> bool:
    leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
    return all(np.all(np.isfinite(x)) for x in leaves if np.issubdtype(x.dtype, np.inexact))


def _restore(mngr, step: int, state):
    """``(state, reason)``: restored (``reason`` ``None``, or a note) or ``None`` and why not.

    A checkpoint without a checksum file (written before checksums, or its
    save was cut short after orbax committed it) is accepted only if orbax
    restores it whole and every float in it is finite; the note says so.
    """
    import orbax.checkpoint as ocp

    reason = verify_checkpoint(mngr, step)
    unverified = reason is not None and reason.startswith(NO_CHECKSUM)
    if reason is not None and not unverified:
        return None, reason
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
        restored = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as err:  # any orbax/tensorstore failure: damaged
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        why = f"orbax could not restore it ({type(err).__name__}: {first[:200]})"
        return None, f"{reason}; {why}" if unverified else why
    if not unverified:
        return restored, None
    if not _finite(restored):
        return None, f"{reason} and it holds non-finite values"
    return restored, f"{reason}, but orbax restored it whole and finite (not verified)"


class Restored(NamedTuple):
    """What :func:`restore_checkpoint` found.

    Attributes:
        step: the restored step (0: no usable checkpoint, ``state`` as given).
        state: the restored state.
        skipped: ``(step, reason)`` of each newer checkpoint that was damaged.
        note: about the restored checkpoint (one without a checksum), or ``None``.
    """

    step: int
    state: Any
    skipped: list
    note: str | None


def restore_checkpoint(mngr, state) -> Restored:
    """The newest intact checkpoint (:class:`Restored`; step 0 if there is none).

    Checkpoints are tried newest first; each is verified against its checksum
    (:func:`verify_checkpoint`) and restored by orbax. The newer ones that
    failed are deleted, so the replayed steps save fresh checkpoints in their
    place.
    """
    if mngr is None:
        return Restored(0, state, [], None)
    mngr.reload()
    skipped, found = [], Restored(0, state, [], None)
    for s in sorted(mngr.all_steps(), reverse=True):
        out, reason = _restore(mngr, s, state)
        if out is not None:
            found = Restored(int(s), out, [], reason)
            break
        skipped.append((int(s), reason))
    for s, _ in skipped:
        mngr.delete(s)
        _checksum_path(mngr, s).unlink(missing_ok=True)
    return found._replace(skipped=skipped)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _extension(old: dict, new: dict, diff: list[str]) -> str | None:
    """Why ``new`` may not continue the run of ``old``, or ``None`` if it may (more steps)."""
    if diff != ["train.steps"]:
        return f"differs in: {', '.join(diff)}"
    before, after = old["train"]["steps"], new["train"]["steps"]
    if after < before:
        return f"has {before} steps; a run cannot be shortened to {after}"
    if new["train"].get("schedule", "constant") != "constant":
        return (
            f"has {before} steps and its {new['train']['schedule']!r} schedule decays over "
            f"all steps, so continuing it to {after} would not equal a {after}-step run; "
            "only a constant schedule can be extended"
        )
    return None


def prepare_dir(out_dir: Path, config_dict: dict) -> int | None:
    """Write ``config.json``, or check that a resumed directory has the same config.

    A config that differs only in a larger ``train.steps`` continues the run
    when the learning rate does not depend on the number of steps (constant
    schedule): ``config.json`` is updated and the old step count returned.
    Otherwise returns ``None``.

    Raises:
        ValueError: ``out_dir`` holds a run of another config, or its
            ``config.json`` is damaged (names the file).
    """
    path = out_dir / "config.json"
    normalized = json.loads(json.dumps(plain(config_dict)))
    if not path.exists():
        atomic.write_json(path, normalized)
        return None
    old = read_json(path, "run config")
    if old == normalized:
        return None
    a, b = _flat(old), _flat(normalized)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    why = _extension(old, normalized, diff)
    if why is not None:
        raise ValueError(
            f"out_dir {out_dir} holds a run with a different config (it {why}); "
            "use a new output directory to start a new run"
        )
    atomic.write_json(path, normalized)
    return int(old["train"]["steps"])
