"""Trainability of deep vanilla CNNs vs depth: delta-orthogonal vs Gaussian kernels.

Sweep: initializer (``delta_orthogonal`` / ``gaussian``) x depth x seed; one
training run per point. Each network is an :class:`isometry.networks.ConvNet`
body, one input convolution ``1 -> C`` and ``depth`` stride-1 ``3 x 3``
convolutions ``C -> C`` with circular padding,
``x^l = phi(conv(x^{l-1}, K^l) + b^l)``, then a dense readout to the 10
classes of the flattened last feature map (``head = "flatten"``) or of its
global average (``"pool"``, the paper's head). The body is initialized at the
critical point of ``q*`` (``sigma_w2 = fan_in Var(K)``, Xiao et al. 2018):

    delta-orthogonal:  K^l[centre] = sqrt(sigma_w2) Q^l (Haar orthogonal C x C), 0 elsewhere
    Gaussian:          K^l ~ N(0, sigma_w2 / (C k^2))

Both sit on the same mean-field critical line (``chi1 = 1``), so the mean
squared singular value of the input-output Jacobian is 1 for both; the
Gaussian one's spectrum spreads with depth (variance growing like ``L``),
the delta-orthogonal one's much less (experiment ``deep_cnn``). This
experiment measures what that does to training: SGD with momentum
(:func:`isometry.training.train`, learning rate ``eta / L`` with a cosine
decay) on the embedded handwritten digits as ``8 x 8 x 1`` images
(:func:`isometry.data.load_digits`), then the loss and accuracy on the whole
training split and on the held-out split.

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
(training batches, every ``log_every`` steps) and ``eval_step, eval_loss,
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
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from isometry import data, initializers, networks, sweep, training, validate
from isometry.experiments import Experiment
from isometry.experiments._common import ACTIVATIONS, seed_key

__all__ = ["EXPERIMENT", "INITS", "PRESETS", "Config", "TrainabilityCNN", "run", "train_point"]

INITS = ("delta_orthogonal", "gaussian")
OPTIMIZERS = training.OPTIMIZERS
LR_SCALINGS = ("inverse_depth", "constant")
HEADS = ("flatten", "pool")
IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10


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
        steps: SGD updates per run.
        batch_size: training examples per update.
        optimizer: ``sgd``, ``momentum``, ``rmsprop`` or ``adam``.
        learning_rate: the (constant) learning rate; with ``lr_scaling =
            "inverse_depth"`` the rate of a depth-1 network, divided by ``L``.
        schedule: learning-rate schedule (:func:`isometry.training.schedule`),
            e.g. ``"cosine"`` decay to 1% or ``"constant"``.
        lr_scaling: ``"inverse_depth"`` (``eta = learning_rate / L``: each of
            the ``L`` layers of a near-isometric network moves the output by
            ``O(eta)``, so a fixed rate diverges with depth) or ``"constant"``.
        momentum: heavy-ball momentum of ``momentum``.
        log_every: training-batch metrics every this many steps.
        eval_every: held-out evaluation every this many steps (and at the end).
        n_train: training examples used (0: all 1,438).
        seeds: independent networks (and data orders) per (init, depth).
        unroll: unroll the depth loop of the forward pass (see the module docstring).
        checkpoint_every: 0 trains in memory; otherwise each run keeps its
            directory ``runs/<point id>/`` in the store with a checkpoint
            every this many steps, and an interrupted run resumes from it.
        seed: base seed.
    """

    inits: tuple[str, ...] = INITS
    depths: tuple[int, ...] = (4, 16, 64)
    activation: str = "tanh"
    q_star: float = 0.25
    channels: int = 8
    kernel_size: int = 3
    head: str = "flatten"
    steps: int = 200
    batch_size: int = 32
    optimizer: str = "momentum"
    learning_rate: float = 0.1
    schedule: str = "cosine"
    lr_scaling: str = "inverse_depth"
    momentum: float = 0.9
    log_every: int = 10
    eval_every: int = 50
    n_train: int = 0
    seeds: int = 1
    unroll: bool = True
    checkpoint_every: int = 0
    seed: int = 0

    def __post_init__(self):
        validate.names("inits", self.inits, INITS)
        validate.positive_ints("depths", self.depths)
        validate.choice("activation", self.activation, ACTIVATIONS)
        validate.real_array("q_star", self.q_star, minimum=0.0, strict=True)
        validate.positive_int("channels", self.channels)
        validate.positive_int("kernel_size", self.kernel_size)
        validate.choice("head", self.head, HEADS)
        validate.positive_int("steps", self.steps)
        validate.positive_int("batch_size", self.batch_size)
        validate.choice("optimizer", self.optimizer, OPTIMIZERS)
        validate.real_array("learning_rate", self.learning_rate, minimum=0.0, strict=True)
        validate.choice("schedule", self.schedule, training.SCHEDULES)
        validate.choice("lr_scaling", self.lr_scaling, LR_SCALINGS)
        validate.real_array("momentum", self.momentum, minimum=0.0, maximum=1.0)
        validate.positive_int("log_every", self.log_every)
        validate.positive_int("eval_every", self.eval_every, 0)
        validate.positive_int("n_train", self.n_train, 0)
        if 0 < self.n_train < self.batch_size:
            raise ValueError(
                f"n_train must be 0 (all) or >= batch_size = {self.batch_size}, got {self.n_train}"
            )
        validate.positive_int("seeds", self.seeds)
        if not isinstance(self.unroll, bool):
            raise TypeError(f"unroll must be True or False, got {self.unroll!r}")
        validate.positive_int("checkpoint_every", self.checkpoint_every, 0)
        validate.positive_int("seed", self.seed, 0)
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
        batch_size=64,
        steps=3000,
        seeds=4,
        unroll=False,
        checkpoint_every=1000,
        eval_every=250,
        log_every=50,
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
    ds = data.load_digits(images=True)
    return ds.subset(n_train=cfg.n_train) if cfg.n_train else ds


def build_model(cfg: Config, init: str, depth: int, seed: int) -> TrainabilityCNN:
    """The network of one point; parameters from ``seed_key(cfg.seed, seed)``.

    Every (init, depth) of a seed draws from the same key (common random numbers).
    """
    return TrainabilityCNN(
        cfg.network_config(init, depth),
        cfg.head,
        IMAGE_SHAPE[:2],
        NUM_CLASSES,
        unroll=cfg.unroll,
        rngs=nnx.Rngs(params=seed_key(cfg.seed, seed)),
    )


def learning_rate(cfg: Config, depth: int) -> float:
    """``learning_rate / depth`` (``inverse_depth``) or ``learning_rate`` (``constant``)."""
    return cfg.learning_rate / depth if cfg.lr_scaling == "inverse_depth" else cfg.learning_rate


def train_config(cfg: Config, depth: int, seed: int) -> training.TrainConfig:
    """The :class:`~isometry.training.TrainConfig` of a point (data order from ``seed``)."""
    ckpt = cfg.checkpoint_every or cfg.steps
    return training.TrainConfig(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        optimizer=cfg.optimizer,
        learning_rate=learning_rate(cfg, depth),
        schedule=cfg.schedule,
        momentum=cfg.momentum,
        seed=cfg.seed + seed,
        log_every=cfg.log_every,
        eval_every=cfg.eval_every,
        probe_every=0,
        checkpoint_every=ckpt,
    )


def dataset_metrics(model: TrainabilityCNN, splits: dict, chunk: int = 512) -> dict[str, dict]:
    """Mean softmax cross-entropy and accuracy of ``model`` on each split.

    ``splits`` maps names to ``(x (n, 8, 8, 1), y (n,))``; returns
    ``{name: {"loss", "accuracy"}}``. Evaluated with the scanned forward pass
    in chunks of ``chunk`` examples (the last one padded and masked), so every
    split uses one compiled function.
    """
    graphdef, state = nnx.split(model)
    dtype = model.body.kernel[...].dtype

    @jax.jit
    def sums(state, xb, yb, mask):
        logits = nnx.merge(graphdef, state).stack()(xb)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
        return jnp.sum(loss * mask), jnp.sum((jnp.argmax(logits, -1) == yb) * mask)

    out = {}
    for name, (x, y) in splits.items():
        n, tot_loss, tot_correct = len(x), 0.0, 0.0
        for i in range(0, n, chunk):
            xb, yb = np.asarray(x[i : i + chunk]), np.asarray(y[i : i + chunk])
            m, pad = len(xb), chunk - len(xb)
            xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros((pad,), yb.dtype)])
            mask = (np.arange(chunk) < m).astype(dtype)
            sl, sc = sums(state, jnp.asarray(xb, dtype), jnp.asarray(yb), jnp.asarray(mask))
            tot_loss += float(sl)
            tot_correct += float(sc)
        out[name] = {"loss": tot_loss / n, "accuracy": tot_correct / n}
    return out


def _curves(records: list[dict]) -> dict[str, np.ndarray]:
    train = [r for r in records if "loss" in r]
    ev = [r for r in records if "eval_loss" in r]
    return {
        "step": np.asarray([r["step"] for r in train], np.int64),
        "loss": np.asarray([r["loss"] for r in train], np.float64),
        "accuracy": np.asarray([r["accuracy"] for r in train], np.float64),
        "eval_step": np.asarray([r["step"] for r in ev], np.int64),
        "eval_loss": np.asarray([r["eval_loss"] for r in ev], np.float64),
        "eval_accuracy": np.asarray([r.get("eval_accuracy", np.nan) for r in ev], np.float64),
    }


def train_point(cfg: Config, point: dict, ds: data.Dataset, run_dir: Path | None = None) -> dict:
    """Train one ``{init, depth, seed}`` point; ``{"rows": [row], "arrays": curves}``."""
    model = build_model(cfg, point["init"], point["depth"], point["seed"])
    status = "completed"
    try:
        res = training.train(model, ds, train_config(cfg, point["depth"], point["seed"]), run_dir)
        records, steps_done = res.records, cfg.steps
    except training.NonFiniteError as err:
        status, steps_done = "non_finite", err.step - 1
        records = training.MetricsLog(run_dir / "metrics.jsonl").read() if run_dir else []
    m = dataset_metrics(model, {"train": (ds.x_train, ds.y_train), "eval": (ds.x_test, ds.y_test)})
    row = {
        "train_loss": m["train"]["loss"],
        "train_accuracy": m["train"]["accuracy"],
        "eval_loss": m["eval"]["loss"],
        "eval_accuracy": m["eval"]["accuracy"],
        "status": status,
        "steps_done": steps_done,
    }
    return {"rows": [row], "arrays": _curves(records)}


def run(
    cfg: Config, out, *, per_device: int = 4, optimize: bool = True, progress: bool = True
) -> Path:
    """Run the sweep into the store ``out``; returns the aggregate csv path.

    ``per_device`` and ``optimize`` are accepted for the common interface and
    unused: each point is one training run on this process's devices.
    """
    del per_device, optimize
    store = sweep.Store(out, "cnn_trainability", cfg)
    ds = load_data(cfg)

    def one(p):
        run_dir = store.root / "runs" / sweep.point_id(p) if cfg.checkpoint_every else None
        return train_point(cfg, p, ds, run_dir)

    return sweep.run_partitioned(store, grid(cfg), one, progress=progress, label="cnn_trainability")


EXPERIMENT = Experiment(
    "cnn_trainability",
    Config,
    PRESETS,
    run,
    "delta-orthogonal vs Gaussian CNNs: accuracy after training vs depth",
)
