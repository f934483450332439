"""``isometry spectrum --theory``: the free-probability law drawn over the measured spectra."""

from __future__ import annotations

import json
import warnings

import jax
import numpy as np
import pytest

from isometry import cli, freeprob, spectra


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
    assert "--theory-points: must be >= 8, got 2" in capsys.readouterr().err


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


# --------------------------------------------------------------------------- #
# The library function behind `isometry spectrum --theory`.
# --------------------------------------------------------------------------- #

# Hard-tanh, orthogonal weights, q* = 0.25 at its critical point (sigma_w2, sigma_b2).
_HARD_TANH = ("hard_tanh", "orthogonal", 0.25, 1.0476692262714444, 0.008895447841074811)
# What the command computed for `_sample()` before the comparison moved into the library
# (the command's own _spectrum_theory, with 40 theory points, float64, XLA's
# default optimization). Old and new code are bitwise equal at either optimization level; levels
# differ by about 1e-9 (relative) in the law's grid and its KS distance, hence rel=1e-7.
_BEFORE = {
    "floor": 5.939873558764492e-26,
    "n_grid": 134,
    2: {"ks": 0.04096433461664795, "below_floor": 0.04513195185732233,
        "measured_below_floor": 0.045, "edge": 1.0976108076761881, "mean": 1.0,
        "var": 0.09533845254288886, "atom_at_zero": 0.04550026389635842,
        "atoms": [1.0476692262714444, 0.9089994722072832],
        "density_sum": 6.60094707757299, "cdf_sum": 24.741097050310472},
    4: {"ks": 0.0959380977373915, "below_floor": 0.044717338134039775,
        "measured_below_floor": 0.045, "edge": 1.2047494851275742, "mean": 1.0,
        "var": 0.19067690508577773, "atom_at_zero": 0.04550026389635842,
        "atoms": [1.097610807676207, 0.8179989444145663],
        "density_sum": 271908.05320451787, "cdf_sum": 29.394524198555263},
}  # fmt: skip


def _sample():
    """``(2, 200)`` squared singular values at depths 2 and 4: 9 zeros, the atom at
    ``sigma_w2^L`` with about its mass, the rest spread linearly over ``[0.05, 1.2]``."""
    act, weights, q, sw, _ = _HARD_TANH
    rows = []
    for depth in (2, 4):
        _, locs, masses = freeprob.spectral_atoms(act, q, depth, weights, sw)
        n_atom = round(200 * float(masses[0]))
        rest = np.linspace(0.05, 1.2, 191 - n_atom)
        rows.append(np.concatenate([np.zeros(9), np.full(n_atom, float(locs[0])), rest]))
    return np.stack(rows)


@pytest.fixture
def x64():
    old = bool(jax.config.read("jax_enable_x64"))
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


def test_compare_to_laws_is_what_the_command_computed(x64):
    eps = float(np.finfo(np.float64).eps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # q* is the fixed point: no warning
        got = spectra.compare_to_laws(*_HARD_TANH, [2, 4], _sample(), eps, points=40)
    assert got.at_fixed_point and got.floor == pytest.approx(_BEFORE["floor"], rel=1e-12)
    for law in got.laws:
        want = _BEFORE[law.depth]
        for key in ("ks", "below_floor", "measured_below_floor", "edge", "mean", "var"):
            assert getattr(law, key) == pytest.approx(want[key], rel=1e-7, abs=1e-15), key
        assert law.atom_at_zero == pytest.approx(want["atom_at_zero"], rel=1e-12)
        np.testing.assert_allclose([law.atom_locations[0], law.atom_masses[0]], want["atoms"],
                                   rtol=1e-12)  # fmt: skip
        assert law.s.size == law.density.size == law.cdf.size == _BEFORE["n_grid"]
        # Grid points within 1e-8 of the edge and the atom: there the density moves by 1e-6.
        assert np.nansum(law.density) == pytest.approx(want["density_sum"], rel=1e-5)
        assert np.nansum(law.cdf) == pytest.approx(want["cdf_sum"], rel=1e-7)
    arrays, record = got.as_arrays(), got.as_record()["theory"]
    assert arrays["theory_s"].shape == (2, _BEFORE["n_grid"])
    assert arrays["theory_atom_locations"].shape == (2, 1)
    np.testing.assert_array_equal(arrays["theory_ks"], [law.ks for law in got.laws])
    assert [d["ks"] for d in record["per_depth"]] == [law.ks for law in got.laws]
    np.testing.assert_allclose(record["per_depth"][0]["atoms"], [_BEFORE[2]["atoms"]], rtol=1e-12)


_BAD = [
    ("nan sample", {"sample": np.full((2, 3), np.nan)}, "sample must be finite"),
    ("one row", {"sample": np.ones((1, 3))}, r"sample must have shape \(len\(depths\), M\)"),
    ("depth 0", {"depths": [0, 2]}, "depths must be an integer >= 1, got 0"),
    ("float depth", {"depths": [2.5, 4]}, "depths must be an integer >= 1, got 2.5"),
    ("eps 0", {"eps": 0.0}, "eps must be > 0.0"),
    ("points 4", {"points": 4}, "points must be an integer >= 8, got 4"),
]


@pytest.mark.parametrize(("kwargs", "match"), [b[1:] for b in _BAD], ids=[b[0] for b in _BAD])
def test_compare_to_laws_bad_input(kwargs, match):
    """Refused before any computation, naming the argument."""
    args = {"depths": [2, 4], "sample": np.ones((2, 3)), "eps": 1e-16, **kwargs}
    points = args.pop("points", 40)
    with pytest.raises(ValueError, match=match):
        spectra.compare_to_laws(*_HARD_TANH, args["depths"], args["sample"], args["eps"],
                                points=points)  # fmt: skip


def test_compare_to_laws_warns_off_the_fixed_point(x64):
    """The theory assumes q^l = q*: other variances get a warning (the command prints it)."""
    act, weights, q, _, _ = _HARD_TANH
    sample = np.linspace(0.1, 1.5, 50)[None]
    with pytest.warns(UserWarning, match=r"q\*=0.25 is not the length fixed point .* 0.309"):
        got = spectra.compare_to_laws(act, weights, q, 1.3, 0.01, [2], sample, 1e-16, points=8)
    assert not got.at_fixed_point and got.q_map == pytest.approx(0.309175, rel=1e-5)
