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
