"""isometry.probe: per-block statistics and Jacobian spectra of plain Flax NNX models."""

import importlib.util
import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from isometry import networks, probe, spectra
from isometry import signal as sig

F64 = jnp.float64


# --------------------------------------------------------------------------- #
# Models written with plain flax.nnx layers (no toolkit classes).
# --------------------------------------------------------------------------- #


class PlainMLP(nnx.Module):
    """``x^l = tanh(W^l x^{l-1} + b^l)``; cut points are the ``nnx.Linear`` outputs ``h^l``."""

    def __init__(self, width, depth, *, rngs, dtype=F64, sigma_w2=1.5):
        init = nnx.initializers.normal((sigma_w2 / width) ** 0.5)
        bias = nnx.initializers.normal(0.2)
        self.layers = nnx.List(
            [
                nnx.Linear(
                    width, width, kernel_init=init, bias_init=bias, param_dtype=dtype, rngs=rngs
                )
                for _ in range(depth)
            ]
        )

    def features(self, x, deltas=None):
        outs = []
        for i, layer in enumerate(self.layers):
            h = layer(x) + (0.0 if deltas is None else deltas[i])
            outs.append(h)
            x = jnp.tanh(h)
        return x, outs

    def __call__(self, x):
        return self.features(x)[0]


def widening(rngs, dtype=F64):
    """A Sequential whose blocks change width (6 -> 10 -> 4 -> 7), activations as blocks."""
    kw = {"param_dtype": dtype, "rngs": rngs}
    return nnx.Sequential(
        nnx.Linear(6, 10, **kw), nnx.tanh, nnx.Linear(10, 4, **kw), nnx.relu, nnx.Linear(4, 7, **kw)
    )


def _example(name):
    """A module of ``examples/`` (the tests probe the examples' own models)."""
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"examples_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ResCNN(c=2, *, rngs, dtype=F64):
    """The ResNet example with one block per stage (widths ``c``, ``2c``), batch norm."""
    seed = int(jax.random.randint(rngs.params(), (), 0, 2**30))
    return _example("probe_resnet_batchnorm").ResNet(c, 1, seed=seed, dtype=dtype)


def Transformer(*, rngs, dtype=F64, residual=True):
    """The transformer example: 2 pre-LN blocks of width 8 on 4 tokens of 4 values."""
    seed = int(jax.random.randint(rngs.params(), (), 0, 2**30))
    mod = _example("probe_transformer")
    return mod.Transformer(8, 2, 2, 4, 4, residual=residual, seed=seed, dtype=dtype)


def resnet_features(m, x):
    """Hand capture: the blocks' inputs and outputs of the ResNet example."""
    x, ins, outs = m.stem(x), [], []
    for stage in m.stages:
        for b in stage.blocks:
            ins.append(x)
            x = b(x)
            outs.append(x)
    return x, ins, outs


def transformer_features(m, x):
    """Hand capture: the blocks' inputs and outputs of the transformer example."""
    x, ins, outs = m.embed(x) + m.pos[...], [], []
    for b in m.blocks:
        ins.append(x)
        x = b(x)
        outs.append(x)
    return x, ins, outs


def _normal(shape, seed=0, dtype=F64):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _pure(model, fn):
    """``fn(copy, *args)`` on a fresh copy of ``model`` (nothing mutates the original)."""
    g, st = nnx.split(model)
    # batch norm keeps float32 running statistics: the copy's, updated and discarded, in float64
    st = jax.tree.map(lambda a: a.astype(F64) if jnp.issubdtype(a.dtype, jnp.floating) else a, st)
    return lambda *a: fn(nnx.merge(g, st, copy=True), *a)


def _svd2(J, n):
    """Squared singular values of a ``jax.jacfwd`` result for an input of ``n`` entries."""
    return np.linalg.svd(np.asarray(J).reshape(-1, n), compute_uv=False) ** 2


def _assert_spectra(res, cum_ref, loc_ref):
    for got, want in zip(res.cumulative, cum_ref, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-8 * want.max())
    for got, want in zip(res.local, loc_ref, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-8 * want.max())


# --------------------------------------------------------------------------- #
# Cut points and errors.
# --------------------------------------------------------------------------- #


class Nested(nnx.Module):
    """Stages of dense blocks: nested cut points ``stages.i.blocks.j``."""

    def __init__(self, *, rngs):
        self.stem = nnx.Linear(4, 4, param_dtype=F64, rngs=rngs)
        self.stages = nnx.List(
            [
                nnx.Dict(blocks=nnx.List([nnx.Linear(4, 4, param_dtype=F64, rngs=rngs)] * n))
                for n in (2, 1)
            ]
        )

    def __call__(self, x):
        x = self.stem(x)
        for stage in self.stages:
            for b in stage.blocks:
                x = jnp.tanh(b(x))
        return x


# --------------------------------------------------------------------------- #
# Shared models and results (each probe pass compiles once per module).
# --------------------------------------------------------------------------- #

WIDTH, DEPTH, BATCH = 6, 3, 4


@pytest.fixture(scope="module")
def mlp():
    """A plain-nnx MLP holding the weights of a ``networks.MLP`` (float64), its batch, key,
    and the probe's signal and dense spectra of it."""
    cfg = networks.MLPConfig(
        depth=DEPTH, width=WIDTH, activation="tanh", sigma_w2=1.5, sigma_b2=0.05
    )
    ref = networks.MLP(cfg, rngs=nnx.Rngs(0), dtype=F64)
    plain = PlainMLP(WIDTH, DEPTH, rngs=nnx.Rngs(1))
    for l, layer in enumerate(plain.layers):
        layer.kernel[...] = ref.kernel[...][l]
        layer.bias[...] = ref.bias[...][l]
    x = sig.pair_inputs(jax.random.key(2), BATCH, WIDTH, 0.5).astype(F64)
    key = jax.random.key(3)
    both = jax.jit(  # one compilation for both (each is also tested on its own below)
        lambda x: (
            probe.signal(plain, x, key=key),
            probe.jacobian_spectra(plain, x, method="dense"),
        )
    )
    got_signal, got_spectra = both(x)
    return {
        "ref": ref,
        "plain": plain,
        "x": x,
        "key": key,
        "signal": got_signal,
        "spectra": got_spectra,
    }


@pytest.fixture(scope="module")
def wide():
    """The widening Sequential (6 -> 10 -> 4 -> 7, activations as blocks) and its dense spectra."""
    model = widening(nnx.Rngs(1))
    x = _normal((3, 6))
    return {"model": model, "x": x, "dense": probe.jacobian_spectra(model, x, method="dense")}


def test_blocks_discovery(mlp, wide):
    assert probe.blocks(mlp["plain"]) == ["layers.0", "layers.1", "layers.2"]
    assert probe.blocks(wide["model"]) == [f"layers.{i}" for i in range(5)]
    assert probe.blocks(Nested(rngs=nnx.Rngs(0))) == [
        "stages.0.blocks.0",
        "stages.0.blocks.1",
        "stages.1.blocks.0",
    ]
    assert probe.blocks(mlp["ref"]) == ["layer.0", "layer.1", "layer.2"]
    assert probe.is_stack(mlp["ref"]) and not probe.is_stack(mlp["plain"])


@pytest.mark.slow
def test_blocks_discovery_cnn_transformer():
    rngs = nnx.Rngs(0)
    assert probe.blocks(ResCNN(rngs=rngs)) == ["stages.0.blocks.0", "stages.1.blocks.0"]
    assert probe.blocks(Transformer(rngs=rngs)) == ["blocks.0", "blocks.1"]


def test_bad_input_errors(mlp):
    model, x, key = mlp["plain"], mlp["x"], jax.random.key(0)
    with pytest.raises(probe.ProbeError, match=r"'layers\.7'.*available: layers\.0, layers\.1"):
        probe.signal(model, x, at=["layers.7"], key=key)
    with pytest.raises(probe.ProbeError, match="pass the cut points as at="):
        probe.blocks(nnx.Linear(3, 3, rngs=nnx.Rngs(0)))
    with pytest.raises(
        probe.ProbeError, match=r"shape \(4, 5\).*'layers\.0' \(Linear\).*\(B, \.\.\., 6\)"
    ):
        probe.signal(model, _normal((4, 5)), key=key)
    with pytest.raises(probe.ProbeError, match="batch"):
        probe.jacobian_spectra(model, _normal((4,)))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        probe.signal(model, jnp.ones((4, 6), jnp.int32), key=key)
    with pytest.raises(probe.ProbeError, match="key"):
        probe.signal(model, x)
    with pytest.raises(ValueError, match="method"):
        probe.jacobian_spectra(model, x, method="svd")
    with pytest.raises(probe.ProbeError, match=r"slq.*key"):
        probe.jacobian_spectra(model, x, method="slq")
    with pytest.raises(probe.ProbeError, match="index must be < the batch size 4"):
        probe.jacobian_spectra(model, x, index=4)
    with pytest.raises(probe.ProbeError, match="is not a module path"):
        probe.theory(model, x, at=["nope"])
    with pytest.raises(ValueError, match="index must be < the batch size 4"):
        probe.theory(model, x, index=4)
    with pytest.raises(probe.ProbeError, match="cannot import the factory 'no_such_module:f'"):
        probe.load_factory("no_such_module:f")
    with pytest.raises(probe.ProbeError, match=r"no callable named 'nope'"):
        probe.load_factory("isometry.probe:nope")


def test_bad_input_errors_toolkit_stack(mlp):
    ref, x, key = mlp["ref"], mlp["x"], jax.random.key(0)
    with pytest.raises(probe.ProbeError, match=r"'layer\.3'.*available: layer\.0, layer\.1, la"):
        probe.signal(ref, x, at=["layer.3"], key=key)
    with pytest.raises(probe.ProbeError, match=r"shape \(4, 5\) does not fit MLP.*\(B, 6\)"):
        probe.jacobian_spectra(ref, _normal((4, 5)))


def test_non_finite_names_first_block():
    model = PlainMLP(4, 3, rngs=nnx.Rngs(0))
    model.layers[1].bias[...] = jnp.full((4,), jnp.inf)
    with pytest.raises(probe.ProbeError, match=r"mean_sq is (inf|nan) at block 'layers\.1'"):
        probe.signal(model, _normal((4, 4)), key=jax.random.key(0))
    model.layers[1].bias[...] = jnp.zeros((4,))
    model.layers[1].kernel[...] = model.layers[1].kernel[...].at[0, 0].set(jnp.nan)
    with pytest.raises(probe.ProbeError, match=r"cumulative spectrum at block 'layers\.1'"):
        probe.jacobian_spectra(model, _normal((4, 4)))


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_non_finite_input_is_named_before_measuring(mlp, bad):
    """A NaN or inf in the batch is refused at the boundary, naming x and the first bad
    example, not blamed on the first block (all three entry points, any model)."""
    model, ref, x, key = mlp["plain"], mlp["ref"], np.array(mlp["x"]), jax.random.key(0)
    x[2, 3] = x[3, 0] = bad
    pattern = r"x must be finite: x\[2, 3\] is (nan|inf) \(example 2 is the first of 2 of the 4"
    for call in (
        lambda m: probe.signal(m, x, key=key),
        lambda m: probe.jacobian_spectra(m, x),
        lambda m: probe.theory(m, x),
    ):
        for m in (model, ref):
            with pytest.raises(probe.ProbeError, match=pattern):
                call(m)


def test_model_is_not_modified_and_input_takes_the_model_dtype():
    """A float64 batch into a float32 batch-norm model is cast to float32 (no dtype warning)."""
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=rngs), nnx.BatchNorm(4, rngs=rngs), nnx.tanh)
    before = jax.tree.map(np.asarray, nnx.state(model))
    x = _normal((4, 3))
    key = jax.random.key(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, want = jax.jit(  # both in one program: one compilation
            lambda x: (
                probe.signal(model, x, key=key),
                probe.signal(model, x.astype("f4"), key=key),
            )
        )(x)
    assert got.mean_sq.dtype == jnp.float32
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    after = jax.tree.map(np.asarray, nnx.state(model))
    jax.tree.map(np.testing.assert_array_equal, before, after)


# --------------------------------------------------------------------------- #
# Jacobian spectra equal jax.jacfwd + SVD.
# --------------------------------------------------------------------------- #


def test_spectra_plain_mlp_equal_jacfwd(mlp):
    model, x, res = mlp["plain"], mlp["x"], mlp["spectra"]

    @jax.jit
    def refs(x):
        outs = model.features(x)[1]
        cum = [jax.jacfwd(lambda x0, l=l: model.features(x0)[1][l])(x[0]) for l in range(DEPTH)]
        ins = [x, *[jnp.tanh(h) for h in outs[:-1]]]
        return cum, [jax.jacfwd(model.layers[l])(ins[l][0]) for l in range(DEPTH)]

    cum, loc = refs(x)
    _assert_spectra(res, [_svd2(J, WIDTH) for J in cum], [_svd2(J, WIDTH) for J in loc])
    assert res.method == "dense" and res.dims == ((WIDTH, WIDTH, WIDTH),) * DEPTH


def _upto(fns, x0, l):
    for f in fns[: l + 1]:
        x0 = f(x0)
    return x0


def test_spectra_width_changes_equal_jacfwd(wide):
    model, x, res = wide["model"], wide["x"], wide["dense"]
    fns = list(model.layers)

    @jax.jit
    def refs(x0):
        cum = [jax.jacfwd(lambda z, l=l: _upto(fns, z, l))(x0) for l in range(5)]
        ins = [x0, *[_upto(fns, x0, l) for l in range(4)]]
        return cum, [jax.jacfwd(fns[l])(ins[l]) for l in range(5)], ins

    cum, loc, ins = refs(x[0])
    _assert_spectra(
        res, [_svd2(J, 6) for J in cum], [_svd2(J, u.size) for J, u in zip(loc, ins, strict=True)]
    )
    assert [c.shape[0] for c in res.cumulative] == [6, 6, 4, 4, 6]


def _batch_coupled_refs(model, features, x, n_blocks):
    """Reference spectra of ``features``: example 0 varies, the rest of the batch is fixed."""
    feats = _pure(model, features)
    _, ins, _ = feats(x)
    cum = [
        _svd2(jax.jacfwd(lambda x0, l=l: feats(x.at[0].set(x0))[2][l][0])(x[0]), x[0].size)
        for l in range(n_blocks)
    ]
    blocks = [_pure(model, lambda m, u, p=p: probe_lookup(m, p)(u)) for p in probe.blocks(model)]
    loc = [
        _svd2(
            jax.jacfwd(lambda u0, l=l: blocks[l](ins[l].at[0].set(u0))[0])(ins[l][0]),
            ins[l][0].size,
        )
        for l in range(n_blocks)
    ]
    return cum, loc


def probe_lookup(m, path):
    for part in path.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


@pytest.mark.slow
def test_spectra_residual_cnn_batchnorm_equal_jacfwd():
    model = ResCNN(2, rngs=nnx.Rngs(2))  # training mode: batch statistics couple the examples
    x = _normal((3, 4, 4, 1))
    res = probe.jacobian_spectra(model, x, method="dense")
    _assert_spectra(res, *_batch_coupled_refs(model, resnet_features, x, 2))
    assert [d[0] for d in res.dims] == [32, 64]


@pytest.mark.slow
def test_spectra_transformer_equal_jacfwd():
    model = Transformer(rngs=nnx.Rngs(3))
    x = _normal((2, 4, 4))
    res = probe.jacobian_spectra(model, x, method="dense")
    _assert_spectra(res, *_batch_coupled_refs(model, transformer_features, x, 2))


def _w1_to_dense(slq, dense, name, l):
    """W1 between the dense spectrum (uniform atoms) and the SLQ measure, in NumPy:
    ``int |F_dense(t) - F_slq(t)| dt`` over the merged atoms."""
    a = np.sort(np.asarray(getattr(dense, name)[l], float))
    b = np.asarray(getattr(slq, name)[l], float).ravel()
    w = np.asarray(getattr(slq, f"{name}_weights")[l], float).ravel()
    order = np.argsort(b)
    b, cw = b[order], np.concatenate([[0.0], np.cumsum(w[order]) / w.sum()])
    t = np.sort(np.concatenate([a, b]))
    F_a = np.searchsorted(a, t[:-1], side="right") / a.size
    F_b = cw[np.searchsorted(b, t[:-1], side="right")]
    return float(np.sum(np.abs(F_a - F_b) * np.diff(t)))


SEEDS = 6


def _slq_within_bound(model, x, n_steps, seeds, at=None):
    """Over ``seeds``, every SLQ spectrum is within its stated W1 bound of the dense one and
    the bound is below the spectrum's range; returns the ratios W1 / bound."""
    dense = probe.jacobian_spectra(model, x, method="dense", at=at)
    kw = {"method": "slq", "n_steps": n_steps, "at": at}
    run = jax.jit(lambda k: probe.jacobian_spectra(model, x, key=k, **kw))
    ratios = []
    for seed in seeds:
        slq = run(jax.random.key(seed))
        for name in ("cumulative", "local"):
            for l in range(len(dense.paths)):
                w1 = _w1_to_dense(slq, dense, name, l)
                bound = float(getattr(slq, f"{name}_w1_bound")[l])
                lam = getattr(dense, name)[l]
                assert w1 <= bound, (seed, name, l, w1, bound)
                assert bound < float(lam.max() - lam.min()), (seed, name, l, bound)
                ratios.append(w1 / bound)
    return ratios


@pytest.mark.parametrize(
    ("steps", "at"), [(3, ["layers.1"]), pytest.param(64, None, marks=pytest.mark.slow)]
)  # fewer Lanczos steps than every dimension (quadrature term), at the second block (m < n:
# the Gram route) by default; in the slow set the default 64 steps, capped at the dimension
# (exact quadrature: the probes' term alone), at both blocks (m > n too)
def test_slq_within_stated_w1_bound_over_seeds(steps, at):
    kw = {"param_dtype": F64, "rngs": nnx.Rngs(4)}
    model = nnx.Sequential(nnx.Linear(6, 10, **kw), nnx.Linear(10, 4, **kw))  # m > n, then m < n
    ratios = _slq_within_bound(model, _normal((3, 6)), steps, range(10, 10 + SEEDS), at)
    assert max(ratios) > 0.02  # the bound is not orders of magnitude off


def test_slq_w1_bound_formula():
    """``R (pi / (4 S) [S < dim] + 1 / sqrt(2 delta dim P))``: below ``R`` at the defaults
    (16 probes, 64 steps) for every dimension, and zero quadrature term once ``S >= dim``."""
    nodes = jnp.tile(jnp.linspace(0.5, 2.5, 64), (16, 1))
    result = spectra.SLQResult(nodes=nodes, weights=jnp.full((16, 64), 1 / 64), n=4096)
    for dim in (1, 8, 64, 65, 256, 4096):
        got = float(probe.slq_w1_bound(result, dim))
        quad = np.pi / 256 if dim > 64 else 0.0
        np.testing.assert_allclose(got, 2.0 * (quad + 1 / np.sqrt(2 * 0.05 * dim * 16)))
        assert got < 2.0
    assert float(probe.slq_w1_bound(result, 256)) < 0.07 * 2.0
    with pytest.raises(ValueError, match="delta"):
        probe.slq_w1_bound(result, 8, delta=1.5)


# --------------------------------------------------------------------------- #
# Forward statistics and gradients.
# --------------------------------------------------------------------------- #


@pytest.mark.slow
def test_forward_statistics_cnn_equal_hand_computation():
    model = ResCNN(2, rngs=nnx.Rngs(6))
    x = _normal((4, 4, 4, 1))
    got = probe.signal(model, x, key=jax.random.key(0))
    _, _, outs = _pure(model, resnet_features)(x)
    for l, y in enumerate(np.asarray(o) for o in outs):
        f = y.reshape(4, -1)
        cos = [f[a] @ f[a + 1] / np.linalg.norm(f[a]) / np.linalg.norm(f[a + 1]) for a in (0, 2)]
        t = y.reshape(4, -1, y.shape[-1])
        u = t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-300)
        g = np.einsum("bsc,btc->bst", u, u)
        T = t.shape[1]
        want = {
            "mean_sq": np.mean(y**2),
            "chan_sq_mean": np.mean(y.mean(axis=(0, 1, 2)) ** 2),
            "chan_var": np.mean(y.var(axis=(0, 1, 2))),
            "pair_cosine": np.mean(cos),
            "position_cosine": np.mean((g.sum(axis=(1, 2)) - T) / (T * (T - 1))),
        }
        for k, v in want.items():
            np.testing.assert_allclose(getattr(got, k)[l], v, rtol=1e-10, err_msg=k)
    assert np.all(np.isfinite(got.branch_var))  # ResBlock exposes its branch


def test_forward_statistics_equal_hand_computation(mlp):
    model, x, got = mlp["plain"], mlp["x"], mlp["signal"]
    for l, h in enumerate(np.asarray(o) for o in jax.jit(model.features)(x)[1]):
        cos = [h[a] @ h[a + 1] / np.linalg.norm(h[a]) / np.linalg.norm(h[a + 1]) for a in (0, 2)]
        np.testing.assert_allclose(got.mean_sq[l], np.mean(h**2), rtol=1e-12)
        np.testing.assert_allclose(got.chan_sq_mean[l], np.mean(h.mean(0) ** 2), rtol=1e-12)
        np.testing.assert_allclose(got.chan_var[l], np.mean(h.var(0)), rtol=1e-12)
        np.testing.assert_allclose(got.pair_cosine[l], np.mean(cos), rtol=1e-12)
    assert np.all(np.isnan(got.branch_var)) and np.all(np.isnan(got.position_cosine))
    assert got.shapes == ((BATCH, WIDTH),) * DEPTH


def test_gradients_equal_hand_computation(mlp):
    """The default loss is the random projection of ``signal.random_projection_loss(key)``."""
    model, x, got = mlp["plain"], mlp["x"], mlp["signal"]
    loss = sig.random_projection_loss(mlp["key"], x.shape, x.dtype)

    graphdef, state = nnx.split(model)

    @jax.jit
    def refs(state, x):
        m = nnx.merge(graphdef, state)
        zeros = [jnp.zeros_like(x)] * DEPTH
        g_out = jax.grad(lambda d: loss(m.features(x, d)[0]))(zeros)
        return g_out, jax.grad(lambda st: loss(nnx.merge(graphdef, st)(x)))(state)

    g_out, grads = refs(state, x)
    np.testing.assert_allclose(got.grad_out_sq, [jnp.sum(g**2) for g in g_out], rtol=1e-10)
    for l in range(DEPTH):
        k, b = grads["layers"][l]["kernel"][...], grads["layers"][l]["bias"][...]
        np.testing.assert_allclose(got.grad_kernel_sq[l], jnp.sum(k**2), rtol=1e-10)
        np.testing.assert_allclose(got.grad_param_sq[l], jnp.sum(k**2) + jnp.sum(b**2), rtol=1e-10)


def test_plain_mlp_agrees_with_signal_measure(mlp):
    got = mlp["signal"]
    fwd, bwd = jax.jit(lambda x: sig.measure(mlp["ref"], x, key=mlp["key"]))(mlp["x"])
    pairs = [("mean_sq", fwd.q), ("pair_cosine", fwd.c), ("grad_out_sq", bwd.grad_preact_sq),
             ("grad_kernel_sq", bwd.grad_weight_sq), ("grad_input_sq", bwd.grad_input_sq),
             ("loss", bwd.loss)]  # fmt: skip
    for name, want in pairs:
        np.testing.assert_allclose(getattr(got, name), want, rtol=1e-10, err_msg=name)


@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(F64, marks=pytest.mark.slow)])
def test_jit_and_dtypes(mlp, dtype):
    """Under ``jax.jit`` the float64 results are the (compiled) eager ones; a float32 copy of
    the model gives float32 results within float32 rounding of them."""
    model, x = mlp["plain"], mlp["x"]
    project = sig.random_projection_loss(mlp["key"], x.shape, F64)  # the default loss, float64
    both = lambda m, x: (  # noqa: E731
        probe.signal(m, x, loss=lambda y: project(y.astype(F64)).astype(y.dtype)),
        probe.jacobian_spectra(m, x, method="dense"),
    )
    m, tol = model, 1e-12
    if dtype == jnp.float32:
        m, tol = PlainMLP(WIDTH, DEPTH, rngs=nnx.Rngs(0), dtype=dtype), 1e-4
        nnx.update(m, jax.tree.map(lambda a: a.astype(dtype), nnx.state(model)))
    eager = (mlp["signal"], mlp["spectra"])
    sig_j, spec_j = jax.jit(lambda x: both(m, x))(x.astype(dtype))
    assert sig_j.mean_sq.dtype == dtype and spec_j.cumulative[0].dtype == dtype
    assert sig_j.paths == eager[0].paths and spec_j.dims == eager[1].dims
    for a, b in zip(jax.tree.leaves((sig_j, spec_j)), jax.tree.leaves(eager), strict=True):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * float(np.max(np.abs(b))))


# --------------------------------------------------------------------------- #
# The toolkit's own scanned stacks.
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def stack_mlp():
    """A ``networks.MLP`` with an input map (5 -> 6), biases, depth 3, float64."""
    cfg = networks.MLPConfig(
        depth=DEPTH, width=WIDTH, in_dim=5, activation="tanh", sigma_w2=1.5, sigma_b2=0.05
    )
    return networks.MLP(cfg, rngs=nnx.Rngs(4), dtype=F64), _normal((BATCH, 5), seed=5)


def test_toolkit_mlp_equals_signal_measure_and_model_theory(stack_mlp):
    model, x = stack_mlp
    key = jax.random.key(6)
    got = probe.signal(model, x, key=key, at=["layer.0", "layer.2"])
    refs = jax.jit(  # the references and the theories in one compilation
        lambda x: (
            sig.measure(model, x, key=key),
            probe.theory(model, x, at=["layer.0", "layer.2"]),
            sig.model_theory(model, x),
        )
    )
    (fwd, bwd), th, model_th = refs(x)
    pairs = [("mean_sq", fwd.q), ("pair_cosine", fwd.c), ("chan_var", fwd.chan_var),
             ("chan_sq_mean", fwd.chan_sq_mean), ("grad_out_sq", bwd.grad_preact_sq),
             ("grad_kernel_sq", bwd.grad_weight_sq)]  # fmt: skip
    for name, want in pairs:
        np.testing.assert_allclose(getattr(got, name), want[::2], rtol=1e-10, err_msg=name)
    np.testing.assert_allclose(got.grad_input_sq, bwd.grad_input_sq, rtol=1e-10)
    assert np.all(got.grad_param_sq > got.grad_kernel_sq)  # the biases count too
    for name, field in (("mean_sq", "q"), ("pair_cosine", "c"), ("grad_out_sq", "grad_preact_sq")):
        np.testing.assert_allclose(
            th[name], getattr(model_th, field)[::2], rtol=1e-12, err_msg=name
        )


@pytest.mark.slow
def test_toolkit_mlp_spectra_equal_jacfwd(stack_mlp):
    """``d x^l / d u`` (through the input map) and ``d x^l / d x^{l-1}`` of example 1."""
    model, x = stack_mlp
    res = probe.jacobian_spectra(model, x, index=1, at=["layer.2", "layer.0", "layer.1"])
    s = model.stack()

    @jax.jit
    def refs(u0):
        hs = lambda u0: s.hidden_states(s.input_map(u0))  # noqa: E731
        cum = jax.jacfwd(hs)(u0)  # (L, N, 5)
        prev = [s.input_map(u0), *hs(u0)[:-1]]
        loc = [
            jax.jacfwd(lambda h, l=l: s.layer(jax.tree.map(lambda a: a[l], s.params), h))(prev[l])
            for l in range(DEPTH)
        ]
        return cum, loc

    cum, loc = refs(x[1])
    order = (2, 0, 1)
    _assert_spectra(res, [_svd2(cum[l], 5) for l in order], [_svd2(loc[l], WIDTH) for l in order])
    assert res.dims == ((WIDTH, 5, WIDTH),) * 3 and res.index == 1


@pytest.mark.slow
def test_theory_equals_signal_theory_of_the_same_variances():
    """The theory engine on a plain dense tanh network cut at its layers equals the mean-field
    recursion of :func:`isometry.signal.theory` (same variances; inputs in pairs of exactly equal
    mean square and cosine, the homogeneous inputs that recursion assumes), and the measurement
    at width 256 is within 15% of it."""
    width, depth, sw, sb = 256, 6, 1.5, 0.04
    plain = PlainMLP(width, depth, rngs=nnx.Rngs(1), sigma_w2=sw)
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 16, width))
    b = b - np.sum(a * b, -1, keepdims=True) / np.sum(a * a, -1, keepdims=True) * a
    a, b = (v / np.linalg.norm(v, axis=-1, keepdims=True) * np.sqrt(width) for v in (a, b))
    x = jnp.asarray(np.stack([a, 0.5 * a + np.sqrt(0.75) * b], axis=1).reshape(32, width))
    th = probe.theory(plain, x, variances={"layers.*.kernel": sw, "layers.*.bias": sb})
    want = sig.theory("tanh", sw, sb, depth, 1.0, 0.5)
    np.testing.assert_allclose(th["mean_sq"], want.q, rtol=1e-10)
    np.testing.assert_allclose(th["pair_cosine"], want.c, rtol=1e-10)
    g = np.asarray(th["grad_out_sq"])
    np.testing.assert_allclose(g / g[-1], want.grad_preact_sq, rtol=1e-10)
    got = probe.signal(plain, x, key=jax.random.key(3))
    np.testing.assert_allclose(got.mean_sq, th["mean_sq"], rtol=0.15)  # width 256


@pytest.mark.slow
def test_cli_probe_writes_figure_and_numbers(tmp_path, capsys):
    from isometry import cli

    (tmp_path / "factory.py").write_text(
        "from flax import nnx\n"
        "def build():\n"
        "    rngs = nnx.Rngs(0)\n"
        "    lin = lambda a, b: nnx.Linear(a, b, rngs=rngs)\n"
        "    return nnx.Sequential(lin(4, 6), nnx.tanh, lin(6, 4))\n"
    )
    out = tmp_path / "out"
    rc = cli.main(["probe", f"{tmp_path}/factory.py:build", "--input-shape", "4,4",
                   "--at", "layers.0,layers.2", "--out", str(out)])  # fmt: skip
    assert rc == 0
    for name in ("probe.png", "probe.pdf", "probe.json", "probe.npz"):
        assert (out / name).is_file()
    assert set(np.load(out / "probe.npz")) >= {"cumulative_0", "local_1", "grad_out_sq",
                                                "theory_mean_sq"}  # fmt: skip
    assert json.loads((out / "probe.json").read_text())["theory"]["absolute"]
    (tmp_path / "pool.py").write_text(
        "from flax import nnx\n"
        "class Pool(nnx.Module):\n"
        "    def __init__(self):\n"
        "        self.conv = nnx.Conv(2, 2, (3, 3), rngs=nnx.Rngs(0))\n"
        "    def __call__(self, x):\n"
        "        return nnx.max_pool(self.conv(x), (2, 2), padding='SAME')\n"
        "def build():\n"
        "    return nnx.Sequential(Pool(), Pool())\n"
    )
    rc = cli.main(["probe", f"{tmp_path}/pool.py:build", "--input-shape", "2,4,4,2",
                   "--out", str(tmp_path / "pool")])  # fmt: skip
    assert rc == 0 and (tmp_path / "pool" / "probe.json").is_file()
    assert (
        "theory not drawn: no rule for 'reduce_window_max' in layers.0" in capsys.readouterr().out
    )
    (tmp_path / "toolkit.py").write_text(
        "from flax import nnx\n"
        "from isometry import networks\n"
        "def build():\n"
        "    cfg = networks.MLPConfig(depth=3, width=4, activation='tanh')\n"
        "    return networks.MLP(cfg, rngs=nnx.Rngs(0))\n"
    )
    rc = cli.main(["probe", f"{tmp_path}/toolkit.py:build", "--input-shape", "4,4",
                   "--out", str(tmp_path / "stack")])  # fmt: skip
    assert rc == 0 and (tmp_path / "stack" / "probe.png").is_file()
    assert "layer.2" in capsys.readouterr().out


def test_plot_is_a_grid_readable_at_full_size_and_files_get_the_umask_mode(mlp, tmp_path):
    """Two rows of three cells (five panels and the key), about 1,650 x 1,200 pixels; no legend
    overlaps a panel; probe.json and probe.npz get mode 0644 under umask 022 (as the PNG)."""
    import os
    import stat

    import matplotlib.pyplot as plt

    runs = [{"signal": mlp["signal"], "spectra": mlp["spectra"], "label": "a"},
            {"signal": mlp["signal"], "label": "b"}]  # fmt: skip
    fig = probe.plot(*runs)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.axison]
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(panels) == 5 and len(legends) == 6  # one per panel, and the key
    rows = sorted({round(ax.get_position().y0, 3) for ax in panels})
    assert len(rows) == 2
    for leg in legends:
        box = leg.get_window_extent(renderer)
        assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in panels)
    plt.close(fig)
    old = os.umask(0o022)
    try:
        probe.plot(*runs, path=tmp_path / "probe")
        written = probe.save(tmp_path, mlp["signal"], mlp["spectra"])
    finally:
        os.umask(old)
    width, height = plt.imread(tmp_path / "probe.png").shape[1::-1]
    assert 1200 <= width <= 1800 and 900 <= height <= 1400
    for path in [*written, tmp_path / "probe.png"]:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path.name


class ResidualDense(nnx.Module):
    """Blocks ``x + alpha tanh(W x)`` exposing their branch (residual mean-field theory)."""

    def __init__(self, width, depth, alpha, *, rngs):
        init = nnx.initializers.normal((1.0 / width) ** 0.5)
        self.alpha = alpha
        self.layers = nnx.List(
            [
                nnx.Linear(width, width, kernel_init=init, param_dtype=F64, rngs=rngs)
                for _ in range(depth)
            ]
        )

    def __call__(self, x):
        for layer in self.layers:
            x = x + self.alpha * jnp.tanh(layer(x))
        return x


class ResidualBlocks(nnx.Module):
    def __init__(self, width, depth, alpha, *, rngs):
        self.blocks = nnx.List([ResidualDense(width, 1, alpha, rngs=rngs) for _ in range(depth)])

    def __call__(self, x):
        for b in self.blocks:
            x = b(x)
        return x


@pytest.mark.slow
def test_residual_theory_follows_measured_gradients():
    model = ResidualBlocks(512, 8, 0.5, rngs=nnx.Rngs(0))
    x = sig.pair_inputs(jax.random.key(1), 64, 512, 0.5)
    th = probe.theory(model, x, activation="tanh", residual_scale=0.5)
    got = probe.signal(model, x, key=jax.random.key(2))
    want = th["grad_out_sq"] * got.grad_out_sq[-1] / th["grad_out_sq"][-1]
    np.testing.assert_allclose(got.grad_out_sq, want, rtol=0.05)  # width 512


def test_cli_probe_names_a_factory_it_cannot_import(capsys):
    from isometry import cli

    assert cli.main(["probe", "no_such_module:build", "--input-shape", "4,4"]) == 2
    assert "cannot import the factory 'no_such_module:build'" in capsys.readouterr().err


@pytest.mark.slow
def test_toolkit_convnet_equals_signal_measure_model_theory_and_jacfwd():
    cfg = networks.ConvConfig(
        depth=3, channels=3, kernel_size=3, spatial_dims=1, activation="tanh", sigma_w2=1.5,
        sigma_b2=0.05,
    )  # fmt: skip
    model = networks.ConvNet(cfg, rngs=nnx.Rngs(7), dtype=F64)
    x, key = _normal((4, 5, 3), seed=8), jax.random.key(9)
    got = probe.signal(model, x, key=key)
    fwd, bwd = jax.jit(lambda x: sig.measure(model, x, key=key))(x)
    for name, want in (("mean_sq", fwd.q), ("pair_cosine", fwd.c),
                       ("grad_out_sq", bwd.grad_preact_sq)):  # fmt: skip
        np.testing.assert_allclose(getattr(got, name), want, rtol=1e-10, err_msg=name)
    s = model.stack()
    hs = jax.lax.scan(lambda h, p: (s.layer(p, h), s.step(p, h, None)[1]["preact"]), x, s.params)[1]
    for l, h in enumerate(np.asarray(hs)):  # position cosine of the pre-activations
        u = h / np.linalg.norm(h, axis=-1, keepdims=True)
        g = np.einsum("bsc,btc->bst", u, u)
        np.testing.assert_allclose(got.position_cosine[l], np.mean((g.sum((1, 2)) - 5) / 20))
    th, want = probe.theory(model, x), sig.model_theory(model, x)
    np.testing.assert_allclose(th["mean_sq"], want.q, rtol=1e-12)
    res = probe.jacobian_spectra(model, x, index=2)
    cum = jax.jacfwd(lambda u0: s.hidden_states(x.at[2].set(u0))[:, 2])(x[2])  # (L, 5, 3, 5, 3)
    prev = [x, *s.hidden_states(x)[:-1]]
    ref_loc = []
    for l in range(3):  # the layer acts on each example alone: the batch of one example is exact
        one = jax.jacfwd(lambda h, l=l: s.layer(jax.tree.map(lambda a: a[l], s.params), h[None])[0])
        ref_loc.append(_svd2(one(prev[l][2]), 15))
    _assert_spectra(res, [_svd2(J, 15) for J in cum], ref_loc)


@pytest.mark.slow
def test_slq_within_stated_w1_bound_toolkit_stack(stack_mlp):
    ratios = _slq_within_bound(*stack_mlp, 3, range(3))
    assert max(ratios) > 0.02


@pytest.mark.slow
def test_spectra_plain_mlp_example_equal_jacfwd():
    """The plain-MLP example's own model (weights of a float64 networks.MLP)."""
    plain, _ = _example("probe_plain_mlp").build(6, 3, dtype="float64")
    assert plain.layers[0].kernel[...].dtype == F64
    x = _normal((4, 6))
    res = probe.jacobian_spectra(plain, x, method="dense")
    fns = [f for layer in plain.layers for f in (layer, jnp.tanh)]
    cum = [_svd2(jax.jacfwd(lambda z, l=l: _upto(fns, z, 2 * l))(x[0]), 6) for l in range(3)]
    ins = [x[0], *[_upto(fns, x[0], 2 * l + 1) for l in range(2)]]
    loc = [_svd2(jax.jacfwd(plain.layers[l])(ins[l]), 6) for l in range(3)]
    _assert_spectra(res, cum, loc)
