"""Each figure script at the tiny tier: a non-empty image and data with the expected keys."""

import numpy as np
import pytest

from isometry import cli
from paper_figures import FIGURES, core


@pytest.mark.parametrize("name", list(FIGURES))
def test_figure_tiny_tier(name, tmp_path):
    r = core.make(name, "tiny", tmp_path / "out", tmp_path / "results")
    assert set(core.load_module(name).KEYS) <= set(r["data"])
    for p in r["paths"]:
        assert p.exists() and p.stat().st_size > 1000
    assert core.caption(name)  # the docstring's first line
    # A second call reads the cache and gives the same data.
    again = core.make(name, "tiny", tmp_path / "out", tmp_path / "results")
    for k, v in r["data"].items():
        np.testing.assert_array_equal(v, again["data"][k])


def test_figures_command_end_to_end(tmp_path, capsys):
    args = ["figures", "phase_diagram", "depth_scales", "--tier", "tiny"]
    assert cli.main([*args, "--out", str(tmp_path / "o"), "--results", str(tmp_path / "r")]) == 0
    assert (tmp_path / "o" / "phase_diagram.png").exists()
    assert (tmp_path / "o" / "depth_scales.pdf").exists()
    assert "2 figure(s)" in capsys.readouterr().out


def test_unknown_figure_is_a_clear_error(capsys):
    assert cli.main(["figures", "nope", "--tier", "tiny"]) == 2
    assert "unknown figure 'nope'" in capsys.readouterr().err
