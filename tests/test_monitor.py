"""isometry.probe.monitor: per-block summaries for a training loop, its log and its figure.

Reference values: the mean square and the gradient norms by hand (``jax.grad``); the
Jacobian's squared singular values from the dense Jacobian (``jax.jacfwd``, or
``probe.jacobian_spectra(method="dense")`` for batch-coupled models). The largest is
exact once the Lanczos steps reach the input dimension ``n`` (the Krylov space is
everything); the mean is exact once the probes reach ``n`` (they are then the unit
vectors), else Hutchinson's estimator, whose standard deviation with ``P``
Rademacher probes is at most ``sqrt(2 sum_i s_i^4 / P) / r`` (``Var z^T A z = 2 (||A||_F^2
- sum_i A_ii^2)``, ``||A||_F^2 = sum s^4``): the tests allow five of them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from isometry import networks, probe
from isometry.jsonlog import MetricsLog

F64 = jnp.float64
P = 16  # Hutchinson probes of the tests


class PlainMLP(nnx.Module):
    """``h^l = W^l tanh(h^{l-1}) + b^l`` (``h^0 = x``); the cut points are the ``h^l``."""

    def __init__(self, width, depth, *, rngs):
        init = nnx.initializers.normal((1.5 / width) ** 0.5)
        self.layers = nnx.List(
            [nnx.Linear(width, width, kernel_init=init, param_dtype=F64, rngs=rngs)
             for _ in range(depth)]
        )  # fmt: skip

    def __call__(self, x, deltas=None):
        for i, layer in enumerate(self.layers):
            x = layer(x if i == 0 else jnp.tanh(x)) + (0.0 if deltas is None else deltas[i])
        return x


class ResBlock(nnx.Module):
    """``relu(x + BN(conv(relu(BN(conv(x))))))``, batch norm in training mode."""

    def __init__(self, c, *, rngs):
        kw = {"param_dtype": F64, "rngs": rngs}
        self.conv1 = nnx.Conv(c, c, (3, 3), **kw)
        self.bn1 = nnx.BatchNorm(c, **kw)
        self.conv2 = nnx.Conv(c, c, (3, 3), **kw)
        self.bn2 = nnx.BatchNorm(c, **kw)

    def __call__(self, x):
        return nnx.relu(x + self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x))))))


class ResNet(nnx.Module):
    def __init__(self, *, rngs):
        self.stem = nnx.Conv(1, 2, (3, 3), param_dtype=F64, rngs=rngs)
        self.blocks = nnx.List([ResBlock(2, rngs=rngs) for _ in range(2)])

    def __call__(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return x


class Block(nnx.Module):
    def __init__(self, d, *, rngs):
        kw = {"param_dtype": F64, "rngs": rngs}
        self.ln1, self.ln2 = nnx.LayerNorm(d, **kw), nnx.LayerNorm(d, **kw)
        self.attn = nnx.MultiHeadAttention(2, d, decode=False, **kw)
        self.fc = nnx.Linear(d, d, **kw)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc(nnx.gelu(self.ln2(x)))


class Transformer(nnx.Module):
    def __init__(self, d=4, *, rngs):
        self.embed = nnx.Linear(3, d, param_dtype=F64, rngs=rngs)
        self.blocks = nnx.List([Block(d, rngs=rngs) for _ in range(2)])

    def __call__(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return x


def _check_jacobian(summary, sv2s, tol_max=1e-8):
    """``summary``'s Jacobian fields against exact spectra ``sv2s[l]`` (module docstring)."""
    for l, s2 in enumerate(sv2s):
        s2 = np.asarray(s2, np.float64)
        sd = np.sqrt(2 * np.sum(s2**2) / P) / s2.size
        np.testing.assert_allclose(summary.jac_sv2_max[l], s2.max(), rtol=tol_max)
        assert abs(float(summary.jac_sv2_mean[l]) - s2.mean()) < 5 * sd + 1e-12, l


@pytest.fixture(scope="module")
def mlp_case():
    """A plain MLP, width 6, depth 3, float64, with a fixed linear loss; its monitor."""
    model = PlainMLP(6, 3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 6), F64)
    w = jax.random.normal(jax.random.key(2), (4, 6), F64)

    def loss(y):
        return jnp.sum(w * y) / 4

    fn = probe.monitor_fn(model, x, loss=loss, n_probes=P, lanczos_steps=6)
    return model, x, loss, fn, fn(model, x, jax.random.key(3))


def test_signal_fields_equal_a_direct_computation(mlp_case):
    model, x, loss, _, s = mlp_case
    deltas = [jnp.zeros((4, 6), F64)] * 3
    hs, h = [], x
    for i, layer in enumerate(model.layers):
        h = layer(h if i == 0 else jnp.tanh(h))
        hs.append(h)
    np.testing.assert_allclose(s.mean_sq, [jnp.mean(h**2) for h in hs], rtol=1e-12)
    g_out = jax.grad(lambda d: loss(model(x, d)))(deltas)
    np.testing.assert_allclose(s.grad_out_sq, [jnp.sum(g**2) for g in g_out], rtol=1e-10)
    grads = nnx.grad(lambda m: loss(m(x)))(model)
    want = [sum(jnp.sum(g**2) for g in jax.tree.leaves(grads["layers"][i])) for i in range(3)]
    np.testing.assert_allclose(s.grad_param_sq, want, rtol=1e-10)
    np.testing.assert_allclose(s.loss, loss(model(x)), rtol=1e-12)


def test_jacobian_fields_against_the_dense_jacobian(mlp_case):
    model, x, _, _, s = mlp_case

    def outs(x0):
        h, out = x0, []
        for i, layer in enumerate(model.layers):
            h = layer(h if i == 0 else jnp.tanh(h))
            out.append(h)
        return out

    Js = jax.jacfwd(outs)(x[0])
    sv2 = [np.linalg.svd(np.asarray(J), compute_uv=False) ** 2 for J in Js]
    _check_jacobian(s, sv2)
    # n = 6 <= P: the probes are the unit vectors, so the mean and the variance are exact
    np.testing.assert_allclose(s.jac_sv2_mean, [v.mean() for v in sv2], rtol=1e-10)
    np.testing.assert_allclose(s.jac_sv2_var, [v.var() for v in sv2], rtol=1e-8)


def test_compiled_once_and_jit_equals_eager(mlp_case):
    model, x, loss, fn, s = mlp_case
    traces = []

    def counted(y):
        traces.append(1)
        return loss(y)

    g = probe.monitor_fn(model, x, loss=counted, n_probes=P, lanczos_steps=6)
    a = g(model, x, jax.random.key(3))
    b = g(model, x + 0.0, jax.random.key(3))
    assert len(traces) == 1  # the second call reuses the program
    np.testing.assert_allclose(a.jac_sv2_max, s.jac_sv2_max, rtol=1e-12)
    np.testing.assert_array_equal(a.mean_sq, b.mean_sq)
    eager = probe.monitor(model, x, key=jax.random.key(3), loss=loss, n_probes=P, lanczos_steps=6)
    jitted = nnx.jit(lambda m, u, k: fn(m, u, k))(model, x, jax.random.key(3))
    for f in probe.monitor.__globals__["FIELDS"]:
        np.testing.assert_allclose(getattr(jitted, f), getattr(eager, f), rtol=1e-10)
        np.testing.assert_allclose(getattr(eager, f), getattr(s, f), rtol=1e-10)


@pytest.mark.slow  # the default suite checks the same fields on the MLP and the toolkit stack
def test_resnet_with_batch_norm_against_dense_spectra():
    """Batch norm in training mode couples the examples: the reference is
    ``jacobian_spectra(method="dense")``, which holds the other examples fixed too."""
    model = ResNet(rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (3, 3, 3, 1), F64)
    s = probe.monitor(model, x, key=jax.random.key(2), n_probes=P, lanczos_steps=x[0].size)
    _check_jacobian(s, probe.jacobian_spectra(model, x, method="dense").cumulative, 1e-6)
    assert np.all(np.asarray(s.grad_param_sq) > 0)


@pytest.mark.slow  # the default suite checks the same fields on the MLP and the toolkit stack
def test_transformer_against_the_dense_jacobian():
    model = Transformer(rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(1), (2, 4, 3), F64)
    s = probe.monitor(model, x, key=jax.random.key(2), n_probes=P, lanczos_steps=x[0].size,
                      jacobian_batch=1)  # fmt: skip

    def outs(u):  # the examples do not interact: example 0 alone
        h, out = model.embed(u[None]), []
        for b in model.blocks:
            h = b(h)
            out.append(h[0].reshape(-1))
        return out

    Js = jax.jit(jax.jacfwd(outs))(x[0])  # (m, 4, 3) each
    sv2 = [np.linalg.svd(np.asarray(J).reshape(J.shape[0], -1), compute_uv=False) ** 2 for J in Js]
    _check_jacobian(s, sv2, 1e-6)


def test_toolkit_stack_jacobian_is_the_stacks():
    """``networks.MLP``: ``J_l = dx^l/dx^0`` of the stack (the training probe's Jacobian)."""
    cfg = networks.MLPConfig(depth=2, width=5, in_dim=3, activation="tanh", q_star=0.5,
                             dtype="float64")  # fmt: skip
    model = networks.MLP(cfg, rngs=nnx.Rngs(0))
    u = jax.random.normal(jax.random.key(1), (2, 3), F64)
    s = probe.monitor(model, u, key=jax.random.key(2), n_probes=P, lanczos_steps=5,
                      examples=2, jacobian_at="layer.1")  # fmt: skip
    st = model.stack()
    x0 = st.input_map(u)
    sv2 = [np.linalg.svd(np.asarray(jax.jacfwd(st.hidden)(x0[i])), compute_uv=False) ** 2
           for i in range(2)]  # fmt: skip
    np.testing.assert_allclose(s.jac_sv2_max[1], max(v.max() for v in sv2), rtol=1e-8)
    assert np.isnan(s.jac_sv2_mean[0]) and np.isfinite(s.jac_sv2_mean[1])
    assert s.mean_sq.shape == (2,)


def test_log_survives_a_torn_line_and_resumes_as_uninterrupted(mlp_case, tmp_path):
    *_, s = mlp_case
    full = probe.MonitorLog(tmp_path / "full.jsonl")
    for step in (0, 5, 10, 15):
        full.write(step, s)
    part = probe.MonitorLog(tmp_path / "sub" / "part.jsonl")
    for step in (0, 5, 10):
        part.write(step, s)
    with open(part.path, "a") as f:  # killed while writing step 15
        f.write('{"step": 15, "blocks": ["layers.0", "lay')
    assert [r["step"] for r in part.read()] == [0, 5, 10]
    assert [r["step"] for r in part.resume(5)] == [0, 5]  # the run resumes from step 5
    for step in (10, 15):
        part.write(step, s)
    assert part.read() == full.read()
    assert part.path.read_text() == full.path.read_text()
    h = probe.read_history(part)
    assert h["mean_sq"].shape == (4, 3) and h["blocks"] == list(s.paths)
    fig = probe.plot_history(h, path=tmp_path / "history", title="test")
    assert (tmp_path / "history.png").is_file() and (tmp_path / "history.pdf").is_file()
    assert [ax.get_yscale() for ax in fig.axes[:5]] == ["log"] * 5


def test_nan_jacobian_fields_are_written_as_null_and_read_as_nan(mlp_case, tmp_path):
    model, x, *_ = mlp_case
    s = probe.monitor(model, x, key=jax.random.key(0), jacobian_at=())
    log = probe.MonitorLog(tmp_path / "m.jsonl")
    log.write(0, s)
    assert MetricsLog(log.path).read()[0]["jac_sv2_max"] == [None] * 3
    assert np.all(np.isnan(probe.read_history(log)["jac_sv2_max"]))


def test_non_finite_state_or_input_is_named(mlp_case):
    model, x, _, fn, _ = mlp_case
    bad = nnx.clone(model)
    bad.layers[1].kernel[...] = bad.layers[1].kernel[...].at[2, 3].set(jnp.nan)
    with pytest.raises(ValueError, match=r"'layers\.1\.kernel.*1 NaN or inf"):
        fn(bad, x, jax.random.key(0))
    with pytest.raises(ValueError, match=r"model state must be finite"):
        probe.monitor(bad, x, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"x must be finite: x\[2, 0\]"):
        fn(model, x.at[2, 0].set(jnp.inf), jax.random.key(0))


BAD = [
    ("examples past the batch", {"examples": 5}, ValueError, "examples <= jacobian_batch"),
    ("jacobian_batch past the batch", {"jacobian_batch": 9}, ValueError, "jacobian_batch 9"),
    ("unknown jacobian_at", {"jacobian_at": ["layers.7"]}, ValueError, "not among the cut"),
    ("unknown at", {"at": ["layers.7"]}, ValueError, "not a module path"),
    ("lanczos_steps 1", {"lanczos_steps": 1}, ValueError, "lanczos_steps"),
    ("n_probes 0", {"n_probes": 0}, ValueError, "n_probes"),
    ("loss not callable", {"loss": 3.0}, TypeError, "loss must be callable"),
]


@pytest.mark.parametrize(("options", "error", "text"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])  # fmt: skip
def test_bad_options_are_named(mlp_case, options, error, text):
    model, x, *_ = mlp_case
    with pytest.raises(error, match=text):
        probe.monitor_fn(model, x, **options)


def test_bad_key_model_and_structure(mlp_case):
    model, x, _, fn, _ = mlp_case
    with pytest.raises(TypeError, match="key"):
        fn(model, x, 0)
    with pytest.raises(TypeError, match=r"flax\.nnx\.Module"):
        probe.monitor_fn(lambda u: u, x)
    with pytest.raises(ValueError, match="structure differs"):
        fn(PlainMLP(6, 2, rngs=nnx.Rngs(0)), x, jax.random.key(0))
    with pytest.raises(TypeError, match="MonitorSummary"):
        probe.MonitorLog("unused.jsonl").write(0, {"mean_sq": [1.0]})
