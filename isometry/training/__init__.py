"""Training linked to isometry: Flax NNX models, optax optimizers, gradient clipping.

A run trains any model of :mod:`isometry.networks` (anything ``nnx.Module``
whose call maps a batch of inputs to logits or outputs) with

    updates = opt( clip( grad L(theta) ) )       (optax.chain(clip, opt))
    theta  <- theta + updates

* optimizers ``sgd``, ``momentum``, ``rmsprop``, ``adam`` (:func:`optimizer`);
  learning-rate schedules ``constant``, ``cosine``, ``linear``,
  ``exponential`` with linear warm-up (:func:`schedule`);
* clipping (:func:`clipping`): ``none``; ``global_norm:c`` (``g <- g *
  min(1, c / ||g||)``, Pascanu, Mikolov & Bengio 2013); ``value:c``
  (``g_i <- clamp(g_i, -c, c)``); ``agc:c`` (adaptive, unit-wise,
  ``G_i <- G_i * min(1, c max(||W_i||, eps) / ||G_i||)``, Brock, De, Smith
  & Simonyan 2021; :func:`adaptive_grad_clip`, computed per layer of the
  scanned stack: the parameters of type :class:`isometry.networks.StackedParam`).

Logged (``metrics.jsonl``, one JSON record per logged step; ``step`` counts
completed updates):

* every ``log_every`` steps: ``loss``, ``accuracy`` (of the batch, before the
  update), ``lr``, ``grad_norm`` (global norm before clipping),
  ``grad_norm_clipped`` (after), ``clipped`` (bool), ``clip_ratio``
  (after / before), ``grad_norm_input``, ``grad_norm_output`` and
  ``grad_norm_layers`` (the ``L`` per-layer gradient norms of the stack);
* every ``eval_every`` steps (and at step 0): ``eval_loss``, ``eval_accuracy``
  on the whole held-out split (:func:`evaluate_state`, the evaluator every
  experiment uses; a non-finite per-example loss counts as ``inf``);
* every ``probe_every`` steps (and at step 0): the probe (:func:`monitor_probe`, the
  monitor of :func:`isometry.probe.monitor` on ``probe_inputs`` held-out inputs, in
  evaluation mode, for every model whose cut points :func:`isometry.probe.blocks`
  finds): ``jac_sv2_mean``, ``jac_sv2_var``, ``jac_sv2_max``, the mean, variance and
  maximum of the squared singular values ``lambda_i`` of the cumulative Jacobian at
  the last cut point (the stack's ``J = dx^L/dx^0`` of a toolkit stack; Pennington,
  Schoenholz & Ganguli 2017), SLQ estimates, mean and variance averaged over the
  inputs, the maximum over all of them; and per block ``block_mean_sq``,
  ``block_grad_out_sq``, ``block_grad_param_sq``.

Output directory: ``config.json``, ``metrics.jsonl`` (records appended and
fsynced; a resumed run first truncates records past its checkpoint, so its
metrics equal an uninterrupted run's), ``summary.json`` (atomic), and orbax
checkpoints in ``checkpoints/`` every ``checkpoint_every`` steps and at the
end, each with a SHA-256 file. Calling :func:`train` again on the same
directory resumes from the newest intact checkpoint (damaged ones are named,
skipped and replayed); a finished run is left as it is, and a constant-rate
run continues to a larger ``steps``. One process writes a directory at a time
(:class:`RunLockedError`). The data order is a function of ``(seed, step)``
(:func:`isometry.data.batch_indices`), so the final parameters are bitwise
those of an uninterrupted run.

A non-finite loss, gradient or update leaves the parameters at their last
finite values (the step is a no-op from then on) and the run stops at the
next check (every log or checkpoint step) with :class:`NonFiniteError`
naming the step; the metrics are kept and the last good state is saved as a
checkpoint at the last finite step.

Modules: :mod:`~isometry.training.config` (TrainConfig, RunConfig, parse_clip),
:mod:`~isometry.training.optim` (schedule, clipping, optimizer),
:mod:`~isometry.training.step` (state, jitted step, per-layer gradient norms,
non-finite guard), :mod:`~isometry.training.evaluation` (the one padded, masked,
chunked evaluator), :mod:`~isometry.training.probe` (Jacobian probe),
:mod:`~isometry.training.rundir` (metrics log, verified checkpoints, config check, lock) and
:mod:`~isometry.training.loop` (train, run).

The train step is one jitted function of ``(graphdef, params, batch_stats,
optimizer state)`` (``nnx.split``), with the state donated; it runs on CPU and
GPU unchanged.

Example:
    >>> from flax import nnx
    >>> from isometry import data, networks, training
    >>> ds = data.load_digits()
    >>> model = networks.MLP(networks.MLPConfig(depth=4, width=64, in_dim=64, out_dim=10),
    ...                      rngs=nnx.Rngs(0))
    >>> cfg = training.TrainConfig(steps=20, learning_rate=0.05, clip="global_norm:1.0",
    ...                            probe_every=0)
    >>> result = training.train(model, ds, cfg)
    >>> result.summary["status"], result.summary["steps"]
    ('completed', 20)

References:
    Pascanu, Mikolov & Bengio 2013, "On the difficulty of training recurrent
    neural networks" (clipping by norm). Brock, De, Smith & Simonyan 2021,
    "High-performance large-scale image recognition without normalization"
    (adaptive gradient clipping). Pennington, Schoenholz & Ganguli 2017,
    "Resurrecting the sigmoid in deep learning through dynamical isometry".
"""

from isometry.training.config import (
    CLIPS,
    OPTIMIZERS,
    SCHEDULES,
    RunConfig,
    TrainConfig,
    parse_clip,
)
from isometry.training.evaluation import evaluate, evaluate_state
from isometry.training.loop import TrainResult, run, train
from isometry.training.optim import adaptive_grad_clip, clipping, optimizer, schedule
from isometry.training.probe import monitor_probe
from isometry.training.rundir import MetricsLog, RunLockedError
from isometry.training.step import NonFiniteError, init_state, layer_grad_norms, make_train_step

__all__ = [
    "CLIPS",
    "OPTIMIZERS",
    "SCHEDULES",
    "MetricsLog",
    "NonFiniteError",
    "RunConfig",
    "RunLockedError",
    "TrainConfig",
    "TrainResult",
    "adaptive_grad_clip",
    "clipping",
    "evaluate",
    "evaluate_state",
    "init_state",
    "layer_grad_norms",
    "make_train_step",
    "monitor_probe",
    "optimizer",
    "parse_clip",
    "run",
    "schedule",
    "train",
]
