"""The classification datasets that ship with scikit-learn, split and standardized the same
way every time.

=============  =======  ========  =======  ==========================================
name           samples  features  classes  note
=============  =======  ========  =======  ==========================================
digits         1797     64        10       8 x 8 images (``image_shape`` (1, 8, 8))
wine           178      13        3
breast_cancer  569      30        2
iris           150      4         3
mnist1d        5000     40        10       1-D signals (``image_shape`` (1, 40)); needs
                                           the ``mnist1d`` package, generated locally
=============  =======  ========  =======  ==========================================

MNIST, Fashion-MNIST (28 x 28, ``image_shape`` (1, 28, 28)) and CIFAR-10 (32 x 32 RGB,
(3, 32, 32)) are read from files the user has (:mod:`nnbridge.datafiles`), with their
official train / test split.

Split (fixed, independent of the training seed): 30% test, stratified, ``random_state=0``
(MNIST-1D: its own 4000 / 1000 train / test split, as its authors use it); of the
remaining training part, 20% is held out as the validation split (stratified,
``random_state=1``) used only to choose learning rates.  Features are standardized with
the mean and standard deviation of the training part (``split="train"``: the 80%;
``split="full"``: train + validation), so no statistic of the evaluation data leaks in.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from trajopt.errors import InvalidArgumentError, SolverUnavailableError

from .datafiles import IMAGE_DATASETS, read_images

__all__ = ["DATASETS", "Dataset", "load"]

DATASETS = ("digits", "wine", "breast_cancer", "iris", "mnist1d", "mnist", "fashion_mnist",
            "cifar10")
TEST_FRACTION = 0.3
VAL_FRACTION = 0.2


@dataclass(frozen=True)
class Dataset:
    """Train and evaluation tensors of one dataset.

    Attributes
    ----------
    name : str
    X_train, y_train : (N, d) float, (N,) int64
    X_eval, y_eval : (M, d), (M,)
        The test split, or the validation split for ``load(..., split="train")``.
    n_classes : int
    image_shape : tuple or None
        Per-sample shape when the features are pixels or a signal: (C, H, W) (digits) or
        (C, L) (mnist1d).
    """

    name: str
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_eval: torch.Tensor
    y_eval: torch.Tensor
    n_classes: int
    image_shape: tuple[int, ...] | None = None

    @property
    def n_features(self) -> int:
        return self.X_train.shape[1]

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Dataset:
        f = lambda X: X.to(device=device, dtype=dtype)  # noqa: E731
        return Dataset(self.name, f(self.X_train), self.y_train.to(device), f(self.X_eval),
                       self.y_eval.to(device), self.n_classes, self.image_shape)


def load(name: str, split: str = "full", root: str | None = None) -> Dataset:
    """Load a dataset with the fixed split of the module docstring.

    Parameters
    ----------
    name : str
        One of :data:`DATASETS`; "mnist", "fashion_mnist" and "cifar10" from files the
        user has (:mod:`nnbridge.datafiles`: never downloaded), with their official
        train / test split.
    split : {"full", "train"}
        ``"full"``: train on train + validation (70%), evaluate on the test split (30%).
        ``"train"``: train on the 56% training part, evaluate on the validation split
        (14%) -- for choosing hyper-parameters without touching the test split.
    root : str, optional
        Where the image files are (default ``$NNBRIDGE_DATA``, else ``./data``).

    Returns
    -------
    Dataset
        float32 features, int64 labels, on the CPU.
    """
    if name not in DATASETS:
        raise InvalidArgumentError(f"name must be one of {', '.join(DATASETS)}; got {name!r}")
    if split not in ("full", "train"):
        raise InvalidArgumentError(f"split must be 'full' or 'train'; got {split!r}")
    from sklearn.model_selection import train_test_split

    if name == "mnist1d":
        Xtr, Xte, ytr, yte = _mnist1d()
        y = ytr
    elif name in IMAGE_DATASETS:
        Xtr, ytr, Xte, yte = read_images(name, root)
        Xtr, Xte = Xtr.astype(np.float64), Xte.astype(np.float64)
    else:
        import sklearn.datasets as skd

        X, y = getattr(skd, f"load_{name}")(return_X_y=True)
        Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=TEST_FRACTION, random_state=0,
                                              stratify=y)
    if split == "train":
        Xtr, Xte, ytr, yte = train_test_split(Xtr, ytr, test_size=VAL_FRACTION,
                                              random_state=1, stratify=ytr)
    mu, sd = Xtr.mean(0), Xtr.std(0)
    sd[sd == 0] = 1.0  # constant pixels of digits
    t = lambda a: torch.tensor((a - mu) / sd, dtype=torch.float32)  # noqa: E731
    return Dataset(name, t(Xtr), torch.tensor(ytr, dtype=torch.int64), t(Xte),
                   torch.tensor(yte, dtype=torch.int64),
                   10 if name in IMAGE_DATASETS else int(y.max()) + 1,
                   _SHAPES.get(name))


_SHAPES = {"digits": (1, 8, 8), "mnist1d": (1, 40), **IMAGE_DATASETS}


@functools.lru_cache(maxsize=1)
def _mnist1d():
    """MNIST-1D as its authors define it (``mnist1d.data.make_dataset`` with the default
    arguments: 5000 samples, seed 42, 4000 / 1000 split), generated locally (~2 s; the
    package's ``get_dataset`` would download it)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise SolverUnavailableError(
            "dataset 'mnist1d' needs the package mnist1d (pip install mnist1d); it "
            "generates the data locally") from exc
    d = make_dataset(get_dataset_args())
    return d["x"], d["x_test"], d["y"], d["y_test"]
