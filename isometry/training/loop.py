"""The training loop: :func:`train` (any NNX model) and :func:`run` (a whole :class:`RunConfig`).

Logged (``metrics.jsonl``, one JSON record per logged step; ``step`` counts
completed updates): every ``log_every`` steps the train step's metrics
(:mod:`isometry.training.step`); every ``eval_every`` steps (and at step 0
and the end) ``eval_loss``, ``eval_accuracy`` on the whole held-out split
(:func:`isometry.training.evaluate_state`); every ``probe_every`` steps (and
at step 0 and the end) the probe ``jac_sv2_mean``, ``jac_sv2_var``,
``jac_sv2_max`` and the per-block ``block_mean_sq``, ``block_grad_out_sq``,
``block_grad_param_sq`` at ``probe_inputs`` held-out inputs, by the monitor of
:func:`isometry.probe.monitor` (:func:`isometry.training.monitor_probe`), for
every model whose cut points :func:`isometry.probe.blocks` finds.

Calling :func:`train` again on the same directory resumes from the newest
intact checkpoint (each is verified against its checksum; damaged ones are
skipped, named with the reason, and replayed), saying "resuming from step
N" on stderr; the data order is a function of ``(seed, step)``
(:func:`isometry.data.batch_indices`), so the final parameters are bitwise
those of an uninterrupted run. A finished run is left as it is (its summary
is returned); a run of a constant learning rate continues to a larger
``steps`` and then equals a run of that many steps from scratch. One process
at a time writes a directory (:class:`~isometry.training.rundir.RunLockedError`
for a second). A non-finite loss, gradient or update stops the run at the
next check (every log or checkpoint step) with :class:`NonFiniteError` naming
the step; the metrics are kept and the last good state (the parameters before
the failed step, held in memory) is saved as a checkpoint at the last finite
step, as on Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from isometry import atomic
from isometry import data as _data
from isometry.training import rundir
from isometry.training.config import RunConfig, TrainConfig, model_config_dict
from isometry.training.evaluation import evaluate_state, on_device
from isometry.training.optim import clipping, optimizer, schedule
from isometry.training.probe import PROBE_FIELDS, monitor_probe
from isometry.training.step import NonFiniteError, init_state, jit_graphdefs, make_train_step

__all__ = ["TrainResult", "run", "train"]

_MEASURED = ("eval_loss", "eval_accuracy", *PROBE_FIELDS)
_SUMMARY_KEYS = ("eval_loss", "eval_accuracy", "loss", "accuracy", "step",
                 "jac_sv2_mean", "jac_sv2_var", "jac_sv2_max")  # fmt: skip


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained model (an ``nnx.Module`` at the final parameters).
        state: the final state pytree (see :func:`isometry.training.init_state`).
        records: the metric records of the whole run (as in ``metrics.jsonl``).
        summary: final evaluation, probe, status and timing.
    """

    model: nnx.Module
    state: dict
    records: list[dict]
    summary: dict


class _Batches:
    """Training batch indices by step, caching the current epoch's permutation."""

    def __init__(self, seed: int, n: int, batch_size: int):
        if batch_size > n:
            raise ValueError(f"batch_size must be <= the {n} training examples, got {batch_size}")
        self.seed, self.n, self.b = seed, n, batch_size
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, None

    def __call__(self, step: int) -> np.ndarray:
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, _data.epoch_permutation(self.seed, epoch, self.n)
        return self._perm[pos * self.b : (pos + 1) * self.b]


def _param_dtype(params):
    for leaf in jax.tree.leaves(params):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.dtype
    return jnp.result_type(float)


@functools.lru_cache(maxsize=8)
def _train_step(graphdef, config: TrainConfig, loss: str):
    """The jitted train step of a model structure, optimizer configuration and loss.

    Cached, so runs that differ only in their parameters, seed or initialization
    options (the seeds of a sweep point, the points of a sweep over ``sigma_w2``:
    ``graphdef`` is :func:`~isometry.training.step.jit_graphdefs`'s) share one jitted
    function: the second run neither traces nor loads the step again. ``config``
    with ``seed=0`` (the step does not depend on it).
    """
    tx, clip_tx = optimizer(config), clipping(config.clip, agc_eps=config.agc_eps)
    return make_train_step(graphdef, tx, clip_tx, schedule(config), loss=loss)


class _Run:
    """One training run's machinery (jitted functions, data on device, output files)."""

    def __init__(self, model, data, config: TrainConfig, out_dir, extra_config, final_ckpt=True):
        self.cfg, self.data, self.final_checkpoint = config, data, bool(final_ckpt)
        self.loss = "cross_entropy" if data.num_classes is not None else "mse"
        self.tx = optimizer(config)
        self.g_train, self.g_eval, self.state = init_state(model, self.tx)
        g_step, self.g_jit_eval = jit_graphdefs(model)  # shared across initializations
        self.step_fn = _train_step(g_step, dataclasses.replace(config, seed=0), self.loss)
        # inputs (and regression targets) in the parameters' float dtype
        dt = _param_dtype(self.state["params"])
        self.x, self.y = on_device(data.x_train, dt), on_device(data.y_train, dt)
        self.x_test, self.y_test = on_device(data.x_test, dt), on_device(data.y_test, dt)
        self.u_probe = self.x_test[: config.probe_inputs]
        self.probe = None
        if config.probe_every:
            self.probe = monitor_probe(self.g_eval, self.state, self.u_probe, config.seed)
        self.batches = _Batches(config.seed, data.x_train.shape[0], config.batch_size)
        self.out = None if out_dir is None else Path(out_dir)
        self.log = self.mngr = self.lock = self.extended_from = None
        self.records: list[dict] = []
        if self.out is not None:
            self.lock = rundir.lock_run(self.out)
            try:
                self._open(model, extra_config)
            except BaseException:
                self.close()
                raise

    def _open(self, model, extra_config) -> None:
        config_dict = {"train": self.cfg.to_dict(), "dataset": self.data.name}
        model_cfg = model_config_dict(getattr(model, "config", None))
        if model_cfg is not None:
            config_dict["model"] = model_cfg
        config_dict.update(extra_config or {})
        self.extended_from = rundir.prepare_dir(self.out, config_dict)
        self.log = rundir.MetricsLog(self.out / "metrics.jsonl")
        self.mngr = rundir.checkpoint_manager(self.out, self.cfg.keep_checkpoints)

    def close(self) -> None:
        """Close the checkpoint manager and release the directory's lock."""
        if self.mngr is not None:
            self.mngr.close()
        if self.lock is not None:
            self.lock.close()
        self.mngr = self.lock = None

    def resume(self) -> int:
        step, self.state, skipped, note = rundir.restore_checkpoint(self.mngr, self.state)
        for s, why in skipped:
            _say(f"skipped the checkpoint at step {s} in {self.out / 'checkpoints'}: {why}")
        if note is not None:
            _say(f"the checkpoint at step {step} in {self.out / 'checkpoints'}: {note}")
        if self.log is None:
            return step
        self.records = self.log.truncate(step if step > 0 else -1)
        if self.extended_from is not None:
            _say(f"extending the run in {self.out} from {self.extended_from} to "
                 f"{self.cfg.steps} steps")  # fmt: skip
            if step == self.extended_from and self.records and self.records[-1]["step"] == step:
                self._remeasure_last(step)
        if step == 0 and skipped:
            _say(f"no intact checkpoint in {self.out}; starting again from step 0")
        return step

    def _remeasure_last(self, step: int) -> None:
        """The old final record of an extended run, as a run of the new length logs it."""
        rec = {k: v for k, v in self.records.pop().items() if k not in _MEASURED}
        if step % self.cfg.log_every == 0:
            self.records.append(rundir.plain(self.measure(step, rec)))
        self.log.truncate(-1)
        self.log.append(self.records)

    def measure(self, step: int, record: dict) -> dict:
        """Add evaluation and Jacobian-probe results due at ``step`` to ``record``."""
        cfg, s = self.cfg, self.state
        final = step == cfg.steps
        if step == 0 or final or (cfg.eval_every and step % cfg.eval_every == 0):
            states = (s["params"], s["batch_stats"], s["rest"])
            b = min(cfg.eval_batch_size, self.x_test.shape[0])
            ev = evaluate_state(self.g_jit_eval, states, self.x_test, self.y_test,
                                loss=self.loss, batch_size=b)  # fmt: skip
            record["eval_loss"] = ev["loss"]
            if self.loss == "cross_entropy":
                record["eval_accuracy"] = ev["accuracy"]
        probe_due = cfg.probe_every and (step % cfg.probe_every == 0 or final)
        if self.probe is not None and probe_due:
            record.update(self.probe(s["params"], s["batch_stats"], s["rest"], step))
        return record

    def write(self, records: list[dict]) -> None:
        records = [rundir.plain(r) for r in records]
        self.records.extend(records)
        if self.log is not None:
            self.log.append(records)

    def save_last_good(self, step: int) -> int:
        """Checkpoint the state in memory, the last good one; returns its step.

        After a non-finite step (``bad_step >= 0``) the state is the one
        before that step (the guard froze it), saved at step ``bad_step``
        with the flag cleared; otherwise it is the state after ``step``.
        """
        bad = int(self.state["bad_step"])
        if bad < 0:
            rundir.save_checkpoint(self.mngr, step, self.state)
            return step
        if bad > 0:
            rundir.save_checkpoint(self.mngr, bad, {**self.state, "bad_step": jnp.int32(-1)})
        return bad

    def check_finite(self, last_good: int) -> None:
        bad = int(self.state["bad_step"])
        if bad < 0:
            return
        where = ""
        if self.out is not None:
            self.save_last_good(bad)
            ckpt = self.mngr.latest_step()
            where = (
                f"; last good checkpoint: step {ckpt}" if ckpt is not None else "; no checkpoint"
            ) + f"; metrics kept in {self.log.path}"
            self.summary("non_finite", failed_step=bad + 1, last_logged_step=last_good,
                         last_good_checkpoint=ckpt)  # fmt: skip
        raise NonFiniteError(
            f"training stopped: non-finite loss or gradient at step {bad + 1} "
            f"(the parameters are kept at their values before that step){where}",
            bad + 1,
        )

    def summary(self, status: str, **extra) -> dict:
        last = {}
        for r in self.records:
            last.update(r)
        summ = {"status": status, "steps": self.cfg.steps, **extra}
        for k in _SUMMARY_KEYS:
            if k in last:
                summ[k if k != "step" else "last_step"] = last[k]
        if self.out is not None:
            atomic.write_json(self.out / "summary.json", rundir.plain(summ))
        return summ


def _say(message: str) -> None:
    print(f"[train] {message}", file=sys.stderr, flush=True)


def _train_record(step: int, metrics) -> dict:
    m = jax.device_get(metrics)
    rec = {"step": step}
    for k, v in m.items():
        rec[k] = np.asarray(v).tolist()
    return rec


def train(
    model: nnx.Module,
    data: _data.Dataset,
    config: TrainConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    progress: bool = False,
    extra_config: dict | None = None,
    stop_after: int | None = None,
    final_checkpoint: bool = True,
) -> TrainResult:
    """Train ``model`` on ``data`` (see the module docstring); resume if ``out_dir`` has a run.

    Args:
        model: an ``nnx.Module`` mapping ``(B, *in)`` to logits ``(B, classes)``
            (or outputs for a regression dataset); trained in place.
        data: a :class:`isometry.data.Dataset`.
        config: a :class:`TrainConfig`.
        out_dir: output directory (config, metrics, summary, checkpoints);
            ``None`` keeps everything in memory.
        progress: show a progress bar (tqdm) with the running loss.
        extra_config: more entries for ``config.json`` (e.g. dataset options).
        stop_after: for tests: return right after this many steps without a
            final checkpoint or summary, like a killed run.
        final_checkpoint: save a checkpoint after the last step (the default).
            ``False`` for scratch runs whose directory is removed once the
            result is recorded: an interrupted run then resumes from its last
            periodic checkpoint (or step 0) and replays to the same result.

    Returns:
        A :class:`TrainResult`.

    Raises:
        NonFiniteError: the loss or a gradient became NaN/Inf (names the step).
        ValueError: ``out_dir`` holds a run with a different configuration.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    _check_model_data(model, data)
    r = _Run(model, data, config, out_dir, extra_config, final_checkpoint)
    try:
        return _loop(r, model, config, progress, stop_after)
    finally:  # the model holds the last (good) state, also after an error
        r.close()
        final = nnx.merge(r.g_train, r.state["params"], r.state["batch_stats"], r.state["rest"])
        nnx.update(model, nnx.state(final))


def _check_model_data(model, data) -> None:
    """The model takes the data's inputs and its outputs fit the labels (classes or targets)."""
    if not isinstance(data, _data.Dataset):
        raise TypeError(f"data must be an isometry.data.Dataset, got {type(data).__name__}")
    graphdef, state = nnx.split(model)
    x = data.x_train[:1]
    try:
        out = jax.eval_shape(lambda s, u: nnx.merge(graphdef, s)(u), state, x)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"the model does not take the data's inputs {x.shape[1:]}: {err}"
        ) from None
    if data.num_classes is None:
        if out.shape[1:] != data.y_train.shape[1:]:
            raise ValueError(f"the model's outputs {out.shape[1:]} do not match the regression "
                             f"targets {data.y_train.shape[1:]} of {data.name!r}")  # fmt: skip
        return
    k = out.shape[-1]
    for split, y in (("y_train", data.y_train), ("y_test", data.y_test)):
        lo, hi = (int(np.min(y)), int(np.max(y))) if y.size else (0, 0)
        if lo < 0 or hi >= k:
            raise ValueError(
                f"{split} of {data.name!r} has labels in [{lo}, {hi}], outside the model's "
                f"{k} output classes [0, {k - 1}] (set the model's out_dim to the class count)"
            )


def _steps(r: _Run, config: TrainConfig, start: int, end: int, bar) -> int:
    """Run steps ``start + 1 .. end`` (log, check, checkpoint); the last step logged.

    On Ctrl-C the state in memory is saved when it is consistent with the
    metrics on disk: the interrupted update was not applied, or its step
    logs nothing (else the newest checkpoint stays the one to resume from).
    """
    last_logged = updated = complete = start
    try:
        for step in range(start + 1, end + 1):
            idx = r.batches(step - 1)
            logging = step % config.log_every == 0 or step == config.steps
            r.state, metrics = r.step_fn(r.state, r.x, r.y, idx, jnp.int32(step - 1), logging)
            updated = step
            if logging or step % config.checkpoint_every == 0:
                r.check_finite(last_logged)
            if logging:
                rec = r.measure(step, _train_record(step, metrics))
                r.write([rec])
                last_logged = step
                bar.set_postfix(loss=f"{rec['loss']:.4g}", refresh=False)
            last = step == config.steps and r.final_checkpoint
            if r.mngr is not None and (step % config.checkpoint_every == 0 or last):
                rundir.save_checkpoint(r.mngr, step, r.state)
            bar.update(1)
            complete = step
    except KeyboardInterrupt:
        logs = updated % config.log_every == 0 or updated == config.steps
        if r.mngr is not None and (updated == complete or not logs):
            r.log.truncate(r.save_last_good(updated))
        raise
    finally:
        bar.close()
    return last_logged


def _finished(r: _Run, start: int) -> dict | None:
    """The summary of a run already completed at ``start`` steps (left as it is), else ``None``."""
    path = None if r.out is None else r.out / "summary.json"
    if start != r.cfg.steps or path is None or not path.exists():
        return None
    summ = rundir.read_json(path, "run summary")
    if summ.get("status") != "completed" or summ.get("last_step") != start:
        return None
    _say(f"the run in {r.out} is complete ({start} steps); nothing to do")
    return summ


def _loop(r: _Run, model, config: TrainConfig, progress: bool, stop_after) -> TrainResult:
    start = r.resume()
    done = _finished(r, start)
    if done is not None:
        return TrainResult(model, r.state, r.records, done)
    if start > 0:
        _say(f"resuming from step {start} of {config.steps} in {r.out}")
    t0 = time.perf_counter()
    if start == 0:
        r.write([r.measure(0, {"step": 0})])
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    last_logged = _steps(r, config, start, end, _progress(progress, config.steps, start))
    r.check_finite(last_logged)
    elapsed = time.perf_counter() - t0
    status = "completed" if end == config.steps else "stopped"
    timing = {"wall_time_s": elapsed, "steps_per_second": (end - start) / max(elapsed, 1e-9)}
    summ = (
        r.summary(status, **(timing if end > start else {}))
        if status == "completed"
        else {"status": status, "step": end}
    )
    return TrainResult(model, r.state, r.records, summ)


def _progress(enabled: bool, total: int, initial: int):
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, initial=initial, desc="train", mininterval=1.0)
        except ImportError:  # pragma: no cover
            pass
    return _NoBar()


class _NoBar:
    def set_postfix(self, *a, **k):
        pass

    def update(self, n=1):
        pass

    def close(self):
        pass


def run(
    config: RunConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    progress: bool = False,
    stop_after: int | None = None,
) -> TrainResult:
    """Load the data, build the MLP (seeded by ``config.train.seed``) and :func:`train` it."""
    ds = config.load_data()
    model = config.build_model(ds)
    d = config.to_dict()
    extra = {"dataset": d["dataset"], "data_dir": d["data_dir"], "data_options": d["data_options"]}
    return train(
        model, ds, config.train, out_dir, progress=progress, extra_config=extra,
        stop_after=stop_after,
    )  # fmt: skip
