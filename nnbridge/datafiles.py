"""Readers for image datasets a user already has on disk: MNIST / Fashion-MNIST (IDX
files) and CIFAR-10 (the "python version" batches).  Nothing is ever downloaded.

Where the files are looked for, in ``root`` (argument, else the ``NNBRIDGE_DATA``
environment variable, else ``./data``):

=============== ================================================ ========================
dataset         files                                            also accepted under
=============== ================================================ ========================
mnist           ``train-images-idx3-ubyte``, ``train-labels-     ``MNIST/raw/`` (the
                idx1-ubyte``, ``t10k-images-idx3-ubyte``,        torchvision layout)
                ``t10k-labels-idx1-ubyte`` (each optionally
                ``.gz``)
fashion_mnist   the same names                                   ``FashionMNIST/raw/``
cifar10         ``cifar-10-batches-py/data_batch_1`` .. ``_5``,
                ``cifar-10-batches-py/test_batch``
=============== ================================================ ========================

The CIFAR batches are Python pickles, as their authors distribute them; unpickling
runs code, so load only files from a source you trust (torchvision reads them the same
way).
"""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np

from trajopt.errors import InvalidArgumentError, SolverUnavailableError

__all__ = ["IMAGE_DATASETS", "read_idx", "read_images", "data_root"]

#: dataset -> per-sample image shape
IMAGE_DATASETS = {"mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
_IDX_DIRS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_WHERE = ("(or point to them: root= of nnbridge.data.load, --data-root of the training "
          "command, or the NNBRIDGE_DATA environment variable)")
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
              0x0E: ">f8"}


def data_root(root: str | os.PathLike | None = None) -> Path:
    """``root``, else ``$NNBRIDGE_DATA``, else ``./data``."""
    return Path(root if root is not None else os.environ.get("NNBRIDGE_DATA", "data"))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (LeCun's MNIST format; gzip-compressed when the name ends in .gz).

    Raises
    ------
    InvalidArgumentError
        Naming the file when its header or size is not IDX.
    """
    path = Path(path)
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise InvalidArgumentError(f"{path}: not an IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = np.frombuffer(raw, ">i4", count=ndim, offset=4).astype(np.int64)
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    want = 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != want:
        raise InvalidArgumentError(f"{path}: {len(raw)} bytes, the IDX header says {want}")
    return np.frombuffer(raw, dtype, offset=4 + 4 * ndim).reshape(dims).copy()


def _find(base: Path, name: str) -> Path | None:
    for p in (base / name, base / f"{name}.gz"):
        if p.exists():
            return p
    return None


def _idx_dataset(name: str, root: Path):
    files = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
    for base in (root, root / _IDX_DIRS[name] / "raw"):
        found = [_find(base, f) for f in files]
        if all(found):
            Xtr, ytr, Xte, yte = (read_idx(p) for p in found)
            return (Xtr.reshape(len(Xtr), -1), ytr.astype(np.int64),
                    Xte.reshape(len(Xte), -1), yte.astype(np.int64))
    raise SolverUnavailableError(
        f"dataset {name!r}: the IDX files {', '.join(files)} (or .gz) are not in {root} "
        f"nor {root / _IDX_DIRS[name] / 'raw'}; nothing is downloaded: put them there "
        f"{_WHERE}")


def _cifar10(root: Path):
    base = root / "cifar-10-batches-py"
    names = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not (base / n).exists()]
    if missing:
        raise SolverUnavailableError(
            f"dataset 'cifar10': {', '.join(missing)} not in {base}; nothing is "
            f"downloaded: unpack CIFAR-10's python version there {_WHERE}")
    parts = []
    for n in names:
        with open(base / n, "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
        X = np.asarray(d[b"data"], dtype=np.uint8)
        y = np.asarray(d[b"labels"], dtype=np.int64)
        if X.ndim != 2 or X.shape[1] != 3072 or len(y) != len(X):
            raise InvalidArgumentError(f"{base / n}: data {X.shape} and {len(y)} labels; "
                                       "a CIFAR-10 batch has (N, 3072) and N")
        parts.append((X, y))
    Xtr = np.concatenate([p[0] for p in parts[:5]])
    ytr = np.concatenate([p[1] for p in parts[:5]])
    return Xtr, ytr, parts[5][0], parts[5][1]


def read_images(name: str, root: str | os.PathLike | None = None):
    """``(X_train, y_train, X_test, y_test)`` of an image dataset, images flattened
    (N, C*H*W) as stored (uint8), labels int64; the official train / test split."""
    if name not in IMAGE_DATASETS:
        raise InvalidArgumentError(f"name must be one of {', '.join(IMAGE_DATASETS)}; got "
                                   f"{name!r}")
    base = data_root(root)
    return _cifar10(base) if name == "cifar10" else _idx_dataset(name, base)
