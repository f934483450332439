"""Tests of isometry.training: optimization, clipping, metrics, resume, non-finite stops."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from param_models import IN_DIM, OUT_DIM, PlainTransformer

from isometry import cli, data, networks, training


@pytest.fixture(scope="module")
def digits():
    return data.load_digits()


def _mlp(depth=2, width=32, **kw):
    kw.setdefault("activation", "tanh")
    kw.setdefault("init", "orthogonal")
    if "sigma_w2" not in kw:
        kw.setdefault("q_star", 0.25)
    cfg = networks.MLPConfig(depth=depth, width=width, in_dim=64, out_dim=10, **kw)
    return networks.MLP(cfg, rngs=nnx.Rngs(0))


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


# --------------------------------------------------------------------------- #
# Accuracy on the embedded dataset.
# --------------------------------------------------------------------------- #


def test_small_mlp_reaches_90_percent_on_digits(digits):
    """A depth-4, width-64 critical tanh MLP reaches >= 90% held-out accuracy in 300 SGD steps."""
    cfg = training.TrainConfig(
        steps=300, batch_size=64, learning_rate=0.05, clip="global_norm:1.0", log_every=50,
        eval_every=300, probe_every=0, seed=0,
    )  # fmt: skip
    result = training.train(_mlp(depth=4, width=64), digits, cfg)
    assert result.summary["status"] == "completed"
    assert result.summary["eval_accuracy"] >= 0.90
    assert result.records[0]["eval_accuracy"] < 0.3  # untrained: near chance


# --------------------------------------------------------------------------- #
# The exploding regime: gradient clipping makes the difference.
# --------------------------------------------------------------------------- #


def _exploding(clip):
    """Deep ReLU at sigma_w2 = 3 (chi1 = 1.5 per layer: gradients grow ~1.5^16 ~ 650x)."""
    model = _mlp(depth=16, width=64, activation="relu", init="gaussian", sigma_w2=3.0)
    cfg = training.TrainConfig(
        steps=200, batch_size=64, learning_rate=0.1, clip=clip, log_every=10, eval_every=200,
        probe_every=0, checkpoint_every=1,
    )  # fmt: skip
    return model, cfg


def test_exploding_without_clipping_stops_cleanly(digits, tmp_path):
    model, cfg = _exploding("none")
    with pytest.raises(training.NonFiniteError, match=r"non-finite .* at step \d+") as info:
        training.train(model, digits, cfg, tmp_path)
    bad = info.value.step
    assert 1 <= bad < cfg.steps
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "non_finite" and summary["failed_step"] == bad
    # the last good checkpoint (one per step here) is the step before the failure
    ckpts = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts and ckpts[-1] == bad - 1
    # metrics were kept and every logged value is finite; the state is finite too
    records = training.MetricsLog(tmp_path / "metrics.jsonl").read()
    assert records[0]["step"] == 0
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    assert all(np.all(np.isfinite(x)) for x in _leaves(nnx.state(model, nnx.Param)))


def test_exploding_with_global_norm_clipping_trains(digits):
    model, cfg = _exploding("global_norm:1.0")
    result = training.train(model, digits, cfg)
    losses = [r["loss"] for r in result.records if "loss" in r]
    assert np.all(np.isfinite(losses))
    assert all(r["clipped"] for r in result.records[1:4])  # early gradients are clipped
    assert result.records[1]["grad_norm"] > 10.0
    assert np.mean(losses[-5:]) < np.mean(losses[:2]) / 2
    assert result.summary["eval_accuracy"] > 0.5  # chance is 0.1


# --------------------------------------------------------------------------- #
# Resume.
# --------------------------------------------------------------------------- #


def test_resume_equals_uninterrupted(digits, tmp_path):
    cfg = training.TrainConfig(
        steps=40, batch_size=32, optimizer="adam", learning_rate=1e-3, schedule="cosine",
        warmup_steps=5, clip="global_norm:1.0", log_every=5, eval_every=10, probe_every=10,
        probe_inputs=2, checkpoint_every=10,
    )  # fmt: skip
    full = training.train(_mlp(), digits, cfg, tmp_path / "full")
    # a killed run: stops after 25 steps, its last checkpoint is at step 20
    part = training.train(_mlp(), digits, cfg, tmp_path / "part", stop_after=25)
    assert part.summary["status"] == "stopped"
    log = training.MetricsLog(tmp_path / "part" / "metrics.jsonl")
    assert log.read()[-1]["step"] == 25
    with open(log.path, "a") as f:
        f.write('{"step": 26, "loss": ')  # a torn write
    resumed = training.train(_mlp(depth=2, width=32), digits, cfg, tmp_path / "part")
    assert resumed.summary["status"] == "completed"
    for a, b in zip(_leaves(full.state), _leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(a, b)
    full_recs = training.MetricsLog(tmp_path / "full" / "metrics.jsonl").read()
    assert log.read() == full_recs
    assert [r["step"] for r in full_recs] == [0, *range(5, 41, 5)]
    s_full = json.loads((tmp_path / "full" / "summary.json").read_text())
    s_res = json.loads((tmp_path / "part" / "summary.json").read_text())
    for k in ("eval_loss", "eval_accuracy", "jac_sv2_mean", "jac_sv2_max"):
        assert s_full[k] == s_res[k]
    # the directory refuses a different configuration
    other = training.TrainConfig(**{**cfg.to_dict(), "learning_rate": 0.5})
    with pytest.raises(ValueError, match=r"different config.*learning_rate"):
        training.train(_mlp(), digits, other, tmp_path / "full")


# --------------------------------------------------------------------------- #
# Metrics, clipping, optimizers.
# --------------------------------------------------------------------------- #


def test_logged_metrics_are_consistent(digits):
    cfg = training.TrainConfig(
        steps=6, batch_size=32, learning_rate=0.1, clip="global_norm:0.05", log_every=1,
        eval_every=3, probe_every=3, probe_inputs=3,
    )  # fmt: skip
    res = training.train(_mlp(depth=3, width=64), digits, cfg)
    recs = res.records
    assert [r["step"] for r in recs] == list(range(7))
    for r in recs[1:]:
        layers = np.asarray(r["grad_norm_layers"])
        assert layers.shape == (3,)
        total = np.sqrt(np.sum(layers**2) + r["grad_norm_input"] ** 2 + r["grad_norm_output"] ** 2)
        np.testing.assert_allclose(total, r["grad_norm"], rtol=1e-5)
        np.testing.assert_allclose(r["grad_norm_clipped"], min(r["grad_norm"], 0.05), rtol=1e-5)
        assert r["clipped"] == (r["grad_norm"] > 0.05)
        np.testing.assert_allclose(r["clip_ratio"], r["grad_norm_clipped"] / r["grad_norm"])
        assert r["lr"] == pytest.approx(0.1)
    assert {"eval_loss", "eval_accuracy", "jac_sv2_mean"} <= set(recs[3])
    assert "eval_loss" not in recs[2] and "jac_sv2_mean" not in recs[2]


def test_monitor_probe_matches_dense_jacobian():
    """The training probe (the monitor at the last layer) against the dense ``J = dx^L/dx^0``:
    at width 16 its probes are the unit vectors and its Lanczos steps reach the width, so the
    mean, the variance and the largest ``s^2`` are exact."""
    model = _mlp(depth=3, width=16)
    _, g_eval, state = training.init_state(model, optax.sgd(0.1))
    u = jax.random.normal(jax.random.key(1), (2, 64))
    run = training.monitor_probe(g_eval, state, u, seed=0)
    probe = run(state["params"], state["batch_stats"], state["rest"], 0)
    s = model.stack()
    lams = []
    for x0 in s.input_map(u):
        J = jax.jacfwd(s.hidden)(x0)
        lams.append(np.linalg.svd(np.asarray(J, np.float64), compute_uv=False) ** 2)
    lams = np.stack(lams)
    np.testing.assert_allclose(probe["jac_sv2_mean"], lams.mean(1).mean(), rtol=1e-4)
    np.testing.assert_allclose(probe["jac_sv2_var"], lams.var(1).mean(), rtol=1e-3)
    np.testing.assert_allclose(probe["jac_sv2_max"], lams.max(), rtol=1e-4)
    assert len(probe["block_mean_sq"]) == len(probe["block_grad_param_sq"]) == 3
    again = run(state["params"], state["batch_stats"], state["rest"], 0)
    assert again == probe  # the probe's key is a function of (seed, step)


def test_agc_is_per_layer_and_unitwise():
    depth, n = 3, 4
    w = jnp.ones((depth, n, n)) * jnp.arange(1, depth + 1)[:, None, None]
    params = nnx.State({"kernel": networks.StackedParam(w)})
    grads = nnx.State({"kernel": networks.StackedParam(jnp.ones((depth, n, n)) * 10.0)})
    tx = training.adaptive_grad_clip(0.1, 1e-3)
    out, _ = tx.update(grads, tx.init(params), params)
    # per (layer l, unit i): ||W|| = 2 l, ||G|| = 20, so G scaled to 0.1 * 2 l
    col = np.linalg.norm(np.asarray(out["kernel"][...]), axis=1)
    np.testing.assert_allclose(
        col, 0.2 * np.arange(1, depth + 1)[:, None] * np.ones((1, n)), rtol=1e-6
    )


def test_clip_specs():
    assert training.parse_clip("global_norm:1.0") == ("global_norm", 1.0)
    assert training.parse_clip("none") == ("none", None)
    assert training.TrainConfig(clip="agc:0.01").clip == "agc:0.01"
    for bad in ("norm:1", "global_norm", "value:-1", "global_norm:x"):
        with pytest.raises(ValueError, match="clip"):
            training.parse_clip(bad)
    g = {"w": jnp.array([3.0, -4.0])}
    out, _ = training.clipping("value:1.0").update(g, optax.EmptyState())
    np.testing.assert_array_equal(out["w"], [1.0, -1.0])


def test_schedule_warmup_and_decay():
    cfg = training.TrainConfig(steps=110, learning_rate=1.0, schedule="linear", warmup_steps=10)
    lr = training.schedule(cfg)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(110)) == pytest.approx(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("opt", training.OPTIMIZERS)
def test_each_optimizer_lowers_the_loss(digits, opt):
    lr = {"sgd": 0.1, "momentum": 0.05, "rmsprop": 1e-3, "adam": 1e-3}[opt]
    cfg = training.TrainConfig(
        steps=30, batch_size=64, optimizer=opt, learning_rate=lr, clip="agc:0.05", log_every=10,
        eval_every=30, probe_every=0,
    )  # fmt: skip
    res = training.train(_mlp(), digits, cfg)
    assert res.records[-1]["eval_loss"] < res.records[0]["eval_loss"]


def test_batch_norm_model_and_regression_task():
    ts = data.teacher_student(0, n_train=256, n_test=64, in_dim=16, num_classes=None, out_dim=2)
    cfg = networks.MLPConfig(
        depth=2, width=16, in_dim=16, out_dim=2, norm="batch", init="orthogonal"
    )
    model = networks.MLP(cfg, rngs=nnx.Rngs(0))
    before = np.asarray(model.running_var[...])
    tc = training.TrainConfig(
        steps=20, batch_size=32, learning_rate=0.05, log_every=10, probe_every=10
    )
    res = training.train(model, ts, tc)
    assert res.records[-1]["eval_loss"] < res.records[0]["eval_loss"]
    assert "eval_accuracy" not in res.records[-1]
    assert np.isfinite(res.records[-1]["jac_sv2_mean"])
    assert not np.array_equal(before, np.asarray(model.running_var[...]))  # stats updated


def _toy(shape, classes, seed=0):
    """Gaussian inputs ``(64, *shape)`` with random labels: 48 to train, 16 held out."""
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((64, *shape)).astype(np.float32), rng.integers(0, classes, 64)
    return data.Dataset("toy", x[:48], y[:48], x[48:], y[48:], num_classes=classes)


def _train_with_the_probe(model, ds, blocks):
    """Two steps probed at 0, 1, 2: each record has the cumulative Jacobian's numbers and one
    entry per block for each block field, all finite, the largest ``s^2`` at least the mean."""
    tc = training.TrainConfig(
        steps=2, batch_size=8, log_every=1, eval_every=0, probe_every=1, probe_inputs=2
    )
    res = training.train(model, ds, tc)
    assert [r["step"] for r in res.records] == [0, 1, 2]
    for r in res.records:
        assert set(training.probe.PROBE_FIELDS) <= set(r)
        for k in ("mean_sq", "grad_out_sq", "grad_param_sq"):
            assert len(r[f"block_{k}"]) == blocks
        values = [r[k] for k in training.probe.PROBE_FIELDS]
        assert np.all(np.isfinite(np.concatenate([np.ravel(v) for v in values])))
        assert r["jac_sv2_max"] >= r["jac_sv2_mean"] > 0


def test_convnet_trains_with_the_probe_on():
    """A toolkit ConvNet (the stack's route: cut points ``layer.l``), here with one spatial
    axis, an input convolution of two channels and a pooled readout."""
    cfg = networks.ConvConfig(
        depth=2, channels=4, spatial_dims=1, in_channels=2, out_dim=3, pool=True
    )
    _train_with_the_probe(networks.ConvNet(cfg, rngs=nnx.Rngs(0)), _toy((8, 2), 3), blocks=2)


def test_transformer_trains_with_the_probe_on():
    """A plain-nnx pre-LN transformer (the generic route: its ``blocks`` list, the Jacobian
    ``d y^K / d u`` at the last block) on real-valued tokens."""
    model = PlainTransformer(8, nnx.Rngs(0), depth=2, heads=2)
    _train_with_the_probe(model, _toy((3, IN_DIM), OUT_DIM), blocks=2)


def test_run_config_json_roundtrip(tmp_path):
    rc = training.RunConfig(
        model=networks.MLPConfig(
            depth=3,
            width=8,
            activation="leaky_relu",
            activation_params={"negative_slope": 0.1},
            init="he_normal",
        ),
        train=training.TrainConfig(clip="value:0.5"),
        dataset="teacher_student",
        data_options={"n_train": 64},
    )
    path = rc.to_json(tmp_path / "c.json")
    assert training.RunConfig.from_json(path) == rc
    with pytest.raises(ValueError, match="unknown field"):
        training.TrainConfig.from_dict({"stepz": 3})


def test_bad_config_values():
    with pytest.raises(ValueError, match="optimizer"):
        training.TrainConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="learning_rate"):
        training.TrainConfig(learning_rate=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        training.TrainConfig(batch_size=0)


# --------------------------------------------------------------------------- #
# The command.
# --------------------------------------------------------------------------- #


def test_cli_train_and_config_file(tmp_path, capsys):
    # the probe off (--probe-every 0): it compiles for each run, and its fields are tested above
    out = tmp_path / "run"
    argv = [
        "train", "--dataset", "digits", "--depth", "2", "--width", "32", "--activation", "tanh",
        "--init", "orthogonal", "--q-star", "0.25", "--optimizer", "sgd", "--lr", "0.05",
        "--clip", "global_norm:1.0", "--steps", "20", "--batch-size", "32", "--log-every", "10",
        "--probe-every", "0", "--checkpoint-every", "10", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "eval_accuracy" in text and str(out) in text
    for name in ("config.json", "metrics.jsonl", "summary.json"):
        assert (out / name).exists()
    # the written config drives a second run; flags override it
    out2 = tmp_path / "run2"
    argv2 = ["train", "--config", str(out / "config.json"), "--steps", "10", "--no-progress"]
    assert cli.main([*argv2, "--out", str(out2)]) == 0
    cfg2 = json.loads((out2 / "config.json").read_text())
    assert cfg2["train"]["steps"] == 10 and cfg2["model"]["depth"] == 2
    assert cfg2["train"]["probe_every"] == 0  # the first run's flag, kept in its config file
    bad = ["train", "--depth", "2", "--width", "8", "--clip", "bogus:1"]
    assert cli.main([*bad, "--out", str(tmp_path / "x")]) == 2


def test_layer_grad_norms_select_stacked_params_by_type():
    """Only StackedParam variables are layers, whatever their names or the other leaves'
    shapes (here an input kernel whose leading axis also equals the depth)."""
    depth = 3
    g = jax.random.normal(jax.random.key(0), (depth, 4, 4))
    grads = nnx.State(
        {
            "body": {"embed": nnx.Param(jnp.ones((depth, 5))), "kernel": networks.StackedParam(g)},
            "readout": nnx.Param(2 * jnp.ones((4, 2))),
        }
    )
    norms = training.layer_grad_norms(grads)
    np.testing.assert_allclose(
        norms["layers"], np.linalg.norm(np.asarray(g).reshape(depth, -1), axis=1), rtol=1e-6
    )
    np.testing.assert_allclose(norms["input"], np.sqrt(15.0), rtol=1e-6)
    np.testing.assert_allclose(norms["output"], np.sqrt(32.0), rtol=1e-6)
    assert training.layer_grad_norms({"w": jnp.ones((2, 2))})["layers"].shape == (0,)


def test_evaluate_pads_and_masks_the_last_chunk(digits):
    """The chunked evaluator equals one full-batch softmax cross-entropy and accuracy."""
    model = _mlp()
    x, y = digits.x_test, digits.y_test
    logits = np.asarray(model(jnp.asarray(x)), np.float64)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
        - logits.max(1, keepdims=True)
    )
    ev = training.evaluate(model, x, y, batch_size=100)  # 359 rows: the last chunk padded
    assert ev["loss"] == pytest.approx(-logp[np.arange(len(y)), y].mean(), rel=1e-5)
    assert ev["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == y))
    with pytest.raises(ValueError, match="loss"):
        training.evaluate(model, x, y, loss="hinge")


def test_lean_steps_are_bit_identical_to_logged_steps(digits):
    """``log=False`` skips the diagnostics only: parameters and logged metrics are unchanged."""
    tc = training.TrainConfig(steps=4, batch_size=16, learning_rate=0.1, clip="global_norm:0.05")
    tx = training.optimizer(tc)
    x, y = jnp.asarray(digits.x_train), jnp.asarray(digits.y_train)
    g, _, s_log = training.init_state(_mlp(depth=3, width=16), tx)
    s_lean = jax.tree.map(jnp.copy, s_log)
    step = training.make_train_step(g, tx, training.clipping(tc.clip), training.schedule(tc))
    for t in range(4):
        idx = jnp.asarray(data.batch_indices(0, t, len(digits.x_train), 16))
        s_log, m_log = step(s_log, x, y, idx, jnp.int32(t), True)
        s_lean, m_lean = step(s_lean, x, y, idx, jnp.int32(t), t % 2 == 1)
        for a, b in zip(_leaves(s_log), _leaves(s_lean), strict=True):
            np.testing.assert_array_equal(a, b)
        if t % 2 == 1:
            for k in m_log:
                np.testing.assert_array_equal(m_log[k], m_lean[k])
        else:
            assert float(m_lean["grad_norm_clipped"]) == 0.0 < float(m_log["grad_norm_clipped"])
            assert not np.any(m_lean["grad_norm_layers"]) and m_lean["grad_norm_layers"].shape == (
                3,
            )
            assert float(m_lean["loss"]) == float(m_log["loss"])


def test_runs_that_differ_in_seed_share_the_jitted_step(digits):
    """Two runs of one structure and optimizer that differ in their seed (and so in their
    initial parameters) use one jitted train step: the second neither traces nor loads it;
    each equals the run made alone."""
    from isometry.training import loop

    cfg = training.TrainConfig(steps=3, batch_size=8, log_every=3, eval_every=0, probe_every=0)
    net = _mlp(depth=1, width=8, init="gaussian", sigma_w2=1.0, sigma_b2=0.0).config
    model = lambda s: networks.MLP(net, rngs=nnx.Rngs(s))  # noqa: E731
    loop._train_step.cache_clear()
    first = training.train(model(1), digits, dataclasses.replace(cfg, seed=1))
    second = training.train(model(2), digits, dataclasses.replace(cfg, seed=2))
    info = loop._train_step.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    loop._train_step.cache_clear()
    alone = training.train(model(2), digits, dataclasses.replace(cfg, seed=2))
    for a, b in zip(_leaves(second.state), _leaves(alone.state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert first.records != second.records


def test_runs_that_differ_in_initialization_share_the_jitted_step(digits):
    """Runs whose networks differ only in their initialization options (sigma_w2, sigma_b2,
    init, q_star: a sweep's points) share one jitted train step; each equals the run made
    alone, and each trained model keeps its own config."""
    from isometry.training import loop

    cfg = training.TrainConfig(steps=3, batch_size=8, log_every=3, eval_every=0, probe_every=0)
    nets = [
        _mlp(depth=2, width=8, init="gaussian", sigma_w2=1.0, sigma_b2=0.0).config,
        _mlp(depth=2, width=8, init="gaussian", sigma_w2=2.5, sigma_b2=0.3).config,
        _mlp(depth=2, width=8, init="critical", q_star=0.5).config,
    ]
    loop._train_step.cache_clear()
    runs = [training.train(networks.MLP(n, rngs=nnx.Rngs(0)), digits, cfg) for n in nets]
    info = loop._train_step.cache_info()
    assert (info.misses, info.hits) == (1, 2)
    for n, r in zip(nets, runs, strict=True):
        assert r.model.config == n
    loop._train_step.cache_clear()
    alone = training.train(networks.MLP(nets[1], rngs=nnx.Rngs(0)), digits, cfg)
    for a, b in zip(_leaves(runs[1].state), _leaves(alone.state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert runs[0].records != runs[1].records


def test_split_for_jit_reaches_toolkit_networks_inside_a_users_module():
    """A user's module around a toolkit MLP: the graph definitions of two initializations
    are equal (one compiled step), a plain nnx model splits as it is, and the models keep
    their own configs."""
    from isometry.training.evaluation import split_for_jit

    class Wrapped(nnx.Module):
        def __init__(self, sigma_w2):
            self.body = _mlp(depth=2, width=8, init="gaussian", sigma_w2=sigma_w2)
            self.scale = nnx.Param(jnp.ones(()))

        def __call__(self, x):
            return self.scale[...] * self.body(x)

    a, b = Wrapped(1.0), Wrapped(3.0)
    assert split_for_jit(a)[0] == split_for_jit(b)[0]
    assert nnx.split(a)[0] != nnx.split(b)[0]
    assert (a.body.config.sigma_w2, b.body.config.sigma_w2) == (1.0, 3.0)
    plain = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    assert split_for_jit(plain)[0] == nnx.split(plain)[0]


def test_probe_leaves_the_training_bit_identical():
    """The monitor runs on a copy with its own key: the records' training metrics and the
    final parameters are bitwise those of a run without the probe."""
    ds = data.load_digits()
    runs = {}
    for every in (0, 2):
        cfg = training.TrainConfig(steps=4, batch_size=16, log_every=2, eval_every=0,
                                   probe_every=every, probe_inputs=2)  # fmt: skip
        runs[every] = training.train(_mlp(depth=2, width=16), ds, cfg)
    assert "jac_sv2_mean" in runs[2].records[0] and "jac_sv2_mean" not in runs[0].records[0]
    for a, b in zip(runs[0].records, runs[2].records, strict=True):
        assert a == {k: v for k, v in b.items() if k not in training.probe.PROBE_FIELDS}
    for a, b in zip(_leaves(runs[0].state), _leaves(runs[2].state), strict=True):
        np.testing.assert_array_equal(a, b)
