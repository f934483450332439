"""Shared benchmark helpers: timing and this machine's measured matmul FLOP/s."""

from __future__ import annotations

import os
import platform
import time

import jax
import jax.numpy as jnp


def best_time(fn, *args, repeat: int = 3) -> float:
    """Best wall time of ``fn(*args)`` over ``repeat`` runs, after one warm-up (compilation)."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_flops(n: int = 2048, dtype=jnp.float32) -> float:
    """Measured FLOP/s of an ``n x n`` matmul (2 n^3 flops) with XLA on the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    return 2 * n**3 / best_time(f, a, repeat=5)


def machine() -> str:
    dev = jax.devices()[0]
    return (
        f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {dev.platform} ({getattr(dev, 'device_kind', '')})"
    ).replace("  ", " ")


def add_device_argument(parser) -> None:
    """Add ``--device {cpu,gpu}`` (default ``cpu``) to an ``argparse`` parser."""
    parser.add_argument(
        "--device", choices=("cpu", "gpu"), default="cpu", help="backend to time (default cpu)"
    )


def use_device(name: str):
    """Make ``name`` (``"cpu"`` or ``"gpu"``) JAX's default device; exit clearly if absent."""
    try:
        dev = jax.devices(name)[0]
    except RuntimeError as err:
        raise SystemExit(
            f"--device {name}: no {name.upper()} backend in this JAX installation "
            f"(backends present: {jax.default_backend()}); install the [cuda] extra on a "
            f"machine with a GPU, or use --device cpu ({err})"
        ) from err
    jax.config.update("jax_default_device", dev)
    return dev
