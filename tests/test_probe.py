"""isometry.probe: per-block statistics and Jacobian spectra of plain Flax NNX models."""

import importlib.util
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


def test_blocks_discovery():
    rngs = nnx.Rngs(0)
    assert probe.blocks(PlainMLP(4, 3, rngs=rngs)) == ["layers.0", "layers.1", "layers.2"]
    assert probe.blocks(widening(rngs)) == [f"layers.{i}" for i in range(5)]
    assert probe.blocks(Nested(rngs=rngs)) == [
        "stages.0.blocks.0",
        "stages.0.blocks.1",
        "stages.1.blocks.0",
    ]


@pytest.mark.slow
def test_blocks_discovery_cnn_transformer():
    rngs = nnx.Rngs(0)
    assert probe.blocks(ResCNN(rngs=rngs)) == ["stages.0.blocks.0", "stages.1.blocks.0"]
    assert probe.blocks(Transformer(rngs=rngs)) == ["blocks.0", "blocks.1"]


def test_bad_input_errors():
    rngs = nnx.Rngs(0)
    model = PlainMLP(4, 2, rngs=rngs)
    x = _normal((4, 4))
    with pytest.raises(probe.ProbeError, match=r"'layers\.7'.*available: layers\.0, layers\.1"):
        probe.signal(model, x, at=["layers.7"], key=jax.random.key(0))
    with pytest.raises(probe.ProbeError, match="pass the cut points as at="):
        probe.blocks(nnx.Linear(3, 3, rngs=rngs))
    with pytest.raises(
        probe.ProbeError, match=r"shape \(4, 5\).*'layers\.0' \(Linear\).*\(B, \.\.\., 4\)"
    ):
        probe.signal(model, _normal((4, 5)), key=jax.random.key(0))
    with pytest.raises(probe.ProbeError, match="batch"):
        probe.jacobian_spectra(model, _normal((4,)))
    with pytest.raises(probe.ProbeError, match="key"):
        probe.signal(model, x)
    with pytest.raises(ValueError, match="method"):
        probe.jacobian_spectra(model, x, method="svd")
    with pytest.raises(probe.ProbeError, match=r"slq.*key"):
        probe.jacobian_spectra(model, x, method="slq")


def test_non_finite_names_first_block():
    model = PlainMLP(4, 3, rngs=nnx.Rngs(0))
    model.layers[1].bias[...] = jnp.full((4,), jnp.inf)
    with pytest.raises(probe.ProbeError, match=r"mean_sq is (inf|nan) at block 'layers\.1'"):
        probe.signal(model, _normal((4, 4)), key=jax.random.key(0))


def test_model_is_not_modified():
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=rngs), nnx.BatchNorm(4, rngs=rngs), nnx.tanh)
    before = jax.tree.map(np.asarray, nnx.state(model))
    probe.signal(model, _normal((4, 3)), key=jax.random.key(0))
    after = jax.tree.map(np.asarray, nnx.state(model))
    jax.tree.map(np.testing.assert_array_equal, before, after)


# --------------------------------------------------------------------------- #
# Jacobian spectra equal jax.jacfwd + SVD.
# --------------------------------------------------------------------------- #


def test_spectra_plain_mlp_equal_jacfwd():
    model = PlainMLP(5, 3, rngs=nnx.Rngs(0))
    x = _normal((4, 5))
    res = probe.jacobian_spectra(model, x, method="dense")
    _, outs = model.features(x)
    cum = [_svd2(jax.jacfwd(lambda x0, l=l: model.features(x0)[1][l])(x[0]), 5) for l in range(3)]
    ins = [x, *[jnp.tanh(h) for h in outs[:-1]]]
    loc = [_svd2(jax.jacfwd(model.layers[l])(ins[l][0]), 5) for l in range(3)]
    _assert_spectra(res, cum, loc)
    assert res.method == "dense" and res.dims == ((5, 5, 5),) * 3


def test_spectra_width_changes_equal_jacfwd():
    model = widening(nnx.Rngs(1))
    x = _normal((3, 6))
    res = probe.jacobian_spectra(model, x)
    fns = list(model.layers)

    def upto(x0, l):
        for f in fns[: l + 1]:
            x0 = f(x0)
        return x0

    cum = [_svd2(jax.jacfwd(lambda x0, l=l: upto(x0, l))(x[0]), 6) for l in range(5)]
    ins = [x[0], *[upto(x[0], l) for l in range(4)]]
    loc = [_svd2(jax.jacfwd(fns[l])(ins[l]), ins[l].size) for l in range(5)]
    _assert_spectra(res, cum, loc)
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


@pytest.mark.parametrize(
    "steps", [3, pytest.param(16, marks=pytest.mark.slow)]
)  # fewer Lanczos steps than the dimension; then exact quadrature (S >= dim)
def test_slq_within_stated_w1_bound(steps):
    kw = {"param_dtype": F64, "rngs": nnx.Rngs(4)}
    model = nnx.Sequential(nnx.Linear(6, 10, **kw), nnx.Linear(10, 4, **kw))  # m > n, then m < n
    x = _normal((3, 6))
    dense = probe.jacobian_spectra(model, x, method="dense")
    slq = probe.jacobian_spectra(model, x, method="slq", key=jax.random.key(5), n_steps=steps)
    for name in ("cumulative", "local"):
        for l in range(2):
            nodes, w = getattr(slq, name)[l], getattr(slq, f"{name}_weights")[l]
            lam = getattr(dense, name)[l]
            w1 = spectra.wasserstein1(lam, nodes.ravel(), b_weights=w.ravel())
            bound = getattr(slq, f"{name}_w1_bound")[l]
            assert w1 <= bound, (name, l, steps, float(w1), float(bound))


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


def test_forward_statistics_equal_hand_computation():
    model = PlainMLP(6, 3, rngs=nnx.Rngs(7))
    x = _normal((4, 6))
    got = probe.signal(model, x, key=jax.random.key(0))
    for l, h in enumerate(np.asarray(o) for o in model.features(x)[1]):
        cos = [h[a] @ h[a + 1] / np.linalg.norm(h[a]) / np.linalg.norm(h[a + 1]) for a in (0, 2)]
        np.testing.assert_allclose(got.mean_sq[l], np.mean(h**2), rtol=1e-12)
        np.testing.assert_allclose(got.chan_sq_mean[l], np.mean(h.mean(0) ** 2), rtol=1e-12)
        np.testing.assert_allclose(got.chan_var[l], np.mean(h.var(0)), rtol=1e-12)
        np.testing.assert_allclose(got.pair_cosine[l], np.mean(cos), rtol=1e-12)
    assert np.all(np.isnan(got.branch_var)) and np.all(np.isnan(got.position_cosine))


def test_gradients_equal_hand_computation():
    model = PlainMLP(6, 3, rngs=nnx.Rngs(7))
    x = _normal((4, 6))
    v = _normal((4, 6), seed=9)
    loss = lambda y: jnp.sum(v * y)  # noqa: E731
    got = probe.signal(model, x, loss=loss)
    zeros = [jnp.zeros((4, 6))] * 3
    g_out = jax.grad(lambda d: loss(model.features(x, d)[0]))(zeros)
    np.testing.assert_allclose(got.grad_out_sq, [jnp.sum(g**2) for g in g_out], rtol=1e-10)
    grads = nnx.grad(lambda m: loss(m(x)))(model)
    for l in range(3):
        k, b = grads.layers[l].kernel[...], grads.layers[l].bias[...]
        np.testing.assert_allclose(got.grad_kernel_sq[l], jnp.sum(k**2), rtol=1e-10)
        np.testing.assert_allclose(got.grad_param_sq[l], jnp.sum(k**2) + jnp.sum(b**2), rtol=1e-10)


def test_plain_mlp_agrees_with_signal_measure():
    cfg = networks.MLPConfig(
        depth=4, width=8, activation="tanh", sigma_w2=1.5, sigma_b2=0.05, dtype="float64"
    )
    ref = networks.MLP(cfg, rngs=nnx.Rngs(0))
    plain = PlainMLP(8, 4, rngs=nnx.Rngs(1))
    for l, layer in enumerate(plain.layers):
        layer.kernel[...] = ref.kernel[...][l]
        layer.bias[...] = ref.bias[...][l]
    x = sig.pair_inputs(jax.random.key(2), 8, 8, 0.5)
    fwd, bwd = sig.measure(ref, x, key=jax.random.key(3))
    got = probe.signal(plain, x, key=jax.random.key(3))
    pairs = [("mean_sq", fwd.q), ("pair_cosine", fwd.c), ("grad_out_sq", bwd.grad_preact_sq),
             ("grad_kernel_sq", bwd.grad_weight_sq), ("grad_input_sq", bwd.grad_input_sq),
             ("loss", bwd.loss)]  # fmt: skip
    for name, want in pairs:
        np.testing.assert_allclose(getattr(got, name), want, rtol=1e-10, err_msg=name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_jit_and_dtypes(dtype):
    model = PlainMLP(6, 3, rngs=nnx.Rngs(8), dtype=dtype)
    x = _normal((4, 6), dtype=dtype)
    key = jax.random.key(0)
    eager = probe.signal(model, x, key=key)
    jitted = jax.jit(lambda x: probe.signal(model, x, key=key))(x)
    assert eager.mean_sq.dtype == dtype and jitted.grad_out_sq.dtype == dtype
    tol = 1e-4 if dtype == jnp.float32 else 1e-10
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
    spec = jax.jit(lambda x: probe.jacobian_spectra(model, x, method="dense"))(x)
    assert spec.cumulative[0].dtype == dtype
    np.testing.assert_allclose(
        spec.cumulative_summary["mean"],
        probe.jacobian_spectra(model, x, method="dense").cumulative_summary["mean"],
        rtol=10 * tol,
    )


@pytest.mark.slow
def test_theory_equals_signal_theory_of_the_same_variances():
    width, depth = 256, 6
    plain = PlainMLP(width, depth, rngs=nnx.Rngs(1), sigma_w2=1.5)
    x = sig.pair_inputs(jax.random.key(2), 32, width, 0.5)
    th = probe.theory(plain, x, activation="tanh")
    k = jnp.stack([layer.kernel[...] for layer in plain.layers])
    b = jnp.stack([layer.bias[...] for layer in plain.layers])
    c0 = sig.pair_cosine(x)
    want = sig.theory("tanh", width * jnp.mean(k**2), jnp.mean(b**2), depth, jnp.mean(x**2), c0)
    np.testing.assert_allclose(th["mean_sq"], want.q, rtol=1e-12)
    np.testing.assert_allclose(th["grad_out_sq"], want.grad_preact_sq, rtol=1e-12)
    got = probe.signal(plain, x, key=jax.random.key(3))
    np.testing.assert_allclose(got.mean_sq, th["mean_sq"], rtol=0.15)  # width 256


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
    assert set(np.load(out / "probe.npz")) >= {"cumulative_0", "local_1", "grad_out_sq"}
    assert cli.main(["probe", "no_such_module:build", "--input-shape", "4,4"]) == 2
    assert "cannot import the factory 'no_such_module:build'" in capsys.readouterr().err


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
