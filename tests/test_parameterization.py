"""Parameterizations: the shapes found at two widths, the muP table applied to the toolkit's
MLP against the table written by hand (Yang et al. 2022, TP5 Table 3, relative to a base
width), a plain-nnx MLP against the toolkit's equivalent, the optax scaling against one step
computed by hand (SGD, Adam, AdamW), traced learning rates, depth-muP's blocks and the
toolkit configs' forward changes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from param_models import PlainMLP, PlainTransformer, toolkit_mlp

from isometry import networks, parameterization

BASE, WIDTH = 64, 256  # width multiplier m = 4


def _shapes(factory):
    return parameterization.infer(factory, (BASE, 2 * BASE))


@pytest.fixture(scope="module")
def mlp_shapes():
    return _shapes(lambda w, rngs: toolkit_mlp(w, rngs, "mup"))


# TP5 Table 3 with m = fan / base fan = 4: (role, Var factor, SGD lr factor, Adam lr factor).
MUP_BY_HAND = {
    "embed": ("input", 1.0, 4.0, 1.0),  # input weights: Var 1/fan_in, SGD eta fan_out, Adam eta
    "bias": ("input", 1.0, 4.0, 1.0),  # biases: as input weights
    "kernel": ("hidden", 1.0, 1.0, 0.25),  # hidden: Var 1/fan_in, SGD eta, Adam eta/fan_in
    "readout": ("output", 0.25, 0.25, 0.25),  # output: Var 1/fan_in^2, eta/fan_in both
    "readout_bias": ("fixed", 1.0, 1.0, 1.0),  # nothing grows
}


def test_infer_finds_the_roles_of_the_toolkit_mlp(mlp_shapes):
    assert mlp_shapes.roles() == {k: v[0] for k, v in MUP_BY_HAND.items()}
    assert mlp_shapes.params["kernel"].grows == (1, 2)  # (L, in, out): L does not grow
    assert mlp_shapes.base_width == BASE


@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_mup_table_on_the_toolkit_mlp_is_the_hand_written_table(mlp_shapes, rule):
    model = toolkit_mlp(WIDTH, nnx.Rngs(0), "mup")
    before = np.asarray(model.readout[...])
    p = parameterization.apply(model, "mup", mlp_shapes, optimizer=rule)
    column = 2 if rule == "sgd" else 3
    assert p.roles == {k: v[0] for k, v in MUP_BY_HAND.items()}
    assert p.variance_scale == {k: v[1] for k, v in MUP_BY_HAND.items()}
    assert p.lr_scale == {k: v[column] for k, v in MUP_BY_HAND.items()}
    np.testing.assert_allclose(np.asarray(model.readout[...]), 0.5 * before, rtol=1e-6)
    assert p.branch_scale == 1.0 and p.attention == "1/d"


def test_standard_and_ntk_tables(mlp_shapes):
    model = toolkit_mlp(WIDTH, nnx.Rngs(0))
    sp = parameterization.apply(model, "standard", mlp_shapes, optimizer="adam")
    assert set(sp.lr_scale.values()) == {1.0} and set(sp.variance_scale.values()) == {1.0}
    for rule, hidden in (("sgd", 0.25), ("adam", 0.5)):  # NTK: eta/fan_in, eta/sqrt(fan_in)
        p = parameterization.apply(toolkit_mlp(WIDTH, nnx.Rngs(0)), "ntk", mlp_shapes,
                                   optimizer=rule)  # fmt: skip
        assert p.lr_scale == {"embed": 1.0, "bias": 1.0, "kernel": hidden, "readout": hidden,
                              "readout_bias": 1.0}  # fmt: skip


# The plain model's parameter for each of the toolkit's (layer 0 for the stacked ones).
PLAIN_OF_TOOLKIT = {
    "embed": "embed.kernel",
    "kernel": "layers.0.kernel",
    "bias": "layers.0.bias",
    "readout": "readout.kernel",
    "readout_bias": "readout.bias",
}


def _variance(w):
    """``fan_in * mean(W^2)`` of a weight ``(..., in, out)`` (the toolkit's stacks: layer 0)."""
    w = np.asarray(w, np.float64)
    w = w[0] if w.ndim == 3 else w
    return w.shape[0] * np.mean(w**2)


@pytest.mark.parametrize("kind", ["ntk", "mup", "depth_mup"])
@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_plain_mlp_and_the_toolkit_mlp_get_the_same_table(kind, rule):
    plain_shapes = _shapes(lambda w, rngs: PlainMLP(w, rngs))
    tool_shapes = _shapes(lambda w, rngs: toolkit_mlp(w, rngs, kind, residual=True))
    plain = PlainMLP(WIDTH, nnx.Rngs(1))
    tool = toolkit_mlp(WIDTH, nnx.Rngs(2), kind, residual=True)
    p = parameterization.apply(plain, kind, plain_shapes, optimizer=rule, depth=2)
    t = parameterization.apply(tool, kind, tool_shapes, optimizer=rule)
    for tk, pk in PLAIN_OF_TOOLKIT.items():
        assert (t.roles[tk], t.variance_scale[tk], t.lr_scale[tk]) == (
            p.roles[pk], p.variance_scale[pk], p.lr_scale[pk]), tk  # fmt: skip
        assert t.in_block[tk] == p.in_block[pk], tk
    assert t.branch_scale == p.branch_scale
    # The variances themselves: each ``fan_in mean(W^2)`` estimates ``v`` with relative standard
    # deviation sqrt(2 / entries), so their ratio is 1 within 5 sqrt(4 / entries).
    plain_params = {
        parameterization.shapes.path_name(k): v[...]
        for k, v in nnx.to_flat_state(nnx.state(plain, nnx.Param))
    }
    for tk in ("embed", "kernel", "readout"):
        pk = PLAIN_OF_TOOLKIT[tk]
        a, b = _variance(getattr(tool, tk)[...]), _variance(plain_params[pk])
        assert abs(a / b - 1) < 5 * np.sqrt(4 / plain_params[pk].size), (tk, a, b)


def test_plain_transformer_roles():
    shapes = _shapes(lambda w, rngs: PlainTransformer(w, rngs, kind="mup"))
    roles = shapes.roles()
    for name in ("query", "key", "value", "out"):
        assert roles[f"blocks.0.attn.{name}.kernel"] == "hidden"
    assert roles["blocks.1.mlp_in.kernel"] == "hidden"
    assert roles["blocks.0.ln1.scale"] == roles["blocks.0.mlp_in.bias"] == "input"
    assert roles["embed.kernel"] == roles["embed.bias"] == "input"
    assert roles["readout.kernel"] == "output" and roles["readout.bias"] == "fixed"


# --------------------------------------------------------------------------- #
# The optax scaling, one step against the hand computation.
# --------------------------------------------------------------------------- #


def _one_step(rule, lr, **options):
    """One step of ``nnx.Optimizer`` with the parameterization's transformation (jitted)."""
    model = toolkit_mlp(2 * BASE, nnx.Rngs(0), "mup")
    shapes = _shapes(lambda w, rngs: toolkit_mlp(w, rngs, "mup"))
    p = parameterization.apply(model, "mup", shapes, optimizer=rule)
    x = jax.random.normal(jax.random.key(1), (8, 16))

    def pure(state):
        return {k: np.asarray(v) for k, v in nnx.to_pure_dict(state).items()}

    before = pure(nnx.state(model, nnx.Param))
    opt = nnx.Optimizer(model, p.tx(lr, **options), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
        opt.update(model, grads)
        return grads

    g = pure(step(model, opt))
    return p, before, g, pure(nnx.state(model, nnx.Param))


def test_sgd_step_is_scaled_as_the_table_says():
    lr = 0.1
    p, before, g, after = _one_step("sgd", lr)
    for k in before:
        np.testing.assert_allclose(after[k], before[k] - lr * p.lr_scale[k] * g[k],
                                   rtol=1e-5, atol=1e-7, err_msg=k)  # fmt: skip


def test_adam_and_adamw_steps_are_scaled_as_the_table_says():
    """Adam's first step: ``m_hat = g``, ``v_hat = g^2``, so ``Delta = -eta s g / (|g| + eps)``;
    AdamW adds ``-eta wd p`` unscaled (``eta wd`` the same for every parameter)."""
    lr, eps, wd = 0.01, 1e-8, 0.1
    for name in ("adam", "adamw"):
        p, before, g, after = _one_step(name, lr, eps=eps, weight_decay=wd)
        for k in before:
            step = p.lr_scale[k] * g[k] / (np.abs(g[k]) + eps)
            if name == "adamw":
                step = step + wd * before[k]
            np.testing.assert_allclose(after[k], before[k] - lr * step, rtol=1e-5, atol=1e-7,
                                       err_msg=f"{name} {k}")  # fmt: skip
    assert p.lr_scale["kernel"] == 0.5 and p.lr_scale["embed"] == 1.0


def test_learning_rates_may_be_traced_and_vmapped():
    """Runs at several learning rates in one ``vmap``: the transformation built inside."""
    model = PlainMLP(32, nnx.Rngs(0), depth=1)
    shapes = parameterization.infer(lambda w, r: PlainMLP(w, r, depth=1), (16, 32))
    p = parameterization.apply(model, "mup", shapes)
    graphdef, params = nnx.split(model, nnx.Param)
    x = jax.random.normal(jax.random.key(1), (4, 16))

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params)(x) ** 2)

    def train(lr):
        tx = p.tx(lr)
        state, params_ = tx.init(params), params
        for _ in range(2):
            updates, state = tx.update(jax.grad(loss)(params_), state, params_)
            params_ = optax.apply_updates(params_, updates)
        return loss(params_)

    lrs = jnp.array([1e-3, 1e-2, 3e-2])
    together = jax.jit(jax.vmap(train))(lrs)
    one = jax.jit(train)
    one_by_one = jnp.stack([one(lr) for lr in lrs])
    np.testing.assert_allclose(together, one_by_one, rtol=1e-4)


# --------------------------------------------------------------------------- #
# Depth-muP and the toolkit configs' forward changes.
# --------------------------------------------------------------------------- #


def test_depth_mup_scales_the_blocks_adam_rate_by_one_over_sqrt_depth():
    L = 4
    model = PlainTransformer(16, nnx.Rngs(0), depth=L, kind="depth_mup")
    for rule, factor in (("adam", L**-0.5), ("sgd", 1.0)):
        p = parameterization.apply(model, "depth_mup", None, optimizer=rule, depth=L)
        assert p.branch_scale == L**-0.5
        for k, s in p.lr_scale.items():
            assert s == (factor if k.startswith("blocks.") else 1.0), k
    tool = toolkit_mlp(8, nnx.Rngs(0), "depth_mup", depth=L, residual=True)
    p = parameterization.apply(tool, "depth_mup")
    assert p.depth == L and p.lr_scale["kernel"] == p.lr_scale["bias"] == L**-0.5
    assert p.lr_scale["embed"] == p.lr_scale["readout"] == 1.0


def test_toolkit_configs_make_the_forward_changes():
    cfg = networks.MLPConfig(depth=16, width=8, residual=True, residual_scale=2.0,
                             parameterization="depth_mup")  # fmt: skip
    assert cfg.branch_scale == 2.0 / 4.0
    assert networks.MLPConfig(depth=16, width=8, residual=True).branch_scale == 1.0
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    outs = {}
    for kind in ("standard", "mup"):
        tcfg = networks.TransformerConfig(depth=1, width=8, heads=2, parameterization=kind)
        outs[kind] = networks.Transformer(tcfg, rngs=nnx.Rngs(0))(x)
    assert not np.allclose(outs["standard"], outs["mup"])  # 1/d logits
    z = jax.random.normal(jax.random.key(1), (5, 8))
    w = [jax.random.normal(jax.random.key(i), (8, 8)) for i in range(4)]
    a_d = networks.attention(z, *w, heads=2, causal=False, logits="1/d")[1]
    q, k = (z @ w[0]).reshape(5, 2, 4), (z @ w[1]).reshape(5, 2, 4)
    by_hand = jax.nn.softmax(jnp.einsum("thd,shd->hts", q, k) / 4, axis=-1)
    np.testing.assert_allclose(a_d, by_hand, rtol=1e-5)
