"""The coordinate check (microsoft/mup's ``coord_check``; Yang et al. 2022, TP5) over width
and over depth, on the toolkit's MLP and on a plain-nnx pre-LN transformer, across seeds.

Claims: under muP (and depth-muP over depth) the slope of log mean|activation| and of log
mean|change since initialization| against log width (depth) is within 0.1 of 0 for every
block and step; under the standard parameterization with Adam the change after the first
step grows with width, slope clearly positive (the theory says 1 for hidden blocks:
``Delta W ~ eta`` entrywise, so ``Delta W x ~ eta n``).

Tolerances, from measurements over seeds (slope mean +- standard deviation over seeds):
at widths 64..512 (toolkit MLP, ReLU, Adam lr 0.01, 6 seeds) every muP slope has
|mean| <= 0.05 with standard deviation <= 0.04 across seeds, so the mean of 3 seeds has a
standard error near 0.02 and the bound 0.1 is more than four standard errors from the
largest measured mean; under SP the first step's change slopes are 0.7 to 1.2 (sd <= 0.2).
What the bound needs, found when it failed:

* the readout at 0 (``zero_readout``, mup's ``readout_zero_init``). Under muP the output at
  initialization has variance ``1/m`` times the standard one (its size slope at ``t = 0`` is
  -0.42 +- 0.10), so ``|f_t - f_0|`` mixes a Theta(1) change with a ``m^{-1/2}`` initial
  value: the output's change slope was -0.14 +- 0.09 at widths 64..512 on a batch of 32 (6
  seeds) and within 0.03 on the batch of 16 used here, a transient at small widths that
  mup's README names, which depends on the batch and the targets. At 0 it is gone.
  With the readout at 0 the hidden blocks do not move at ``t = 1`` (no gradient reaches
  them), so their change at ``t = 1`` is 0 and its slope undefined (NaN, skipped).
* a learning rate that does not collapse the activations: at Adam lr 0.03 the last hidden
  layer's mean |activation| falls from 0.56 to 0.2 in four steps, a cancellation whose
  ``1/sqrt(n)`` finite-width corrections give size slopes 0.12 +- 0.04 at widths 64..1024
  (the per-width values 0.20 -> 0.26 approach a limit like ``n^{-1/2}``).
* over depth, a branch whose output has mean zero: depth-muP's ``1/sqrt(L)`` sums ``L``
  independent branches, which stay O(1) only when each is centred. The toolkit's residual
  MLP adds ``alpha relu(x W + b)`` (no matrix after the nonlinearity): a positive mean in
  every coordinate adds up coherently and the stream grows like ``sqrt(L)`` and beyond
  (size slopes 0.3 to 0.8 over depths 4..64). With ``tanh`` (odd, so ``tanh(x W)`` is
  centred over the weights) or the transformer (``W_2`` after the nonlinearity) the slopes
  are within 0.03. The first block's own change is ``O(1/L)`` by design (each block moves the
  stream by ``1/L``), so its slope (-0.13) is not a claim: the middle and last blocks (the
  stream after ``L/2`` and ``L`` blocks) and the output are.
"""

import jax
import numpy as np
import pytest
from param_models import PlainTransformer, toolkit_mlp

from isometry import probe

WIDTHS = (32, 64, 128)
LR = 0.01
SEEDS = 3


def _mlp_check(kind, sizes=WIDTHS, over="width", seeds=SEEDS, steps=3, **kw):
    x = jax.random.normal(jax.random.key(1), (16, 16))
    if over == "width":

        def factory(w, rngs):
            return toolkit_mlp(w, rngs, kind)
    else:

        def factory(L, rngs):
            return toolkit_mlp(64, rngs, kind, depth=L, residual=True, activation="tanh")

    return probe.coord_check(factory, sizes, x, "adam", learning_rate=LR, parameterization=kind,
                             seeds=seeds, steps=steps, over=over, **kw)  # fmt: skip


def _tf_check(kind, sizes=WIDTHS, over="width", seeds=SEEDS, **kw):
    # Over depth the output (a few coordinates) needs the larger batch: its mean |y| over 16
    # numbers per seed moves by about 20% between seeds, a slope error near 0.12 for the
    # mean of 3 seeds over depths 4..16 (measured at initialization: local slopes of -0.1
    # to 0.2 at width 32 and 128, depths 4..64, 6 seeds).
    x = jax.random.normal(jax.random.key(1), (16 if over == "depth" else 4, 4, 16))
    if over == "width":

        def factory(w, rngs):
            return PlainTransformer(w, rngs, kind=kind)
    else:

        def factory(L, rngs):
            return PlainTransformer(32, rngs, depth=L, kind=kind)

    return probe.coord_check(factory, sizes, x, "adam", learning_rate=LR, parameterization=kind,
                             seeds=seeds, steps=3, over=over, **kw)  # fmt: skip


def _assert_flat(check, skip_first_block=False, bound=0.1, skip_output=False):
    s = check.slopes()
    k0 = 1 if skip_first_block else 0
    k1 = -1 if skip_output else None
    for name in ("size_mean", "change_mean"):
        v = np.asarray(s[name])[:, k0:k1]
        finite = v[np.isfinite(v)]
        assert finite.size >= v.size // 2, (name, v)
        assert np.all(np.abs(finite) <= bound), (
            name,
            check.blocks,
            v,
            np.asarray(s[name[:-5] + "_std"]),
        )


def _assert_grows(check, minimum=0.4):
    s = np.asarray(check.slopes()["change_mean"])[1]  # the first step
    assert np.all(s > minimum), (check.blocks, s)


@pytest.fixture(scope="module")
def mlp_checks():
    return _mlp_check("standard", steps=2), _mlp_check("mup", steps=2, zero_readout=True)


def test_mlp_mup_is_flat_and_standard_grows(mlp_checks):
    sp, mup = mlp_checks
    assert mup.blocks == ("layer.0", "layer.1", "output") and mup.size.shape == (3, 3, 3, 3)
    _assert_flat(mup)
    _assert_grows(sp)


def test_slopes_are_least_squares_over_seeds(mlp_checks):
    sp, _ = mlp_checks
    s = sp.slopes()
    u = np.log(np.asarray(sp.sizes, float))
    v = np.log(np.asarray(sp.change)[:, :, 2, 1])  # seeds x widths, step 2, block 1
    by_hand = [np.polyfit(u, row, 1)[0] for row in v]
    np.testing.assert_allclose(np.asarray(s["change"])[:, 2, 1], by_hand, rtol=1e-4)
    np.testing.assert_allclose(s["change_std"][2, 1], np.std(by_hand, ddof=1), rtol=1e-4)
    assert np.all(np.isnan(np.asarray(s["change"])[:, 0]))  # no change at initialization


def test_coord_plot_writes_png_and_pdf(mlp_checks, tmp_path):
    fig = probe.coord_plot(*mlp_checks, path=tmp_path / "coord", labels=["SP", "muP"])
    assert [ax.get_title() for ax in fig.axes[:3]] == ["t = 0 (initialization)", "t = 1", "t = 2"]
    assert (tmp_path / "coord.png").stat().st_size > 0 and (tmp_path / "coord.pdf").exists()
    assert fig.axes[0].get_xlabel() == "width" and fig.axes[0].get_yscale() == "log"


@pytest.mark.slow
def test_transformer_mup_is_flat_and_standard_grows():
    _assert_flat(_tf_check("mup", zero_readout=True))
    _assert_grows(_tf_check("standard"))


@pytest.mark.slow
def test_mlp_and_transformer_at_larger_widths():
    """Widths 64..512, 4 seeds: the claims hold as the widths grow (measured: muP slopes
    within 0.06, SP first-step change slopes 0.7 to 1.4)."""
    for check in (_mlp_check, _tf_check):
        _assert_flat(check("mup", sizes=(64, 128, 256, 512), seeds=4, zero_readout=True))
        _assert_grows(check("standard", sizes=(64, 128, 256, 512), seeds=4))


@pytest.mark.slow
def test_depth_mup_is_flat_over_depth_and_branch_scale_one_grows():
    """Blocks 4 to 64 at width 64 (MLP, tanh) and 4 to 16 at width 32 (the transformer,
    whose unrolled blocks compile slowly; at depth 2 its middle block is its first):
    depth-muP flat (the middle and last blocks, and the MLP's output); muP with branch
    scale 1 grows in the middle and last blocks.

    Not asserted: the transformer's output over depth. Behind its final layer norm and mean
    over tokens it does not tell the two apart (branch scale 1: change slopes +0.32, +0.06,
    -0.08 at steps 1..3), and under depth-muP its change slope measured +0.06, +0.10,
    +0.12 with spreads 0.21, 0.13, 0.09 over 4 seeds (depths 4..16, width 32, float32
    inputs), while a float64 draw of the same inputs passed 0.1. Whether this is a finite-
    depth correction at L <= 16 or the noise of a 4-number output is not settled here:
    larger depths of the unrolled plain transformer compile for minutes."""
    mlp = _mlp_check("depth_mup", sizes=(4, 8, 16, 32, 64), over="depth")
    _assert_flat(mlp, skip_first_block=True)
    tf = _tf_check("depth_mup", sizes=(4, 8, 16), over="depth", seeds=4)
    _assert_flat(tf, skip_first_block=True, skip_output=True)
    for check in (_mlp_check("mup", sizes=(4, 8, 16, 32, 64), over="depth"),
                  _tf_check("mup", sizes=(4, 8, 16), over="depth")):  # fmt: skip
        grows = np.asarray(check.slopes()["change_mean"])[1:, 1:3]
        assert np.all(grows > 0.2), grows
