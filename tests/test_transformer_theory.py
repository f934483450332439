"""Tests of isometry.transformer_theory: closed forms, two routes, finite-width Monte Carlo.

The default Monte Carlo check is forward only (token norm and cosines at width 256);
the slow one adds the gradients, the Jacobian and eight seeds per variant.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from isometry import networks
from isometry import transformer_theory as tt
from isometry.experiments import transformer_signal as ts


def _exchangeable(T, q, rho):
    return q * ((1 - rho) * jnp.eye(T) + rho)


def test_uniform_attention_closed_forms():
    T = 5
    causal = tt.uniform_attention(T, causal=True)
    G = tt.attention_gram(jnp.eye(T), causal)
    s, t = np.meshgrid(np.arange(1, T + 1), np.arange(1, T + 1), indexing="ij")
    # (A A^T)_st = 1 / max(s, t), so orthonormal tokens s < t end with cosine sqrt(s / t)
    np.testing.assert_allclose(G, 1.0 / np.maximum(s, t), rtol=1e-14)
    cos = np.asarray(tt.layer_norm_gram(G))
    np.testing.assert_allclose(cos, np.sqrt(np.minimum(s, t) / np.maximum(s, t)), rtol=1e-14)
    # non-causal uniform attention: every token the mean, cosine 1 after one block
    st = tt.gram_statistics(
        tt.attention_gram(_exchangeable(T, 2.0, 0.2), tt.uniform_attention(T)), T
    )
    np.testing.assert_allclose(st.cosine, 1.0, rtol=1e-14)
    np.testing.assert_allclose(st.norm, 2.0 * (1 + (T - 1) * 0.2) / T, rtol=1e-14)


def test_qk_value_ratio_general_equals_closed_form_and_vanishes_with_collapse():
    T, q = 6, 1.7
    A = tt.uniform_attention(T)
    rhos = np.array([0.0, 0.3, 0.9, 0.99])
    general = [tt.qk_value_ratio(_exchangeable(T, q, r), jnp.eye(T), A, 0.1, 1.3) for r in rhos]
    closed = tt.exchangeable_qk_value_ratio(q, rhos, T, 0.1, 1.3)
    # the general form cancels four O(q^2) terms: rounding ~ 1e-16 q^2 absolute
    np.testing.assert_allclose(general, closed, rtol=1e-12, atol=1e-15 * q**2)
    # (1 - rho)^2 as rho -> 1 (Noci et al. 2022)
    ratio = closed / (1 - rhos) ** 2
    np.testing.assert_allclose(ratio[-1] / ratio[-2], (1 + (T - 1) * 0.9) / (1 + (T - 1) * 0.99))


# post-LN (every map, the normalization's included) by default; the others in the slow set
@pytest.mark.parametrize(
    "norm_position",
    [
        pytest.param("none", marks=pytest.mark.slow),
        pytest.param("pre", marks=pytest.mark.slow),
        "post",
    ],
)
def test_jacobian_trace_forward_equals_backward(norm_position):
    """tr(J^T J) / n two ways: the forward tangent Gram and the backward gradient Gram."""
    cfg = networks.TransformerConfig(
        depth=5, width=64, norm_position=norm_position, residual_scale="1/sqrt(L)", causal=True
    )
    p = tt.profile(cfg, _exchangeable(4, 1.0, 0.3), seq_len=4)
    np.testing.assert_allclose(p.jacobian_sq[-1], p.grad_state[0], rtol=1e-10)
    if norm_position == "post":
        np.testing.assert_allclose(p.norm, 1.0, rtol=1e-12)


def test_collapse_in_one_block_without_residual():
    cfg = networks.TransformerConfig(depth=3, width=64, norm_position="none", residual=False)
    cos = tt.profile(cfg, _exchangeable(4, 1.0, 0.3), seq_len=4).cosine
    assert int(tt.collapse_depth(cos, 1e-9)) == 1  # uniform non-causal attention


@pytest.mark.slow
def test_small_branch_limit():
    cfg = networks.TransformerConfig(depth=3, width=64, norm_position="none", residual_scale=1e-4)
    p = tt.profile(cfg, _exchangeable(4, 1.0, 0.3), seq_len=4)
    np.testing.assert_allclose(p.cosine, 0.3, atol=1e-6)  # alpha -> 0: the identity


@pytest.mark.slow
def test_causal_collapse_is_gradual():
    cfg = networks.TransformerConfig(depth=8, width=64, norm_position="none", residual=False)
    cos = tt.profile(dataclasses.replace(cfg, causal=True), _exchangeable(4, 1.0, 0.3), 4).cosine
    assert 1 < int(tt.collapse_depth(cos, 1e-3)) < 8 and np.all(np.diff(cos) > 0)


def test_bad_input():
    with pytest.raises(ValueError, match="seq_len"):
        tt.gram_statistics(jnp.eye(3), 1)
    with pytest.raises(ValueError, match="seq_len"):
        tt.uniform_attention(1)
    with pytest.raises(ValueError, match="seq_len"):
        tt.token_gram(jnp.ones((1, 8)))
    with pytest.raises(ValueError, match="seq_len=2 must divide"):
        tt.gram_statistics(jnp.eye(3), 2)
    with pytest.raises(TypeError, match="TransformerConfig"):
        tt.profile(networks.MLPConfig(depth=2, width=4), jnp.eye(4), 2)
    with pytest.raises(ValueError, match="eps"):
        tt.collapse_depth(jnp.ones(3), eps=0.0)


_CFG = networks.TransformerConfig(depth=2, width=64)
_BAD_GRAMS = [
    ("nan", "G0 must be finite: 1 of 16 entries are NaN", [(0, 1)], np.nan),
    ("zero token", r"positive diagonal .* got G0\[i, i\] = \[0.0\] at i = \[2\]", [(2, 2)], 0.0),
    ("negative", r"positive diagonal .* got G0\[i, i\] = \[-1.0\] at i = \[0\]", [(0, 0)], -1.0),
]


@pytest.mark.parametrize(
    ("what", "match", "at", "value"), _BAD_GRAMS, ids=[b[0] for b in _BAD_GRAMS]
)
def test_profile_refuses_a_gram_that_gives_nan(what, match, at, value):
    """A NaN input Gram, or a token of zero (or negative) squared norm, made the profile NaN
    everywhere (a zero token has no cosine); now a ValueError naming ``G0``."""
    G0 = np.array(_exchangeable(4, 1.0, 0.3))
    for i, j in at:
        G0[i, j] = value
    with pytest.raises(ValueError, match=match):
        tt.profile(_CFG, G0, seq_len=4)


def test_profile_refuses_a_bad_top_gradient_gram():
    G0 = _exchangeable(4, 1.0, 0.3)
    with pytest.raises(ValueError, match=r"Gamma_L must have the shape of G0 \(4, 4\)"):
        tt.profile(_CFG, G0, seq_len=4, Gamma_L=jnp.eye(3))
    with pytest.raises(ValueError, match="Gamma_L must be finite"):
        tt.profile(_CFG, G0, seq_len=4, Gamma_L=jnp.full((4, 4), jnp.inf))


def _check_within(measured, theory, z=5.0):
    """Seed mean within ``z`` standard errors (from the seed spread) of the theory."""
    m = np.asarray(measured)
    se = m.std(axis=0, ddof=1) / np.sqrt(m.shape[0])
    err = np.abs(m.mean(axis=0) - np.asarray(theory))
    assert np.all(err <= z * se), (m.mean(axis=0), np.asarray(theory), se)


# The pre-LN 1/sqrt(L) stack by default; no layer norm without residual in the slow set
# (and both with gradients and the Jacobian in test_block_statistics_match_theory_slow).
VARIANTS_MC = [
    pytest.param("none", False, 1.0, marks=pytest.mark.slow),
    ("pre", True, "1/sqrt(L)"),
]


@pytest.mark.parametrize("norm_position,residual,alpha", VARIANTS_MC)
def test_token_statistics_match_theory_at_width_256(norm_position, residual, alpha):
    """Forward Monte Carlo: 6 seeds, width 256, 2 blocks, 2 causal sequences of 4 tokens."""
    cfg = ts.Config(depth=2, width=256, seq_len=4, seeds=6, causal=True)
    net = dataclasses.replace(
        ts.network_config(cfg, "none", "1"),
        norm_position=norm_position, residual=residual, residual_scale=alpha,
    )  # fmt: skip
    template = networks.Transformer(net, rngs=nnx.Rngs(0)).stack()

    def one(key):
        k_net, k_in = jax.random.split(key)
        params = networks.transformer_params(net, k_net, jnp.result_type(float))
        s = dataclasses.replace(template, params=params)
        x0 = ts.token_inputs(k_in, 2, 4, 256, cfg.cosine, cfg.cross_cosine)
        st = tt.gram_statistics(jax.vmap(tt.token_gram)(s.hidden_states(x0)), 4)
        return st.norm, st.cosine, st.cross_cosine

    meas = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(7), cfg.seeds))
    p = tt.profile(net, ts.input_gram(cfg), 4)
    for m, t in zip(meas, (p.norm, p.cosine, p.cross_cosine), strict=True):
        _check_within(m, t)


@pytest.mark.slow
@pytest.mark.parametrize("norm_position,alpha", [("none", "0"), ("pre", "1/sqrt(L)")])
def test_block_statistics_match_theory_slow(norm_position, alpha):
    """All per-block statistics of the experiment (8 seeds, width 256, 8 blocks, T = 8)."""
    cfg = ts.Config(depth=8, width=256, seeds=8, tangents=4)
    f = jax.jit(jax.vmap(ts.measure_function(cfg, norm_position, alpha)))
    m = f(jnp.arange(cfg.seeds))
    p = tt.profile(ts.network_config(cfg, norm_position, alpha), ts.input_gram(cfg), cfg.seq_len)
    theory = {k: getattr(p, k) for k in ("norm", "cosine", "cross_cosine", "jacobian_sq", "update")}
    theory |= {f"grad_{w}": p.grad_weights[w] for w in ("value", "mlp_in")}
    for k, t in theory.items():
        _check_within(m[k], t)
    if alpha != "0":  # without residual both vanish (collapsed gradients): checked in the figure
        _check_within(m["grad_query"] / m["grad_value"], p.qk_value)
