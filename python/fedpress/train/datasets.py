"""Small image-classification data sets as numpy arrays.

``load_digits`` uses scikit-learn's bundled 8x8 digits (no download);
``load_mnist_idx`` reads MNIST-style IDX files (gzip-compressed or not);
``load_task`` picks one by name. Every split is stratified and seeded, so the
same call gives the same arrays.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ._deps import require_sklearn_datasets

__all__ = ["Dataset", "TASKS", "load_digits", "load_mnist_idx", "load_task", "default_mnist_dir", "stratified_split"]

TASKS = ("digits", "mnist")

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
MNIST_SIDE = 28
MNIST_CLASSES = 10


@dataclass(eq=False)
class Dataset:
    """Images ``x`` float32 (N, C, H, W) in [0, 1] and labels ``y`` int64 (N,)."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        self.x = np.ascontiguousarray(self.x, dtype=np.float32)
        self.y = np.ascontiguousarray(self.y, dtype=np.int64)
        if self.x.ndim != 4:
            raise ValueError(f"Dataset.x must have shape (N, C, H, W), got {self.x.shape}")
        if self.y.shape != (self.x.shape[0],):
            raise ValueError(f"Dataset.y must have shape ({self.x.shape[0]},), got {self.y.shape}")
        self.num_classes = int(self.num_classes)
        if self.y.size and (self.y.min() < 0 or self.y.max() >= self.num_classes):
            raise ValueError(f"Dataset labels must lie in 0..{self.num_classes - 1}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, n={len(self)}, shape={tuple(self.x.shape[1:])}, "
            f"num_classes={self.num_classes})"
        )

    def subset(self, indices: np.ndarray) -> Dataset:
        """The examples at ``indices`` (copies), same name and classes."""
        idx = np.asarray(indices, dtype=np.int64)
        return Dataset(self.x[idx], self.y[idx], self.num_classes, self.name)

    def class_counts(self) -> np.ndarray:
        """int64[num_classes]: how many examples of each class."""
        return np.bincount(self.y, minlength=self.num_classes).astype(np.int64)


# ------------------------------------------------------------------ splitting --
def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), both sorted: exactly ``round(N * test_fraction)``
    test examples, spread over the classes in proportion (largest remainders), the
    examples of each class chosen by a seeded permutation."""
    labels = np.asarray(labels)
    n = labels.shape[0]
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    n_test = int(round(n * float(test_fraction)))
    if n_test < 1 or n_test >= n:
        raise ValueError(f"test_fraction={test_fraction} of {n} examples leaves an empty train or test set")
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * (n_test / n)
    take = np.floor(quota).astype(np.int64)
    remainder = n_test - int(take.sum())
    if remainder:
        order = np.lexsort((np.arange(classes.size), -(quota - take)))  # largest fraction first, then class
        take[order[:remainder]] += 1
    rng = np.random.default_rng(seed)
    test_parts = []
    for cls, k in zip(classes, take):
        members = np.flatnonzero(labels == cls)
        test_parts.append(members[rng.permutation(members.size)[:k]])
    test = np.sort(np.concatenate(test_parts)) if test_parts else np.empty(0, np.int64)
    mask = np.ones(n, dtype=bool)
    mask[test] = False
    return np.flatnonzero(mask).astype(np.int64), test.astype(np.int64)


def _split_dataset(full: Dataset, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    train_idx, test_idx = stratified_split(full.y, test_fraction, seed)
    return full.subset(train_idx), full.subset(test_idx)


def _check_limit(limit: Optional[int]) -> Optional[int]:
    if limit is None:
        return None
    if int(limit) < 2:
        raise ValueError(f"limit must be at least 2 (or None), got {limit}")
    return int(limit)


# ---------------------------------------------------------------------- digits --
def load_digits(test_fraction: float = 0.2, seed: int = 0, limit: Optional[int] = None) -> tuple[Dataset, Dataset]:
    """scikit-learn's bundled digits (1797 8x8 images, 10 classes), scaled from
    0..16 to [0, 1], as (train, test) of shape (N, 1, 8, 8), split stratified
    by a seeded permutation (1438 / 359 at the default 0.2). ``limit`` keeps the
    first ``limit`` images before splitting."""
    datasets = require_sklearn_datasets()
    bunch = datasets.load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0))[:, None, :, :]
    y = np.asarray(bunch.target, dtype=np.int64)
    limit = _check_limit(limit)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return _split_dataset(Dataset(x, y, 10, "digits"), test_fraction, seed)


# ----------------------------------------------------------------------- MNIST --
PathLike = Union[str, "os.PathLike[str]"]


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        raise ValueError(f"{path}: not a readable (gzip) IDX file: {exc}") from exc


def _parse_idx(path: Path, expected_magic: int, ndim: int) -> np.ndarray:
    """The uint8 array of an IDX file, header and size validated."""
    data = _read_bytes(path)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, need {header})")
    (magic,) = struct.unpack_from(">I", data, 0)
    if magic != expected_magic:
        kind = "images" if expected_magic == IMAGES_MAGIC else "labels"
        raise ValueError(
            f"{path}: bad IDX magic number {magic} (0x{magic:08x}); MNIST {kind} "
            f"files start with {expected_magic} (0x{expected_magic:08x})"
        )
    dims = struct.unpack_from(f">{ndim}I", data, 4)
    if dims[0] == 0:
        raise ValueError(f"{path}: IDX file holds no items")
    if ndim == 3 and dims[1:] != (MNIST_SIDE, MNIST_SIDE):
        raise ValueError(f"{path}: images are {dims[1]}x{dims[2]}, expected {MNIST_SIDE}x{MNIST_SIDE}")
    item = int(np.prod(dims[1:], dtype=np.int64)) if ndim > 1 else 1
    expected = header + dims[0] * item
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: IDX file {what}: {len(data)} bytes, the header "
            f"({dims[0]} items of {item} bytes) implies {expected}"
        )
    arr = np.frombuffer(data, dtype=np.uint8, count=dims[0] * item, offset=header)
    return arr.reshape(dims) if ndim > 1 else arr


def _find(directory: Path, prefix: str, kind: str, ndim: int) -> Optional[Path]:
    for sep in ("-", "."):
        for ext in ("", ".gz"):
            p = directory / f"{prefix}-{kind}{sep}idx{ndim}-ubyte{ext}"
            if p.is_file():
                return p
    return None


def _load_idx_pair(directory: Path, prefix: str, limit: Optional[int]) -> Optional[Dataset]:
    images = _find(directory, prefix, "images", 3)
    labels = _find(directory, prefix, "labels", 1)
    if images is None and labels is None:
        return None
    if images is None or labels is None:
        missing = f"{prefix}-images-idx3-ubyte[.gz]" if images is None else f"{prefix}-labels-idx1-ubyte[.gz]"
        raise ValueError(f"{directory}: {missing} is missing (its partner file is there)")
    x = _parse_idx(images, IMAGES_MAGIC, 3)
    y = _parse_idx(labels, LABELS_MAGIC, 1)
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{directory}: {images.name} holds {x.shape[0]} images but {labels.name} holds {y.shape[0]} labels"
        )
    if limit is not None:
        x, y = x[:limit], y[:limit]
    if y.max() >= MNIST_CLASSES:
        raise ValueError(f"{labels}: label {int(y.max())} outside 0..{MNIST_CLASSES - 1}")
    xf = (x.astype(np.float32) / np.float32(255.0))[:, None, :, :]
    return Dataset(xf, y.astype(np.int64), MNIST_CLASSES, "mnist")


def load_mnist_idx(
    directory: PathLike, test_fraction: float = 0.2, seed: int = 0, limit: Optional[int] = None
) -> tuple[Dataset, Dataset]:
    """MNIST from IDX files in ``directory`` as (train, test), images float32 in
    [0, 1] of shape (N, 1, 28, 28), labels int64.

    With ``train-images-idx3-ubyte(.gz)`` and ``train-labels-idx1-ubyte(.gz)``
    present they are the training set and the ``t10k-*`` files the test set
    (``test_fraction`` and ``seed`` unused); with only ``t10k-*`` those are
    split, stratified and seeded (10,000 -> 8,000 / 2,000 at 0.2). ``limit``
    keeps the first ``limit`` examples of each file pair. Malformed files
    (bad magic, wrong dimensions, truncated, image/label count mismatch, labels
    above 9) raise ValueError.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"MNIST directory {str(root)!r} does not exist")
    limit = _check_limit(limit)
    test = _load_idx_pair(root, "t10k", limit)
    if test is None:
        raise FileNotFoundError(f"{root}: no t10k-images-idx3-ubyte[.gz] / t10k-labels-idx1-ubyte[.gz]")
    train = _load_idx_pair(root, "train", limit)
    if train is not None:
        return train, test
    return _split_dataset(test, test_fraction, seed)


# ------------------------------------------------------------------------ tasks --
def default_mnist_dir() -> Optional[Path]:
    """``../shared/data/mnist`` relative to the working directory if it exists, else
    the same folder next to the source checkout this package lives in, else None."""
    candidates = [Path.cwd() / ".." / "shared" / "data" / "mnist"]
    here = Path(__file__).resolve()
    if len(here.parents) > 4:  # <root>/python/fedpress/train/datasets.py
        candidates.append(here.parents[4] / "shared" / "data" / "mnist")
    for c in candidates:
        if c.is_dir():
            return c
    return None


def load_task(
    name: str,
    data_dir: Optional[PathLike] = None,
    seed: int = 0,
    *,
    test_fraction: float = 0.2,
    limit: Optional[int] = None,
) -> tuple[Dataset, Dataset]:
    """(train, test) of a task by name: ``"digits"`` or ``"mnist"`` (IDX files in
    ``data_dir``, by default ``../shared/data/mnist`` from the working directory)."""
    task = str(name).lower()
    if task == "digits":
        return load_digits(test_fraction=test_fraction, seed=seed, limit=limit)
    if task == "mnist":
        directory = Path(data_dir) if data_dir is not None else default_mnist_dir()
        if directory is None:
            raise FileNotFoundError(
                "the mnist task needs data_dir: a folder with t10k-images-idx3-ubyte.gz and "
                "t10k-labels-idx1-ubyte.gz (../shared/data/mnist was not found)"
            )
        return load_mnist_idx(directory, test_fraction=test_fraction, seed=seed, limit=limit)
    raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
