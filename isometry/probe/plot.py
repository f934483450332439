"""The probe's figure: every per-block measurement of one or more runs (PNG + PDF)."""

from __future__ import annotations

from isometry.probe.signal import ProbeSignal
from isometry.probe.spectra import ProbeSpectra

__all__ = ["plot"]


_SIGNAL_PANELS = (
    ("forward statistics of the block output", "mean_sq", "chan_var", "chan_sq_mean", "branch_var"),
    ("cosines", "pair_cosine", "position_cosine"),
    ("squared gradient norms", "grad_out_sq", "grad_param_sq"),
)
_LABELS = {
    "mean_sq": "mean square",
    "chan_var": "avg. channel variance",
    "chan_sq_mean": "avg. channel squared mean",
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


def plot(*runs, path=None, title: str = ""):
    """One figure of everything per block; saved as ``path.png`` and ``path.pdf`` if given.

    Each run is a :class:`ProbeSignal`, a ``(ProbeSignal, ProbeSpectra)``
    pair, or a dict with any of ``"signal"``, ``"spectra"``, ``"theory"`` (the
    dict of :func:`theory`) and ``"label"``. Panels: forward statistics,
    cosines, gradients (Brock, De & Smith 2021), and the mean and the
    spread (standard deviation of ``ln s^2``) of the squared singular values
    of the cumulative and local Jacobians. Measurement is drawn as markers,
    mean-field theory as black lines (dashed for the first run, dotted for
    the others; relative gradient curves scaled to the measurement at the last
    block). Several runs share the axes, told apart by line style and label.

    Returns:
        the matplotlib figure (closed after saving when ``path`` is given).
    """
    import matplotlib.pyplot as plt

    from isometry import plotting

    runs = [_as_run(r) for r in runs]
    if not runs:
        raise ValueError("probe.plot: pass at least one run")
    plotting.style()
    fig, axes = plt.subplots(1, 5, figsize=(22, 4.4), constrained_layout=True)
    styles = ("-", "--", ":", "-.")
    for r_i, run in enumerate(runs):
        ls, label = styles[r_i % len(styles)], run.get("label", "")
        if run.get("signal") is not None:
            _signal_panels(axes[:3], run["signal"], run.get("theory"), ls, label)
        if run.get("spectra") is not None:
            _jacobian_panel(axes[3:], run["spectra"], ls, label)
    if axes[4].has_data():
        axes[4].set_ylim(bottom=0)
    ref = next((r.get("signal") or r.get("spectra") for r in runs), None)
    for ax in axes:
        _block_axis(ax, ref.paths if ref is not None else ())
        if ax.has_data():
            ax.legend(loc="best", fontsize=7)
    if title:
        fig.suptitle(title)
    if path is not None:
        plotting.save(fig, path)
    return fig


def _signal_panels(axes, sig: ProbeSignal, th, ls: str, label: str) -> None:
    import numpy as np

    k = np.arange(1, len(sig.paths) + 1)
    colors = ("C0", "C1", "C2", "C3")
    suffix = f" ({label})" if label else ""
    th_ls = "--" if ls == "-" else ":"  # each run's theory told apart too
    for ax, (ptitle, *fields) in zip(axes, _SIGNAL_PANELS, strict=True):
        for c, f in zip(colors, fields, strict=False):
            v = np.asarray(getattr(sig, f), float)
            if np.all(np.isnan(v)):
                continue
            ax.plot(k, v, ls, marker="o", ms=3.5, lw=1, color=c, label=_LABELS[f] + suffix)
            if th is not None and f in th:
                t = np.asarray(th[f], float)
                if f.startswith("grad"):
                    t = t * v[-1] / t[-1]
                ax.plot(
                    k, t, th_ls, color="black", lw=1.2, label=f"{_LABELS[f]} mean field{suffix}"
                )
        ax.set_title(ptitle)
        if ptitle != "cosines":
            ax.set_yscale("log")
    axes[0].set_ylabel("value")
    axes[1].set_ylim(-0.1, 1.05)


def _jacobian_panel(axes, spec: ProbeSpectra, ls: str, label: str) -> None:
    import numpy as np

    k = np.arange(1, len(spec.paths) + 1)
    suffix = f" ({label})" if label else ""
    for name, color in (("cumulative", "C4"), ("local", "C5")):
        s = {key: np.asarray(v, float) for key, v in getattr(spec, f"{name}_summary").items()}
        kw = {"marker": "s", "ms": 3.5, "color": color}
        axes[0].plot(k, s["mean"], ls, **kw, label=f"{name} mean $s^2$" + suffix)
        axes[1].plot(k, s["log_spread"], ls, **kw, label=f"{name}" + suffix)
    axes[0].set_yscale("log")
    axes[0].set_title(f"Jacobian mean $s^2$, one example ({spec.method})")
    axes[1].set_title(r"Jacobian spread: std of $\ln s^2$")


def _block_axis(ax, paths) -> None:
    k = range(1, len(paths) + 1)
    if 0 < len(paths) <= 16:
        ax.set_xticks(list(k), list(paths), rotation=60, ha="right", fontsize=7)
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block (cut point)")
