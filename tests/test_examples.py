"""The scripts in examples/ run at a tiny size and write their figures (slow: compiles)."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "probe_plain_mlp",
        "probe_resnet_batchnorm",
        "probe_transformer",
        "shape_your_resnet",
        "mup_coord_check",
        "monitor_transformer",
    ],
)
def test_example_runs_tiny(name, tmp_path):
    out = _load(name).main(str(tmp_path), tiny=True)
    assert Path(out["figure"]).is_file()
    assert Path(out["figure"]).with_suffix(".pdf").is_file()


@pytest.mark.slow
def test_plain_mlp_example_agrees_with_signal_measure(tmp_path):
    rel = _load("probe_plain_mlp").main(str(tmp_path), tiny=True)["relative_difference"]
    assert max(rel.values()) < 1e-5  # float32


@pytest.mark.slow
def test_shape_your_resnet_theory_is_the_engines_and_dks_is_centred(tmp_path):
    maps = _load("shape_your_resnet").main(str(tmp_path), tiny=True)["maps"]
    dks = maps["DKS softplus"]["theory"]
    assert dks[0] < 0 < dks[-1]  # C_f(0) = 0: negative cosines stay negative
    assert min(maps["ReLU (unshaped)"]["theory"]) > 0  # ReLU maps every pair to c > 0


@pytest.mark.slow
def test_mup_coord_check_example_standard_grows_and_mup_is_flat(tmp_path):
    slopes = _load("mup_coord_check").main(str(tmp_path), tiny=True)["slopes"]
    assert min(slopes["standard", "first"]) > 0.3  # every block and the output
    assert max(abs(slopes["mup", "last"])) < 0.1


@pytest.mark.slow
def test_monitor_transformer_example_writes_its_log_and_trains(tmp_path):
    out = _load("monitor_transformer").main(str(tmp_path), tiny=True)
    assert out["monitor_calls"] == 4  # steps 0, 4, 8, 12
    assert Path(out["log"]).read_text().count("\n") == 4
    assert all(v > 0 for v in out["final_jac_sv2_max"])  # 12 tiny steps: no loss claim
