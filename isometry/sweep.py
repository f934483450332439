"""Sweeps: grids of runs over devices and hosts, with a resumable results store.

A sweep evaluates a study at every point of a :class:`Grid` (products and zips
of parameter lists) and keeps one file per finished point in a
:class:`Store`, so an interrupted sweep (crash, pre-emption) resumes where it
stopped without redoing finished work. Two kinds of work:

* **vectorizable analysis** (:func:`run_vectorized`): points that differ only
  in numbers (seeds, ``sigma_w2``/``sigma_b2`` grids, ``q*`` values) share one
  compiled function ``vmap(fn)``; the points are laid along a ``"points"``
  axis sharded over a :class:`jax.sharding.Mesh` of *all* devices of all
  processes (:func:`map_sharded`), in chunks of ``per_device`` points per
  device. Each device always sees the same per-device shapes, so the results
  do not depend on how many devices or hosts ran the sweep.
* **independent runs** (:func:`run_partitioned`): points with different shapes
  (trainings at different depths or widths) are dealt round-robin to the
  processes (``jax.process_index()``); each runs its share on its local
  devices and writes its points to the (shared) store.

Points whose values change shapes or code paths (activation, depth, width)
are *static*: :func:`run_vectorized` compiles one function per combination
of static values and vectorizes over the rest.

Store layout (one directory per sweep)::

    sweep.json           study name, config, its fingerprint (refuses a different config)
    points/<id>.json     one finished point: {"point", "rows", "elapsed_s"}; written last
    points/<id>.npz      optional arrays of that point
    results.csv          the aggregate table: one line per row of every point, in grid order

Every file is written atomically (:mod:`isometry.atomic`); a point counts as
finished when its ``.json`` exists. :func:`load_table` reads ``results.csv``
into columns (``pandas.DataFrame(load_table(path))`` if pandas is at hand).

Several hosts: call :func:`initialize` first (``jax.distributed``; SLURM and
Open MPI are detected, or pass ``coordinator_address``, ``num_processes``,
``process_id``). Every process runs the same sweep; they agree on the points
left to do (process 0's view of the store is broadcast), and the store's
directory must be on a filesystem all hosts share.

Launch examples (``isometry run`` calls :func:`initialize` itself)::

    # one machine, all its GPUs: one process sees every local device
    isometry run spectra --preset full --out results/spectra_full

    # one CPU machine, 4 simulated devices (tests, benchmarks)
    XLA_FLAGS=--xla_force_host_platform_device_count=4 isometry run spectra --preset quick

    # SLURM, 2 nodes x 4 GPUs, one process per node (detected from SLURM_*)
    srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=4 \
        isometry run spectra --preset full --out /shared/results/spectra_full

    # explicit coordinator (any launcher; process 0's host and a free port)
    isometry run spectra --coordinator node0:12345 --num-processes 2 --process-id 0 &
    isometry run spectra --coordinator node0:12345 --num-processes 2 --process-id 1

    # two local CPU processes on a loopback coordinator
    for i in 0 1; do isometry run spectra --coordinator 127.0.0.1:12345 \
        --num-processes 2 --process-id $i & done; wait

The same variables can be given as ``ISOMETRY_COORDINATOR``,
``ISOMETRY_NUM_PROCESSES`` and ``ISOMETRY_PROCESS_ID``. A re-run of the same
command resumes; a different config in the same ``--out`` is refused.

Example:
    >>> import jax.numpy as jnp
    >>> from isometry import sweep
    >>> g = sweep.product(activation=["tanh", "relu"]) * sweep.product(seed=[0, 1, 2])
    >>> len(g), g.points()[1]
    (6, {'activation': 'tanh', 'seed': 1})
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import io
import itertools
import json
import math
import os
import sys
import time
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from isometry import atomic

__all__ = [
    "ConfigMismatchError",
    "Grid",
    "Progress",
    "Store",
    "apply_overrides",
    "config_dict",
    "fingerprint",
    "initialize",
    "load_table",
    "map_sharded",
    "parse_overrides",
    "point_id",
    "point_key",
    "product",
    "run_partitioned",
    "run_vectorized",
    "zipped",
]

STORE_FORMAT = 1


# --------------------------------------------------------------------------- #
# Grids.
# --------------------------------------------------------------------------- #


def _plain(v):
    """Python scalars/tuples from numpy values (so points hash and serialize the same)."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, list | tuple):
        return tuple(_plain(x) for x in v)
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


def product(**axes: Iterable) -> Grid:
    """The product grid of parameter lists: ``product(a=[1, 2], b=[3, 4])`` has 4 points."""
    blocks = []
    for name, values in axes.items():
        vals = tuple(_plain(v) for v in values)
        if not vals:
            raise ValueError(f"grid parameter {name!r} has no values")
        blocks.append(((name,), tuple((v,) for v in vals)))
    return Grid(tuple(blocks))


def zipped(**axes: Iterable) -> Grid:
    """Parameter lists taken together: ``zipped(a=[1, 2], b=[3, 4])`` has 2 points."""
    cols = {k: tuple(_plain(v) for v in vals) for k, vals in axes.items()}
    lengths = {k: len(v) for k, v in cols.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"zipped parameter lists differ in length: {lengths}")
    if not cols or not next(iter(lengths.values())):
        raise ValueError("zipped needs at least one non-empty parameter list")
    return Grid(((tuple(cols), tuple(zip(*cols.values(), strict=True))),))


def _canonical(obj) -> str:
    return json.dumps(atomic._jsonable(obj), sort_keys=True, separators=(",", ":"))


def point_id(point: Mapping[str, Any]) -> str:
    """A stable 16-hex-digit name of a point (hash of its canonical JSON)."""
    return hashlib.sha256(_canonical(dict(point)).encode()).hexdigest()[:16]


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
    return json.loads(_canonical(dataclasses.asdict(config)))


def fingerprint(study: str, config) -> str:
    """Hash of the study name and every config field: a store holds one fingerprint."""
    text = _canonical({"study": study, "config": config_dict(config)})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- #
# Config overrides (``--set key=value``).
# --------------------------------------------------------------------------- #

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


# --------------------------------------------------------------------------- #
# Distributed initialization.
# --------------------------------------------------------------------------- #


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {v!r}") from None


def _detected_cluster() -> str | None:
    """The cluster environment JAX can auto-configure from, if this is a multi-process job."""
    if os.environ.get("SLURM_JOB_ID") and (_env_int("SLURM_NTASKS") or 1) > 1:
        return "slurm"
    if (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "openmpi"
    return None


def _distributed_ready() -> bool:
    import jax

    fn = getattr(jax.distributed, "is_initialized", None)
    if fn is not None:
        return bool(fn())
    from jax._src import distributed

    return distributed.global_state.client is not None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    timeout_s: int = 300,
) -> tuple[int, int]:
    """Start ``jax.distributed`` for a multi-process job; returns ``(process_index, count)``.

    Resolution order:

    1. explicit arguments (``coordinator_address="host:port"``, ``num_processes``,
       ``process_id``), else the environment variables ``ISOMETRY_COORDINATOR``,
       ``ISOMETRY_NUM_PROCESSES``, ``ISOMETRY_PROCESS_ID``;
    2. a detected cluster job (SLURM with more than one task, Open MPI):
       ``jax.distributed.initialize()`` reads the job's variables;
    3. otherwise a single process: nothing is started.

    CPU collectives use gloo, so CPU-only hosts (and two local processes on a
    loopback coordinator) can run a sharded sweep. Must be called before any
    other JAX computation. Calling it again is a no-op.

    Raises:
        ValueError: ``num_processes > 1`` without a coordinator, a malformed
            address, or ``process_id`` outside ``[0, num_processes)``.
    """
    import jax

    if _distributed_ready():
        return jax.process_index(), jax.process_count()
    addr = coordinator_address or os.environ.get("ISOMETRY_COORDINATOR") or None
    n = num_processes if num_processes is not None else _env_int("ISOMETRY_NUM_PROCESSES")
    pid = process_id if process_id is not None else _env_int("ISOMETRY_PROCESS_ID")
    explicit = addr is not None or n is not None or pid is not None
    if explicit:
        if n is None or isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_processes must be an integer >= 1, got {n!r}")
        if n == 1 and addr is None:
            return 0, 1
        if addr is None:
            raise ValueError(
                f"num_processes={n} needs a coordinator: pass coordinator_address='host:port' "
                "(--coordinator), the address of process 0, reachable from every process"
            )
        host, _, port = str(addr).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"coordinator_address must be 'host:port', got {addr!r}")
        if pid is None or isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < n:
            raise ValueError(f"process_id must be an integer in [0, {n}), got {pid!r}")
        kwargs = dict(coordinator_address=addr, num_processes=n, process_id=pid)
    elif _detected_cluster():
        kwargs = {}
    else:
        return 0, 1
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    jax.distributed.initialize(initialization_timeout=timeout_s, **kwargs)
    return jax.process_index(), jax.process_count()


# --------------------------------------------------------------------------- #
# The results store.
# --------------------------------------------------------------------------- #


class ConfigMismatchError(ValueError):
    """A store directory already holds results of a different study or configuration."""


def _rows(rows) -> list[dict[str, Any]]:
    if isinstance(rows, Mapping):
        rows = [rows]
    out = []
    for r in rows:
        if not isinstance(r, Mapping):
            raise TypeError(f"a result row must be a dict, got {type(r).__name__}")
        out.append({str(k): _plain(np.asarray(v).item() if np.ndim(v) == 0 else v)
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
        point = {k: _plain(v) for k, v in point.items()}
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


# --------------------------------------------------------------------------- #
# Progress.
# --------------------------------------------------------------------------- #


class Progress:
    """A one-line progress report: points done / total, elapsed time and ETA.

    The ETA extrapolates the rate of points finished in this session
    (resumed points are counted as done but not timed).
    """

    def __init__(self, total: int, done: int = 0, label: str = "sweep", *, stream=None,
                 enabled: bool = True, min_interval_s: float = 0.5):  # fmt: skip
        self.total, self.done, self.label = int(total), int(done), label
        self.start_done = self.done
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.min_interval_s = min_interval_s
        self.t0 = time.perf_counter()
        self._last = -math.inf
        self.report(force=True)

    def line(self) -> str:
        el = time.perf_counter() - self.t0
        new = self.done - self.start_done
        left = self.total - self.done
        if left == 0:
            eta = "0 s"
        elif new > 0:
            eta = f"{el / new * left:.1f} s"
        else:
            eta = "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"[{self.label}] {self.done}/{self.total} points ({pct:.0f}%)"
            f"  elapsed {el:.1f} s  ETA {eta}"
        )

    def update(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        self.report(force=self.done >= self.total)

    def report(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self.enabled and (force or now - self._last >= self.min_interval_s):
            print(self.line(), file=self.stream, flush=True)
            self._last = now


# --------------------------------------------------------------------------- #
# Sharded, vectorized evaluation.
# --------------------------------------------------------------------------- #


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
    f = jax.jit(lambda a: jax.vmap(lambda p: fn(**p))(a))
    if _cpu_lapack_hazard(f, cols, devs):
        devs = _one_per_process(devs)
    mesh = Mesh(np.asarray(devs), ("points",))
    shard = NamedSharding(mesh, PartitionSpec("points"))
    repl = NamedSharding(mesh, PartitionSpec())
    chunk = len(devs) * per_device
    f = jax.jit(lambda a: jax.vmap(lambda p: fn(**p))(a), out_shardings=repl)
    options = None if optimize else {"xla_backend_optimization_level": 0}
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
    if "lapack" not in f.lower(one).as_text():
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
        groups.setdefault(tuple(_canonical(p[s]) for s in static), []).append(i)
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
    for key, members in _group(todo, static).items():
        del key
        first = todo[members[0]]
        static_vals = {s: first[s] for s in static}
        if inputs is None:
            nums = [{k: v for k, v in todo[i].items() if k not in static} for i in members]
        else:
            nums = [dict(inputs(todo[i])) for i in members]
        names = list(nums[0])
        cols = {k: np.asarray([q[k] for q in nums]) for k in names}
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
    _barrier(f"isometry-sweep-{store.fingerprint}-vectorized")
    path = store.root / "results.csv"
    if writer:
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
    _barrier(f"isometry-sweep-{store.fingerprint}-partitioned")
    path = store.root / "results.csv"
    if pi == 0:
        missing = [p for p in points if not store.done(p)]
        if missing:
            raise RuntimeError(
                f"{len(missing)} points are missing from {store.root} after all processes "
                "finished: is the store on a filesystem shared by all hosts?"
            )
        store.write_csv(points)
    _barrier(f"isometry-sweep-{store.fingerprint}-csv")
    return path
