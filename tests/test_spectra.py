"""Tests of isometry.spectra: dense, stable (log-space QR) and matrix-free (SLQ) spectra."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from scipy.optimize import brentq

from isometry import jacobian as jac
from isometry import meanfield, spectra


@pytest.fixture
def x64():
    old = bool(jax.config.read("jax_enable_x64"))
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


def _known(n, s, key=0, dtype=jnp.float32):
    k1, k2 = jax.random.split(jax.random.key(key))
    U, _ = jnp.linalg.qr(jax.random.normal(k1, (n, n), jnp.float64))
    V, _ = jnp.linalg.qr(jax.random.normal(k2, (n, n), jnp.float64))
    return ((U * s) @ V.T).astype(dtype)


def test_singular_values_svd_and_eigh_accuracy_limit(x64):
    n = 64
    s = np.logspace(0, -6, n)  # decreasing, s_max = 1
    J = _known(n, s)  # float32
    eps = float(jnp.finfo(jnp.float32).eps)
    sv = spectra.singular_values(J)
    # SVD: each s_i to about eps * s_max (backward error of J's rounding plus gesdd's)
    assert np.all(np.abs(np.asarray(sv, float) - s) <= 4 * n * eps * s[0])
    lam = spectra.squared_singular_values(J, method="eigh")
    # Gram route: absolute error ~ eps s_max^2 on lambda ...
    assert np.all(np.abs(np.asarray(lam, float) - s**2) <= 4 * n * eps * s[0] ** 2)
    # ... so singular values above sqrt(n eps) s_max keep relative accuracy, and those far
    # below sqrt(eps) s_max have none (the documented limit).
    se = np.asarray(spectra.singular_values(J, method="eigh"), float)
    big = s > 10 * math.sqrt(n * eps) * s[0]
    assert np.all(np.abs(se[big] - s[big]) / s[big] < 0.01)
    tiny = s < 1e-2 * math.sqrt(eps) * s[0]
    assert np.max(np.abs(se[tiny] - s[tiny]) / s[tiny]) >= 0.5
    # batched, threaded over cores, equals the single call
    Jb = jnp.stack([J, 2 * J, J.T])
    np.testing.assert_allclose(
        spectra.singular_values(Jb, workers=2),
        spectra.singular_values(Jb, workers=1),
        atol=4 * n * eps * 2 * s[0],
    )
    assert spectra.singular_values(jnp.ones((2, 3, 5, 4))).shape == (2, 3, 4)
    with pytest.raises(ValueError, match="method"):
        spectra.singular_values(J, method="qr")
    with pytest.raises(ValueError, match="J must"):
        spectra.singular_values(jnp.ones(3))


def test_gram64_route_is_float64_accurate_for_float32_jacobians():
    n = 32
    rng = np.random.default_rng(0)
    U, _ = np.linalg.qr(rng.standard_normal((n, n)))
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    J = jnp.asarray(((U * np.logspace(0, -6, n)) @ V.T).astype(np.float32))
    lam_ref = np.linalg.svd(np.asarray(J, np.float64), compute_uv=False) ** 2  # of J as stored
    lam = spectra.squared_singular_values(J, method="gram64")
    assert lam.dtype == jnp.float32
    # Weyl: forming J J^T in float64 and syevd perturb lambda by <~ n^2 eps_64 s_max^2 (with
    # a factor 4 of headroom); the float32 result adds eps_32 lambda_i. A float32 Gram matrix
    # (error ~ eps_32 s_max^2 = 1e-7) would fail this by five orders of magnitude.
    bound = 4 * n**2 * np.finfo(np.float64).eps * lam_ref[0] + np.finfo(np.float32).eps * lam_ref
    assert np.all(np.abs(np.asarray(lam, np.float64) - lam_ref) <= bound)
    # the same under jit and vmap (a host callback), and split over two threads
    Jb = jnp.stack([J, 2 * J, J.T])
    batch = spectra.squared_singular_values(Jb, method="gram64")
    jitted = jax.jit(jax.vmap(lambda a: spectra.squared_singular_values(a, method="gram64")))
    np.testing.assert_array_equal(jitted(Jb), batch)
    np.testing.assert_array_equal(
        spectra.squared_singular_values(Jb, method="gram64", workers=2), batch
    )
    sv = spectra.singular_values(J, method="gram64")
    np.testing.assert_allclose(sv**2, lam, rtol=4 * np.finfo(np.float32).eps)


def test_summaries_and_moments(x64):
    lam = jnp.array([[0.0, 1.0, 2.0, 5.0], [1.0, 1.0, 1.0, 1.0]])
    s = spectra.summary(lam)
    np.testing.assert_allclose(s["mean"], [2.0, 1.0])
    np.testing.assert_allclose(s["var"], [lam[0].var(), 0.0])
    np.testing.assert_allclose(s["condition_number"], [np.inf, 1.0])
    np.testing.assert_allclose(s["frac_near_zero"], [0.25, 0.0])
    np.testing.assert_allclose(spectra.moments(lam, 3)[0], [2.0, 7.5, (1 + 8 + 125) / 4])
    edges, dens = spectra.histogram_density(lam, bins=5)
    np.testing.assert_allclose(np.sum(dens * np.diff(edges)), 1.0)
    J = jax.random.normal(jax.random.key(0), (3, 20, 30))
    tm = spectra.trace_moments(J)
    ref = spectra.squared_singular_values(J)
    np.testing.assert_allclose(tm["mean"], ref.mean(-1), rtol=1e-12)
    np.testing.assert_allclose(tm["var"], ref.var(-1), rtol=1e-10)
    np.testing.assert_allclose(tm["max"], ref[:, 0], rtol=1e-8)


def test_distances_against_scipy(x64):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=300), rng.normal(0.3, 1.2, size=200)
    wa, wb = rng.uniform(size=300), rng.uniform(size=200)
    np.testing.assert_allclose(spectra.ks_distance(a, b), scipy.stats.ks_2samp(a, b).statistic)
    np.testing.assert_allclose(
        spectra.wasserstein1(a, b, a_weights=wa, b_weights=wb),
        scipy.stats.wasserstein_distance(a, b, wa, wb),
        rtol=1e-10,
    )
    cdf = jax.scipy.stats.norm.cdf
    np.testing.assert_allclose(
        spectra.ks_distance_cdf(a, cdf), scipy.stats.kstest(a, "norm").statistic, rtol=1e-10
    )
    # W1 to a continuous law: the sample's W1 to a very large sample of that law
    ref = scipy.stats.wasserstein_distance(a, scipy.stats.norm.ppf((np.arange(200000) + 0.5) / 2e5))
    w = spectra.wasserstein1_cdf(a, cdf, (-8.0, 8.0), n=20000)
    np.testing.assert_allclose(w, ref, atol=1e-4)
    with pytest.raises(ValueError, match="support"):
        spectra.wasserstein1_cdf(a, cdf, (1.0, 0.0))
    with pytest.raises(ValueError, match="a_weights"):
        spectra.ks_distance(a, b, a_weights=wa[:5])


def test_lanczos_exact_and_exhausted_krylov_space(x64):
    ev = jnp.array([0.1, 0.5, 1.0, 2.0, 3.0, 3.0, 7.0, 10.0])
    Q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (8, 8)))
    A = (Q * ev) @ Q.T
    v0 = jnp.ones(8)
    # more steps than the dimension: full reorthogonalization, breakdown -> zero weights
    res = spectra.slq(lambda v: A @ v, 8, jax.random.key(2), n_probes=3, n_steps=12)
    nodes, w = res.atoms()
    np.testing.assert_allclose(jnp.sum(w), 1.0, rtol=1e-12)
    real = w > 1e-10
    assert np.all(np.min(np.abs(nodes[real][:, None] - ev[None]), axis=1) < 1e-8)
    np.testing.assert_allclose(res.moment(1), jnp.trace(A) / 8, rtol=0.5)
    np.testing.assert_allclose(spectra.max_eigenvalue(lambda v: A @ v, v0, 8), 10.0, rtol=1e-10)


@pytest.mark.slow
def test_slq_matches_exact_spectrum_at_width_1024():
    """SLQ density vs the dense spectrum of a width-1,024 network.

    Bound (Chen, Trogdon & Ubaru 2021): W1 <= (lambda_max - lambda_min) (1/m + 1/sqrt(N P)),
    the Gauss-quadrature term for m Lanczos steps plus the probe-averaging term for P
    Rademacher probes of dimension N.
    """
    N, depth, P, m = 1024, 6, 4, 48
    sw, sb = meanfield.critical_point("tanh", 0.25)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "W": jax.random.normal(k1, (depth, N, N)) * jnp.sqrt(sw / N),
        "b": jnp.sqrt(sb) * jax.random.normal(k2, (depth, N)),
    }
    x = jax.random.normal(k3, (N,))
    x = x / jnp.linalg.norm(x) * math.sqrt(N * 0.25)
    lam = jac.stack_singular_values(_tanh, params, x, squared=True)[0]
    res = spectra.jacobian_slq(
        lambda z: jac.stack_forward(_tanh, params, z), x, jax.random.key(2), n_probes=P, n_steps=m
    )
    nodes, w = res.atoms()
    w1 = float(spectra.wasserstein1(lam, nodes, b_weights=w))
    bound = float(lam.max() - lam.min()) * (1 / m + 1 / math.sqrt(N * P))
    assert w1 < bound, (w1, bound)
    grid = jnp.linspace(-0.5 * float(lam.max()), 1.5 * float(lam.max()), 2000)
    dens = spectra.slq_density(res, grid)
    np.testing.assert_allclose(jnp.sum(dens) * (grid[1] - grid[0]), 1.0, atol=0.02)


def test_slq_float64_option(x64):
    A = jnp.diag(jnp.linspace(0.0, 1.0, 300))
    res = spectra.slq(lambda v: A @ v, 300, jax.random.key(0), n_probes=2, n_steps=30)
    assert res.nodes.dtype == jnp.float64
    f = lambda z: jnp.tanh(z) * 2.0  # noqa: E731
    r32 = spectra.jacobian_slq(f, jnp.ones(50), jax.random.key(1), n_steps=10, dtype=jnp.float32)
    assert r32.nodes.dtype == jnp.float32


# ------------------------------------------------------------------ very deep: stable route


def _orthogonal_stack(key, L, N, sigma_w2, sigma_b2):
    k1, k2 = jax.random.split(key)
    W = jax.vmap(
        lambda k: jax.nn.initializers.orthogonal(math.sqrt(sigma_w2))(k, (N, N), jnp.float64)
    )(jax.random.split(k1, L))
    return {"W": W, "b": math.sqrt(sigma_b2) * jax.random.normal(k2, (L, N), jnp.float64)}


def _tanh(p, h):
    return jnp.tanh(h @ p["W"] + p["b"])


def _lin(p, h):
    return h @ p["W"]


@pytest.mark.parametrize("chi1", [1.05, 0.95])
def test_stable_route_2000_layers_linear(x64, chi1):
    """chi1 = sigma_w2 for a linear orthogonal net: s_i = chi1^(d/2) exactly at depth d.

    At L = 2,000 the plain float32 spectrum of J J^T overflows (chi1^L = e^97.6) or
    underflows to zero (e^-102.6); the stable float32 route matches the plain float64
    product and the closed form within the rounding bound L n eps32.
    """
    L, N = 2000, 16
    depths = np.array([1, 10, 100, 500, 1000, 2000])
    p64 = _orthogonal_stack(jax.random.key(0), L, N, chi1, 0.0)
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), p64)
    x = jnp.ones(N)
    plain32 = jac.stack_singular_values(
        _lin, p32, x.astype(jnp.float32), depths, squared=True, check_finite=False
    )
    last = np.asarray(plain32[-1])
    assert (chi1 > 1 and not np.all(np.isfinite(last))) or (chi1 < 1 and np.all(last == 0))
    stable32 = spectra.log_singular_values(_lin, p32, x.astype(jnp.float32), depths)
    plain64 = jnp.log(jac.stack_singular_values(_lin, p64, x, depths))
    tol = L * N * float(jnp.finfo(jnp.float32).eps)
    np.testing.assert_allclose(stable32, plain64, atol=tol)
    exact = 0.5 * depths[:, None] * math.log(chi1) * np.ones(N)
    np.testing.assert_allclose(stable32, exact, atol=tol)


@pytest.mark.parametrize("chi1", [pytest.param(1.05, marks=pytest.mark.slow), 0.95])
def test_stable_route_2000_layers_tanh(x64, chi1):
    """A tanh network off criticality (chaotic / ordered), 2,000 layers.

    Reference: the plain float64 product, at every depth, for the singular values it
    resolves (s_i >= 1e-8 s_max: its rounding error is ~ L n eps64 s_max). Tolerance:
    L n eps (s_max / s_i) + L n eps, the rounding bound of an L-fold product of n x n
    matrices. The stable route runs in float64 here, since a chaotic float32 forward
    pass decorrelates from the float64 one (rounding grows like e^(lambda_1 l)); the
    ordered net is also checked in float32. The plain float32 spectrum of the ordered
    net underflows to zero at depth 2,000.
    """
    L, N, sb = 2000, 16, 1e-3
    sw = brentq(lambda s: float(meanfield.chi1("tanh", s, sb)) - chi1, 0.5, 3.0)
    q = float(meanfield.q_star("tanh", sw, sb))
    params = _orthogonal_stack(jax.random.key(1), L, N, sw, sb)
    x = jax.random.normal(jax.random.key(2), (N,))
    x = x / jnp.linalg.norm(x) * math.sqrt(N * q)
    depths = np.array([1, 10, 100, 500, 1000, 2000])
    plain = np.log(np.asarray(jac.stack_singular_values(_tanh, params, x, depths)))
    stable = np.asarray(spectra.log_singular_values(_tanh, params, x, depths))
    assert np.all(np.isfinite(stable))
    ok = plain >= plain[:, :1] + math.log(1e-8)
    eps64 = float(jnp.finfo(jnp.float64).eps)
    tol = L * N * eps64 * (np.exp(plain[:, :1] - plain) + 1)
    assert np.all(np.abs(stable - plain)[ok] <= tol[ok])
    assert np.all(np.diff(stable, axis=1) <= 0)
    if chi1 < 1:
        p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
        x32 = x.astype(jnp.float32)
        s32 = spectra.log_singular_values(_tanh, p32, x32, depths)
        eps32 = float(jnp.finfo(jnp.float32).eps)
        assert np.all(
            np.abs(s32 - plain)[ok] <= (L * N * eps32 * (np.exp(plain[:, :1] - plain) + 1))[ok]
        )
        sq32 = jac.stack_singular_values(_tanh, p32, x32, [L], squared=True, check_finite=False)
        assert np.all(np.asarray(sq32) == 0)


@pytest.mark.slow
def test_stable_route_10000_layers():
    L, N = 10000, 32
    net = jac.RandomNetwork("tanh", "orthogonal", q_star=0.25, width=N, depth=L)
    logs = jac.random_network_spectra(
        jax.random.key(0), net, [100, 1000, 10000], statistic="log_singular_values"
    )
    assert np.all(np.isfinite(logs))


@pytest.mark.slow
def test_slq_width_16384_convolutional():
    """Matrix-free SLQ on a width-16,384 network (dense Jacobian: 1 GiB in float32)."""
    C, S, depth = 128, 128, 8
    key = jax.random.key(0)
    init = jax.nn.initializers.delta_orthogonal(scale=1.0)
    K = jax.vmap(lambda k: init(k, (3, C, C)))(jax.random.split(key, depth))

    def layer(k, h):
        return jnp.tanh(sum(jnp.roll(h, s - 1, axis=0) @ k[s] for s in range(3)))

    x = 0.5 * jax.random.normal(jax.random.key(1), (S, C))
    res = spectra.jacobian_slq(
        lambda z: jac.stack_forward(layer, K, z), x, jax.random.key(2), n_probes=4, n_steps=40
    )
    assert res.n == 16384
    assert np.all(np.isfinite(res.nodes))
    assert 0 < float(res.moment(1)) < 2


def test_summary_rows_per_depth():
    lam = np.abs(np.random.default_rng(0).normal(size=(3, 50))).astype(np.float32)
    rows = spectra.summary_rows([2, 8, 32], lam)
    assert [r["depth"] for r in rows] == [2, 8, 32]
    s = spectra.summary(lam.astype(np.float64))
    for i, r in enumerate(rows):
        lam64 = lam[i].astype(np.float64)
        assert r["mean"] == lam64.mean() and r["var"] == lam64.var()
        assert (r["max"], r["min"]) == (float(s["max"][i]), float(s["min"][i]))
        assert r["var"] == pytest.approx(float(s["var"][i]), rel=1e-10)
    with pytest.raises(ValueError, match="len\\(depths\\)=2"):
        spectra.summary_rows([1, 2], lam)
