"""Mean-field theory: closed forms, consistency between routes, finite-width Monte Carlo."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isometry import activations, gaussian
from isometry import meanfield as mf

# ----------------------------------------------------------------- closed forms


def test_relu_closed_forms():
    sw = jnp.array([0.5, 1.0, 1.9])
    sb = jnp.array([0.1, 0.3, 0.05])
    np.testing.assert_allclose(mf.chi1("relu", sw, sb), sw / 2, rtol=1e-14)
    np.testing.assert_allclose(mf.q_star("relu", sw, sb), sb / (1 - sw / 2), rtol=1e-12)
    assert mf.critical_point("relu", 0.7) == pytest.approx((2.0, 0.0))
    np.testing.assert_allclose(mf.critical_sigma_w2("relu", jnp.array([0.0, 0.5])), 2.0, rtol=1e-12)


def test_linear_closed_forms():
    np.testing.assert_allclose(mf.q_star("linear", 0.5, 0.2), 0.4, rtol=1e-12)
    assert float(mf.chi1("linear", 0.5, 0.2)) == pytest.approx(0.5)
    assert mf.critical_point("linear", 2.0) == pytest.approx((1.0, 0.0))
    # Ordered phase: c* = 1 and xi_c = -1/log(chi1).
    xi_q, xi_c = mf.depth_scales("linear", 0.5, 0.2)
    assert float(xi_c) == pytest.approx(-1 / np.log(0.5), rel=1e-12)
    assert float(xi_q) == pytest.approx(-1 / np.log(0.5), rel=1e-10)


def test_erf_q_map_closed_form():
    q = jnp.array([0.1, 1.0, 5.0])
    want = 1.3 * (2 / np.pi) * np.arcsin(2 * q / (1 + 2 * q)) + 0.1
    np.testing.assert_allclose(mf.q_map("erf", q, 1.3, 0.1), want, rtol=1e-13)


def test_tanh_edge_of_chaos_at_zero_bias():
    """sigma_b2 = 0: q* -> 0 and the edge of chaos is sigma_w2 = 1 (tanh'(0) = 1)."""
    assert float(mf.critical_sigma_w2("tanh", 0.0)) == pytest.approx(1.0, abs=1e-6)
    assert float(mf.q_star("tanh", 0.8, 0.0)) < 1e-20


# -------------------------------------------------------------- consistency


SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "name",
    [
        "tanh",
        "erf",
        "relu",
        *(pytest.param(n, marks=SLOW) for n in ("selu", "gelu", "sigmoid", "hard_tanh")),
    ],
)
def test_fixed_points_are_fixed(name):
    sw = jnp.array([0.8, 1.5, 2.5, 4.0])
    sb = jnp.array([0.05, 0.2, 0.5, 1.0])
    if name in ("relu", "selu", "gelu"):
        sw = sw * 0.45  # bounded q*: keep the ReLU-like maps contracting
    fp = mf.solve_q_star(name, sw, sb)
    assert bool(jnp.all(fp.converged))
    np.testing.assert_allclose(mf.q_map(name, fp.value, sw, sb), fp.value, rtol=1e-12)
    cs = mf.solve_c_star(name, sw, sb)
    assert bool(jnp.all(cs.converged))
    np.testing.assert_allclose(mf.c_map(name, cs.value, fp.value, sw, sb), cs.value, atol=1e-10)


@pytest.mark.parametrize(
    "name", ["tanh", pytest.param("erf", marks=pytest.mark.slow),
             pytest.param("sigmoid", marks=pytest.mark.slow), "gelu"]
)  # fmt: skip
def test_chi1_is_slope_of_c_map_at_one(name):
    """chi1 = d c-map / dc at c = 1, by jax.grad through the 2-D quadrature (left limit)."""
    sw, sb = 1.7, 0.1
    q = mf.q_star(name, sw, sb)
    slope = jax.grad(lambda c: mf.c_map(name, c, q, sw, sb))
    # The derivative at c = 1 - d differs from chi1 by O(d) for smooth phi'
    # (a jump in phi', as for selu, adds an O(sqrt(d)) term instead).
    d = 1e-7
    assert float(slope(1.0 - d)) == pytest.approx(float(mf.chi1(name, sw, sb)), rel=2e-5)


@pytest.mark.parametrize("name", ["tanh", "erf", "sigmoid", "gelu"])
def test_q_map_slope_autodiff_vs_formula(name):
    """d q-map/dq = chi1 + sigma_w2 E[phi'' phi] (Schoenholz et al. 2017): two routes."""
    act = activations.get(name)
    sw, sb = 1.4, 0.3
    q = mf.q_star(act, sw, sb)
    formula = mf.chi1(act, sw, sb) + sw * gaussian.expect(lambda x: act.d2phi(x) * act.phi(x), q)
    assert float(mf.q_map_slope(act, q, sw, sb)) == pytest.approx(float(formula), rel=1e-11)


@pytest.mark.parametrize(("sw", "phase"), [(1.2, "ordered"), (3.0, "chaotic")])
def test_xi_c_matches_decay_of_iterated_c_map(sw, phase):
    """|c^l - c*| ~ exp(-l / xi_c): the measured per-layer decay rate equals chi_c."""
    sb = 0.05
    q = mf.q_star("tanh", sw, sb)
    cs = mf.c_star("tanh", sw, sb)
    _, xi_c = mf.depth_scales("tanh", sw, sb)
    cl = mf.iterate_c_map("tanh", 0.5 if phase == "ordered" else 0.0, q, sw, sb, 100)
    dist = jnp.abs(cl - cs)
    # Late layers: the linearization holds (|c - c*| < 1e-2), still far above rounding.
    lo, hi = 50, 90
    rate = jnp.log(dist[hi] / dist[lo]) / (hi - lo)
    assert float(-1 / rate) == pytest.approx(float(xi_c), rel=2e-3)
    assert (float(cs) == 1.0) == (phase == "ordered")


def test_xi_c_diverges_at_edge_of_chaos():
    crit = float(mf.critical_sigma_w2("tanh", 0.05))
    assert float(mf.chi1("tanh", crit, 0.05)) == pytest.approx(1.0, abs=1e-9)
    xi = [float(mf.depth_scales("tanh", crit * (1 + e), 0.05)[1]) for e in (-1e-2, -1e-3, 1e-3)]
    assert xi[1] > 5 * xi[0] and xi[2] > 100


def test_phase_diagram_matches_pointwise_and_flags():
    sw = jnp.linspace(0.5, 4.0, 6)
    sb = jnp.array([0.0, 0.05, 1.0])
    d = mf.phase_diagram("tanh", sw, sb)
    assert d.chi1.shape == (6, 3) and d.critical_sigma_w2.shape == (3,)
    assert bool(d.converged.all())
    SW, SB = jnp.meshgrid(sw, sb, indexing="ij")
    np.testing.assert_allclose(d.q_star, mf.q_star("tanh", SW, SB), rtol=1e-12)
    np.testing.assert_allclose(d.chi1, mf.chi1("tanh", SW, SB), rtol=1e-12)
    np.testing.assert_allclose(d.c_star, mf.c_star("tanh", SW, SB), atol=1e-10)
    # The critical line separates ordered from chaotic points.
    chaotic = d.chi1 > 1
    np.testing.assert_array_equal(chaotic, SW > d.critical_sigma_w2[None, :])


def test_phase_diagram_float32():
    """The float32 diagram (certified Mehler series; the quadrature at q* > 30, sw = 40)
    against the float64 one (three Newton steps on the two-dimensional quadrature)."""
    sw, sb = np.append(np.linspace(0.5, 4, 5), 40.0), np.linspace(0, 1, 4)
    with jax.enable_x64(False):
        d = mf.phase_diagram("tanh", sw, sb)
        assert d.chi1.dtype == jnp.float32 and bool(d.converged.all())
    d64 = mf.phase_diagram("tanh", sw, sb)
    assert bool(jnp.all(d64.q_star[-1] > 30))  # the series' nodes stop at q = 30
    # c* is a root of c-map(c) - c with slope chi_c - 1: a map error e (float32
    # rounding plus the FAST rule's 5e-6) moves it by e / (1 - chi_c).
    cond = 1.0 / jnp.maximum(1.0 - d64.chi_c, 1e-3)
    assert bool(jnp.all(jnp.abs(d.c_star - d64.c_star) <= 1e-5 * cond))
    np.testing.assert_allclose(d.chi1, d64.chi1, rtol=2e-5)
    # chi_c at c*: the c* error above moves it by about chi_c'(c*) = O(1) times as much.
    assert bool(jnp.all(jnp.abs(d.chi_c - d64.chi_c) <= 2e-5 * d64.chi_c * cond))


CATALOG = activations.names()


# by default the activations of distinct shapes; the rest (linear, learnable or duplicate
# slopes, periodic, piecewise) slow
FIXED_POINT_DEFAULT = ("tanh", "relu", "erf", "gelu", "sigmoid", "softplus", "elu", "selu")


@pytest.mark.parametrize(
    "name", [n if n in FIXED_POINT_DEFAULT else pytest.param(n, marks=pytest.mark.slow)
             for n in CATALOG]
)  # fmt: skip
def test_fixed_points_over_the_whole_range(name):
    """sigma_w2 in (0, 10], sigma_b2 in [0, 4]: converged, or flagged (q* = inf); never NaN."""
    sw, sb = np.meshgrid(np.geomspace(0.05, 10, 7), [0.0, 0.3, 4.0], indexing="ij")
    fp = mf.solve_q_star(name, sw, sb)
    assert not bool(jnp.any(jnp.isnan(fp.value)))
    ok = fp.converged
    assert bool(jnp.all(ok | jnp.isinf(fp.value)))
    assert bool(jnp.all(jnp.where(ok, jnp.abs(fp.residual) <= 1e-9 * (1 + fp.value), True)))
    if name in ("tanh", "erf", "sigmoid", "hard_tanh", "sin"):  # bounded phi: q* always finite
        assert bool(jnp.all(ok))


# ------------------------------------------------------------- finite width


def _random_tanh_network(key, width, depth, sw, sb, x1, x2):
    """Per-layer pre-activations of two inputs through one random tanh network."""

    def layer(carry, k):
        h1, h2 = carry
        kw, kb = jax.random.split(k)
        w = jax.random.normal(kw, (width, width)) * jnp.sqrt(sw / width)
        b = jax.random.normal(kb, (width,)) * jnp.sqrt(sb)
        h1 = w @ jnp.tanh(h1) + b
        h2 = w @ jnp.tanh(h2) + b
        return (h1, h2), (h1, h2)

    w0 = jax.random.normal(jax.random.fold_in(key, 10_001), (width, x1.size)) * jnp.sqrt(
        sw / x1.size
    )
    b0 = jax.random.normal(jax.random.fold_in(key, 10_002), (width,)) * jnp.sqrt(sb)
    h1, h2 = w0 @ x1 + b0, w0 @ x2 + b0
    keys = jax.random.split(key, depth - 1)
    _, (H1, H2) = jax.lax.scan(layer, (h1, h2), keys)
    return jnp.concatenate([h1[None], H1]), jnp.concatenate([h2[None], H2])


@pytest.mark.slow  # by default test_signal's networks follow the same maps (tanh and relu)
def test_monte_carlo_width_1000_tanh_follows_maps():
    """Per-layer q^l and c^l of width-1000 networks follow the iterated q- and c-maps.

    Tolerance: 4 standard errors of the seed average (measured from the seeds
    themselves) plus the O(1/N) finite-width bias, taken as 2/N relative.
    """
    width, depth, seeds = 1000, 12, 16
    sw, sb = 1.8, 0.05
    key = jax.random.key(1)
    kx1, kx2 = jax.random.split(jax.random.fold_in(key, 99))
    x1 = jax.random.normal(kx1, (width,))
    x2 = 0.6 * x1 + 0.8 * jax.random.normal(kx2, (width,))
    x1, x2 = x1 * jnp.sqrt(2.0 / jnp.mean(x1**2)), x2 * jnp.sqrt(2.0 / jnp.mean(x2**2))
    run = jax.vmap(lambda k: _random_tanh_network(k, width, depth, sw, sb, x1, x2))
    H1, H2 = run(jax.random.split(key, seeds))  # (seeds, depth, width)
    q_meas = jnp.mean(H1**2, axis=-1)
    c_meas = jnp.mean(H1 * H2, axis=-1) / jnp.sqrt(jnp.mean(H1**2, -1) * jnp.mean(H2**2, -1))

    # Theory: layer 1 has q^1 = sw ||x||^2/N + sb; then the q-map; c^1 from the inputs' overlap.
    q0 = float(jnp.mean(x1**2))
    q1 = sw * q0 + sb
    q_theory = jnp.concatenate([jnp.array([q1]), mf.iterate_q_map("tanh", q1, sw, sb, depth - 1)])
    c1 = (sw * jnp.mean(x1 * x2) + sb) / q1
    # c-map with the layer's actual length (q^l is not yet at q* in early layers).
    cs = [c1]
    kernel = jax.jit(lambda q, c: gaussian.phi_kernel("tanh", q, q, c))  # compiled once
    for l in range(1, depth):
        q_prev = q_theory[l - 1]
        k = kernel(q_prev, cs[-1])
        cs.append((sw * k + sb) / q_theory[l])
    c_theory = jnp.array(cs)

    for meas, theory in ((q_meas, q_theory), (c_meas, c_theory)):
        mean = jnp.mean(meas, axis=0)
        se = jnp.std(meas, axis=0, ddof=1) / np.sqrt(seeds)
        tol = 4 * se + 2.0 / width * jnp.abs(theory)
        assert bool(jnp.all(jnp.abs(mean - theory) <= tol)), (mean, theory, tol)


# -------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: mf.q_star("tanh", -1.0, 0.1), "sigma_w2 must be > 0"),
        (lambda: mf.q_star("tanh", 1.0, -0.1), "sigma_b2 must be >= 0"),
        (lambda: mf.chi1("tanh", float("nan"), 0.1), "sigma_w2 must be finite"),
        (lambda: mf.critical_point("tanh", 0.0), "q_star must be > 0"),
        (lambda: mf.critical_point("tanh", -2.0), "q_star must be > 0"),
        (lambda: mf.phase_diagram("tanh", [], [0.1]), "sigma_w2_grid must not be empty"),
        (lambda: mf.phase_diagram("tanh", [1.0], [float("inf")]), "sigma_b2_grid must be finite"),
        (lambda: mf.q_star("tahn", 1.0, 0.1), "unknown activation 'tahn'; known:"),
        (lambda: mf.c_map("tanh", 1.5, 1.0, 1.0, 0.1), "c must be <= 1.0"),
        (lambda: mf.iterate_q_map("tanh", 1.0, 1.0, 0.0, 0), "depth must be an integer >= 1"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_no_critical_point_for_small_q_star_sigmoid():
    # sigmoid(0) = 1/2: sigma_w2 E[phi^2] ~ 16 / 4 = 4 > q* for small q*: no critical point.
    with pytest.raises(ValueError, match="no critical point"):
        mf.critical_point("sigmoid", 0.5)
    sw, sb = mf.critical_point("sigmoid", 200.0)
    assert float(sb) > 0 and float(mf.chi1("sigmoid", sw, sb)) == pytest.approx(1.0, rel=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("name", CATALOG)
def test_correlation_fixed_points_over_the_whole_range(name):
    """c* converges wherever q* is finite, over sigma_w2 in (0, 10], sigma_b2 in [0, 4]."""
    sw, sb = np.meshgrid(np.geomspace(0.05, 10, 5), [0.0, 0.3, 4.0], indexing="ij")
    qs = mf.solve_q_star(name, sw, sb)
    cs = mf.solve_c_star(name, sw, sb)
    finite = jnp.isfinite(qs.value)
    assert bool(jnp.all(jnp.where(finite, cs.converged, True)))
    assert bool(jnp.all(jnp.where(finite, (cs.value >= 0) & (cs.value <= 1), True)))
