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
    "THEORY_COLOR",
    "depth_scales_figure",
    "log_fit_scale",
    "phase_diagram_figure",
    "save",
    "signal_forward_figure",
    "signal_gradients_figure",
    "spectra_grid_figure",
    "spectral_edge_figure",
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
    style()
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.5 * len(panels), 3.9), constrained_layout=True
    )
    axes = np.atleast_1d(axes)
    for ax, key in zip(axes, panels, strict=True):
        _phase_panel(fig, ax, diagram, key, activation)
    axes[0].legend(loc="upper left", framealpha=0.9)
    if panels[0] == "chi1":
        axes[0].text(
            0.97, 0.05, "chaotic", transform=axes[0].transAxes, ha="right", color="darkred"
        )
        axes[0].text(0.03, 0.05, "ordered", transform=axes[0].transAxes, ha="left", color="navy")
    return fig


def _finite(v, fill=np.nan):
    v = np.asarray(v, float)
    return np.where(np.isfinite(v), v, fill)


def _phase_spec(key: str, v, activation: str):
    """``(values, title, cmap, colorbar label, norm)`` of one phase-diagram panel."""
    from matplotlib.colors import LogNorm, TwoSlopeNorm

    if key == "chi1":
        lo, hi = min(np.nanmin(_finite(v)), 0.99), max(np.nanmax(_finite(v)), 1.01)
        norm = TwoSlopeNorm(vcenter=1.0, vmin=lo, vmax=hi)
        title = rf"$\chi_1$ ({activation}): ordered < 1 < chaotic"
        return np.clip(_finite(v, 1e3), 1e-3, 1e3), title, "RdBu_r", r"$\chi_1$", norm
    if key == "q_star":
        return _finite(v), r"length fixed point $q^*$", "viridis", r"$q^*$", None
    if key == "c_star":
        return _finite(v), r"correlation fixed point $c^*$", "cividis", r"$c^*$", None
    if key == "xi_q":
        return (
            np.clip(_finite(v, 1e3), 0.1, 1e3), r"length depth scale $\xi_q$", "magma",
            r"$\xi_q$ (layers)", LogNorm(0.1, 1e3),
        )  # fmt: skip
    if key == "xi_c":
        return (
            np.clip(_finite(v, 1e3), 0.5, 1e3), r"correlation depth scale $\xi_c$", "magma",
            r"$\xi_c$ (layers)", LogNorm(0.5, 1e3),
        )  # fmt: skip
    raise KeyError(key)


def _phase_panel(fig, ax, diagram: dict, key: str, activation: str) -> None:
    """One heat map of :func:`phase_diagram_figure` with the critical line."""
    sw = np.asarray(diagram["sigma_w2"])
    sb = np.asarray(diagram["sigma_b2"])
    crit = np.asarray(diagram["critical_sigma_w2"])
    values, title, cmap, label, norm = _phase_spec(key, diagram[key], activation)
    im = ax.imshow(
        values.T,
        origin="lower",
        extent=(sw[0], sw[-1], sb[0], sb[-1]),
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


def log_fit_scale(measured, theory) -> float:
    """The factor that lays a theory curve known up to scale over a measurement:
    ``exp(mean(log(measured / theory)))`` over the entries where both are positive and
    finite (NaN where none is). ``measured`` and ``theory`` have one shape."""
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
                        np.asarray(th, float) * log_fit_scale(g, th),
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


def _theory_label(base: str, th: dict | None) -> str:
    """Legend text for one depth: the distance to theory and the theory's atoms."""
    if th is None:
        return base
    parts = [base]
    if th.get("ks") is not None and np.isfinite(th["ks"]):
        parts.append(f"KS {th['ks']:.3f}")
    zero = float(th.get("atom_at_zero", 0.0))
    if zero > 1e-6:
        parts.append(f"atom {zero:.2f} at 0")
    for loc, mass in zip(th.get("atom_locations", ()), th.get("atom_masses", ()), strict=True):
        parts.append(f"atom {mass:.2f} at s={loc:.3g}")
    return ", ".join(parts)


def spectrum_figure(
    depths,
    sq_singular_values,
    title: str = "",
    bins: int = 80,
    theory: list | None = None,
    floor: float | None = None,
):
    """Jacobian singular-value densities per depth (histograms), and their summary vs depth.

    ``sq_singular_values`` is ``(K, samples)`` (pooled seeds/inputs) for the
    ``K`` ``depths``. Left: densities of the singular values ``s`` of ``J``
    (isometry means mass at 1); right: the density of ``log10 s^2``, with the
    mean of ``s^2`` and ``s^2_max`` against depth as inset markers. Densities
    are normalized over all samples, so mass off the axis is missing, not
    spread over the rest.

    ``floor`` (optional): the smallest ``s^2`` the computation resolves (plain
    float products: about ``(1e3 eps)^2 s^2_max``); the log axis starts no lower,
    and where it starts there the legend gives the mass below. Bins: at least
    ``bins``, more (up to 3x) for narrow spectra.

    ``theory`` (optional): one dict per depth with the free-probability
    prediction, drawn as lines of the histogram's colour over it:
    ``s (G,)`` singular values, ``density (G,)`` the density of ``s``
    (continuous part; NaN where unresolved), ``atom_at_zero``,
    ``atom_locations``/``atom_masses`` (other atoms, in ``s``; drawn as
    vertical lines), ``ks`` (distance to the measurement, in the legend),
    ``edge`` and ``mean`` (of ``s^2``; lines in the inset), optionally ``cdf``
    (the CDF on ``s``, NaN below the floor; the legend gives its mass below the axis).
    """
    style()
    depths = np.asarray(depths)
    lam = np.asarray(sq_singular_values, dtype=float)
    if theory is not None and len(theory) != len(depths):
        raise ValueError(f"theory must hold one entry per depth ({len(depths)}), got {len(theory)}")
    ths = [None] * len(depths) if theory is None else list(theory)
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.4), constrained_layout=True)
    colors = plt.cm.viridis(np.linspace(0.05, 0.85, len(depths)))
    s = np.sqrt(np.clip(lam, 0, None))
    with np.errstate(divide="ignore"):
        logl = np.log10(np.clip(lam, 0, None))
    finite = logl[np.isfinite(logl)]
    lo, hi2 = np.percentile(finite, 0.5), np.percentile(finite, 99.9)
    at_floor = floor is not None and lo <= np.log10(floor)
    if at_floor:  # the log axis starts at the resolution floor; the legend gives the mass below
        lo = float(np.log10(floor))
    hi2 = hi2 + 0.05 * (hi2 - lo)
    _singular_value_panel(axes[0], depths, s, logl, colors, ths, bins, lo if at_floor else None)
    _log_eigenvalue_panel(axes[1], logl, colors, ths, bins, (lo, hi2))
    _spectrum_inset(axes[1], depths, lam, ths)
    if title:
        fig.suptitle(title)
    return fig


def _singular_value_panel(ax, depths, s, logl, colors, ths, bins, lo) -> None:
    """Left panel of :func:`spectrum_figure`: densities of ``s``, theory over them.

    ``lo``: the log10 floor where the log axis starts at it (the legend gives the mass below).
    """
    hi = float(np.nanpercentile(s, 99.5)) * 1.05
    edges = np.linspace(0.0, hi, _bins(s, (0.0, hi), bins) + 1)
    heights = []
    for d, sd, ld, c, th in zip(depths, s, logl, colors, ths, strict=True):
        h = _normalized_hist(sd, edges)
        heights.append(h)
        label = _theory_label(f"L = {d}", th)
        if lo is not None:
            label += f"; {np.mean(ld < lo):.1%} below $s^2$={10**lo:.1g}"
            below = _theory_cdf_at(th, 10 ** (lo / 2)) if th is not None else np.nan
            if np.isfinite(below):
                label += f" (theory {below:.1%})"
        ax.stairs(h, edges, color=c, lw=1.2, alpha=0.9 if th is None else 0.6, label=label)
        if th is not None:
            g, dens = np.asarray(th["s"], float), np.asarray(th["density"], float)
            ax.plot(g, dens, color=c, lw=1.8)
            for loc in th.get("atom_locations", ()):
                ax.axvline(loc, color=c, lw=1.8, ls="--")
    ax.axvline(1.0, color=THEORY_COLOR, ls=":", lw=1, label="isometry (s = 1)")
    ax.set_xlim(0, hi)
    ax.set_xlabel("singular value $s$ of $J$")
    ax.set_ylabel("density of $s$")
    if ths[0] is not None:
        curves = [(th["s"], th["density"]) for th in ths]
        ax.set_ylim(0, _ylim(heights, (0, hi), curves))
        ax.plot([], [], color="0.3", lw=1.8, label="lines: free probability")
        ax.plot([], [], color="0.3", lw=1.2, alpha=0.6, label="steps: measured")
    ax.legend(loc="upper right", fontsize=7 if lo is not None else None)


def _log_eigenvalue_panel(ax, logl, colors, ths, bins, rng) -> None:
    """Right panel of :func:`spectrum_figure`: densities of ``log10 s^2`` on ``rng``."""
    lo, hi2 = rng
    edges = np.linspace(lo, hi2, _bins(logl, (lo, hi2), bins) + 1)
    heights = []
    for ld, c, th in zip(logl, colors, ths, strict=True):
        h = _normalized_hist(ld, edges)
        heights.append(h)
        ax.stairs(h, edges, color=c, lw=1.2, alpha=0.9 if th is None else 0.6)
        if th is not None:
            g, dens = np.asarray(th["s"], float), np.asarray(th["density"], float)
            pos = g > 0
            # density of log10 s^2 = 2 log10 s: s ln(10) p_s(s) / 2.
            ax.plot(2 * np.log10(g[pos]), g[pos] * np.log(10) * dens[pos] / 2, color=c, lw=1.8)
    ax.axvline(0.0, color=THEORY_COLOR, ls=":", lw=1)
    ax.set_xlim(lo, hi2)
    ax.set_xlabel(r"$\log_{10} s^2$ (eigenvalues of $J J^T$)")
    ax.set_ylabel(r"density of $\log_{10} s^2$")
    if ths[0] is not None:
        curves = [
            (2 * np.log10(th["s"]), np.asarray(th["s"]) * np.log(10) * th["density"] / 2)
            for th in ths
        ]
        ax.set_ylim(0, _ylim(heights, (lo, hi2), curves))


def _spectrum_inset(ax, depths, lam, ths) -> None:
    """The inset of :func:`spectrum_figure`: mean and max of ``s^2`` against depth."""
    inset = ax.inset_axes([0.1, 0.6, 0.28, 0.36])
    inset.loglog(depths, lam.mean(1), "o", ms=3, color="C0", label=r"mean $s^2$")
    inset.loglog(depths, lam.max(1), "s", ms=3, color="C3", label=r"max $s^2$")
    if ths[0] is not None:
        inset.loglog(depths, [th["edge"] for th in ths], "-", lw=1, color="C3")
        inset.loglog(depths, [th["mean"] for th in ths], "-", lw=1, color="C0")
    _depth_ticks(inset, depths)
    inset.set_xlabel("depth L", fontsize=7)
    inset.tick_params(labelsize=6)
    inset.legend(fontsize=6, loc="upper left", frameon=False)


def _bins(values, rng, bins: int) -> int:
    """At least ``bins``, and up to 3x more so that the narrowest row's bulk spans ~10 bins."""
    widths = []
    for v in np.atleast_2d(values):
        v = v[np.isfinite(v) & (v >= rng[0]) & (v <= rng[1])]
        if v.size > 20:
            q1, q3 = np.percentile(v, [25, 75])
            if q3 > q1:
                widths.append(q3 - q1)
    if not widths:
        return bins
    return int(np.clip(10 * (rng[1] - rng[0]) / min(widths), bins, 3 * bins))


def _theory_cdf_at(th: dict, s: float) -> float:
    """The theory's CDF (key ``cdf`` on the grid ``s``, NaN below its floor) at ``s``."""
    if "cdf" not in th:
        return np.nan
    g, c = np.asarray(th["s"], float), np.asarray(th["cdf"], float)
    ok = np.isfinite(c)
    if not ok.any() or s < g[ok][0] * (1 - 1e-9):
        return np.nan
    return float(np.interp(s, g[ok], c[ok]))


def _normalized_hist(values, edges) -> np.ndarray:
    """Histogram heights ``counts / (n width)`` over all ``n`` values (non-finite included)."""
    v = np.ravel(np.asarray(values, float))
    v = v[~np.isnan(v)]
    counts, _ = np.histogram(v[np.isfinite(v)], bins=edges)
    return counts / (max(v.size, 1) * np.diff(edges))


def _ylim(heights, rng, curves=()) -> float:
    """A y-limit showing every histogram and theory curve in full, save for divergences.

    A theory curve counts up to 3x the tallest histogram bar (densities diverge at 0
    and beside atoms).
    """
    top = max((float(np.max(h, initial=0.0)) for h in heights), default=0.0)
    line = 0.0
    for x, y in curves:
        x, y = np.asarray(x, float), np.asarray(y, float)
        inside = (x >= rng[0]) & (x <= rng[1]) & np.isfinite(y)
        if inside.any():
            line = max(line, float(y[inside].max()))
    top = max(top, min(line, 3 * top)) if top > 0 else line
    return 1.1 * top if top > 0 else 1.0


def _depth_ticks(ax, depths) -> None:
    """Log depth axis labelled at the depths themselves (no 2x10^0-style minor labels)."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator, ScalarFormatter

    ax.xaxis.set_major_locator(FixedLocator(np.asarray(depths, float)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_formatter(NullFormatter())


def spectra_grid_figure(panels: list[dict], depths, *, ncols: int = 4, xlim=(-4.0, 1.5), bins=70):
    """A grid of Jacobian spectra, measured (step histograms) with free probability (lines).

    One panel per ensemble; in each, one colour per depth. The variable is
    ``log10 s`` (``s`` a singular value of ``J``), on which spectra that span
    decades (Gaussian weights, ReLU) and spectra concentrated at ``s = 1``
    (isometry) read alike; densities are of ``log10 s`` and normalized over
    all singular values, so mass at ``s = 0`` or off the axis is missing from
    both curves alike.

    Args:
        panels: dicts with ``title``; ``log10_s`` ``(K, M)`` measured values
            (``-inf`` for zeros; NaN padding ignored); ``theory_x`` ``(K, G)``
            (log10 s) and ``theory_density`` ``(K, G)`` (density of log10 s,
            continuous part); ``atom_at_zero`` ``(K,)``; ``atom_location``
            ``(K,)`` (log10 s of the other atom, NaN if none) and ``atom_mass``
            ``(K,)``.
        depths: ``(K,)`` depths (colours).
        ncols: panels per row.
        xlim: the log10 s range (histogram range).
    """
    style()
    depths = np.asarray(depths)
    n = len(panels)
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows), squeeze=False, constrained_layout=True
    )
    colors = plt.cm.viridis(np.linspace(0.05, 0.85, len(depths)))
    for ax, panel in zip(axes.flat, panels, strict=False):
        zoom = _narrow_range(panel["log10_s"], xlim)
        _spectra_panel(ax, panel, depths, colors, xlim, bins, legend=True)
        if zoom is not None:  # the upper left holds the zoom
            ax.legend(loc="lower left", fontsize=6, frameon=False, handlelength=1.2)
        ax.axvline(0.0, color=THEORY_COLOR, ls=":", lw=0.8)
        ax.set_title(panel["title"], fontsize=9)
        ax.set_xlabel(r"$\log_{10} s$ (singular value of $J$)", fontsize=8)
        ax.set_ylabel(r"density of $\log_{10} s$", fontsize=8)
        ax.tick_params(labelsize=7)
        if zoom is not None:  # a spectrum concentrated near s = 1: zoom in beside it
            inset = ax.inset_axes([0.08, 0.4, 0.45, 0.56])
            _spectra_panel(inset, panel, depths, colors, zoom, 90, legend=False, cap=None)
            inset.axvline(0.0, color=THEORY_COLOR, ls=":", lw=0.8)
            inset.tick_params(labelsize=5.5)
            inset.set_yticks([])
            inset.text(0.03, 0.92, "zoom", transform=inset.transAxes, fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(
        "Jacobian singular values: measured (steps) and free probability (lines); "
        "dotted: isometry, s = 1",
        fontsize=10,
    )
    return fig


def _narrow_range(log10_s, xlim, fraction=0.12):
    """``(lo, hi)`` around the measured bulk when it spans < ``fraction`` of ``xlim``; else None."""
    v = np.asarray(log10_s, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None
    lo, hi = np.quantile(v, [0.002, 0.998])
    if hi - lo >= fraction * (xlim[1] - xlim[0]):
        return None
    pad = max(0.3 * (hi - lo), 0.005)
    return (float(lo - pad), float(hi + pad))


def _spectra_panel(ax, panel, depths, colors, xlim, bins, legend, cap=3.0):
    """Step histograms of ``log10 s`` per depth with the theory lines and atoms, on ``xlim``.

    The y-limit shows every histogram and the theory lines up to ``cap`` times the
    tallest bar (densities diverge at 0 and beside atoms); ``cap=None``: in full.
    """
    edges = np.linspace(xlim[0], xlim[1], bins + 1)
    width = edges[1] - edges[0]
    top, line_top = 0.0, 0.0
    zero = np.asarray(panel["atom_at_zero"], float)
    for k, (d, c) in enumerate(zip(depths, colors, strict=True)):
        v = np.asarray(panel["log10_s"][k], float)
        v = v[~np.isnan(v)]
        counts, _ = np.histogram(v[np.isfinite(v)], bins=edges)
        h = counts / (v.size * width)  # normalized over all singular values, zeros included
        ax.stairs(h, edges, color=c, lw=1.1, alpha=0.65)
        loc = float(np.asarray(panel["atom_location"])[k])
        atom = np.isfinite(loc)
        if atom:  # the atom's bin is a spike: keep it out of the y-limit
            h = np.where((edges[:-1] <= loc) & (loc < edges[1:]), 0.0, h)
        top = max(top, float(h.max(initial=0.0)))
        x = np.asarray(panel["theory_x"][k], float)
        y = np.asarray(panel["theory_density"][k], float)
        inside = (x >= xlim[0]) & (x <= xlim[1]) & np.isfinite(y)
        label = f"L = {d}"
        if zero[k] > 1e-3:
            label += f"; atom {zero[k]:.2f} at 0"
        ax.plot(x[inside], y[inside], color=c, lw=1.6, label=label)
        line_top = max(line_top, float(y[inside].max(initial=0.0)))
        if atom and xlim[0] <= loc <= xlim[1]:
            mass = float(np.asarray(panel["atom_mass"])[k])
            label = f"  atom {mass:.2f} at s={10**loc:.3g}"
            ax.axvline(loc, color=c, ls="--", lw=1.2, label=label)
    line_top = line_top if cap is None or top == 0 else min(line_top, cap * top)
    top = max(top, line_top)
    ax.set_ylim(0, 1.12 * top if top > 0 else 1.0)
    ax.set_xlim(*xlim)
    if legend:
        ax.legend(loc="upper left", fontsize=6, frameon=False, handlelength=1.2)


def spectral_edge_figure(columns: list[dict]):
    """Largest eigenvalue and variance of ``J J^T`` vs depth: theory lines, measured points.

    ``columns``: one dict per column with ``title`` and ``cases``, a list of
    dicts with ``label``, ``color``, ``ls`` (line style of the theory),
    ``marker``; theory ``depth_theory (D,)``, ``max_theory (D,)``,
    ``var_theory (D,)``; measured ``depth (K,)``, ``max_measured`` and
    ``var_measured`` ``(seeds, K)``, drawn as the geometric mean over seeds with
    bars of one geometric standard deviation. Rows: ``lambda_max`` and
    ``Var(lambda)`` of ``J J^T`` on log-log axes.
    """
    style()
    ncol = len(columns)
    fig, axes = plt.subplots(
        2, ncol, figsize=(4.3 * ncol, 6.8), squeeze=False, constrained_layout=True
    )
    rows = [
        ("max", r"largest eigenvalue $\lambda_{\max}$ of $J J^T$"),
        ("var", r"variance of the eigenvalues of $J J^T$"),
    ]
    for j, col in enumerate(columns):
        for i, (key, ylabel) in enumerate(rows):
            ax = axes[i, j]
            for case in col["cases"]:
                th = np.asarray(case[f"{key}_theory"], float)
                dt = np.asarray(case["depth_theory"], float)
                pos = th > 0
                ax.plot(dt[pos], th[pos], ls=case["ls"], color=case["color"], lw=1.5)
                logs = np.log(np.asarray(case[f"{key}_measured"], float))
                center, spread = np.exp(logs.mean(0)), np.exp(logs.std(0))
                bars = [center - center / spread, center * spread - center]
                ax.errorbar(
                    case["depth"], center, yerr=bars,
                    fmt=case["marker"], ms=4, color=case["color"], mfc="white", capsize=2, lw=1,
                    label=case["label"],
                )  # fmt: skip
            ax.plot([], [], color="0.3", lw=1.5, label="free probability")
            ax.set_xscale("log")
            ax.set_yscale("log")
            _depth_ticks(ax, col["cases"][0]["depth"])
            ax.set_xlabel("depth $L$")
            ax.set_ylabel(ylabel)
            if i == 0:
                ax.set_title(col["title"])
            ax.legend(loc="upper left", fontsize=7)
    fig.suptitle(
        "Spectral edge and spread of $J J^T$ vs depth: free probability (lines: solid orthogonal, "
        "dashed Gaussian), measured (markers: geometric mean $\\times/\\div$ sd over seeds)",
        fontsize=10,
    )
    return fig
