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
finished when its ``.json`` exists and verifies (it holds the SHA-256 of its own
content and of its ``.npz``); a damaged point is named and computed again.
:func:`load_table` reads ``results.csv`` into columns
(``pandas.DataFrame(load_table(path))`` if pandas is at hand);
:func:`typed_column` turns the values of one column of the point records
(:meth:`Store.read`) into one typed array without the text round trip.

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

The package's modules, by concern: :mod:`~isometry.sweep.grid` (grids, point
names and keys, config fingerprints), :mod:`~isometry.sweep.overrides`
(``--set key=value``), :mod:`~isometry.sweep.cluster` (multi-process start-up),
:mod:`~isometry.sweep.store` (the results store), :mod:`~isometry.sweep.progress`
and :mod:`~isometry.sweep.run` (sharded and partitioned evaluation).
"""

from isometry.sweep.cluster import initialize
from isometry.sweep.grid import (
    Grid,
    config_dict,
    fingerprint,
    point_id,
    point_key,
    product,
    zipped,
)
from isometry.sweep.overrides import apply_overrides, parse_overrides
from isometry.sweep.progress import Progress
from isometry.sweep.run import compiler_options, map_sharded, run_partitioned, run_vectorized
from isometry.sweep.store import STORE_FORMAT as STORE_FORMAT
from isometry.sweep.store import ConfigMismatchError, Store, load_table, typed_column

__all__ = [
    "ConfigMismatchError",
    "Grid",
    "Progress",
    "Store",
    "apply_overrides",
    "compiler_options",
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
    "typed_column",
    "zipped",
]
