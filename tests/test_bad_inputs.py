"""Bad input at the public boundary: a clear error naming the parameter, never a silent NaN.

Each row of a table is one bad input a new user makes (issue #17); the test
checks the exception type and that the message names the parameter or says what
was expected. ``tests/README.md`` counts the rows per module. Most rows fail in
validation before anything compiles; the few that compute use width <= 32.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from isometry import (
    cli,
    freeprob,
    jacobian,
    meanfield,
    networks,
    parameterization,
    probe,
    signal,
    spectra,
    training,
)
from isometry import data as data_mod

KEY = jax.random.key(0)
NAN = float("nan")
INF = float("inf")


@pytest.fixture(scope="module")
def mlp():
    return networks.MLP(networks.MLPConfig(depth=2, width=8), rngs=nnx.Rngs(0))


def _tiny_net():
    return jacobian.RandomNetwork("tanh", "orthogonal", width=8, depth=4)


def _custom_config(**kw):
    return training.TrainConfig(steps=4, batch_size=8, **kw)


# (id, call, exception, text the message contains); ``m`` is the tiny MLP.
API = [
    # spectra: no silent NaN
    ("spectra.moments empty", lambda m: spectra.moments([]), ValueError, "must not be empty"),
    ("spectra.moments nan", lambda m: spectra.moments([1.0, NAN]), ValueError, "finite"),
    ("spectra.summary inf", lambda m: spectra.summary(jnp.array([1.0, INF])), ValueError,
     "sq_singular_values must be finite"),
    ("spectra.summary_rows nan", lambda m: spectra.summary_rows([1], [[1.0, NAN]]), ValueError,
     "finite"),
    ("spectra.ks_distance nan", lambda m: spectra.ks_distance([1.0, NAN], [1.0, 2.0]),
     ValueError, "a must be finite"),
    ("spectra.ks_distance strings", lambda m: spectra.ks_distance("abc", [1.0]), TypeError,
     "a must be a real"),
    ("spectra.ks_distance zero weights",
     lambda m: spectra.ks_distance([1.0, 2.0], [1.0], a_weights=[0.0, 0.0]), ValueError,
     "a_weights must have a positive sum"),
    ("spectra.wasserstein1 nan", lambda m: spectra.wasserstein1([1.0, 2.0], [1.0, NAN]),
     ValueError, "b must be finite"),
    ("spectra.wasserstein1 negative weights",
     lambda m: spectra.wasserstein1([1.0, 2.0], [1.0, 2.0], b_weights=[-1.0, 2.0]), ValueError,
     "b_weights must be >= 0"),
    ("spectra.ks_distance_cdf inf", lambda m: spectra.ks_distance_cdf([INF], lambda x: x),
     ValueError, "a must be finite"),
    ("spectra.singular_values nan", lambda m: spectra.singular_values(jnp.full((3, 3), NAN)),
     ValueError, "J must be finite"),
    ("spectra.squared_singular_values inf",
     lambda m: spectra.squared_singular_values(np.full((3, 3), INF), method="eigh"), ValueError,
     "J must be finite"),
    ("spectra.trace_moments nan", lambda m: spectra.trace_moments(np.full((2, 2), NAN)),
     ValueError, "J must be finite"),
    ("spectra.histogram_density nan", lambda m: spectra.histogram_density([1.0, NAN, 2.0]),
     ValueError, "values must be finite"),
    ("spectra.histogram_density bins 0", lambda m: spectra.histogram_density([1.0], bins=0),
     ValueError, "bins must be an integer >= 1"),
    ("spectra.histogram_density negative weights",
     lambda m: spectra.histogram_density([1.0, 2.0], weights=[-1.0, 1.0]), ValueError,
     "weights must be >= 0"),
    ("spectra.distance_to_law nan sample", lambda m: spectra.distance_to_law([1.0, NAN], None),
     ValueError, "sample must be finite"),
    ("spectra.slq_density zero bandwidth", lambda m: spectra.slq_density(
        spectra.SLQResult(jnp.ones((1, 2)), jnp.full((1, 2), 0.5), 2), [1.0], bandwidth=0.0),
     ValueError, "bandwidth must be > 0.0"),
    ("spectra.slq non-key", lambda m: spectra.slq(lambda v: v, 4, 0), TypeError,
     "key must be a JAX PRNG key"),
    ("spectra.trace_moments n_steps 0", lambda m: spectra.trace_moments(np.eye(2), n_steps=0),
     ValueError, "n_steps must be an integer >= 1"),
    # meanfield and freeprob: strings, None, shapes
    ("meanfield.chi1 string", lambda m: meanfield.chi1("tanh", "1.5", 0.05), TypeError,
     "sigma_w2 must be a real number"),
    ("meanfield.chi1 None", lambda m: meanfield.chi1("tanh", None, 0.05), TypeError,
     "sigma_w2 must be a real number"),
    ("meanfield.q_star None sigma_b2", lambda m: meanfield.q_star("tanh", 1.5, None), TypeError,
     "sigma_b2 must be a real number"),
    ("meanfield.q_map list of strings", lambda m: meanfield.q_map("tanh", ["1"], 1.5, 0.0),
     TypeError, "q must be a real number"),
    ("meanfield.depth_scales shapes",
     lambda m: meanfield.depth_scales("tanh", np.full(3, 1.5), np.full(2, 0.05)), ValueError,
     "must broadcast together, got shapes sigma_w2 (3,), sigma_b2 (2,)"),
    ("meanfield.c_map shapes",
     lambda m: meanfield.c_map("tanh", 0.5, np.ones(2), np.full(3, 1.5), 0.0), ValueError,
     "must broadcast together"),
    ("freeprob.jacobian_moments string q_star",
     lambda m: freeprob.jacobian_moments("tanh", "0.25", 4, "orthogonal"), TypeError,
     "q_star must be a real number"),
    ("freeprob.max_eigenvalue string sigma_w2",
     lambda m: freeprob.max_eigenvalue("tanh", 0.25, 4, "orthogonal", sigma_w2="2"), TypeError,
     "sigma_w2 must be a real number"),
    ("freeprob.jacobian_moments float depth",
     lambda m: freeprob.jacobian_moments("tanh", 0.25, 4.0, "orthogonal"), ValueError,
     "depth must be an integer"),
    # jacobian
    ("jacobian.random_network_spectra non-key",
     lambda m: jacobian.random_network_spectra(0, _tiny_net()), TypeError,
     "key must be a JAX PRNG key such as jax.random.key(0), got int 0"),
    ("jacobian.random_network_spectra float array key",
     lambda m: jacobian.random_network_spectra(np.ones(2), _tiny_net()), TypeError,
     "key must be a JAX PRNG key"),
    ("jacobian.random_network_spectra not a network",
     lambda m: jacobian.random_network_spectra(KEY, "tanh"), TypeError,
     "net must be a RandomNetwork"),
    ("jacobian.RandomNetwork string sigma_w2",
     lambda m: jacobian.RandomNetwork(sigma_w2="2"), TypeError, "sigma_w2 must be a real"),
    ("jacobian.sphere_inputs non-key", lambda m: jacobian.sphere_inputs(None, (2, 4), 1.0),
     TypeError, "key must be a JAX PRNG key"),
    ("jacobian.sphere_inputs no q_star", lambda m: jacobian.sphere_inputs(KEY, (2, 4)),
     TypeError, "q_star (or model=) is required"),
    ("jacobian.sphere_inputs negative shape",
     lambda m: jacobian.sphere_inputs(KEY, (2, -4), 1.0), ValueError, "shape entries"),
    ("jacobian.sphere_inputs model and q_star",
     lambda m: jacobian.sphere_inputs(KEY, (2, 8), 1.0, model=m), TypeError, "not both"),
    ("jacobian.sphere_inputs not a model",
     lambda m: jacobian.sphere_inputs(KEY, (2, 8), model="mlp"), TypeError,
     "model must be an MLP or ConvNet"),
    ("jacobian.random_params non-key", lambda m: jacobian.random_params(3, 4), TypeError,
     "key must be a JAX PRNG key"),
    ("jacobian.stack_jacobians not a layer",
     lambda m: jacobian.stack_jacobians(3, {}, jnp.ones(3)), TypeError,
     "layer must be a function layer(params_l, h), a networks.Stack or a model"),
    ("jacobian.stack_jacobians model, wrong input width",
     lambda m: jacobian.stack_jacobians(m, jnp.ones(5), [1]), ValueError,
     "u must have last axis 8, got shape (5,)"),
    ("jacobian.stack_jacobians model, too many arguments",
     lambda m: jacobian.stack_jacobians(m, m.stacked_params(), jnp.ones(8), [1]), TypeError,
     "too many positional arguments"),
    ("jacobian.pair_on_sphere width 1", lambda m: jacobian.pair_on_sphere(KEY, 1, 0.5, 1.0),
     ValueError, "width must be an integer >= 2"),
    ("jacobian.pair_on_sphere cosine above 1",
     lambda m: jacobian.pair_on_sphere(KEY, 8, 1.5, 1.0), ValueError, "c0 must be <= 1.0"),
    ("jacobian.pair_on_sphere zero mean square",
     lambda m: jacobian.pair_on_sphere(KEY, 8, 0.5, 0.0), ValueError, "mean_square must be > 0"),
    # networks
    ("networks.MLPConfig integer dtype",
     lambda m: networks.MLPConfig(depth=2, width=8, dtype="int32"), ValueError,
     "dtype must be one of 'float32', 'float64'"),
    ("networks.MLP rngs not Rngs",
     lambda m: networks.MLP(networks.MLPConfig(depth=2, width=8), rngs=0), TypeError,
     "rngs must be an nnx.Rngs"),
    ("networks.MLP dtype not a dtype",
     lambda m: networks.MLP(networks.MLPConfig(depth=2, width=8), rngs=nnx.Rngs(0), dtype="x"),
     TypeError, "dtype must be a floating dtype"),
    ("networks.ConvConfig bad dtype",
     lambda m: networks.ConvConfig(depth=2, channels=4, dtype="complex64"), ValueError,
     "dtype must be one of"),
    # signal
    ("signal.measure wrong input width",
     lambda m: signal.measure(m, jnp.ones((4, 5)), key=KEY), ValueError,
     "u must have last axis 8, got shape (4, 5)"),
    ("signal.measure non-key", lambda m: signal.measure(m, jnp.ones((4, 8)), key=3), TypeError,
     "key must be a JAX PRNG key"),
    ("signal.fit_decay_length floor above ceiling",
     lambda m: signal.fit_decay_length(np.ones(8), 1.0, 0.1), ValueError,
     "floor must be below ceiling"),
    ("signal.fit_decay_length one layer",
     lambda m: signal.fit_decay_length(np.ones(8), 1.0, min_layers=1), ValueError,
     "min_layers must be an integer >= 2"),
    # training
    ("training.TrainConfig string learning_rate",
     lambda m: training.TrainConfig(learning_rate="0.1"), TypeError,
     "learning_rate must be a real number"),
    ("training.TrainConfig None momentum", lambda m: training.TrainConfig(momentum=None),
     TypeError, "momentum must be a real number"),
    ("training.TrainConfig clip 'custom' from JSON",
     lambda m: training.TrainConfig.from_dict({"clip": "custom"}), ValueError,
     "pass the transformation itself"),
    ("training.TrainConfig optimizer 'custom' from JSON",
     lambda m: training.TrainConfig.from_dict({"optimizer": "custom"}), ValueError,
     "pass the transformation itself"),
    ("training.TrainConfig clip a number", lambda m: training.TrainConfig(clip=1.0), TypeError,
     "or an optax GradientTransformation"),
    ("training.train data not a Dataset",
     lambda m: training.train(m, "digits", training.TrainConfig()), TypeError,
     "data must be an isometry.data.Dataset"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "error", "text"), [c[1:] for c in API], ids=[c[0] for c in API])
def test_bad_input_is_a_clear_error(mlp, call, error, text):
    with pytest.raises(error) as info:
        call(mlp)
    assert text in str(info.value)


def test_labels_outside_the_output_classes(mlp):
    """Labels 0..11 for a model with 8 outputs: named before training (was: non-finite loss)."""
    x = np.ones((12, 8), np.float32)
    y = np.arange(12, dtype=np.int32)
    ds = data_mod.Dataset("toy", x, y, x, y, num_classes=12)
    with pytest.raises(ValueError, match=r"labels in \[0, 11\], outside the model's 8 output"):
        training.train(mlp, ds, _custom_config())
    short = data_mod.Dataset("toy", x[:, :5], y, x[:, :5], y, num_classes=8)
    with pytest.raises(ValueError, match=r"does not take the data's inputs \(5,\)"):
        training.train(mlp, short, _custom_config())


def test_squares_that_overflow_are_named():
    """J finite, s^2 not (float32): two linear layers ``h W`` with ``W = 1e10 I`` give
    ``s = 1e20`` exactly and ``s^2 = 1e40 > 3.4e38``; the squared route raises and names
    the remedies (checked on the issue's network in the slow test below)."""
    params = jnp.full((2, 1, 1), 1e10, jnp.float32) * jnp.eye(4, dtype=jnp.float32)
    x = jnp.ones(4, jnp.float32)
    with pytest.raises(jacobian.NonFiniteJacobianError, match=r"overflow float32.*singular_values"):
        jacobian.stack_singular_values(_linear, params, x, squared=True)


def test_log_route_through_a_singular_layer_is_finite():
    """A layer with a zero derivative (ReLU's dead units) made the log-space route NaN
    (``log 0 - log 0``). With ``W = diag(2, 1, 0)`` twice, ``s = (4, 1, 0)`` exactly: the two
    non-zero ones come out exact and the zero one finite, below ``log(tiny)``."""
    params = jnp.stack([jnp.diag(jnp.array([2.0, 1.0, 0.0]))] * 2)
    logs = np.asarray(spectra.log_singular_values(_linear, params, jnp.ones(3)))[0]
    np.testing.assert_allclose(logs[:2], [np.log(4.0), 0.0], atol=1e-12)
    assert np.isfinite(logs[2]) and logs[2] <= np.log(np.finfo(np.float64).tiny)


def _linear(W, h):
    return h @ W


@pytest.mark.slow  # the mechanism is checked by test_squares_that_overflow_are_named
def test_random_network_squares_overflow_float32_is_named():
    """relu, sigma_w2 = 100, width 32, depth 32 (issue #17): J is finite in float32 but
    s^2 is not; the error names the network. The remedies it names work: float32
    singular values are finite and agree with the float32 log-space route within
    L N eps32 in log s, and a float64 draw of the same ensemble exceeds float32's range."""
    net = jacobian.RandomNetwork("relu", "gaussian", sigma_w2=100.0, q_star=1.0, width=32,
                                 depth=32)  # fmt: skip
    with pytest.raises(jacobian.NonFiniteJacobianError, match=r"sigma_w2=100.*width=32, depth=32"):
        jacobian.random_network_spectra(KEY, net, dtype=jnp.float32)
    run = lambda stat: jacobian.random_network_spectra(KEY, net, dtype=jnp.float32, statistic=stat)  # noqa: E731
    s32, logs = run("singular_values"), run("log_singular_values")
    assert np.all(np.isfinite(s32))
    tol = 32 * 32 * float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(np.log(s32)[..., :4], np.asarray(logs)[..., :4], atol=tol)
    lam64 = jacobian.random_network_spectra(KEY, net, dtype=jnp.float64)
    assert np.max(lam64) > np.finfo(np.float32).max


def test_under_jit_nan_is_the_documented_flag():
    """Checks run on concrete values only: under jit NaN in gives NaN out (the flag)."""
    J = jnp.full((3, 3), NAN)
    assert np.all(np.isnan(jax.jit(spectra.singular_values)(J)))
    assert np.isnan(jax.jit(lambda x: spectra.summary(x)["var"])(jnp.array([1.0, INF])))


# ----------------------------------------------------------------------------- command


def _config_file(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_text(text)
    return str(path)


CLI = [
    ("signal --width -8", lambda t: ["signal", "--width", "-8", "--out", str(t)],
     "--width: must be an integer >= 1, got -8"),
    ("phase-diagram --sigma-w2 -1:2:5 is a value",
     lambda t: ["phase-diagram", "--sigma-w2", "-1:2:5", "--out", str(t)],
     "--sigma-w2: must be > 0.0"),
    ("phase-diagram --sigma-b2 -.5:1:3 is a value",
     lambda t: ["phase-diagram", "--sigma-b2", "-.5:1:3", "--out", str(t)],
     "--sigma-b2: must be >= 0.0"),
    ("--out is a file", lambda t: ["phase-diagram", "--out", _config_file(t, "x")],
     "--out is not a directory"),
    ("--out under a file", lambda t: ["spectrum", "--out", _config_file(t, "x") + "/sub"],
     "Not a directory"),
    ("train --config missing", lambda t: ["train", "--config", str(t / "none.json")],
     "No such file or directory: "),
    ("train --config truncated JSON",
     lambda t: ["train", "--config", _config_file(t, '{"model": {"depth": 2'), "--out", str(t)],
     "config.json: not valid JSON"),
    ("train --config a JSON list", lambda t: ["train", "--config", _config_file(t, "[1]")],
     "config.json: a run config must be a JSON object"),
    ("train --config string learning rate",
     lambda t: ["train", "--out", str(t), "--config", _config_file(
         t, json.dumps({"model": {"depth": 2, "width": 8}, "train": {"learning_rate": "0.1"}}))],
     "config.json: learning_rate must be a real number"),
    ("train missing data directory",
     lambda t: ["train", "--dataset", "mnist", "--data-dir", str(t / "none"), "--out", str(t)],
     "MNIST files not found"),
    ("train --lr -0.1", lambda t: ["train", "--lr", "-0.1", "--out", str(t)],
     "--lr: must be > 0.0"),
    ("spectrum --depths 2,0", lambda t: ["spectrum", "--depths", "2,0", "--out", str(t)],
     "--depths: must be >= 1"),
    ("run unknown experiment", lambda t: ["run", "nope", "--out", str(t)],
     "unknown experiment 'nope'"),
    ("probe factory that does not import",
     lambda t: ["probe", "no_such_module:f", "--input-shape", "2,3", "--out", str(t)],
     "cannot import the factory"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "text"), [c[1:] for c in CLI], ids=[c[0] for c in CLI])
def test_command_error_is_one_line(tmp_path, capsys, argv, text):
    assert cli.main(argv(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("isometry ") and text in err[0], err


def test_command_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        cli.main(["--debug", "train", "--config", str(tmp_path / "none.json")])


# ----------------------------------------------------------------------------- friction


def test_stack_jacobians_takes_a_model(mlp):
    """``stack_jacobians(model, u, depths)`` is the (layer, params, x^0) call on its stack
    (a ``Stack`` goes through the same branch as a model's ``stack()``)."""
    u = jnp.linspace(-1.0, 1.0, 8)
    s = mlp.stack()
    by_model = jacobian.stack_jacobians(mlp, u, depths=[1, 2])
    by_parts = jacobian.stack_jacobians(s.layer, s.params, s.input_map(u), [1, 2])
    np.testing.assert_array_equal(by_model, by_parts)


def test_sphere_inputs_for_a_model():
    """Each example has ``||u||^2 = N (q* - sigma_b2) / sigma_w2`` exactly, with the model's
    variances and q* (the closed form), in the model's dtype."""
    cfg = networks.MLPConfig(depth=2, width=16, init="critical", q_star=0.5)
    sw, sb = cfg.variances()
    u = jacobian.sphere_inputs(KEY, (3, 16), model=cfg)
    assert u.dtype == jnp.float32
    np.testing.assert_allclose(jnp.sum(u * u, axis=1), 16 * (0.5 - sb) / sw, rtol=1e-5)
    same = jacobian.sphere_inputs(KEY, (3, 16), 0.5, sw, sb, batch_ndim=1, dtype=jnp.float32)
    np.testing.assert_array_equal(u, same)


def test_models_take_their_dtype_from_the_config():
    """Under jax_enable_x64 (the suite's setting) the default model is still float32."""
    assert jax.config.read("jax_enable_x64")
    cfg = networks.MLPConfig(depth=1, width=4)
    assert networks.MLP(cfg, rngs=nnx.Rngs(0)).kernel[...].dtype == jnp.float32
    cfg64 = networks.MLPConfig(depth=1, width=4, dtype="float64")
    assert networks.MLP(cfg64, rngs=nnx.Rngs(0)).kernel[...].dtype == jnp.float64
    assert networks.MLPConfig(depth=1, width=4, dtype=jnp.float64).dtype == "float64"


def test_training_takes_optax_transformations():
    """A user's clipping and optimizer are chained as the named ones are (the update is
    ``-lr g / max(1, ||g||)``), and the config writes them as "custom"."""
    grads = {"w": jnp.array([3.0, 4.0])}
    params = {"w": jnp.zeros(2)}
    custom = _custom_config(clip=optax.clip_by_global_norm(1.0), optimizer=optax.sgd(0.1))
    tx = training.optim.optimizer(custom)
    update = tx.update(grads, tx.init(params), params)[0]["w"]
    np.testing.assert_allclose(update, [-0.06, -0.08], rtol=1e-6)  # -0.1 * (3, 4) / 5
    assert training.optim.clipping(custom.clip) is custom.clip
    d = custom.to_dict()
    assert d["clip"] == d["optimizer"] == "custom" and json.dumps(d)


@pytest.mark.slow  # the chaining is checked by test_training_takes_optax_transformations
def test_training_with_optax_transformations_matches_the_named_ones():
    """The same run with ``clip=optax.clip_by_global_norm(1.0), optimizer=optax.sgd(0.05)``
    and with ``clip="global_norm:1", learning_rate=0.05`` logs the same losses."""
    ds = data_mod.load("digits", seed=0).flatten()
    cfg = networks.MLPConfig(depth=4, width=32, in_dim=ds.in_dim, out_dim=ds.out_dim)
    base = {"steps": 20, "batch_size": 32, "log_every": 5, "eval_every": 0, "probe_every": 0}
    losses = []
    for kw in (
        {"clip": "global_norm:1", "learning_rate": 0.05},
        {"clip": optax.clip_by_global_norm(1.0), "optimizer": optax.sgd(0.05)},
    ):
        model = networks.MLP(cfg, rngs=nnx.Rngs(0))
        result = training.train(model, ds, training.TrainConfig(**base, **kw))
        losses.append([r["loss"] for r in result.records if "loss" in r])
    assert len(losses[0]) == 4
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)


def test_max_eigenvalue_and_moments_are_arrays():
    """One convention: free probability returns float64 JAX arrays, never Python floats."""
    edge = freeprob.max_eigenvalue("linear", 1.0, 3, "gaussian", sigma_w2=1.0)
    mom = freeprob.jacobian_moments("linear", 1.0, 3, "gaussian", sigma_w2=1.0)
    for a in (edge, mom.mean, mom.variance):
        assert isinstance(a, jax.Array) and a.shape == () and a.dtype == jnp.float64
    np.testing.assert_allclose(edge, 4**4 / 3**3, rtol=1e-9)  # (L + 1)^(L + 1) / L^L


# --------------------------------------------------------------------------- #
# Parameterizations and the coordinate check (issue #27).
# --------------------------------------------------------------------------- #


class _Heads(nnx.Module):
    """A multi-head kernel ``(N, heads, N)``: it grows along axes 0 and 2."""

    def __init__(self, width, rngs):
        self.kernel = nnx.Param(jnp.zeros((width, 3, width)))


def _fixed(width, rngs):
    return nnx.Linear(4, 4, rngs=rngs)


def _wide(width, rngs):
    return nnx.Linear(4, width, rngs=rngs)


def _bias_at_some_widths(width, rngs):
    return nnx.Linear(4, width, use_bias=width > 8, rngs=rngs)


def _apply(kind="mup", model=None, shapes="wide", **kw):
    model = _wide(16, nnx.Rngs(0)) if model is None else model
    if shapes == "wide":
        shapes = parameterization.infer(_wide, (8, 16))
    return parameterization.apply(model, kind, shapes, **kw)


PARAM = [
    ("infer no growing dimension", lambda: parameterization.infer(_fixed, (8, 16)), ValueError,
     "no parameter dimension grows"),
    ("infer parameter trees differ", lambda: parameterization.infer(_bias_at_some_widths, (8, 16)),
     ValueError, "builds different parameters at widths 8 and 16: ['bias']"),
    ("infer one width", lambda: parameterization.infer(_wide, (8,)), ValueError,
     "widths must be two or more distinct widths"),
    ("infer factory not callable", lambda: parameterization.infer("mlp", (8, 16)), TypeError,
     "factory must be callable"),
    ("infer growing axes no role allows", lambda: parameterization.infer(_Heads, (8, 16)),
     ValueError, "parameter 'kernel' of shape (8, 3, 8) grows along axes (0, 2)"),
    ("apply unknown kind", lambda: _apply("mu_p"), ValueError, "kind must be one of"),
    ("apply unknown optimizer", lambda: _apply(optimizer="rmsprop"), ValueError,
     "optimizer must be one of 'sgd', 'adam', 'adamw'"),
    ("apply depth_mup without depth", lambda: _apply("depth_mup"), ValueError,
     "kind 'depth_mup' needs depth="),
    ("apply shapes of another model",
     lambda: _apply(model=nnx.Linear(16, 16, use_bias=False, rngs=nnx.Rngs(0))), ValueError,
     "shapes has parameters ['bias'] that the model does not have"),
    ("apply toolkit model built for another kind",
     lambda: _apply(model=networks.Transformer(networks.TransformerConfig(depth=1, width=8,
                    heads=2), rngs=nnx.Rngs(0)), shapes=None),
     ValueError, "parameterization='mup'"),
    ("optimizer unknown name", lambda: parameterization.optimizer("lion", 0.1, {}), ValueError,
     "optimizer must be one of"),
    ("optimizer learning rate <= 0", lambda: parameterization.optimizer("adam", -0.1, {}),
     ValueError, "learning_rate must be > 0"),
    ("scale_by_path parameter without a scale",
     lambda: parameterization.scale_by_path({"a": 1.0}).update({"b": jnp.ones(2)}, None),
     ValueError, "parameter 'b' has no learning-rate scale"),
    ("MLPConfig unknown parameterization",
     lambda: networks.MLPConfig(depth=2, width=8, parameterization="mu_p"), ValueError,
     "parameterization must be one of"),
    ("MLPConfig depth_mup without residual",
     lambda: networks.MLPConfig(depth=2, width=8, parameterization="depth_mup"), ValueError,
     "needs residual=True"),
    ("MLPConfig depth_mup with residual_scale 1/sqrt(L)",
     lambda: networks.MLPConfig(depth=2, width=8, residual=True, residual_scale="1/sqrt(L)",
                                parameterization="depth_mup"),
     ValueError, "already scales the branches by 1/sqrt(L)"),
    ("coord_check unknown optimizer",
     lambda: probe.coord_check(_wide, (8, 16), jnp.ones((2, 4)), "lion"), ValueError,
     "optimizer must be one of"),
    ("coord_check optimizer of another type",
     lambda: probe.coord_check(_wide, (8, 16), jnp.ones((2, 4)), 0.1), TypeError,
     "optimizer must be one of"),
    ("coord_check one size", lambda: probe.coord_check(_wide, (8,), jnp.ones((2, 4))),
     ValueError, "sizes must be two or more distinct widths"),
    ("coord_check over height",
     lambda: probe.coord_check(_wide, (8, 16), jnp.ones((2, 4)), over="height"), ValueError,
     "over must be one of 'width', 'depth'"),
    ("coord_check steps 0", lambda: probe.coord_check(_wide, (8, 16), jnp.ones((2, 4)), steps=0),
     ValueError, "steps must be an integer >= 1"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("call", "error", "text"), [c[1:] for c in PARAM], ids=[c[0] for c in PARAM]
)
def test_parameterization_bad_input_is_a_clear_error(call, error, text):
    with pytest.raises(error) as info:
        call()
    assert text in str(info.value)
