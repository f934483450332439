"""Learning-rate transfer: held-out loss vs Adam's learning rate over width and depth.

Sweep: two families of points, each point one network structure trained at every
learning rate of a log-spaced grid and every seed in **one** compiled program
(the learning rates are traced: :meth:`isometry.parameterization.Parameterization.tx`):

* ``sweep="width"``: tanh MLPs (:class:`isometry.networks.MLP`, ``width_depth``
  hidden layers, no residual) at ``widths``, in the standard parameterization
  (``"standard"``) and in muP (``"mup"``; base width ``widths[0]``, the shapes read
  off the model by :func:`isometry.parameterization.infer`);
* ``sweep="depth"``: residual tanh MLPs at ``depth_width`` with ``depths`` blocks
  ``x^l = x^{l-1} + alpha tanh(x^{l-1} W^l + b^l)`` under muP at the base width,
  with branch scale ``alpha = 1`` (``"mup"``) and depth-muP
  (``"depth_mup"``: ``alpha = 1/sqrt(L)`` and Adam's block learning rates
  ``eta/sqrt(L)``; Yang et al. 2023, Bordelon et al. 2023). The branch has its
  matrix before the nonlinearity only; with ReLU such a block is not a valid
  depth-muP network (its branch is not centred), with tanh it is odd, so the
  block's mean stays 0 (the package's coordinate check passes for it).

Every parameterization goes through :func:`isometry.parameterization.apply` on the
freshly built model (the one table), the optimizer is its ``tx(eta)`` (Adam with the
per-parameter scales ``s_p``: ``Delta p = -eta s_p m_hat / (sqrt(v_hat) + eps)``).
Seed ``s`` draws the initialization (``nnx.Rngs(train.seed + s)``) and the batch order;
every learning rate of a seed sees the same batches. Loss: softmax cross-entropy;
the held-out loss is on the whole test split after ``train.steps`` steps.

Claim under test (Yang et al. 2022, "Tensor Programs V", Fig. 1 / Fig. 3): under
the standard parameterization the best learning rate ``eta*`` moves as the width
grows, under muP it stays put; over depth (Yang et al. 2023, "Tensor Programs VI";
Bordelon et al. 2023) it moves with branch scale 1 and stays with ``1/sqrt(L)``.
:func:`optimum` finds ``log2 eta*`` (argmin refined by a parabola), :func:`shift`
its slope in octaves per doubling.

Table columns: ``sweep, size, kind, seed, log2_lr, eval_loss, eval_accuracy``
(one row per seed and learning rate; a diverged run has ``eval_loss`` NaN or inf).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from isometry import networks, parameterization, sweep, training, validate
from isometry.experiments import Experiment, harness
from isometry.training.evaluation import per_example_loss

__all__ = [
    "DEPTH_KINDS", "EXPERIMENT", "LR_MAPS", "PRESETS", "WIDTH_KINDS", "Config", "grid",
    "model", "optimum", "run", "shift", "train_point",
]  # fmt: skip

WIDTH_KINDS = ("standard", "mup")
"""Parameterizations of the width sweep."""
DEPTH_KINDS = ("mup", "depth_mup")
"""Of the depth sweep: muP with branch scale 1, and depth-muP (branch scale ``1/sqrt(L)``)."""
LR_MAPS = ("vmap", "map")
"""How one program runs its learning rates: ``vmap`` (batched) or ``map`` (``lax.map``,
one rate after the other: on a CPU core about twice as fast at width 512, where the
batched small matrix products are slow; the seeds are always ``vmap``-ped)."""

TRAIN = training.TrainConfig(
    steps=60, batch_size=16, optimizer="adam", learning_rate=1e-3, log_every=1,
    eval_every=0, probe_every=0,
)  # fmt: skip
"""The quick preset's training (its ``learning_rate`` is unused: the grid's rates are)."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Learning-rate transfer sweep.

    Attributes:
        widths: hidden widths ``N`` of the width sweep (the first is muP's base width).
        width_depth: hidden layers of the width sweep's MLPs.
        depths: residual blocks ``L`` of the depth sweep.
        depth_width: the depth sweep's width.
        log2_lrs: ``log2 eta`` of Adam's learning rates (at least 3, increasing).
        seeds: independent runs per structure and rate.
        lr_map: :data:`LR_MAPS`, how a program runs its rates (the same numbers).
        dataset: ``digits`` (embedded) or a local-file dataset.
        train: ``steps``, ``batch_size``, ``seed`` and Adam's ``b1, b2, eps`` are used.
    """

    widths: tuple[int, ...] = (32, 128, 512)
    width_depth: int = 2
    depths: tuple[int, ...] = (4, 16, 64)
    depth_width: int = 64
    log2_lrs: tuple[float, ...] = tuple(float(k) for k in range(-12, -3))
    seeds: int = 2
    lr_map: str = "map"
    dataset: str = "digits"
    train: training.TrainConfig = TRAIN

    def __post_init__(self):
        widths = validate.positive_ints("widths", self.widths)
        if len(widths) < 2 or any(b <= a for a, b in itertools.pairwise(widths)):
            raise ValueError(f"widths must be at least 2 increasing values, got {widths}")
        validate.positive_ints("depths", self.depths)
        validate.int_fields(self, "width_depth", "depth_width")
        lrs = validate.reals("log2_lrs", self.log2_lrs)
        if len(lrs) < 3 or any(b <= a for a, b in itertools.pairwise(lrs)):
            raise ValueError(f"log2_lrs must be at least 3 increasing values, got {lrs}")
        if any(not math.isfinite(v) for v in lrs):
            raise ValueError(f"log2_lrs must be finite, got {lrs}")
        validate.choice("lr_map", self.lr_map, LR_MAPS)
        validate.int_fields(self, "seeds")
        validate.choice("dataset", self.dataset, harness.DATASETS)
        harness.check_train(self.train)


PRESETS = {
    "quick": Config(),
    "full": Config(
        widths=(128, 256, 512, 1024, 2048, 4096),
        depths=(4, 8, 16, 32, 64, 128),
        depth_width=256,
        log2_lrs=tuple(k / 2 for k in range(-32, -5)),
        seeds=4,
        dataset="cifar10",
        lr_map="vmap",
        train=dataclasses.replace(TRAIN, steps=2000, batch_size=128),
    ),
}


def grid(cfg: Config) -> sweep.Grid:
    """One axis of points ``(sweep, size, kind)``: widths x :data:`WIDTH_KINDS`, then
    depths x :data:`DEPTH_KINDS`."""
    pts = [("width", n, k) for n in cfg.widths for k in WIDTH_KINDS]
    pts += [("depth", d, k) for d in cfg.depths for k in DEPTH_KINDS]
    return sweep.zipped(**dict(zip(("sweep", "size", "kind"), zip(*pts, strict=True), strict=True)))


def _config(cfg: Config, sweep_name: str, size: int, kind: str, in_dim: int, out_dim: int):
    if sweep_name == "width":
        return networks.MLPConfig(depth=cfg.width_depth, width=size, in_dim=in_dim,
                                  out_dim=out_dim, activation="tanh",
                                  parameterization=kind)  # fmt: skip
    return networks.MLPConfig(depth=size, width=cfg.depth_width, in_dim=in_dim, out_dim=out_dim,
                              activation="tanh", residual=True, residual_scale=1.0,
                              parameterization=kind)  # fmt: skip


def model(cfg: Config, sweep_name: str, size: int, kind: str, in_dim: int, out_dim: int, seed: int):
    """The point's model, parameterized: ``(nnx.MLP, Parameterization)``.

    Width sweep: :func:`isometry.parameterization.apply` with the shapes inferred from the
    factory at ``widths[0]`` and ``widths[1]`` (muP's base width ``widths[0]``). Depth sweep: at
    its one width (``shapes=None``: every width multiplier 1), depth-muP's ``L = size``.
    """
    factory = lambda n, rngs: networks.MLP(  # noqa: E731
        dataclasses.replace(_config(cfg, sweep_name, size, kind, in_dim, out_dim), width=n),
        rngs=rngs,
    )
    if sweep_name == "width":
        base = cfg.widths[0]
        shapes = parameterization.infer(factory, (base, cfg.widths[1]))
        net = factory(size, nnx.Rngs(seed))
    else:
        shapes, net = None, factory(cfg.depth_width, nnx.Rngs(seed))
    return net, parameterization.apply(net, kind, shapes, optimizer="adam")


def _program(graphdef, p, train: training.TrainConfig, lr_map: str):
    """The jitted ``(params (S, ...), lrs (K,), batches (S, T, B), x, y, x_test, y_test)
    -> (S, K, 2)``: ``T`` Adam steps of every ``(seed, rate)`` on the rows ``batches``
    of ``(x, y)``, then the held-out loss and accuracy."""

    def loss_fn(params, x, y):  # the evaluator's per-example loss and correctness
        per, correct = per_example_loss("cross_entropy", nnx.merge(graphdef, params)(x), y)
        return jnp.mean(per), jnp.mean(correct)

    def one(params, lr, batches, x, y, x_test, y_test):
        tx = p.tx(lr, b1=train.b1, b2=train.b2, eps=train.eps)

        def step(carry, rows):
            params, state = carry
            g = jax.grad(lambda q: loss_fn(q, x[rows], y[rows])[0])(params)
            upd, state = tx.update(g, state, params)
            return (optax.apply_updates(params, upd), state), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), batches)
        return jnp.stack(loss_fn(params, x_test, y_test))

    def per_seed(params, lrs, batches, *data):
        fn = lambda lr: one(params, lr, batches, *data)  # noqa: E731
        return jax.vmap(fn)(lrs) if lr_map == "vmap" else jax.lax.map(fn, lrs)

    return jax.jit(jax.vmap(per_seed, in_axes=(0, None, 0, None, None, None, None)))


def train_point(cfg: Config, point: dict, ds) -> np.ndarray:
    """Train one point's structure at every rate and seed: ``(seeds, K, 2)`` held-out
    ``(loss, accuracy)`` for ``K = len(log2_lrs)``."""
    nets = [model(cfg, point["sweep"], point["size"], point["kind"], ds.in_dim, ds.out_dim,
                  cfg.train.seed + s) for s in range(cfg.seeds)]  # fmt: skip
    graphdef, _ = nnx.split(nets[0][0])
    params = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.split(n)[1] for n, _ in nets])
    rng = np.random.default_rng([cfg.train.seed, cfg.seeds])
    shape = (cfg.seeds, cfg.train.steps, cfg.train.batch_size)
    batches = rng.integers(0, ds.x_train.shape[0], size=shape)
    prog = _program(graphdef, nets[0][1], cfg.train, cfg.lr_map)
    lrs = jnp.asarray(np.exp2(np.asarray(cfg.log2_lrs)), jnp.float32)
    out = prog(params, lrs, batches, ds.x_train, ds.y_train, ds.x_test, ds.y_test)
    return np.asarray(out, np.float64)


def run(
    cfg: Config, out, *, per_device: int = 4, optimize: bool = True, progress: bool = True
) -> Path:
    """Train every point's structure at every rate and seed into the store ``out``; the
    csv path (rows: one per seed and rate)."""
    del per_device, optimize
    store = sweep.Store(out, "lr_transfer", cfg)
    ds = harness.load_data(cfg.dataset)
    if ds.in_dim in cfg.widths:
        raise ValueError(
            f"widths must not contain the input dimension {ds.in_dim}: at width == in_dim the "
            "MLP has no input map, a different structure from the other widths"
        )

    def point(p, run_dir):
        del run_dir  # one program per point, nothing to resume inside it
        res = train_point(cfg, p, ds)
        return [
            {"seed": s, "log2_lr": float(lr), "eval_loss": float(res[s, k, 0]),
             "eval_accuracy": float(res[s, k, 1])}
            for s in range(cfg.seeds) for k, lr in enumerate(cfg.log2_lrs)
        ]  # fmt: skip

    return harness.run_points(store, grid(cfg), point, progress=progress, label="lr_transfer")


# --------------------------------------------------------------------------- #
# The optimum and its shift.
# --------------------------------------------------------------------------- #


def optimum(log2_lr, loss) -> tuple[np.ndarray, np.ndarray]:
    """``log2 eta*`` of loss curves ``(..., K)`` over the rates ``log2_lr (K,)``, and
    whether it is interior: ``(log2 eta* (...), interior (...))``.

    ``i = argmin loss`` (a non-finite loss counts as +inf: a diverged run); when
    ``0 < i < K - 1`` the parabola through ``(x_{i-1}, x_i, x_{i+1})`` refines it,
    with vertex

        x* = x_i - 1/2 [(x_i - x_a)^2 (f_i - f_b) - (x_i - x_b)^2 (f_i - f_a)]
                     / [(x_i - x_a) (f_i - f_b) - (x_i - x_b) (f_i - f_a)],

    ``a = i - 1``, ``b = i + 1``, kept within ``[x_a, x_b]``; with a diverged neighbour
    ``x* = x_i`` (bracketed, not refined); at an edge ``x* = x_i`` and not interior
    (censored: the true optimum may lie beyond the grid). All non-finite: NaN.
    """
    x = np.asarray(log2_lr, np.float64)
    f = np.asarray(loss, np.float64)
    if x.ndim != 1 or x.size < 3 or f.shape[-1:] != x.shape:
        raise ValueError(f"need log2_lr (K >= 3,) and loss (..., K), got {x.shape}, {f.shape}")
    f = np.where(np.isfinite(f), f, np.inf)
    i = np.argmin(f, axis=-1)
    k = np.clip(i, 1, x.size - 2)
    fa, fi, fb = (np.take_along_axis(f, (k + d)[..., None], -1)[..., 0] for d in (-1, 0, 1))
    xa, xi, xb = x[k - 1], x[k], x[k + 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        num = (xi - xa) ** 2 * (fi - fb) - (xi - xb) ** 2 * (fi - fa)
        den = (xi - xa) * (fi - fb) - (xi - xb) * (fi - fa)
        vertex = np.clip(xi - 0.5 * num / den, xa, xb)
    interior = i == k
    out = np.where(interior & np.isfinite(vertex), vertex, x[i])
    return np.where(np.isfinite(f).any(axis=-1), out, np.nan), interior


def shift(log2_size, log2_opt) -> np.ndarray:
    """Octaves of ``eta*`` per doubling of the size: the least-squares slope of
    ``log2 eta* (..., M)`` against ``log2 size (M,)``, ``(...)``."""
    s = np.asarray(log2_size, np.float64)
    y = np.asarray(log2_opt, np.float64)
    if s.ndim != 1 or s.size < 2 or y.shape[-1:] != s.shape:
        raise ValueError(
            f"need log2_size (M >= 2,) and log2_opt (..., M), got {s.shape}, {y.shape}"
        )
    sc = s - s.mean()
    return ((y - y.mean(axis=-1, keepdims=True)) * sc).sum(axis=-1) / (sc**2).sum()


EXPERIMENT = Experiment(
    "lr_transfer",
    Config,
    PRESETS,
    run,
    "held-out loss vs learning rate over width (SP vs muP) and depth (branch 1 vs 1/sqrt(L))",
    grid=grid,
)
