"""The image-file readers (MNIST / Fashion-MNIST IDX, CIFAR-10 batches) on small files
the tests write in the official formats; nothing is downloaded."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from nnbridge import data
from nnbridge.datafiles import read_idx
from trajopt.errors import InvalidArgumentError, SolverUnavailableError


def _idx(path, arr, gz=False):
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    head = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}i", *arr.shape)
    (gzip.open if gz else open)(path, "wb").write(head + arr.tobytes())


def _mnist_files(base, n_train=50, n_test=20, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    base.mkdir(parents=True, exist_ok=True)
    parts = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
             "train-labels-idx1-ubyte": np.arange(n_train) % 10,
             "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
             "t10k-labels-idx1-ubyte": (np.arange(n_test) * 3) % 10}
    for name, arr in parts.items():
        _idx(base / (name + (".gz" if gz else "")), arr, gz)
    return parts


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files_round_trip(tmp_path, gz):
    parts = _mnist_files(tmp_path, gz=gz)
    ds = data.load("mnist", root=str(tmp_path))
    assert ds.image_shape == (1, 28, 28) and ds.n_classes == 10
    assert ds.X_train.shape == (50, 784) and ds.X_eval.shape == (20, 784)
    assert torch.equal(ds.y_eval, torch.as_tensor(parts["t10k-labels-idx1-ubyte"]))
    raw = parts["train-images-idx3-ubyte"].reshape(50, -1).astype(np.float64)
    sd = raw.std(0)
    sd[sd == 0] = 1
    assert np.allclose(ds.X_train.numpy(), (raw - raw.mean(0)) / sd, atol=1e-5)
    val = data.load("mnist", split="train", root=str(tmp_path))
    assert len(val.X_train) + len(val.X_eval) == 50      # validation from the train part


def test_torchvision_layout_and_environment_root(tmp_path, monkeypatch):
    _mnist_files(tmp_path / "FashionMNIST" / "raw")
    monkeypatch.setenv("NNBRIDGE_DATA", str(tmp_path))
    assert data.load("fashion_mnist").X_train.shape == (50, 784)


def test_cifar10_batches(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        with open(base / name, "wb") as fh:
            pickle.dump({b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8),
                         b"labels": list(rng.integers(0, 10, 8))}, fh)
    ds = data.load("cifar10", root=str(tmp_path))
    assert ds.image_shape == (3, 32, 32)
    assert ds.X_train.shape == (40, 3072) and ds.X_eval.shape == (8, 3072)


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(SolverUnavailableError, match="nothing is downloaded"):
        data.load("mnist", root=str(tmp_path))
    with pytest.raises(SolverUnavailableError, match="data_batch_1"):
        data.load("cifar10", root=str(tmp_path))
    bad = tmp_path / "x-idx"
    bad.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(InvalidArgumentError, match="IDX header says"):
        read_idx(bad)
    bad.write_bytes(b"PK\x03\x04")
    with pytest.raises(InvalidArgumentError, match="not an IDX file"):
        read_idx(bad)
