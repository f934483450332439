"""Matplotlib figures. No computation here: every function takes computed arrays.

All figures share one style (:func:`style`), label their axes, draw theory as
lines over measurement as markers or histograms, and are saved as PNG and PDF
by :func:`save`.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

if os.environ.get("MPLBACKEND") is None:
    matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["phase_diagram_figure", "save", "style"]

THEORY_COLOR = "black"


def style() -> None:
    """The project's figure style (applied by every figure function)."""
    plt.rcParams.update(
        {
            "figure.dpi": 110,
            "savefig.dpi": 150,
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "legend.fontsize": 8,
            "axes.grid": False,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )


def save(fig, path: str | os.PathLike) -> list[Path]:
    """Save ``fig`` as ``path.png`` and ``path.pdf`` (atomically); returns the paths."""
    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for ext in ("png", "pdf"):
        target = base.with_suffix(f".{ext}")
        tmp = target.with_name(f".{target.name}.tmp")
        fig.savefig(tmp, format=ext, bbox_inches="tight")
        os.replace(tmp, target)
        out.append(target)
    plt.close(fig)
    return out


def phase_diagram_figure(diagram: dict, activation: str):
    """chi1 heat map with the edge of chaos, and q* and xi_c panels.

    ``diagram`` holds arrays ``sigma_w2 (W,)``, ``sigma_b2 (B,)``, ``chi1, q_star,
    c_star, xi_c (W, B)`` and ``critical_sigma_w2 (B,)`` (as from
    :func:`isometry.meanfield.phase_diagram`).
    """
    style()
    sw = np.asarray(diagram["sigma_w2"])
    sb = np.asarray(diagram["sigma_b2"])
    crit = np.asarray(diagram["critical_sigma_w2"])
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.9), constrained_layout=True)
    extent = (sw[0], sw[-1], sb[0], sb[-1])

    def panel(ax, values, title, cmap, label, norm=None):
        im = ax.imshow(
            np.asarray(values).T,
            origin="lower",
            extent=extent,
            aspect="auto",
            cmap=cmap,
            norm=norm,
            interpolation="nearest",
        )
        ok = np.isfinite(crit)
        ax.plot(crit[ok], sb[ok], color="white", lw=2.4)
        ax.plot(
            crit[ok], sb[ok], color=THEORY_COLOR, lw=1.2, ls="--", label=r"edge of chaos $\chi_1=1$"
        )
        ax.set_xlim(sw[0], sw[-1])
        ax.set_ylim(sb[0], sb[-1])
        ax.set_xlabel(r"weight variance $\sigma_w^2$")
        ax.set_ylabel(r"bias variance $\sigma_b^2$")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, label=label)
        return ax

    from matplotlib.colors import LogNorm, TwoSlopeNorm

    chi = np.clip(np.asarray(diagram["chi1"], float), 1e-3, 1e3)
    lo, hi = max(np.nanmin(chi), 1e-3), min(np.nanmax(chi), 1e3)
    norm = TwoSlopeNorm(vcenter=1.0, vmin=min(lo, 0.99), vmax=max(hi, 1.01))
    ax = panel(
        axes[0],
        chi,
        rf"$\chi_1$ ({activation}): ordered < 1 < chaotic",
        "RdBu_r",
        r"$\chi_1$",
        norm,
    )
    ax.legend(loc="upper left", framealpha=0.9)
    ax.text(0.97, 0.05, "chaotic", transform=ax.transAxes, ha="right", color="darkred")
    ax.text(0.03, 0.05, "ordered", transform=ax.transAxes, ha="left", color="navy")
    q = np.asarray(diagram["q_star"], float)
    q = np.where(np.isfinite(q), q, np.nan)
    panel(axes[1], q, r"length fixed point $q^*$", "viridis", r"$q^*$")
    xi = np.asarray(diagram["xi_c"], float)
    xi = np.clip(np.where(np.isfinite(xi), xi, 1e3), 0.5, 1e3)
    panel(
        axes[2],
        xi,
        r"correlation depth scale $\xi_c$",
        "magma",
        r"$\xi_c$ (layers)",
        LogNorm(0.5, 1e3),
    )
    return fig
