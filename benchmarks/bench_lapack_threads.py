"""Benchmark: LAPACK calls inside XLA programs with OpenBLAS's default threads and with one.

jaxlib runs QR / SVD on the CPU through the OpenBLAS that numpy and scipy ship
(see :mod:`isometry.runtime`). Times, in one process and one run, with the BLAS
libraries' default thread counts and under ``runtime.lapack_threads(1)``:

* ``qr``: one 200 x 200 QR in a jitted program;
* ``vmapped qr``: a batch of 4 under ``vmap`` (the orthogonal layer of 4 sweep points);
* ``spectra point``: the spectra experiment's program for 4 points of orthogonal
  tanh networks (width 200, depths 2/8/32/128: 128 orthogonal draws and 4 SVDs each);
* ``svd``: one 200 x 200 SVD (``isometry.spectra.squared_singular_values``).

Each as the best of 3 after a warm-up, with the machine's matmul FLOP/s beside them.
Usage: ``python benchmarks/bench_lapack_threads.py``.
"""

from __future__ import annotations

import dataclasses

import common
import jax
import jax.numpy as jnp
from threadpoolctl import threadpool_info

from isometry import runtime, spectra
from isometry.experiments import spectra as spectra_experiment


def cases() -> dict:
    """``{name: (fn, args)}`` of the programs timed."""
    a = jax.random.normal(jax.random.key(0), (4, 200, 200))
    qr = jax.jit(lambda m: jnp.linalg.qr(m)[0])
    vqr = jax.jit(jax.vmap(lambda m: jnp.linalg.qr(m)[0]))
    svd = jax.jit(lambda m: spectra.squared_singular_values(m, check_finite=False))
    cfg = dataclasses.replace(
        spectra_experiment.PRESETS["quick"], width=200, depths=(2, 8, 32, 128)
    )
    point = jax.jit(jax.vmap(spectra_experiment.sweep_function(cfg, "orthogonal")))
    sw, sb = spectra_experiment.critical("tanh", 1.0)
    act = spectra_experiment.ACTIVATIONS.index("tanh")
    args = (jnp.full(4, 1.0), jnp.full(4, sw), jnp.full(4, sb), jnp.arange(4), jnp.full(4, act))
    return {
        "qr": (qr, (a[0],)),
        "vmapped qr (4)": (vqr, (a,)),
        "spectra point (4 networks)": (point, args),
        "svd": (svd, (a[0],)),
    }


def main() -> None:
    print(common.machine())
    print(f"matmul 2048^2 float32 (XLA): {common.matmul_flops() / 1e9:.0f} GFLOP/s")
    threads = sorted({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
    print(f"BLAS threads by default: {threads}")
    rows = []
    for name, (fn, args) in cases().items():
        default = common.best_time(fn, *args)
        with runtime.lapack_threads(1):
            one = common.best_time(fn, *args)
        rows.append((name, default, one))
    print("\n| program | default threads (s) | one thread (s) | ratio |")
    print("|---|---|---|---|")
    for name, default, one in rows:
        print(f"| {name} | {default:.4f} | {one:.4f} | {default / one:.1f}x |")


if __name__ == "__main__":
    main()
