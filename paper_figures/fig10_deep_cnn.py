"""Deep vanilla tanh CNNs at the critical point: delta-orthogonal kernels keep the input-output Jacobian's singular values concentrated while Gaussian kernels' spread with depth, and after a fixed training budget the Gaussian CNN falls behind as depth grows (Xiao et al. 2018).

Left three panels (experiment ``deep_cnn``): the mean, variance and maximum
of the squared singular values ``s^2`` of the Jacobian ``J = dx^L/dx^0`` of
``L`` circular ``3 x 3`` convolutions ``C -> C`` at the critical point of
``q*`` (open markers: mean over seeds; dots: single seeds), with the
free-probability values of :func:`isometry.freeprob.jacobian_moments` and
:func:`isometry.freeprob.max_eigenvalue` (lines). A critical delta-orthogonal
CNN shares the fully-connected orthogonal theory (Xiao et al. 2018); the
Gaussian CNN is drawn against the fully-connected Gaussian theory, the
many-channel limit in which every spatial frequency sees an independent
Gaussian ``C x C`` block (a reference here, not a result of the paper). At
criticality the mean is 1 for both; the variance grows like
``L (mu2/mu1^2 - 1 - s1)`` with ``s1 = 0`` (orthogonal) against ``s1 = -1``
(Gaussian): about eight times faster at ``q* = 0.25``. The input lies on the
sphere that puts the first pre-activation at ``q*``
(:func:`isometry.jacobian.sphere_inputs` with the critical variances; an
input of mean square ``q*`` instead puts ``h^1`` at 0.36 and the mean of
``s^2`` below 1 from depth 2 on), so the delta-orthogonal mean lies on the
theory line. The Gaussian CNN's per-network mean is a product of per-layer
factors that fluctuate at finite ``C``, so across seeds it is roughly
log-normal, with a median below 1 and a mean carried by rare large seeds;
four seeds cannot resolve its mean beyond a few layers, and the dots show
each seed.

Right panel (experiment ``cnn_trainability``): held-out accuracy (filled,
solid) and training accuracy (open, dashed) on the embedded 8 x 8 digits
after a fixed budget of SGD-with-momentum steps (rate ``0.1 / L``, cosine
decay), against depth, for both inits at the same ``q*``, with a dense readout
of the last feature map; dotted: chance (0.1).

Quick tier, and how it differs from the paper (MNIST/CIFAR-10, up to 10,000
layers, ``C`` up to 256, global average pooling, long training): spectra of
``C = 16`` networks on ``4 x 4`` inputs, 4 seeds, depths 2-64, where the
measured variance and maximum follow the theory lines at the smallest depths
and then part from them in opposite directions: delta-orthogonal above,
Gaussian below, and both scatter widely at depth 64. The
free-probability lines are the wide limit; here ``L/C`` reaches 1-4, where
finite-width corrections of order ``L/C`` to the spectrum's moments are not
small (Hanin & Nica 2019), and the 4-seed averages of these heavy-tailed
statistics are noisy. Training of ``C = 8`` networks for 100 steps of 16
examples at depths 4 and 64 with one seed (the experiment's quick preset
trains 200 steps of 32 at depths 4, 16, 64), on images scaled
so that both networks' first pre-activations start at ``q*``
(``isometry.experiments.cnn_trainability.input_scale``). The two inits
tie at depth 4 and the Gaussian CNN falls behind at depth 64 (the
right panel; the line between the two depths is not a measurement): the
trend of the paper, at depths 100 times smaller, not its
failure to train. The full
tier (depths to 512 and 1,024, longer training, more seeds) is meant for an
accelerator.
"""

from __future__ import annotations

import numpy as np

from isometry import freeprob, plotting
from isometry.experiments import cnn_trainability, deep_cnn, harness
from isometry.paper_figures import core

COST = {"quick": 26}  # single-core CPU seconds of the quick tier (a scheduling hint)

KEYS = (
    "inits",
    "spectrum_depth",
    "sv2_mean",
    "sv2_var",
    "sv2_max",
    "theory_depth",
    "theory_mean",
    "theory_var",
    "theory_max",
    "train_depth",
    "train_accuracy",
    "eval_accuracy",
)

_Q = "q_star=0.25"
TIERS = {
    "tiny": {
        "spectrum": ("quick", ("depths=2,4", "channels=3", "size=3", "seeds=2", _Q)),
        "training": (
            "quick",
            (
                "depths=2",
                "channels=4",
                "train.steps=10",
                "train.batch_size=16",
                "n_train=64",
                "seeds=1",
                "train.eval_every=5",
                _Q,
            ),
        ),
        "store": None,
    },
    "quick": {
        "spectrum": ("quick", ("depths=2,4,8,16,32,64", "channels=16", "seeds=4", _Q)),
        "training": (
            "quick",
            (
                "depths=4,64",
                "train.steps=100",
                "train.batch_size=16",
                # held-out evaluation at the start and the end only: the figure reads the end
                "train.eval_every=0",
                _Q,
            ),
        ),
        "store": "results/experiments/{}/quick",
    },
    "full": {
        "spectrum": ("full", (_Q,)),
        "training": ("full", (_Q,)),
        "store": "results/experiments/{}/full",
    },
}

THEORY_WEIGHTS = {"delta_orthogonal": "orthogonal", "gaussian": "gaussian"}
LABELS = {"delta_orthogonal": "delta-orthogonal", "gaussian": "Gaussian"}


def _run(experiment, preset: str, overrides, store) -> harness.StoredRun:
    """``experiment`` read back from its store (``store`` formatted with its name)."""
    return harness.stored_run(
        experiment, preset, overrides, None if store is None else store.format(experiment.name),
        progress=core.progress_enabled(),
    )  # fmt: skip


def theory(activation: str, q_star: float, inits, depths) -> dict[str, np.ndarray]:
    """Mean, variance and maximum of ``s^2`` per init, ``(I, K)``, at the critical point."""
    mean, var, mx = (np.zeros((len(inits), len(depths))) for _ in range(3))
    for a, init in enumerate(inits):
        w = THEORY_WEIGHTS[init]
        for k, d in enumerate(depths):
            m = freeprob.jacobian_moments(activation, q_star, int(d), w)
            mean[a, k], var[a, k] = float(m.mean), float(m.variance)
            mx[a, k] = float(freeprob.max_eigenvalue(activation, q_star, int(d), w))
    return {"theory_mean": mean, "theory_var": var, "theory_max": mx}


def compute(spectrum, training, store) -> dict:
    spec_run = _run(deep_cnn.EXPERIMENT, *spectrum, store)
    train_run = _run(cnn_trainability.EXPERIMENT, *training, store)
    spec_cfg, train_cfg = spec_run.config, train_run.config
    if spec_cfg.inits != train_cfg.inits:
        raise ValueError(f"spectrum and training inits differ: {spec_cfg.inits}, {train_cfg.inits}")
    inits = list(spec_cfg.inits)
    sdepths = sorted(set(spec_cfg.depths))
    # (init, depth, seed): a spectrum point (init, seed) has one row per depth, in order
    stats = {
        f"sv2_{c}": np.swapaxes(spec_run.array(c, ("init", "seed"), rows=True), 1, 2)
        for c in ("mean", "var", "max")
    }
    tdepth = np.unique(np.geomspace(1, max(sdepths), 20).round().astype(int))
    th = theory(spec_cfg.activation, spec_cfg.q_star, inits, tdepth)
    return {
        "inits": np.asarray(inits),
        "spectrum_depth": np.asarray(sdepths),
        **stats,
        "theory_depth": tdepth,
        **th,
        "train_depth": np.asarray(train_cfg.depths),
        "train_accuracy": train_run.array("train_accuracy", ("init", "depth", "seed")),
        "eval_accuracy": train_run.array("eval_accuracy", ("init", "depth", "seed")),
        "q_star": np.asarray(spec_cfg.q_star),
        "channels": np.asarray([spec_cfg.channels, train_cfg.channels]),
        "spectrum_size": np.asarray(spec_cfg.size),
        "train_steps": np.asarray(train_cfg.train.steps),
    }


def plot(data, params):
    import matplotlib.pyplot as plt
    import matplotlib.ticker as mticker

    plotting.style()
    inits = list(map(str, data["inits"]))
    colors = {i: f"C{k}" for k, i in enumerate(inits)}
    markers = dict(zip(inits, "os^D", strict=False))
    fig, axes = plt.subplots(1, 4, figsize=(15.0, 3.6), constrained_layout=True)
    d, td = data["spectrum_depth"], data["theory_depth"]
    panels = [
        ("sv2_mean", "theory_mean", r"mean of $s^2$"),
        ("sv2_var", "theory_var", r"variance of $s^2$"),
        ("sv2_max", "theory_max", r"max of $s^2$"),
    ]
    for ax, (key, tkey, ylabel) in zip(axes[:3], panels, strict=True):
        for a, i in enumerate(inits):
            v = data[key][a]
            ax.plot(np.repeat(d, v.shape[-1]), v.ravel(), ".", ms=2.5, color=colors[i], alpha=0.35)
            ax.plot(
                d,
                np.nanmean(v, axis=-1),
                markers[i],
                ms=5,
                mfc="none",
                color=colors[i],
                label=f"{LABELS.get(i, i)} (measured)",
            )
            if key != "sv2_mean":
                ax.plot(td, data[tkey][a], "-", lw=1.2, color=colors[i],
                        label=f"{LABELS.get(i, i)} (theory)")  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("depth $L$")
        ax.set_ylabel(ylabel)
    # At the critical point the mean is 1 for both inits.
    axes[0].plot(td, data["theory_mean"][0], "-", lw=1.2, color="0.3", label="theory (both)")
    axes[0].yaxis.set_major_locator(mticker.LogLocator(base=2.0))
    axes[0].yaxis.set_major_formatter(mticker.FormatStrFormatter("%g"))
    axes[0].yaxis.set_minor_formatter(mticker.NullFormatter())
    axes[0].legend(loc="lower left", fontsize=7)
    n_ch, n_sp = int(data["channels"][0]), int(data["spectrum_size"])
    axes[1].set_title(
        f"Jacobian at init: $C = {n_ch}$, {n_sp}x{n_sp} inputs, $q^* = {float(data['q_star']):g}$"
    )
    axes[1].legend(loc="upper left", fontsize=7)

    ax = axes[3]
    dd = data["train_depth"]
    for a, i in enumerate(inits):
        for key, ls, fill in (("eval_accuracy", "-", colors[i]), ("train_accuracy", "--", "none")):
            v = data[key][a]
            ax.plot(np.repeat(dd, v.shape[-1]), v.ravel(), ".", ms=2.5, color=colors[i], alpha=0.35)
            kind = "held-out" if key == "eval_accuracy" else "train"
            ax.plot(
                dd,
                np.nanmean(v, axis=-1),
                markers[i],
                ls=ls,
                ms=5,
                mfc=fill,
                color=colors[i],
                label=f"{LABELS.get(i, i)}, {kind}",
            )
    ax.axhline(0.1, color="0.5", lw=0.8, ls=":", label="chance")
    ax.set_xscale("log")
    ax.set_xticks(dd)
    ax.set_xticklabels([str(int(x)) for x in dd])
    ax.minorticks_off()
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("depth $L$")
    ax.set_ylabel("accuracy after training")
    ax.set_title(
        f"after {int(data['train_steps'])} steps: digits 8x8, $C = {int(data['channels'][1])}$"
    )
    ax.legend(loc="best", fontsize=7)
    return fig
