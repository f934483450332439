"""The ``isometry`` command: thin wrappers over library functions.

Each subcommand is a pair ``_add_<name>(subparsers)`` / ``_run_<name>(args)``
registered in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from err


def _grid(text: str) -> tuple[float, float, int]:
    """``lo:hi:n`` -> an inclusive linear grid."""
    try:
        lo, hi, n = text.split(":")
        return float(lo), float(hi), int(n)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected LO:HI:N, got {text!r}") from err


def _x64(args) -> None:
    import jax

    if getattr(args, "x64", False):
        jax.config.update("jax_enable_x64", True)


# ----------------------------------------------------------------------------- info


def _add_info(sub):
    p = sub.add_parser("info", help="JAX version, backend and devices")
    p.set_defaults(run=_run_info)


def _run_info(args) -> int:
    import jax

    import isometry

    print(f"isometry {isometry.__version__}")
    print(f"jax {jax.__version__}  backend: {jax.default_backend()}")
    print(f"processes: {jax.process_count()} (this is {jax.process_index()})")
    for d in jax.devices():
        print(f"  device {d.id}: {d.platform} {getattr(d, 'device_kind', '')}")
    return 0


# ---------------------------------------------------------------------- phase-diagram


def _add_phase_diagram(sub):
    p = sub.add_parser(
        "phase-diagram",
        help="order-to-chaos phase diagram (chi1, q*, c*, xi_q, xi_c) with the critical line",
    )
    p.add_argument("--activation", default="tanh", help="activation name (default tanh)")
    p.add_argument("--sigma-w2", type=_grid, default=(0.5, 5.0, 181), metavar="LO:HI:N")
    p.add_argument("--sigma-b2", type=_grid, default=(0.0, 2.0, 81), metavar="LO:HI:N")
    p.add_argument("--out", type=Path, default=Path("results/phase_diagram"))
    p.add_argument("--x64", action="store_true", help="float64 (slower, 1e-11 accurate)")
    p.set_defaults(run=_run_phase_diagram)


def _run_phase_diagram(args) -> int:
    _x64(args)
    import numpy as np

    from isometry import activations, atomic, meanfield, plotting

    act = activations.get(args.activation)
    sw = np.linspace(*args.sigma_w2[:2], args.sigma_w2[2])
    sb = np.linspace(*args.sigma_b2[:2], args.sigma_b2[2])
    print(f"[phase-diagram] {act.name}: {sw.size} x {sb.size} grid ...", flush=True)
    t0 = time.perf_counter()
    d = meanfield.phase_diagram(act, sw, sb)
    data = {k: np.asarray(v) for k, v in d.as_dict().items()}
    print(f"[phase-diagram] computed in {time.perf_counter() - t0:.2f} s", flush=True)
    out = args.out
    tag = f"phase_diagram_{act.name}"
    atomic.write_npz(out / f"{tag}.npz", **data)
    summary = {
        "activation": act.name,
        "params": dict(act.params),
        "converged_fraction": float(data["converged"].mean()),
        **{k: v.tolist() for k, v in data.items()},
    }
    atomic.write_json(out / f"{tag}.json", summary)
    paths = plotting.save(plotting.phase_diagram_figure(data, act.name), out / tag)
    for p in [out / f"{tag}.npz", out / f"{tag}.json", *paths]:
        print(f"[phase-diagram] wrote {p}")
    if not data["converged"].all():
        n = int((~data["converged"]).sum())
        print(f"[phase-diagram] note: {n} grid points did not converge (q* diverges or slow)")
    return 0


# ----------------------------------------------------------------------------- signal


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_signal(sub):
    p = sub.add_parser(
        "signal",
        help="per-layer gradient norms and forward statistics of MLPs, with mean-field theory",
    )
    p.add_argument("--activation", type=_names, default=["sigmoid", "tanh", "relu"])
    p.add_argument("--init", type=_names, default=["xavier", "he", "orthogonal"])
    p.add_argument("--depth", type=int, default=50)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch", type=int, default=64, help="inputs, as pairs of correlation 0.5")
    p.add_argument("--sigma-w2", type=float, default=None, help="for gaussian/orthogonal init")
    p.add_argument("--sigma-b2", type=float, default=0.0)
    p.add_argument("--norm", choices=["none", "batch", "layer"], default="none")
    p.add_argument("--norm-position", choices=["pre", "post"], default="pre")
    p.add_argument("--residual", action="store_true")
    p.add_argument("--residual-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/signal"))
    p.add_argument("--x64", action="store_true", help="float64")
    p.set_defaults(run=_run_signal)


def _run_signal(args) -> int:
    _x64(args)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from isometry import atomic, initializers, networks, plotting, signal

    if args.batch < 2 or args.batch % 2:
        raise ValueError(f"--batch must be an even integer >= 2, got {args.batch}")
    key = jax.random.key(args.seed)
    k_in, k_loss = jax.random.split(key)
    z = jax.random.normal(k_in, (args.batch // 2, 2, args.width))
    u = jnp.stack([z[:, 0], 0.5 * z[:, 0] + np.sqrt(0.75) * z[:, 1]], 1)
    u = u.reshape(args.batch, args.width)
    runs, arrays = [], {}
    for act in args.activation:
        for init in args.init:
            fixed = initializers.get(init).sigma_w2_param is None
            cfg = networks.MLPConfig(
                depth=args.depth,
                width=args.width,
                activation=act,
                init=init,
                sigma_w2=None if fixed else args.sigma_w2,
                sigma_b2=args.sigma_b2,
                norm=args.norm,
                norm_position=args.norm_position,
                residual=args.residual,
                residual_scale=args.residual_scale,
            )
            model = networks.MLP(cfg, rngs=nnx.Rngs(args.seed))
            stack = model.stack()
            t0 = time.perf_counter()
            fwd, bwd = jax.jit(lambda u, s=stack: signal.measure(s, u, key=k_loss))(u)
            run = {"activation": act, "label": init, "sigma_w2": cfg.variances()[0]}
            run.update({k: np.asarray(v) for k, v in vars(fwd).items()})
            run.update({k: np.asarray(v) for k, v in vars(bwd).items()})
            try:
                th = signal.model_theory(model, u)
                run.update({f"theory_{k}": np.asarray(v) for k, v in vars(th).items()})
            except ValueError:
                pass  # no mean-field theory for this normalization
            ratio = float(run["grad_preact_sq"][0] / run["grad_preact_sq"][-1])
            print(
                f"[signal] {act:>8s} {init:>12s} sigma_w2={run['sigma_w2']:.3g}: "
                f"|g_1|^2/|g_L|^2 = {ratio:.3g}  ({time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
            runs.append(run)
            for k, v in run.items():
                if isinstance(v, np.ndarray):
                    arrays[f"{act}/{init}/{k}"] = v
    tag = f"signal_d{args.depth}_{args.norm}" + ("_residual" if args.residual else "")
    what = f"depth {args.depth}, width {args.width}, batch {args.batch}, norm {args.norm}"
    what += ", residual" if args.residual else ""
    out = args.out
    atomic.write_npz(out / f"{tag}.npz", **arrays)
    atomic.write_json(
        out / f"{tag}.json",
        {
            "args": {k: str(v) for k, v in vars(args).items() if k != "run"},
            "runs": [
                {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()}
                for r in runs
            ],
        },
    )
    paths = [out / f"{tag}.npz", out / f"{tag}.json"]
    paths += plotting.save(
        plotting.signal_gradients_figure(runs, f"Gradient norms per layer ({what})"),
        out / f"{tag}_gradients",
    )
    paths += plotting.save(
        plotting.signal_forward_figure(runs, f"Forward signal per layer ({what})"),
        out / f"{tag}_forward",
    )
    for p in paths:
        print(f"[signal] wrote {p}")
    return 0


# ----------------------------------------------------------------------------- spectrum


def _add_spectrum(sub):
    p = sub.add_parser(
        "spectrum",
        help="empirical Jacobian singular-value densities of random deep networks, per depth",
    )
    p.add_argument("--activation", default="tanh", help="activation name (default tanh)")
    p.add_argument("--init", default="orthogonal", help="gaussian, orthogonal, he, xavier, ...")
    p.add_argument("--q-star", type=float, default=None, help="critical point for this q*")
    p.add_argument("--sigma-w2", type=float, default=None, help="for gaussian/orthogonal init")
    p.add_argument("--sigma-b2", type=float, default=None)
    p.add_argument("--depths", type=_ints, default=[2, 8, 32, 128], metavar="D1,D2,...")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--seeds", type=int, default=4, help="independent networks")
    p.add_argument("--inputs", type=int, default=1, help="inputs per network (q* sphere)")
    p.add_argument("--method", choices=["svd", "eigh"], default="svd")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/spectrum"))
    p.add_argument("--x64", action="store_true", help="float64")
    p.set_defaults(run=_run_spectrum)


def _run_spectrum(args) -> int:
    _x64(args)
    import jax
    import numpy as np

    from isometry import atomic, jacobian, plotting, spectra

    if not args.depths:
        raise ValueError("depths must list at least one depth")
    if min(args.depths) < 1:
        raise ValueError(f"depths must be >= 1, got {args.depths}")
    net = jacobian.RandomNetwork(
        activation=args.activation,
        weights=args.init,
        sigma_w2=args.sigma_w2,
        sigma_b2=args.sigma_b2,
        q_star=args.q_star,
        width=args.width,
        depth=max(args.depths),
    )
    act, init, sw, sb, q = net.resolved()
    depths = sorted(set(args.depths))
    tag = f"spectrum_{act.name}_{init.name}_N{args.width}"
    print(
        f"[spectrum] {act.name}, {init.name} weights, sigma_w2={sw:.6g}, sigma_b2={sb:.6g}, "
        f"q*={q:.6g}, width {args.width}, depths {depths}, {args.seeds} seeds ...",
        flush=True,
    )
    t0 = time.perf_counter()
    lam = jacobian.random_network_spectra(
        jax.random.key(args.seed), net, depths, n_seeds=args.seeds, n_inputs=args.inputs,
        method=args.method,
    )  # fmt: skip
    lam = np.asarray(lam)  # (seeds, inputs, K, N)
    print(f"[spectrum] computed in {time.perf_counter() - t0:.2f} s", flush=True)
    pooled = np.moveaxis(lam, 2, 0).reshape(len(depths), -1)
    stats = {k: np.asarray(v).tolist() for k, v in spectra.summary(pooled).items()}
    hists = [spectra.histogram_density(np.sqrt(p), bins=80) for p in pooled]
    out = args.out
    atomic.write_npz(
        out / f"{tag}.npz",
        depths=np.asarray(depths),
        sq_singular_values=lam,
        hist_edges=np.stack([h[0] for h in hists]),
        hist_density=np.stack([h[1] for h in hists]),
    )
    atomic.write_json(
        out / f"{tag}.json",
        {
            "activation": act.name,
            "init": init.name,
            "sigma_w2": sw,
            "sigma_b2": sb,
            "q_star": q,
            "width": args.width,
            "depths": depths,
            "seeds": args.seeds,
            "inputs": args.inputs,
            "summary_of_squared_singular_values": stats,
        },
    )
    title = (
        f"{act.name}, {init.name} weights, $q^*$={q:.3g}, "
        f"$\\sigma_w^2$={sw:.3g}, $\\sigma_b^2$={sb:.3g}, N={args.width}, {args.seeds} seeds"
    )
    paths = plotting.save(plotting.spectrum_figure(depths, pooled, title), out / tag)
    for d, m, v, mx in zip(depths, stats["mean"], stats["var"], stats["max"], strict=True):
        print(f"[spectrum] L={d:5d}  mean s^2={m:.4f}  var s^2={v:.4f}  max s^2={mx:.4f}")
    for p in [out / f"{tag}.npz", out / f"{tag}.json", *paths]:
        print(f"[spectrum] wrote {p}")
    return 0


# ------------------------------------------------------------------------------ train

_TRAIN_MODEL_FLAGS = ("depth", "width", "activation", "init", "q_star", "sigma_w2", "sigma_b2",
                      "norm", "norm_position", "residual", "residual_scale")  # fmt: skip
_TRAIN_FLAGS = ("steps", "batch_size", "optimizer", "learning_rate", "schedule", "warmup_steps",
                "momentum", "weight_decay", "clip", "seed", "log_every", "eval_every",
                "probe_every", "probe_inputs", "checkpoint_every")  # fmt: skip


def _add_train(sub):
    p = sub.add_parser(
        "train",
        help="train an MLP (optax, gradient clipping) logging loss, gradient norms and "
        "Jacobian spectra; resumable",
    )
    p.add_argument("--config", type=Path, default=None, help="run config JSON (flags override)")
    p.add_argument("--dataset", default=None, help="digits (default), mnist, fashion_mnist, "
                   "cifar10, teacher_student")  # fmt: skip
    p.add_argument("--data-dir", default=None, help="directory of MNIST/CIFAR files")
    p.add_argument("--depth", type=int, default=None, help="hidden layers (default 32)")
    p.add_argument("--width", type=int, default=None, help="hidden width (default 256)")
    p.add_argument("--activation", default=None)
    p.add_argument("--init", default=None, help="gaussian, orthogonal, he_normal, ...")
    p.add_argument("--q-star", type=float, default=None, help="critical init at this q*")
    p.add_argument("--sigma-w2", type=float, default=None)
    p.add_argument("--sigma-b2", type=float, default=None)
    p.add_argument("--norm", choices=["none", "batch", "layer"], default=None)
    p.add_argument("--norm-position", choices=["pre", "post"], default=None)
    p.add_argument("--residual", action="store_true", default=None)
    p.add_argument("--residual-scale", type=float, default=None)
    p.add_argument("--optimizer", choices=["sgd", "momentum", "rmsprop", "adam"], default=None)
    p.add_argument("--lr", dest="learning_rate", type=float, default=None, help="learning rate")
    p.add_argument("--schedule", choices=["constant", "cosine", "linear", "exponential"],
                   default=None)  # fmt: skip
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--momentum", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--clip", default=None, help="none, global_norm:C, value:C or agc:C")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--probe-every", type=int, default=None, help="Jacobian probe period (0: off)")
    p.add_argument("--probe-inputs", type=int, default=None)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", type=Path, default=Path("results/train"))
    p.add_argument("--x64", action="store_true", help="float64")
    p.set_defaults(run=_run_train)


def _train_config(args):
    """A RunConfig from ``--config`` (if any) with the given flags applied."""
    import dataclasses

    from isometry import networks, training

    base = training.RunConfig.from_json(args.config) if args.config else None
    model = dataclasses.asdict(base.model) if base else {"depth": 32, "width": 256}
    train = base.train.to_dict() if base else {}
    run = base.to_dict() if base else {}
    for name in _TRAIN_MODEL_FLAGS:
        if getattr(args, name) is not None:
            model[name] = getattr(args, name)
    for name in _TRAIN_FLAGS:
        if getattr(args, name) is not None:
            train[name] = getattr(args, name)
    if args.dataset is not None:
        run["dataset"] = args.dataset
        model["in_dim"] = model["out_dim"] = None  # refilled from the data
    if args.data_dir is not None:
        run["data_dir"] = args.data_dir
    run["model"] = networks.MLPConfig(**model)
    run["train"] = training.TrainConfig.from_dict(train)
    return training.RunConfig.from_dict(run)


def _run_train(args) -> int:
    _x64(args)
    from isometry import training

    config = _train_config(args)
    m, t = config.model, config.train
    print(
        f"[train] {config.dataset}: MLP depth {m.depth}, width {m.width}, {m.activation}, "
        f"{m.init} init; {t.optimizer} lr {t.learning_rate:g}, clip {t.clip}, "
        f"{t.steps} steps -> {args.out}",
        flush=True,
    )
    try:
        result = training.run(config, args.out, progress=not args.no_progress)
    except training.NonFiniteError as err:
        print(f"isometry train: {err}", file=sys.stderr)
        return 3
    s = result.summary
    for k in ("eval_accuracy", "eval_loss", "loss", "jac_sv2_mean", "jac_sv2_var",
              "jac_sv2_max", "steps_per_second"):  # fmt: skip
        if k in s:
            print(f"[train] {k} = {s[k]:.6g}")
    for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoints"):
        print(f"[train] wrote {args.out / name}")
    return 0


# ---------------------------------------------------------------------------- figures


def _add_figures(sub):
    p = sub.add_parser("figures", help="regenerate the paper figures (PNG + PDF)")
    p.add_argument("names", nargs="*", help="figure names (default: all); see --list")
    p.add_argument("--tier", choices=["tiny", "quick", "full"], default="quick")
    p.add_argument("--out", type=Path, default=Path("paper_figures/out"))
    p.add_argument("--results", type=Path, default=Path("results/figures"))
    p.add_argument("--recompute", action="store_true", help="ignore cached results")
    p.add_argument("--list", action="store_true", help="list the figures and their captions")
    p.set_defaults(run=_run_figures)


def _run_figures(args) -> int:
    from paper_figures import FIGURES, core

    names = args.names or list(FIGURES)
    if args.list:
        for n in FIGURES:
            print(f"{n}: {core.caption(n)}")
        return 0
    for n in names:
        core.load_module(n)  # unknown names fail before any work starts
    t0 = time.perf_counter()
    for i, n in enumerate(names, 1):
        print(f"[figures {i}/{len(names)}] {n} ({args.tier}) ...", flush=True)
        r = core.make(n, args.tier, args.out, args.results, recompute=args.recompute)
        for p in r["paths"]:
            print(f"[figures {i}/{len(names)}] wrote {p} ({r['seconds']:.1f} s)", flush=True)
    print(f"[figures] {len(names)} figure(s) in {time.perf_counter() - t0:.1f} s")
    return 0


# -------------------------------------------------------------------------------- run


def _add_run(sub):
    p = sub.add_parser(
        "run",
        help="run an experiment sweep (resumable; any devices and hosts)",
        description="Run an experiment of the experiments package into a results store. "
        "A re-run resumes; --set key=value overrides config fields (comma-separated "
        "for tuples). Multi-host: SLURM and Open MPI are detected, or pass --coordinator, "
        "--num-processes and --process-id (see isometry.sweep).",
    )
    p.add_argument("experiment", nargs="?", help="experiment name (omit with --list)")
    p.add_argument("--preset", choices=["quick", "full"], default="quick")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=None, help="store (default results/NAME/PRESET)")
    p.add_argument("--per-device", type=int, default=4, help="points per device per chunk")
    p.add_argument("--optimize", action=argparse.BooleanOptionalAction, default=None,
                   help="full XLA optimization (default: on for --preset full)")  # fmt: skip
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--list", action="store_true", help="list experiments and their presets")
    p.set_defaults(run=_run_run)


def _run_run(args) -> int:
    import experiments
    from isometry import sweep

    if args.list:
        for name in experiments.names():
            try:
                exp = experiments.get(name)
                print(f"{name:16s} {exp.summary}")
            except ImportError as err:
                print(f"{name:16s} (unavailable: {err})")
        return 0
    if not args.experiment:
        raise ValueError("name an experiment (isometry run --list shows them)")
    cfg = experiments.config(args.experiment, args.preset, args.overrides)
    pi, pc = sweep.initialize(args.coordinator, args.num_processes, args.process_id)
    out = args.out or Path("results") / args.experiment / args.preset
    opts = {"per_device": args.per_device, "progress": not args.no_progress}
    if args.optimize is not None:
        opts["optimize"] = args.optimize
    t0 = time.perf_counter()
    path = experiments.run(args.experiment, args.preset, args.overrides, out, **opts)
    if pi == 0:
        print(f"[run] {args.experiment} ({args.preset}, {pc} process(es)): "
              f"{time.perf_counter() - t0:.1f} s; wrote {path}")  # fmt: skip
    del cfg
    return 0


COMMANDS = [
    _add_info,
    _add_phase_diagram,
    _add_signal,
    _add_spectrum,
    _add_train,
    _add_figures,
    _add_run,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="isometry",
        description="Dynamical isometry: mean-field and free-probability theory, measured.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except (ValueError, TypeError) as err:
        print(f"isometry {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
