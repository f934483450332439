"""Benchmarks of isometry.jacobian / isometry.spectra (same run, same machine, as ratios).

1. Roofline: the one-pass Jacobian of a depth-64, width-512 tanh stack against
   this machine's measured float32 matmul FLOP/s (2 N^3 flops per layer).
2. Depth sweep, width 256, every depth 1..128, 4 seeds: isometry (one pass over
   depth) against the PyTorch idiom (``torch.func.jacrev`` + ``torch.linalg.svdvals``,
   one call per depth) and per-depth ``jax.jacfwd``; full singular values, and
   moment statistics (mean/var of s^2 from traces, max from Lanczos; no SVD).
3. Matrix-free SLQ: width 2,048 against a dense SVD (time, Wasserstein-1 error),
   and a width-16,384 convolutional network (time, peak memory).

Usage:
    python benchmarks/bench_spectra.py [--quick] [--write] [--device {cpu,gpu}] [--skip-slq]

``--write`` replaces the "spectra" section of BENCHMARKS.md with the results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import common
import jax
import jax.numpy as jnp
import numpy as np

from isometry import jacobian as jac
from isometry import meanfield, spectra

ROOT = Path(__file__).resolve().parents[1]


def best_time(fn, repeat=3):
    return best_times(fn, repeat)[0]


def best_times(fn, repeat=3):
    """Best wall time and best process CPU time (all threads) of ``fn()``, after a warm-up.

    On a machine shared with other jobs the wall time includes waiting for a core;
    the CPU time counts only the work done, so CPU-time ratios are the steadier ones.
    """
    fn()  # warm-up / compile
    wall, cpu = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return min(wall), min(cpu)


def block(x):
    return jax.tree_util.tree_map(lambda a: a.block_until_ready(), x)


def dense_params(key, depth, n, sw, sb):
    k1, k2 = jax.random.split(key)
    return {
        "W": jax.random.normal(k1, (depth, n, n)) * math.sqrt(sw / n),
        "b": math.sqrt(sb) * jax.random.normal(k2, (depth, n)),
    }


def tanh_layer(p, h):
    return jnp.tanh(h @ p["W"] + p["b"])


# ----------------------------------------------------------------------------- 1. roofline


def roofline(depth=64, n=512):
    a = jax.random.normal(jax.random.key(0), (n, n))
    mm = jax.jit(lambda a, b: a @ b)
    t_mm, c_mm = best_times(lambda: block(mm(a, a)), repeat=20)
    big = jax.random.normal(jax.random.key(1), (2048, 2048))
    t_big, c_big = best_times(lambda: block(mm(big, big)), repeat=3)
    peak = max(2 * n**3 / t_mm, 2 * 2048**3 / t_big)
    cpu_peak = max(2 * n**3 / c_mm, 2 * 2048**3 / c_big)
    sw, sb = (float(v) for v in meanfield.critical_point("tanh", 0.25))
    params = dense_params(jax.random.key(2), depth, n, sw, sb)
    x = jax.random.normal(jax.random.key(3), (n,)) * 0.5
    run = jax.jit(lambda p, x: jac.stack_jacobians(tanh_layer, p, x))
    t, c = best_times(lambda: block(run(params, x)), repeat=5)
    flops = depth * 2 * n**3
    return {
        "cpu_fraction_of_peak": flops / c / cpu_peak,
        "cpu_peak_gflops_per_cpu_s": cpu_peak / 1e9,
        "matmul_gflops_512": 2 * n**3 / t_mm / 1e9,
        "matmul_gflops_2048": 2 * 2048**3 / t_big / 1e9,
        "peak_gflops": peak / 1e9,
        "jacobian_pass_s": t,
        "jacobian_gflops": flops / t / 1e9,
        "fraction_of_peak": flops / t / peak,
    }


# ----------------------------------------------------------------------------- 2. depth sweep


def depth_sweep(n=256, depth=128, seeds=4, with_torch=True):
    sw, sb = (float(v) for v in meanfield.critical_point("tanh", 0.25))
    keys = jax.random.split(jax.random.key(0), seeds)
    params = jax.vmap(lambda k: dense_params(k, depth, n, sw, sb))(keys)
    xs = jax.random.normal(jax.random.key(1), (seeds, n))
    xs = xs / jnp.linalg.norm(xs, axis=1, keepdims=True) * math.sqrt(n * 0.25)
    depths = list(range(1, depth + 1))

    jac_all = jax.jit(jax.vmap(lambda p, x: jac.stack_jacobians(tanh_layer, p, x, depths)))
    mom_all = jax.jit(
        jax.vmap(
            lambda p, x: jac.stack_jacobians(tanh_layer, p, x, depths, reduce=spectra.trace_moments)
        )
    )

    def ours_sv(method="svd", workers=None):
        J = jac_all(params, xs)
        return block(spectra.singular_values(J, method=method, workers=workers))

    def ours_gram64():
        return ours_sv("gram64", workers=2)

    def ours_mom():
        return block(mom_all(params, xs))

    res = {}
    res["isometry_svd_s"], res["isometry_svd_cpu_s"] = best_times(ours_sv, repeat=2)
    res["isometry_sv_s"], res["isometry_sv_cpu_s"] = best_times(ours_gram64, repeat=2)
    res["isometry_moments_s"] = best_time(ours_mom, repeat=2)
    res["isometry_jacobians_only_s"] = best_time(lambda: block(jac_all(params, xs)), repeat=2)
    J = np.asarray(jac_all(params, xs), np.float64)
    ref = np.linalg.svd(J.reshape(-1, n, n), compute_uv=False).reshape(seeds, depth, n)
    sv_svd = np.asarray(ours_sv())
    sv_ours = np.asarray(ours_gram64())
    for name, sv in (("svd", sv_svd), ("gram64", sv_ours)):
        # errors relative to s_max of each Jacobian, against a float64 SVD of the same J
        res[f"max_err_{name}_vs_f64"] = float(np.max(np.abs(sv - ref) / ref[..., :1]))
        lam, lam_ref = sv.astype(np.float64) ** 2, ref**2
        res[f"max_err_mean_s2_{name}_vs_f64"] = float(
            np.max(np.abs(lam.mean(-1) - lam_ref.mean(-1)) / lam_ref.mean(-1))
        )
    res["max_diff_gram64_vs_svd"] = float(np.max(np.abs(sv_ours - sv_svd) / sv_svd[..., :1]))
    mom = ours_mom()

    # per-depth jax.jacfwd (one jitted function per depth; compile excluded by a warm pass)
    def jfwd_pass():
        out = []
        for s in range(seeds):
            for d in depths:
                pd = jax.tree_util.tree_map(lambda a, s=s, d=d: a[s, :d], params)
                J = _jfwd(pd, xs[s])
                out.append(jnp.linalg.svd(J, compute_uv=False))
        return block(out)

    t = time.perf_counter()
    jfwd_pass()
    res["jax_jacfwd_first_pass_s"] = time.perf_counter() - t
    t = time.perf_counter()
    sv_j = jfwd_pass()
    res["jax_jacfwd_sv_s"] = time.perf_counter() - t
    err = max(
        float(np.max(np.abs(np.asarray(sv_j[s * depth + d - 1]) - sv_ours[s, d - 1])))
        for s in range(seeds)
        for d in (1, depth)
    )
    res["max_abs_diff_vs_jacfwd"] = err

    if with_torch:
        res.update(torch_sweep(params, xs, depths, sv_ours, mom))
    for k in ("torch", "jax_jacfwd"):
        base = res.get(f"{k}_sv_s")
        if base:
            res[f"speedup_sv_vs_{k}"] = base / res["isometry_sv_s"]
            res[f"speedup_svd_vs_{k}"] = base / res["isometry_svd_s"]
            res[f"speedup_moments_vs_{k}"] = base / res["isometry_moments_s"]
    return res


@jax.jit
def _jfwd(pd, x):
    return jax.jacfwd(lambda z: jac.stack_forward(tanh_layer, pd, z))(x)


def torch_sweep(params, xs, depths, sv_ours, mom):
    import torch
    from torch.func import jacrev

    torch.set_num_threads(os.cpu_count())
    W = torch.tensor(np.asarray(params["W"]))
    b = torch.tensor(np.asarray(params["b"]))
    X = torch.tensor(np.asarray(xs))
    seeds = W.shape[0]

    def net(Ws, bs):
        def f(x):
            for Wl, bl in zip(Ws, bs, strict=True):
                x = torch.tanh(x @ Wl + bl)
            return x

        return f

    def sweep():
        out = []
        for s in range(seeds):
            for d in depths:
                J = jacrev(net(W[s, :d], b[s, :d]))(X[s])
                out.append(torch.linalg.svdvals(J))
        return out

    sweep_small = [jacrev(net(W[0, :2], b[0, :2]))(X[0])]  # warm-up
    del sweep_small
    t = time.perf_counter()
    out = sweep()
    dt = time.perf_counter() - t
    depth = len(depths)
    sv_t = np.stack([o.numpy() for o in out]).reshape(seeds, depth, -1)
    lam_t = sv_t.astype(np.float64) ** 2
    return {
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_sv_s": dt,
        "max_rel_diff_sv_vs_torch": float(np.max(np.abs(sv_t - sv_ours) / sv_t[..., :1])),
        "max_rel_diff_mean_vs_torch": float(
            np.max(np.abs(lam_t.mean(-1) - np.asarray(mom["mean"])) / lam_t.mean(-1))
        ),
        "max_rel_diff_max_vs_torch": float(
            np.max(np.abs(lam_t[..., 0] - np.asarray(mom["max"])) / lam_t[..., 0])
        ),
    }


# ----------------------------------------------------------------------------- 3. SLQ


def slq_2048(n=2048, depth=8, probes=4, steps=64):
    sw, sb = (float(v) for v in meanfield.critical_point("tanh", 0.25))
    params = dense_params(jax.random.key(0), depth, n, sw, sb)
    x = jax.random.normal(jax.random.key(1), (n,))
    x = x / jnp.linalg.norm(x) * math.sqrt(n * 0.25)

    def dense():
        return block(jac.stack_singular_values(tanh_layer, params, x, squared=True))

    def f(z):
        return jac.stack_forward(tanh_layer, params, z)

    def slq():
        r = spectra.jacobian_slq(
            f,
            x,
            jax.random.key(2),
            n_probes=probes,
            n_steps=steps,
        )
        block(r.nodes)
        return r

    t_dense = best_time(dense, repeat=2)
    t_slq = best_time(slq, repeat=2)
    lam = dense()[0]
    r = slq()
    nodes, w = r.atoms()
    w1 = float(spectra.wasserstein1(lam, nodes, b_weights=w))
    spread = float(lam.max() - lam.min())
    return {
        "width": n,
        "depth": depth,
        "probes": probes,
        "steps": steps,
        "dense_svd_s": t_dense,
        "slq_s": t_slq,
        "speedup": t_dense / t_slq,
        "w1": w1,
        "w1_relative_to_spread": w1 / spread,
        "w1_bound": spread * (1 / steps + 1 / math.sqrt(n * probes)),
    }


_WIDE = r"""
import json, resource, time, jax, jax.numpy as jnp
from isometry import jacobian as jac, spectra
C, S, depth = 128, 128, {depth}
init = jax.nn.initializers.delta_orthogonal(scale=1.0)
K = jax.vmap(lambda k: init(k, (3, C, C)))(jax.random.split(jax.random.key(0), depth))
def layer(k, h):
    return jnp.tanh(sum(jnp.roll(h, s - 1, axis=0) @ k[s] for s in range(3)))
x = 0.5 * jax.random.normal(jax.random.key(1), (S, C))
f = lambda z: jac.stack_forward(layer, K, z)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
r = spectra.jacobian_slq(f, x, jax.random.key(2), n_probes={probes}, n_steps={steps})
r.nodes.block_until_ready()
first = time.perf_counter() - t
t = time.perf_counter()
r = spectra.jacobian_slq(f, x, jax.random.key(3), n_probes={probes}, n_steps={steps})
r.nodes.block_until_ready()
second = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"width": C * S, "depth": depth, "probes": {probes}, "steps": {steps},
    "slq_first_call_s": first, "slq_s": second, "peak_rss_mib": peak / 1024,
    "rss_before_mib": before / 1024, "mean_s2": float(r.moment(1)),
    "dense_jacobian_mib": (C * S) ** 2 * 4 / 2**20}}))
"""


def slq_16384(depth=8, probes=4, steps=40):
    code = _WIDE.format(depth=depth, probes=probes, steps=steps)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()})"


def report(r) -> str:
    ro, ds = r["roofline"], r["sweep"]
    lines = [
        "## spectra",
        "",
        f"Machine: {machine()}. Command: "
        "`OPENBLAS_NUM_THREADS=1 python benchmarks/bench_spectra.py --write` (one BLAS thread "
        "per LAPACK call: XLA's batched SVD is then fastest; torch keeps its own threads).",
        "All ratios are from one run on this machine (shared, so absolute times are noisy).",
        "",
        "**1. Roofline** (one-pass Jacobian, depth 64, width 512, tanh, float32; 2 N^3 per layer)",
        "",
        "| measured matmul GFLOP/s (512 / 2048) | Jacobian pass | GFLOP/s | fraction of peak "
        "(wall) | fraction of peak (CPU time) |",
        "|---|---|---|---|---|",
        f"| {ro['matmul_gflops_512']:.1f} / {ro['matmul_gflops_2048']:.1f} "
        f"| {ro['jacobian_pass_s'] * 1e3:.1f} ms | {ro['jacobian_gflops']:.1f} "
        f"| **{ro['fraction_of_peak']:.2f}** | **{ro['cpu_fraction_of_peak']:.2f}** |",
        "",
        "**2. Depth sweep** (width 256, every depth 1..128, 4 seeds, tanh at criticality)",
        "",
        "| route | time | isometry speedup |",
        "|---|---|---|",
        f'| isometry, one pass + float64 Gram eigenvalues (`method="gram64"`, 2 threads) '
        f"| {ds['isometry_sv_s']:.2f} s | 1 |",
        f"| isometry, one pass + one batched float32 SVD call | {ds['isometry_svd_s']:.2f} s | - |",
        f"| isometry, moments (traces + Lanczos, no SVD) | {ds['isometry_moments_s']:.2f} s | - |",
    ]
    if "torch_sv_s" in ds:
        lines.append(
            f"| torch {ds['torch_version']} `jacrev` + `svdvals` per depth "
            f"({ds['torch_threads']} threads) | {ds['torch_sv_s']:.2f} s | "
            f"**{ds['speedup_sv_vs_torch']:.1f}x** (SV), "
            f"**{ds['speedup_moments_vs_torch']:.1f}x** (moments), "
            f"{ds['speedup_svd_vs_torch']:.1f}x (SVD route) |"
        )
    lines += [
        "| `jax.jacfwd` + SVD per depth (compiled; compile excluded) "
        f"| {ds['jax_jacfwd_sv_s']:.2f} s "
        f"| **{ds['speedup_sv_vs_jax_jacfwd']:.1f}x** (SV), "
        f"**{ds['speedup_moments_vs_jax_jacfwd']:.1f}x** (moments), "
        f"{ds['speedup_svd_vs_jax_jacfwd']:.1f}x (SVD route) |",
        "",
        f"Agreement: max |s - s_jacfwd| = {ds['max_abs_diff_vs_jacfwd']:.1e}"
        + (
            f"; vs torch: singular values {ds['max_rel_diff_sv_vs_torch']:.1e} (relative to "
            f"s_max), mean s^2 {ds['max_rel_diff_mean_vs_torch']:.1e}, "
            f"max s^2 (16 Lanczos steps) {ds['max_rel_diff_max_vs_torch']:.1e}."
            if "torch_sv_s" in ds
            else "."
        ),
        "Against a float64 SVD of the same Jacobians (max over seeds and depths, relative to "
        f"s_max): gram64 {ds['max_err_gram64_vs_f64']:.1e}, float32 SVD "
        f"{ds['max_err_svd_vs_f64']:.1e}; mean s^2: gram64 "
        f"{ds['max_err_mean_s2_gram64_vs_f64']:.1e}"
        f", SVD {ds['max_err_mean_s2_svd_vs_f64']:.1e}.",
        "",
    ]
    if "slq2048" in r:
        lines += slq_report(r["slq2048"], r["slq16384"])
    return "\n".join(lines)


def slq_report(s2, s16) -> list[str]:
    return [
        "**3. Matrix-free SLQ**",
        "",
        "| network | dense SVD | SLQ (compiled) | W1 error (relative to spread) | peak RSS |",
        "|---|---|---|---|---|",
        f"| dense tanh, width {s2['width']}, depth {s2['depth']}, {s2['probes']} probes x "
        f"{s2['steps']} steps | {s2['dense_svd_s']:.2f} s | {s2['slq_s']:.2f} s "
        f"({s2['speedup']:.1f}x) | {s2['w1']:.3g} ({s2['w1_relative_to_spread']:.2%}; bound "
        f"{s2['w1_bound']:.3g}) | - |",
        f"| conv tanh (128 positions x 128 channels), width {s16['width']}, depth "
        f"{s16['depth']}, {s16['probes']} x {s16['steps']} | not run (dense J = "
        f"{s16['dense_jacobian_mib']:.0f} MiB) | {s16['slq_s']:.2f} s (first call with compile "
        f"{s16['slq_first_call_s']:.2f} s) | - | {s16['peak_rss_mib']:.0f} MiB process RSS |",
        "",
    ]


def write_section(text: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pat = re.compile(r"^## spectra\n.*?(?=^## |\Z)", re.S | re.M)
    new = pat.sub(text + "\n", old) if pat.search(old) else old.rstrip("\n") + "\n\n" + text + "\n"
    from isometry import atomic

    atomic.write_text(path, new)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--skip-slq", action="store_true", help="only the roofline and depth sweep")
    common.add_device_flag(ap)
    args = ap.parse_args()
    common.use_device(args.device)
    r = {}
    if args.quick:
        r["roofline"] = roofline(depth=8, n=128)
        r["sweep"] = depth_sweep(n=32, depth=8, seeds=2, with_torch=not args.no_torch)
        r["slq2048"] = slq_2048(n=256, depth=2, steps=16)
        r["slq16384"] = slq_16384(depth=1, steps=4, probes=1)
    else:
        print("[bench] roofline ...", flush=True)
        r["roofline"] = roofline()
        print(json.dumps(r["roofline"]), flush=True)
        print("[bench] depth sweep ...", flush=True)
        r["sweep"] = depth_sweep(with_torch=not args.no_torch)
        print(json.dumps(r["sweep"]), flush=True)
        if not args.skip_slq:
            print("[bench] SLQ ...", flush=True)
            r["slq2048"] = slq_2048()
            r["slq16384"] = slq_16384()
    text = report(r)
    print(json.dumps(r, indent=1, default=str))
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
