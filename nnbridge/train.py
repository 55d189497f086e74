"""Train networks on scikit-learn datasets with optimal-control and standard optimizers.

    python -m nnbridge.train --dataset digits --optimizer adam,ddpnopt
    nnbridge-train --dataset wine --optimizer sgd,ddpnopt-sgd --seeds 10 --out runs/wine

Every flag has a default that gives a meaningful run (``--help`` shows them).  Each
(optimizer, seed) pair is one run (progress bar on stderr); at the end a table of the mean
and standard deviation over seeds of test accuracy, final training loss and time per step
is printed, and with ``--out DIR`` written as ``DIR/results.json`` (strict JSON: a
non-finite number is ``null``), ``DIR/results.csv`` and ``DIR/curves.png``.  Bad
arguments exit with status 2 and a one-line message, before any training: ``--out`` and
``--checkpoint-dir`` are checked first, and an ``--out`` that already holds results is
refused unless ``--overwrite`` is given.

Several processes (data-parallel, ``torch.distributed``)::

    torchrun --nproc-per-node 2 -m nnbridge.train --optimizer ddpnopt --out runs/dp

Each rank trains on its share of every minibatch inside ``DistributedDataParallel`` (gloo
on the CPU, NCCL with ``--device cuda``: rank r uses ``cuda:LOCAL_RANK``); ``--batch-size``
is the global minibatch, so N ranks take the steps of one process.  Rank 0 prints, writes
``--out`` and the checkpoints.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from trajopt.errors import SolverUnavailableError, TrajoptError

from . import data as _data
from .distributed import leave_process_group
from .models import MODELS
from .terminal import TERMINAL_HESSIANS
from .training import DEFAULT_LR, OPTIMIZERS, RunConfig, RunResult, parse_optimizer, run

__all__ = ["main", "summarize", "plot_curves"]

CURVATURES = ("sgd", "identity", "rmsprop", "adam", "ekfac")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block, no traceback
        self.exit(2, f"{self.prog}: error: {message}\n")


_INT_MAX = 2 ** 31 - 1


def _positive(kind):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {kind.__name__}: {text!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"must be > 0; got {text}")
        if kind is int and v > _INT_MAX:
            raise argparse.ArgumentTypeError(f"must be <= {_INT_MAX}; got {text}")
        return v
    parse.__name__ = kind.__name__
    return parse


def _seed(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an int: {text!r}") from None
    if not 0 <= v < 2 ** 63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63); got {text}")
    return v


def _lr(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"learning rate must be >= 0; got {text}")
    return v


def _optimizers(text):
    names = [t for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no optimizer given")
    for t in names:
        try:
            parse_optimizer(t)
        except TrajoptError:
            raise argparse.ArgumentTypeError(
                f"unknown optimizer {t!r}; choose from {', '.join(OPTIMIZERS)}") from None
    return names


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="nnbridge.train", description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits", choices=_data.DATASETS,
                    help="default digits; mnist, fashion_mnist and cifar10 are read from "
                         "files you have (--data-root), never downloaded")
    ap.add_argument("--data-root", default=None,
                    help="where the mnist / fashion_mnist / cifar10 files are (default "
                         "$NNBRIDGE_DATA, else ./data; nnbridge.datafiles)")
    ap.add_argument("--model", default="mlp", choices=MODELS,
                    help="mlp or odenet (any dataset), cnn or resnet (image or signal "
                         "data: digits, mnist, fashion_mnist, cifar10, mnist1d); default mlp")
    ap.add_argument("--optimizer", type=_optimizers, default=["adam", "ddpnopt"],
                    help=f"comma-separated list of {', '.join(OPTIMIZERS)} "
                         "(default adam,ddpnopt)")
    ap.add_argument("--curvature", default="adam", choices=CURVATURES,
                    help="curvature of a plain 'ddpnopt' or 'gtddp' (default adam)")
    ap.add_argument("--lr", type=_lr, default=None,
                    help="learning rate for every optimizer (default: each optimizer's "
                         "own, chosen on the digits validation split: " + ", ".join(
                             f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    ap.add_argument("--terminal-hessian", default=None, choices=TERMINAL_HESSIANS,
                    help="DDPNOpt's / GT-DDP's model of the loss Hessian at the output "
                         "(default: each optimizer's own; docs/ddpnopt.md)")
    ap.add_argument("--epochs", type=_positive(int), default=20, help="default 20")
    ap.add_argument("--batch-size", type=_positive(int), default=32,
                    help="minibatch size (over all ranks under torchrun; default 32)")
    ap.add_argument("--seeds", type=_positive(int), default=3,
                    help="number of seeds, 0 .. N-1 from --seed0 (default 3)")
    ap.add_argument("--seed0", type=_seed, default=0, help="first seed (default 0)")
    ap.add_argument("--validation", action="store_true",
                    help="train on the training part and report the validation split "
                         "(for choosing hyper-parameters; the test split is untouched)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    ap.add_argument("--out", type=Path, default=None,
                    help="write results.json, results.csv and curves.png here")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the results already in --out (refused otherwise)")
    ap.add_argument("--checkpoint-dir", type=Path, default=None,
                    help="save each run after every epoch; rerunning resumes from there")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def summarize(results: list[RunResult]) -> list[dict]:
    """Mean and standard deviation over seeds, one row per optimizer (in order)."""
    rows = []
    for name in dict.fromkeys(r.optimizer for r in results):
        rs = [r for r in results if r.optimizer == name]

        def ms(key, rs=rs):
            v = [getattr(r, key) for r in rs]
            return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)

        acc, loss, t = ms("test_accuracy"), ms("final_train_loss"), ms("time_per_step")
        rows.append({"optimizer": name, "lr": rs[0].lr, "seeds": len(rs),
                     "test_accuracy_mean": acc[0], "test_accuracy_std": acc[1],
                     "final_train_loss_mean": loss[0], "final_train_loss_std": loss[1],
                     "time_per_step_mean": t[0], "skipped_steps": sum(r.skipped_steps
                                                                      for r in rs)})
    return rows


def format_table(rows: list[dict], split: str = "test") -> str:
    """The summary rows as a markdown table; ``split``: the evaluation split's name."""
    lines = [f"| optimizer | lr | seeds | {split} accuracy % | final train loss | ms / step |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['lr']:g} | {r['seeds']} | "
            f"{100 * r['test_accuracy_mean']:.2f} ± {100 * r['test_accuracy_std']:.2f} | "
            f"{r['final_train_loss_mean']:.4f} ± {r['final_train_loss_std']:.4f} | "
            f"{1e3 * r['time_per_step_mean']:.2f} |")
    return "\n".join(lines)


def plot_curves(results: list[RunResult], path: Path, title: str = "",
                split: str = "test") -> Path:
    """Training loss (running mean over an epoch) and test accuracy against the step, one
    curve per optimizer: the mean over seeds, shaded between the minimum and maximum."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    positive = False
    for name in dict.fromkeys(r.optimizer for r in results):
        rs = [r for r in results if r.optimizer == name]
        loss = np.array([r.history["train_loss"] for r in rs], dtype=float)
        loss[~np.isfinite(loss)] = np.nan  # a diverged run: its curve stops there
        k = max(1, rs[0].history["epoch_step"][1] if len(rs[0].history["epoch_step"]) > 1
                else 1)
        kernel = np.ones(k) / k
        sm = np.array([np.convolve(row, kernel, mode="valid") for row in loss])
        positive |= bool(np.any(sm > 0))
        steps = np.arange(k, k + sm.shape[1])
        line, = ax1.plot(steps, sm.mean(0), label=name)
        ax1.fill_between(steps, sm.min(0), sm.max(0), color=line.get_color(), alpha=0.2)
        acc = 100 * np.array([r.history["test_accuracy"] for r in rs])
        es = rs[0].history["epoch_step"]
        ax2.plot(es, acc.mean(0), color=line.get_color(), label=name)
        ax2.fill_between(es, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.2)
    ax1.set(xlabel="step", ylabel="training loss (running mean, 1 epoch)",
            yscale="log" if positive else "linear")
    ax2.set(xlabel="step", ylabel=f"{split} accuracy [%]",
            ylim=(max(0, ax2.get_ylim()[0]), 100))
    ax2.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _finite_or_none(obj):
    """JSON has no NaN / Infinity: a non-finite number becomes null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def write_results(out: Path, results: list[RunResult], config: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    runs = [r.summary() for r in results]
    doc = {"runs": runs, "summary": summarize(results), "config": config,
           "curves": [{"optimizer": r.optimizer, "seed": r.seed, **r.history}
                      for r in results]}
    (out / "results.json").write_text(json.dumps(_finite_or_none(doc), indent=1,
                                                 allow_nan=False))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(runs[0]))
        w.writeheader()
        w.writerows(runs)


def _check_device(ap: argparse.ArgumentParser, text: str) -> str:
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        ap.error(f"--device {text}: not a device (cpu, cuda, cuda:1, ...)")
    if dev.type == "meta":
        ap.error("--device meta: a meta tensor holds no data to train on")
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {text}: CUDA is not available on this machine")
    try:
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError) as e:
        ap.error(f"--device {text}: not usable here ({str(e).splitlines()[0]})")
    return text


def _check_writable(ap: argparse.ArgumentParser, flag: str, folder: Path) -> None:
    """Refuse a folder that cannot be written, by trying; the folders this made for the
    try are removed again (the writers make them when they write: a refused run leaves
    no empty folder behind)."""
    if folder.exists() and not folder.is_dir():
        ap.error(f"{flag} {folder}: exists and is not a directory")
    made = []
    p = folder.absolute()
    while not p.exists():
        made.append(p)
        p = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        ap.error(f"{flag} {folder}: cannot write there ({e.strerror or e})")
    finally:
        for d in made:   # innermost first
            try:
                d.rmdir()
            except OSError:
                break


def _check_modules(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    need = ["sklearn"] + (["tqdm"] if not a.no_progress else []) + (
        ["matplotlib"] if a.out is not None else [])
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if a.dataset == "mnist1d" and importlib.util.find_spec("mnist1d") is None:
        ap.error("--dataset mnist1d needs the package mnist1d: pip install mnist1d (it "
                 "generates the data locally)")
    if missing:
        ap.error(f"missing {', '.join(missing)}: pip install 'trajopt-nnbridge[plot]' "
                 "(scikit-learn, matplotlib, tqdm)"
                 + (" or pass --no-progress" if missing == ["tqdm"] else ""))


def _distributed(a: argparse.Namespace) -> tuple[int, str]:
    """Join the process group torchrun describes (env WORLD_SIZE > 1): rank and device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return (dist.get_rank() if dist.is_initialized() else 0), a.device
    cuda = torch.device(a.device).type == "cuda"
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else a.device
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), device


#: what ``--out`` receives; any of them already there is refused without ``--overwrite``
_OUT_FILES = ("results.json", "results.csv", "curves.png")


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    _check_device(ap, a.device)
    _check_modules(ap, a)
    if a.seed0 + a.seeds > 2 ** 63:
        ap.error(f"--seed0 {a.seed0} + --seeds {a.seeds} passes 2**63")
    joined = not dist.is_initialized()   # a group we create is ours to destroy
    rank, device = _distributed(a)
    joined = joined and dist.is_initialized()
    if a.out is not None and rank == 0:
        held = [n for n in _OUT_FILES if (a.out / n).exists()]
        if held and not a.overwrite:
            ap.error(f"--out {a.out} already holds {', '.join(held)}: pass --overwrite to "
                     "replace it, or another --out")
        _check_writable(ap, "--out", a.out)
    if a.checkpoint_dir is not None:
        _check_writable(ap, "--checkpoint-dir", a.checkpoint_dir)
    try:
        labels = list(dict.fromkeys(parse_optimizer(o, a.curvature)[0] for o in a.optimizer))
        configs = [RunConfig(dataset=a.dataset, model=a.model, optimizer=lab, lr=a.lr,
                             epochs=a.epochs, batch_size=a.batch_size, seed=a.seed0 + s,
                             split="train" if a.validation else "full", device=device,
                             terminal_hessian=a.terminal_hessian)
                   for lab in labels for s in range(a.seeds)]
        try:
            ds = _data.load(a.dataset, configs[0].split, root=a.data_root)
        except SolverUnavailableError as exc:
            ap.error(str(exc))
        if a.model in ("cnn", "resnet") and ds.image_shape is None:
            ap.error(f"--model {a.model} needs image or signal data (digits, mnist, "
                     f"fashion_mnist, cifar10, mnist1d); {a.dataset} has none")
        results = []
        for cfg in configs:
            ck = None
            if a.checkpoint_dir is not None:
                ck = a.checkpoint_dir / f"{a.dataset}-{a.model}-{cfg.label}-seed{cfg.seed}.pt"
            results.append(run(cfg, ds, progress=not a.no_progress, checkpoint=ck))
    except TrajoptError as e:
        ap.error(str(e))
    except KeyboardInterrupt:
        ap.exit(130, "interrupted\n")
    finally:
        if joined:
            leave_process_group()
    if rank != 0:
        return 0
    split = "validation" if a.validation else "test"
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    print(f"{a.dataset}, {a.model}, {a.epochs} epochs, batch {a.batch_size}, "
          f"{a.seeds} seed(s){f', {ranks} ranks' if ranks > 1 else ''}, accuracy on the "
          f"{split} split")
    print(format_table(summarize(results), split))
    if a.out is not None:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
        config["runs"] = [asdict(c) for c in configs[:1]]
        write_results(a.out, results, config)
        plot_curves(results, a.out / "curves.png",
                    f"{a.dataset} {a.model}, {a.seeds} seed(s)", split)
        print(f"wrote {a.out}/results.json, results.csv, curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
