"""The theory engine (``isometry.theory``), tested three ways.

* Closed forms and limits: a deep linear network's kernel and Jacobian, one
  ReLU layer's arc-cosine kernel (Cho & Saul 2009), the gradient norm at the
  output.
* Monte Carlo: the per-unit output Gram of the same NNX model drawn at widths
  ``N`` and ``2N`` over seeds, extrapolated in ``1/N`` (Richardson: the
  finite-width bias is ``O(1/N)``), within a Bonferroni z-bound of the seeds'
  standard error; the probe's measurements against ``theory.profile`` likewise.
* Second routes: the older theories are special cases (``kernels.nngp/ntk`` of
  dense stacks, ``signal.theory`` on the toolkit's scanned MLPs,
  ``transformer_theory.profile`` on its transformers) and agree to 1e-10; the
  per-block parameter gradients add up to the trace of the standard NTK.
  neural-tangents' own values are in ``test_theory_neural_tangents.py``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import theory_models as M
from flax import nnx
from scipy.stats import norm

from isometry import kernels, networks, probe, signal, theory
from isometry import transformer_theory as tt

jax.config.update("jax_enable_x64", True)

KEY = jax.random.key(0)


def _x(*shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


def _rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# --------------------------------------------------------------------------- #
# Closed forms and limits.
# --------------------------------------------------------------------------- #


def test_deep_linear_network_kernel_and_jacobian_closed_form():
    """``y = W_3 W_2 W_1 x``: ``K = prod sigma_l^2 x x^T / d``; the input Jacobian's mean
    squared singular value is ``prod sigma_l^2 N_L / min(N_L, d)``."""
    d, N = 6, 16
    model = M.MLP(d, N, 3, nnx.Rngs(0), act=lambda h: h)
    s = (1.3, 0.7, 2.0)
    v = {"layers.0.kernel": s[0], "layers.1.kernel": s[1], "layers.2.kernel": s[2]}
    x = _x(4, d)
    K = theory.nngp(model, x, variances=v)
    np.testing.assert_allclose(K, math.prod(s) * x @ x.T / d, rtol=1e-12)
    pr = theory.profile(model, x, at=["layers.2"], variances=v)
    np.testing.assert_allclose(pr.cumulative_mean, [math.prod(s) * N / min(N, d)], rtol=1e-12)


def test_one_relu_layer_is_the_arccosine_kernel():
    """``K = sigma^2 sqrt(q_a q_b) (sin t + (pi - t) cos t) / (2 pi)`` (Cho & Saul 2009)
    at the first layer's covariance ``q = sigma_1^2 x x^T / d + sigma_b^2``."""
    x = _x(5, 7)
    model = M.MLP(7, 32, 2, nnx.Rngs(1))
    K = theory.nngp(model, x, variances={"*kernel": 2.0, "*bias": 0.1})
    Q = 2.0 * x @ x.T / 7 + 0.1
    q = np.diag(Q)
    t = np.arccos(np.clip(Q / np.sqrt(np.outer(q, q)), -1, 1))
    want = 2.0 * np.sqrt(np.outer(q, q)) * (np.sin(t) + (np.pi - t) * np.cos(t)) / (2 * np.pi)
    np.testing.assert_allclose(K, want + 0.1, rtol=1e-12)


def test_gradient_at_the_output_is_the_loss_projection():
    """At a cut point that is the output, ``||dL/dy||^2 = ||v||^2 / B^2``: ``E = B C / B^2``."""
    x = _x(4, 5)
    model = M.MLP(5, 16, 2, nnx.Rngs(0))
    pr = theory.profile(model, x, at=["layers.1"])
    np.testing.assert_allclose(pr.grad_out_sq[-1], 4 * 16 / 4**2, rtol=1e-12)


def test_an_input_shift_inside_the_activation_is_one_elementwise_function():
    """``W_2 relu(W_1 x + 0.5)`` (a constant, not a parameter, added: DKS/TAT's input shift):
    ``K_aa = E[relu(h + b)^2] = (q + b^2) Phi(b / sqrt q) + b sqrt(q) phi(b / sqrt q)``."""

    class Shifted(nnx.Module):
        def __init__(self, rngs):
            self.l1, self.l2 = M.dense(6, 32, rngs), M.dense(32, 3, rngs)

        def __call__(self, x):
            return self.l2(jax.nn.relu(self.l1(x) + 0.5))

    x = _x(4, 6)
    K = theory.nngp(Shifted(nnx.Rngs(0)), x, variances={"*kernel": 1.0, "*bias": 0.0})
    q, b = np.sum(np.asarray(x) ** 2, axis=1) / 6, 0.5
    t = b / np.sqrt(q)
    want = (q + b * b) * norm.cdf(t) + b * np.sqrt(q) * norm.pdf(t)
    np.testing.assert_allclose(np.diag(K), want, rtol=1e-10)


class _Dense2(nnx.Module):
    """``W_2 relu(W_1 x)`` with parameters and computation in ``dtype``."""

    def __init__(self, dtype, rngs):
        kw = dict(param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.l1, self.l2 = nnx.Linear(8, 64, **kw), nnx.Linear(64, 4, **kw)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


def test_a_float32_model_under_float64():
    """A float32 model (``relu`` is ``max(x, 0.0f)``) is read like its float64 copy; the
    kernel is computed in float64 and agrees to the float32 parameters' round-off. The
    model's float32 constants meet the theory's float64 values promoted (they raised)."""
    x = _x(5, 8)
    m32, m64 = _Dense2(jnp.float32, nnx.Rngs(0)), _Dense2(jnp.float64, nnx.Rngs(0))
    nnx.update(m64, jax.tree.map(lambda p: p.astype(jnp.float64), nnx.state(m32)))
    K32 = theory.nngp(m32, x.astype(jnp.float32))
    K64 = theory.nngp(m64, x)
    assert K32.dtype == jnp.float64
    assert _rel(K32, K64) < 1e-6
    # attention logits (a float64 limit) divided by a float32 constant of the model
    tr = M.Transformer(4, 8, 1, 2, nnx.Rngs(0), qk_scale=0.01, dtype=jnp.float32)
    pr = theory.profile(tr, _x(2, 3, 4).astype(jnp.float32), jacobian=False)
    assert np.all(np.isfinite(np.asarray(pr.mean_sq)))


# --------------------------------------------------------------------------- #
# Second routes: the older theories are special cases.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("act", ["relu", "tanh", "erf"])
def test_dense_stack_equals_kernels_module(act):
    fn = {"relu": jax.nn.relu, "tanh": jnp.tanh, "erf": jax.scipy.special.erf}[act]
    x = _x(5, 7)
    model = M.MLP(7, 32, 4, nnx.Rngs(0), act=fn)
    v = {"*kernel": 1.7, "*bias": 0.1}
    assert _rel(theory.nngp(model, x, variances=v), kernels.nngp(act, x, 4, 1.7, 0.1)) < 1e-10
    assert _rel(theory.ntk(model, x, "ntk", variances=v), kernels.ntk(act, x, 4, 1.7, 0.1)) < 1e-10


def _exact_pairs(d, p0, c0, pairs=2):
    """Pairs of zero-mean inputs with mean square exactly ``p0`` and cosine exactly ``c0``
    (the homogeneous inputs ``signal.theory`` assumes)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(pairs):
        a, b = rng.standard_normal((2, d))
        a, b = a - a.mean(), b - b.mean()
        b = b - (a @ b) / (a @ a) * a
        a, b = (v / np.linalg.norm(v) * np.sqrt(p0 * d) for v in (a, b))
        out += [a, c0 * a + np.sqrt(1 - c0**2) * b]
    return jnp.asarray(np.stack(out))


@pytest.mark.parametrize(("act", "residual"), [("tanh", False), ("relu", True)])
def test_toolkit_mlp_equals_signal_theory(act, residual):
    """On a scanned ``networks.MLP`` cut at its layers: ``mean_sq`` of ``x^l`` is
    ``(q^{l+1} - sigma_b2) / sigma_w2``; gradients relative to the last layer equal the
    mean-field backward recursion (states and weights)."""
    cfg = networks.MLPConfig(depth=5, width=32, activation=act, init="gaussian", sigma_w2=1.3,
                             sigma_b2=0.0 if residual else 0.05, residual=residual,
                             dtype="float64")  # fmt: skip
    model = networks.MLP(cfg, rngs=nnx.Rngs(0))
    sw, sb = cfg.variances()
    x = _exact_pairs(32, 0.8, 0.3)
    pr = theory.profile(model, x, variances={"kernel": sw, "bias": sb})
    th = signal.model_theory(model, x, finite_width=False)
    if not residual:
        assert _rel(pr.mean_sq[:-1], (th.q[1:] - sb) / sw) < 1e-10
    assert _rel(pr.grad_out_sq / pr.grad_out_sq[-1], th.grad_state_sq) < 1e-10
    assert _rel(pr.grad_kernel_sq / pr.grad_kernel_sq[-1], th.grad_weight_sq) < 1e-10


@pytest.mark.parametrize(
    ("position", "residual", "causal"),
    [("pre", True, False), ("post", True, True),
     pytest.param("none", True, False, marks=pytest.mark.slow),  # the same rules, recombined
     pytest.param("pre", False, False, marks=pytest.mark.slow)],
)  # fmt: skip
def test_toolkit_transformer_equals_transformer_theory(position, residual, causal):
    """The token Gram after every block of a ``networks.Transformer`` equals
    ``transformer_theory.profile``'s (uniform attention: query/key variance 1e-4; tokens
    of zero feature mean and layer norm's eps negligible, as that theory assumes)."""
    cfg = networks.TransformerConfig(
        depth=3, width=32, heads=4, norm_position=position, residual=residual, causal=causal,
        qk_sigma_w2=1e-4, dtype="float64", activation="erf", norm_eps=1e-14,
    )  # fmt: skip
    model = networks.Transformer(cfg, rngs=nnx.Rngs(0))
    x = _x(2, 5, 32)
    x = x - x.mean(-1, keepdims=True)
    sw, _ = cfg.variances()
    v = {"blocks.query": 1e-4, "blocks.key": 1e-4, "blocks.value": 1.0, "blocks.out": 1.0,
         "blocks.mlp_out": 1.0, "blocks.mlp_in": sw}  # fmt: skip
    grams = theory.grams(model, x, variances=v)
    want = tt.profile(cfg, tt.token_gram(x), 5).gram
    for l, G in enumerate(grams):
        assert _rel(G.reshape(10, 10), want[l]) < 1e-10


def test_block_gradients_add_up_to_the_standard_ntk():
    """``sum_l grad_param_sq^l = C tr(Theta_std) / B^2`` when the blocks hold every
    parameter: two routes through the tangent machinery (per block and all at once)."""
    x = _x(3, 6)
    model = M.ResMLP(6, 16, 2, nnx.Rngs(0), norm=True)
    pr = theory.profile(model, x, at=["embed", "blocks.0", "blocks.1"])
    ntk = theory.ntk(model, x, "standard")
    np.testing.assert_allclose(np.sum(pr.grad_param_sq), 16 * np.trace(ntk) / 9, rtol=1e-10)


# --------------------------------------------------------------------------- #
# Monte Carlo of the same models.
# --------------------------------------------------------------------------- #


def _zmax(m: int, alpha: float = 1e-3) -> float:
    """Bonferroni two-sided z bound for ``m`` comparisons at family-wise level ``alpha``."""
    return float(norm.ppf(1 - alpha / (2 * m)))


def _output_grams(factory, x, width, seeds):
    """``(seeds, n, n)`` per-unit output Grams ``y y^T / C`` of ``factory(width, rngs)``,
    drawn and run in one compiled program (seeds ``100, 101, ...``)."""

    def gram(seed):
        y = factory(width, nnx.Rngs(jax.random.key(seed)))(x)
        y = y.reshape(-1, y.shape[-1])
        return y @ y.T / y.shape[-1]

    return np.asarray(jax.jit(lambda s: jax.lax.map(gram, s))(100 + jnp.arange(seeds)))


def _check_monte_carlo(factory, x, width, seeds, variances=None, resolution=0.15):
    """Richardson-extrapolated Monte Carlo (``2 G(2N) - G(N)``) against the engine's NNGP
    (at the nominal variances: the model's own initializers' unless ``variances``)."""
    K = np.asarray(theory.nngp(factory(width, nnx.Rngs(0)), x, variances=variances))
    K = K.reshape(math.isqrt(K.size), -1)
    g1, g2 = (_output_grams(factory, x, w, seeds) for w in (width, 2 * width))
    est = 2 * g2 - g1
    se = np.std(est, axis=0, ddof=1) / np.sqrt(seeds)
    z = np.abs(est.mean(0) - K) / np.maximum(se, 1e-12 * np.max(np.abs(K)))
    bound = _zmax(K.size)
    assert np.max(z) < bound, f"max z {np.max(z):.2f} >= {bound:.2f}"
    # and the test can fail: it resolves an error of `resolution` of the kernel's scale
    assert bound * np.max(se) < resolution * np.max(np.abs(K)), (np.max(se), np.max(np.abs(K)))


CASES = {
    "mlp_layernorm": (lambda w, r: M.MLP(6, w, 3, r, norm=True, act=jnp.tanh), (4, 6)),
    "dense_resnet": (lambda w, r: M.ResMLP(6, w, 2, r), (4, 6)),
    "cnn_same_pool": (lambda w, r: M.CNN(3, w, r), (3, 8, 8, 3)),
    "cnn_valid_flatten": (
        lambda w, r: M.CNN(3, w, r, padding="VALID", head="flatten", size=14),
        (3, 14, 14, 3),
    ),
    "conv_resnet": (lambda w, r: M.ConvResNet(3, w, 2, r), (3, 6, 6, 3)),
    "rnn": (lambda w, r: M.RNN(3, w, r), (3, 4, 3)),
    "transformer_pre_ln": (lambda w, r: M.Transformer(4, w, 2, 4, r, qk_scale=0.02), (2, 5, 4)),
    "transformer_post_ln": (
        lambda w, r: M.Transformer(4, w, 2, 4, r, pre=False, qk_scale=0.02),
        (2, 5, 4),
    ),
}


@pytest.mark.parametrize(
    ("case", "width", "seeds"),
    # by default the probe's Monte Carlo of the dense ResNet (test_profile_matches_the_probe)
    [pytest.param("mlp_layernorm", 256, 64, marks=pytest.mark.slow),
     pytest.param("dense_resnet", 256, 64, marks=pytest.mark.slow)],
)  # fmt: skip
def test_monte_carlo_default(case, width, seeds):
    """Two dense architectures by default (every architecture: the slow test below)."""
    factory, shape = CASES[case]
    _check_monte_carlo(factory, _x(*shape, seed=3), width, seeds)


WIDE = {"cnn_same_pool": (128, 48, 0.25), "cnn_valid_flatten": (128, 48, 0.25),
        "conv_resnet": (128, 48, 0.25), "transformer_pre_ln": (256, 48, 0.15),
        "transformer_post_ln": (256, 48, 0.15)}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_monte_carlo_every_architecture(case):
    """Every architecture, at widths ``N, 2N`` (``N`` 512 for dense models and the RNN over
    64 seeds, 128 channels for convolutions and 256 for transformers over 48). The pooled
    convolutional kernels fluctuate more between draws: at this cost the test resolves
    errors of 25% of their scale (15% for the others)."""
    factory, shape = CASES[case]
    width, seeds, resolution = WIDE.get(case, (512, 64, 0.15))
    _check_monte_carlo(factory, _x(*shape, seed=3), width, seeds, resolution=resolution)


def _probe_rows(factory, x, width, seeds, at=None):
    rows = {"mean_sq": [], "pair_cosine": [], "grad_out_sq": [], "cumulative_mean": []}
    for s in range(seeds):
        model = factory(width, nnx.Rngs(100 + s))
        sig = probe.signal(model, x, at=at, key=jax.random.key(500 + s))
        spec = probe.jacobian_spectra(model, x, at=at, method="dense")
        for k in rows:
            v = spec.cumulative_summary["mean"] if k == "cumulative_mean" else getattr(sig, k)
            rows[k].append(np.asarray(v))
    return {k: np.stack(v) for k, v in rows.items()}


@pytest.mark.parametrize(
    ("case", "width", "seeds"),
    [("dense_resnet", 256, 6),
     pytest.param("transformer_pre_ln", 128, 4, marks=pytest.mark.slow),
     pytest.param("conv_resnet", 128, 4, marks=pytest.mark.slow)],
)  # fmt: skip
def test_profile_matches_the_probe(case, width, seeds):
    """Per block: mean square, pair cosine, gradient norm and the cumulative Jacobian's
    mean squared singular value, measured by the probe over seeds."""
    factory, shape = CASES[case]
    x = _x(*shape, seed=4)
    pr = theory.profile(factory(width, nnx.Rngs(0)), x)
    rows = _probe_rows(factory, x, width, seeds)
    bound = _zmax(4 * len(pr.paths))
    for k, v in rows.items():
        se = np.std(v, axis=0, ddof=1) / np.sqrt(len(v))
        z = np.abs(v.mean(0) - np.asarray(getattr(pr, k))) / (se + 1e-12)
        # finite width: the measured mean is off by O(depth / N) of the value
        slack = 3 * len(pr.paths) / width * np.abs(np.asarray(getattr(pr, k))) / (se + 1e-12)
        assert np.all(z < bound + slack), f"{k}: z = {np.round(z, 2)}"


# --------------------------------------------------------------------------- #
# Bad input.
# --------------------------------------------------------------------------- #


class _MaxPool(nnx.Module):
    def __init__(self, rngs):
        self.conv = M.conv(3, 8, rngs)

    def __call__(self, x):
        return nnx.max_pool(self.conv(x), (2, 2), (2, 2))


class _Loop(nnx.Module):
    def __init__(self, rngs):
        self.fc = M.dense(4, 4, rngs)

    def __call__(self, x):
        return jax.lax.while_loop(lambda c: jnp.sum(c) < 10.0, self.fc, x)


class _Dropout(nnx.Module):
    def __init__(self, rngs):
        self.fc = M.dense(4, 16, rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(self.fc(x))


class _BatchNorm(nnx.Module):
    def __init__(self, rngs):
        self.fc = M.dense(4, 16, rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs, param_dtype=jnp.float64)
        self.out = M.dense(16, 16, rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.bn(self.fc(x))))


class _Tokens(nnx.Module):
    """A parameter mixing positions (a token-mixing MLP): no infinite-width rule."""

    def __init__(self, rngs):
        self.mix = nnx.Param(jax.random.normal(rngs.params(), (5, 5)))
        self.fc = M.dense(4, 8, rngs)

    def __call__(self, x):
        return self.fc(jnp.einsum("st,btd->bsd", self.mix[...], x))


@pytest.mark.parametrize(
    ("make", "shape", "match"),
    [
        (_MaxPool, (2, 4, 4, 3), "max pooling"),
        (_Loop, (2, 4), "data-dependent control flow"),
        (_Dropout, (2, 4), "dropout"),
        (_Tokens, (2, 5, 4), "structure axes but not the width"),
    ],
)
def test_operations_without_a_rule_are_named(make, shape, match):
    with pytest.raises(theory.TheoryError, match=match):
        theory.nngp(make(nnx.Rngs(0)), jnp.ones(shape))


def test_batch_norm_training_mode_is_named_and_evaluation_mode_is_covered():
    x = _x(4, 4)
    model = _BatchNorm(nnx.Rngs(0))
    with pytest.raises(theory.TheoryError, match="batch norm in training mode"):
        theory.nngp(model, x)
    model.eval()  # running statistics at their start: y = x / sqrt(1 + eps)
    plain = M.MLP(4, 16, 2, nnx.Rngs(0))
    K = theory.nngp(model, x, variances={"*kernel": 2.0})
    scale = 1.0 / (1.0 + model.bn.epsilon)
    want = theory.nngp(plain, x / 1.0, variances={"layers.0.kernel": 2.0 * scale,
                                                  "layers.1.kernel": 2.0})  # fmt: skip
    assert _rel(K, want) < 1e-12


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (jnp.full((3, 6), jnp.nan), probe.ProbeError, "x must be finite"),
        (jnp.ones((0, 6)), probe.ProbeError, "B >= 1"),
        (jnp.ones((3, 5)), theory.TheoryError, "does not fit"),
    ],
)
def test_bad_inputs_are_refused_at_the_boundary(x, error, match):
    with pytest.raises(error, match=match):
        theory.nngp(M.MLP(6, 8, 2, nnx.Rngs(0)), x)


def test_bad_arguments():
    model = M.MLP(6, 8, 2, nnx.Rngs(0))
    x = _x(3, 6)
    with pytest.raises(ValueError, match="parameterization"):
        theory.ntk(model, x, "mup")
    with pytest.raises(TypeError, match="variances"):
        theory.nngp(model, x, variances=[("*kernel", 1.0)])
    with pytest.raises(ValueError, match="variances"):
        theory.nngp(model, x, variances={"*kernel": -1.0})
    with pytest.raises(probe.ProbeError, match="not a module path"):
        theory.profile(model, x, at=["nope"])
    bad = M.MLP(6, 8, 2, nnx.Rngs(0))
    bad.layers[0].kernel[...] = bad.layers[0].kernel[...].at[0, 0].set(jnp.inf)
    with pytest.raises(theory.TheoryError, match=r"layers\.0\.kernel"):
        theory.nngp(bad, x)


def test_attention_fluctuation_is_reported():
    """Standard query/key variance: the logits fluctuate with standard deviation O(1) around
    their limit; the engine says so (the prediction is the uniform-attention limit)."""
    model = M.Transformer(4, 32, 1, 4, nnx.Rngs(0))
    with pytest.warns(UserWarning, match="fluctuation"):
        theory.nngp(model, _x(2, 5, 4))
