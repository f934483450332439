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

__all__ = [
    "depth_scales_figure",
    "phase_diagram_figure",
    "save",
    "signal_forward_figure",
    "signal_gradients_figure",
    "spectrum_figure",
    "style",
]

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


def phase_diagram_figure(diagram: dict, activation: str, panels=("chi1", "q_star", "xi_c")):
    """Heat maps over (sigma_w2, sigma_b2) with the edge of chaos drawn on each.

    ``diagram`` holds arrays ``sigma_w2 (W,)``, ``sigma_b2 (B,)``, the panel
    quantities ``(W, B)`` (any of ``chi1, q_star, c_star, xi_q, xi_c``) and
    ``critical_sigma_w2 (B,)``, as from :func:`isometry.meanfield.phase_diagram`.
    """
    from matplotlib.colors import LogNorm, TwoSlopeNorm

    style()
    sw = np.asarray(diagram["sigma_w2"])
    sb = np.asarray(diagram["sigma_b2"])
    crit = np.asarray(diagram["critical_sigma_w2"])
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.5 * len(panels), 3.9), constrained_layout=True
    )
    axes = np.atleast_1d(axes)
    extent = (sw[0], sw[-1], sb[0], sb[-1])

    def finite(v, fill=np.nan):
        v = np.asarray(v, float)
        return np.where(np.isfinite(v), v, fill)

    specs = {
        "chi1": lambda v: (
            np.clip(finite(v, 1e3), 1e-3, 1e3),
            rf"$\chi_1$ ({activation}): ordered < 1 < chaotic",
            "RdBu_r",
            r"$\chi_1$",
            TwoSlopeNorm(
                vcenter=1.0,
                vmin=min(np.nanmin(finite(v)), 0.99),
                vmax=max(np.nanmax(finite(v)), 1.01),
            ),
        ),
        "q_star": lambda v: (finite(v), r"length fixed point $q^*$", "viridis", r"$q^*$", None),
        "c_star": lambda v: (
            finite(v),
            r"correlation fixed point $c^*$",
            "cividis",
            r"$c^*$",
            None,
        ),
        "xi_q": lambda v: (
            np.clip(finite(v, 1e3), 0.1, 1e3),
            r"length depth scale $\xi_q$",
            "magma",
            r"$\xi_q$ (layers)",
            LogNorm(0.1, 1e3),
        ),
        "xi_c": lambda v: (
            np.clip(finite(v, 1e3), 0.5, 1e3),
            r"correlation depth scale $\xi_c$",
            "magma",
            r"$\xi_c$ (layers)",
            LogNorm(0.5, 1e3),
        ),
    }
    ok = np.isfinite(crit)
    for ax, key in zip(axes, panels, strict=True):
        values, title, cmap, label, norm = specs[key](diagram[key])
        im = ax.imshow(
            values.T,
            origin="lower",
            extent=extent,
            aspect="auto",
            cmap=cmap,
            norm=norm,
            interpolation="nearest",
        )
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
    axes[0].legend(loc="upper left", framealpha=0.9)
    if panels[0] == "chi1":
        axes[0].text(
            0.97, 0.05, "chaotic", transform=axes[0].transAxes, ha="right", color="darkred"
        )
        axes[0].text(0.03, 0.05, "ordered", transform=axes[0].transAxes, ha="left", color="navy")
    return fig


def depth_scales_figure(data: dict, activation: str, sigma_b2: float):
    """``xi_q``, ``xi_c`` (theory lines) vs sigma_w2; ``xi_c`` measured from iterated c-maps."""
    style()
    fig, ax = plt.subplots(figsize=(6.2, 4.2), constrained_layout=True)
    sw = np.asarray(data["sigma_w2"])
    ax.semilogy(sw, np.asarray(data["xi_c"]), color="C3", lw=1.6, label=r"$\xi_c$ (theory)")
    ax.semilogy(sw, np.asarray(data["xi_q"]), color="C0", lw=1.6, label=r"$\xi_q$ (theory)")
    ax.semilogy(
        data["sigma_w2_iter"],
        data["xi_c_iter"],
        "o",
        color="C3",
        ms=4,
        mfc="none",
        label=r"$\xi_c$ measured: decay of iterated c-map",
    )
    crit = float(np.asarray(data["critical_sigma_w2"]).ravel()[0])
    ax.axvline(
        crit, color=THEORY_COLOR, ls="--", lw=1, label=rf"edge of chaos $\sigma_w^2={crit:.3f}$"
    )
    ax.set_xlabel(r"weight variance $\sigma_w^2$")
    ax.set_ylabel("depth scale (layers)")
    ax.set_title(rf"Depth scales, {activation}, $\sigma_b^2={sigma_b2}$")
    ax.set_ylim(0.3, None)
    ax.legend()
    return fig


def _signal_columns(runs):
    acts = []
    for r in runs:
        if r["activation"] not in acts:
            acts.append(r["activation"])
    return acts


def _log_fit_scale(measured, theory) -> float:
    """``exp(mean(log(measured / theory)))`` over entries where both are positive and finite."""
    m, t = np.asarray(measured, float), np.asarray(theory, float)
    ok = (m > 0) & (t > 0) & np.isfinite(m) & np.isfinite(t)
    return float(np.exp(np.mean(np.log(m[ok] / t[ok])))) if ok.any() else np.nan


def signal_gradients_figure(runs: list[dict], title: str = ""):
    """Per-layer squared gradient norms, measured (markers) with mean-field theory (dashed).

    ``runs``: dicts with ``activation``, ``label`` (e.g. the initializer) and
    ``(L,)`` arrays ``grad_preact_sq``, ``grad_weight_sq``, and optionally
    ``theory_grad_preact_sq``, ``theory_grad_weight_sq`` (relative values: the
    theory leaves the loss's overall scale free, so each curve is scaled by one
    factor fit to the measurement in log space). One column per activation;
    rows: ``||dLoss/dh^l||^2`` and ``||dLoss/dW^l||^2``.
    """
    style()
    acts = _signal_columns(runs)
    fig, axes = plt.subplots(
        2, len(acts), figsize=(4.2 * len(acts), 6.4), squeeze=False, constrained_layout=True
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    rows = [
        ("grad_preact_sq", r"$\|\partial \mathcal{L}/\partial h^l\|^2$"),
        ("grad_weight_sq", r"$\|\partial \mathcal{L}/\partial W^l\|^2$"),
    ]
    for j, act in enumerate(acts):
        mine = [r for r in runs if r["activation"] == act]
        for i, (key, ylabel) in enumerate(rows):
            ax = axes[i, j]
            for k, r in enumerate(mine):
                g = np.asarray(r[key], float)
                layers = np.arange(1, g.size + 1)
                color = colors[k % len(colors)]
                ax.plot(layers, g, "o", ms=3, color=color, label=f"{r['label']} (measured)")
                th = r.get(f"theory_{key}")
                if th is not None:
                    ax.plot(
                        layers,
                        np.asarray(th, float) * _log_fit_scale(g, th),
                        "--",
                        lw=1.2,
                        color=color,
                        label=f"{r['label']} (mean field)",
                    )
            ax.set_yscale("log")
            ax.set_xlabel("layer $l$")
            ax.set_ylabel(ylabel)
            if i == 0:
                ax.set_title(act)
            ax.legend(loc="best")
    if title:
        fig.suptitle(title)
    return fig


def signal_forward_figure(runs: list[dict], title: str = ""):
    """Forward statistics per layer with mean-field theory (dashed) where available.

    ``runs`` as in :func:`signal_gradients_figure`, with ``(L,)`` arrays ``q``,
    ``c``, ``chan_sq_mean``, ``chan_var``, ``branch_var`` and optionally
    ``theory_q``, ``theory_c``. Rows: ``q^l``; ``c^l``; the signal-propagation
    plot of Brock et al. 2021 (average channel squared mean, solid; average
    channel variance, dotted; residual-branch variance, dash-dot).
    """
    style()
    acts = _signal_columns(runs)
    fig, axes = plt.subplots(
        3, len(acts), figsize=(4.2 * len(acts), 9.0), squeeze=False, constrained_layout=True
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, act in enumerate(acts):
        mine = [r for r in runs if r["activation"] == act]
        for k, r in enumerate(mine):
            color = colors[k % len(colors)]
            q = np.asarray(r["q"], float)
            layers = np.arange(1, q.size + 1)
            for i, key in enumerate(("q", "c")):
                ax = axes[i, j]
                ax.plot(layers, np.asarray(r[key], float), "o", ms=3, color=color, label=r["label"])
                th = r.get(f"theory_{key}")
                if th is not None:
                    ax.plot(layers, np.asarray(th, float), "--", lw=1.2, color=color)
            ax = axes[2, j]
            ax.plot(layers, r["chan_sq_mean"], "-", color=color, label=f"{r['label']}: sq. mean")
            ax.plot(layers, r["chan_var"], ":", color=color, label=f"{r['label']}: variance")
            bv = np.asarray(r["branch_var"], float)
            if np.all(np.isfinite(bv)):
                ax.plot(layers, bv, "-.", color=color, label=f"{r['label']}: branch var.")
        axes[0, j].set_title(act)
        axes[0, j].set_yscale("log")
        axes[0, j].set_ylabel(r"$q^l$ (mean squared pre-activation)")
        axes[1, j].set_ylabel(r"$c^l$ (correlation of input pairs)")
        axes[2, j].set_yscale("log")
        axes[2, j].set_ylabel("channel statistics of $x^l$")
        for i in range(3):
            axes[i, j].set_xlabel("layer $l$")
        axes[0, j].legend(loc="best", title="markers: measured; dashed: mean field")
        axes[2, j].legend(loc="best", fontsize=6)
    if title:
        fig.suptitle(title)
    return fig


def spectrum_figure(depths, sq_singular_values, title: str = "", bins: int = 80):
    """Jacobian singular-value densities per depth (histograms), and their summary vs depth.

    ``sq_singular_values`` is ``(K, samples)`` (pooled seeds/inputs) for the
    ``K`` ``depths``. Left: densities of the singular values ``s`` of ``J``
    (isometry means mass at 1); right: the log10 of the squared singular
    values, with the mean of ``s^2`` and ``s^2_max`` against depth as inset
    markers.
    """
    style()
    depths = np.asarray(depths)
    lam = np.asarray(sq_singular_values, dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.0), constrained_layout=True)
    colors = plt.cm.viridis(np.linspace(0.05, 0.9, len(depths)))
    s = np.sqrt(np.clip(lam, 0, None))
    hi = float(np.nanpercentile(s, 99.5)) * 1.05
    for d, sd, c in zip(depths, s, colors, strict=True):
        axes[0].hist(sd, bins=bins, range=(0, hi), density=True, histtype="step", lw=1.5, color=c,
                     label=f"L = {d}")  # fmt: skip
    axes[0].axvline(1.0, color=THEORY_COLOR, ls=":", lw=1, label="isometry (s = 1)")
    axes[0].set_xlabel("singular value $s$ of $J$")
    axes[0].set_ylabel("density")
    axes[0].legend(loc="best")
    logl = np.log10(np.where(lam > 0, lam, np.nan))
    lo, hi2 = np.nanpercentile(logl, 0.5), np.nanpercentile(logl, 99.9)
    for d, ld, c in zip(depths, logl, colors, strict=True):
        ld = ld[np.isfinite(ld)]
        axes[1].hist(ld, bins=bins, range=(lo, hi2), density=True, histtype="step", lw=1.5,
                     color=c, label=f"L = {d}")  # fmt: skip
    axes[1].axvline(0.0, color=THEORY_COLOR, ls=":", lw=1)
    axes[1].set_xlabel(r"$\log_{10} s^2$ (eigenvalues of $J J^T$)")
    axes[1].set_ylabel("density")
    inset = axes[1].inset_axes([0.64, 0.6, 0.33, 0.36])
    inset.loglog(depths, lam.mean(1), "o-", ms=3, color="C0", label=r"mean $s^2$")
    inset.loglog(depths, lam.max(1), "s-", ms=3, color="C3", label=r"max $s^2$")
    inset.set_xlabel("depth L", fontsize=7)
    inset.tick_params(labelsize=6)
    inset.legend(fontsize=6, loc="upper left")
    if title:
        fig.suptitle(title)
    return fig
