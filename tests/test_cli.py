import json

import numpy as np
import pytest

from isometry import cli


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "info" in out and "phase-diagram" in out


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "jax" in out and "backend" in out and "device 0" in out


def test_phase_diagram_writes_figure_and_data(tmp_path, capsys):
    args = ["phase-diagram", "--activation", "erf", "--sigma-w2", "0.5:4:7", "--sigma-b2", "0:1:5"]
    assert cli.main([*args, "--out", str(tmp_path)]) == 0
    for ext in ("png", "pdf", "npz", "json"):
        f = tmp_path / f"phase_diagram_erf.{ext}"
        assert f.exists() and f.stat().st_size > 0
    data = np.load(tmp_path / "phase_diagram_erf.npz")
    assert data["chi1"].shape == (7, 5) and data["critical_sigma_w2"].shape == (5,)
    summary = json.loads((tmp_path / "phase_diagram_erf.json").read_text())
    assert summary["activation"] == "erf" and summary["converged_fraction"] == 1.0


def test_bad_activation_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["phase-diagram", "--activation", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown activation 'nope'" in capsys.readouterr().err


def test_figures_list(capsys):
    assert cli.main(["figures", "--list"]) == 0
    out = capsys.readouterr().out
    assert "phase_diagram: " in out and len(out.splitlines()) >= 10
