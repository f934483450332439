"""Shared test setup: theory tests run in float64; programs compile fast.

Most of the suite's time is XLA compiling small programs, so the tests compile
with the CPU backend's optimization level 0, without LLVM's expensive passes
and with XLA's element-wise IR emitters instead of its MLIR fusion emitters
(about half the CPU time of XLA's defaults: the level alone saves a quarter, the
emitters a third of the rest; results agree with the default build up to
floating-point rounding, which every tolerance here allows). Set
``ISOMETRY_TEST_FULL_OPT=1`` to test with XLA's defaults. The flags are set
before jax starts its backend, and subprocesses started by tests inherit them.

A test marked ``default_emitters`` asserts what holds only with the fusion
emitters (a vmapped draw bitwise equal to one call per value; a subnormal grid
point of the free-probability solver reported, not solved): it runs in a child
process without the emitters' flag.
"""

import os
import subprocess
import sys
from pathlib import Path

_LEGACY_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
_CHILD = "ISOMETRY_TEST_DEFAULT_EMITTERS"  # set in the child of a default_emitters test

if not os.environ.get("ISOMETRY_TEST_FULL_OPT"):
    _FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    if not os.environ.get(_CHILD):
        _FAST_COMPILE += f" {_LEGACY_EMITTERS}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

import jax  # noqa: E402 (after the flags)
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)


@pytest.fixture
def key():
    return jax.random.key(0)


def pytest_collection_modifyitems(items):
    """Start the tests marked ``heavy`` (the longest of the default suite) first, so the
    two workers end together instead of one running a long test alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


_CHILD_RUNS: dict[str, tuple[int, str]] = {}  # test function -> its child's exit code, output


def pytest_pyfunc_call(pyfuncitem):
    """Run a ``default_emitters`` test in a child process with XLA's fusion emitters (all
    its parameter sets in one child, whose result the others reuse)."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    marked = pyfuncitem.get_closest_marker("default_emitters") is not None
    if not marked or _LEGACY_EMITTERS not in flags or os.environ.get(_CHILD):
        return None
    function = pyfuncitem.nodeid.partition("[")[0]
    if function not in _CHILD_RUNS:
        env = {**os.environ, _CHILD: "1"}
        env["XLA_FLAGS"] = " ".join(f for f in flags if f != _LEGACY_EMITTERS)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
               "-m", "default_emitters", function]  # fmt: skip
        root = Path(__file__).resolve().parent.parent
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        _CHILD_RUNS[function] = done.returncode, done.stdout[-4000:]
    code, out = _CHILD_RUNS[function]
    assert code == 0, f"{function} in a child process with XLA's fusion emitters:\n{out}"
    return True
