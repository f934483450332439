import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isometry import initializers

N_IN, N_OUT = 400, 600


@pytest.mark.parametrize(
    ("name", "kwargs", "var"),
    [
        ("gaussian", {"sigma_w2": 1.7}, 1.7 / N_IN),
        ("xavier_normal", {}, 2 / (N_IN + N_OUT)),
        ("xavier_uniform", {}, 2 / (N_IN + N_OUT)),
        ("glorot_normal", {}, 2 / (N_IN + N_OUT)),
        ("he_normal", {}, 2 / N_IN),
        ("kaiming_uniform", {}, 2 / N_IN),
        ("lecun_normal", {}, 1 / N_IN),
        ("lecun_uniform", {}, 1 / N_IN),
    ],
)
def test_empirical_variance_matches_scheme(name, kwargs, var):
    init = initializers.get(name, **kwargs)
    w = init(jax.random.key(3), (N_IN, N_OUT), jnp.float64)
    n = w.size
    # Sample variance of n i.i.d. entries: standard error var * sqrt(2/n) (normal;
    # smaller for uniform). 5 standard errors.
    assert float(jnp.var(w)) == pytest.approx(var, rel=5 * np.sqrt(2 / n))
    assert float(jnp.abs(jnp.mean(w))) < 5 * np.sqrt(var / n)
    assert init.sigma_w2(N_IN, N_OUT) == pytest.approx(N_IN * var)


def test_he_on_relu_is_critical():
    assert initializers.get("he").sigma_w2(512, 512) == 2.0


@pytest.mark.parametrize("shape", [(256, 256), (128, 256)])
def test_orthogonal_rows_are_orthonormal(shape):
    init = initializers.get("orthogonal", sigma_w2=2.5)
    w = init(jax.random.key(0), shape, jnp.float64)  # used as x @ w: columns orthogonal
    gram = w.T @ w if shape[0] >= shape[1] else w @ w.T
    np.testing.assert_allclose(gram, 2.5 * jnp.eye(min(shape)), atol=1e-12)
    assert init.ensemble == "orthogonal" and init.sigma_w2(*shape) == 2.5


def test_delta_orthogonal_kernel():
    init = initializers.get("delta_orthogonal", sigma_w2=1.5)
    k = init(jax.random.key(1), (3, 3, 16, 32), jnp.float64)
    centre = k[1, 1]
    np.testing.assert_allclose(centre @ centre.T, 1.5 * jnp.eye(16), atol=1e-12)
    mask = jnp.ones((3, 3), bool).at[1, 1].set(False)
    assert float(jnp.max(jnp.abs(k[mask]))) == 0.0
    with pytest.raises(ValueError, match="in_channels <= out_channels"):
        init(jax.random.key(1), (3, 3, 32, 16))


def test_bad_input():
    with pytest.raises(ValueError, match="unknown initializer 'xavir'; known:"):
        initializers.get("xavir")
    with pytest.raises(ValueError, match="sigma_w2 must be a positive finite number"):
        initializers.get("gaussian", sigma_w2=-1.0)
    with pytest.raises(ValueError, match="fixes sigma_w2"):
        initializers.get("he_normal", sigma_w2=2.0)
    with pytest.raises(ValueError, match="positive dimensions"):
        initializers.get("he_normal")(jax.random.key(0), (0, 4))


def test_same_key_same_weights():
    init = initializers.get("orthogonal")
    a = init(jax.random.key(7), (32, 32))
    np.testing.assert_array_equal(a, init(jax.random.key(7), (32, 32)))


# ------------------------------------------------------------------ sampling API

# 1.3939614295959473 is tanh's critical sigma_w2 at q* = 0.25 (float32-exact);
# 1.7 is not float32-exact: the float64 arithmetic of jax.nn.initializers matters.
SIGMAS = (1.0, 1.7, 1.3939614295959473)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("s2", SIGMAS)
def test_samples_equal_jax_nn_initializers(s2, dtype):
    ji = jax.nn.initializers
    k = jax.random.key(5)
    cases = [
        ("gaussian", (12, 7), ji.variance_scaling(s2, "fan_in", "normal")),
        ("gaussian", (3, 3, 4, 5), ji.variance_scaling(s2, "fan_in", "normal")),
        ("orthogonal", (9, 9), ji.orthogonal(np.sqrt(s2))),
        ("orthogonal", (6, 10), ji.orthogonal(np.sqrt(s2))),
        ("delta_orthogonal", (3, 3, 4, 6), ji.delta_orthogonal(np.sqrt(s2))),
        ("delta_orthogonal", (2, 4, 4), ji.delta_orthogonal(np.sqrt(s2))),
    ]
    for name, shape, ref in cases:
        want = ref(k, shape, dtype)
        got = initializers.sample(name, k, shape, s2, dtype)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want, err_msg=f"{name} {shape}")
        # the Initializer object draws the same
        np.testing.assert_array_equal(initializers.get(name, sigma_w2=s2)(k, shape, dtype), want)
    # square orthogonal: the same matrix jax.random.orthogonal draws
    np.testing.assert_array_equal(
        initializers.sample_orthogonal(k, (9, 9), s2, dtype),
        np.sqrt(dtype(s2)) * jax.random.orthogonal(k, 9, dtype=dtype),
    )


@pytest.mark.parametrize(
    ("name", "ref"),
    [
        ("he_normal", jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")),
        ("lecun_normal", jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal")),
        ("xavier_normal", jax.nn.initializers.variance_scaling(1.0, "fan_avg", "normal")),
        ("xavier_uniform", jax.nn.initializers.glorot_uniform()),
        ("he_uniform", jax.nn.initializers.he_uniform()),
    ],
)
def test_fan_based_samples_equal_jax_nn(name, ref):
    k = jax.random.key(2)
    np.testing.assert_array_equal(
        initializers.sample(name, k, (8, 5), dtype=jnp.float32), ref(k, (8, 5), jnp.float32)
    )
    with pytest.raises(ValueError, match="fixes sigma_w2"):
        initializers.sample(name, k, (8, 5), 2.0)


@pytest.mark.default_emitters  # bitwise: with XLA's element-wise emitters at level 0, 1 ulp off
@pytest.mark.parametrize(
    ("name", "shape"),
    [("gaussian", (16, 16)), ("orthogonal", (16, 16)), ("delta_orthogonal", (3, 4, 4))],
)
def test_traced_sigma_w2_equals_per_value_calls(name, shape):
    """vmap (and jit) over sigma_w2 draws the same samples as one call per value."""
    sw = jnp.asarray((0.5, 1.0, 2.5, 1.3939614295959473), jnp.float32)
    k = jax.random.key(4)
    f = jax.jit(jax.vmap(lambda s: initializers.sample(name, k, shape, s, jnp.float32)))
    many = f(sw)
    for i, s in enumerate(np.asarray(sw)):
        np.testing.assert_array_equal(many[i], initializers.sample(name, k, shape, float(s)))
    bias = jax.vmap(lambda s: initializers.sample_bias(k, (5,), s, jnp.float32))(sw)
    for i, s in enumerate(np.asarray(sw)):
        np.testing.assert_array_equal(bias[i], initializers.sample_bias(k, (5,), float(s)))


def test_sample_bias():
    k = jax.random.key(0)
    np.testing.assert_array_equal(initializers.sample_bias(k, (4,), 0.0), jnp.zeros(4))
    b = initializers.sample_bias(k, (20000,), 0.3, jnp.float64)
    assert float(jnp.var(b)) == pytest.approx(0.3, rel=5 * np.sqrt(2 / b.size))
    with pytest.raises(ValueError, match="sigma_b2"):
        initializers.sample_bias(k, (4,), -1.0)


# ------------------------------------------------------------------ resolver


def test_resolve_cases():
    from isometry import meanfield

    sw, sb = (float(v) for v in meanfield.critical_point("tanh", 0.25))
    assert initializers.resolve("tanh", "orthogonal", q_star=0.25) == initializers.Variances(
        sw, sb, 0.25
    )
    assert initializers.resolve("tanh", "gaussian") == initializers.Variances(1.0, 0.0, None)
    v = initializers.resolve("tanh", "gaussian", sigma_w2=1.5, sigma_b2=0.1, fixed_point=True)
    assert (v.sigma_w2, v.sigma_b2) == (1.5, 0.1)
    assert v.q_star == pytest.approx(float(meanfield.q_star("tanh", 1.5, 0.1)))
    v = initializers.resolve(None, "xavier_normal", fan_in=100, fan_out=300)
    assert v.sigma_w2 == pytest.approx(2 * 100 / 400) and v.sigma_b2 == 0.0
    assert initializers.resolve("relu", "he", fan_in=7).sigma_w2 == 2.0
    # an Initializer instance brings its own sigma_w2
    orth = initializers.get("orthogonal", sigma_w2=2.5)
    assert initializers.resolve(None, orth).sigma_w2 == 2.5
    assert orth.at(1.5) == initializers.get("orthogonal", sigma_w2=1.5)
    assert initializers.get("he").at(1.5) == initializers.get("he")


def test_resolve_errors():
    with pytest.raises(ValueError, match="not both"):
        initializers.resolve("tanh", "gaussian", q_star=0.25, sigma_w2=1.0)
    with pytest.raises(ValueError, match="not both"):
        initializers.resolve("tanh", "gaussian", q_star=0.25, sigma_b2=0.0)
    with pytest.raises(ValueError, match=r"q_star .* needs init 'gaussian'"):
        initializers.resolve("tanh", "he_normal", q_star=0.25)
    with pytest.raises(ValueError, match="fixes sigma_w2"):
        initializers.resolve("tanh", "he_normal", sigma_w2=2.0, fan_in=4)
    with pytest.raises(ValueError, match="needs fan_in"):
        initializers.resolve("tanh", "xavier_normal")
    with pytest.raises(ValueError, match="no critical point"):
        initializers.resolve("sigmoid", "gaussian", q_star=0.25)
    with pytest.raises(ValueError, match="q_star"):
        initializers.resolve("tanh", "gaussian", q_star=-1.0)
    with pytest.raises(ValueError, match="sigma_b2"):
        initializers.resolve("tanh", "gaussian", sigma_b2=-0.1)
    with pytest.raises(ValueError, match="no finite fixed point"):
        initializers.resolve("relu", "gaussian", sigma_w2=3.0, fixed_point=True)
    with pytest.raises(ValueError, match="need the activation"):
        initializers.resolve(None, "gaussian", q_star=0.25)
