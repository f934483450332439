"""Tests of isometry.data: embedded digits, IDX/CIFAR loaders on small files, batching."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest

from isometry import data


def _write_idx(path, array, gz=False):
    a = np.ascontiguousarray(array, np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
    raw = header + a.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def _fake_mnist(root, gz, n_train=12, n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        _write_idx(root / name, a, gz=gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_roundtrip(tmp_path, gz):
    arrays = _fake_mnist(tmp_path / "mnist", gz)
    ds = data.load_mnist(tmp_path, standardized=False)
    assert ds.x_train.shape == (12, 784) and ds.x_test.shape == (5, 784)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    expect = arrays["train-images-idx3-ubyte"].reshape(12, -1) / 255.0
    np.testing.assert_allclose(ds.x_train, expect, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    img = data.load_mnist(tmp_path, images=True)
    assert img.x_train.shape == (12, 28, 28, 1)
    assert abs(img.x_train.mean()) < 1e-5 and abs(img.x_train.std() - 1) < 1e-4


def test_fashion_mnist_from_env_variable(tmp_path, monkeypatch):
    arrays = _fake_mnist(tmp_path / "fashion_mnist", gz=True, seed=3)
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    ds = data.load("fashion_mnist", standardized=False)
    assert ds.name == "fashion_mnist"
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])


def test_read_idx_other_types_and_errors(tmp_path):
    a = np.arange(6, dtype=">i4").reshape(2, 3)
    p = tmp_path / "x.idx"
    p.write_bytes(struct.pack(">BBBB", 0, 0, 0x0C, 2) + struct.pack(">2I", 2, 3) + a.tobytes())
    np.testing.assert_array_equal(data.read_idx(p), np.arange(6).reshape(2, 3))
    p.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(p)
    p.write_bytes(struct.pack(">BBBB", 0, 0, 0x08, 1) + struct.pack(">I", 10) + b"\x00")
    with pytest.raises(ValueError, match="header says"):
        data.read_idx(p)


def test_missing_files_name_what_is_expected(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.*ISOMETRY_DATA"):
        data.load_mnist()
    with pytest.raises(FileNotFoundError, match=r"data_batch_1.*test_batch.*tried"):
        data.load_cifar10(tmp_path)


def test_cifar10_pickles(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    batches = {}
    for name in data.CIFAR10_FILES:
        x = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, 4)]
        batches[name] = (x, y)
        with open(d / name, "wb") as f:
            pickle.dump({b"data": x, b"labels": y, b"batch_label": b"x"}, f)
    ds = data.load_cifar10(tmp_path, standardized=False)
    assert ds.x_train.shape == (20, 32, 32, 3) and ds.x_test.shape == (4, 32, 32, 3)
    x0 = batches["data_batch_1"][0][0]
    # channel planes: red = first 1024 bytes, row-major 32x32
    np.testing.assert_allclose(ds.x_train[0, :, :, 0], x0[:1024].reshape(32, 32) / 255.0)
    np.testing.assert_allclose(ds.x_train[0, 5, 7, 2], x0[2048 + 5 * 32 + 7] / 255.0)
    np.testing.assert_array_equal(ds.y_test, batches["test_batch"][1])
    flat = data.load_cifar10(tmp_path, flat=True)
    assert flat.x_train.shape == (20, 3072)
    np.testing.assert_allclose(flat.x_train.reshape(20, 32, 32, 3).mean((0, 1, 2)), 0, atol=1e-5)


def test_digits_embedded_split():
    ds = data.load_digits()
    assert len(ds.x_train) + len(ds.x_test) == 1797 and ds.x_train.shape[1:] == (64,)
    assert 355 <= len(ds.x_test) <= 365
    assert ds.num_classes == 10 and set(np.unique(ds.y_test)) == set(range(10))
    # stratified: 20% of each class held out (to rounding)
    counts = np.bincount(ds.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    informative = ds.x_train.std(0) > 0
    np.testing.assert_allclose(ds.x_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(0)[informative], 1, rtol=1e-4)
    again = data.load_digits()
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    other = data.load_digits(seed=1)
    assert not np.array_equal(other.y_train, ds.y_train)
    raw = data.load_digits(standardized=False, images=True)
    assert raw.x_train.shape == (len(ds.x_train), 8, 8, 1) and raw.x_train.max() == 16


def test_digits_file_is_scikit_learns_dataset():
    """The digits read from the package file without importing scikit-learn are its
    ``load_digits``, value for value."""
    from sklearn.datasets import load_digits

    raw = data.load_digits(standardized=False, test_fraction=0.5)
    x = np.concatenate([raw.x_train, raw.x_test])
    y = np.concatenate([raw.y_train, raw.y_test])
    ref = load_digits()
    order = np.lexsort(x.T)
    ref_order = np.lexsort(ref.data.T)
    np.testing.assert_array_equal(x[order], ref.data[ref_order].astype(np.float32))
    np.testing.assert_array_equal(y[order], ref.target[ref_order])


def test_batches_are_deterministic_and_cover_each_epoch():
    n, b = 50, 8
    steps = [data.batch_indices(3, t, n, b) for t in range(12)]
    again = [data.batch_indices(3, t, n, b) for t in range(12)]
    assert all(np.array_equal(a, c) for a, c in zip(steps, again, strict=True))
    epoch0 = np.concatenate(steps[:6])  # 50 // 8 = 6 batches per epoch
    assert len(np.unique(epoch0)) == 48
    assert not np.array_equal(steps[0], steps[6])  # a new permutation each epoch
    assert not np.array_equal(steps[0], data.batch_indices(4, 0, n, b))
    with pytest.raises(ValueError, match="batch_size"):
        data.batch_indices(0, 0, 4, 8)


def test_teacher_student_is_seeded():
    a = data.teacher_student(1, n_train=64, n_test=16, in_dim=8, depth=2, width=16)
    b = data.teacher_student(1, n_train=64, n_test=16, in_dim=8, depth=2, width=16)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert a.x_train.shape == (64, 8) and a.y_train.dtype == np.int32
    assert len(np.unique(a.y_train)) > 2  # the teacher is not constant
    r = data.teacher_student(
        1, n_train=64, n_test=16, in_dim=8, depth=2, width=16, num_classes=None, out_dim=10
    )
    assert r.y_train.shape == (64, 10) and r.num_classes is None and r.out_dim == 10
    np.testing.assert_array_equal(np.argmax(r.y_train, -1), a.y_train)  # same teacher


def test_standardize_uses_train_statistics():
    tr = np.array([[0.0, 1.0], [2.0, 1.0]])
    te = np.array([[4.0, 3.0]])
    a, b = data.standardize(tr, te)
    np.testing.assert_allclose(a, [[-1, 0], [1, 0]])
    np.testing.assert_allclose(b, [[3, 2]])  # constant feature only centred
    with pytest.raises(ValueError, match="dataset"):
        data.load("imagenet")
