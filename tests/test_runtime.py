"""The LAPACK thread limit: applied inside the block, restored after, results unchanged."""

import jax
import numpy as np
import pytest
from threadpoolctl import threadpool_info

from isometry import initializers, runtime


def _blas_threads() -> list[int]:
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


def test_limit_applies_inside_and_is_restored():
    before = _blas_threads()
    with runtime.lapack_threads(1):
        assert all(n == 1 for n in _blas_threads())
    assert _blas_threads() == before


def test_results_unchanged_under_the_limit():
    key = jax.random.key(3)
    draw = jax.jit(jax.vmap(lambda k: initializers.sample_orthogonal(k, (24, 24), 1.5)))
    keys = jax.random.split(key, 3)
    free = np.asarray(draw(keys))
    with runtime.lapack_threads(1):
        limited = np.asarray(draw(keys))
    np.testing.assert_array_equal(free, limited)
    np.testing.assert_allclose(free[0] @ free[0].T, 1.5 * np.eye(24), atol=1e-5)


@pytest.mark.parametrize("n", [0, -1, 1.5, "1"])
def test_bad_thread_count(n):
    with pytest.raises((ValueError, TypeError), match="n"):
        with runtime.lapack_threads(n):
            pass
