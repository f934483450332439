"""The monitor's history: its JSON-lines log and its figure over training steps.

:class:`MonitorLog` appends one line per :func:`isometry.probe.monitor` call
(``{"step", "blocks", "loss", <field>: [K values]}``, :meth:`MonitorSummary.record`)
through :class:`isometry.jsonlog.MetricsLog`: whole lines, flushed and
fsynced, a partial last line (an interrupted write) ignored on reading, and
:meth:`MonitorLog.resume` (``step``) drops the lines past the step a run
resumes from, so the log of an interrupted and resumed run equals an
uninterrupted one's. :func:`read_history` turns a log into arrays and
:func:`plot_history` draws them per block over steps (PNG + PDF).
"""

from __future__ import annotations

import os

import numpy as np

from isometry import validate
from isometry.jsonlog import MetricsLog
from isometry.probe.monitor import FIELDS, MonitorSummary

__all__ = ["MonitorLog", "plot_history", "read_history"]


class MonitorLog(MetricsLog):
    """The monitor's JSON-lines file (``path``, created with its directory on the first write).

    ``write(step, summary)`` appends one record; ``resume(step)`` keeps the
    records with ``"step" <= step`` (call it once when a run resumes from a
    checkpoint at ``step``; ``-1`` empties the log); ``read()`` returns the records.
    """

    def write(self, step: int, summary: MonitorSummary) -> dict:
        """Append ``summary`` as the record of ``step``; returns the record."""
        if not isinstance(summary, MonitorSummary):
            raise TypeError(f"summary must be a MonitorSummary, got {type(summary).__name__}")
        rec = summary.record(step)
        self.append([rec])
        return rec

    def resume(self, step: int) -> list[dict]:
        """Drop the records past ``step`` (and a partial last line); returns those kept."""
        return self.truncate(validate.positive_int("step", step, minimum=-1))


def read_history(log: MonitorLog | str | os.PathLike) -> dict:
    """``{"step": (T,), "blocks": [K paths], "loss": (T,), <field>: (T, K)}`` of a monitor log.

    ``null`` values (NaN: a Jacobian field not measured at a block) read as NaN.

    Raises:
        ValueError: the log is empty, damaged before its last line (names the
            line), or its records name different blocks.
    """
    log = log if isinstance(log, MetricsLog) else MonitorLog(log)
    records = log.read()
    if not records:
        raise ValueError(f"{log.path} holds no monitor records")
    blocks = records[0].get("blocks")
    for r in records:
        if r.get("blocks") != blocks or any(f not in r for f in FIELDS):
            raise ValueError(
                f"{log.path}: the record of step {r['step']} is not a monitor record of the "
                f"blocks {blocks} (it has {sorted(r)})"
            )

    def column(name):
        return np.asarray([_floats(r[name]) for r in records], np.float64)

    return {
        "step": np.asarray([r["step"] for r in records]),
        "blocks": list(blocks),
        "loss": column("loss"),
        **{f: column(f) for f in FIELDS},
    }


def _floats(v):
    if isinstance(v, list):
        return [_floats(u) for u in v]
    if v is None:
        return np.nan
    return float(v)  # "inf" / "-inf" strings too


_JAC = r"$\partial y^l/\partial x$"
_PANELS = (
    ("mean_sq", "mean square of the block output", r"$\mathrm{mean}\,(y^l)^2$"),
    ("grad_out_sq", "gradient at the block output", r"$\|\partial L/\partial y^l\|^2$"),
    ("grad_param_sq", "gradient of the block parameters", r"$\|\partial L/\partial \theta^l\|^2$"),
    ("jac_sv2_mean", r"cumulative Jacobian: mean $s^2$", f"mean $s^2$ of {_JAC}"),
    ("jac_sv2_max", r"cumulative Jacobian: largest $s^2$", f"max $s^2$ of {_JAC}"),
)
FIGSIZE = (11.0, 6.8)
"""Inches; about 1,650 x 1,020 pixels at the project's 150 dpi."""


def plot_history(history, *, path=None, title: str = "", max_labels: int = 8):
    """Per block, the monitor's fields against the training step (log scale); PNG + PDF.

    ``history``: :func:`read_history`'s dict, or a log (or its path). Five
    panels (mean square, the two squared gradient norms, the mean and the
    largest squared singular value of the cumulative Jacobian, with the
    isometry line ``s^2 = 1``) and a key; one colour per block, from the first
    (dark) to the last (light), ``max_labels`` of them named in the key.

    Returns:
        the matplotlib figure (closed after saving when ``path`` is given).
    """
    import matplotlib.pyplot as plt

    from isometry import plotting

    h = history if isinstance(history, dict) else read_history(history)
    plotting.style()
    fig, axes = plt.subplots(2, 3, figsize=FIGSIZE, layout="constrained")
    axes = axes.ravel()
    blocks = h["blocks"]
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, max(len(blocks), 1)))
    shown = set(np.linspace(0, len(blocks) - 1, min(len(blocks), max_labels)).round().astype(int))
    for ax, (name, panel_title, ylabel) in zip(axes, _PANELS, strict=False):
        values = np.asarray(h[name], np.float64)
        for b, path_b in enumerate(blocks):
            col = values[:, b]
            if np.any(np.isfinite(col)):
                ax.plot(h["step"], col, "o-", ms=3, lw=1.2, color=colors[b],
                        label=path_b if b in shown else None)  # fmt: skip
        if name.startswith("jac_sv2") and ax.has_data():
            ax.axhline(1.0, color="0.4", lw=0.8, ls="--", label=r"isometry $s^2 = 1$")
        if np.any(np.isfinite(values) & (values > 0)):
            ax.set_yscale("log")
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
    _key(axes[5], axes[:5], len(blocks))
    if title:
        fig.suptitle(title, fontsize=12)
    if path is not None:
        plotting.save(fig, path)
    return fig


def _key(key_ax, axes, n_blocks: int) -> None:
    """The blocks (by colour) and the isometry line, in the sixth cell."""
    handles, labels = {}, []
    for ax in axes:
        for line in ax.get_lines():
            label = line.get_label()
            if not label.startswith("_") and label not in handles:
                handles[label] = line
                labels.append(label)
    key_ax.axis("off")
    if handles:
        key_ax.legend([handles[k] for k in labels], labels, loc="center", fontsize=9,
                      frameon=False, title=f"cut point ({n_blocks} blocks)")  # fmt: skip
