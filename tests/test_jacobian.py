"""Tests of isometry.jacobian: agreement with jax.jacfwd/jacrev, deep-network spectra theory."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from isometry import jacobian as jac
from isometry import spectra


@pytest.fixture
def x64():
    old = bool(jax.config.read("jax_enable_x64"))
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


# ------------------------------------------------------------------ any function


def _f(x):
    return jnp.stack([jnp.sin(x).sum(), (x**2 * jnp.arange(x.size)).sum(), jnp.tanh(x[0] * x[-1])])


@pytest.mark.parametrize("mode", ["auto", "fwd", "rev"])
def test_jacobian_matches_jax(x64, mode):
    x = jax.random.normal(jax.random.key(0), (5,))
    J = jac.jacobian(_f, x, mode=mode)
    np.testing.assert_allclose(J, jax.jacfwd(_f)(x), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(J, jax.jacrev(_f)(x), rtol=1e-13, atol=1e-14)
    xs = jax.random.normal(jax.random.key(1), (4, 5))
    Jb = jac.batch_jacobian(_f, xs, mode=mode)
    assert Jb.shape == (4, 3, 5)
    np.testing.assert_allclose(Jb, jax.vmap(jax.jacrev(_f))(xs), rtol=1e-13, atol=1e-14)


def test_jacobian_of_nnx_module(x64):
    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(6, 8, rngs=rngs, param_dtype=jnp.float64)
            self.b = nnx.Linear(8, 4, rngs=rngs, param_dtype=jnp.float64)

        def __call__(self, x):
            return self.b(jnp.tanh(self.a(x)))

    model = MLP(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (6,))
    J = jac.jacobian(model, x)
    W1, W2 = model.a.kernel[...], model.b.kernel[...]
    D = 1 - jnp.tanh(x @ W1 + model.a.bias[...]) ** 2
    np.testing.assert_allclose(J, ((W1 * D) @ W2).T, rtol=1e-12)
    Jb = jac.batch_jacobian(model, jnp.stack([x, 2 * x]))
    np.testing.assert_allclose(Jb[0], J, rtol=1e-13)


# ------------------------------------------------------------------ scanned stacks

L = 4


def _dense(p, h):
    return jnp.tanh(h @ p["W"] + p["b"])


def _residual(p, h):
    return h + 0.5 * jnp.tanh(h @ p["W"] + p["b"]) @ p["W"].T


def _layernorm(p, h):
    z = h @ p["W"] + p["b"]
    z = (z - z.mean()) / jnp.sqrt(z.var() + 1e-5)
    return jnp.tanh(z)


def _conv(p, h):  # h: (positions, channels), circular 1-D convolution, kernel (3, C, C)
    k = p["K"]
    z = sum(jnp.roll(h, s - 1, axis=0) @ k[s] for s in range(3))
    return jnp.tanh(z)


def _params(key, n, conv=False):
    k1, k2 = jax.random.split(key)
    if conv:
        return {"K": jax.random.normal(k1, (L, 3, n, n)) / math.sqrt(3 * n)}
    return {
        "W": jax.random.normal(k1, (L, n, n)) * math.sqrt(1.5 / n),
        "b": 0.1 * jax.random.normal(k2, (L, n)),
    }


@pytest.mark.parametrize(
    "kind", ["dense", "residual", pytest.param("layernorm", marks=pytest.mark.slow), "conv"]
)
def test_stack_jacobians_every_depth_match_jax(x64, kind):
    layer = {"dense": _dense, "residual": _residual, "layernorm": _layernorm, "conv": _conv}[kind]
    conv = kind == "conv"
    params = _params(jax.random.key(3), 4 if conv else 7, conv)
    x = jax.random.normal(jax.random.key(4), (5, 4) if conv else (7,))
    depths = list(range(1, L + 1))
    J = jac.stack_jacobians(layer, params, x, depths)
    assert J.shape == (L, *x.shape, *x.shape)
    for d in depths:
        pd = jax.tree_util.tree_map(lambda a, d=d: a[:d], params)

        def f(z, pd=pd):
            return jac.stack_forward(layer, pd, z)

        np.testing.assert_allclose(J[d - 1], jax.jacfwd(f)(x), rtol=1e-12, atol=1e-13)
        if d == L:
            np.testing.assert_allclose(J[d - 1], jax.jacrev(f)(x), rtol=1e-12, atol=1e-13)
    # singular values straight from the stack, at a subset of depths (unsorted, duplicated)
    s = jac.stack_singular_values(layer, params, x, [4, 2, 4])
    assert s.shape == (2, x.size)
    Jm = J.reshape(L, x.size, x.size)
    np.testing.assert_allclose(
        s, np.linalg.svd(np.asarray(Jm)[[1, 3]], compute_uv=False), rtol=1e-11
    )


def test_stack_tangents_and_reduce(x64):
    params = _params(jax.random.key(5), 9)
    x = jax.random.normal(jax.random.key(6), (9,))
    V = jax.random.normal(jax.random.key(7), (3, 9))
    full = jac.stack_jacobians(_dense, params, x, [2, 4])
    part = jac.stack_jacobians(_dense, params, x, [2, 4], tangents=V)
    assert part.shape == (2, 9, 3)
    np.testing.assert_allclose(part, full @ V.T, rtol=1e-12, atol=1e-14)
    red = jac.stack_jacobians(_dense, params, x, [2, 4], reduce=spectra.singular_values)
    np.testing.assert_allclose(red, spectra.singular_values(full), rtol=1e-12)
    batched = jax.vmap(lambda z: jac.stack_jacobians(_dense, params, z, [4]))(jnp.stack([x, -x]))
    np.testing.assert_allclose(batched[0], full[1:], rtol=1e-13)


# ------------------------------------------------------------------ deep linear networks


def test_deep_linear_orthogonal_is_isometric(x64):
    net = jac.RandomNetwork("linear", "orthogonal", sigma_w2=1.0, width=48, depth=40)
    s = jac.random_network_spectra(
        jax.random.key(0), net, range(1, 41), n_seeds=2, statistic="singular_values"
    )
    np.testing.assert_allclose(s, 1.0, atol=1e-12)


def _linear_gaussian_theory(N, depth):
    """Exact finite-N E[m1^2] and E[m2] for J = W_L ... W_1, W_ij ~ N(0, 1/N) (Wick's theorem).

    With A = J J^T, m1 = tr A / N, m2 = tr A^2 / N, one more layer gives
    E m2' = (1 + 1/N) m2 + m1^2 and E m1'^2 = m1^2 + 2 m2 / N^2; J_0 = I.
    """
    a, b = 1.0, 1.0
    out = []
    for _ in range(depth):
        a, b = (1 + 1 / N) * a + b, b + 2 * a / N**2
        out.append((a, b))
    return np.array(out)


def test_deep_linear_gaussian_mean_one_variance_grows_like_depth(x64):
    N, depth, seeds = 96, 32, 24
    depths = np.array([1, 4, 8, 16, 32])
    net = jac.RandomNetwork("linear", "gaussian", sigma_w2=1.0, width=N, depth=depth)
    mom = jac.random_network_spectra(
        jax.random.key(1), net, depths, n_seeds=seeds, statistic="moments"
    )
    m1 = np.asarray(mom["mean"])[:, 0]  # (seeds, K)
    var = np.asarray(mom["var"])[:, 0]
    se = lambda v: v.std(0, ddof=1) / math.sqrt(seeds)  # noqa: E731
    # E[m1] = 1 exactly at any width and depth.
    assert np.all(np.abs(m1.mean(0) - 1.0) < 4 * se(m1)), (m1.mean(0), se(m1))
    theory = _linear_gaussian_theory(N, depth)[depths - 1]
    expected_var = theory[:, 0] - theory[:, 1]  # E[m2 - m1^2]
    assert np.all(np.abs(var.mean(0) - expected_var) < 4 * se(var)), (var.mean(0), expected_var)
    # ... which grows like L (free probability: Var = L, s1 = -1), up to O(L^2 / N).
    assert np.all(np.abs(expected_var / depths - 1.0) < (depths + 4) / N)
    slope = np.polyfit(depths, var.mean(0), 1)[0]
    assert abs(slope - 1.0) < 0.5


def test_relu_he_mean_squared_singular_value_stays_near_one():
    # E ||D W t||^2 = ||t||^2 exactly for ReLU with sigma_w2 = 2, so E[m1] = 1 at every depth.
    N, depth, seeds = 128, 64, 12
    depths = np.array([1, 4, 16, 64])
    net = jac.RandomNetwork("relu", "he_normal", width=N, depth=depth)
    mom = jac.random_network_spectra(
        jax.random.key(2), net, depths, n_seeds=seeds, n_inputs=2, statistic="moments"
    )
    m1 = np.asarray(mom["mean"]).reshape(seeds * 2, len(depths))
    per_seed = m1.reshape(seeds, 2, -1).mean(1)  # inputs share weights: average within a seed
    se = per_seed.std(0, ddof=1) / math.sqrt(seeds)
    assert np.all(np.abs(per_seed.mean(0) - 1.0) < 4 * se + 1e-6), (per_seed.mean(0), se)


# ------------------------------------------------------------------ random ensembles


def test_random_network_sampler(x64):
    net = jac.RandomNetwork("tanh", "orthogonal", q_star=0.25, width=32, depth=10)
    _, init, sw, sb, q = net.resolved()
    assert init.ensemble == "orthogonal" and q == 0.25 and sb > 0
    x = jac.sample_inputs(jax.random.key(0), net, 5)
    # The first pre-activation h^1 = x W + b has variance sigma_w2 |x|^2/N + sigma_b2 = q*.
    np.testing.assert_allclose(sw * jnp.sum(x**2, 1) / 32 + sb, 0.25, rtol=1e-12)
    keys = jac.random_params(jax.random.key(0), 10)
    assert keys.shape == (10,)
    lam = jac.random_network_spectra(jax.random.key(3), net, [3, 10], n_seeds=3, n_inputs=2)
    assert lam.shape == (3, 2, 2, 32)
    again = jac.random_network_spectra(jax.random.key(3), net, [3, 10], n_seeds=3, n_inputs=2)
    np.testing.assert_array_equal(lam, again)
    assert np.all(np.diff(np.asarray(lam), axis=-1) <= 0)
    # the moments statistic (traces + Lanczos, no SVD) agrees with the SVD
    mom = jac.random_network_spectra(
        jax.random.key(3), net, [3, 10], n_seeds=3, n_inputs=2, statistic="moments"
    )
    np.testing.assert_allclose(mom["mean"], lam.mean(-1), rtol=1e-12)
    np.testing.assert_allclose(mom["var"], lam.var(-1), rtol=1e-9, atol=1e-12)
    # Lanczos gives a lower bound on the largest eigenvalue, converged to a few digits
    assert np.all(mom["max"] <= lam[..., 0] * (1 + 1e-12))
    np.testing.assert_allclose(mom["max"], lam[..., 0], rtol=1e-4)
    # the stable route agrees with the plain one
    logs = jac.random_network_spectra(
        jax.random.key(3), net, [3, 10], n_seeds=3, n_inputs=2, statistic="log_singular_values"
    )
    np.testing.assert_allclose(2 * logs, np.log(lam), atol=1e-10)
    # one network, explicit inputs, against the generic stack on the same keys
    layer = jac.random_layer(net)
    k0 = jax.random.split(jax.random.key(3), 3)[0]
    J = jac.stack_jacobians(layer, jac.random_params(jax.random.fold_in(k0, 0), 10), x[0], [10])
    lam0 = jac.random_network_spectra(jax.random.key(3), net, [10], n_seeds=3, inputs=x[:1])
    np.testing.assert_allclose(lam0[0, 0, 0], spectra.squared_singular_values(J[0]), rtol=1e-10)


def test_sphere_inputs_put_the_first_preactivation_at_q_star():
    q, sw, sb = 0.7, 1.8, 0.2
    # every example lies on ||x||^2 = n (q* - sigma_b2) / sigma_w2, for any example shape
    x = jac.sphere_inputs(jax.random.key(0), (6, 3, 5), q, sw, sb, batch_ndim=1)
    np.testing.assert_allclose(sw * jnp.sum(x**2, (1, 2)) / 15 + sb, q, rtol=1e-12)
    # so h^1 = x W + b has variance q* (Monte Carlo over 4000 Gaussian layers)
    N, S = 32, 4000
    x0 = jac.sphere_inputs(jax.random.key(1), (N,), q, sw, sb)
    layer = jac.dense_layer("linear", "gaussian", sw, sb)
    h = jax.vmap(lambda k: layer(k, x0))(jax.random.split(jax.random.key(2), S))
    # Var of the mean of S*N squares (h_i Gaussian given x0): 2 q^2 / (S N); 5 standard errors
    assert float(jnp.mean(h**2)) == pytest.approx(q, rel=5 * math.sqrt(2 / (S * N)))
    # traced variances: vmap over q* equals per-value calls
    qs = jnp.asarray([0.3, 0.7, 1.1])
    many = jax.vmap(lambda qq: jac.sphere_inputs(jax.random.key(3), (N,), qq, sw, sb))(qs)
    for i, qq in enumerate(np.asarray(qs)):
        one = jac.sphere_inputs(jax.random.key(3), (N,), qq, sw, sb)
        np.testing.assert_allclose(many[i], one, rtol=1e-15)
    with pytest.raises(ValueError, match="must exceed sigma_b2"):
        jac.sphere_inputs(jax.random.key(0), (N,), 0.1, sw, 0.2)
    with pytest.raises(ValueError, match="batch_ndim"):
        jac.sphere_inputs(jax.random.key(0), (N,), q, batch_ndim=1)


def test_pair_on_sphere_has_the_requested_cosine_and_mean_square():
    for c0, m in ((0.5, 0.3), (-0.9, 2.0), (1.0, 1.0), (0.0, 1e-3)):
        x = jac.pair_on_sphere(jax.random.key(4), 64, c0, m)
        assert x.shape == (2, 64) and x.dtype == jnp.float64
        np.testing.assert_allclose(jnp.sum(x**2, axis=1) / 64, m, rtol=1e-13)
        cos = jnp.dot(x[0], x[1]) / jnp.sqrt(jnp.sum(x[0] ** 2) * jnp.sum(x[1] ** 2))
        assert float(cos) == pytest.approx(c0, abs=1e-13)
    # traced cosine and mean square (a vmap, as a sweep over sigma_w2 uses it) equal single calls
    cs, ms = jnp.asarray([0.1, 0.95]), jnp.asarray([0.5, 1.5])
    many = jax.vmap(lambda c, m: jac.pair_on_sphere(jax.random.key(5), 16, c, m))(cs, ms)
    for i in range(2):
        one = jac.pair_on_sphere(jax.random.key(5), 16, float(cs[i]), float(ms[i]))
        np.testing.assert_allclose(many[i], one, rtol=1e-13, atol=1e-15)
    # the pair's direction is random: another key, another first input
    other = jac.pair_on_sphere(jax.random.key(6), 16, 0.1, 0.5)
    assert not np.allclose(other[0], many[0, 0])
    assert jac.pair_on_sphere(jax.random.key(4), 8, 0.5, 1.0, dtype="float32").dtype == jnp.float32


@pytest.mark.parametrize("weights", ["gaussian", "orthogonal"])
def test_dense_layer_traced_variances_and_random_layer(weights):
    N = 16
    x = jax.random.normal(jax.random.key(0), (N,))
    k = jax.random.key(1)
    sws = jnp.asarray([0.5, 1.5, 2.0])
    many = jax.vmap(lambda s: jac.dense_layer("tanh", weights, s, 0.1 * s)(k, x))(sws)
    for i, s in enumerate(np.asarray(sws)):
        one = jac.dense_layer("tanh", weights, float(s), 0.1 * float(s))(k, x)
        np.testing.assert_array_equal(many[i], one)
    net = jac.RandomNetwork("tanh", "gaussian", sigma_w2=1.5, sigma_b2=0.1, width=N, depth=2)
    np.testing.assert_array_equal(
        jac.random_layer(net)(k, x), jac.dense_layer("tanh", "gaussian", 1.5, 0.1)(k, x)
    )


def test_random_network_q_star_with_fixed_variances():
    """q_star with sigma_w2 (or a fan-based scheme) only sets the inputs' sphere."""
    net = jac.RandomNetwork("tanh", "gaussian", sigma_w2=1.5, q_star=0.3, width=8, depth=2)
    assert net.resolved()[2:] == (1.5, 0.0, 0.3)
    he = jac.RandomNetwork("relu", "he_normal", q_star=0.5, width=8, depth=2)
    assert he.resolved()[2:] == (2.0, 0.0, 0.5)
    with pytest.raises(ValueError, match="not both"):
        jac.RandomNetwork("tanh", "gaussian", sigma_b2=0.1, q_star=0.3).resolved()


# ------------------------------------------------------------------ bad input


def test_bad_input_errors():
    params = _params(jax.random.key(0), 5)
    x = jnp.ones(5)
    with pytest.raises(ValueError, match="depths"):
        jac.stack_jacobians(_dense, params, x, [0, 2])
    with pytest.raises(ValueError, match=r"depths must lie in 1\.\.4"):
        jac.stack_jacobians(_dense, params, x, [5])
    with pytest.raises(ValueError, match="depths"):
        jac.stack_jacobians(_dense, params, x, [])
    with pytest.raises(ValueError, match="same shape"):
        jac.stack_jacobians(lambda p, h: h[:3], params, x)
    with pytest.raises(ValueError, match="tangents"):
        jac.stack_jacobians(_dense, params, x, tangents=jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="leading depth axis"):
        jac.stack_jacobians(_dense, {"W": params["W"], "b": params["b"][:3]}, x)
    with pytest.raises(TypeError):
        jac.stack_jacobians(_dense, params, jnp.ones(4))
    with pytest.raises(ValueError, match="width"):
        jac.RandomNetwork(width=0)
    with pytest.raises(ValueError, match="depth"):
        jac.RandomNetwork(depth=-1)
    with pytest.raises(ValueError, match="sigma_w2"):
        jac.RandomNetwork(sigma_w2=-1.0)
    with pytest.raises(ValueError, match="fixes sigma_w2"):
        jac.RandomNetwork("relu", "he_normal", sigma_w2=2.0).resolved()
    with pytest.raises(ValueError, match="mode"):
        jac.jacobian(_f, jnp.ones(3), mode="sideways")
    net = jac.RandomNetwork("tanh", width=8, depth=4)
    with pytest.raises(ValueError, match="inputs"):
        jac.random_network_spectra(jax.random.key(0), net, inputs=jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="statistic"):
        jac.random_network_spectra(jax.random.key(0), net, statistic="median")


def test_non_finite_plain_product_points_to_stable_route():
    # Linear orthogonal network with chi1 = sigma_w2 = 1.05: s = 1.05^(L/2) = e^97.6 at L = 4000,
    # beyond float32 (max e^88.7).
    L, N = 4000, 8
    W = jax.vmap(lambda k: jax.nn.initializers.orthogonal(math.sqrt(1.05))(k, (N, N), jnp.float32))(
        jax.random.split(jax.random.key(0), L)
    )
    x = jnp.ones(N, jnp.float32)
    with pytest.raises(jac.NonFiniteJacobianError, match="log_singular_values"):
        jac.stack_singular_values(lambda w, h: h @ w, W, x, [10, L])
    logs = spectra.log_singular_values(lambda w, h: h @ w, W, x, [10, L])
    np.testing.assert_allclose(logs[1], 0.5 * L * math.log(1.05), rtol=L * N * 1.2e-7)
