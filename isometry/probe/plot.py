"""The probe's figures: every per-block measurement of one or more runs, and the coordinate
check (PNG + PDF)."""

from __future__ import annotations

from isometry.probe.coord import CoordCheck
from isometry.probe.signal import ProbeSignal
from isometry.probe.spectra import ProbeSpectra

__all__ = ["coord_plot", "plot"]


_SIGNAL_PANELS = (
    ("forward statistics of the block output", "mean_sq", "chan_var", "chan_sq_mean", "branch_var"),
    ("cosines", "pair_cosine", "position_cosine"),
    ("squared gradient norms", "grad_out_sq", "grad_param_sq"),
)
_LABELS = {
    "mean_sq": "mean square",
    "chan_var": "channel variance",
    "chan_sq_mean": "channel squared mean",
    "branch_var": "residual-branch variance",
    "pair_cosine": "pair cosine (examples)",
    "position_cosine": "position cosine (tokens)",
    "grad_out_sq": r"$\|\partial L/\partial y^l\|^2$",
    "grad_param_sq": r"$\|\partial L/\partial \theta^l\|^2$",
}


def _as_run(run) -> dict:
    if isinstance(run, ProbeSignal):
        return {"signal": run}
    if isinstance(run, ProbeSpectra):
        return {"spectra": run}
    if isinstance(run, tuple):
        return {"signal": run[0], "spectra": run[1] if len(run) > 1 else None}
    if isinstance(run, dict):
        return run
    raise TypeError(f"probe.plot: a run is a ProbeSignal, ProbeSpectra, tuple or dict, got {run!r}")


_STYLES = ("-", "--", ":", "-.")
FIGSIZE = (11.0, 8.0)
"""Inches; at the project's 150 dpi the PNG is about 1,650 x 1,200 pixels, its text
(8 to 12 points) 17 to 25 pixels high when viewed at 100%."""


def plot(*runs, path=None, title: str = ""):
    """One figure of everything per block; saved as ``path.png`` and ``path.pdf`` if given.

    Each run is a :class:`ProbeSignal`, a ``(ProbeSignal, ProbeSpectra)``
    pair, or a dict with any of ``"signal"``, ``"spectra"``, ``"theory"`` (the
    dict of :func:`theory`) and ``"label"``. Panels, in a grid of two rows of
    three: forward statistics, cosines, gradients (Brock, De & Smith 2021),
    and the mean and the spread (standard deviation of ``ln s^2``) of the
    squared singular values of the cumulative and local Jacobians; each
    panel's legend (its quantities, by colour) sits below it, and the sixth
    cell is the key: the runs (by line style) and mean-field theory.
    Measurement is drawn as markers, theory as black lines (dashed for the first
    run, dotted for the others): every field :func:`theory` predicts, the
    cumulative Jacobian's mean included; the toolkit stacks' relative gradient
    curves are scaled to the measurement at the last block.

    Returns:
        the matplotlib figure (closed after saving when ``path`` is given).
    """
    from isometry import plotting

    runs = [_as_run(r) for r in runs]
    if not runs:
        raise ValueError("probe.plot: pass at least one run")
    plotting.style()
    fig, axes, legend_axes, key_ax = _grid()
    for r_i, run in enumerate(runs):
        ls = _STYLES[r_i % len(_STYLES)]
        if run.get("signal") is not None:
            _signal_panels(axes[:3], run["signal"], run.get("theory"), ls)
        if run.get("spectra") is not None:
            _jacobian_panel(axes[3:], run["spectra"], run.get("theory"), ls)
    if axes[4].has_data():
        axes[4].set_ylim(bottom=0)
    ref = next((r.get("signal") or r.get("spectra") for r in runs), None)
    for ax, lax in zip(axes, legend_axes, strict=True):
        _block_axis(ax, ref.paths if ref is not None else ())
        _legend_below(ax, lax)
    _key(key_ax, runs)
    if title:
        fig.suptitle(title, fontsize=12)
    if path is not None:
        plotting.save(fig, path)
    return fig


def _grid():
    """``(figure, 5 panels, their 5 legend cells, the key cell)``: two rows of three panels,
    each above a cell for its legend (constrained layout keeps the tick labels between)."""
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=FIGSIZE, layout="constrained")
    gs = fig.add_gridspec(4, 3, height_ratios=(1.0, 0.16, 1.0, 0.16))
    cells = [(row, col) for row in (0, 2) for col in range(3)]
    axes = [fig.add_subplot(gs[r, c]) for r, c in cells[:5]]
    legend_axes = [fig.add_subplot(gs[r + 1, c]) for r, c in cells[:5]]
    key_ax = fig.add_subplot(gs[2:, 2])
    for ax in (*legend_axes, key_ax):
        ax.axis("off")
    return fig, axes, legend_axes, key_ax


def _legend_below(ax, lax) -> None:
    """The quantities of panel ``ax`` (one entry per colour, solid) in the cell ``lax``."""
    from matplotlib.lines import Line2D

    seen = {}
    for line in ax.get_lines():
        label = line.get_label()
        if not label.startswith("_") and label not in seen:
            seen[label] = Line2D([], [], color=line.get_color(), marker=line.get_marker(), ms=4)
    if seen:
        lax.legend(list(seen.values()), list(seen), loc="upper center", ncol=2, fontsize=8,
                   frameon=False, borderaxespad=0.0, columnspacing=1.0)  # fmt: skip


def _key(ax, runs) -> None:
    """The key cell: one entry per run (its line style) and the mean-field line styles."""
    from matplotlib.lines import Line2D

    handles = []
    if len(runs) > 1 or runs[0].get("label"):
        for r_i, run in enumerate(runs):
            label = run.get("label") or f"run {r_i + 1}"
            ls = _STYLES[r_i % len(_STYLES)]
            handles.append(Line2D([], [], color="0.35", ls=ls, marker="o", ms=4, label=label))
    with_theory = [r_i for r_i, run in enumerate(runs) if run.get("theory") is not None]
    for r_i in with_theory:
        label = runs[r_i].get("label") or f"run {r_i + 1}"
        which = "" if len(runs) == 1 else f" ({label})"
        ls = "--" if r_i == 0 else ":"
        handles.append(Line2D([], [], color="black", ls=ls, lw=1.2, label=f"theory{which}"))
    if handles:
        ax.legend(handles=handles, loc="center", fontsize=10, title="runs: line style",
                  title_fontsize=10, frameon=False, handlelength=3.0)  # fmt: skip


def _signal_panels(axes, sig: ProbeSignal, th, ls: str) -> None:
    import numpy as np

    k = np.arange(1, len(sig.paths) + 1)
    colors = ("C0", "C1", "C2", "C3")
    th_ls = "--" if ls == "-" else ":"  # each run's theory told apart too
    for ax, (ptitle, *fields) in zip(axes, _SIGNAL_PANELS, strict=True):
        for c, f in zip(colors, fields, strict=False):
            v = np.asarray(getattr(sig, f), float)
            if np.all(np.isnan(v)):
                continue
            ax.plot(k, v, ls, marker="o", ms=3.5, lw=1, color=c, label=_LABELS[f])
            if th is not None and f in th:
                t = np.asarray(th[f], float)
                if f.startswith("grad") and not th.get("absolute", False):
                    t = t * v[-1] / t[-1]  # a relative curve: scaled to the last block
                ax.plot(k, t, th_ls, color="black", lw=1.2, label="_theory")
        ax.set_title(ptitle)
        if ptitle != "cosines":
            ax.set_yscale("log")
    axes[0].set_ylabel("value")
    axes[1].set_ylim(-0.1, 1.05)


def _jacobian_panel(axes, spec: ProbeSpectra, th, ls: str) -> None:
    import numpy as np

    k = np.arange(1, len(spec.paths) + 1)
    if th is not None and "cumulative_mean" in th:
        t = np.asarray(th["cumulative_mean"], float)
        if not np.all(np.isnan(t)):
            th_ls = "--" if ls == "-" else ":"
            axes[0].plot(k, t, th_ls, color="black", lw=1.2, label="_theory")
    for name, color in (("cumulative", "C4"), ("local", "C5")):
        s = {key: np.asarray(v, float) for key, v in getattr(spec, f"{name}_summary").items()}
        kw = {"marker": "s", "ms": 3.5, "color": color}
        axes[0].plot(k, s["mean"], ls, **kw, label=f"{name} Jacobian")
        axes[1].plot(k, s["log_spread"], ls, **kw, label=f"{name} Jacobian")
    axes[0].set_yscale("log")
    axes[0].set_title(f"Jacobian mean $s^2$, one example ({spec.method})")
    axes[1].set_title(r"Jacobian spread: std of $\ln s^2$")


def _block_axis(ax, paths) -> None:
    k = range(1, len(paths) + 1)
    if 0 < len(paths) <= 16:
        ax.set_xticks(list(k), list(paths), rotation=60, ha="right", fontsize=8)
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block (cut point)")


def coord_plot(*checks: CoordCheck, path=None, title: str = "", labels=None):
    """The coordinate check (microsoft/mup's plot): ``mean |y^l_t|`` (top row) and
    ``mean |y^l_t - y^l_0|`` (bottom row) against width (or depth), log-log, one column per
    recorded step ``t``, one colour per block, mean over seeds with its standard deviation
    as error bars; several checks (e.g. standard and muP) by line style, named by ``labels``.
    The legend gives each block's slope of log change vs log width (or depth) at the last
    step, the mean over seeds (:meth:`CoordCheck.slopes`).
    Saved as ``path.png`` and ``path.pdf`` if given; returns the figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    from isometry import plotting

    if not checks or not all(isinstance(c, CoordCheck) for c in checks):
        raise TypeError("probe.coord_plot: pass one or more CoordCheck results")
    labels = list(labels) if labels is not None else [c.kind or f"run {i + 1}" for i, c in
                                                      enumerate(checks)]  # fmt: skip
    plotting.style()
    T = checks[0].size.shape[2]
    fig, axes = plt.subplots(2, T, figsize=(3.0 * T + 1.0, 6.2), squeeze=False,
                             layout="constrained")  # fmt: skip
    for c_i, (check, label) in enumerate(zip(checks, labels, strict=True)):
        _coord_rows(axes, check, label, _STYLES[c_i % len(_STYLES)])
    sizes = [int(n) for n in checks[0].sizes]
    for t in range(T):
        axes[0, t].set_title(f"t = {t}" + (" (initialization)" if t == 0 else ""))
        for row, name in ((0, "mean |y_t|"), (1, "mean |y_t - y_0|")):
            ax = axes[row, t]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(sizes, [str(n) for n in sizes])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlabel(checks[0].over)
            if t == min(row, T - 1):
                ax.set_ylabel(name)
    axes[1, 0].axis("off")  # no change at initialization
    handles, names = axes[1, -1].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=min(4, len(names)), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=12)
    if path is not None:
        plotting.save(fig, path)
    return fig


def _coord_rows(axes, check: CoordCheck, label: str, ls: str) -> None:
    import numpy as np

    n = np.asarray(check.sizes, float)
    slopes = check.slopes()
    for row, name in ((0, "size"), (1, "change")):
        v = np.asarray(getattr(check, name), float)  # (seeds, S, T, K)
        mean, std = v.mean(axis=0), v.std(axis=0)
        for t in range(v.shape[2]):
            if row == 1 and t == 0:
                continue
            for k, block in enumerate(check.blocks):
                slope = float(slopes["change_mean"][-1, k])
                text = f"{block} ({label}, slope {slope:+.2f})" if row == 1 else "_nolegend_"
                style = {"ls": ls, "marker": "o", "ms": 3, "lw": 1, "capsize": 2}
                axes[row, t].errorbar(
                    n, mean[:, t, k], yerr=std[:, t, k], color=f"C{k % 10}", label=text, **style
                )
