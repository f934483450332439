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


DEVICES = ("cpu", "gpu")


def add_device_flag(parser) -> None:
    """Add ``--device {cpu,gpu}`` (default ``cpu``) to a benchmark's ``argparse`` parser."""
    parser.add_argument(
        "--device", choices=DEVICES, default="cpu", help="where JAX runs (gpu: the [cuda] extra)"
    )


def use_device(name: str) -> jax.Device:
    """Make the first ``name`` device JAX's default and print it with its matmul FLOP/s.

    Exits with one line (no traceback) when this JAX has no ``name`` backend.
    """
    try:
        dev = jax.devices(name)[0]
    except RuntimeError:
        raise SystemExit(
            f"--device {name}: this jax {jax.__version__} has no {name} backend "
            f"(available: {jax.default_backend()}); on an NVIDIA machine install "
            '`pip install -e ".[cuda]"`'
        ) from None
    jax.config.update("jax_default_device", dev)
    print(f"device: {dev.platform} ({dev.device_kind}); matmul peak (2048^2 float32, XLA): "
          f"{matmul_flops(2048) / 1e9:.1f} GFLOP/s")  # fmt: skip
    return dev
