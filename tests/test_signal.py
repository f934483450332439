"""Signal propagation measured on width-1,000 networks against mean-field theory.

Tolerances come from the fluctuations of one finite network (float64):

* forward: given layer l-1, the N pre-activations of layer l are i.i.d.
  Gaussian, so log q-hat has variance 2/N and a pair cosine (1 - c^2)^2 / N
  (an upper bound for batch averages). These one-layer errors are carried
  through the maps linearized at the theory (the linear-noise approximation):
  Sigma^l = J^l Sigma^{l-1} J^l^T + diag(2/N, (1 - c_l^2)^2 / N).
* backward: one layer multiplies ||g||^2 by sigma_w2 sum_i phi'(h_i)^2 y_i^2
  with y = W g: relative variance (3 mu2/mu1^2 - 1 + 2) / N, summed over the
  layers between the two gradients compared.

Comparisons are at Z standard deviations.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from isometry import gaussian as gs
from isometry import meanfield, signal
from isometry import networks as nw
from isometry.activations import get as get_act

Z = 4.5
N = 1000
B = 16


@pytest.fixture(autouse=True)
def x64():
    old = bool(jax.config.read("jax_enable_x64"))
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


def pair_inputs(key, p0=1.0, c0=0.5, batch=B, width=N):
    """``batch`` inputs: pairs (2k, 2k+1) with cosine ~c0, mean square ~p0."""
    z = jax.random.normal(key, (batch // 2, 2, width))
    b = c0 * z[:, 0] + np.sqrt(1 - c0**2) * z[:, 1]
    return np.sqrt(p0) * jnp.stack([z[:, 0], b], 1).reshape(batch, width)


def run(cfg, u, seed=0):
    model = nw.MLP(cfg, rngs=nnx.Rngs(seed))
    stack = model.stack()
    fwd, bwd = jax.jit(lambda u: signal.measure(stack, u, key=jax.random.key(seed + 1)))(u)
    return model, jax.tree.map(np.asarray, fwd), jax.tree.map(np.asarray, bwd)


def lna_sd(act, sw, sb, th, width=N):
    """Linear-noise standard deviations of (log q^l, c^l) for one network."""
    q, c = np.asarray(th.q), np.asarray(th.c)
    dq, dc, dcq = (np.asarray(a) for a in _map_slopes(act, sw, sb, q, c))
    cov = np.diag([2.0 / width, (1 - c[0] ** 2) ** 2 / width])
    out = [np.sqrt(np.diag(cov))]
    for l in range(1, len(q)):
        J = np.array([[dq[l - 1], 0.0], [dcq[l - 1], dc[l - 1]]])
        cov = J @ cov @ J.T + np.diag([2.0 / width, (1 - c[l] ** 2) ** 2 / width])
        out.append(np.sqrt(np.diag(cov)))
    out = np.array(out)
    return out[:, 0], out[:, 1]


@functools.partial(jax.jit, static_argnums=0)
def _map_slopes(act, sw, sb, q, c):
    """Slopes of one layer's (log q, c) -> (log q', c') at the theory, vectorized over l."""

    def c_next(logq, cc):
        qq = jnp.exp(logq)
        return (sw * gs.phi_kernel(act, qq, qq, cc) + sb) / (sw * gs.second_moment(act, qq) + sb)

    qp, cp = q[:-1], c[:-1]
    dq = meanfield.q_map_slope(act, qp, sw, sb) * qp / q[1:]
    dc = sw * qp * gs.deriv_kernel(act, qp, qp, cp) / q[1:]
    eps = 1e-5
    dcq = (c_next(jnp.log(qp) + eps, cp) - c_next(jnp.log(qp) - eps, cp)) / (2 * eps)
    return dq, dc, dcq


@functools.partial(jax.jit, static_argnums=0)
def _mu(act, q):
    return gs.dphi_moment(act, q, 1), gs.dphi_moment(act, q, 2)


def grad_sd(act, q, width=N):
    """sd of log(||g_h^l||^2 / ||g_h^L||^2): layers l+1..L contribute (3 mu2/mu1^2 + 1)/N."""
    mu1, mu2 = (np.asarray(a) for a in _mu(get_act(act), jnp.asarray(q, jnp.float64)))
    v = (3 * mu2 / mu1**2 + 1) / width
    tail = np.cumsum(v[::-1])[::-1]  # sum_{k >= l}
    return np.sqrt(np.concatenate([tail[1:], [0.0]]))


def log_ratio(g):
    return np.log(g / g[-1])


# Ordered and chaotic phases; tanh starts at q* so the rate is chi1 at every layer.
PHASES = [
    pytest.param("tanh", 0.8, 0.05, marks=pytest.mark.slow),  # ordered, chi1 ~ 0.65
    ("tanh", 4.0, 0.05),  # chaotic, chi1 ~ 1.34
    ("relu", 1.5, 0.0),  # ordered, chi1 = 0.75 (q -> 0)
    pytest.param("relu", 2.5, 0.0, marks=pytest.mark.slow),  # chaotic, chi1 = 1.25
]


@pytest.mark.parametrize("act, sw, sb", PHASES)
def test_plain_mlp_follows_mean_field(act, sw, sb):
    L = 20
    qs = float(meanfield.q_star(act, sw, sb)) if act == "tanh" else 1.0
    p0 = (qs - sb) / sw
    u = pair_inputs(jax.random.key(7), p0=p0)
    cfg = nw.MLPConfig(depth=L, width=N, activation=act, sigma_w2=sw, sigma_b2=sb, dtype="float64")
    model, fwd, bwd = run(cfg, u)
    th = jax.tree.map(np.asarray, signal.model_theory(model, u))

    # Forward: q^l and c^l follow the iterated maps.
    sd_logq, sd_c = lna_sd(get_act(act), sw, sb, th)
    np.testing.assert_array_less(np.abs(np.log(fwd.q / th.q)), Z * sd_logq)
    np.testing.assert_array_less(np.abs(fwd.c - th.c), Z * sd_c + 1e-9)

    # Backward: ||dL/dh^l||^2 changes by chi^l per layer; chi1 at the fixed point.
    sd_g = grad_sd(act, th.q)
    np.testing.assert_array_less(
        np.abs(log_ratio(bwd.grad_preact_sq) - np.log(th.grad_preact_sq)), Z * sd_g + 1e-9
    )
    chi1 = float(meanfield.chi1(act, sw, sb)) if act == "tanh" else sw / 2
    np.testing.assert_allclose(th.chi[-1], chi1, rtol=1e-6)
    rate = log_ratio(bwd.grad_preact_sq)[0] / (L - 1)
    assert abs(rate - np.log(chi1)) <= Z * sd_g[0] / (L - 1)
    assert (rate < 0) == (chi1 < 1)  # vanish toward the input if ordered, explode if chaotic


@pytest.mark.slow  # figure 7 shows the same; its experiment runs tiny by default
def test_sigmoid_xavier_vanishes_he_relu_does_not():
    L = 12
    u = pair_inputs(jax.random.key(3))
    sig = nw.MLPConfig(depth=L, width=N, activation="sigmoid", init="xavier_normal")
    model, _, bwd = run(sig, u)
    th = signal.model_theory(model, u)
    sd = grad_sd("sigmoid", np.asarray(th.q))[0]
    first_over_last = bwd.grad_preact_sq[0] / bwd.grad_preact_sq[-1]
    # Theory: prod of sigma_w2 mu1(q^l) ~ chi1^(L-1) with chi1 ~ 0.056 (sigmoid' <= 1/4).
    threshold = float(th.grad_preact_sq[0]) * np.exp(Z * sd)
    assert threshold < 1e-10
    assert first_over_last < threshold

    he = nw.MLPConfig(depth=L, width=N, activation="relu", init="he_normal")
    model, _, bwd = run(he, u)
    sd = grad_sd("relu", np.ones(L))[0]
    assert abs(np.log(bwd.grad_preact_sq[0] / bwd.grad_preact_sq[-1])) < Z * sd


def _rate_and_se(g, skip=2):
    """Mean per-layer log growth toward the input and its standard error over layers
    (the first ``skip`` layers, where the input's statistics relax, left out)."""
    d = -np.diff(np.log(g[skip:]))
    return d.mean(), d.std(ddof=1) / np.sqrt(d.size)


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_batch_norm_gradients_explode(act):
    L, width = 15, 500
    u = pair_inputs(jax.random.key(5), width=width)
    for sw in (1.0, 2.0):
        cfg = nw.MLPConfig(
            depth=L, width=width, activation=act, sigma_w2=sw, norm="batch", bias=False
        )
        _, _, bwd = run(cfg, u)
        rate, se = _rate_and_se(bwd.grad_preact_sq)
        assert rate - Z * se > 0, (sw, rate, se)  # per-layer factor exp(rate) > 1


@pytest.mark.slow
def test_batch_norm_linear_rate_falls_with_batch_size():
    L = 15
    rates = {}
    for batch in (8, 32):
        u = pair_inputs(jax.random.key(6), batch=batch)
        cfg = nw.MLPConfig(depth=L, width=N, activation="linear", norm="batch", bias=False)
        _, _, bwd = run(cfg, u)
        rates[batch] = _rate_and_se(bwd.grad_preact_sq)
    (r8, s8), (r32, s32) = rates[8], rates[32]
    assert r32 - Z * s32 > 0
    assert r8 - r32 > Z * np.hypot(s8, s32)


@pytest.mark.slow
def test_layer_norm_removes_the_dependence_on_sigma_w2():
    L, width = 12, 500
    u = pair_inputs(jax.random.key(8), width=width)
    rates = []
    for act, sw in [("relu", 1.0), ("relu", 3.0), ("tanh", 3.0)]:
        cfg = nw.MLPConfig(
            depth=L, width=width, activation=act, sigma_w2=sw, norm="layer", dtype="float64"
        )
        model, fwd, bwd = run(cfg, u)
        th = jax.tree.map(np.asarray, signal.model_theory(model, u))
        # Per-layer factor (1 - 2/N) E[phi'(z)^2] / E[phi(z)^2] from layer 2 on: 1 - 2/N for
        # ReLU whatever sigma_w2 (a plain ReLU network would scale by sigma_w2 / 2).
        e2 = float(gs.second_moment(act, 1.0))
        mu1 = float(gs.dphi_moment(act, 1.0, 1))
        np.testing.assert_allclose(th.chi[1:], (1 - 2 / width) * mu1 / e2, rtol=1e-9)
        sd_g = grad_sd(act, np.ones(L), width=width)
        np.testing.assert_array_less(
            np.abs(log_ratio(bwd.grad_preact_sq) - np.log(th.grad_preact_sq)), Z * sd_g + 1e-9
        )
        np.testing.assert_allclose(fwd.q[1:], sw * e2, rtol=Z * np.sqrt(2 / width))
        rates.append(log_ratio(bwd.grad_preact_sq)[1] / (L - 2))
    # Scale invariant up to the normalization's eps = 1e-5 (relative to variances ~1).
    assert abs(rates[0] - rates[1]) < 1e-5


@pytest.mark.slow
def test_residual_tanh_is_subexponential():
    L, width = 30, 500
    u = pair_inputs(jax.random.key(9), width=width)
    cfg = nw.MLPConfig(depth=L, width=width, activation="tanh", sigma_w2=1.0, residual=True)
    model, fwd, bwd = run(cfg, u)
    th = jax.tree.map(np.asarray, signal.model_theory(model, u))
    # q^l grows linearly (tanh^2 <= 1 is added each layer), not exponentially.
    np.testing.assert_array_less(
        np.abs(np.log(fwd.q / th.q)), Z * np.sqrt(2 * np.arange(1, L + 1) / width)
    )
    assert np.all(np.diff(th.q) <= cfg.sigma_w2 + 1e-12)
    # ||dL/dx^l||^2 follows prod (1 + sigma_w2 mu1(q^l)), a factor falling toward 1.
    mu1, mu2 = (np.asarray(a) for a in _mu(get_act("tanh"), jnp.asarray(th.q)))
    # One layer adds sigma_w2 sum phi'^2 y^2 to ||g||^2: relative variance of the factor.
    v = (th.chi - 1) ** 2 / th.chi**2 * (3 * mu2 / mu1**2 + 1) / width
    sd = np.sqrt(np.concatenate([np.cumsum(v[::-1])[::-1][1:], [0.0]]))
    np.testing.assert_array_less(
        np.abs(log_ratio(bwd.grad_state_sq) - np.log(th.grad_state_sq)), Z * sd + 1e-9
    )
    assert np.all(np.diff(th.chi) < 0) and th.chi[-1] > 1
    g = np.log(bwd.grad_state_sq)
    early, late = (g[0] - g[9]) / 9, (g[-10] - g[-1]) / 9
    assert early - late > Z * np.hypot(sd[0] - sd[9], sd[-10]) / 9


@pytest.mark.slow
def test_theory_at_the_fixed_point_matches_meanfield():
    act, sw, sb, L = "tanh", 1.7, 0.1, 12
    qs = float(meanfield.q_star(act, sw, sb))
    q0 = 0.3
    th = signal.theory(act, sw, sb, L, (q0 - sb) / sw, 0.4)
    np.testing.assert_allclose(
        th.q[1:], meanfield.iterate_q_map(act, q0, sw, sb, L - 1), rtol=1e-12
    )
    th = signal.theory(act, sw, sb, L, (qs - sb) / sw, 0.4)
    np.testing.assert_allclose(th.q, qs, rtol=1e-10)
    c = meanfield.iterate_c_map(act, float(th.c[0]), qs, sw, sb, L - 1)
    np.testing.assert_allclose(th.c[1:], c, rtol=1e-10)
    np.testing.assert_allclose(th.chi, meanfield.chi1(act, sw, sb), rtol=1e-10)
    np.testing.assert_allclose(th.grad_state_sq, th.chi[0] ** np.arange(L - 1, -1, -1), rtol=1e-9)


def test_forward_statistics_definitions():
    cfg = nw.MLPConfig(
        depth=3, width=6, activation="relu", residual=True, residual_scale=0.5, dtype="float64"
    )
    model = nw.MLP(cfg, rngs=nnx.Rngs(0))
    u = jax.random.normal(jax.random.key(0), (4, 6))
    fwd = signal.forward(model, u)
    s = model.stack()
    p = jax.tree.map(lambda a: a[0], s.params)
    h = u @ p["kernel"] + p["bias"]
    x1 = u + 0.5 * jax.nn.relu(h)
    cos = [
        jnp.dot(h[i], h[i + 1]) / jnp.linalg.norm(h[i]) / jnp.linalg.norm(h[i + 1]) for i in (0, 2)
    ]
    np.testing.assert_allclose(fwd.q[0], jnp.mean(h**2), rtol=1e-10)
    np.testing.assert_allclose(fwd.c[0], np.mean(cos), rtol=1e-10)
    np.testing.assert_allclose(fwd.act_mean[0], jnp.mean(jax.nn.relu(h)), rtol=1e-10)
    np.testing.assert_allclose(fwd.chan_sq_mean[0], jnp.mean(x1.mean(0) ** 2), rtol=1e-10)
    np.testing.assert_allclose(fwd.chan_var[0], jnp.mean(x1.var(0)), rtol=1e-10)
    np.testing.assert_allclose(
        fwd.branch_var[0], jnp.mean((0.5 * jax.nn.relu(h)).var(0)), rtol=1e-10
    )


def test_backward_matches_autodiff():
    cfg = nw.MLPConfig(
        depth=3, width=5, in_dim=4, out_dim=2, activation="tanh", sigma_b2=0.1, dtype="float64"
    )
    model = nw.MLP(cfg, rngs=nnx.Rngs(0))
    u = jax.random.normal(jax.random.key(0), (6, 4))
    loss = lambda y: jnp.sum(jnp.sin(y))  # noqa: E731
    bwd = signal.backward(model, u, loss)
    s = model.stack()
    g = jax.grad(lambda p: loss(nw.Stack(s.step, p, s.input_map, s.output_map)(u)))(s.params)
    np.testing.assert_allclose(
        bwd.grad_weight_sq, jnp.sum(g["kernel"] ** 2, axis=(1, 2)), rtol=1e-10
    )
    # dL/dh^L = phi'(h^L) * dL/dx^L for the last layer.
    hs = s.hidden_states(s.input_map(u))
    gL = jax.grad(lambda x: loss(s.output_map(x)))(hs[-1])
    np.testing.assert_allclose(bwd.grad_state_sq[-1], jnp.sum(gL**2), rtol=1e-10)
    np.testing.assert_allclose(
        bwd.grad_preact_sq[-1], jnp.sum((gL * (1 - hs[-1] ** 2)) ** 2), rtol=1e-9
    )


def test_any_scanned_stack():
    params = {"w": 0.5 * jax.random.normal(jax.random.key(0), (4, 3, 3))}
    s = nw.Stack.from_layer(lambda p, x: jnp.sin(x @ p["w"]), params)
    u = jax.random.normal(jax.random.key(1), (4, 3))
    fwd, bwd = signal.measure(s, u, key=jax.random.key(2))
    assert fwd.q.shape == bwd.grad_weight_sq.shape == (4,)
    np.testing.assert_allclose(fwd.q[-1], jnp.mean(s(u) ** 2), rtol=1e-10)
    np.testing.assert_allclose(bwd.grad_preact_sq, bwd.grad_state_sq, rtol=1e-12)


@pytest.mark.slow
def test_critical_delta_orthogonal_cnn_signal():
    # A critical delta-orthogonal CNN keeps q at q* and gradients flat (chi1 = 1).
    cfg = nw.ConvConfig(depth=10, channels=64, activation="tanh", q_star=0.5, init="critical")
    cnn = nw.ConvNet(cfg, rngs=nnx.Rngs(0))
    sw, sb = cfg.variances()
    x = jnp.sqrt((0.5 - sb) / sw) * jax.random.normal(jax.random.key(3), (4, 8, 8, 64))
    fwd, bwd = signal.measure(cnn, x, key=jax.random.key(4))
    th = signal.model_theory(cnn, x)
    # Bounds with the 64 channels of one position as the width (positions only average).
    np.testing.assert_allclose(fwd.q, th.q, rtol=Z * np.sqrt(2 * 10 / 64))
    sd = grad_sd("tanh", np.asarray(th.q), width=64)[0]
    assert abs(np.log(bwd.grad_preact_sq[0] / bwd.grad_preact_sq[-1])) < Z * sd


def test_vmap_over_seeds_and_jit():
    cfg = nw.MLPConfig(depth=4, width=16, dtype="float64")
    u = jax.random.normal(jax.random.key(0), (8, 16))

    def one(key):
        model = nw.MLP(cfg, rngs=nnx.Rngs(key))
        return signal.measure(model, u, key=key)

    fwd, bwd = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(1), 3))
    assert fwd.q.shape == bwd.grad_preact_sq.shape == (3, 4)
    f0, b0 = one(jax.random.split(jax.random.key(1), 3)[0])
    np.testing.assert_allclose(fwd.q[0], f0.q, rtol=1e-10)
    np.testing.assert_allclose(bwd.grad_preact_sq[0], b0.grad_preact_sq, rtol=1e-8)


def test_bad_input():
    model = nw.MLP(nw.MLPConfig(depth=2, width=4), rngs=nnx.Rngs(0))
    u = jnp.ones((2, 4))
    with pytest.raises(ValueError, match="loss_fn, or key"):
        signal.measure(model, u)
    with pytest.raises(ValueError, match="batch"):
        signal.forward(model, jnp.ones(4))
    with pytest.raises(ValueError, match="finite"):
        signal.forward(model, jnp.full((2, 4), jnp.nan))
    with pytest.raises(TypeError, match="stack"):
        signal.forward(object(), u)
    with pytest.raises(TypeError, match="loss_fn"):
        signal.measure(model, u, loss_fn=3)
    bn = nw.MLP(nw.MLPConfig(depth=2, width=4, norm="batch"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no mean-field theory"):
        signal.model_theory(bn, u)
    with pytest.raises(ValueError, match="depth"):
        signal.theory("tanh", 1.0, 0.0, 0, 1.0)
    with pytest.raises(ValueError, match="sigma_w2"):
        signal.theory("tanh", -1.0, 0.0, 3, 1.0)
    with pytest.raises(ValueError, match="width"):
        signal.theory("tanh", 1.0, 0.0, 3, 1.0, layer_norm=True)
    with pytest.raises(ValueError, match="width"):
        signal.theory("relu", 2.0, 0.0, 3, 1.0, residual_scale=1.0, width=1)
    with pytest.raises(TypeError, match="finite_width"):
        signal.model_theory(model, u, finite_width="yes")


@pytest.mark.slow
@pytest.mark.parametrize("act, sw, sb", PHASES)
def test_plain_mlp_depth_50_several_seeds(act, sw, sb):
    """Deeper networks, several seeds: each seed within its own fluctuation bound."""
    L = 50
    qs = float(meanfield.q_star(act, sw, sb)) if act == "tanh" else 1.0
    u = pair_inputs(jax.random.key(11), p0=(qs - sb) / sw)
    cfg = nw.MLPConfig(depth=L, width=N, activation=act, sigma_w2=sw, sigma_b2=sb, dtype="float64")
    for seed in range(3):
        model, fwd, bwd = run(cfg, u, seed=10 * seed)
        th = jax.tree.map(np.asarray, signal.model_theory(model, u))
        sd_logq, sd_c = lna_sd(get_act(act), sw, sb, th)
        np.testing.assert_array_less(np.abs(np.log(fwd.q / th.q)), Z * sd_logq)
        np.testing.assert_array_less(np.abs(fwd.c - th.c), Z * sd_c + 1e-9)
        sd_g = grad_sd(act, th.q)
        np.testing.assert_array_less(
            np.abs(log_ratio(bwd.grad_preact_sq) - np.log(th.grad_preact_sq)), Z * sd_g + 1e-9
        )


def test_gradient_profile_is_the_backward_pass_of_theory():
    """Plain network: ||g_W^l||^2 = prod_{k=l}^{L-1} chi^k (q^l - sigma_b2), relative to layer L."""
    sw, sb, L = 1.7, 0.1, 8
    th = signal.theory("tanh", sw, sb, L, 0.4)
    q, chi = np.asarray(th.q), np.asarray(th.chi)
    tail = np.cumprod(np.concatenate([chi[:-1], [1.0]])[::-1])[::-1]
    expected = tail * (q - sb) / (q[-1] - sb)
    np.testing.assert_allclose(th.grad_weight_sq, expected, rtol=1e-5)
    g_state, g_pre, g_w = signal.gradient_profile(th.chi, th.chi / sw, (q - sb) / sw)
    np.testing.assert_allclose(g_state, th.grad_state_sq, rtol=1e-6)
    np.testing.assert_allclose(g_pre, th.grad_preact_sq, rtol=1e-6)
    np.testing.assert_allclose(g_w, th.grad_weight_sq, rtol=1e-5)


def test_model_theory_needs_a_builtin_model():
    with pytest.raises(TypeError, match="MLP or networks"):
        signal.model_theory(object(), jnp.ones((2, 4)))


def test_pair_inputs():
    u = signal.pair_inputs(jax.random.key(0), 4000, 64, correlation=0.5)
    assert u.shape == (4000, 64)
    np.testing.assert_allclose(np.mean(np.asarray(u[0::2] * u[1::2])), 0.5, atol=0.01)
    with pytest.raises(ValueError, match="batch"):
        signal.pair_inputs(jax.random.key(0), 3, 8)


def test_measure_with_theory_keys():
    cfg = nw.MLPConfig(depth=3, width=8)
    model = nw.MLP(cfg, rngs=nnx.Rngs(0))
    u = signal.pair_inputs(jax.random.key(1), 4, 8)
    out = signal.measure_with_theory(model, u, key=jax.random.key(2))
    assert {"q", "grad_preact_sq", "theory_q", "theory_grad_weight_sq"} <= set(out)
    bn = nw.MLP(nw.MLPConfig(depth=3, width=8, norm="batch"), rngs=nnx.Rngs(0))
    assert not any(
        k.startswith("theory_") for k in signal.measure_with_theory(bn, u, key=jax.random.key(2))
    )


# --------------------------------------------------------------------------- #
# Finite width: residual networks with a positively homogeneous activation.
# --------------------------------------------------------------------------- #


def residual_growth(width, depth, seeds, batch, init="he_normal", alpha=1.0):
    """Per-seed log10 growth of ||dLoss/dx^l||^2 from l = L to l = 1 (one compile)."""
    cfg = nw.MLPConfig(
        depth=depth, width=width, activation="relu", init=init, bias=False, residual=True,
        residual_scale=alpha, dtype="float64",
    )  # fmt: skip

    stacks = [nw.MLP(cfg, rngs=nnx.Rngs(depth + s)).stack() for s in range(seeds)]
    params = jax.tree.map(lambda *p: jnp.stack(p), *(s.params for s in stacks))

    def one(p, key):
        k_u, k_loss = jax.random.split(key)
        u = jax.random.normal(k_u, (batch, width))
        g = signal.backward(dataclasses.replace(stacks[0], params=p), u, key=k_loss)
        return jnp.log10(g.grad_state_sq[0] / g.grad_state_sq[-1])

    keys = jax.random.split(jax.random.key(depth * 1000 + width), seeds)
    model = nw.MLP(cfg, rngs=nnx.Rngs(0))
    # Stack input statistics p0 = 1, m0 = 0 as for the N(0, 1) inputs.
    u = jnp.tile(jnp.array([1.0, -1.0]), (batch, width // 2))
    ths = [signal.model_theory(model, u, finite_width=f) for f in (True, False)]
    th = [float(np.log10(t.grad_state_sq[0] / t.grad_state_sq[-1])) for t in ths]
    return np.asarray(jax.jit(jax.vmap(one))(params, keys)), th


def check_growth(growth, th_finite, th_infinite=None):
    """The seed mean within Z standard errors of the finite-width prediction (plus
    Jensen's gap: the prediction is log E, the measurement E log, which is lower by
    Var(ln X) / 2), and the infinite-width prediction outside that band."""
    se = np.std(growth, ddof=1) / np.sqrt(len(growth))
    jensen = np.var(growth * np.log(10), ddof=1) / 2 / np.log(10)
    gap = th_finite - np.mean(growth)
    assert -Z * se < gap < Z * se + jensen, (np.mean(growth), se, th_finite)
    if th_infinite is not None:
        assert abs(th_infinite - np.mean(growth)) > Z * se + jensen


def test_residual_relu_gradients_need_the_finite_width_correction():
    """Width 64, depth 16 (figure 7's quick tier), 12 seeds: measured 5.42 +- 0.09 decades,
    predicted 5.60 at width 64 and 4.52 at infinite width. (The correction is leading
    order in 1/N; at N = 64 it overshoots by about 2 standard errors, at N >= 128 the
    slow sweep below agrees within one or two.)"""
    growth, (th_fin, th_inf) = residual_growth(64, 16, seeds=12, batch=8)
    check_growth(growth, th_fin, th_inf)


def test_finite_width_limits_and_routes():
    # N -> infinity is the mean-field recursion; biased networks keep it. (Depth 16 as
    # above: the same compiled recursions.)
    kw = {"residual_scale": 1.0}
    mf = signal.theory("relu", 2.0, 0.0, 16, 1.0, **kw)
    big = signal.theory("relu", 2.0, 0.0, 16, 1.0, width=10**12, **kw)
    np.testing.assert_allclose(big.grad_state_sq, mf.grad_state_sq, rtol=1e-9)
    np.testing.assert_allclose(big.grad_preact_sq, mf.grad_preact_sq, rtol=1e-9)
    small = signal.theory("relu", 2.0, 0.0, 16, 1.0, width=64, **kw)
    assert small.grad_input_sq > 1.5 * mf.grad_input_sq
    biased = [signal.theory("relu", 2.0, 0.1, 16, 1.0, width=w, **kw) for w in (64, None)]
    np.testing.assert_allclose(biased[0].grad_state_sq, biased[1].grad_state_sq, rtol=1e-12)
    # rho is the forward growth p^l / p^{l-1} of the mean-field stream (= q^{l+1} / q^l);
    # closed forms at a centred stream (last entry: m = 0, p = 1, relu, sigma_w2 = 2,
    # alpha = 1): rho = 2, lambda = 8 / 2 - 2 = 2, delta = 2 * 1.5 / 2 + 1 - 1 / 2 = 2,
    # gain = 1.5 / 2.
    p = np.asarray(mf.q) / 2.0
    m = np.concatenate([[0.0], np.cumsum(np.sqrt(p / np.pi))[:-1]])
    out = signal.stream_channels("relu", 2.0, 1.0, np.append(p, 1.0), np.append(m, 0.0))
    np.testing.assert_allclose(out[0][:-2], p[1:] / p[:-1], rtol=1e-9)
    np.testing.assert_allclose([o[-1] for o in out], [2.0, 2.0, 2.0, 0.75], rtol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize(
    "width, depth, init, alpha",
    [(128, 8, "he_normal", 1.0), (128, 32, "he_normal", 1.0), (512, 16, "he_normal", 1.0),
     (256, 24, "he_normal", 1.0), (128, 16, "xavier_normal", 1.0), (512, 32, "he_normal", 1.0),
     pytest.param(1536, 16, "he_normal", 1.0, marks=pytest.mark.xfail(
         reason="open: measured 4.633 +- 0.009 decades (8 seeds, batch 16) against 4.684 "
         "predicted and 4.515 at infinite width; the leading-order correction overshoots by "
         "about 30% here", strict=False))],
)  # fmt: skip
def test_residual_relu_finite_width_sweep(width, depth, init, alpha):
    """Widths 128..1536, depths 8..32, 8 seeds: each within its seed error."""
    growth, (th_fin, _) = residual_growth(width, depth, 8, 16, init=init, alpha=alpha)
    check_growth(growth, th_fin)


# --------------------------------------------------------------------------- #
# The decay length of a correlation (Schoenholz et al. 2017's measured xi_c).
# --------------------------------------------------------------------------- #


def test_fit_decay_length_recovers_an_exact_exponential():
    layers = np.arange(1, 101)
    c = 1.0 - 0.3 * np.exp(-layers / 7.5)
    np.testing.assert_allclose(signal.fit_decay_length(c, 1.0), 7.5, rtol=1e-9)
    # any fixed point, from above or below, and batched (..., L) with c* per row
    c2 = np.stack([0.4 + 0.2 * np.exp(-layers / 3.0), 0.4 - 0.2 * np.exp(-layers / 11.0)])
    np.testing.assert_allclose(signal.fit_decay_length(c2, [0.4, 0.4]), [3.0, 11.0], rtol=1e-9)


def test_fit_decay_length_recovers_a_noisy_exponential():
    """``log |c^l - c*| = log 0.3 - l / xi + e_l``, ``e_l ~ N(0, s^2)`` i.i.d.: least squares
    over the ``n`` layers in the window gives a slope of standard deviation
    ``s / sqrt(S_ll)`` (``S_ll = sum (l - mean l)^2``), so ``xi = -1/slope`` has standard
    deviation ``xi^2 s / sqrt(S_ll)`` to first order (its bias, ``xi^3 s^2 / S_ll``, is
    below 1e-4 here). The mean of R fits lies within 4 of its standard errors; the spread
    of the fits matches the derived one within 20% (R = 400: 3.5 standard errors of a
    standard deviation)."""
    rng = np.random.default_rng(0)
    layers = np.arange(1, 121)
    xi, s, R = np.array([4.0, 7.5, 12.0]), 0.05, 400
    e = rng.normal(0.0, s, (R, xi.size, layers.size))
    c = 1.0 - 0.3 * np.exp(-layers / xi[:, None] + e)
    fit = signal.fit_decay_length(c, 1.0)
    assert fit.shape == (R, xi.size) and np.all(np.isfinite(fit))
    d = 0.3 * np.exp(-layers / xi[:, None])  # the window of the noise-free distance
    use = (d < 1e-2) & (d > 1e-9)
    s_ll = np.array([np.sum((layers[u] - layers[u].mean()) ** 2) for u in use])
    sd = xi**2 * s / np.sqrt(s_ll)
    np.testing.assert_array_less(np.abs(fit.mean(0) - xi), 4 * sd / np.sqrt(R))
    np.testing.assert_allclose(fit.std(0, ddof=1), sd, rtol=0.2)


def test_fit_decay_length_without_a_decay_is_nan():
    layers = np.arange(1, 41)
    few = 1.0 - 0.3 * np.exp(-layers / 0.25)  # 4 layers in the window (1e-9, 1e-2)
    grows = 1.0 - 1e-8 * np.exp(layers / 5.0)  # moves away from c*
    c = np.stack([few, grows, np.full(40, np.nan)])
    assert np.all(np.isnan(signal.fit_decay_length(c, 1.0)))
    np.testing.assert_allclose(signal.fit_decay_length(few, 1.0, min_layers=4), 0.25)
