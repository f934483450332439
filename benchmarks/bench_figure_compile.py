"""Figure compile-time benchmark: CPU seconds, XLA compile seconds and programs per figure.

For each figure named, its tier is made in a fresh temporary directory (empty
experiment store and figure cache) in this process, and the benchmark reports
the wall time, the process CPU time, the summed XLA backend compile time
(``jax.monitoring``'s ``backend_compile_duration`` events, wall clock: run it
on an idle machine) and the number of compiled programs. Quick-tier figures
are dominated by compiling small programs; the CPU seconds of one figure,
alone on one core, are its ``COST`` scheduling hint.

Usage: ``python benchmarks/bench_figure_compile.py gradients batchnorm [--tier quick]``
(one figure per process gives each its own cold caches:
``for f in gradients batchnorm; do python benchmarks/bench_figure_compile.py $f; done``).
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile
import time

import jax.monitoring

from isometry.paper_figures import core

_COMPILE = "/jax/core/compile/backend_compile_duration"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("figures", nargs="+")
    p.add_argument("--tier", default="quick")
    args = p.parse_args()
    acc = collections.Counter()

    def listen(event, seconds, **_):
        if event == _COMPILE:
            acc["seconds"] += seconds
            acc["programs"] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    for name in args.figures:
        acc.clear()
        with tempfile.TemporaryDirectory() as tmp:
            cwd = os.getcwd()
            os.chdir(tmp)  # experiment stores live under ./results
            try:
                t0, c0 = time.perf_counter(), time.process_time()
                core.make(name, args.tier, out="out", results="results/figures", recompute=True)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            finally:
                os.chdir(cwd)
        print(
            f"{name:20s} wall {wall:6.1f} s  cpu {cpu:6.1f} s  "
            f"compile {acc['seconds']:6.1f} s ({acc['programs']} programs)",
            flush=True,
        )


if __name__ == "__main__":
    main()
