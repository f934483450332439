"""Networks as scanned stacks: shapes, options, NNX interop, delta-orthogonal isometry, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from isometry import initializers, meanfield
from isometry import networks as nw


@pytest.fixture
def x64():
    old = bool(jax.config.read("jax_enable_x64"))
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


# ------------------------------------------------------------------- shapes and options


@pytest.mark.parametrize(
    "norm, position, residual",
    [
        ("none", "pre", False),
        ("batch", "pre", True),
        ("batch", "post", False),
        ("layer", "pre", False),
        ("layer", "post", True),
    ],
)
def test_mlp_options_shapes_and_finite(norm, position, residual):
    cfg = nw.MLPConfig(
        depth=3,
        width=8,
        in_dim=5,
        out_dim=2,
        activation="prelu",
        norm=norm,
        norm_position=position,
        residual=residual,
        residual_scale=0.5,
        sigma_b2=0.1,
    )
    model = nw.MLP(cfg, rngs=nnx.Rngs(0))
    y = model(jnp.ones((4, 5)))
    assert y.shape == (4, 2)
    assert bool(jnp.all(jnp.isfinite(y)))
    s = model.stack()
    assert s.depth == 3
    assert s.params["kernel"].shape == (3, 8, 8)
    assert s.params["slope"].shape == (3, 8)
    np.testing.assert_allclose(s(jnp.ones((4, 5))), y, rtol=1e-6)


def test_mlp_without_maps_and_bias():
    cfg = nw.MLPConfig(depth=2, width=6, bias=False, init="he_normal", activation="relu")
    model = nw.MLP(cfg, rngs=nnx.Rngs(1))
    assert model.bias is None and model.embed is None and model.readout is None
    x = jnp.ones((3, 6))
    assert model(x).shape == (3, 6)
    assert model(x[0]).shape == (6,)  # single example


def test_stack_layer_is_scanned_step():
    cfg = nw.MLPConfig(depth=4, width=7, activation="tanh", sigma_w2=1.3, sigma_b2=0.2)
    model = nw.MLP(cfg, rngs=nnx.Rngs(2))
    s = model.stack()
    x = jax.random.normal(jax.random.key(0), (3, 7))
    h = x
    for l in range(4):
        p = jax.tree.map(lambda a, l=l: a[l], s.params)
        h = jnp.tanh(h @ p["kernel"] + p["bias"])
        np.testing.assert_allclose(s.hidden_states(x)[l], h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.hidden(x), h, rtol=1e-5, atol=1e-6)


def test_residual_and_layer_norm_equations():
    cfg = nw.MLPConfig(
        depth=1, width=6, activation="relu", norm="layer", residual=True, residual_scale=0.3
    )
    model = nw.MLP(cfg, rngs=nnx.Rngs(3))
    s = model.stack()
    p = jax.tree.map(lambda a: a[0], s.params)
    x = jax.random.normal(jax.random.key(1), (2, 6))
    h = x @ p["kernel"] + p["bias"]
    z = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + cfg.norm_eps)
    expected = x + 0.3 * jax.nn.relu(z)
    np.testing.assert_allclose(s.layer(p, x), expected, rtol=1e-5, atol=1e-6)


def test_compile_size_does_not_grow_with_depth():
    def eqns(depth):
        model = nw.MLP(nw.MLPConfig(depth=depth, width=4), rngs=nnx.Rngs(0))
        s = model.stack()
        return len(
            jax.make_jaxpr(lambda params, x: nw.Stack(s.step, params)(x))(
                s.params, jnp.ones((2, 4))
            ).eqns
        )

    assert eqns(2) == eqns(200)


# ------------------------------------------------- the plain dense stack's hoisted JVP


def _fast_and_generic(cfg):
    """The model's own call (the hoisted-JVP path) and its generic ``Stack`` view, as
    functions of ``(state, u)``."""
    graphdef, state = nnx.split(nw.MLP(cfg, rngs=nnx.Rngs(0)))

    def fast(st, u):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, st)(u)))

    def generic(st, u):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, st).stack()(u)))

    return fast, generic, state


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"bias": False, "sigma_b2": 0.0},
        {"residual": True, "residual_scale": "1/sqrt(L)"},
        pytest.param({"activation": "relu"}, marks=pytest.mark.slow),  # the same route
        pytest.param({"activation": "erf", "residual": True}, marks=pytest.mark.slow),
    ],
)
def test_plain_mlp_derivatives_equal_the_generic_stack(x64, kwargs):
    """Two routes: the model's call differentiates through the hoisted JVP, the ``Stack``
    view through the plain scan. Values, parameter gradients (reverse mode), input
    Jacobians (forward mode) and input Hessians (second order) agree to rounding."""
    cfg = nw.MLPConfig(
        depth=5, width=16, in_dim=8, out_dim=3, init="orthogonal", dtype="float64",
        **{"sigma_b2": 0.1, **kwargs},
    )  # fmt: skip
    fast, generic, state = _fast_and_generic(cfg)
    shapes = [(4, 8), (8,), (2, 3, 8)] if not kwargs else [(4, 8)]  # batch, example, 2 axes
    for shape in shapes:
        u = jax.random.normal(jax.random.key(1), shape, jnp.float64)
        assert fast(state, u) == generic(state, u)
        for a, b in zip(
            jax.tree.leaves(jax.grad(fast)(state, u)),
            jax.tree.leaves(jax.grad(generic)(state, u)),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        if shape != shapes[0]:  # values and gradients: higher orders take the same route
            continue
        np.testing.assert_allclose(
            jax.jacfwd(fast, argnums=1)(state, u), jax.jacrev(generic, argnums=1)(state, u),
            rtol=1e-12, atol=1e-14,
        )  # fmt: skip
        np.testing.assert_allclose(
            jax.hessian(fast, argnums=1)(state, u), jax.hessian(generic, argnums=1)(state, u),
            rtol=1e-10, atol=1e-13,
        )  # fmt: skip


def test_hoisted_jvp_with_one_parameter_perturbed(x64):
    """Tangents in the kernel alone or the bias alone (the other symbolically zero) give
    the plain scan's JVP."""
    cfg = nw.MLPConfig(depth=4, width=6, in_dim=3, out_dim=2, dtype="float64", sigma_b2=0.1)
    graphdef, state = nnx.split(nw.MLP(cfg, rngs=nnx.Rngs(0)))
    u = jax.random.normal(jax.random.key(0), (5, 3), jnp.float64)
    for name in ("kernel", "bias"):
        value = state[name][...]

        def out(v, generic, name=name):
            model = nnx.merge(graphdef, state, copy=True)
            getattr(model, name)[...] = v
            return model.stack()(u) if generic else model(u)

        tangent = jax.random.normal(jax.random.key(1), value.shape, jnp.float64)
        fast = jax.jvp(lambda v: out(v, False), (value,), (tangent,))[1]
        generic = jax.jvp(lambda v: out(v, True), (value,), (tangent,))[1]
        np.testing.assert_allclose(fast, generic, rtol=1e-12, atol=1e-14)


def test_only_plain_dense_stacks_take_the_hoisted_jvp():
    """The call of a plain stack is one ``custom_jvp``; with normalization or a learnable
    slope it is the generic scan."""

    def has_custom_jvp(**kwargs):
        model = nw.MLP(nw.MLPConfig(depth=3, width=4, **kwargs), rngs=nnx.Rngs(0))
        return "custom_jvp_call" in str(jax.make_jaxpr(model)(jnp.ones((2, 4))))

    assert has_custom_jvp() and has_custom_jvp(residual=True)
    assert not has_custom_jvp(norm="layer")
    assert not has_custom_jvp(activation="prelu")


def test_hoisted_jvp_takes_weight_gradients_out_of_the_scan():
    """Reverse mode through the plain stack computes all ``L`` weight gradients in one
    batched contraction (a dot with the depth as batch axis) outside the backward loop."""
    model = nw.MLP(nw.MLPConfig(depth=6, width=8, in_dim=3), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    grad = jax.grad(lambda st: jnp.sum(nnx.merge(graphdef, st)(jnp.ones((5, 3))) ** 2))
    jaxpr = jax.make_jaxpr(grad)(state)
    top = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    batched = [e for e in top if e.params["dimension_numbers"][1][0]]
    assert [e.outvars[0].aval.shape for e in batched] == [(6, 8, 8)]


# --------------------------------------------------------------------------- initialization


def test_weight_variances_match_config(x64):
    N, L = 200, 4
    for init, sw in [("gaussian", 1.7), ("orthogonal", 1.7), ("he_normal", 2.0), ("xavier", 1.0)]:
        kw = {"sigma_w2": sw} if init in ("gaussian", "orthogonal") else {}
        cfg = nw.MLPConfig(depth=L, width=N, init=init, sigma_b2=0.3, dtype="float64", **kw)
        assert cfg.variances() == pytest.approx((sw, 0.3))
        model = nw.MLP(cfg, rngs=nnx.Rngs(0))
        w = np.asarray(model.kernel[...])
        # N * Var(W) estimated from L N^2 entries: relative sd sqrt(2 / (L N^2)).
        est = N * w.var()
        tol = 5 * sw * np.sqrt(2.0 / (L * N * N))
        if init == "orthogonal":
            tol = 1e-10  # exact: columns have norm sqrt(sw)
            est = float(np.mean(np.sum(w**2, axis=1)))
        assert abs(est - sw) <= tol, (init, est)
        b = np.asarray(model.bias[...])
        assert abs(b.var() - 0.3) <= 5 * 0.3 * np.sqrt(2.0 / b.size)


def test_critical_init_uses_critical_point(x64):
    cfg = nw.MLPConfig(depth=2, width=8, activation="tanh", q_star=0.4)
    sw, sb = meanfield.critical_point("tanh", 0.4)
    assert cfg.variances() == pytest.approx((float(sw), float(sb)), rel=1e-12)
    conv = nw.ConvConfig(depth=2, channels=4, activation="tanh", q_star=0.4, init="critical")
    assert conv.variances() == pytest.approx((float(sw), float(sb)), rel=1e-12)
    ortho = nw.MLPConfig(depth=2, width=8, activation="tanh", q_star=0.4, init="orthogonal")
    assert ortho.initializer().ensemble == "orthogonal"


def test_prelu_slope_is_learnable():
    cfg = nw.MLPConfig(
        depth=2, width=5, activation="prelu", activation_params={"negative_slope": 0.1}
    )
    model = nw.MLP(cfg, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(model.slope[...], 0.1)
    x = jax.random.normal(jax.random.key(0), (4, 5))
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    assert float(jnp.sum(jnp.abs(grads["slope"][...]))) > 0


# ------------------------------------------------------------------------- NNX interop


def test_split_merge_jit_and_vmap_over_seeds():
    cfg = nw.MLPConfig(depth=3, width=8, in_dim=4, out_dim=2)
    model = nw.MLP(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    x = jnp.ones((5, 4))

    @jax.jit
    def apply(state, x):
        return nnx.merge(graphdef, state)(x)

    np.testing.assert_allclose(apply(state, x), model(x), rtol=1e-6)

    def build(key):
        return nnx.split(nw.MLP(cfg, rngs=nnx.Rngs(key)))[1]

    states = jax.vmap(build)(jax.random.split(jax.random.key(0), 3))
    ys = jax.vmap(apply, in_axes=(0, None))(states, x)
    assert ys.shape == (3, 5, 2)
    assert not np.allclose(ys[0], ys[1])
    again = nnx.merge(graphdef, jax.tree.map(lambda a: a[1], states))(x)
    np.testing.assert_allclose(again, ys[1], rtol=1e-5)


def test_same_seed_same_model():
    cfg = nw.MLPConfig(depth=3, width=8)
    a = nw.MLP(cfg, rngs=nnx.Rngs(7)).stack().params
    b = nw.MLP(cfg, rngs=nnx.Rngs(7)).stack().params
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_float64_models(x64):
    model = nw.MLP(nw.MLPConfig(depth=2, width=4, dtype="float64"), rngs=nnx.Rngs(0))
    assert model.kernel[...].dtype == jnp.float64
    cnn = nw.ConvNet(nw.ConvConfig(depth=2, channels=4, dtype="float64"), rngs=nnx.Rngs(0))
    assert cnn(jnp.ones((1, 5, 5, 4))).dtype == jnp.float64


def test_batch_norm_train_updates_running_stats_and_eval_uses_them():
    cfg = nw.MLPConfig(depth=2, width=6, norm="batch", momentum=0.5, bias=False)
    model = nw.MLP(cfg, rngs=nnx.Rngs(0))
    x = 3.0 + jax.random.normal(jax.random.key(1), (16, 6))
    before = np.asarray(model.running_mean[...]).copy()
    y_train = model(x)
    after = np.asarray(model.running_mean[...])
    assert not np.allclose(before, after)
    h1 = x @ model.kernel[...][0]
    np.testing.assert_allclose(after[0], 0.5 * h1.mean(0), rtol=1e-5)
    model.eval()
    assert model.use_running_average
    y_eval = model(x)
    assert not np.allclose(y_train, y_eval)
    np.testing.assert_allclose(model.running_mean[...], after)  # eval leaves them alone
    assert model(x[0]).shape == (6,)  # per-example in eval mode
    model.train()
    with pytest.raises(ValueError, match="batch axis"):
        model(x[0])


# ------------------------------------------------------------------------------ ConvNet


@pytest.mark.parametrize("padding", ["circular", "same"])
def test_convnet_shapes(padding):
    cfg = nw.ConvConfig(
        depth=3, channels=6, in_channels=3, out_dim=4, pool=True, padding=padding, sigma_b2=0.1
    )
    cnn = nw.ConvNet(cfg, rngs=nnx.Rngs(0))
    assert cnn(jnp.ones((2, 7, 7, 3))).shape == (2, 4)
    no_head = nw.ConvNet(nw.ConvConfig(depth=2, channels=4, spatial_dims=1), rngs=nnx.Rngs(0))
    assert no_head(jnp.ones((2, 9, 4))).shape == (2, 9, 4)


def test_circular_conv_matches_fft_convolution(x64):
    x = jax.random.normal(jax.random.key(0), (8, 2))
    k = jax.random.normal(jax.random.key(1), (3, 2, 2))
    y = nw.conv(x, k, "circular")
    # y[t] = sum_s x[t + s - 1] k[s]
    expected = sum(jnp.roll(x, 1 - s, axis=0) @ k[s] for s in range(3))
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


def _linear_cnn_jacobian(init, padding, depth=24, channels=4, size=4, sigma_w2=1.0):
    cfg = nw.ConvConfig(
        depth=depth,
        channels=channels,
        activation="linear",
        init=init,
        sigma_w2=sigma_w2,
        bias=False,
        padding=padding,
        dtype="float64",
    )
    s = nw.ConvNet(cfg, rngs=nnx.Rngs(0)).stack()
    x = jnp.zeros((size, size, channels))
    J = jax.jacfwd(s.hidden)(x).reshape(x.size, x.size)
    return np.linalg.svd(np.asarray(J), compute_uv=False)


@pytest.mark.parametrize("padding", ["circular", "same"])
def test_delta_orthogonal_linear_cnn_is_an_isometry(x64, padding):
    sv = _linear_cnn_jacobian("delta_orthogonal", padding)
    np.testing.assert_allclose(sv, 1.0, atol=1e-12)


def test_gaussian_linear_cnn_is_not_an_isometry(x64):
    # Same mean squared singular value (sigma_w2 = 1) but a broad spectrum.
    sv = _linear_cnn_jacobian("gaussian", "circular")
    assert sv.max() / sv.min() > 10


def test_custom_stack_from_layer():
    params = {"w": jnp.stack([jnp.eye(3) * 2.0] * 4)}
    s = nw.Stack.from_layer(lambda p, x: x @ p["w"], params)
    assert s.depth == 4
    np.testing.assert_allclose(s(jnp.ones((1, 3))), 16.0)


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"depth": 0, "width": 4}, "depth"),
        ({"depth": 2.5, "width": 4}, "depth"),
        ({"depth": 2, "width": 0}, "width"),
        ({"depth": 2, "width": 4, "in_dim": -1}, "in_dim"),
        ({"depth": 2, "width": 4, "activation": "nope"}, "unknown activation"),
        ({"depth": 2, "width": 4, "init": "nope"}, "unknown initializer"),
        ({"depth": 2, "width": 4, "norm": "group"}, "norm"),
        ({"depth": 2, "width": 4, "norm_position": "middle"}, "norm_position"),
        ({"depth": 2, "width": 4, "residual_scale": 0.0}, "residual_scale"),
        ({"depth": 2, "width": 4, "sigma_w2": -1.0}, "sigma_w2"),
        ({"depth": 2, "width": 4, "sigma_b2": -0.1}, "sigma_b2"),
        ({"depth": 2, "width": 4, "init": "he", "sigma_w2": 3.0}, "fixes sigma_w2"),
        ({"depth": 2, "width": 4, "init": "he", "q_star": 0.5}, "q_star"),
        ({"depth": 2, "width": 4, "q_star": 0.5, "sigma_w2": 1.0}, "not both"),
        ({"depth": 2, "width": 4, "q_star": -0.5}, "q_star"),
        ({"depth": 2, "width": 4, "bias": False, "sigma_b2": 0.1}, "bias=False"),
        ({"depth": 2, "width": 4, "init": "delta_orthogonal"}, "convolution"),
        ({"depth": 2, "width": 4, "activation": "prelu", "activation_params": {"a": 1}}, "a"),
    ],
)
def test_mlp_config_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        nw.MLPConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"depth": 2, "channels": 4, "in_channels": 8}, "in_channels <= channels"),
        ({"depth": 2, "channels": 4, "padding": "valid"}, "padding"),
        ({"depth": 2, "channels": 4, "spatial_dims": 4}, "spatial_dims"),
        ({"depth": 2, "channels": 4, "out_dim": 3}, "pool"),
        ({"depth": 0, "channels": 4}, "depth"),
        ({"depth": 2, "channels": 4, "kernel_size": 0}, "kernel_size"),
    ],
)
def test_conv_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nw.ConvConfig(**kwargs)


def test_gaussian_conv_allows_fewer_output_channels():
    cfg = nw.ConvConfig(depth=1, channels=4, in_channels=8, init="he_normal")
    assert nw.ConvNet(cfg, rngs=nnx.Rngs(0))(jnp.ones((1, 5, 5, 8))).shape == (1, 5, 5, 4)


def test_delta_orthogonal_initializer_rejects_shrinking_kernel():
    with pytest.raises(ValueError, match="in_channels <= out_channels"):
        initializers.get("delta_orthogonal")(jax.random.key(0), (3, 3, 8, 4))


def test_bad_model_inputs():
    model = nw.MLP(nw.MLPConfig(depth=2, width=4, in_dim=3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="last axis 3"):
        model(jnp.ones((2, 4)))
    with pytest.raises(TypeError, match="MLPConfig"):
        nw.MLP(nw.ConvConfig(depth=1, channels=2), rngs=nnx.Rngs(0))
    cnn = nw.ConvNet(nw.ConvConfig(depth=1, channels=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="spatial"):
        cnn(jnp.ones((2,)))


def test_kernels_and_biases_come_from_the_library_sampler():
    """MLP/ConvNet draw kernel l from split(key, L)[l] with initializers.sample."""
    cfg = nw.MLPConfig(depth=3, width=6, init="orthogonal", sigma_w2=1.7, sigma_b2=0.2)
    model = nw.MLP(cfg, rngs=nnx.Rngs(3))
    rngs = nnx.Rngs(3)
    keys = jax.random.split(rngs.params(), 3)
    for l in range(3):
        want = initializers.sample("orthogonal", keys[l], (6, 6), 1.7, model.kernel[...].dtype)
        np.testing.assert_array_equal(model.kernel[...][l], want)
    bias = initializers.sample_bias(rngs.params(), (3, 6), 0.2, model.bias[...].dtype)
    np.testing.assert_array_equal(model.bias[...], bias)
    assert cfg.variances() == (1.7, 0.2)
    conv = nw.ConvConfig(depth=2, channels=4, init="critical", q_star=0.25)
    sw, sb = (float(v) for v in meanfield.critical_point("tanh", 0.25))
    assert conv.variances() == (sw, sb) and conv.initializer().name == "delta_orthogonal"


def test_no_critical_point_is_an_error():
    with pytest.raises(ValueError, match=r"MLPConfig: .*no critical point"):
        nw.MLPConfig(depth=2, width=4, activation="sigmoid", q_star=0.25)


@pytest.mark.parametrize(
    "cfg",
    [
        nw.MLPConfig(
            depth=3,
            width=8,
            in_dim=5,
            out_dim=3,
            init="gaussian",
            sigma_w2=2.0,
            sigma_b2=0.1,
            residual=True,
            residual_scale="1/sqrt(L)",
        ),
        nw.MLPConfig(depth=2, width=8, activation="tanh", q_star=0.5, norm="layer"),
        nw.ConvConfig(
            depth=2, channels=4, kernel_size=3, spatial_dims=1, init="critical", q_star=0.3
        ),
        nw.TransformerConfig(
            depth=2,
            width=8,
            heads=2,
            seq_len=3,
            in_dim=4,
            out_dim=3,
            qk_sigma_w2=0.1,
            value_sigma_w2=2.0,
        ),
    ],
)
def test_forward_config_drops_only_the_initialization(cfg):
    """``forward_config`` resets the initialization options and keeps the rest; a model
    merged from the jitted functions' graph definition (``training.split_for_jit``)
    computes the original model's outputs bitwise, and the original keeps its config."""
    from isometry.training import evaluation

    fwd = nw.forward_config(cfg)
    init_options = ("init", "sigma_w2", "sigma_b2", "q_star", "value_sigma_w2", "qk_sigma_w2")
    for f in dataclasses.fields(cfg):
        if f.name in init_options:
            assert getattr(fwd, f.name) == f.default
        else:
            assert getattr(fwd, f.name) == getattr(cfg, f.name), f.name
    assert nw.forward_config(fwd) is fwd
    build = {
        nw.MLPConfig: nw.MLP,
        nw.ConvConfig: nw.ConvNet,
        nw.TransformerConfig: nw.Transformer,
    }[type(cfg)]
    model = build(cfg, rngs=nnx.Rngs(0))
    g, state = evaluation.split_for_jit(model)
    assert model.config == cfg
    merged = nnx.merge(g, state)
    assert merged.config == fwd
    shape = {
        nw.MLPConfig: lambda: (2, cfg.in_dim or cfg.width),
        nw.ConvConfig: lambda: (2, 6, 4),
        nw.TransformerConfig: lambda: (2, 3, 4),
    }[type(cfg)]()
    x = jax.random.normal(jax.random.key(1), shape)
    np.testing.assert_array_equal(np.asarray(merged(x)), np.asarray(model(x)))
