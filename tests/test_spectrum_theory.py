"""``isometry spectrum --theory``: the free-probability law drawn over the measured spectra."""

from __future__ import annotations

import json

import numpy as np
import pytest

from isometry import cli, freeprob


@pytest.mark.heavy
def test_spectrum_theory_outputs(tmp_path, capsys):
    """Hard-tanh with orthogonal weights: an atom at 0, an atom at sigma_w2^L, a continuous part."""
    out = tmp_path / "spec"
    args = ["spectrum", "--activation", "hard_tanh", "--init", "orthogonal", "--q-star", "0.25",
            "--width", "96", "--depths", "2,4", "--seeds", "2", "--x64", "--theory",
            "--theory-points", "40", "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("KS distance") == 2
    tag = "spectrum_hard_tanh_orthogonal_N96"
    with np.load(out / f"{tag}.npz") as z:
        for key in ("theory_s", "theory_density", "theory_ks", "theory_atom_locations"):
            assert key in z.files
        assert z["theory_s"].shape[0] == 2
        ks = z["theory_ks"]
        locs, masses = z["theory_atom_locations"], z["theory_atom_masses"]
    record = json.loads((out / f"{tag}.json").read_text())["theory"]
    assert "Kolmogorov-Smirnov" in record["distance"]
    for depth, entry, k in zip((2, 4), record["per_depth"], ks, strict=True):
        r = freeprob.singular_value_density("hard_tanh", 0.25, depth, "orthogonal", [1.0])
        assert entry["ks"] == pytest.approx(k)
        assert entry["atom_at_zero"] == pytest.approx(float(r.atom_at_zero))
        [[loc, mass]] = entry["atoms"]
        assert loc == pytest.approx(float(r.atom_locations[0]), rel=1e-12)
        assert mass == pytest.approx(float(r.atom_masses[0]), rel=1e-12)
        # Width 96, two seeds: the measured law is within sampling error of the prediction.
        assert 0.0 <= k < 0.15
    assert np.all(np.isfinite(locs[:, 0])) and np.all(masses[:, 0] > 0.5)
    assert (out / f"{tag}.png").stat().st_size > 1000


def test_spectrum_theory_points_validated(tmp_path, capsys):
    args = ["spectrum", "--theory", "--theory-points", "2", "--out", str(tmp_path)]
    assert cli.main(args) == 2
    assert "theory-points must be >= 8" in capsys.readouterr().err


def test_spectrum_without_theory(tmp_path, capsys):
    out = tmp_path / "plain"
    args = ["spectrum", "--activation", "relu", "--init", "gaussian", "--width", "16",
            "--depths", "1,3", "--seeds", "1", "--method", "eigh", "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    assert "KS distance" not in capsys.readouterr().out
    with np.load(out / "spectrum_relu_gaussian_N16.npz") as z:
        assert z["sq_singular_values"].shape == (1, 1, 2, 16)
        assert not any(k.startswith("theory_") for k in z.files)
    assert "theory" not in json.loads((out / "spectrum_relu_gaussian_N16.json").read_text())
    assert (out / "spectrum_relu_gaussian_N16.png").exists()
