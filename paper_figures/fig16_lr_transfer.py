"""Learning-rate transfer: held-out loss vs Adam's learning rate over width (standard parameterization vs muP) and depth (muP with branch scale 1 vs 1/sqrt(L)), the optimum's shift in octaves per doubling, and the coordinate check (Yang et al. 2022, Tensor Programs V, Fig. 1 / Fig. 3; over depth Yang et al. 2023, Tensor Programs VI, and Bordelon et al. 2023).

Measurement: the ``lr_transfer`` experiment. Each curve is one network structure
trained at every learning rate of a log2-spaced grid and every seed in one compiled
program (the rates traced), held-out cross-entropy after a fixed number of Adam
steps, averaged over seeds (a diverged run counts as +inf). (a, b): tanh MLPs over
width, standard vs muP (base width the smallest); (c, d): residual tanh MLPs over
depth at one width under muP, branch scale 1 vs depth-muP's ``1/sqrt(L)`` (with Adam's
block rates ``eta/sqrt(L)``). A star marks each curve's optimum ``eta*``: the argmin
of the seed-mean loss refined by a parabola in ``log2 eta`` through the three points
around it (:func:`isometry.experiments.lr_transfer.optimum`); an open star is at the
grid's edge. (e): ``log2 eta*`` against ``log2`` of the width or depth; the slope is
the shift in octaves of ``eta*`` per doubling (legend: the slope of the seed-mean
optima, then the mean and standard deviation of the per-seed slopes). (f): the
coordinate check of the width sweep's network (:func:`isometry.probe.coord_check`:
``mean |y_t - y_0|`` of each layer's output after a few Adam steps on one batch, vs
width; slopes over seeds in the legend): under muP the hidden layers' and the
output's updates stay O(1) in width, under the standard parameterization they grow.

The claim: under the standard parameterization ``eta*`` falls as the width grows
(with Adam by about one octave per doubling: a hidden layer's update ``Delta W x`` adds
``N`` coordinates of size ``eta`` coherently), under muP it stays put; over depth it
falls with branch scale 1 and stays with ``1/sqrt(L)``. The measured slopes and their
spread over seeds are in the legends, read from the data when the figure is drawn.

The quick tier is small: the embedded 8x8 digits, 60 Adam steps of batch 16, two
seeds, a one-octave rate grid from ``2^-11`` to ``2^-5`` (every optimum has a rate on
either side), widths 32 and 256 (not 64: at the input dimension the toolkit's MLP has
no input map, a different structure), depths 4 and 64 at width 64, so each slope is
that between two sizes, and the coordinate check at those two widths (its compiles
are a large share of the tier's cost). With widths 32, 128 and 512, depths 4, 16
and 64 and rates ``2^-12`` to ``2^-4`` the slopes were SP -1.08, muP -0.01, branch 1
-0.35 and depth-muP -0.08 octaves per doubling; on these sizes (each kept point's
optimum unchanged) SP -1.01, muP -0.02 and the depth slopes the same to two
decimals, and the coordinate check's SP slopes went from +0.34, +0.29, +0.25 to
+0.33, +0.25, +0.14 (first layer, second layer, output). The steps stay at 60: at
50 the two seeds' branch-1 slopes had opposite signs. Where the claim does not
hold on this tier, and why:

* Depth-muP's optimum is not exactly still: it drifts down by a small fraction of
  an octave per doubling of ``L`` (negative for every seed), and the
  basin's large-rate wall moves in with depth (at a rate above the optimum, ``L =
  64`` has a clearly higher loss than ``L = 4``). Depth-muP fixes the optimum in the
  limit ``L -> infinity``; at these depths and 60 steps the finite-depth
  corrections are visible. Which correction it is was not established here.
* With branch scale 1 the residual stream's variance grows linearly in ``L`` and at
  ``L = 64`` the network barely trains in 60 steps at any rate (its best held-out
  loss is several times the others'): its optimum is that of a network that has
  not learned much, and the branch-1 slope is smaller than a ``1/L`` or
  ``1/sqrt(L)`` rule would give; it is a slope between two depths, not a law.
* The coordinate check's slopes under SP lie well below the linear prediction
  (+1 for the hidden layers with Adam): a tanh unit's output moves by at most 2, and
  at the check's rate the widest SP network's units already move by about a third
  of that on average, so the growth flattens; the sign (SP grows, muP stays O(1)) is
  what the panel shows.
* Transfer is of the optimum's position, not of the loss: muP's smallest width has a
  higher loss at the same optimum (wider is better at a fixed rate, as in Tensor
  Programs V), and muP equals SP at the base width (their width-32 curves coincide).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from isometry import networks, plotting, probe
from isometry.experiments import harness, lr_transfer
from isometry.paper_figures import core

KEYS = ("log2_lr", "widths", "depths", "width_kinds", "depth_kinds", "width_loss", "depth_loss",
        "width_opt", "width_interior", "depth_opt", "depth_interior", "width_shift",
        "width_shift_seeds", "depth_shift", "depth_shift_seeds", "coord_sizes", "coord_blocks",
        "coord_change", "coord_slope_mean", "coord_slope_std", "steps", "batch_size",
        "seeds", "width_depth", "depth_width", "coord_lr")  # fmt: skip

COST = {"quick": 29}
"""Seconds of one CPU core for the quick tier from empty stores (a scheduling hint)."""

TIERS = harness.figure_tiers(
    "lr_transfer",
    ("widths=8,16", "depths=2,4", "depth_width=8", "log2_lrs=-8,-6,-4", "train.steps=3",
     "train.batch_size=4"),
    # quick: widths 32 and 256 (the preset's: 32, 128, 512), the preset's shallowest and
    # deepest depths (of 4, 16, 64), rates 2^-11 to 2^-5 (of 2^-12 to 2^-4)
    quick_overrides=("widths=32,256", "depths=4,64", "log2_lrs=-11,-10,-9,-8,-7,-6,-5"),
)  # fmt: skip

COORD_STEPS, COORD_SEEDS, COORD_BATCH = 3, 2, 32
"""The coordinate check: Adam steps, seeds, and the batch of digits it trains on."""
COORD_LOG2_LR = -6.0
"""``log2`` of the coordinate check's Adam rate (near muP's optimum at the base width)."""

LABELS = {"standard": "standard (SP)", "mup": "muP", "depth_mup": r"muP, branch $1/\sqrt{L}$"}


def compute(preset, overrides, store) -> dict:
    run = harness.stored_run(
        lr_transfer.EXPERIMENT, preset, overrides, store, progress=core.progress_enabled()
    )
    cfg = run.config
    loss = run.array("eval_loss", rows=True).reshape(len(run.points), cfg.seeds, -1)
    x = np.asarray(cfg.log2_lrs, float)
    out = {"log2_lr": x}
    for name, sizes, kinds in (("width", cfg.widths, lr_transfer.WIDTH_KINDS),
                               ("depth", cfg.depths, lr_transfer.DEPTH_KINDS)):  # fmt: skip
        index = {(p["size"], p["kind"]): i for i, p in enumerate(run.points) if p["sweep"] == name}
        f = np.stack([[loss[index[(n, k)]] for n in sizes] for k in kinds])  # (kinds, M, seeds, K)
        mean = np.where(np.isfinite(f), f, np.inf).mean(axis=2)
        opt, interior = lr_transfer.optimum(x, mean)
        per_seed, _ = lr_transfer.optimum(x, np.moveaxis(f, 2, 1))  # (kinds, seeds, M)
        log2n = np.log2(np.asarray(sizes, float))
        out |= {f"{name}s": np.asarray(sizes), f"{name}_kinds": np.asarray(kinds),
                f"{name}_loss": f, f"{name}_opt": opt, f"{name}_interior": interior,
                f"{name}_shift": lr_transfer.shift(log2n, opt),
                f"{name}_shift_seeds": lr_transfer.shift(log2n, per_seed)}  # fmt: skip
    out |= _coord(cfg)
    out |= {"steps": np.asarray(cfg.train.steps), "batch_size": np.asarray(cfg.train.batch_size),
            "seeds": np.asarray(cfg.seeds), "width_depth": np.asarray(cfg.width_depth),
            "depth_width": np.asarray(cfg.depth_width)}  # fmt: skip
    return out


def _coord(cfg) -> dict:
    """The coordinate check of the width sweep's MLP, SP and muP, at its smallest and largest
    width: the change of each block's output after ``COORD_STEPS`` steps, seed means
    ``(2, 2, blocks)``, and the slopes ``d log change / d log width`` (mean, std over seeds)
    ``(2, blocks)``."""
    ds = harness.load_data(cfg.dataset)
    x = ds.x_train[:COORD_BATCH]

    def factory(width, rngs):
        c = networks.MLPConfig(depth=cfg.width_depth, width=width, in_dim=ds.in_dim,
                               out_dim=ds.out_dim, activation="tanh")  # fmt: skip
        return networks.MLP(c, rngs=rngs)

    sizes = (cfg.widths[0], cfg.widths[-1])  # two compiles per kind: the budget's share
    change, mean, std = [], [], []
    for kind in lr_transfer.WIDTH_KINDS:
        cc = probe.coord_check(factory, sizes, x, "adam", learning_rate=2.0**COORD_LOG2_LR,
                               parameterization=kind, steps=COORD_STEPS, seeds=COORD_SEEDS)  # fmt: skip
        s = cc.slopes()
        change.append(np.asarray(cc.change)[:, :, -1].mean(axis=0))
        mean.append(np.asarray(s["change_mean"])[-1])
        std.append(np.asarray(s["change_std"])[-1])
    return {"coord_sizes": np.asarray(sizes), "coord_blocks": np.asarray(cc.blocks),
            "coord_change": np.stack(change), "coord_slope_mean": np.stack(mean),
            "coord_slope_std": np.stack(std), "coord_lr": np.asarray(COORD_LOG2_LR)}  # fmt: skip


def plot(data, params):
    plotting.style()
    fig, axes = plt.subplots(2, 3, figsize=(16.5, 9.6), constrained_layout=True)
    (a, b, e), (c, d, f) = axes
    x = np.asarray(data["log2_lr"])
    steps, seeds = int(data["steps"]), int(data["seeds"])
    for ax, name, j, what in ((a, "width", 0, "width"), (b, "width", 1, "width"),
                              (c, "depth", 0, "depth"), (d, "depth", 1, "depth")):  # fmt: skip
        _loss_panel(ax, data, name, j, x, what)
    a.set_title(f"(a) standard parameterization, {int(data['width_depth'])} hidden layers")
    b.set_title("(b) muP (base width = the smallest)")
    c.set_title(f"(c) residual, muP, branch scale 1, width {int(data['depth_width'])}")
    d.set_title(r"(d) residual, depth-muP: branch $1/\sqrt{L}$")
    _shift_panel(e, data)
    _coord_panel(f, data)
    fig.suptitle(f"Held-out loss after {steps} Adam steps (batch {int(data['batch_size'])}), "
                 f"mean of {seeds} seeds; stars: optima (open: at the grid's edge)")  # fmt: skip
    return fig


def _loss_panel(ax, data, name, j, x, what) -> None:
    sizes = np.asarray(data[f"{name}s"])
    loss = np.asarray(data[f"{name}_loss"])[j]  # (M, seeds, K)
    mean = np.where(np.isfinite(loss), loss, np.nan).mean(axis=1)
    opt, inter = np.asarray(data[f"{name}_opt"])[j], np.asarray(data[f"{name}_interior"])[j]
    colors = plt.cm.viridis(np.linspace(0.0, 0.85, len(sizes)))
    lows = np.nanmin(np.where(np.isfinite(mean), mean, np.nan), axis=1)  # each curve's minimum
    top = min(np.nanmax(mean), max(1.6 * np.nanmax(lows), 4.0 * np.nanmin(lows)))
    for n, m, o, ok, col in zip(sizes, mean, opt, inter, colors, strict=True):
        ax.plot(x, m, "o-", color=col, ms=3.5, label=f"{what} {int(n)}")
        if np.isfinite(o):
            y = np.interp(o, x, np.where(np.isfinite(m), m, top))
            ax.plot(o, y, "*", ms=14, color=col, mec="black", mfc=col if ok else "white")
    ax.set_xlabel(r"$\log_2$ Adam learning rate $\eta$")
    ax.set_ylabel("held-out cross-entropy")
    ax.set_ylim(0.9 * np.nanmin(mean), top)
    sh = float(np.asarray(data[f"{name}_shift"])[j])
    ss = np.asarray(data[f"{name}_shift_seeds"])[j]
    ax.legend(title=f"shift {sh:+.2f} (seeds {ss.mean():+.2f} ± {_std(ss):.2f}) oct./doubling",
              fontsize=8, title_fontsize=8, loc="upper left")  # fmt: skip


def _std(v) -> float:
    v = np.asarray(v, float)
    return float(np.std(v, ddof=1)) if v.size > 1 else float("nan")


def _shift_panel(ax, data) -> None:
    styles = {("width", 0): ("tab:red", "o-"), ("width", 1): ("tab:blue", "o-"),
              ("depth", 0): ("tab:orange", "s--"), ("depth", 1): ("tab:green", "s--")}  # fmt: skip
    for (name, j), (col, st) in styles.items():
        sizes = np.log2(np.asarray(data[f"{name}s"], float))
        opt = np.asarray(data[f"{name}_opt"])[j]
        kind = str(np.asarray(data[f"{name}_kinds"])[j])
        label = LABELS[kind] if name == "width" else ("branch 1" if j == 0 else r"$1/\sqrt{L}$")
        ss = np.asarray(data[f"{name}_shift_seeds"])[j]
        sh = float(np.asarray(data[f"{name}_shift"])[j])
        ax.plot(sizes, opt, st, color=col,
                label=f"{name}, {label}: {sh:+.2f} ({ss.mean():+.2f} ± {_std(ss):.2f})")  # fmt: skip
    ax.set_xlabel(r"$\log_2$ width (circles) or $\log_2$ depth $L$ (squares)")
    ax.set_ylabel(r"$\log_2 \eta^*$")
    ax.set_title("(e) optimum vs size: slope = octaves per doubling")
    ax.legend(fontsize=8, title="slope of the mean (per-seed mean ± sd)", title_fontsize=8)


def _coord_panel(ax, data) -> None:
    sizes = np.asarray(data["coord_sizes"], float)
    blocks = [str(v) for v in np.asarray(data["coord_blocks"])]
    change = np.asarray(data["coord_change"])
    sm, sd = np.asarray(data["coord_slope_mean"]), np.asarray(data["coord_slope_std"])
    colors = plt.cm.plasma(np.linspace(0.0, 0.8, len(blocks)))
    for j, (kind, st) in enumerate(zip(lr_transfer.WIDTH_KINDS, ("o-", "s--"), strict=True)):
        for k, (blk, col) in enumerate(zip(blocks, colors, strict=True)):
            ax.plot(sizes, change[j, :, k], st, color=col,
                    label=f"{LABELS[kind]}, {blk}: slope {sm[j, k]:+.2f} ± {sd[j, k]:.2f}")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("width")
    ax.set_ylabel(r"mean $|y_t - y_0|$ after the last step")
    ax.set_title(f"(f) coordinate check: Adam, $\\eta = 2^{{{float(data['coord_lr']):g}}}$, "
                 f"{COORD_STEPS} steps")  # fmt: skip
    ax.legend(fontsize=7, ncol=1, loc="upper left")
