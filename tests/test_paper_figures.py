"""Each figure script at the tiny tier: a non-empty image and data with the expected keys.

Two figures go through the ``isometry figures`` command end to end; the others
through :func:`paper_figures.core.make`. Both routes check the same things.
"""

import jax
import numpy as np
import pytest

from isometry import cli
from isometry.paper_figures import FIGURES, core

END_TO_END = ("phase_diagram", "depth_scales")


def check_outputs(name, data, paths):
    assert set(core.load_module(name).KEYS) <= set(data)
    assert {p.suffix for p in paths} == {".png", ".pdf"}
    for p in paths:
        assert p.exists() and p.stat().st_size > 1000
    assert core.caption(name)  # the docstring's first line


# Tiny tiers whose experiments have their own default tiny runs (tests/test_experiments*.py)
# run in the slow suite, to keep the default suite under five minutes; theory_any_model's
# engine and measurement are checked by default in tests/test_theory.py.
SLOW_TINY = (
    "trainability", "spectra", "spectral_edge", "learning_speed", "gradients", "clipping",
    "batchnorm", "deep_cnn", "rank_collapse", "theory_any_model",
    "lr_transfer",  # eight small compiles (~30 s); tests/test_lr_transfer.py trains its programs
)  # fmt: skip


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if n in SLOW_TINY else n
        for n in FIGURES
        if n not in END_TO_END
    ],
)
def test_figure_tiny_tier(name, tmp_path):
    r = core.make(name, "tiny", tmp_path / "out", tmp_path / "results")
    check_outputs(name, r["data"], r["paths"])
    # A second call reads the cache and gives the same data.
    again = core.make(name, "tiny", tmp_path / "out", tmp_path / "results")
    for k, v in r["data"].items():
        np.testing.assert_array_equal(v, again["data"][k])


@pytest.mark.heavy
def test_figures_command_end_to_end(tmp_path, capsys, monkeypatch):
    """The command makes the figures, reports its stages, passes progress on to compute,
    caches the results, and a re-run reads them back quietly."""
    out, results = tmp_path / "o", tmp_path / "r"
    module, seen = core.load_module("phase_diagram"), []
    original = module.compute

    def compute(**params):
        seen.append(core.progress_enabled())
        return original(**params)

    monkeypatch.setattr(module, "compute", compute)
    args = ["figures", *END_TO_END, "--tier", "tiny", "--out", str(out), "--results", str(results),
            "--jobs", "1"]  # fmt: skip
    assert cli.main(args) == 0
    stdout, stderr = capsys.readouterr()
    assert f"{len(END_TO_END)} figure(s)" in stdout and "phase_diagram done in" in stdout
    assert "1 at a time" in stdout and "[figures 1/2] wrote" in stdout
    assert "[phase_diagram] computing (tiny)" in stderr and "[phase_diagram] computed in" in stderr
    one = [*args[:1], "phase_diagram", *args[1 + len(END_TO_END) :]]
    assert cli.main([*one, "--no-progress"]) == 0  # cached now, and quiet
    stdout, stderr = capsys.readouterr()
    assert stderr == "" and "done in" in stdout
    assert cli.main([*one, "--recompute", "--no-progress"]) == 0
    assert seen == [True, False] and not core.progress_enabled()
    monkeypatch.setattr(module, "compute", original)
    for name in END_TO_END:
        # The command cached the results: make() reads them back instead of computing.
        monkeypatch.setattr(core.load_module(name), "compute", _must_not_compute)
        r = core.make(name, "tiny", out, results)
        check_outputs(name, r["data"], [out / f"{name}.png", out / f"{name}.pdf"])


PARALLEL = ("phase_diagram", "finite_width")


def test_figures_in_worker_processes(tmp_path, capsys):
    """``--jobs 2`` makes each figure in its own process; the results are those of a figure
    made alone in this process (with JAX's defaults, as the command runs: the suite turns on
    float64, under which the Monte Carlo figures draw other samples)."""
    out, results = tmp_path / "o", tmp_path / "r"
    args = ["figures", *PARALLEL, "--tier", "tiny", "--out", str(out), "--results", str(results)]
    assert cli.main([*args, "--jobs", "2", "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert "2 at a time" in stdout and "2 figure(s) in" in stdout
    for name in PARALLEL:
        assert f"{name} done in" in stdout
        with jax.enable_x64(False):
            alone = core.make(name, "tiny", tmp_path / "o1", tmp_path / "r1")
        check_outputs(name, alone["data"], alone["paths"])
        with np.load(results / f"{name}_tiny.npz") as z:
            for k, v in alone["data"].items():
                np.testing.assert_array_equal(z[k], v)


@pytest.mark.parametrize("jobs", ["0", "-1", "x"])
def test_bad_jobs(jobs, tmp_path, capsys):
    args = ["figures", "phase_diagram", "--tier", "tiny", "--jobs", jobs, "--out", str(tmp_path)]
    try:
        code = cli.main(args)
    except SystemExit as e:  # argparse: not an integer
        code = e.code
    assert code == 2 and "jobs" in capsys.readouterr().err


def test_make_many_refuses_bad_jobs():
    with pytest.raises(ValueError, match="jobs must be an integer >= 1"):
        list(core.make_many(["phase_diagram"], "tiny", jobs=0))


def _must_not_compute(**params):
    raise AssertionError("the cached results were not used")


def test_every_figure_is_tested():
    assert set(END_TO_END) <= set(FIGURES) and len(FIGURES) >= 10


def test_unknown_figure_is_a_clear_error(capsys):
    assert cli.main(["figures", "nope", "--tier", "tiny"]) == 2
    assert "unknown figure 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(FIGURES))
def test_every_figure_states_its_quick_cost(name):
    """``COST["quick"]`` (CPU seconds of one core from empty stores) orders ``--jobs`` and
    sizes the main job (about five minutes on two cores): every figure states it."""
    cost = getattr(core.load_module(name), "COST", None)
    assert isinstance(cost, dict) and "quick" in cost, name
    assert isinstance(cost["quick"], int | float) and 0 < cost["quick"] < 600, name
