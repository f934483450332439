"""Quadrature accuracy against closed forms, adaptive scipy quadrature and a finer rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate as si

from isometry import activations, gaussian

FINE = gaussian.Quadrature(points=16, panels=24, scales=tuple(2.0**k for k in range(-3, 6)))


def test_relu_closed_forms():
    q = jnp.array([1e-4, 0.2, 1.0, 50.0, 1e3])
    relu = activations.get("relu").phi
    np.testing.assert_allclose(
        gaussian.expect(lambda x: relu(x) ** 2, q, kinks=(0.0,)), q / 2, rtol=1e-12
    )
    np.testing.assert_allclose(
        gaussian.expect(relu, q, kinks=(0.0,)), jnp.sqrt(q / (2 * jnp.pi)), rtol=1e-12
    )


def test_linear_moments():
    q = jnp.array([0.1, 1.0, 7.0])
    for k, m in [(2, 1), (4, 3), (6, 15)]:
        np.testing.assert_allclose(
            gaussian.expect(lambda x, k=k: x**k, q), m * q ** (k // 2), rtol=1e-12
        )


def _scipy_expect(f, q):
    s = np.sqrt(q)
    g = lambda z: f(s * z) * np.exp(-z * z / 2) / np.sqrt(2 * np.pi)  # noqa: E731
    pts = sorted({0.0, *(k / s for k in (-2, -1, -0.5, 0.5, 1, 2) if abs(k / s) < 12)})
    return si.quad(g, -12, 12, points=pts, epsabs=0, epsrel=1e-13, limit=500)[0]


@pytest.mark.parametrize(
    "name", ["tanh", pytest.param("sigmoid", marks=pytest.mark.slow), "gelu", "selu",
             pytest.param("softplus", marks=pytest.mark.slow),
             pytest.param("elu", marks=pytest.mark.slow), "hard_tanh"]
)  # fmt: skip
def test_one_dimensional_accuracy_matches_docstring(name):
    """Relative error < 1e-11 for 1e-4 <= q <= 1e3 (the module docstring's claim)."""
    act = activations.get(name)
    q = jnp.array([1e-4, 1e-2, 0.3, 1.0, 10.0, 100.0, 1e3])
    got = gaussian.expect(lambda x: act.phi(x) ** 2, q, kinks=act.kinks)
    fine = gaussian.expect(lambda x: act.phi(x) ** 2, q, kinks=act.kinks, quad=FINE)
    np.testing.assert_allclose(got, fine, rtol=1e-11)
    # The fine rule itself agrees with adaptive quadrature where that is reliable.
    f = lambda x: np.asarray(act.phi(jnp.asarray(x))) ** 2  # noqa: E731
    for qi in (0.3, 1.0, 10.0):
        assert float(gaussian.expect(lambda x: act.phi(x) ** 2, qi, kinks=act.kinks)) == (
            pytest.approx(_scipy_expect(f, qi), rel=1e-10)
        )


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) for n in ("tanh", "selu", "hard_tanh")],
    # (by default the 2-D rule is checked against the erf closed form, below)
)
def test_two_dimensional_accuracy_matches_docstring(name):
    act = activations.get(name)
    q = jnp.array([0.01, 3.0, 100.0])[:, None]
    c = jnp.array([-0.9, 0.7, 0.9999, 1.0])[None, :]
    args = dict(kinks_f=act.kinks, kinks_g=act.kinks)
    got = gaussian.expect2(act.phi, act.phi, q, q, c, **args)
    fine = gaussian.expect2(act.phi, act.phi, q, q, c, quad=FINE, **args)
    scale = gaussian.second_moment(act, q)
    assert float(jnp.max(jnp.abs(got - fine) / scale)) < 1e-11
    # c = 1 reduces to the one-dimensional second moment.
    np.testing.assert_allclose(got[:, -1], scale[:, 0], rtol=1e-11)


def test_erf_arcsine_kernel_unequal_variances():
    act = activations.get("erf")
    q1, q2 = jnp.array([0.05, 2.0, 20.0]), jnp.array([1.5, 0.3, 60.0])
    c = jnp.array([0.3, -0.8, 0.95])
    want = act.kernel(q1, q2, c * jnp.sqrt(q1 * q2))
    np.testing.assert_allclose(gaussian.expect2(act.phi, act.phi, q1, q2, c), want, rtol=1e-11)


def test_float32_fast_rule():
    act = activations.get("tanh")
    q = jnp.array([0.01, 1.0, 10.0, 100.0], dtype=jnp.float32)
    got = gaussian.expect(lambda x: act.phi(x) ** 2, q)
    assert got.dtype == jnp.float32
    want = gaussian.expect(lambda x: act.phi(x) ** 2, q.astype(jnp.float64))
    np.testing.assert_allclose(got, want, rtol=5e-6)


def test_derivative_in_q_is_heat_equation():
    """d/dq E[f(sqrt(q) z)] = E[f''(sqrt(q) z)] / 2: autodiff through the rule vs a second route."""
    act = activations.get("tanh")
    f = lambda x: act.phi(x) ** 2  # noqa: E731
    f2 = jax.vmap(jax.grad(jax.grad(f)))
    for q in (0.05, 0.7, 5.0):
        lhs = jax.grad(lambda q: gaussian.expect(f, q))(q)
        rhs = 0.5 * gaussian.expect(lambda x: f2(x.ravel()).reshape(x.shape), q)
        assert float(lhs) == pytest.approx(float(rhs), rel=1e-10)


def test_jit_vmap():
    act = activations.get("tanh")
    g = jax.jit(jax.vmap(lambda q, c: gaussian.phi_kernel(act, q, q, c)))
    q = jnp.array([0.5, 1.0])
    c = jnp.array([0.1, 0.2])
    np.testing.assert_allclose(g(q, c), gaussian.phi_kernel(act, q, q, c), rtol=1e-14)


def test_bad_arguments():
    with pytest.raises(TypeError, match="quad must be a Quadrature"):
        gaussian.expect(jnp.tanh, 1.0, quad="fine")
    with pytest.raises(ValueError, match="k must be a non-negative integer"):
        gaussian.dphi_moment("tanh", 1.0, k=-1)


def test_nodes_integrate_the_normal_measure():
    quad = gaussian.Quadrature(points=12, panels=24)
    z, w = gaussian.nodes([(0.0, 1.0, (0.0,))], quad)
    assert z.shape == w.shape
    np.testing.assert_allclose(float(jnp.sum(w)), 1.0, atol=1e-6)
    np.testing.assert_allclose(float(jnp.sum(w * z**2)), 1.0, atol=1e-5)
