"""The ``lr_transfer`` experiment: its config checks, the optimum finder and the shift, and
one point's training (the rates in one program, ``vmap`` and ``lax.map`` alike).

The tiny run end to end (store, rows, resume) is slow (eight small compiles): it and the
figure's tiny tier (``tests/test_paper_figures.py``) run under ``-m slow``; the default
tests train one width point and one depth point through the same program.
"""

from __future__ import annotations

import numpy as np
import pytest

from isometry import sweep
from isometry.experiments import harness, lr_transfer

TINY = ("widths=8,16", "depths=2,4", "depth_width=8", "log2_lrs=-8,-6,-4", "train.steps=3",
        "train.batch_size=4")  # fmt: skip


def tiny(*more):
    return sweep.apply_overrides(lr_transfer.PRESETS["quick"], [*TINY, *more])


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("log2_lrs=-8,-6", "at least 3 increasing"),
        ("log2_lrs=-4,-6,-8", "at least 3 increasing"),
        ("widths=16", "at least 2 increasing"),
        ("widths=16,8", "at least 2 increasing"),
        ("depths=0,2", "depths"),
        ("seeds=0", "seeds"),
        ("lr_map=scan", "lr_map"),
        ("dataset=imagenet", "dataset"),
        ("width_depth=0", "width_depth"),
        ("train.log_every=5", "log_every"),
    ],
)
def test_config_rejects_bad_values(override, match):
    with pytest.raises(ValueError, match=match):
        tiny(override)


def test_config_rejects_non_finite_rates():
    with pytest.raises(ValueError, match="log2_lrs"):
        lr_transfer.Config(log2_lrs=(-8.0, -6.0, float("inf")))


def test_run_refuses_the_input_dimension_as_a_width(tmp_path):
    with pytest.raises(ValueError, match="input dimension 64"):
        lr_transfer.run(tiny("widths=32,64"), tmp_path, progress=False)


def test_grid_points():
    g = lr_transfer.grid(tiny())
    pts = [(p["sweep"], p["size"], p["kind"]) for p in g.points()]
    assert pts[:4] == [("width", 8, "standard"), ("width", 8, "mup"),
                       ("width", 16, "standard"), ("width", 16, "mup")]  # fmt: skip
    assert pts[4:] == [("depth", 2, "mup"), ("depth", 2, "depth_mup"),
                       ("depth", 4, "mup"), ("depth", 4, "depth_mup")]  # fmt: skip


def test_optimum_is_the_vertex_of_a_parabola():
    x = np.arange(-12.0, -3.0)
    vertex = np.array([-8.3, -6.75, -10.5])
    f = 0.7 * (x - vertex[:, None]) ** 2 + 1.0  # (3, K), exact parabolas
    opt, interior = lr_transfer.optimum(x, f)
    np.testing.assert_allclose(opt, vertex, atol=1e-12)
    assert interior.all()


def test_optimum_edges_and_divergence():
    x = np.array([-6.0, -5.0, -4.0, -3.0])
    f = np.array([[1.0, 2.0, 3.0, 4.0],  # minimum at the low edge
                  [4.0, 3.0, 2.0, np.nan],  # diverged at the top: min at -4, interior
                  [np.inf, np.nan, np.inf, np.nan]])  # fmt: skip
    opt, interior = lr_transfer.optimum(x, f)
    assert opt[0] == -6.0 and not interior[0]
    assert opt[1] == -4.0 and interior[1]  # bracketed by a diverged run: not refined
    assert np.isnan(opt[2]) and not interior[2]
    with pytest.raises(ValueError, match="K >= 3"):
        lr_transfer.optimum(x[:2], f[:, :2])


def test_shift_is_the_slope_in_octaves_per_doubling():
    log2n = np.log2([32.0, 128.0, 256.0, 512.0])
    seeds = np.array([-1.0, -0.5, 0.0])[:, None] * log2n + np.array([[3.0], [1.0], [0.0]])
    np.testing.assert_allclose(lr_transfer.shift(log2n, seeds), [-1.0, -0.5, 0.0], atol=1e-12)
    with pytest.raises(ValueError, match="M >= 2"):
        lr_transfer.shift(log2n[:1], seeds[:, :1])


@pytest.fixture(scope="module")
def digits():
    return harness.load_data("digits")


@pytest.mark.parametrize("point", [
    {"sweep": "width", "size": 16, "kind": "mup"},
    {"sweep": "depth", "size": 3, "kind": "depth_mup"},
])  # fmt: skip
def test_one_program_trains_every_rate_and_seed(point, digits):
    """vmap and lax.map give the same numbers; a rate trained alone gives its row."""
    cfg = tiny("seeds=2", "train.steps=4")
    out = lr_transfer.train_point(cfg, point, digits)
    assert out.shape == (2, 3, 2) and np.all(np.isfinite(out))
    assert np.all((out[..., 1] >= 0) & (out[..., 1] <= 1))
    vm = lr_transfer.train_point(tiny("seeds=2", "train.steps=4", "lr_map=vmap"), point, digits)
    np.testing.assert_allclose(vm, out, rtol=1e-4, atol=1e-5)
    assert not np.allclose(out[0], out[1])  # the seeds differ


@pytest.mark.slow
def test_tiny_run_rows_and_resume(tmp_path):
    cfg = tiny()
    path = lr_transfer.run(cfg, tmp_path, progress=False)
    t = sweep.load_table(path)
    assert len(t["eval_loss"]) == 8 * cfg.seeds * 3 and np.all(np.isfinite(t["eval_loss"]))
    assert lr_transfer.run(cfg, tmp_path, progress=False).read_text() == path.read_text()
    with pytest.raises(sweep.ConfigMismatchError, match="refusing to mix"):
        lr_transfer.run(tiny("seeds=3"), tmp_path, progress=False)
