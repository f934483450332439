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


COMMANDS = [_add_info, _add_phase_diagram]


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
