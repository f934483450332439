"""Tests of the experiment registry, the four analysis experiments and `isometry run`.

Default tests run each experiment on a tiny config; the quick presets run
under ``-m slow``.
"""

from __future__ import annotations

import numpy as np
import pytest

from isometry import cli, experiments, sweep
from isometry.experiments import transformer_trainability

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


# Slow only: figure 11's tiny tier (default suite) already runs transformer_signal; its
# resume and mismatch checks here cost ~8 s of compilation.
SLOW_TINY = ("transformer_signal",)


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
    for task, shape, kind in (("digits", (16, 4), "f"), ("recall", (9,), "i")):
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
