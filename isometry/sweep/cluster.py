"""Multi-process jobs: cluster detection and ``jax.distributed`` start-up.

:func:`initialize` resolves the coordinator from explicit arguments, the
``ISOMETRY_*`` environment variables or a detected SLURM / Open MPI job, and
starts ``jax.distributed`` (gloo collectives on CPU); a single process starts
nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["initialize"]


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
    """Whether this process's ``jax.distributed`` client is already started (public API)."""
    import jax

    return bool(jax.distributed.is_initialized())


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
    if addr is not None or n is not None or pid is not None:
        kwargs = _explicit_job(addr, n, pid)
        if kwargs is None:
            return 0, 1
    elif _detected_cluster():
        kwargs = {}
    else:
        return 0, 1
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    jax.distributed.initialize(initialization_timeout=timeout_s, **kwargs)
    return jax.process_index(), jax.process_count()


def _explicit_job(addr: str | None, n, pid) -> dict | None:
    """Checked ``jax.distributed.initialize`` arguments; ``None`` for a one-process job."""
    if n is None or isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_processes must be an integer >= 1, got {n!r}")
    if n == 1 and addr is None:
        return None
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
    return dict(coordinator_address=addr, num_processes=n, process_id=pid)
