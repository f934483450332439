"""Shared test setup: theory tests run in float64; programs compile fast.

Most of the suite's time is XLA compiling small programs, so the tests compile
with the CPU backend's optimization level 0 and without LLVM's expensive passes
(about a quarter less time; results agree with the default build up to
floating-point rounding, which every tolerance here allows). Set
``ISOMETRY_TEST_FULL_OPT=1`` to test with XLA's defaults. The flag is set
before jax starts its backend, and subprocesses started by tests inherit it.
"""

import os

if not os.environ.get("ISOMETRY_TEST_FULL_OPT"):
    _FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

import jax
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture
def key():
    return jax.random.key(0)


def pytest_collection_modifyitems(items):
    """Start the tests marked ``heavy`` (the longest of the default suite) first, so the
    two workers end together instead of one running a long test alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)
