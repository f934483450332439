"""Trainability of deep vanilla CNNs vs depth: delta-orthogonal vs Gaussian kernels.

Sweep: initializer (``delta_orthogonal`` / ``gaussian``) x depth x seed; one
training run per point. Each network is an :class:`isometry.networks.ConvNet`
body, one input convolution ``1 -> C`` and ``depth`` stride-1 ``3 x 3``
convolutions ``C -> C`` with circular padding,
``x^l = phi(conv(x^{l-1}, K^l) + b^l)``, then a dense readout to the 10
classes of the flattened last feature map (``head = "flatten"``) or of its
global average (``"pool"``, the paper's head). The body is initialized at the
critical point of ``q*`` (``sigma_w2 = fan_in Var(K)``, Xiao et al. 2018),
with the images scaled so that the first pre-activations start at ``q*``
(``input_scale``; before, the standardized images put ``h^1`` at ~1.4 for
the Gaussian CNN and ~0.18 for the delta-orthogonal one, for ``q* = 0.25``):

    delta-orthogonal:  K^l[centre] = sqrt(sigma_w2) Q^l (Haar orthogonal C x C), 0 elsewhere
    Gaussian:          K^l ~ N(0, sigma_w2 / (C k^2))

Both sit on the same mean-field critical line (``chi1 = 1``), so the mean
squared singular value of the input-output Jacobian is 1 for both; the
Gaussian one's spectrum spreads with depth (variance growing like ``L``),
the delta-orthogonal one's much less (experiment ``deep_cnn``). This
experiment measures what that does to training: SGD with momentum
(:func:`isometry.training.train` through :mod:`isometry.experiments.harness`,
learning rate ``eta / L`` with a cosine decay) on the embedded handwritten
digits as ``8 x 8 x 1`` images (:func:`isometry.data.load_digits`), then the
loss and accuracy on the whole training split and on the held-out split
(:func:`isometry.training.evaluate`).

The rate ``eta / L``: each of the ``L`` layers of a near-isometric network
moves the output by ``O(eta)`` per step, so a rate fixed across depths
destabilizes the deep networks (at ``eta = 0.5 / L`` with a constant rate the
delta-orthogonal networks reach 90% within 100 steps, then diverge). The
flattened head: a delta-orthogonal network is pointwise at initialization
(only centre taps), so with one input channel its pooled features are
averages of a function of single pixels; the dense readout of the whole
feature map lets both inits start from the pixels, and training grows the
spatial taps.

``unroll`` unrolls the depth loop of the training forward pass (the
parameters stay stacked; evaluation always scans): XLA on CPU runs
convolution gradients inside a loop tens of times slower than unrolled ones,
while unrolling makes compilation grow with depth; keep it on for CPU runs at
moderate depth, off on accelerators and for very deep networks.

Table columns: ``init, depth, seed, train_loss, train_accuracy, eval_loss,
eval_accuracy, status, steps_done`` (``status`` is ``completed`` or
``non_finite``: the run stopped at a NaN/Inf and the metrics are those of its
last finite parameters). Arrays per point: ``step, loss, accuracy``
(training batches, every ``train.log_every`` steps) and ``eval_step, eval_loss,
eval_accuracy``.

Quick sizes (``C = 8``, depths 4, 16, 64, 200 steps of 32 examples, one seed)
are far from the paper's (MNIST and CIFAR-10, up to 10,000 layers, long
training); there the two inits tie up to depth 16 and the Gaussian CNN falls
behind at depth 64. ``full`` (``C = 32``, depths up to 1,024, 3,000 steps,
4 seeds) is meant for an accelerator.

Reference: Xiao, Bahri, Sohl-Dickstein, Schoenholz & Pennington 2018,
"Dynamical isometry and a mean field theory of CNNs: how to train
10,000-layer vanilla convolutional neural networks" (ICML), Figures 1 and 5.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from isometry import activations, data, initializers, networks, sweep, training, validate
from isometry.experiments import Experiment, harness

__all__ = ["EXPERIMENT", "INITS", "PRESETS", "Config", "TrainabilityCNN", "run", "train_point"]

INITS = ("delta_orthogonal", "gaussian")
LR_SCALINGS = ("inverse_depth", "constant")
HEADS = ("flatten", "pool")
IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10
CURVES = ("step", "loss", "accuracy", "eval_step", "eval_loss", "eval_accuracy")
"""The :func:`isometry.experiments.harness.curves` kept per point."""

TRAIN = training.TrainConfig(
    steps=200, batch_size=32, optimizer="momentum", learning_rate=0.1, schedule="cosine",
    momentum=0.9, log_every=10, eval_every=50, probe_every=0, checkpoint_every=200,
)  # fmt: skip
"""The quick preset's training: SGD with momentum, cosine decay, a checkpoint at the end."""


@dataclasses.dataclass(frozen=True)
class Config:
    """CNN trainability sweep.

    Attributes:
        inits: subset of ``delta_orthogonal``, ``gaussian``.
        depths: numbers of hidden convolutions ``L``.
        activation: activation name.
        q_star: fixed point whose critical ``(sigma_w2, sigma_b2)`` both inits use.
        channels: ``C``.
        kernel_size: ``k``.
        head: ``"flatten"`` (a dense readout of all of ``x^L``) or ``"pool"``
            (global average pooling first, as Xiao et al. 2018).
        lr_scaling: ``"inverse_depth"`` (``eta = train.learning_rate / L``: each of
            the ``L`` layers of a near-isometric network moves the output by
            ``O(eta)``, so a fixed rate diverges with depth) or ``"constant"``.
        n_train: training examples used (0: all 1,438).
        seeds: independent networks (and data orders) per (init, depth).
        unroll: unroll the depth loop of the forward pass (see the module docstring).
        train: every run's :class:`~isometry.training.TrainConfig`
            (``train.learning_rate`` is the rate of a depth-1 network under
            ``inverse_depth``; ``train.seed`` the base seed of the data orders and,
            through :func:`isometry.sweep.point_key`, of the parameters). Each run
            keeps its directory ``runs/<point id>/`` in the store until it is
            recorded, with a checkpoint every ``train.checkpoint_every`` steps,
            and an interrupted run resumes from it.
    """

    inits: tuple[str, ...] = INITS
    depths: tuple[int, ...] = (4, 16, 64)
    activation: str = "tanh"
    q_star: float = 0.25
    channels: int = 8
    kernel_size: int = 3
    head: str = "flatten"
    lr_scaling: str = "inverse_depth"
    n_train: int = 0
    seeds: int = 1
    unroll: bool = True
    train: training.TrainConfig = TRAIN

    def __post_init__(self):
        validate.names("inits", self.inits, INITS)
        validate.positive_ints("depths", self.depths)
        validate.choice("activation", self.activation, tuple(activations.names()))
        validate.real_array("q_star", self.q_star, minimum=0.0, strict=True)
        validate.positive_int("channels", self.channels)
        validate.positive_int("kernel_size", self.kernel_size)
        validate.choice("head", self.head, HEADS)
        validate.choice("lr_scaling", self.lr_scaling, LR_SCALINGS)
        validate.positive_int("n_train", self.n_train, 0)
        harness.check_train(self.train)
        if 0 < self.n_train < self.train.batch_size:
            raise ValueError(
                f"n_train must be 0 (all) or >= train.batch_size = {self.train.batch_size}, "
                f"got {self.n_train}"
            )
        validate.positive_int("seeds", self.seeds)
        if not isinstance(self.unroll, bool):
            raise TypeError(f"unroll must be True or False, got {self.unroll!r}")
        # The critical point must exist for q_star (e.g. tanh at large q* needs sigma_b2 < 0).
        self.network_config("gaussian", min(self.depths))

    def network_config(self, init: str, depth: int) -> networks.ConvConfig:
        """The :class:`~isometry.networks.ConvConfig` of one (init, depth): 8 x 8 x 1 inputs."""
        return networks.ConvConfig(
            depth=depth,
            channels=self.channels,
            kernel_size=self.kernel_size,
            spatial_dims=2,
            in_channels=1,
            padding="circular",
            activation=self.activation,
            init=init,
            q_star=self.q_star,
        )


PRESETS = {
    "quick": Config(),
    "full": Config(
        depths=(16, 64, 256, 1024),
        channels=32,
        seeds=4,
        unroll=False,
        train=dataclasses.replace(
            TRAIN, batch_size=64, steps=3000, checkpoint_every=1000, eval_every=250, log_every=50
        ),
    ),
}


def grid(cfg: Config) -> sweep.Grid:
    """``init x depth x seed``."""
    return sweep.product(init=cfg.inits, depth=cfg.depths, seed=range(cfg.seeds))


class TrainabilityCNN(nnx.Module):
    """A :class:`~isometry.networks.ConvNet` body with a pooled or flattened dense readout.

    ``u (B, H, W, 1) -> x^0 -> ... -> x^L (B, H, W, C) -> y (B, classes)``;
    the body is the library's ConvNet without a head (same parameters, same
    ``stack()`` view), the head is ``mean_{H,W} x^L`` (``"pool"``, Xiao et al.
    2018) or ``x^L`` flattened (``"flatten"``), then ``W_out`` (LeCun normal,
    ``Var = 1/fan_in``) and a zero bias. With ``unroll`` the forward pass in
    training mode is a Python loop over the layers instead of a ``lax.scan``
    (the same function); evaluation mode (``model.eval()``) always scans.
    """

    def __init__(
        self,
        net: networks.ConvConfig,
        head: str,
        spatial: tuple[int, ...],
        classes: int,
        *,
        unroll: bool,
        rngs: nnx.Rngs,
    ):
        validate.choice("head", head, HEADS)
        if net.pool or net.out_dim is not None:
            raise ValueError(
                "TrainabilityCNN: the body must have no head (pool=False, out_dim=None)"
            )
        self.config = net
        self.head = head
        self.unroll = unroll
        # Set by nnx's model.train() / model.eval(): evaluation needs no gradients,
        # so it keeps the scanned forward pass (compiled once for any depth).
        self.use_running_average = False
        self.body = networks.ConvNet(net, rngs=rngs)
        fan_in = net.channels * (1 if head == "pool" else int(np.prod(spatial)))
        lecun = initializers.get("lecun_normal")
        dtype = self.body.kernel[...].dtype
        self.readout = nnx.Param(lecun(rngs.params(), (fan_in, classes), dtype))
        self.readout_bias = nnx.Param(jnp.zeros((classes,), dtype))

    def output_map(self, x: jax.Array) -> jax.Array:
        """``x^L (B, H, W, C) -> (B, classes)`` through the head and the readout."""
        f = jnp.mean(x, axis=(-3, -2)) if self.head == "pool" else x.reshape(x.shape[0], -1)
        return f @ self.readout[...] + self.readout_bias[...]

    def stack(self) -> networks.Stack:
        """The body's scanned stack with this model's head as its output map."""
        return dataclasses.replace(self.body.stack(), output_map=self.output_map)

    def __call__(self, u: jax.Array) -> jax.Array:
        if jnp.ndim(u) != 4 or jnp.shape(u)[-1] != (self.config.in_channels or 1):
            raise ValueError(f"u must have shape (B, H, W, 1), got {jnp.shape(u)}")
        s = self.stack()
        if not self.unroll or self.use_running_average:
            return s(u)
        x = s.input_map(u)
        for l in range(self.config.depth):
            x = s.layer(jax.tree.map(lambda a, l=l: a[l], s.params), x)
        return s.output_map(x)


def load_data(cfg: Config) -> data.Dataset:
    """The digits as ``(n, 8, 8, 1)`` images, standardized per pixel (first ``n_train``)."""
    ds = harness.load_data("digits", images=True)
    return ds.subset(n_train=cfg.n_train) if cfg.n_train else ds


def build_model(cfg: Config, init: str, depth: int, seed: int) -> TrainabilityCNN:
    """The network of one point; parameters from ``point_key(cfg.train.seed, seed)``.

    Every (init, depth) of a seed draws from the same key (common random numbers).
    """
    return TrainabilityCNN(
        cfg.network_config(init, depth),
        cfg.head,
        IMAGE_SHAPE[:2],
        NUM_CLASSES,
        unroll=cfg.unroll,
        rngs=nnx.Rngs(params=sweep.point_key(cfg.train.seed, seed)),
    )


def learning_rate(cfg: Config, depth: int) -> float:
    """``train.learning_rate / depth`` (``inverse_depth``) or ``train.learning_rate``."""
    lr = cfg.train.learning_rate
    return lr / depth if cfg.lr_scaling == "inverse_depth" else lr


def train_config(cfg: Config, depth: int, seed: int) -> training.TrainConfig:
    """The :class:`~isometry.training.TrainConfig` of a point: ``cfg.train`` at the depth's
    learning rate, data order from ``train.seed + seed``."""
    return dataclasses.replace(
        cfg.train, learning_rate=learning_rate(cfg, depth), seed=cfg.train.seed + seed
    )


def input_scale(model: TrainabilityCNN, ds: data.Dataset) -> float:
    """The input scale ``s`` that starts the body's first pre-activations at ``q*``.

    The input convolution ``1 -> C`` of this network maps the training images
    to ``x^0`` of mean square ``s^2 m_0`` (``m_0 = mean(input_map(u)^2)``; about
    ``mean(u^2)`` for the LeCun map of the Gaussian CNN, ``mean(u^2) / C`` for
    the delta-orthogonal one), and ``E (h^1)^2 = sigma_w2 s^2 m_0 + sigma_b2``, so

        s = sqrt((q* - sigma_b2) / (sigma_w2 m_0))

    (as :func:`isometry.experiments.harness.input_scale` for the MLPs).
    """
    sw, sb = model.config.variances()
    u = jnp.asarray(ds.x_train, model.body.kernel[...].dtype)
    m0 = float(jnp.mean(jnp.square(model.stack().input_map(u))))
    return math.sqrt((model.config.q_star - sb) / (sw * m0))


def train_point(cfg: Config, point: dict, ds: data.Dataset, run_dir: Path | None = None) -> dict:
    """Train one ``{init, depth, seed}`` point on inputs scaled to ``q*``; rows and curves."""
    model = build_model(cfg, point["init"], point["depth"], point["seed"])
    tc = train_config(cfg, point["depth"], point["seed"])
    ds = harness.scaled(ds, input_scale(model, ds))
    res = harness.train_model(model, ds, tc, run_dir, depth=point["depth"])
    keep = ("train_loss", "train_accuracy", "eval_loss", "eval_accuracy")
    row = {k: res.row[k] for k in keep}
    row["status"] = "non_finite" if res.row["diverged"] else "completed"
    row["steps_done"] = res.row["steps_done"]
    return {"rows": [row], "arrays": {k: res.curves[k] for k in CURVES}}


def run(
    cfg: Config, out, *, per_device: int = 4, optimize: bool = True, progress: bool = True
) -> Path:
    """Run the sweep into the store ``out``; returns the aggregate csv path.

    ``per_device`` and ``optimize`` are accepted for the common interface and
    unused: each point is one training run on this process's devices
    (:func:`isometry.experiments.harness.run_points`).
    """
    del per_device, optimize
    store = sweep.Store(out, "cnn_trainability", cfg)
    ds = load_data(cfg)

    def one(p, run_dir):
        return train_point(cfg, p, ds, run_dir)

    return harness.run_points(store, grid(cfg), one, progress=progress, label="cnn_trainability")


EXPERIMENT = Experiment(
    "cnn_trainability",
    Config,
    PRESETS,
    run,
    "delta-orthogonal vs Gaussian CNNs: accuracy after training vs depth",
    grid=grid,
)
