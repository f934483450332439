"""Eager draws in chunks and size buckets: the same bits as the direct formulas.

``stacked``/``draw_layers`` draw the layers of a concrete key in chunks and
``initializers.standard_normal`` draws a power-of-two size and cuts it, so that eager
draws compile once per layer shape or size bucket; the values must stay those
of ``jax.vmap`` over ``split(key, depth)`` and of ``jax.random.normal``.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import monitoring

from isometry import initializers
from isometry.initializers import draw_layers
from isometry.networks.build import stacked


def _direct(init, key, depth, shape, dtype=jnp.float32):
    keys = jax.random.split(key, depth)
    return jax.vmap(lambda k: initializers.sample(init, k, shape, dtype=dtype))(keys)


def _same(a, b):
    """Equal to the bit, with the same shape, dtype and weak type."""
    assert a.shape == b.shape and a.dtype == b.dtype and a.weak_type == b.weak_type
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.parametrize(
    ("init", "depth", "shape"),
    [("gaussian", 3, (8, 8)), ("orthogonal", 17, (10, 6)), ("he_uniform", 17, (6, 10))],
)
def test_stacked_equals_vmap_over_all_keys(init, depth, shape):
    key = jax.random.key(depth)
    _same(stacked(init, key, depth, shape, jnp.float32), _direct(init, key, depth, shape))


@pytest.mark.parametrize("entries", [20, 80])
def test_stacked_in_smaller_chunks_for_big_layers(monkeypatch, entries):
    """Chunks of 1 and 4 layers (as for big layers): the same bits."""
    monkeypatch.setattr(initializers, "_CHUNK_ENTRIES", entries)
    assert initializers._chunk_size((4, 5)) == entries // 20
    key = jax.random.key(entries)
    _same(stacked("orthogonal", key, 7, (4, 5), jnp.float32), _direct("orthogonal", key, 7, (4, 5)))


def test_stacked_bfloat16_and_raw_keys():
    key = jax.random.PRNGKey(5)
    want = _direct("gaussian", key, 20, (5, 7), jnp.bfloat16)
    _same(stacked("gaussian", key, 20, (5, 7), jnp.bfloat16), want)


def test_stacked_traced_is_plain_vmap():
    """Traced, the old formula as it is traced (a compiled draw can differ from the eager
    one in the last bit, before as now)."""

    def f(k):
        return stacked("gaussian", k, 19, (6, 6), jnp.float32)

    def g(k):
        return _direct("gaussian", k, 19, (6, 6))

    key = jax.random.key(2)
    _same(jax.jit(f)(key), jax.jit(g)(key))
    _same(jax.jit(lambda: f(key))(), jax.jit(lambda: g(key))())  # a concrete key in the trace
    keys = jax.random.split(key, 2)
    _same(jax.vmap(f)(keys), jax.vmap(g)(keys))


def test_draw_layers_with_a_traced_scale():
    """A concrete key, a draw closed over a traced scale: the old formula under the vmap."""
    key, scales = jax.random.key(4), jnp.array([0.5, 1.7])

    def new(v):
        return draw_layers(lambda k: initializers.sample_gaussian(k, (4, 5), v), key, 18, (4, 5))

    def old(v):
        draw = jax.vmap(lambda k: initializers.sample_gaussian(k, (4, 5), v))
        return draw(jax.random.split(key, 18))

    _same(jax.vmap(new)(scales), jax.vmap(old)(scales))


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((), jnp.float32), ((33, 40), jnp.float32), ((1500,), jnp.bfloat16), ((3, 4, 5), jnp.float64)],
)
def test_normal_equals_random_normal(shape, dtype):
    key = jax.random.key(len(shape))
    want = jax.random.normal(key, shape, dtype)
    _same(initializers.standard_normal(key, shape, dtype), want)
    # traced: a key argument, and a concrete key inside the trace
    traced = jax.jit(lambda k: jax.random.normal(k, shape, dtype))(key)
    _same(jax.jit(lambda k: initializers.standard_normal(k, shape, dtype))(key), traced)
    _same(jax.jit(lambda: initializers.standard_normal(key, shape, dtype))(), traced)


def test_bias_and_gaussian_samples_equal_the_formulas():
    key = jax.random.key(6)
    _same(
        initializers.sample_bias(key, (30, 12), 0.3, jnp.float32),
        math.sqrt(0.3) * jax.random.normal(key, (30, 12), jnp.float32),
    )
    _same(
        initializers.sample_gaussian(key, (12, 9), 1.5, jnp.float32),
        jax.random.normal(key, (12, 9), jnp.float32) * jnp.sqrt(jnp.float32(1.5 / 12)),
    )


@pytest.mark.skipif(not hasattr(jax, "threefry_partitionable"), reason="no config context")
def test_not_partitionable():
    key = jax.random.key(8)
    with jax.threefry_partitionable(False):
        assert initializers._bucket(key, 10) is None
        _same(
            stacked("gaussian", key, 21, (5, 5), jnp.float32), _direct("gaussian", key, 21, (5, 5))
        )
        want = jax.random.normal(key, (9, 4), jnp.float32)
        _same(initializers.standard_normal(key, (9, 4), jnp.float32), want)


def test_new_depths_compile_nothing():
    compiles = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    key = jax.random.key(9)
    stacked("orthogonal", key, 5, (7, 9), jnp.float32).block_until_ready()
    monitoring.register_event_duration_secs_listener(listen)
    try:
        for depth in (6, 23, 40):
            stacked("orthogonal", key, depth, (7, 9), jnp.float32).block_until_ready()
    finally:
        monitoring.unregister_event_duration_listener(listen)
    assert compiles == []
