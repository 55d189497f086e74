"""One training run: an optimizer by name, a minibatch loop with checkpoints, and what it
measured.  The command line (:mod:`nnbridge.train`) and the experiments are built on
:func:`run`.

Seeding: the seed fixes the weight initialization (``torch.manual_seed``) and the
minibatch order (a CPU ``torch.Generator``); the data split is fixed
(:mod:`nnbridge.data`).  On the CPU a run is deterministic given its seed.
"""

from __future__ import annotations

import math
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trajopt.errors import InvalidArgumentError, SkippedStepWarning

from . import data as _data
from .checkpoint import load_checkpoint, save_checkpoint
from .curvature import CURVATURES
from .ddpnopt import EKFAC, DDPNOpt
from .emsa import EMSA
from .gtddp import GTDDP
from .models import default_model
from .terminal import check_terminal_options

__all__ = ["OPTIMIZERS", "DEFAULT_LR", "RunConfig", "RunResult", "make_optimizer",
           "parse_optimizer", "run"]

#: learning rates used when none is given, all chosen on the validation split of digits
#: (MLP, 3 seeds, 20 epochs) from grids inside the DDPNOpt paper's Table 4 ranges
#: (docs/experiments.md): the torch.optim baselines' here, DDPNOpt's and vanilla DDP's
#: are the defaults of the optimizer classes themselves (nnbridge.curvature), so that
#: the class, the command, the README and the example use one rate per curvature
DEFAULT_LR = {"sgd": 0.5, "rmsprop": 5e-3, "adam": 5e-3, "emsa": 0.2,
              "ekfac": CURVATURES["ekfac"].defaults["lr"],
              "vanilla-ddp": CURVATURES["exact"].defaults["lr"],
              **{f"{o}-{k}": CURVATURES[c].defaults["lr"] for o in ("ddpnopt", "gtddp")
                 for k, c in (("sgd", "identity"), ("rmsprop", "rmsprop"), ("adam", "adam"),
                              ("ekfac", "ekfac"))}}
_BASE = {"sgd": "identity", "rmsprop": "rmsprop", "adam": "adam", "ekfac": "ekfac"}
_CURV_ALIAS = {"identity": "identity", "sgd": "identity", "rmsprop": "rmsprop",
               "adam": "adam", "ekfac": "ekfac"}
#: accepted names; "ddpnopt" / "gtddp" take --curvature, "ddpnopt-<c>" / "gtddp-<c>"
#: name it
OPTIMIZERS = ("sgd", "rmsprop", "adam", "ekfac", "emsa", "vanilla-ddp", "ddpnopt",
              "ddpnopt-sgd", "ddpnopt-rmsprop", "ddpnopt-adam", "ddpnopt-ekfac", "gtddp",
              "gtddp-sgd", "gtddp-rmsprop", "gtddp-adam", "gtddp-ekfac")


def parse_optimizer(name: str, curvature: str = "adam") -> tuple[str, str | None]:
    """Canonical ``(label, curvature)``: ``("adam", None)`` for a torch.optim baseline,
    ``("ddpnopt-adam", "adam")`` for DDPNOpt, ``("gtddp-adam", "adam")`` for GT-DDP,
    ``("vanilla-ddp", "exact")``."""
    key = name.strip().lower().replace("_", "-")
    if key in _BASE or key in ("emsa", "e-msa"):
        return ("emsa" if key == "e-msa" else key), None
    if key in ("vanilla-ddp", "ddp"):
        return "vanilla-ddp", "exact"
    for family in ("ddpnopt", "gtddp"):
        if key == family:
            key = f"{family}-{curvature}"
        head, _, curv = key.partition("-")
        if head == family and curv in _CURV_ALIAS:
            curv = _CURV_ALIAS[curv]
            return f"{family}-{'sgd' if curv == 'identity' else curv}", curv
    raise InvalidArgumentError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; "
                               f"got {name!r}")


def default_lr(label: str) -> float:
    """The default learning rate of a canonical optimizer label."""
    return DEFAULT_LR[label]


def make_optimizer(label: str, model: nn.Module, lr: float, *,
                   terminal_hessian: str | None = None, **kw) -> torch.optim.Optimizer:
    """The optimizer for a canonical label (see :func:`parse_optimizer`).  ``"ekfac"`` is
    :class:`EKFAC` (one Kronecker pair per layer, any network); ``"gtddp-ekfac"`` couples
    the players of a stage (Theorem 3) and adds the feedback.  ``terminal_hessian`` goes
    to DDPNOpt / GT-DDP (None: the class's default); the optimizers without a DDP pass
    ignore it."""
    if not lr >= 0:
        raise InvalidArgumentError(f"lr must be >= 0; got {lr}")
    if label == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, **kw)
    if label == "rmsprop":
        return torch.optim.RMSprop(model.parameters(), lr=lr, **kw)
    if label == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, **kw)
    if label == "ekfac":
        return EKFAC(model, lr=lr, **kw)
    if label == "emsa":
        return EMSA(model, lr=lr, **kw)
    if label == "vanilla-ddp":
        return DDPNOpt(model, lr=lr, curvature="exact", value_hessian="full",
                       terminal_hessian=terminal_hessian, **kw)
    label, curv = parse_optimizer(label)
    cls = GTDDP if label.startswith("gtddp-") else DDPNOpt
    return cls(model, lr=lr, curvature=curv, terminal_hessian=terminal_hessian, **kw)


@dataclass(frozen=True)
class RunConfig:
    """What one run trains.  ``lr=None``: :data:`DEFAULT_LR`.  ``terminal_hessian``:
    DDPNOpt's / GT-DDP's (``nnbridge.terminal``; None: the optimizer's default); the
    torch.optim baselines and EKFAC have none and ignore it, so that one configuration
    can describe a comparison."""

    dataset: str = "digits"
    model: str = "mlp"
    optimizer: str = "adam"
    lr: float | None = None
    epochs: int = 20
    batch_size: int = 32
    seed: int = 0
    split: str = "full"
    device: str = "cpu"
    terminal_hessian: str | None = None

    def __post_init__(self):
        if self.dataset not in _data.DATASETS:
            raise InvalidArgumentError(
                f"dataset must be one of {', '.join(_data.DATASETS)}; got {self.dataset!r}")
        parse_optimizer(self.optimizer)
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise InvalidArgumentError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.lr is not None and not (self.lr >= 0 and math.isfinite(self.lr)):
            raise InvalidArgumentError(f"lr must be a finite number >= 0; got {self.lr}")
        if self.terminal_hessian is not None:
            check_terminal_options(self.terminal_hessian, "cross_entropy")

    @property
    def label(self) -> str:
        return parse_optimizer(self.optimizer)[0]

    @property
    def learning_rate(self) -> float:
        return default_lr(self.label) if self.lr is None else self.lr


@dataclass
class RunResult:
    """What a run measured.

    Attributes
    ----------
    optimizer, seed, lr
    test_accuracy : float
        Accuracy on the evaluation split (test, or validation for ``split="train"``).
    final_train_loss : float
        Mean loss over the whole training split after the last epoch.
    time_per_step : float
        Median seconds of one ``optimizer.step(closure)`` (forward, backward, update).
    skipped_steps : int
        Steps the optimizer skipped (non-finite loss or update).
    history : dict
        ``step`` / ``train_loss`` per minibatch; ``epoch_step`` / ``test_accuracy`` /
        ``epoch_train_loss`` after every epoch (the first entry is before training).
    """

    optimizer: str
    seed: int
    lr: float
    test_accuracy: float
    final_train_loss: float
    time_per_step: float
    skipped_steps: int
    history: dict[str, list] = field(repr=False)

    def summary(self) -> dict[str, Any]:
        """The row of ``results.json`` (no per-step history)."""
        d = asdict(self)
        d.pop("history")
        return d


def _evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Loss and accuracy in eval mode (BatchNorm with its running statistics, which the
    evaluation leaves alone), every module's mode restored after."""
    modes = [(m, m.training) for m in model.modules()]  # each module's own, restored
    model.eval()
    try:
        with torch.no_grad():
            out = model(X)
            loss = float(nn.functional.cross_entropy(out, y))
            acc = float((out.argmax(-1) == y).double().mean())
    finally:
        for m, training in modes:
            m.training = training
    return loss, acc


def _shape(X: torch.Tensor, dataset, model_name: str) -> torch.Tensor:
    return X.reshape(-1, *dataset.image_shape) if model_name in ("cnn", "resnet") else X


def run(cfg: RunConfig, dataset: _data.Dataset | None = None, *, progress: bool = False,
        checkpoint: str | os.PathLike | None = None) -> RunResult:
    """Train ``cfg.model`` on ``cfg.dataset`` with ``cfg.optimizer``.

    Parameters
    ----------
    cfg : RunConfig
    dataset : Dataset, optional
        Already loaded data (:func:`nnbridge.data.load` with ``cfg.split``); loaded when
        None.
    progress : bool
        Show a progress bar (tqdm, on stderr).
    checkpoint : path, optional
        A file written after every epoch (model and optimizer ``state_dict``, the
        minibatch generator and the history; :mod:`nnbridge.checkpoint`, with a
        checksum).  When it exists the run resumes from it and continues exactly as an
        uninterrupted run would; it must come from the same configuration except
        ``epochs`` (a finished run can be trained further, not shortened).

    Notes
    -----
    Under ``torch.distributed`` (``torchrun``, see :mod:`nnbridge.train`) each rank takes
    its contiguous share of every minibatch of ``cfg.batch_size`` samples and the model
    runs inside ``DistributedDataParallel``: N ranks take the steps one process takes with
    the whole minibatch.  Only rank 0 shows progress and writes the checkpoint.
    """
    ds = (dataset or _data.load(cfg.dataset, cfg.split)).to(cfg.device)
    label = cfg.label
    lr = cfg.learning_rate
    torch.manual_seed(cfg.seed)
    model = default_model(cfg.model, ds).to(cfg.device)
    opt = make_optimizer(label, model, lr, terminal_hessian=cfg.terminal_hessian)
    rank, world = ((dist.get_rank(), dist.get_world_size()) if dist.is_available()
                   and dist.is_initialized() else (0, 1))
    forward = model
    if world > 1:
        forward = nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.device(cfg.device).index]
            if torch.device(cfg.device).type == "cuda" else None)
    Xtr, Xev = _shape(ds.X_train, ds, cfg.model), _shape(ds.X_eval, ds, cfg.model)
    ytr, yev = ds.y_train, ds.y_eval
    gen = torch.Generator().manual_seed(cfg.seed)
    acc0 = _evaluate(model, Xev, yev)[1]
    hist: dict[str, list] = {"step": [], "train_loss": [], "epoch_step": [0],
                             "test_accuracy": [acc0],
                             "epoch_train_loss": [_evaluate(model, Xtr, ytr)[0]],
                             "step_time": [], "skipped": [0]}
    start_epoch = 0
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        ck = load_checkpoint(path)
        mine, theirs = asdict(cfg), dict(ck["config"])
        mine.pop("epochs"), theirs.pop("epochs")  # more epochs: continue training
        theirs.setdefault("terminal_hessian", None)  # written before the field existed
        if mine != theirs:
            diff = ", ".join(f"{k}={theirs.get(k)!r} (now {mine.get(k)!r})"
                             for k in sorted(set(mine) | set(theirs))
                             if mine.get(k) != theirs.get(k))
            raise InvalidArgumentError(f"checkpoint {path} was written by another "
                                       f"configuration: {diff}")
        if ck["epoch"] > cfg.epochs:
            raise InvalidArgumentError(
                f"checkpoint {path} holds {ck['epoch']} epochs, more than the {cfg.epochs} "
                f"asked for: pass epochs >= {ck['epoch']} (or another checkpoint)")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"])
        hist, start_epoch = ck["history"], ck["epoch"]

    n = len(Xtr)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch,
                   desc=f"{label} seed {cfg.seed}", leave=False, dynamic_ncols=True)
    model.train()
    cuda = torch.device(cfg.device).type == "cuda"
    diverged = not all(math.isfinite(v) for v in hist["train_loss"][-1:])
    for epoch in range(start_epoch, cfg.epochs):
        for idx in torch.randperm(n, generator=gen).split(cfg.batch_size):
            if len(idx) < world:  # a last minibatch too small to give every rank a sample
                continue
            idx = idx.tensor_split(world)[rank].to(cfg.device)
            xb, yb = Xtr[idx], ytr[idx]

            def closure(xb=xb, yb=yb):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(forward(xb), yb)
                loss.backward()
                return loss

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", SkippedStepWarning)
                t0 = time.perf_counter()
                loss = opt.step(closure).detach()
                if cuda:
                    torch.cuda.synchronize()
                hist["step_time"].append(time.perf_counter() - t0)
            if world > 1:  # the minibatch's loss, the same on every rank
                dist.all_reduce(loss)
                loss /= world
            skipped = sum(issubclass(w.category, SkippedStepWarning) for w in caught)
            hist["skipped"][0] += skipped
            hist["step"].append(len(hist["step"]) + 1)
            hist["train_loss"].append(float(loss))
            if not diverged and not math.isfinite(hist["train_loss"][-1]):
                diverged = True  # say so while it happens, not only at the end
                warnings.warn(f"{label} (lr {lr:g}, seed {cfg.seed}) is diverging: "
                              f"non-finite training loss at step {hist['step'][-1]} "
                              f"(epoch {epoch + 1})", RuntimeWarning, stacklevel=2)
            if bar is not None:
                bar.update()
                bar.set_postfix(loss=f"{hist['train_loss'][-1]:.3f}", refresh=False)
        train_loss, _ = _evaluate(model, Xtr, ytr)
        hist["epoch_step"].append(len(hist["step"]))
        hist["test_accuracy"].append(_evaluate(model, Xev, yev)[1])
        hist["epoch_train_loss"].append(train_loss)
        if path is not None and rank == 0:
            save_checkpoint(path, {"config": asdict(cfg), "epoch": epoch + 1,
                                   "model": model.state_dict(),
                                   "optimizer": opt.state_dict(),
                                   "generator": gen.get_state(), "history": hist})
    if bar is not None:
        bar.close()
    if not math.isfinite(hist["epoch_train_loss"][-1]):
        warnings.warn(f"{label} (lr {lr:g}, seed {cfg.seed}) diverged: the training loss "
                      "is not finite", RuntimeWarning, stacklevel=2)
    times = hist["step_time"] or [float("nan")]
    return RunResult(optimizer=label, seed=cfg.seed, lr=lr,
                     test_accuracy=hist["test_accuracy"][-1],
                     final_train_loss=hist["epoch_train_loss"][-1],
                     time_per_step=statistics.median(times), skipped_steps=hist["skipped"][0],
                     history=hist)
