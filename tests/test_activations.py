import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isometry import activations, gaussian

REQUIRED = [
    "linear", "relu", "leaky_relu", "prelu", "elu", "selu", "gelu", "silu", "swish",
    "softplus", "sigmoid", "tanh", "hard_tanh", "erf", "sin",
]  # fmt: skip


def test_catalog_has_required_names():
    assert set(REQUIRED) <= set(activations.names())


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match=r"known: .*tanh"):
        activations.get("tanhh")


def test_bad_parameters():
    with pytest.raises(ValueError, match="unknown parameter"):
        activations.get("relu", negative_slope=0.1)
    with pytest.raises(ValueError, match="negative_slope must be a finite number"):
        activations.get("leaky_relu", negative_slope=float("nan"))


def test_hashable_equal_and_static_under_jit():
    a = activations.get("leaky_relu", negative_slope=0.2)
    b = activations.get("leaky_relu", negative_slope=0.2)
    assert a == b and hash(a) == hash(b)
    assert a != activations.get("leaky_relu", negative_slope=0.3)

    @jax.jit
    def f(x, act=a):
        return act(x)

    g = jax.jit(lambda act, x: act(x), static_argnums=0)
    assert float(g(a, -1.0)) == pytest.approx(-0.2)
    assert float(f(-1.0)) == pytest.approx(-0.2)


@pytest.mark.parametrize("name", REQUIRED)
def test_derivative_matches_autodiff_off_kinks(name):
    act = activations.get(name)
    x = jnp.linspace(-3.0, 3.0, 61) + 0.0123  # avoids the kinks at 0, +-1
    auto = jax.vmap(jax.grad(act.phi))(x)
    np.testing.assert_allclose(act.dphi(x), auto, rtol=1e-12, atol=1e-12)


def test_kinked_derivatives_exact():
    relu = activations.get("relu")
    np.testing.assert_array_equal(relu.dphi(jnp.array([-1.0, 0.0, 1.0])), [0.0, 0.0, 1.0])
    leaky = activations.get("leaky_relu", negative_slope=0.1)
    np.testing.assert_allclose(leaky.dphi(jnp.array([-2.0, 3.0])), [0.1, 1.0])
    ht = activations.get("hard_tanh")
    np.testing.assert_array_equal(ht.dphi(jnp.array([-1.5, 0.3, 1.5])), [0.0, 1.0, 0.0])


def test_custom_activation():
    fn = lambda x: x**3  # noqa: E731
    a = activations.custom("cube", fn)
    assert a == activations.custom("cube", fn)
    assert float(a.dphi(2.0)) == pytest.approx(12.0)
    # Custom activations get quadrature moments: E[(z^3)^2] = 15 q^3.
    assert float(gaussian.second_moment(a, 0.5)) == pytest.approx(15 * 0.125, rel=1e-11)


CLOSED_FORM = ["linear", "relu", "leaky_relu", "prelu", "erf", "sin"]


@pytest.mark.parametrize("name", CLOSED_FORM)
def test_closed_form_kernels_match_quadrature(name):
    act = activations.get(name)
    c = jnp.array([-1.0, -0.6, 0.0, 0.45, 0.9, 1.0])
    q1, q2 = 0.7, 1.9
    want = act.kernel(q1, q2, c * np.sqrt(q1 * q2), **act.kwargs)
    got = gaussian.expect2(act.phi, act.phi, q1, q2, c, kinks_f=act.kinks, kinks_g=act.kinks)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    if act.deriv_kernel is not None:
        want = act.deriv_kernel(q1, q2, c * np.sqrt(q1 * q2), **act.kwargs)
        got = gaussian.expect2(act.dphi, act.dphi, q1, q2, c, kinks_f=act.kinks, kinks_g=act.kinks)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["linear", "relu", "leaky_relu", "erf", "sin", "hard_tanh"])
def test_closed_form_second_moment(name):
    act = activations.get(name)
    # sin oscillates on the scale 1/sqrt(q): the quadrature's documented range is q <~ 10.
    q = jnp.array([1e-3, 0.3, 1.0, 4.0, 8.0 if name == "sin" else 30.0])
    want = act.second_moment(q, **act.kwargs)
    got = gaussian.expect(lambda x: act.phi(x) ** 2, q, kinks=act.kinks)
    np.testing.assert_allclose(got, want, rtol=1e-11)


@pytest.mark.parametrize("name", ["linear", "relu", "hard_tanh"])
def test_bernoulli_law_of_derivative(name):
    act = activations.get(name)
    q = jnp.array([0.01, 0.25, 1.0, 9.0])
    p = act.bernoulli_p(q)
    for k in (1, 2, 3):  # phi'^2 in {0, 1}: every moment equals p
        got = gaussian.expect(lambda x, k=k: act.dphi(x) ** (2 * k), q, kinks=act.kinks)
        np.testing.assert_allclose(got, p, rtol=1e-11)
