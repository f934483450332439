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


# ------------------------------------------------------------------ flags as typed


def _errors(argv, capsys):
    """The exit code and the stderr lines of ``isometry *argv``."""
    code = cli.main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def test_no_parser_takes_abbreviations():
    parser = cli.build_parser()
    assert not parser.allow_abbrev and len(parser.commands) >= 8
    assert not any(p.allow_abbrev for p in parser.commands.values())


_PD = "isometry phase-diagram: unknown flag --sigma-w (did you mean --sigma-w2?)"
TYPOS = [
    ("prefix", ["phase-diagram", "--sigma-w", "0.5:3:11"], _PD),
    ("prefix=value", ["phase-diagram", "--sigma-w=0.5:3:11"], _PD),
    ("prefix, negative value", ["phase-diagram", "--sigma-w", "-1:3:11"], _PD),
    ("prefix of --depths", ["spectrum", "--depth", "3"],
     "isometry spectrum: unknown flag --depth (did you mean --depths?)"),
    ("the destination's name", ["train", "--learning-rate", "0.1"],
     "isometry train: unknown flag --learning-rate (did you mean --lr?)"),
    ("before the command", ["--debg", "phase-diagram"],
     "isometry phase-diagram: unknown flag --debg (did you mean --debug?)"),
    ("top-level flag after the command", ["phase-diagram", "--debug"],
     "isometry phase-diagram: unknown flag --debug (--debug goes before the command)"),
    ("two, one far from any", ["phase-diagram", "--sigmaw2", "1:2:3", "--nope"],
     "isometry phase-diagram: unknown flag --sigmaw2 (did you mean --sigma-w2?); "
     "unknown flag --nope (see isometry phase-diagram --help)"),
    ("a stray argument", ["phase-diagram", "extra"],
     "isometry phase-diagram: error: unexpected argument(s) extra "
     "(see isometry phase-diagram --help)"),
    ("a grid of no points", ["phase-diagram", "--sigma-w2", "0.5:3:0"],
     "isometry phase-diagram: error: argument --sigma-w2: expected LO:HI:N with N >= 1 "
     "points, got '0.5:3:0'"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "line"), [t[1:] for t in TYPOS], ids=[t[0] for t in TYPOS])
def test_a_mistyped_flag_is_one_line_with_a_suggestion(argv, line, tmp_path, capsys):
    """A prefix was taken for the flag it abbreviates (``--sigma-w`` ran as ``--sigma-w2``),
    and unknown flags were reported by the top-level parser without a suggestion."""
    assert _errors([*argv, "--out", str(tmp_path)], capsys) == (2, [line])


LIBRARY_ERRORS = [
    (["phase-diagram", "--sigma-w2", "-1:2:5"],
     "isometry phase-diagram: error: --sigma-w2: must be > 0.0, got [-1.   -0.25]"),
    (["phase-diagram", "--sigma-b2=-.5:1:3"], "--sigma-b2: must be >= 0.0, got [-0.5]"),
    (["spectrum", "--seeds", "0"], "isometry spectrum: error: --seeds: must be an integer >= 1"),
    (["spectrum", "--inputs", "0"], "--inputs: must be an integer >= 1, got 0"),
    (["spectrum", "--q-star", "-1"], "--q-star: must be > 0.0"),
    (["spectrum", "--depths", "2,0"], "--depths: must be >= 1, got [2, 0]"),
    (["signal", "--batch", "3"], "isometry signal: error: --batch: must be an even integer >= 2"),
    (["signal", "--init", "gaussian", "--sigma-w2", "-1"],
     "--sigma-w2: must be a positive finite number, got -1.0"),
    (["train", "--batch-size", "0"], "isometry train: error: --batch-size: must be an integer"),
    (["run", "spectra", "--per-device", "0"], "isometry run: error: --per-device: must be an"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "text"), LIBRARY_ERRORS, ids=[" ".join(a) for a, _ in LIBRARY_ERRORS]
)
def test_a_library_error_names_the_flag(argv, text, tmp_path, capsys):
    """Library messages name their parameters (``sigma_w2_grid``, ``n_seeds``, ``batch_size``);
    the command names the flag that set it, in one line, exit code 2."""
    code, err = _errors([*argv, "--out", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and text in err[0], err


def test_a_value_from_a_config_file_keeps_its_name(tmp_path, capsys):
    """``train --config``: a bad value from the file is named as in the file; one given by a
    flag is named as the flag."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": {"depth": 2, "width": 0}, "train": {"steps": 1}}))
    code, err = _errors(["train", "--config", str(config), "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and err == [f"isometry train: error: {config}: width must be an integer "
                                 ">= 1, got 0"]  # fmt: skip
    config.write_text(json.dumps({"model": {"depth": 2, "width": 8}, "train": {"steps": 1}}))
    argv = ["train", "--config", str(config), "--width", "0", "--out", str(tmp_path / "b")]
    assert _errors(argv, capsys) == (2, ["isometry train: error: --width: must be an integer "
                                         ">= 1, got 0"])  # fmt: skip


def test_help_shows_every_default(capsys):
    parser = cli.build_parser()
    shown = 0
    for name, command in parser.commands.items():
        text = " ".join(command.format_help().split())
        for action in command._actions:  # argparse's arguments of the parser
            default = cli._shown_default(action.default)
            if action.option_strings and default is not None:
                assert f"(default: {default})" in text, (name, action.dest)
                shown += 1
    assert shown >= 30
    with pytest.raises(SystemExit) as exc:
        cli.main(["phase-diagram", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exc.value.code == 0
    for default in (
        "--sigma-w2 LO:HI:N (default: 0.5:5:181)",
        "(default: 0:2:81)",
        "(default: results/phase_diagram)",
        "activation name (default: tanh)",
    ):
        assert default in out  # fmt: skip
    spectrum = " ".join(parser.commands["spectrum"].format_help().split())
    assert "(default: 2,8,32,128)" in spectrum and "(default: results/spectrum)" in spectrum
