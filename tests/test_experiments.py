"""Tests of the experiment registry, the four analysis experiments and `isometry run`.

Default tests run each experiment on a tiny config; the quick presets run
under ``-m slow``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isometry import cli, experiments, sweep
from isometry.experiments import harness, transformer_trainability

TINY = {
    "spectra": ["activations=tanh", "q_stars=0.25", "depths=1,3", "width=16", "seeds=2"],
    "gradients": [
        "activations=tanh",
        "inits=he,orthogonal",
        "techniques=plain,residual",
        "depth=4",
        "width=8",
        "batch=4",
        "seeds=1",
    ],
    "batchnorm": ["activations=relu", "batch_sizes=4", "depth=3", "width=8", "seeds=2"],
    "deep_cnn": ["depths=2,4", "channels=3", "size=3", "spatial_dims=1", "seeds=1"],
    "transformer_signal": [
        "norm_positions=pre",
        "alphas=1/sqrt(L)",
        "depth=2",
        "width=8",
        "heads=2",
        "seq_len=3",
        "seeds=1",
        "tangents=1",
    ],
    "transformer_trainability": list(transformer_trainability.TINY),
}


def test_registry():
    names = experiments.names()
    for n in TINY:
        assert n in names
        exp = experiments.get(n)
        assert exp.name == n and set(exp.presets) >= {"quick", "full"}
        assert exp.presets["quick"] != exp.presets["full"]
    with pytest.raises(ValueError, match="unknown experiment 'nope'; available"):
        experiments.get("nope")
    with pytest.raises(ValueError, match="preset must be one of"):
        experiments.config("spectra", "medium")


SLOW_TINY: tuple[str, ...] = ()  # every tiny run is in the default suite


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_TINY else n for n in sorted(TINY)]
)
def test_tiny_runs_and_resume(name, tmp_path):
    path = experiments.run(name, "quick", TINY[name], tmp_path / name, progress=False)
    t = sweep.load_table(path)
    n = len(next(iter(t.values())))
    assert n > 0
    for k, v in t.items():
        if v.dtype.kind == "f" and not k.startswith("grad"):
            assert np.all(np.isfinite(v)), k
    again = experiments.run(name, "quick", TINY[name], tmp_path / name, progress=False)
    assert again.read_text() == path.read_text()
    with pytest.raises(sweep.ConfigMismatchError, match="refusing to mix"):
        experiments.run(name, "quick", [*TINY[name], "seed=5"], tmp_path / name, progress=False)


def test_spectra_matches_theory_at_depth_one(tmp_path):
    """Mean squared singular value vs (sigma_w2 mu1)^L = 1 at criticality (N = 64, 4 seeds)."""
    over = ["activations=tanh", "weights=orthogonal", "q_stars=0.25", "depths=1",
            "width=64", "seeds=4"]  # fmt: skip
    t = sweep.load_table(experiments.run("spectra", "quick", over, tmp_path, progress=False))
    np.testing.assert_allclose(t["theory_mean"], 1.0, rtol=1e-6)
    # orthogonal weights, depth 1: J J^T = sigma_w2 D^2, mean over 4 x 64 entries of d
    assert abs(t["mean"].mean() - 1.0) < 0.15


def test_batchnorm_gradients_explode(tmp_path):
    over = ["activations=relu", "batch_sizes=8", "depth=8", "width=32", "seeds=2"]
    t = sweep.load_table(experiments.run("batchnorm", "quick", over, tmp_path, progress=False))
    assert np.all(t["growth_rate"] > 1.0)


def test_config_validation():
    with pytest.raises(ValueError, match="activations must be one of"):
        experiments.config("spectra", "quick", ["activations=tahn"])
    with pytest.raises(ValueError, match="batch_sizes must be an integer >= 2"):
        experiments.config("batchnorm", "quick", ["batch_sizes=1,4"])
    with pytest.raises(TypeError, match="width: expected an integer"):
        experiments.config("spectra", "quick", ["width=3.5"])


def test_cli_run(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["run", "deep_cnn", "--out", str(out), "--no-progress"]
    for s in TINY["deep_cnn"]:
        args += ["--set", s]
    assert cli.main(args) == 0
    assert (out / "results.csv").exists()
    assert cli.main([*args[:-1], "seeds=2"]) == 2
    err = capsys.readouterr().err
    assert "refusing to mix" in err and "seeds: 1 (stored) vs 2 (now)" in err
    assert cli.main(["run", "spectra", "--set", "dpeth=3"]) == 2
    assert "unknown parameter 'dpeth'" in capsys.readouterr().err
    assert cli.main(["run", "spectra", "--set", "width=wide"]) == 2
    assert "width: expected an integer, got 'wide'" in capsys.readouterr().err
    assert cli.main(["run", "spectra", "--num-processes", "2", "--process-id", "0"]) == 2
    assert "needs a coordinator" in capsys.readouterr().err
    assert cli.main(["run", "--list"]) == 0
    assert "spectra" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_quick_presets(name, tmp_path):
    t = sweep.load_table(experiments.run(name, "quick", out=tmp_path, progress=False))
    assert len(next(iter(t.values()))) > 0


def test_transformer_trainability_tasks():
    """Both tasks' inputs fit the networks built for them (the tiny run trains recall only)."""
    cfg = experiments.config("transformer_trainability", "quick", ["n_train=8", "n_test=4"])
    for task, shape, kind in (("digits", (4, 16), "f"), ("recall", (5,), "i")):  # 4x4, 2 pairs
        ds = transformer_trainability.load_task(cfg, task)
        assert ds.x_train.shape[1:] == shape and ds.x_train.dtype.kind == kind
        net = transformer_trainability.network_config(cfg, task, "post", "0", 3)
        assert net.seq_len == shape[0] and net.out_dim == ds.num_classes
        assert not net.residual and net.causal == (task == "recall")
    assert transformer_trainability.chance(cfg, "recall") == 1 / cfg.values
    with pytest.raises(ValueError, match="variants must be 'norm_position:alpha'"):
        experiments.config("transformer_trainability", "quick", ["variants=pre:2"])


def test_gradients_init_numbers():
    from isometry.experiments import gradients

    cfg = gradients.Config(width=8, orthogonal_sigma_w2=1.5)
    assert gradients.init_numbers(cfg, "he") == {"sigma_w2": 2.0, "orthogonal": 0.0}
    assert gradients.init_numbers(cfg, "xavier") == {"sigma_w2": 1.0, "orthogonal": 0.0}
    assert gradients.init_numbers(cfg, "orthogonal") == {"sigma_w2": 1.5, "orthogonal": 1.0}


# --------------------------------------------------------------------------- #
# Every experiment that claims criticality starts its first pre-activation at q*.
# One network with orthogonal weights, where ||x^0 W||^2 = sigma_w2 ||x^0||^2 holds exactly,
# so mean (h^1 - b^1)^2 = q* - sigma_b2 to rounding; and the Monte Carlo mean over 64 networks
# of both ensembles (E h^2 = q*) within 4 standard errors. All slow: compiling the point
# functions costs more than the default suite's budget for these checks.
# --------------------------------------------------------------------------- #


def _record_first_layer(monkeypatch):
    """Make ``jacobian.stack_jacobians`` return ``(h^1, b^1)`` of the point function calling it.

    The point function passes its layer (tanh), stacked parameters and input;
    ``h^1 = arctanh(layer(p_1, x^0))`` and ``b^1 = h^1 - arctanh(layer(p_1 without bias))``.
    """
    from isometry import jacobian

    def first(layer, params, x0, depths, **kw):
        p1 = jax.tree.map(lambda a: a[0], params)
        h = jnp.arctanh(layer(p1, x0))
        return jnp.mean(h**2), jnp.mean((h - jnp.arctanh(layer(p1, 0 * x0))) ** 2)

    monkeypatch.setattr(jacobian, "stack_jacobians", first)


def _assert_mean_is(m, target, defect):
    """``mean(m) = target`` within 4 standard errors of the seed mean, and not ``defect``."""
    se = np.std(m, ddof=1) / np.sqrt(m.size)
    assert abs(m.mean() - target) < 4 * se, (m.mean(), target, se)
    assert abs(defect - target) > 8 * se  # the test would see the old input scale


def _deep_cnn_first_layer(monkeypatch, orthogonal, seeds):
    from isometry import initializers
    from isometry.experiments import deep_cnn

    cfg = deep_cnn.Config(channels=4, size=4, depths=(1,))
    _record_first_layer(monkeypatch)
    point = deep_cnn.point_function(cfg)
    f = jax.jit(jax.vmap(lambda i: point(orthogonal, i)))
    v = initializers.resolve(cfg.activation, "delta_orthogonal", q_star=cfg.q_star)
    return cfg.q_star, v.sigma_w2, v.sigma_b2, *map(np.asarray, f(jnp.arange(seeds)))


def _spectra_first_layer(monkeypatch, weights, seeds):
    from isometry.experiments import spectra

    cfg = spectra.Config(activations=("tanh",), q_stars=(0.25,), depths=(1,), width=32)
    sw, sb = spectra.critical("tanh", 0.25)
    _record_first_layer(monkeypatch)
    point = spectra.point_function(cfg, "tanh", weights)
    f = jax.jit(jax.vmap(lambda i: point(0.25, sw, sb, i)))
    return 0.25, sw, sb, *map(np.asarray, f(jnp.arange(seeds)))


def test_spectra_traced_activation_is_each_catalog_activation():
    """``any_activation(i)`` is ``ACTIVATIONS[i]``: values and tangents (its custom JVP is
    ``phi'(x) t``), all activations in one program."""
    from isometry import activations
    from isometry.experiments import spectra

    x = jnp.array([-2.3, -0.7, 0.45, 1.9])
    t = jnp.array([0.3, -1.1, 2.0, 0.7])
    index = jnp.arange(len(spectra.ACTIVATIONS))
    got = jax.jit(jax.vmap(lambda i: jax.jvp(spectra.any_activation(i).phi, (x,), (t,))))(index)
    each = jax.jit(
        lambda: [jax.jvp(activations.get(a).phi, (x,), (t,)) for a in spectra.ACTIVATIONS]
    )
    for i, (name, want) in enumerate(zip(spectra.ACTIVATIONS, each(), strict=True)):
        np.testing.assert_allclose(got[0][i], want[0], rtol=1e-12, atol=1e-14, err_msg=name)
        np.testing.assert_allclose(got[1][i], want[1], rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.slow
def test_deep_cnn_first_preactivation_is_at_q_star(monkeypatch):
    """Delta-orthogonal CNN: mean (h^1 - b^1)^2 = q* - sigma_b2 exactly (deep_cnn had
    sigma_w2 q*, so h^1 sat at 0.36 for tanh at q* = 1/4, not 0.25)."""
    q, sw, sb, _, wx = _deep_cnn_first_layer(monkeypatch, 1.0, 1)
    np.testing.assert_allclose(wx, q - sb, rtol=1e-9)
    assert abs(sw * q - (q - sb)) > 0.05  # the old input scale would fail


@pytest.mark.slow
def test_spectra_first_preactivation_is_at_q_star(monkeypatch):
    """Orthogonal MLP of the spectra study: mean (h^1 - b^1)^2 = q* - sigma_b2 exactly."""
    q, _, sb, _, wx = _spectra_first_layer(monkeypatch, "orthogonal", 1)
    np.testing.assert_allclose(wx, q - sb, rtol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("init", ["delta_orthogonal", "gaussian"])
def test_deep_cnn_first_preactivation_mean_square_is_q_star(monkeypatch, init):
    """E (h^1)^2 = q* over 64 networks, both kernels (default test: the exact orthogonal case)."""
    q, sw, sb, m, _ = _deep_cnn_first_layer(monkeypatch, float(init == "delta_orthogonal"), 64)
    _assert_mean_is(m, q, sw * q + sb)


@pytest.mark.slow
def test_spectra_gaussian_first_preactivation_mean_square_is_q_star(monkeypatch):
    """E (h^1)^2 = q* over 64 Gaussian networks (default test: the exact orthogonal case)."""
    q, sw, sb, m, _ = _spectra_first_layer(monkeypatch, "gaussian", 64)
    _assert_mean_is(m, q, sw * q + sb)


@pytest.mark.slow
def test_gradients_first_preactivation_is_where_the_theory_starts():
    """The gradients study claims no q*; fig. 7's theory starts at q^1 = sigma_w2 * 1
    (inputs u ~ N(0, 1), zero biases), and the measured q^1 agrees over 64 networks."""
    from isometry.experiments import gradients

    cfg = gradients.Config(activations=("tanh",), depth=2, width=16, batch=4)
    f = gradients.measure_function(gradients.network_config(cfg, "tanh", "plain"), 4, 0)
    for init in ("xavier", "he"):
        n = gradients.init_numbers(cfg, init)
        q1 = jax.jit(jax.vmap(lambda i, n=n: f(n["sigma_w2"], n["orthogonal"], i)["q"][0]))
        _assert_mean_is(np.asarray(q1(jnp.arange(64))), n["sigma_w2"], 0.0)


def test_gradients_stored_numbers_are_those_of_measure_function(tmp_path):
    """The sweep draws each point's kernels and inputs in separate programs
    (``sampled_inputs``); its stored numbers equal the one-program
    ``measure_function`` of the same point (orthogonal and Gaussian kernels)."""
    from isometry.experiments import gradients

    over = ["activations=tanh", "inits=orthogonal,he", "techniques=residual", "depth=2",
            "width=8", "batch=4", "seeds=1"]  # fmt: skip
    t = sweep.load_table(experiments.run("gradients", "quick", over, tmp_path, progress=False))
    cfg = experiments.config("gradients", "quick", over)
    f = gradients.measure_function(gradients.network_config(cfg, "tanh", "residual"), 4, cfg.seed)
    for i, init in enumerate(cfg.inits):
        n = gradients.init_numbers(cfg, init)
        out = jax.jit(f)(n["sigma_w2"], n["orthogonal"], i)
        rows = t["init"] == init
        for k in ("grad_preact_sq", "grad_weight_sq", "q"):
            np.testing.assert_allclose(t[k][rows], out[k], rtol=1e-6, err_msg=f"{init} {k}")


# --------------------------------------------------------------------------- #
# Reading a run back on its grid (harness.stored_run, StoredRun).
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class _Cfg:
    a: tuple[int, ...] = (1, 2)
    pairs: tuple[str, ...] = ("p:1", "q:2", "r:3")
    seeds: int = 2
    layers: int = 3


def _grid(cfg: _Cfg) -> sweep.Grid:
    names, alphas = zip(*(v.split(":") for v in cfg.pairs), strict=True)
    return (
        sweep.product(a=cfg.a)
        * sweep.zipped(name=names, alpha=alphas)
        * sweep.product(seed=range(cfg.seeds))
    )


def _row(p, layer):
    value = 100 * p["a"] + 10 * int(p["alpha"]) + p["seed"] + 0.5 * layer
    return {"layer": layer, "value": value, "stopped": p["seed"] == 1, "step": None}


def _run(cfg, out, *, per_device=4, optimize=True, progress=True):
    store = sweep.Store(out, "toy", cfg)
    return sweep.run_partitioned(
        store,
        _grid(cfg),
        lambda p: {"rows": [_row(p, l) for l in range(1, cfg.layers + 1)],
                   "arrays": {"curve": np.arange(p["a"] + p["seed"], dtype=float)}},
        progress=progress,
    )  # fmt: skip


TOY = experiments.Experiment(
    "toy", _Cfg, {"quick": _Cfg(), "full": _Cfg(seeds=3)}, _run, grid=_grid
)


def test_stored_run_reads_typed_arrays_on_the_grid(tmp_path):
    run = harness.stored_run(TOY, "quick", ["layers=1"], tmp_path / "s")
    assert run.config == _Cfg(layers=1) and run.grid.shape == (2, 3, 2)
    assert run.coords("alpha") == ("1", "2", "3") and run.axis("name") == 1
    v = run.array("value")  # one row per point: the grid's shape
    assert v.shape == (2, 3, 2) and v.dtype == np.float64
    assert v[1, 2, 0] == 100 * 2 + 10 * 3 + 0 + 0.5
    stopped = run.array("stopped")
    assert stopped.dtype == bool and stopped[..., 1].all() and not stopped[..., 0].any()
    assert np.isnan(run.array("step")).all()  # None in every record: NaN
    # axes named by the grid's parameters (a zipped axis by any of its names)
    w = run.array("value", ("seed", "a", "alpha"))
    assert w.shape == (2, 2, 3) and w.flags.c_contiguous
    np.testing.assert_array_equal(w, np.moveaxis(v, 2, 0))
    with pytest.raises(ValueError, match="axes must name each grid axis once"):
        run.array("value", ("a", "name", "alpha"))
    # the points' stored arrays, cut and padded with NaN to one length
    c = run.stack("curve", 3)
    assert c.shape == (2, 3, 2, 3)
    np.testing.assert_array_equal(c[0, 0, 1], [0.0, 1.0, np.nan])
    np.testing.assert_array_equal(c[1, 1, 1], [0.0, 1.0, 2.0])
    # the aggregate table, typed
    assert run.table["stopped"].dtype == bool and len(run.table["value"]) == 12


def test_stored_run_rows_per_point(tmp_path):
    run = harness.stored_run(TOY, "quick", (), tmp_path / "s")
    with pytest.raises(ValueError, match="several rows each; read 'value' with rows=True"):
        run.array("value")
    v = run.array("value", ("seed", "a", "name"), rows=True)  # rows stay last
    assert v.shape == (2, 2, 3, 3)
    np.testing.assert_array_equal(v[1, 0, 2], 100 + 30 + 1 + 0.5 * np.arange(1, 4))
    np.testing.assert_array_equal(run.array("layer", rows=True)[0, 0, 0], [1, 2, 3])
    # a point without results reads as NaN (a store read before its sweep finished)
    store = sweep.Store(tmp_path / "s", "toy", run.config)
    store.path(run.points[0]).unlink()
    partial = harness.StoredRun.read(store, run.grid)
    assert np.isnan(partial.array("value", rows=True)[0, 0, 0]).all()
    assert partial.array("stopped", rows=True).dtype == np.float64  # bool with gaps: 1, 0, NaN
    # the temporary store (None) is removed after reading; the results stay
    tmp = harness.stored_run(TOY, "quick", ("seeds=1",))
    assert tmp.array("value", rows=True).shape == (2, 3, 1, 3) and tmp.arrays(tmp.points[0])
