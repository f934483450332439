"""Benchmark: the main job, every paper figure at a tier from empty stores.

Runs ``isometry figures --tier TIER --jobs J`` in a fresh temporary working
directory (so the experiment stores under ``results/experiments`` and the
figure caches start empty, as on a fresh machine) once for each ``J`` of
``--jobs``, and prints each figure's wall and CPU seconds (as the command
reports them; CPU: its worker process, all threads), the wall time of the
whole job and the CPU seconds of the processes it started (user + system, from
``getrusage``). CPU seconds over wall time is how many cores the job kept busy
on average.

Usage: ``python benchmarks/bench_figures.py [--tier quick] [--jobs 1,2] [NAMES...]``
(``--device gpu`` runs the figures on the GPU with one job).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import common

DONE = re.compile(r"\] (\w+) done in ([0-9.]+) s \(([0-9.]+) s of CPU\)")


def run_job(names: list[str], tier: str, jobs: int, platform: str) -> dict:
    """One run of the command from empty stores: ``{"wall", "cpu", "figures": {name: (wall s,
    CPU s)}}``."""
    with tempfile.TemporaryDirectory(prefix="isometry-bench-figures-") as tmp:
        cmd = [sys.executable, "-m", "isometry", "figures", *names, "--tier", tier, "--jobs",
               str(jobs), "--no-progress", "--out", "out", "--results", "figures"]  # fmt: skip
        env = {**os.environ, "JAX_PLATFORMS": platform}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"the figures failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    figures = {
        m.group(1): (float(m.group(2)), float(m.group(3))) for m in DONE.finditer(proc.stdout)
    }
    return {"wall": wall, "cpu": cpu, "figures": figures}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="figure names (default: all)")
    p.add_argument("--tier", default="quick", choices=["tiny", "quick", "full"])
    p.add_argument("--jobs", default="1,2", help="comma-separated worker counts to time")
    common.add_device_flag(p)
    a = p.parse_args()
    common.use_device(a.device)
    print(common.machine())
    platform = "cuda" if a.device == "gpu" else "cpu"
    jobs = [1] if a.device == "gpu" else [int(j) for j in a.jobs.split(",")]
    runs = {}
    for j in jobs:
        print(f"running the {a.tier} tier with --jobs {j} from empty stores ...", flush=True)
        runs[j] = run_job(a.names, a.tier, j, platform)
        r = runs[j]
        print(f"--jobs {j}: wall {r['wall']:.1f} s, CPU {r['cpu']:.1f} s "
              f"({r['cpu'] / r['wall']:.2f} cores busy)", flush=True)  # fmt: skip
    names = list(next(iter(runs.values()))["figures"])
    nan = (float("nan"),) * 2
    print("\n| figure | " + " | ".join(f"--jobs {j}: wall s, CPU s" for j in jobs) + " |")
    print("|---|" + "---|" * len(jobs))
    for n in sorted(names, key=lambda n: -runs[jobs[0]]["figures"][n][1]):
        cells = (runs[j]["figures"].get(n, nan) for j in jobs)
        print(f"| {n} | " + " | ".join(f"{w:.1f}, {c:.1f}" for w, c in cells) + " |")
    for label, key in (("whole job, wall", "wall"), ("whole job, CPU", "cpu")):
        print(f"| {label} | " + " | ".join(f"{runs[j][key]:.0f}" for j in jobs) + " |")


if __name__ == "__main__":
    main()
