"""Running a sweep: sharded vectorized evaluation and independent runs over processes.

:func:`map_sharded` evaluates ``vmap(fn)`` over points sharded along a mesh of
all devices; :func:`run_vectorized` and :func:`run_partitioned` run a grid
into a :class:`~isometry.sweep.store.Store`, skipping finished points.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from isometry.sweep.grid import Grid, canonical_json
from isometry.sweep.progress import Progress
from isometry.sweep.store import Store

__all__ = ["compiler_options", "map_sharded", "run_partitioned", "run_vectorized"]


def compiler_options(optimize: bool) -> dict | None:
    """XLA compiler options of a sweep's programs: the defaults (``None``) when ``optimize``,
    else backend optimization level 0 (faster compiles for small programs run a few times)."""
    return None if optimize else {"xla_backend_optimization_level": 0}


def _agreed_pending(store: Store, points: Sequence[Mapping]) -> list[int]:
    """Pending point indices, as process 0 sees them (broadcast to every process)."""
    import jax

    mask = np.asarray([not store.done(p) for p in points], dtype=np.int32)
    if jax.process_count() > 1 and len(mask):
        from jax.experimental import multihost_utils

        mask = np.asarray(multihost_utils.broadcast_one_to_all(mask))
    return [int(i) for i in np.flatnonzero(mask)]


def _barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def map_sharded(
    fn: Callable[..., Any],
    args: Mapping[str, Any],
    *,
    per_device: int = 4,
    devices=None,
    optimize: bool = True,
) -> Iterator[tuple[np.ndarray, Any]]:
    """Evaluate ``vmap(fn)`` over the points in ``args``, sharded over all devices, in chunks.

    ``fn(**one_point) -> pytree of arrays`` for one point; ``args`` maps
    names to arrays ``(P, ...)``, one entry per point. The points are padded
    to a multiple of ``D * per_device`` (``D`` devices of all processes,
    padding repeats the last point) and evaluated in chunks of that size:
    each chunk is one global array sharded along a ``"points"`` mesh axis,
    so each device computes ``per_device`` points with the same shapes
    whatever ``D`` is. Results are gathered to every process.

    ``optimize=False`` compiles with XLA's backend optimization level 0:
    several times faster to compile, slower to run; the better choice for
    small sweeps with many static combinations (each compiles once).

    A program with LAPACK calls (SVD, eigh, QR) that would run on several CPU
    devices of one process runs on one CPU device per process instead, with
    a ``RuntimeWarning``: concurrent LAPACK custom calls on simulated CPU
    devices can deadlock the XLA CPU runtime. GPUs and TPUs are unaffected.

    Yields ``(indices, outputs)`` per chunk: the point indices ``(k,)`` in
    ``args`` and the outputs (numpy, leading axis ``k``).
    """
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    if not isinstance(per_device, int) or isinstance(per_device, bool) or per_device < 1:
        raise ValueError(f"per_device must be an integer >= 1, got {per_device!r}")
    cols = {k: np.asarray(v) for k, v in args.items()}
    sizes = {k: v.shape[0] if v.ndim else None for k, v in cols.items()}
    if not cols or None in sizes.values() or len(set(sizes.values())) != 1:
        raise ValueError(f"args must be arrays with one common leading length, got {sizes}")
    n = next(iter(sizes.values()))
    devs = list(jax.devices() if devices is None else devices)
    batched = jax.vmap(lambda p: fn(**p))
    if _cpu_lapack_hazard(batched, cols, devs):
        devs = _one_per_process(devs)
    mesh = Mesh(np.asarray(devs), ("points",))
    shard = NamedSharding(mesh, PartitionSpec("points"))
    repl = NamedSharding(mesh, PartitionSpec())
    chunk = len(devs) * per_device
    f = jax.jit(batched, out_shardings=repl)
    options = compiler_options(optimize)
    compiled = None
    for start in range(0, n, chunk):
        idx = np.arange(start, min(start + chunk, n))
        take = np.concatenate([idx, np.full(chunk - idx.size, idx[-1])])
        glob = {}
        for k, v in cols.items():
            local = v[take]
            glob[k] = jax.make_array_from_callback(local.shape, shard, lambda i, a=local: a[i])
        if compiled is None:
            compiled = f.lower(glob).compile(compiler_options=options)
        k = idx.size
        out = jax.tree.map(lambda x, k=k: np.asarray(x)[:k], compiled(glob))
        yield idx, out


def _cpu_lapack_hazard(f, cols: Mapping[str, np.ndarray], devs) -> bool:
    """Whether ``f`` calls LAPACK and would run on several CPU devices of one process.

    Several CPU devices in one process (``--xla_force_host_platform_device_count``)
    execute concurrently, and programs with LAPACK custom calls (SVD, eigh,
    QR, ...) can then deadlock inside the XLA CPU runtime (seen with jaxlib
    0.10: every thread parked, nondeterministically). Such sweeps run on one
    CPU device per process instead; the results are the same (each point's
    computation does not depend on the sharding), only the simulated
    parallelism is lost.
    """
    import jax

    if not devs or devs[0].platform != "cpu":
        return False
    per_process: dict[int, int] = {}
    for d in devs:
        per_process[d.process_index] = per_process.get(d.process_index, 0) + 1
    if max(per_process.values()) < 2:
        return False
    one = {k: jax.ShapeDtypeStruct((1, *v.shape[1:]), v.dtype) for k, v in cols.items()}
    if "lapack" not in jax.jit(f).lower(one).as_text():
        return False
    warnings.warn(
        "this sweep calls LAPACK (SVD/eigh/QR) and would run on several CPU devices of one "
        "process, which can deadlock the XLA CPU runtime; running it on one CPU device per "
        "process (same results)",
        RuntimeWarning,
        stacklevel=3,
    )
    return True


def _one_per_process(devs) -> list:
    """The first device of each process in ``devs``."""
    first: dict[int, Any] = {}
    for d in devs:
        first.setdefault(d.process_index, d)
    return [first[k] for k in sorted(first)]


def _group(points: Sequence[Mapping], static: Sequence[str]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(points):
        groups.setdefault(tuple(canonical_json(p[s]) for s in static), []).append(i)
    return groups


def run_vectorized(
    store: Store,
    grid: Grid,
    fn: Callable[..., Any],
    rows: Callable[[dict, Any], Any],
    *,
    static: Sequence[str] = (),
    inputs: Callable[[dict], Mapping[str, Any]] | None = None,
    arrays: Callable[[dict, Any], Mapping[str, Any]] | None = None,
    per_device: int = 4,
    optimize: bool = True,
    progress: bool = True,
    label: str | None = None,
) -> Path:
    """Run a vectorizable sweep into ``store``; returns the aggregate csv path.

    For each combination of the ``static`` parameters, ``fn(static_dict)``
    returns the per-point function ``g(**numbers) -> pytree``, evaluated by
    :func:`map_sharded` over the pending points of that combination. The
    numbers of a point are ``inputs(point)`` (default: its non-static
    parameters). ``rows(point, out)`` turns one point's outputs (numpy) into
    its table rows; ``arrays(point, out)`` optionally gives arrays to keep.
    Finished points are skipped; process 0 writes the store. ``per_device``
    and ``optimize``: see :func:`map_sharded`.
    """
    import jax

    points = grid.points()
    for s in static:
        if s not in grid.names:
            raise ValueError(f"static parameter {s!r} is not in the grid {grid.names}")
    pending = _agreed_pending(store, points)
    writer = jax.process_index() == 0
    prog = Progress(len(points), len(points) - len(pending), label or store.study,
                    enabled=progress and writer)  # fmt: skip
    todo = [points[i] for i in pending]
    groups = _group(todo, static)
    for n_group, members in enumerate(groups.values(), 1):
        static_vals, cols = _group_inputs([todo[i] for i in members], static, inputs)
        if static and len(groups) > 1:
            prog.note(f"group {n_group}/{len(groups)} {static_vals}: {len(members)} points")
        g = fn(static_vals)
        t0 = time.perf_counter()
        for idx, out in map_sharded(g, cols, per_device=per_device, optimize=optimize):
            dt = (time.perf_counter() - t0) / idx.size
            for j, i in enumerate(idx):
                p = todo[members[i]]
                one = jax.tree.map(lambda x, j=j: x[j], out)
                if writer:
                    store.write(p, rows(p, one), arrays=arrays(p, one) if arrays else None,
                                elapsed_s=dt)  # fmt: skip
            prog.update(idx.size)
            t0 = time.perf_counter()
    return _finish(store, points, "vectorized")


def _group_inputs(members: Sequence[dict], static: Sequence[str], inputs) -> tuple[dict, dict]:
    """The static values shared by ``members`` and their numbers as columns ``{name: (k, ...)}``."""
    static_vals = {s: members[0][s] for s in static}
    if inputs is None:
        nums = [{k: v for k, v in p.items() if k not in static} for p in members]
    else:
        nums = [dict(inputs(p)) for p in members]
    return static_vals, {k: np.asarray([q[k] for q in nums]) for k in nums[0]}


def _finish(store: Store, points: Sequence[Mapping], kind: str) -> Path:
    """Wait for every process, then process 0 writes the aggregate csv; returns its path.

    Before writing, every point must be finished: a point missing after all
    processes returned means the store is not shared by all hosts.
    """
    import jax

    _barrier(f"isometry-sweep-{store.fingerprint}-{kind}")
    path = store.root / "results.csv"
    if jax.process_index() == 0:
        missing = [p for p in points if not store.done(p)]
        if missing:
            raise RuntimeError(
                f"{len(missing)} points are missing from {store.root} after all processes "
                "finished: is the store on a filesystem shared by all hosts?"
            )
        store.write_csv(points)
    _barrier(f"isometry-sweep-{store.fingerprint}-csv")
    return path


def run_partitioned(
    store: Store,
    grid: Grid,
    fn: Callable[[dict], Any],
    *,
    arrays_key: str = "arrays",
    progress: bool = True,
    label: str | None = None,
) -> Path:
    """Run independent points, dealt round-robin to the processes; returns the csv path.

    ``fn(point)`` runs one point on this process's local devices and returns
    its rows (a dict or list of dicts), or ``{"rows": ..., arrays_key: {...}}``
    to keep arrays too. Process ``i`` of ``P`` runs pending points
    ``i, i + P, ...`` and writes them; the store must be on a shared
    filesystem. Process 0 writes the aggregate after all have finished.
    """
    import jax

    points = grid.points()
    pending = _agreed_pending(store, points)
    pi, pc = jax.process_index(), jax.process_count()
    mine = pending[pi::pc]
    prog = Progress(len(points), len(points) - len(pending), label or store.study,
                    enabled=progress and pi == 0)  # fmt: skip
    for i in mine:
        p = points[i]
        t0 = time.perf_counter()
        res = fn(dict(p))
        if isinstance(res, Mapping) and "rows" in res:
            store.write(p, res["rows"], arrays=res.get(arrays_key),
                        elapsed_s=time.perf_counter() - t0)  # fmt: skip
        else:
            store.write(p, res, elapsed_s=time.perf_counter() - t0)
        prog.update(pc if pi == 0 else 1)
    return _finish(store, points, "partitioned")
