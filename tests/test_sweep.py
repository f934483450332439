"""Tests of isometry.sweep: grids, store (resume, refusal), overrides, distributed runs.

The multi-device and multi-process tests run tiny sweeps in subprocesses (the
device count must be set before JAX starts; two processes talk over a
loopback coordinator with gloo) and compare the aggregate csv files byte for
byte.
"""

from __future__ import annotations

import dataclasses
import io
import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isometry import sweep


@dataclasses.dataclass(frozen=True)
class Cfg:
    depth: int = 3
    rate: float = 0.5
    names: tuple[str, ...] = ("a", "b")
    width: int | None = None
    flag: bool = False


# ----------------------------------------------------------------------------- grids


def test_grid_product_zip_and_order():
    g = sweep.product(a=[1, 2], b=["x", "y", "z"])
    assert len(g) == 6 and g.names == ("a", "b")
    assert g.points()[:2] == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}]
    z = sweep.zipped(s=[0.1, 0.2], t=[1, 2])
    assert [p for p in z] == [{"s": 0.1, "t": 1}, {"s": 0.2, "t": 2}]
    gz = g * z
    assert len(gz) == 12 and gz.points()[1] == {"a": 1, "b": "x", "s": 0.2, "t": 2}
    with pytest.raises(ValueError, match="differ in length"):
        sweep.zipped(s=[1, 2], t=[1])
    with pytest.raises(ValueError, match="appears twice"):
        sweep.product(a=[1]) * sweep.product(a=[2])
    with pytest.raises(ValueError, match="no values"):
        sweep.product(a=[])


def test_grid_shape_axes_and_values():
    g = sweep.product(a=[1, 2]) * sweep.zipped(s=[0.1, 0.2, 0.3], t=["x", "y", "z"])
    assert g.shape == (2, 3) and len(g) == 6
    assert (g.axis("a"), g.axis("s"), g.axis("t")) == (0, 1, 1)
    assert g.values("t") == ("x", "y", "z") and g.values("a") == (1, 2)
    # the points in order fill the shape in C order
    pts = np.asarray([p["s"] for p in g.points()]).reshape(g.shape)
    np.testing.assert_array_equal(pts, [[0.1, 0.2, 0.3]] * 2)
    with pytest.raises(KeyError, match="no grid parameter 'b'; parameters: a, s, t"):
        g.axis("b")


def test_typed_column_reads_record_values_without_text():
    """Values as point records hold them (JSON: NaN as None, infinities as text)."""
    cases = [
        ([True, False], np.array([True, False]), bool),
        ([True, None], np.array([1.0, np.nan]), np.float64),
        ([3, 4], np.array([3, 4]), np.int64),
        ([3, None], np.array([3.0, np.nan]), np.float64),
        ([0.5, "inf", "-inf", None, 2], np.array([0.5, np.inf, -np.inf, np.nan, 2.0]), np.float64),
        (["a", "bc"], np.array(["a", "bc"]), np.str_),
    ]
    for values, want, dtype in cases:
        got = sweep.typed_column(values)
        assert got.dtype.type is np.dtype(dtype).type, (values, got.dtype)
        np.testing.assert_array_equal(got, want)
    mixed = sweep.typed_column([[1, 2], "x", None])
    assert mixed.dtype == object and mixed[0] == [1, 2] and mixed[2] is None
    assert sweep.typed_column([]).shape == (0,)


def test_point_id_stable_and_numpy_agnostic():
    p = {"a": 1, "b": 0.5}
    assert sweep.point_id(p) == sweep.point_id({"b": 0.5, "a": 1})
    assert sweep.point_id(p) == sweep.point_id({"a": np.int64(1), "b": np.float64(0.5)})
    assert sweep.point_id(p) != sweep.point_id({"a": 2, "b": 0.5})
    assert sweep.fingerprint("s", Cfg()) != sweep.fingerprint("s", Cfg(depth=4))
    assert sweep.fingerprint("s", Cfg()) != sweep.fingerprint("t", Cfg())


# ------------------------------------------------------------------------- overrides


def test_overrides_typed():
    c = sweep.apply_overrides(
        Cfg(), ["depth=7", "rate=1e-2", "names=u, v,w", "width=none", "flag=yes"]
    )
    assert c == Cfg(depth=7, rate=0.01, names=("u", "v", "w"), width=None, flag=True)
    assert sweep.apply_overrides(Cfg(), ["width=12"]).width == 12


@pytest.mark.parametrize(
    ("item", "err", "match"),
    [
        ("dpeth=3", ValueError, "unknown parameter 'dpeth'.*did you mean 'depth'"),
        ("depth", ValueError, "expected key=value"),
        ("depth=2.5", TypeError, "depth: expected an integer, got '2.5'"),
        ("rate=fast", TypeError, "rate: expected a number"),
        ("flag=maybe", TypeError, "flag: expected true or false"),
        ("width=wide", TypeError, "width: cannot read 'wide'"),
    ],
)
def test_overrides_bad_input(item, err, match):
    with pytest.raises(err, match=match):
        sweep.apply_overrides(Cfg(), [item])


# ----------------------------------------------------------------------------- store


def _square_sweep(store, calls, progress=False, **kw):
    def fn(static):
        def g(x):
            calls.append(1)  # counts traces, i.e. compiled chunks
            return {"y": x**2 + static["c"]}

        return g

    grid = sweep.product(c=[0.0, 10.0]) * sweep.product(x=[1.0, 2.0, 3.0])
    return sweep.run_vectorized(
        store, grid, fn, lambda p, o: {"y": float(o["y"])}, static=("c",), progress=progress, **kw
    )


def test_store_resume_and_aggregate(tmp_path):
    store = sweep.Store(tmp_path / "s", "square", Cfg())
    calls = []
    path = _square_sweep(store, calls, per_device=2)
    t = sweep.load_table(path)
    np.testing.assert_array_equal(t["y"], [1, 4, 9, 11, 14, 19])
    np.testing.assert_array_equal(t["c"], [0, 0, 0, 10, 10, 10])
    assert len(list((tmp_path / "s" / "points").glob("*.json"))) == 6
    assert calls  # something ran
    # resume: delete two points; only those are recomputed
    (store.path({"c": 10.0, "x": 2.0})).unlink()
    (store.path({"c": 0.0, "x": 1.0})).unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s" / "points").glob("*.json")}
    calls.clear()
    store2 = sweep.Store(tmp_path / "s", "square", Cfg())
    assert len(store2.pending(sweep.product(c=[0.0, 10.0], x=[1.0, 2.0, 3.0]).points())) == 2
    _square_sweep(store2, calls, per_device=2)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s" / "points").glob("*.json")}
    assert all(after[k] == v for k, v in before.items())  # finished points untouched
    assert len(after) == 6
    assert (tmp_path / "s" / "results.csv").read_text() == path.read_text()
    np.testing.assert_array_equal(sweep.load_table(tmp_path / "s")["y"], t["y"])
    # nothing left: a third run computes nothing
    calls.clear()
    _square_sweep(sweep.Store(tmp_path / "s", "square", Cfg()), calls)
    assert calls == []


def test_store_refuses_other_config_and_study(tmp_path):
    sweep.Store(tmp_path / "s", "square", Cfg())
    with pytest.raises(sweep.ConfigMismatchError, match=r"depth: 3 \(stored\) vs 4 \(now\)"):
        sweep.Store(tmp_path / "s", "square", Cfg(depth=4))
    with pytest.raises(sweep.ConfigMismatchError, match="study 'square', not 'cube'"):
        sweep.Store(tmp_path / "s", "cube", Cfg())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(sweep.ConfigMismatchError, match="not a sweep store"):
        sweep.Store(tmp_path / "other", "square", Cfg())
    assert isinstance(sweep.ConfigMismatchError("x"), ValueError)


def test_partitioned_rows_and_arrays(tmp_path):
    store = sweep.Store(tmp_path / "p", "runs", Cfg())
    grid = sweep.product(depth=[1, 2, 3])

    def fn(p):
        rows = [{"layer": l, "v": float(l * p["depth"])} for l in range(p["depth"])]
        return {"rows": rows, "arrays": {"w": np.arange(p["depth"])}}

    t = sweep.load_table(sweep.run_partitioned(store, grid, fn, progress=False))
    assert list(t["depth"]) == [1, 2, 2, 3, 3, 3]
    np.testing.assert_array_equal(store.arrays({"depth": 3})["w"], [0, 1, 2])


def test_typed_columns_equal_the_csv_columns(tmp_path):
    """The point records read typed hold the numbers the aggregate csv holds (a boolean
    stays a boolean instead of the text ``true``)."""
    store = sweep.Store(tmp_path / "t", "runs", Cfg())
    grid = sweep.product(k=[0, 1, 2])

    def fn(p):
        k = p["k"]
        return {"x": 0.1 * k, "n": k, "flag": k == 1, "stop": None if k else 3,
                "big": float("inf") if k == 2 else 1e300, "name": f"r{k}"}  # fmt: skip

    csv = sweep.load_table(sweep.run_partitioned(store, grid, fn, progress=False))
    rows = [{**p, **store.read(p)["rows"][0]} for p in grid.points()]
    for col in ("k", "x", "n", "stop", "big"):
        typed = sweep.typed_column([r[col] for r in rows])
        assert typed.dtype == csv[col].dtype
        np.testing.assert_array_equal(typed, csv[col])
    np.testing.assert_array_equal(sweep.typed_column([r["flag"] for r in rows]), [0, 1, 0])
    assert list(csv["flag"]) == ["false", "true", "false"]  # the csv's text
    assert list(sweep.typed_column([r["name"] for r in rows])) == list(csv["name"])


def test_progress_line():
    buf = io.StringIO()
    pr = sweep.Progress(10, 4, "demo", stream=buf, min_interval_s=0.0)
    pr.update(3)
    assert "[demo] 7/10 points (70%)" in buf.getvalue() and "ETA" in buf.getvalue()
    pr.update(5)
    assert buf.getvalue().rstrip().endswith("ETA 0 s")
    pr.note("stage two")
    assert buf.getvalue().rstrip().endswith("[demo] stage two")


def test_progress_rate_limited():
    buf = io.StringIO()
    pr = sweep.Progress(1000, label="demo", stream=buf, min_interval_s=60.0)
    for _ in range(999):
        pr.update()
    assert buf.getvalue().count("\n") == 1  # the start line; the next comes in a minute
    pr.update()
    assert buf.getvalue().count("\n") == 2 and "1000/1000" in buf.getvalue()


def test_vectorized_sweep_reports_groups_and_points_on_stderr(tmp_path, capsys):
    _square_sweep(sweep.Store(tmp_path / "s", "square", Cfg()), [], progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    assert "[square] 0/6 points" in err and "[square] 6/6 points (100%)" in err
    assert "[square] group 1/2 {'c': 0.0}: 3 points" in err and "group 2/2" in err


def test_map_sharded_matches_vmap():
    xs = np.linspace(0.0, 1.0, 7)
    ks = np.arange(7)

    def f(x, k):
        return {"a": jnp.sin(x) + jax.random.normal(jax.random.key(k), (3,)).sum()}

    got = np.concatenate(
        [o["a"] for _, o in sweep.map_sharded(f, {"x": xs, "k": ks}, per_device=3)]
    )
    want = jax.vmap(f)(jnp.asarray(xs), jnp.asarray(ks))["a"]
    # Same math; XLA may fuse the sharded and plain programs differently (a few ulp).
    np.testing.assert_allclose(got, want, rtol=8 * jnp.finfo(want.dtype).eps)
    with pytest.raises(ValueError, match="per_device"):
        next(sweep.map_sharded(f, {"x": xs, "k": ks}, per_device=0))
    with pytest.raises(ValueError, match="common leading length"):
        next(sweep.map_sharded(f, {"x": xs, "k": ks[:3]}))


# ------------------------------------------------------------------ distributed init


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"num_processes": 2, "process_id": 0}, "needs a coordinator"),
        ({"coordinator_address": "nohost", "num_processes": 2, "process_id": 0}, "host:port"),
        ({"coordinator_address": "127.0.0.1:1", "num_processes": 2, "process_id": 2}, r"\[0, 2\)"),
        ({"coordinator_address": "127.0.0.1:1"}, "num_processes must be"),
    ],
)
def test_initialize_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        sweep.initialize(**kw)


def test_initialize_single_process_is_noop(monkeypatch):
    for v in ("SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "ISOMETRY_COORDINATOR"):
        monkeypatch.delenv(v, raising=False)
    assert sweep.initialize() == (0, 1)
    assert sweep.initialize(num_processes=1) == (0, 1)


# ---------------------------------------------- 1 vs 4 devices, 1 vs 2 processes

WORKER = textwrap.dedent(
    """
    import dataclasses, sys
    pid, n, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    from isometry import sweep
    if n > 1:
        sweep.initialize(f"127.0.0.1:{port}", n, pid, timeout_s=60)
    import jax, jax.numpy as jnp

    @dataclasses.dataclass(frozen=True)
    class C:
        width: int = 6

    grid = sweep.product(act=["tanh", "relu"]) * sweep.product(s=list(range(5)), w=[0.5, 1.5])
    def fn(st):
        f = jnp.tanh if st["act"] == "tanh" else jax.nn.relu
        def g(s, w):
            x = jax.random.normal(jax.random.key(s), (6, 6))
            return {"m": jnp.mean(f(w * x @ x)), "v": jnp.max(jnp.abs(x @ x.T), axis=0)}
        return g
    rows = lambda p, o: {"m": float(o["m"]), "smax": float(o["v"][0])}
    sweep.run_vectorized(sweep.Store(out + "/vec", "toy", C()), grid, fn, rows,
                         static=["act"], per_device=2, progress=False)
    # LAPACK on several CPU devices of one process can deadlock: run on one device per process.
    def fn_lapack(st):
        def g(s):
            k = jax.random.key(s)
            w = jax.random.normal(k, (48, 48))
            v = jax.random.normal(jax.random.fold_in(k, 1), (48,))
            return jnp.linalg.svd(v[:, None] * w, compute_uv=False)
        return g
    rows = lambda p, o: {"smax": float(o[0]), "smin": float(o[-1])}
    sweep.run_vectorized(sweep.Store(out + "/lapack", "toysvd", C()), sweep.product(s=range(8)),
                         fn_lapack, rows, per_device=2, progress=False)
    def one(p):
        x = jax.random.normal(jax.random.key(p["d"]), (p["d"], p["d"]))
        return {"norm": float(jnp.linalg.norm(x @ x)), "d2": p["d"] ** 2}
    sweep.run_partitioned(sweep.Store(out + "/runs", "toyruns", C()),
                          sweep.product(d=[1, 2, 3, 4, 5]), one, progress=False)
    print("ok", pid, jax.device_count(), jax.process_count())
    """
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script, args, devices=None):
    """The worker on the CPU with ``devices`` host devices (one if ``None``); it keeps the
    suite's compile flags (tests/conftest.py) but not a device count set outside."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    return subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _finish(procs, timeout=150):
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outs


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    """The toy sweep run by: 1 process/1 device, 1 process/4 devices, 2 processes."""
    root = tmp_path_factory.mktemp("dist")
    script = root / "worker.py"
    script.write_text(WORKER)
    outs = _finish(
        [_launch(script, [0, 1, 0, root / "one"]), _launch(script, [0, 1, 0, root / "four"], 4)]
    )
    assert "ok 0 1 1" in outs[0] and "ok 0 4 1" in outs[1]
    assert "one CPU device per process" in outs[1] and "one CPU device" not in outs[0]
    port = _free_port()
    outs = _finish([_launch(script, [i, 2, port, root / "two"]) for i in (0, 1)])
    assert "ok 0 2 2" in outs[0] and "ok 1 2 2" in outs[1]
    return root


@pytest.mark.heavy
def test_four_devices_and_two_processes_same_results(distributed_runs):
    # One test, so the three subprocess runs happen once per suite, not once per worker.
    for store in ("vec", "runs", "lapack"):
        one = (distributed_runs / "one" / store / "results.csv").read_text()
        assert one.count("\n") > 5, store
        assert (distributed_runs / "four" / store / "results.csv").read_text() == one, store
        assert (distributed_runs / "two" / store / "results.csv").read_text() == one, store


@dataclasses.dataclass(frozen=True)
class _Inner:
    steps: int = 10
    learning_rate: float = 0.1


@dataclasses.dataclass(frozen=True)
class _Outer:
    depth: int = 2
    train: _Inner = _Inner()


def test_dotted_overrides_reach_nested_configs():
    cfg = sweep.apply_overrides(_Outer(), ["depth=3", "train.steps=7", "train.learning_rate=0.5"])
    assert cfg == _Outer(3, _Inner(7, 0.5))
    with pytest.raises(ValueError, match=r"unknown parameter 'stps' for train; did you mean"):
        sweep.apply_overrides(_Outer(), ["train.stps=1"])
    with pytest.raises(ValueError, match="depth has no fields"):
        sweep.apply_overrides(_Outer(), ["depth.x=1"])
    with pytest.raises(TypeError, match=r"train\.steps: expected an integer"):
        sweep.apply_overrides(_Outer(), ["train.steps=a"])
