"""Damaged runs recover: checkpoints, NaN stops, locks, finished and extended runs, sweep stores.

Every damage below is one a crash, a full disk or a stray process leaves; each
test asserts recovery to the result of an undamaged run (bitwise) and a
message naming what was skipped. The training runs share one tiny program (a
depth-1, width-8 MLP, constant learning rate) compiled once through the
project's compilation cache (a Gaussian init given by its variances: no
critical-point solve or QR to compile), so the module adds a few seconds to the suite.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from isometry import atomic, cli, data, networks, sweep, training
from isometry.experiments import harness
from isometry.training import rundir

STEPS = 8
CFG = training.TrainConfig(
    steps=STEPS, batch_size=8, learning_rate=0.05, log_every=2, eval_every=0, probe_every=0,
    checkpoint_every=1, keep_checkpoints=STEPS, eval_batch_size=512,
)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _one_compile():
    """Identical programs of the module's runs compile once (the project's compilation cache)."""
    with harness.compile_cache():
        yield


@pytest.fixture(scope="module")
def digits():
    return data.load_digits()


def _mlp():
    cfg = networks.MLPConfig(depth=1, width=8, in_dim=64, out_dim=10, activation="tanh",
                             init="gaussian", sigma_w2=1.0, sigma_b2=0.0)  # fmt: skip
    return networks.MLP(cfg, rngs=nnx.Rngs(0))


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


@pytest.fixture(scope="module")
def reference(digits):
    """The undamaged, uninterrupted run of ``STEPS`` steps (in memory)."""
    return training.train(_mlp(), digits, CFG)


def _assert_same_run(result, ref, out):
    """Bitwise the final state, the metrics and the summary's numbers of the reference run."""
    for a, b in zip(_leaves(ref.state), _leaves(result.state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert training.MetricsLog(out / "metrics.jsonl").read() == ref.records
    summary = json.loads((out / "summary.json").read_text())
    for k in ("eval_loss", "eval_accuracy", "loss", "last_step"):
        assert summary[k] == ref.summary[k]


# --------------------------------------------------------------------------- #
# Checkpoints: each way of damaging one, verified and skipped.
# --------------------------------------------------------------------------- #


def _data_file(step_dir):
    """The OCDBT data file the checkpoint's root manifest points to."""
    return max((step_dir / "default" / "d").iterdir(), key=lambda p: p.stat().st_size)


def _truncate(step_dir):
    f = _data_file(step_dir)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _overwrite(step_dir):
    f = _data_file(step_dir)
    raw = bytearray(f.read_bytes())
    raw[-8:] = bytes(255 - b for b in raw[-8:])  # same size, different bytes
    f.write_bytes(bytes(raw))


def _empty(step_dir):
    shutil.rmtree(step_dir)
    step_dir.mkdir()


# damage -> what the skip message says
DAMAGE = {
    _truncate: r"fails its checksum \(changed \(truncated or overwritten\): default/d/",
    lambda d: (d / "default" / "manifest.ocdbt").unlink(): r"missing: default/manifest\.ocdbt",
    lambda d: (d / "default" / "_METADATA").unlink(): r"missing: default/_METADATA",
    _empty: r"its step directory is empty",
    _overwrite: r"fails its checksum \(changed \(truncated or overwritten\): default/d/",
}


def _no_checksum(step_dir):
    (step_dir.parent / f"{step_dir.name}.sha256.json").unlink()


def test_resume_falls_back_past_damaged_checkpoints(digits, reference, tmp_path, capsys):
    """A killed run whose five newest checkpoints are damaged five ways (truncated data file,
    manifest or _METADATA deleted, empty step directory, bytes overwritten) resumes from the
    newest usable one (step 2, whose checksum file is missing: restored whole and finite,
    with a note), names each skipped step and why, and ends bitwise as the uninterrupted
    run."""
    out = tmp_path / "run"
    training.train(_mlp(), digits, CFG, out, stop_after=7)
    ckpts = out / "checkpoints"
    for step, damage in zip(range(7, 2, -1), DAMAGE, strict=True):
        damage(ckpts / str(step))
    _no_checksum(ckpts / "2")
    capsys.readouterr()
    resumed = training.train(_mlp(), digits, CFG, out)
    lines = capsys.readouterr().err.splitlines()
    for step, reason in zip(range(7, 2, -1), DAMAGE.values(), strict=True):
        head = f"[train] skipped the checkpoint at step {step} in {ckpts}: "
        (line,) = [x for x in lines if x.startswith(head)]
        assert re.search(reason, line), line
    assert (
        f"[train] the checkpoint at step 2 in {ckpts}: it has no checksum file 2.sha256.json, "
        "but orbax restored it whole and finite (not verified)"
    ) in lines
    assert f"[train] resuming from step 2 of {STEPS} in {out}" in lines
    assert resumed.summary["status"] == "completed"
    _assert_same_run(resumed, reference, out)
    assert all(rundir.verify_checkpoint(_manager(out), s) is None for s in range(3, STEPS + 1))


def _manager(out):
    return rundir.checkpoint_manager(out, keep=STEPS)


def test_checkpoint_that_orbax_cannot_restore_is_skipped(tmp_path):
    """Damage the checksum cannot see (taken after it), and a checkpoint without a checksum:
    orbax's restore error skips both.

    Orbax itself restores silently with ``_METADATA`` deleted or a data file
    emptied; only its root manifest's absence makes it fail, the damage used here.
    """
    states = {s: {"w": jnp.arange(6.0) * s, "n": jnp.asarray(s, jnp.int32)} for s in (1, 2, 3)}
    mngr = rundir.checkpoint_manager(tmp_path, keep=3)
    for s, st in states.items():
        rundir.save_checkpoint(mngr, s, st)
    ckpts = tmp_path / "checkpoints"
    for s in (2, 3):
        (ckpts / str(s) / "default" / "manifest.ocdbt").unlink()
    digests = {"step": 2, "sha256": atomic.tree_digests(ckpts / "2")}
    atomic.write_json(ckpts / "2.sha256.json", digests)
    _no_checksum(ckpts / "3")
    assert rundir.verify_checkpoint(mngr, 2) is None
    step, restored, skipped, note = rundir.restore_checkpoint(mngr, states[3])
    assert step == 1 and note is None and [s for s, _ in skipped] == [3, 2]
    assert skipped[0][1].startswith("it has no checksum file 3.sha256.json; orbax could not")
    assert skipped[1][1].startswith("orbax could not restore it (ValueError: ")
    for a, b in zip(_leaves(states[1]), _leaves(restored), strict=True):
        np.testing.assert_array_equal(a, b)
    # the damaged steps are gone, so a replay saves fresh ones in their place
    assert mngr.all_steps() == [1] and not (ckpts / "2").exists()
    rundir.save_checkpoint(mngr, 2, states[2])
    assert rundir.verify_checkpoint(mngr, 2) is None
    mngr.close()


# --------------------------------------------------------------------------- #
# A diverging run keeps its last good state; one writer per directory.
# --------------------------------------------------------------------------- #


def test_nan_stop_saves_the_last_good_state(digits, tmp_path):
    """An Inf input in the batch of update 3 makes that update non-finite; with checkpoints
    every 500 steps the state before it (held in memory) is still saved when the run stops,
    at step 2, the last finite one, and restores to the model's finite parameters."""
    x = digits.x_train.copy()
    x[data.batch_indices(CFG.seed, 2, x.shape[0], CFG.batch_size)[0]] = np.inf
    cfg = dataclasses.replace(CFG, checkpoint_every=500)
    model = _mlp()
    with pytest.raises(training.NonFiniteError, match=r"last good checkpoint: step 2;"):
        training.train(model, dataclasses.replace(digits, x_train=x), cfg, tmp_path)
    mngr = rundir.checkpoint_manager(tmp_path, keep=2)
    assert mngr.all_steps() == [2]
    state = training.init_state(_mlp(), training.optimizer(cfg))[2]
    step, restored, skipped, note = rundir.restore_checkpoint(mngr, state)
    mngr.close()
    assert step == 2 and skipped == [] and note is None and int(restored["bad_step"]) == -1
    params = nnx.split(model, nnx.Param, ...)[1]
    for a, b in zip(_leaves(params), _leaves(restored["params"]), strict=True):
        assert np.all(np.isfinite(b))
        np.testing.assert_array_equal(a, b)
    # the same two updates of the undamaged data give the same state
    two = training.train(_mlp(), digits, dataclasses.replace(CFG, steps=2))
    for a, b in zip(_leaves(two.state), _leaves(restored), strict=True):
        np.testing.assert_array_equal(a, b)
    records = training.MetricsLog(tmp_path / "metrics.jsonl").read()
    assert [r["step"] for r in records] == [0, 2]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "non_finite" and summary["failed_step"] == 3
    assert summary["last_good_checkpoint"] == 2


def _interrupt_batches(orig):
    def batches(self, step):
        if step == 4:  # Ctrl-C before update 5
            raise KeyboardInterrupt
        return orig(self, step)

    return "_Batches", "__call__", batches


def _interrupt_measure(orig):
    def measure(self, step, record):
        if step == 4:  # Ctrl-C after update 4, before its record is written
            raise KeyboardInterrupt
        return orig(self, step, record)

    return "_Run", "measure", measure


# the default case interrupts after an update (Ctrl-C lands while waiting for results); the
# slow one before an update, the same claim under the other timing
@pytest.mark.parametrize(
    "where", [pytest.param(_interrupt_batches, marks=pytest.mark.slow), _interrupt_measure]
)
def test_ctrl_c_saves_a_consistent_state(digits, reference, tmp_path, monkeypatch, where):
    """Ctrl-C saves the state in memory under the number of updates it holds, and only when
    the metrics on disk match it; the resumed run ends bitwise as the uninterrupted one."""
    from isometry.training import loop

    cls, name, _ = where(None)
    orig = getattr(getattr(loop, cls), name)
    monkeypatch.setattr(getattr(loop, cls), name, where(orig)[2])
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        training.train(_mlp(), digits, dataclasses.replace(CFG, checkpoint_every=500), out)
    monkeypatch.undo()
    saved = _manager(out).all_steps()
    assert saved == ([4] if where is _interrupt_batches else [])
    resumed = training.train(_mlp(), digits, dataclasses.replace(CFG, checkpoint_every=500), out)
    _assert_same_run(resumed, reference, out)


_HOLD_LOCK = textwrap.dedent("""
    import fcntl, sys, time
    f = open(sys.argv[1], "a+")
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.write("4242\\n"); f.flush()
    print("locked", flush=True)
    time.sleep(60)
""")


def test_second_writer_is_refused_and_a_dead_holder_releases(digits, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out / ".lock")],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(training.RunLockedError, match=rf"{out} is in use .*pid 4242"):
            training.train(_mlp(), digits, CFG, out)
        assert not (out / "metrics.jsonl").exists() and not (out / "config.json").exists()
        argv = ["train", "--depth", "1", "--width", "8", "--steps", "2", "--no-progress"]
        assert cli.main([*argv, "--out", str(out)]) == 2
        assert f"{out} is in use by another training process" in capsys.readouterr().err
    finally:
        holder.kill()  # a crash: the OS releases the lock
        holder.wait()
    rundir.lock_run(out).close()


# --------------------------------------------------------------------------- #
# Finished runs are left alone; a constant-rate run extends to more steps.
# --------------------------------------------------------------------------- #


def test_finished_run_is_left_and_can_be_extended(digits, reference, tmp_path, capsys):
    out = tmp_path / "run"
    short = dataclasses.replace(CFG, steps=4, checkpoint_every=2)
    first = training.train(_mlp(), digits, short, out)
    summary = (out / "summary.json").read_bytes()
    capsys.readouterr()
    again = training.train(_mlp(), digits, short, out)
    assert f"the run in {out} is complete (4 steps); nothing to do" in capsys.readouterr().err
    assert (out / "summary.json").read_bytes() == summary  # throughput kept
    assert again.summary == json.loads(summary) and again.summary["steps_per_second"] > 0
    for a, b in zip(_leaves(first.state), _leaves(again.state), strict=True):
        np.testing.assert_array_equal(a, b)
    # 4 -> 8 steps: only the step count changed, the learning rate is constant
    longer = training.train(_mlp(), digits, dataclasses.replace(CFG, checkpoint_every=2), out)
    err = capsys.readouterr().err
    assert f"extending the run in {out} from 4 to {STEPS} steps" in err
    assert f"resuming from step 4 of {STEPS}" in err
    _assert_same_run(longer, reference, out)
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == STEPS


def test_run_without_final_checkpoint_replays_from_the_last_periodic_one(
    digits, reference, tmp_path, capsys
):
    """``final_checkpoint=False`` (the harness's scratch runs) saves only the periodic
    checkpoints; run again, it resumes from the last one and replays to the same result."""
    out = tmp_path / "run"
    cfg = dataclasses.replace(CFG, checkpoint_every=3)
    training.train(_mlp(), digits, cfg, out, final_checkpoint=False)
    assert rundir.checkpoint_manager(out, STEPS).all_steps() == [3, 6]
    capsys.readouterr()
    again = training.train(_mlp(), digits, cfg, out, final_checkpoint=False)
    assert f"resuming from step 6 of {STEPS}" in capsys.readouterr().err
    _assert_same_run(again, reference, out)


def test_config_changes_that_cannot_continue_a_run(tmp_path):
    base = {"train": {**CFG.to_dict(), "steps": 300}, "dataset": "digits"}
    rundir.prepare_dir(tmp_path, base)
    more = {**base, "train": {**base["train"], "steps": 400}}
    for train, match in (
        ({"steps": 200}, "has 300 steps; a run cannot be shortened to 200"),
        ({"steps": 400, "schedule": "cosine"}, "differs in: train.schedule, train.steps"),
        ({"learning_rate": 0.5}, r"differs in: train.learning_rate"),
    ):
        with pytest.raises(ValueError, match=rf"{tmp_path} holds a run with a different config"
                           rf" \(it {match}"):  # fmt: skip
            rundir.prepare_dir(tmp_path, {**base, "train": {**base["train"], **train}})
    cosine = {**base, "train": {**base["train"], "schedule": "cosine"}}
    rundir.prepare_dir(tmp_path / "c", cosine)
    with pytest.raises(ValueError, match="'cosine' schedule decays over all steps"):
        rundir.prepare_dir(tmp_path / "c", {**cosine, "train": {**cosine["train"], "steps": 400}})
    assert rundir.prepare_dir(tmp_path, more) == 300
    (tmp_path / "config.json").write_text('{"train": ')
    with pytest.raises(ValueError, match=rf"{tmp_path / 'config.json'} is not a readable"):
        rundir.prepare_dir(tmp_path, more)


def test_metrics_log_names_a_damaged_line(tmp_path):
    log = training.MetricsLog(tmp_path / "metrics.jsonl")
    log.append([{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}])
    with open(log.path, "a") as f:
        f.write('{"step": 2, "lo')  # a torn last line: dropped
    assert [r["step"] for r in log.read()] == [0, 1]
    log.path.write_text('{"step": 0}\n#garbage\n{"step": 2}\n')
    with pytest.raises(ValueError, match=rf"{log.path} line 2 is not a metrics record"):
        log.read()


# --------------------------------------------------------------------------- #
# Sweep stores: damaged points are recomputed, damaged files named.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class _Cfg:
    n: int = 3


def _points(store, calls):
    def fn(p):
        calls.append(p["k"])
        return {"rows": {"y": p["k"] ** 2}, "arrays": {"a": np.arange(4.0) * p["k"]}}

    return sweep.run_partitioned(store, sweep.product(k=[1, 2, 3]), fn, progress=False)


def _overwrite_npz(path):
    raw = bytearray(path.read_bytes())
    raw[60:68] = b"\x00" * 8
    path.write_bytes(bytes(raw))


STORE_DAMAGE = {
    "truncated .npz": (".npz", lambda p: p.write_bytes(p.read_bytes()[:40]), "fails its checksum"),
    "overwritten .npz": (".npz", _overwrite_npz, "fails its checksum"),
    "corrupt .json": (".json", lambda p: p.write_text(p.read_text()[:25]), "not a readable point"),
    "altered .json": (
        ".json",
        lambda p: p.write_text(p.read_text().replace('"y": 4', '"y": 5')),
        "fails its checksum (its content was changed)",
    ),
}


@pytest.mark.parametrize("damage", list(STORE_DAMAGE))
def test_store_recomputes_a_damaged_point(tmp_path, capsys, damage):
    suffix, damage_fn, reason = STORE_DAMAGE[damage]
    ref_calls, calls = [], []
    ref = _points(sweep.Store(tmp_path / "ref", "sq", _Cfg()), ref_calls)
    store = sweep.Store(tmp_path / "s", "sq", _Cfg())
    _points(store, calls)
    path = store.path({"k": 2}, suffix)
    damage_fn(path)
    with pytest.raises(ValueError, match=rf"{path}"):
        store.arrays({"k": 2}) if suffix == ".npz" else store.read({"k": 2})
    capsys.readouterr()
    calls.clear()
    csv = _points(sweep.Store(tmp_path / "s", "sq", _Cfg()), calls)
    assert calls == [2]  # only the damaged point
    err = capsys.readouterr().err
    assert f"[sq] {path} " in err and reason in err and "computing that point again" in err
    assert csv.read_text() == ref.read_text()
    np.testing.assert_array_equal(store.arrays({"k": 2})["a"], np.arange(4.0) * 2)


def test_store_without_checksums_verifies_by_loading(tmp_path, capsys):
    """A store written before checksums: a truncated .npz is caught by loading it whole."""
    calls = []
    store = sweep.Store(tmp_path / "s", "sq", _Cfg())
    _points(store, calls)
    for k in (1, 2, 3):  # the old format: no checksums in the records
        p = store.path({"k": k})
        rec = json.loads(p.read_text())
        p.write_text(json.dumps({key: rec[key] for key in ("point", "rows", "elapsed_s")}))
    assert store.pending(sweep.product(k=[1, 2, 3]).points()) == []
    npz = store.path({"k": 3}, ".npz")
    npz.write_bytes(npz.read_bytes()[:50])
    calls.clear()
    _points(store, calls)
    assert calls == [3] and f"{npz} does not load" in capsys.readouterr().err


def test_load_table_names_a_damaged_csv(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("a,b\n1,2\n3\n")
    with pytest.raises(ValueError, match=rf"{path} line 3 has 1 fields, its header 2"):
        sweep.load_table(path)
    path.write_bytes(b"a,b\n\xff\xfe,1\n")
    with pytest.raises(ValueError, match=rf"{path} is not a readable table"):
        sweep.load_table(path)


@pytest.mark.slow
def test_two_train_commands_on_one_directory(tmp_path):
    """Two ``isometry train`` processes started together on one directory: one trains, the
    other is refused naming the directory (or, if it arrives after the first has finished,
    finds the run complete); ``metrics.jsonl`` holds every logged step once."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "isometry.cli", "train", "--depth", "2", "--width", "32",
            "--steps", "400", "--log-every", "10", "--checkpoint-every", "50", "--no-progress",
            "--out", str(out)]  # fmt: skip
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes in ([0, 0], [0, 2]), results
    if codes == [0, 2]:
        (err,) = [e for rc, e in results if rc == 2]
        assert f"{out} is in use by another training process" in err
    else:
        assert any("is complete (400 steps); nothing to do" in e for _, e in results)
    steps = [r["step"] for r in training.MetricsLog(out / "metrics.jsonl").read()]
    assert steps == [0, *range(10, 401, 10)]


def test_read_idx_names_a_damaged_file(tmp_path):
    import gzip

    good = b"\x00\x00\x08\x02" + np.asarray([2, 3], ">u4").tobytes() + bytes(range(6))
    path = tmp_path / "x-idx2-ubyte.gz"
    path.write_bytes(gzip.compress(good))
    np.testing.assert_array_equal(data.read_idx(path), np.arange(6).reshape(2, 3))
    for damaged, match in ((gzip.compress(good)[:-12], "is not a readable IDX file"),
                           (good[:6], "header of 2 dimensions is cut short"),
                           (good[:-1], r"header says shape \(2, 3\)")):  # fmt: skip
        path.write_bytes(gzip.compress(damaged) if match.startswith("header") else damaged)
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + match):
            data.read_idx(path)
