"""Tests of the transformer stack and the residual branch scales of isometry.networks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from isometry import jacobian, networks, signal

# The default suite checks the pre-LN causal block (every code path of attention, the
# MLP, the layer norm and the residual); post-LN and no-residual stacks are in the slow set.
VARIANTS = [
    ("pre", True, "1/sqrt(L)", True),
    pytest.param("post", True, 1.0, False, marks=pytest.mark.slow),
    pytest.param("none", False, 1.0, False, marks=pytest.mark.slow),
]


def _stack(depth=3, **kw):
    cfg = networks.TransformerConfig(
        depth=depth, width=8, heads=2, mlp_width=6, bias=True, sigma_b2=0.1, activation="tanh",
        init="gaussian", sigma_w2=1.5, dtype="float64", **kw,
    )  # fmt: skip
    return networks.Transformer(cfg, rngs=nnx.Rngs(0)).stack()


@pytest.mark.parametrize("norm_position,residual,alpha,causal", VARIANTS)
def test_transformer_stack_jacobians_equal_jacfwd(norm_position, residual, alpha, causal):
    s = _stack(norm_position=norm_position, residual=residual, residual_scale=alpha, causal=causal)
    x = jax.random.normal(jax.random.key(1), (4, 8))
    J = jacobian.stack_jacobians(s.layer, s.params, x, depths=[1, 2, 3])
    assert J.shape == (3, 4, 8, 4, 8)
    # jacfwd of every hidden state x^1..x^3 at once: dx^d/dx^0 for each depth d
    np.testing.assert_allclose(J, jax.jacfwd(s.hidden_states)(x), rtol=1e-12, atol=1e-13)
    if causal:  # token t never sees later tokens: the blocks above the diagonal vanish
        later = np.triu(np.ones((4, 4)), 1).astype(bool)
        assert np.all(np.asarray(J[-1]).transpose(0, 2, 1, 3)[later] == 0)
        assert np.any(np.asarray(J[-1]).transpose(0, 2, 1, 3)[~later] != 0)


@pytest.mark.slow
def test_transformer_signal_measure_and_model_shapes():
    s = _stack(norm_position="pre", residual=True)
    u = jax.random.normal(jax.random.key(2), (4, 5, 8))
    fwd, bwd = signal.measure(s, u, key=jax.random.key(3))
    assert fwd.q.shape == (3,) and bwd.grad_weight_sq.shape == (3,)
    assert np.all(np.isfinite(bwd.grad_weight_sq)) and np.all(bwd.grad_preact_sq > 0)
    assert np.all(np.isfinite(fwd.branch_var))
    cfg = networks.TransformerConfig(
        depth=2, width=8, heads=2, vocab_size=5, seq_len=4, out_dim=3, pool="last"
    )
    model = networks.Transformer(cfg, rngs=nnx.Rngs(0))
    assert model(jnp.array([[0, 1, 2, 3], [4, 4, 0, 1]])).shape == (2, 3)
    patches = networks.TransformerConfig(depth=2, width=8, heads=4, in_dim=3, out_dim=2)
    assert networks.Transformer(patches, rngs=nnx.Rngs(0))(jnp.ones((7, 5, 3))).shape == (7, 2)


def test_branch_scale_one_over_sqrt_depth_in_mlp_and_conv():
    assert networks.branch_scale("1/sqrt(L)", 16) == pytest.approx(0.25)
    mlp = networks.MLPConfig(depth=16, width=4, residual=True, residual_scale="1/sqrt(L)")
    assert mlp.branch_scale == pytest.approx(0.25)
    s = networks.MLP(mlp, rngs=nnx.Rngs(0)).stack()
    x = jnp.ones((4,))
    p0 = jax.tree.map(lambda a: a[0], s.params)
    _, aux = s.step(p0, x, None)
    np.testing.assert_allclose(s.layer(p0, x), x + 0.25 * aux["post"], rtol=1e-14)
    conv = networks.ConvConfig(depth=4, channels=3, spatial_dims=1, residual=True,
                               residual_scale="1/sqrt(L)")  # fmt: skip
    c = networks.ConvNet(conv, rngs=nnx.Rngs(0)).stack()
    x = jnp.ones((5, 3))
    p0 = jax.tree.map(lambda a: a[0], c.params)
    _, aux = c.step(p0, x, None)
    np.testing.assert_allclose(c.layer(p0, x), x + 0.5 * aux["post"], rtol=1e-14)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"width": 10, "heads": 4}, "heads must divide width"),
        ({"norm_position": "middle"}, "norm_position"),
        ({"residual_scale": "1/L"}, "residual_scale"),
        ({"residual_scale": -1.0}, "residual_scale"),
        ({"pool": "max"}, "pool"),
        ({"in_dim": 3, "vocab_size": 4}, "not both"),
    ],
)
def test_transformer_config_bad_input(kw, match):
    base = {"depth": 2, "width": 8, "heads": 2}
    with pytest.raises(ValueError, match=match):
        networks.TransformerConfig(**(base | kw))


def test_branch_scale_bad_input():
    with pytest.raises(ValueError, match="residual_scale"):
        networks.MLPConfig(depth=2, width=4, residual=True, residual_scale="sqrt(L)")
    with pytest.raises(TypeError, match="residual_scale"):
        networks.ConvConfig(depth=2, channels=4, residual_scale=True)
