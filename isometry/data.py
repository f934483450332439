"""Datasets: an embedded real dataset, local-file loaders, and a teacher-student task.

No download ever happens here. The default dataset is embedded so that a
training run works offline:

* :func:`load_digits`: the UCI optical handwritten digits (1,797 grey-level
  8x8 images of the digits 0-9 written by 43 people; Alpaydin & Kaynak 1998),
  read from the copy shipped inside the scikit-learn package
  (``sklearn.datasets.load_digits``, no network access).

Loaders for standard files already on disk (``root`` argument, or the
directory in the environment variable ``ISOMETRY_DATA``; each loader also
looks in a conventional sub-directory of it):

* :func:`load_mnist` / :func:`load_fashion_mnist`: the four IDX files
  ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each optionally
  ``.gz``; LeCun et al. 1998; Xiao, Rasul & Vollgraf 2017). :func:`read_idx`
  parses one IDX file.
* :func:`load_cifar10`: the python pickle batches ``data_batch_1`` ..
  ``data_batch_5`` and ``test_batch`` (Krizhevsky 2009).

A controlled synthetic task: :func:`teacher_student` labels Gaussian inputs
with a random deep teacher network (:class:`isometry.networks.MLP`), either
by its arg-max class (classification) or by its outputs (regression).

Utilities: :func:`standardize` (statistics of the training split only),
:func:`epoch_permutation` and :func:`batch_indices` (deterministic shuffling
from a seed: the batch at step ``t`` depends only on ``(seed, t)``, which is
what makes an interrupted training run resume exactly).

Every loader returns a :class:`Dataset` of numpy arrays: ``x_train (n, *shape)``
float32, ``y_train (n,)`` int32 class labels (or ``(n, k)`` float32 targets
for regression), and the same for the held-out ``x_test``/``y_test``.

Example:
    >>> from isometry import data
    >>> ds = data.load("digits")
    >>> ds.x_train.shape[1:], ds.num_classes
    ((64,), 10)
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from isometry import validate

__all__ = [
    "DATASETS",
    "DATA_ENV",
    "Dataset",
    "associative_recall",
    "batch_indices",
    "epoch_permutation",
    "load",
    "load_cifar10",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "patch_sequence",
    "read_idx",
    "standardize",
    "teacher_student",
]

DATA_ENV = "ISOMETRY_DATA"
DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "teacher_student")

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split of numpy arrays.

    Attributes:
        name: the dataset's name.
        x_train: ``(n_train, *input_shape)`` float32.
        y_train: ``(n_train,)`` int32 labels in ``[0, num_classes)``, or
            ``(n_train, k)`` float32 regression targets.
        x_test, y_test: the held-out split, same layout.
        num_classes: number of classes; ``None`` for a regression task.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int | None

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"x_{split} and y_{split} must have the same length, "
                    f"got {x.shape[0]} and {y.shape[0]}"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"x_train and x_test must share the input shape, "
                f"got {self.x_train.shape[1:]} and {self.x_test.shape[1:]}"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def in_dim(self) -> int:
        """Number of input features, ``prod(input_shape)``."""
        return int(np.prod(self.input_shape))

    @property
    def out_dim(self) -> int:
        """Outputs a model needs: ``num_classes``, or the regression target size."""
        return self.num_classes if self.num_classes is not None else int(self.y_train.shape[1])

    def flatten(self) -> Dataset:
        """The same data with inputs flattened to ``(n, in_dim)`` (for an MLP)."""
        return dataclasses.replace(
            self,
            x_train=self.x_train.reshape(len(self.x_train), -1),
            x_test=self.x_test.reshape(len(self.x_test), -1),
        )

    def standardize(self, *, per_feature: bool = True, eps: float = 1e-6) -> Dataset:
        """Inputs standardized with the training split's statistics (see :func:`standardize`)."""
        xtr, xte = standardize(self.x_train, self.x_test, per_feature=per_feature, eps=eps)
        return dataclasses.replace(self, x_train=xtr, x_test=xte)

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> Dataset:
        """The first ``n_train`` training and ``n_test`` test examples."""
        return dataclasses.replace(
            self,
            x_train=self.x_train[:n_train],
            y_train=self.y_train[:n_train],
            x_test=self.x_test[:n_test],
            y_test=self.y_test[:n_test],
        )


# --------------------------------------------------------------------------- #
# Shuffling, batching, standardization.
# --------------------------------------------------------------------------- #


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """A permutation of ``range(n)`` determined by ``(seed, epoch)`` alone (PCG64)."""
    validate.positive_int("n", n)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n).astype(np.int32)


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> np.ndarray:
    """Indices ``(batch_size,)`` of the training batch at ``step`` (0-based).

    Each epoch is a fresh permutation (:func:`epoch_permutation`) cut into
    ``n // batch_size`` batches (the remainder is dropped), so the batch at
    step ``t`` is a function of ``(seed, t)`` only.
    """
    validate.positive_int("batch_size", batch_size)
    if batch_size > n:
        raise ValueError(f"batch_size must be <= the number of examples {n}, got {batch_size}")
    per_epoch = n // batch_size
    epoch, pos = divmod(int(step), per_epoch)
    perm = epoch_permutation(seed, epoch, n)
    return perm[pos * batch_size : (pos + 1) * batch_size]


def standardize(
    train: np.ndarray, *others: np.ndarray, per_feature: bool = True, eps: float = 1e-6
) -> tuple[np.ndarray, ...]:
    """``(x - mean) / std`` with the mean and std of ``train``, applied to all arrays.

    ``per_feature=True`` uses one mean/std per input entry (axis 0 reduced);
    features with ``std < eps`` (e.g. always-blank pixels) are only centred.
    ``per_feature=False`` uses one scalar mean/std. Returns float32 arrays,
    ``train`` first.
    """
    x = np.asarray(train, dtype=np.float64)
    axis = 0 if per_feature else None
    mean = x.mean(axis=axis)
    std = x.std(axis=axis)
    std = np.where(std < eps, 1.0, std)
    return tuple(
        ((np.asarray(a, np.float64) - mean) / std).astype(np.float32) for a in (x, *others)
    )


# --------------------------------------------------------------------------- #
# Embedded: scikit-learn's handwritten digits.
# --------------------------------------------------------------------------- #


def load_digits(
    *, test_fraction: float = 0.2, seed: int = 0, standardized: bool = True, images: bool = False
) -> Dataset:
    """The 8x8 handwritten digits shipped with scikit-learn (1,797 examples, 10 classes).

    Read from the file inside the scikit-learn package (no download). The
    split is a seeded, class-stratified permutation: ``test_fraction`` of
    each class is held out (359 test examples at the default 0.2).

    Args:
        test_fraction: held-out fraction in ``(0, 1)``.
        seed: seed of the split.
        standardized: standardize inputs per pixel with training statistics.
        images: inputs ``(n, 8, 8, 1)`` instead of ``(n, 64)``.

    Returns:
        A :class:`Dataset` named ``"digits"``; pixel values are 0..16 before
        standardization.

    Reference:
        Alpaydin & Kaynak 1998, "Optical recognition of handwritten digits",
        UCI Machine Learning Repository.
    """
    validate.real_array("test_fraction", test_fraction, minimum=0.0, strict=True, maximum=1.0)
    if test_fraction >= 1.0:
        raise ValueError(f"test_fraction must be < 1, got {test_fraction}")
    x, y = _digits_arrays()
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = round(test_fraction * len(idx))
        test[rng.permutation(idx)[:k]] = True
    tr, te = rng.permutation(np.flatnonzero(~test)), rng.permutation(np.flatnonzero(test))
    xtr, xte = x[tr], x[te]
    if standardized:
        xtr, xte = standardize(xtr, xte)
    if images:
        xtr, xte = xtr.reshape(-1, 8, 8, 1), xte.reshape(-1, 8, 8, 1)
    return Dataset("digits", xtr, y[tr], xte, y[te], 10)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(x (1797, 64) float32, y (1797,) int32)``: scikit-learn's ``digits.csv.gz`` read
    where the package is installed, without importing scikit-learn (that import alone costs
    about a second of CPU); through ``sklearn.datasets.load_digits`` where the file is not
    found on ``sys.path``."""
    for base in sys.path:
        path = Path(base or ".") / "sklearn" / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt") as f:
                table = np.loadtxt(f, delimiter=",")
            return table[:, :-1].astype(np.float32), table[:, -1].astype(np.int32)
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError(
            "the digits dataset needs scikit-learn (pip install scikit-learn)"
        ) from err
    d = _sk_digits()
    return np.asarray(d.data, np.float32), np.asarray(d.target, np.int32)


# --------------------------------------------------------------------------- #
# Local files: IDX (MNIST, Fashion-MNIST) and CIFAR-10 pickles.
# --------------------------------------------------------------------------- #

_IDX_TYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped when the name ends in ``.gz``).

    Format (LeCun et al. 1998): two zero bytes, a type byte (``0x08`` uint8,
    ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E``
    float64), the number of dimensions ``d``, then ``d`` big-endian uint32
    sizes and the data in C order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile) as err:  # a truncated or damaged .gz
        raise ValueError(f"{path} is not a readable IDX file ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4]!r})")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: the header of {ndim} dimensions is cut short")
    shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - offset != count * dtype.itemsize:
        raise ValueError(
            f"{path}: header says shape {shape} ({count * dtype.itemsize} bytes of data), "
            f"file has {len(raw) - offset}"
        )
    return (
        np.frombuffer(raw, dtype, count=count, offset=offset)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def _candidates(root, subdirs: Sequence[str]) -> list[Path]:
    if root is None:
        env = os.environ.get(DATA_ENV)
        if not env:
            return []
        root = env
    root = Path(root).expanduser()
    return [root / s for s in subdirs] + [root]


def _find_dir(what: str, root, subdirs: Sequence[str], files: Sequence[str], gz: bool) -> Path:
    """The first candidate directory holding all ``files`` (each optionally ``.gz``)."""

    def has(d: Path, f: str) -> bool:
        return (d / f).is_file() or (gz and (d / f"{f}.gz").is_file())

    tried = _candidates(root, subdirs)
    for d in tried:
        if all(has(d, f) for f in files):
            return d
    where = (
        "directories tried: " + ", ".join(str(d) for d in tried)
        if tried
        else f"no directory given: pass root=... or set the environment variable {DATA_ENV}"
    )
    suffix = " (each optionally gzipped, .gz)" if gz else ""
    raise FileNotFoundError(
        f"{what} files not found; expected {', '.join(files)}{suffix} "
        f"in the data directory or its sub-directory {subdirs[0]!r}; {where}. "
        "Nothing is downloaded: copy the files there."
    )


def _idx_file(d: Path, name: str) -> Path:
    return d / name if (d / name).is_file() else d / f"{name}.gz"


def _load_idx_set(what: str, name: str, root, subdirs, standardized: bool, flat: bool) -> Dataset:
    d = _find_dir(what, root, subdirs, MNIST_FILES, gz=True)
    xtr, ytr, xte, yte = (read_idx(_idx_file(d, f)) for f in MNIST_FILES)
    for label, x, y in (("train", xtr, ytr), ("t10k", xte, yte)):
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(
                f"{what} {label} files: expected images (n, rows, cols) and labels (n,), "
                f"got {x.shape} and {y.shape}"
            )
    xtr, xte = xtr.astype(np.float32) / 255.0, xte.astype(np.float32) / 255.0
    if standardized:
        xtr, xte = standardize(xtr, xte, per_feature=False)
    shape = (-1, xtr.shape[1] * xtr.shape[2]) if flat else (-1, *xtr.shape[1:], 1)
    return Dataset(
        name, xtr.reshape(shape), ytr.astype(np.int32), xte.reshape(shape), yte.astype(np.int32), 10
    )


def load_mnist(
    root: str | os.PathLike | None = None, *, standardized: bool = True, images: bool = False
) -> Dataset:
    """MNIST from its four IDX files in ``root`` (or ``root/mnist``; default ``$ISOMETRY_DATA``).

    Inputs are scaled to ``[0, 1]`` then (``standardized``) shifted and
    scaled by the training set's scalar mean and std; shape ``(n, 784)``, or
    ``(n, 28, 28, 1)`` with ``images=True``. Raises ``FileNotFoundError``
    naming the expected files when they are missing.
    """
    return _load_idx_set("MNIST", "mnist", root, ("mnist", "MNIST"), standardized, not images)


def load_fashion_mnist(
    root: str | os.PathLike | None = None, *, standardized: bool = True, images: bool = False
) -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017): same files and layout as :func:`load_mnist`.

    Looked for in ``root/fashion_mnist`` (or ``root/fashion-mnist``, ``root``).
    """
    return _load_idx_set(
        "Fashion-MNIST",
        "fashion_mnist",
        root,
        ("fashion_mnist", "fashion-mnist", "FashionMNIST"),
        standardized,
        not images,
    )


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def load_cifar10(
    root: str | os.PathLike | None = None, *, standardized: bool = True, flat: bool = False
) -> Dataset:
    """CIFAR-10 from the python pickle batches (in ``root/cifar-10-batches-py`` or ``root``).

    Each batch is a pickled dict with ``b"data"`` ``(n, 3072)`` uint8 (the
    red, green, blue 32x32 planes of each image) and ``b"labels"``. Returns
    images ``(n, 32, 32, 3)`` (``flat=True``: ``(n, 3072)``) scaled to
    ``[0, 1]`` and, when ``standardized``, normalized per channel with the
    training statistics.

    Reference: Krizhevsky 2009, "Learning multiple layers of features from tiny images".
    """
    d = _find_dir("CIFAR-10", root, ("cifar-10-batches-py", "cifar10"), CIFAR10_FILES, gz=False)

    def load(names):
        xs, ys = [], []
        for n in names:
            b = _unpickle(d / n)
            if "data" not in b or "labels" not in b:
                raise ValueError(f"{d / n}: expected a dict with 'data' and 'labels'")
            xs.append(np.asarray(b["data"], np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(b["labels"], np.int32))
        x = np.concatenate(xs).transpose(0, 2, 3, 1).astype(np.float32) / 255.0
        return x, np.concatenate(ys)

    xtr, ytr = load(CIFAR10_FILES[:5])
    xte, yte = load(CIFAR10_FILES[5:])
    if standardized:
        mean = xtr.mean(axis=(0, 1, 2))
        std = xtr.std(axis=(0, 1, 2))
        std = np.where(std < 1e-6, 1.0, std)
        xtr, xte = ((xtr - mean) / std).astype(np.float32), ((xte - mean) / std).astype(np.float32)
    if flat:
        xtr, xte = xtr.reshape(len(xtr), -1), xte.reshape(len(xte), -1)
    return Dataset("cifar10", xtr, ytr, xte, yte, 10)


# --------------------------------------------------------------------------- #
# Teacher-student.
# --------------------------------------------------------------------------- #


def teacher_student(
    seed: int = 0,
    *,
    n_train: int = 4096,
    n_test: int = 1024,
    in_dim: int = 64,
    num_classes: int | None = 10,
    out_dim: int = 1,
    depth: int = 4,
    width: int = 128,
    activation: str = "tanh",
    init: str = "orthogonal",
    q_star: float | None = 0.5,
    noise: float = 0.0,
) -> Dataset:
    """A random deep teacher network labels standard Gaussian inputs ``u ~ N(0, I_in_dim)``.

    The teacher is an :class:`isometry.networks.MLP` with ``depth`` hidden
    layers of width ``width`` (critical initialization at ``q_star`` by
    default, so its function is neither constant nor chaotic), readout to
    ``num_classes`` outputs ``f(u)``. Classification (``num_classes`` set):
    ``y = argmax f(u)``. Regression (``num_classes=None``): ``y = f(u) + noise
    * N(0, 1)`` with ``out_dim`` outputs, float32 ``(n, out_dim)``.

    Everything is determined by ``seed`` (teacher weights, inputs, noise).
    """
    import jax
    from flax import nnx

    from isometry import networks

    for name, v in (("n_train", n_train), ("n_test", n_test), ("in_dim", in_dim)):
        validate.positive_int(name, v)
    validate.real_array("noise", noise, minimum=0.0)
    outputs = (
        out_dim if num_classes is None else validate.positive_int("num_classes", num_classes, 2)
    )
    cfg = networks.MLPConfig(
        depth=depth,
        width=width,
        in_dim=in_dim,
        out_dim=outputs,
        activation=activation,
        init=init,
        q_star=q_star,
    )
    teacher = networks.MLP(cfg, rngs=nnx.Rngs(seed))
    k_u, k_noise = jax.random.split(jax.random.fold_in(jax.random.key(seed), 1))
    u = np.asarray(jax.random.normal(k_u, (n_train + n_test, in_dim)), np.float32)
    f = np.asarray(jax.jit(lambda u: teacher(u))(u))
    if num_classes is None:
        y = f + noise * np.asarray(jax.random.normal(k_noise, f.shape), np.float32)
        y = y.astype(np.float32)
    else:
        y = np.argmax(f, axis=-1).astype(np.int32)
    return Dataset(
        "teacher_student", u[:n_train], y[:n_train], u[n_train:], y[n_train:], num_classes
    )


# --------------------------------------------------------------------------- #
# Sequence tasks (transformers).
# --------------------------------------------------------------------------- #


def associative_recall(
    seed: int = 0, *, n_train: int = 4096, n_test: int = 1024, pairs: int = 4, keys: int = 8,
    values: int = 8,
) -> Dataset:  # fmt: skip
    """Associative recall: ``k_1 v_1 ... k_P v_P q`` -> the value paired with the query key.

    Each sequence holds ``P = pairs`` distinct keys (symbols ``0..keys-1``),
    each followed by its value (symbols ``keys..keys+values-1``, drawn with
    replacement), then a query ``q``, one of the sequence's keys, drawn
    uniformly; the label is the query's value minus ``keys`` (a class in
    ``0..values-1``). Inputs are int32 token ids ``(n, 2 P + 1)`` for a
    transformer with ``vocab_size = keys + values``; the task needs attention
    from the last token to the matching key (Ba et al. 2016; Graves et al.
    2014). Everything is determined by ``seed``; chance accuracy is ``1/values``.
    """
    validate.positive_int("n_train", n_train)
    validate.positive_int("n_test", n_test)
    validate.positive_int("pairs", pairs)
    validate.positive_int("values", values, 2)
    validate.positive_int("keys", keys)
    if keys < pairs:
        raise ValueError(
            f"keys must be >= pairs (distinct keys per sequence), got {keys} < {pairs}"
        )
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    k = np.argsort(rng.random((n, keys)), axis=1)[:, :pairs]  # distinct keys per row
    v = rng.integers(0, values, (n, pairs))
    which = rng.integers(0, pairs, n)
    x = np.empty((n, 2 * pairs + 1), np.int32)
    x[:, 0:-1:2], x[:, 1:-1:2], x[:, -1] = k, keys + v, k[np.arange(n), which]
    y = v[np.arange(n), which].astype(np.int32)
    return Dataset("associative_recall", x[:n_train], y[:n_train], x[n_train:], y[n_train:], values)


def patch_sequence(x: np.ndarray, patch: int) -> np.ndarray:
    """Images ``(n, H, W)`` as sequences of ``patch x patch`` patches: ``(n, H W / patch^2,
    patch^2)`` in row-major patch order (the digits read as a sequence of tokens; Dosovitskiy
    et al. 2021)."""
    x = np.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"x must have shape (n, H, W), got {x.shape}")
    patch = validate.positive_int("patch", patch)
    n, H, W = x.shape
    if H % patch or W % patch:
        raise ValueError(f"patch must divide the image size {H} x {W}, got {patch}")
    x = x.reshape(n, H // patch, patch, W // patch, patch).transpose(0, 1, 3, 2, 4)
    return x.reshape(n, (H // patch) * (W // patch), patch * patch)


# --------------------------------------------------------------------------- #
# By name.
# --------------------------------------------------------------------------- #


def load(name: str, *, root: str | os.PathLike | None = None, seed: int = 0, **kwargs) -> Dataset:
    """A dataset by name (one of :data:`DATASETS`), inputs flattened for an MLP.

    ``root`` is the local directory of MNIST/Fashion-MNIST/CIFAR-10 (default
    ``$ISOMETRY_DATA``); ``seed`` fixes the digits split and the teacher;
    other keyword arguments go to the loader.
    """
    validate.choice("dataset", name, DATASETS)
    if name == "digits":
        return load_digits(seed=seed, **kwargs)
    if name == "mnist":
        return load_mnist(root, **kwargs)
    if name == "fashion_mnist":
        return load_fashion_mnist(root, **kwargs)
    if name == "cifar10":
        return load_cifar10(root, flat=kwargs.pop("flat", True), **kwargs)
    return teacher_student(seed, **kwargs)
