"""The ``isometry`` command: thin wrappers over library functions.

Each subcommand is a pair ``_add_<name>(subparsers)`` / ``_run_<name>(args)``
registered in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple

__all__ = ["main"]


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from err


class _Grid(NamedTuple):
    """An inclusive linear grid ``lo:hi:n`` (``np.linspace(lo, hi, n)``), shown as typed."""

    lo: float
    hi: float
    n: int

    def __str__(self) -> str:
        return f"{self.lo:g}:{self.hi:g}:{self.n}"


def _grid(text: str) -> _Grid:
    """``lo:hi:n`` -> an inclusive linear grid of ``n >= 1`` points."""
    try:
        lo, hi, n = text.split(":")
        grid = _Grid(float(lo), float(hi), int(n))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected LO:HI:N, got {text!r}") from err
    if grid.n < 1:
        raise argparse.ArgumentTypeError(f"expected LO:HI:N with N >= 1 points, got {text!r}")
    return grid


def _x64(args) -> None:
    import jax

    if getattr(args, "x64", False):
        jax.config.update("jax_enable_x64", True)


class _UsageError(Exception):
    """A command line that does not parse: printed as one line, exit code 2 (:func:`main`)."""


def _shown_default(value) -> str | None:
    """A flag's default as it would be typed (``0.5:5:181``, ``2,8,32,128``), or None for
    none (None, False, an empty list)."""
    if value is None or value is False or value == [] or value is argparse.SUPPRESS:
        return None
    if isinstance(value, list | tuple) and not isinstance(value, _Grid):
        return ",".join(str(v) for v in value)
    return str(value)


class _Parser(argparse.ArgumentParser):
    """The command's parsers: no prefix abbreviations (``--sigma-w`` is not taken for
    ``--sigma-w2``), every flag's default in ``--help``, usage errors raised as
    :class:`_UsageError`. Records ``flag_of`` (destination -> flag) and ``commands``
    (subcommand -> parser; subcommands' parsers are ``_Parser`` too)."""

    def __init__(self, *args, **kwargs):
        self.flag_of: dict[str, str] = {}
        self.commands: dict[str, _Parser] = {}
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if action.option_strings:
            self.flag_of.setdefault(action.dest, action.option_strings[-1])
            shown = _shown_default(action.default)
            if shown is not None and "%(default)" not in (action.help or ""):
                shown = shown.replace("%", "%%")
                action.help = f"{action.help or ''} (default: {shown})".lstrip()
        return action

    def add_subparsers(self, **kwargs):
        action = super().add_subparsers(**kwargs)
        self.commands = action.choices
        return action

    def error(self, message):
        raise _UsageError(f"{self.prog}: error: {message}")


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
    p.add_argument("--activation", default="tanh", help="activation name")
    p.add_argument("--sigma-w2", type=_grid, default=_Grid(0.5, 5.0, 181), metavar="LO:HI:N")
    p.add_argument("--sigma-b2", type=_grid, default=_Grid(0.0, 2.0, 81), metavar="LO:HI:N")
    p.add_argument("--out", type=Path, default=Path("results/phase_diagram"))
    p.add_argument("--x64", action="store_true", help="float64 (slower, 1e-11 accurate)")
    p.set_defaults(run=_run_phase_diagram)


def _run_phase_diagram(args) -> int:
    _x64(args)
    import numpy as np

    from isometry import activations, atomic, meanfield, plotting

    act = activations.get(args.activation)
    sw = np.linspace(*args.sigma_w2)
    sb = np.linspace(*args.sigma_b2)
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

    from isometry import signal

    k_in, k_loss = jax.random.split(jax.random.key(args.seed))
    u = signal.pair_inputs(k_in, args.batch, args.width)
    runs = [_signal_run(args, a, i, u, k_loss) for a in args.activation for i in args.init]
    for p in _write_signal(args, runs):
        print(f"[signal] wrote {p}")
    return 0


def _signal_config(args, act, init):
    from isometry import initializers, networks

    fixed = initializers.get(init).sigma_w2_param is None
    return networks.MLPConfig(
        depth=args.depth, width=args.width, activation=act, init=init,
        sigma_w2=None if fixed else args.sigma_w2, sigma_b2=args.sigma_b2, norm=args.norm,
        norm_position=args.norm_position, residual=args.residual,
        residual_scale=args.residual_scale,
    )  # fmt: skip


def _signal_run(args, act, init, u, key) -> dict:
    """One (activation, init): measured statistics and theory as NumPy arrays, printed."""
    import numpy as np
    from flax import nnx

    from isometry import networks, signal

    cfg = _signal_config(args, act, init)
    model = networks.MLP(cfg, rngs=nnx.Rngs(args.seed))
    t0 = time.perf_counter()
    run = {"activation": act, "label": init, "sigma_w2": cfg.variances()[0]}
    run.update({k: np.asarray(v) for k, v in signal.measure_with_theory(model, u, key=key).items()})
    ratio = float(run["grad_preact_sq"][0] / run["grad_preact_sq"][-1])
    print(
        f"[signal] {act:>8s} {init:>12s} sigma_w2={run['sigma_w2']:.3g}: "
        f"|g_1|^2/|g_L|^2 = {ratio:.3g}  ({time.perf_counter() - t0:.1f} s)",
        flush=True,
    )
    return run


def _write_signal(args, runs) -> list:
    """The npz, json and figures of ``isometry signal``; returns the paths."""
    import numpy as np

    from isometry import atomic, plotting

    arrays = {
        f"{r['activation']}/{r['label']}/{k}": v
        for r in runs
        for k, v in r.items()
        if isinstance(v, np.ndarray)
    }
    tag = f"signal_d{args.depth}_{args.norm}" + ("_residual" if args.residual else "")
    what = f"depth {args.depth}, width {args.width}, batch {args.batch}, norm {args.norm}"
    what += ", residual" if args.residual else ""
    out = args.out
    atomic.write_npz(out / f"{tag}.npz", **arrays)
    listed = [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()}
              for r in runs]  # fmt: skip
    args_record = {k: str(v) for k, v in vars(args).items() if k != "run"}
    atomic.write_json(out / f"{tag}.json", {"args": args_record, "runs": listed})
    paths = [out / f"{tag}.npz", out / f"{tag}.json"]
    figures = (
        ("gradients", plotting.signal_gradients_figure, "Gradient norms per layer"),
        ("forward", plotting.signal_forward_figure, "Forward signal per layer"),
    )
    for name, figure, title in figures:
        paths += plotting.save(figure(runs, f"{title} ({what})"), out / f"{tag}_{name}")
    return paths


# ----------------------------------------------------------------------------- spectrum


def _add_spectrum(sub):
    p = sub.add_parser(
        "spectrum",
        help="empirical Jacobian singular-value densities of random deep networks, per depth",
    )
    p.add_argument("--activation", default="tanh", help="activation name")
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
    p.add_argument(
        "--theory",
        action="store_true",
        help="overlay the free-probability density per depth, with its KS distance",
    )
    p.add_argument(
        "--theory-points", type=int, default=120, help="theory grid size per depth (~2.5x this)"
    )
    p.add_argument("--out", type=Path, default=Path("results/spectrum"))
    p.add_argument("--x64", action="store_true", help="float64")
    p.set_defaults(run=_run_spectrum)


def _check_spectrum_args(args) -> None:
    if not args.depths:
        raise ValueError("--depths: must list at least one depth")
    if min(args.depths) < 1:
        raise ValueError(f"--depths: must be >= 1, got {args.depths}")
    if args.theory_points < 8:
        raise ValueError(f"--theory-points: must be >= 8, got {args.theory_points}")


def _measure_spectra(args, net, depths):
    """Squared singular values ``(seeds, inputs, K, N)`` and the machine epsilon of their dtype."""
    import jax
    import numpy as np

    from isometry import jacobian

    t0 = time.perf_counter()
    lam = jacobian.random_network_spectra(
        jax.random.key(args.seed), net, depths, n_seeds=args.seeds, n_inputs=args.inputs,
        method=args.method,
    )  # fmt: skip
    eps = float(np.finfo(lam.dtype).eps)
    lam = np.asarray(lam)
    print(f"[spectrum] computed in {time.perf_counter() - t0:.2f} s", flush=True)
    return lam, eps


def _spectrum_theory(args, resolved, depths, pooled, eps):
    """:func:`isometry.spectra.compare_to_laws` of the pooled measurement ``(K, M)``; its
    warnings (``q*`` off the length fixed point) printed as they come."""
    from isometry import spectra

    act, init, sw, sb, q = resolved
    t1 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = _print_warning
        comparison = spectra.compare_to_laws(
            act, init.ensemble, q, sw, sb, depths, pooled, eps, method=args.method,
            points=args.theory_points,
        )  # fmt: skip
    print(f"[spectrum] theory in {time.perf_counter() - t1:.2f} s", flush=True)
    return comparison


def _print_warning(message, *_, **__) -> None:
    print(f"[spectrum] warning: {message}", flush=True)


def _run_spectrum(args) -> int:
    _x64(args)
    import numpy as np

    from isometry import jacobian, spectra

    _check_spectrum_args(args)
    depths = sorted(set(args.depths))
    net = jacobian.RandomNetwork(
        activation=args.activation, weights=args.init, sigma_w2=args.sigma_w2,
        sigma_b2=args.sigma_b2, q_star=args.q_star, width=args.width, depth=max(args.depths),
    )  # fmt: skip
    act, init, sw, sb, q = resolved = net.resolved()
    print(
        f"[spectrum] {act.name}, {init.name} weights, sigma_w2={sw:.6g}, sigma_b2={sb:.6g}, "
        f"q*={q:.6g}, width {args.width}, depths {depths}, {args.seeds} seeds ...",
        flush=True,
    )
    lam, eps = _measure_spectra(args, net, depths)  # (seeds, inputs, K, N)
    floor = spectra.resolution_floor(eps, args.method, float(lam.max()))
    pooled = np.moveaxis(lam, 2, 0).reshape(len(depths), -1)
    theory, arrays, record = None, {}, {}
    if args.theory:
        comparison = _spectrum_theory(args, resolved, depths, pooled, eps)
        theory, floor = [law.as_dict() for law in comparison.laws], comparison.floor
        arrays, record = comparison.as_arrays(), comparison.as_record()
    stats = {k: np.asarray(v).tolist() for k, v in spectra.summary(pooled).items()}
    hists = [spectra.histogram_density(np.sqrt(p), bins=80) for p in pooled]
    meta = {"activation": act.name, "init": init.name, "sigma_w2": sw, "sigma_b2": sb,
            "q_star": q, "width": args.width, "depths": depths, "seeds": args.seeds,
            "inputs": args.inputs, "summary_of_squared_singular_values": stats}  # fmt: skip
    tag = f"spectrum_{act.name}_{init.name}_N{args.width}"
    data = {"depths": np.asarray(depths), "sq_singular_values": lam,
            "hist_edges": np.stack([h[0] for h in hists]),
            "hist_density": np.stack([h[1] for h in hists]), **arrays}  # fmt: skip
    paths = _write_spectrum(args.out, tag, data, {**meta, **record}, pooled, theory, floor)
    _print_spectrum(depths, stats, theory, paths)
    return 0


def _write_spectrum(out, tag, arrays, record, pooled, theory, floor):
    """The npz, json and figure of ``isometry spectrum``; returns the paths."""
    from isometry import atomic, plotting

    atomic.write_npz(out / f"{tag}.npz", **arrays)
    atomic.write_json(out / f"{tag}.json", record)
    title = (
        f"{record['activation']}, {record['init']} weights, $q^*$={record['q_star']:.3g}, "
        f"$\\sigma_w^2$={record['sigma_w2']:.3g}, $\\sigma_b^2$={record['sigma_b2']:.3g}, "
        f"N={record['width']}, {record['seeds']} seeds"
    )
    fig = plotting.spectrum_figure(record["depths"], pooled, title, theory=theory, floor=floor)
    return [out / f"{tag}.npz", out / f"{tag}.json", *plotting.save(fig, out / tag)]


def _print_spectrum(depths, stats, theory, paths) -> None:
    for d, m, v, mx in zip(depths, stats["mean"], stats["var"], stats["max"], strict=True):
        print(f"[spectrum] L={d:5d}  mean s^2={m:.4f}  var s^2={v:.4f}  max s^2={mx:.4f}")
    for d, th in zip(depths, theory or [], strict=False):
        atoms = "".join(
            f", atom {m:.3f} at s={a:.4g}"
            for a, m in zip(th["atom_locations"], th["atom_masses"], strict=True)
        )
        print(
            f"[spectrum] L={d:5d}  theory: mean s^2={th['mean']:.4f}  var s^2={th['var']:.4f}  "
            f"edge s^2={th['edge']:.4f}  atom at 0: {th['atom_at_zero']:.3f}{atoms}; "
            f"mass below s^2={th['floor']:.2g}: {th['below_floor']:.3f} (measured "
            f"{th['measured_below_floor']:.3f}); KS distance {th['ks']:.4f}"
        )
    for p in paths:
        print(f"[spectrum] wrote {p}")


# ------------------------------------------------------------------------------ train

_TRAIN_MODEL_FLAGS = ("depth", "width", "activation", "init", "q_star", "sigma_w2", "sigma_b2",
                      "norm", "norm_position", "residual", "residual_scale")  # fmt: skip


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
    """A RunConfig from ``--config`` (if any) with the given flags applied.

    The training flags are the ones named like :class:`isometry.training.TrainConfig`
    fields (:func:`isometry.training.config.field_values`); the TrainConfig is built
    once from the base config's fields and those flags.
    """
    import dataclasses

    from isometry import networks, training
    from isometry.training.config import field_values

    base = training.RunConfig.from_json(args.config) if args.config else None
    model = dataclasses.asdict(base.model) if base else {"depth": 32, "width": 256}
    train = base.train.to_dict() if base else {}
    run = base.to_dict() if base else {}
    for name in _TRAIN_MODEL_FLAGS:
        if getattr(args, name) is not None:
            model[name] = getattr(args, name)
    train.update(field_values(training.TrainConfig, vars(args)))
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
    except training.RunLockedError as err:
        print(f"isometry train: error: {err}", file=sys.stderr)
        return 2
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
    p.add_argument("--no-progress", action="store_true",
                   help="no stage and point reports on stderr")  # fmt: skip
    p.add_argument("--list", action="store_true", help="list the figures and their captions")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="figures made at once, each in its own process (default: the CPU "
                        "cores on a CPU, 1 on an accelerator)")  # fmt: skip
    p.set_defaults(run=_run_figures)


def _run_figures(args) -> int:
    from isometry.paper_figures import FIGURES, core

    if args.list:
        for n in FIGURES:
            print(f"{n}: {core.caption(n)}")
        return 0
    names = args.names or list(FIGURES)
    for n in names:
        core.load_module(n)  # unknown names fail before any work starts
    jobs = core.default_jobs() if args.jobs is None else args.jobs
    if jobs < 1:
        raise ValueError(f"--jobs: must be >= 1, got {jobs}")
    jobs = min(jobs, len(names))
    t0 = time.perf_counter()
    print(f"[figures] {len(names)} figure(s) at the {args.tier} tier, {jobs} at a time", flush=True)
    made = core.make_many(names, args.tier, args.out, args.results, args.recompute,
                          progress=not args.no_progress, jobs=jobs)  # fmt: skip
    for i, (n, paths, seconds, cpu) in enumerate(made, 1):
        tag = f"[figures {i}/{len(names)}]"
        for p in paths:
            print(f"{tag} wrote {p}", flush=True)
        print(f"{tag} {n} done in {seconds:.1f} s ({cpu:.1f} s of CPU)", flush=True)
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
    from isometry import experiments, sweep, validate

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
    validate.positive_int("per_device", args.per_device)  # before any progress is printed
    experiments.config(args.experiment, args.preset, args.overrides)  # bad --set fails first
    pi, pc = sweep.initialize(args.coordinator, args.num_processes, args.process_id)
    out = args.out or Path("results") / args.experiment / args.preset
    opts = {"per_device": args.per_device, "progress": not args.no_progress}
    if args.optimize is not None:
        opts["optimize"] = args.optimize
    if pi == 0 and not args.no_progress:
        print(f"[run] {args.experiment} ({args.preset}, {pc} process(es)) into {out}",
              file=sys.stderr, flush=True)  # fmt: skip
    t0 = time.perf_counter()
    path = experiments.run(args.experiment, args.preset, args.overrides, out, **opts)
    if pi == 0:
        print(f"[run] {args.experiment} ({args.preset}, {pc} process(es)): "
              f"{time.perf_counter() - t0:.1f} s; wrote {path}")  # fmt: skip
    return 0


# ----------------------------------------------------------------------------- probe


def _add_probe(sub):
    p = sub.add_parser(
        "probe",
        help="per-block signals, gradients and Jacobian spectra of any Flax NNX model",
        description="Build a model with a user's factory (MODULE:NAME or FILE.py:NAME, called "
        "without arguments) and probe it at its blocks on standard normal inputs.",
    )
    p.add_argument("factory", help="MODULE:NAME or FILE.py:NAME returning an nnx.Module")
    p.add_argument("--input-shape", type=_ints, required=True, help="batch first, e.g. 32,8,8,1")
    p.add_argument("--at", type=_names, default=None, help="cut points (module paths, a,b,...)")
    p.add_argument("--method", choices=["auto", "dense", "slq"], default="auto")
    p.add_argument(
        "--no-theory",
        action="store_true",
        help="measure only (the theory engine's predictions are drawn by default)",
    )
    p.add_argument(
        "--activation",
        default=None,
        help="ignored: the theory engine reads the activation off the model",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/probe"))
    p.add_argument("--x64", action="store_true", help="float64")
    p.set_defaults(run=_run_probe)


def _run_probe(args) -> int:
    _x64(args)
    import jax

    from isometry import probe

    model = probe.load_factory(args.factory)()
    k_x, k_loss, k_slq = jax.random.split(jax.random.key(args.seed), 3)
    x = jax.random.normal(k_x, tuple(args.input_shape))
    sig = probe.signal(model, x, at=args.at, key=k_loss)
    spec = probe.jacobian_spectra(model, x, at=args.at, method=args.method, key=k_slq)
    th = None if args.no_theory else _probe_theory(probe, model, x, args.at)
    for row, mean, spread in zip(
        sig.rows(), spec.cumulative_summary["mean"], spec.cumulative_summary["log_spread"],
        strict=True,
    ):  # fmt: skip
        print(f"[probe] {row['block']:>24s}  mean_sq={row['mean_sq']:.4g}  "
              f"|dL/dy|^2={row['grad_out_sq']:.4g}  |dL/dtheta|^2={row['grad_param_sq']:.4g}  "
              f"J: mean s^2={float(mean):.4g} spread={float(spread):.3g}")  # fmt: skip
    name = Path(args.factory).name  # FILE.py:NAME without its folders
    run = {"signal": sig, "spectra": spec, "theory": th, "label": name}
    probe.plot(run, path=args.out / "probe", title=f"{name}, input {tuple(x.shape)}")
    written = probe.save(args.out, sig, spec, theory=th)
    for p in [*written, args.out / "probe.png", args.out / "probe.pdf"]:
        print(f"[probe] wrote {p}")
    return 0


def _probe_theory(probe, model, x, at):
    """The theory of the probe's cut points, or ``None`` with a line saying why not (the
    measurement is written either way)."""
    from isometry import theory

    try:
        return probe.theory(model, x, at=at)
    except (theory.TheoryError, probe.ProbeError) as err:
        print(f"[probe] theory not drawn: {err}")
        return None


COMMANDS = [
    _add_info,
    _add_phase_diagram,
    _add_signal,
    _add_probe,
    _add_spectrum,
    _add_train,
    _add_figures,
    _add_run,
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="isometry",
        description="Dynamical isometry: mean-field and free-probability theory, measured.",
        epilog="Errors are one line and a non-zero exit code; --debug (or ISOMETRY_DEBUG=1) "
        "shows the traceback.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


# A value that starts with "-" and a digit or "." (-1:2:5, -.5, -1e-3) after an option is
# that option's value, not a flag: argparse takes only plain negative numbers as values,
# so such a token is joined to the option before it ("--sigma-w2=-1:2:5").
_NEGATIVE_VALUE = re.compile(r"-\.?\d")


def _join_negative_values(argv: list[str]) -> list[str]:
    out: list[str] = []
    for tok in argv:
        prev = out[-1] if out else ""
        if prev.startswith("-") and "=" not in prev and _NEGATIVE_VALUE.match(tok):
            out[-1] = f"{prev}={tok}"
        else:
            out.append(tok)
    return out


# What the library raises for bad input, files and numbers, with the exit code of each.
_ERRORS = (
    ((ValueError, TypeError, KeyError, LookupError), 2),  # bad arguments (JSON errors too)
    ((OSError,), 2),  # missing, unreadable or unwritable files and directories
    ((ImportError,), 2),  # a factory or experiment module that does not import
    ((ArithmeticError,), 3),  # NaN/inf in a run (training.NonFiniteError)
)


def _message(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.strerror}: {err.filename}"
    text = str(err).strip().splitlines()
    text = text[0] if text else ""
    if isinstance(err, KeyError) and text:
        return f"unknown key {text}"
    return f"{type(err).__name__}: {text}" if not text or type(err) is LookupError else text


def _check_out(out) -> None:
    """``--out`` is (or can be made) a writable directory: fail before any computation."""
    if out is None:
        return
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(20, "--out is not a directory", str(out))
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(13, "--out is not writable", str(out))


def _unknown(prog: str, extra: list[str], parsers: list[_Parser]) -> str:
    """One line naming the unknown flags among ``extra`` (what no parser took), each with
    the flag of that destination (``--learning-rate``: ``--lr``) or the closest flag of
    ``parsers`` (difflib) when there is one; else the unexpected arguments."""
    given = [t.split("=", 1)[0] for t in extra if t.startswith("-") and len(t) > 1]
    if not given:
        return f"{prog}: error: unexpected argument(s) {' '.join(extra)} (see {prog} --help)"
    flag_of = {k: v for p in reversed(parsers) for k, v in p.flag_of.items()}
    parts = []
    for flag in dict.fromkeys(given):
        same = flag_of.get(flag.lstrip("-").replace("-", "_"))
        close = [same] if same else difflib.get_close_matches(flag, flag_of.values(), 1, 0.75)
        hint = f"did you mean {close[0]}?" if close else f"see {prog} --help"
        if close == [flag]:  # a flag of the top-level parser after the command
            hint = f"{flag} goes before the command"
        parts.append(f"unknown flag {flag} ({hint})")
    return f"{prog}: {'; '.join(parts)}"


def _parse(parser: _Parser, argv: list[str]):
    """The parsed arguments; an unknown flag is reported by its subcommand (:func:`_unknown`)."""
    args, extra = parser.parse_known_args(_join_negative_values(argv))
    if extra:
        command = parser.commands.get(args.command)
        prog = command.prog if command else parser.prog
        raise _UsageError(_unknown(prog, extra, [command or parser, parser]))
    return args


# Library parameters that a flag of another name sets (other flags set the parameter named
# like their destination: --width sets width, --lr sets learning_rate).
_PARAMETER_FLAGS = {
    "sigma_w2_grid": "sigma_w2",  # meanfield.phase_diagram
    "sigma_b2_grid": "sigma_b2",
    "n_seeds": "seeds",  # jacobian.random_network_spectra
    "n_inputs": "inputs",
    "points": "theory_points",  # spectra.compare_to_laws
}
# "name must ..." or "SomeConfig: name must ..." (isometry.validate's messages).
_ABOUT_PARAMETER = re.compile(r"(?:[A-Z]\w*: )?([a-z]\w*) (must .*)", re.S)


def _in_flags(text: str, command: _Parser | None) -> str:
    """A library's message about a parameter that a flag sets, as one about the flag:
    ``sigma_w2_grid must be > 0.0, ...`` -> ``--sigma-w2: must be > 0.0, ...``. (A value
    read from a ``--config`` file keeps its name: its message starts with the file's.)"""
    m = _ABOUT_PARAMETER.fullmatch(text)
    flag = command.flag_of.get(_PARAMETER_FLAGS.get(m[1], m[1])) if m and command else None
    return f"{flag}: {m[2]}" if flag else text


def main(argv: list[str] | None = None) -> int:
    """Run the command; an error is one line on stderr and a non-zero exit code.

    Exit codes: 0 success, 2 bad arguments or files, 3 a run stopped on NaN/inf,
    130 interrupted. ``--debug`` or ``ISOMETRY_DEBUG=1`` re-raises (traceback).
    Flags are never abbreviated; an unknown flag is named with the closest valid one.
    """
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _parse(parser, argv)
    except _UsageError as err:
        print(err, file=sys.stderr)
        return 2
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    debug = args.debug or os.environ.get("ISOMETRY_DEBUG", "") not in ("", "0")
    try:
        _check_out(getattr(args, "out", None))
        from isometry import runtime

        with runtime.lapack_threads(1):  # LAPACK inside XLA programs: see isometry.runtime
            return int(args.run(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"isometry {args.command}: interrupted", file=sys.stderr)
        return 130
    except tuple(e for kinds, _ in _ERRORS for e in kinds) as err:
        if debug:
            raise
        text = _message(err)
        if isinstance(err, ValueError | TypeError):
            text = _in_flags(text, parser.commands.get(args.command))
        print(f"isometry {args.command}: error: {text}", file=sys.stderr)
        return next(code for kinds, code in _ERRORS if isinstance(err, kinds))


if __name__ == "__main__":
    sys.exit(main())
