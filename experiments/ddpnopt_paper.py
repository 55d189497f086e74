"""Regenerate docs/experiments.md: the DDPNOpt paper's Table 3 on the datasets we have, the
feedback ablation of its Fig. 4a and the runtime / memory of its Fig. 3.

    python experiments/ddpnopt_paper.py [--workers 2] [--ray [ADDRESS]] [--out docs] [--smoke]

1. Learning rates: every method gets its own, chosen on the validation split (3 seeds,
   best mean validation accuracy) from a grid inside the search range of the paper's
   Table 4 (vanilla DDP: 1 seed, two values, it costs ~0.4 s a step).
2. Table 3: 10 seeds (vanilla DDP: 3) on the test split with the chosen rates.
3. Ablation (App. A.3.2, Fig. 4a): each curvature's baseline against DDPNOpt with the
   same curvature and hyper-parameters over a grid of learning rates, 10 seeds each; the
   difference of mean test accuracy as a heat map, and the spread over seeds.
``--smoke``: wine only, 1 epoch, 1-2 seeds, the first grid values (the test suite).
4. Fig. 3: ``benchmarks/bench_ddpnopt.py --fig3`` (time and memory against batch size).

Runs go to a process pool (one torch thread each), or to Ray with ``--ray`` (a local
instance, or an existing cluster's address; the same results files); ``--smoke`` is a
tiny version for the test suite.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAPER_DIGITS = {"sgd": 95.36, "rmsprop": 94.33, "adam": 94.98, "ekfac": 95.24,
                "vanilla-ddp": 91.68, "ddpnopt-adam": 95.13}
METHODS = ("sgd", "rmsprop", "adam", "ekfac", "vanilla-ddp", "ddpnopt-adam")
#: grids inside Table 4's ranges (vanilla DDP and DDPNOpt: those of their curvature)
GRIDS = {"sgd": (0.07, 0.15, 0.3, 0.5), "rmsprop": (7e-4, 2e-3, 5e-3, 1e-2),
         "adam": (7e-4, 2e-3, 5e-3, 1e-2), "ekfac": (0.01, 0.03, 0.1, 0.3),
         "vanilla-ddp": (0.3, 1.0), "ddpnopt-adam": (7e-4, 2e-3, 5e-3, 1e-2)}
ABLATION = {"sgd": (0.03, 0.1, 0.3, 0.6, 1.0), "rmsprop": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
            "adam": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2), "ekfac": (0.01, 0.03, 0.1, 0.3, 1.0)}
EPOCHS = {"digits": 20, "wine": 60}
#: selected on the validation split only (not in Table 3): the default rates of DDPNOpt
#: with its other curvatures (nnbridge.curvature), on the grids of their baselines
SELECT_ONLY = ("ddpnopt-sgd", "ddpnopt-rmsprop", "ddpnopt-ekfac")
GRIDS.update({"ddpnopt-sgd": GRIDS["sgd"], "ddpnopt-rmsprop": GRIDS["rmsprop"],
              "ddpnopt-ekfac": GRIDS["ekfac"]})


def _init():
    import torch
    torch.set_num_threads(1)


@functools.lru_cache(maxsize=8)
def _dataset(name: str, split: str):
    from nnbridge import data
    return data.load(name, split)


def _task(kw: dict) -> dict:
    from nnbridge.training import RunConfig, run
    cfg = RunConfig(**kw)
    t0 = time.perf_counter()
    r = run(cfg, _dataset(cfg.dataset, cfg.split))
    return {**r.summary(), "dataset": cfg.dataset, "split": cfg.split,
            "wall": time.perf_counter() - t0,
            "history": {k: r.history[k] for k in ("step", "train_loss", "epoch_step",
                                                   "test_accuracy")}}


def _on_one_thread(fn, kw: dict) -> dict:
    """``fn(kw)`` with one torch thread (what the process pool's initializer sets): a Ray
    task then computes exactly what a pool worker computes."""
    _init()
    return fn(kw)


class Runner:
    """Where the runs go: a local process pool of ``workers`` (default), this process
    (``workers <= 1``), or Ray (``ray``: ``"local"`` starts a local instance with
    ``workers`` CPUs, anything else is the address of an existing cluster, e.g.
    ``"ray://head:10001"`` or ``"auto"``).  Every run has one torch thread, so the three
    give the same numbers (tested for the pool and Ray)."""

    def __init__(self, workers: int, smoke: bool, ray: str | None = None):
        self.smoke = smoke
        self.pool = self._remote = None
        if ray is not None:
            self._remote = _ray_task(ray, workers)
        elif workers > 1:
            self.pool = ProcessPoolExecutor(workers, initializer=_init)

    def _map(self, fn, configs: list[dict]) -> list[dict]:
        if self._remote is not None:
            import ray
            return ray.get([self._remote.remote(fn, c) for c in configs])
        return list((self.pool.map if self.pool else map)(fn, configs))

    def map(self, configs: list[dict]) -> list[dict]:
        if self.smoke:
            configs = [{**c, "epochs": 1} for c in configs]
        return self._map(_task, configs)


def add_ray_option(ap: argparse.ArgumentParser) -> None:
    """``--ray [ADDRESS]`` for an experiment script (see :class:`Runner`)."""
    ap.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                    help="run the grid on Ray: a local instance with --workers CPUs, or "
                         "the cluster at ADDRESS (needs the 'ray' extra)")


def experiment_parser(doc: str, smoke_help: str = "a tiny run for the test suite"
                      ) -> argparse.ArgumentParser:
    """The options of an experiment that writes one results page: ``--workers``,
    ``--ray [ADDRESS]``, ``--out`` (default docs/), ``--smoke``, ``--overwrite``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    add_ray_option(ap)
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    ap.add_argument("--smoke", action="store_true", help=smoke_help)
    ap.add_argument("--overwrite", action="store_true")
    return ap


def results_paths(a: argparse.Namespace, stem: str) -> tuple[Path, Path] | None:
    """``(stem.md, stem.json)`` under ``a.out``; None (and a message) when one exists and
    ``--overwrite`` was not given: results are never overwritten silently."""
    md, js = a.out / f"{stem}.md", a.out / f"{stem}.json"
    if not a.overwrite and (md.exists() or js.exists()):
        print(f"{md} or {js} exists: pass --overwrite to replace them", file=sys.stderr)
        return None
    return md, js


def train_epochs(opt, model, tensors, seed: int, epochs: int, batch: int):
    """Minibatch epochs of cross-entropy with a closure (any optimizer): the test accuracy
    after each epoch, the final training loss and the step times (s).  ``tensors``:
    ``(X, y, X_eval, y_eval)``; the minibatch order comes from ``seed``."""
    import torch
    import torch.nn.functional as F  # noqa: N812
    X, y, Xe, ye = tensors
    g = torch.Generator().manual_seed(seed)
    acc, times, loss = [], [], math.nan
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(X), generator=g).split(batch):
            def closure(idx=idx):
                opt.zero_grad()
                out = F.cross_entropy(model(X[idx]), y[idx])
                out.backward()
                return out
            t0 = time.perf_counter()
            opt.step(closure)
            times.append(time.perf_counter() - t0)
        model.eval()
        with torch.no_grad():
            acc.append(float((model(Xe).argmax(1) == ye).float().mean()))
            loss = float(F.cross_entropy(model(X), y))
    return acc, loss, times


def _ray_task(address: str, workers: int):
    """A Ray remote of :func:`_on_one_thread`, after connecting to (or starting) the
    cluster; the workers import this repository (the experiment modules and the
    packages) through ``PYTHONPATH`` on a local instance and through the uploaded
    working directory on a remote cluster."""
    try:
        import ray
    except ImportError:
        raise SystemExit("--ray needs Ray: pip install -e '.[ray]'") from None
    paths = [str(ROOT), str(ROOT / "experiments")]
    if address == "local":
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}
        ray.init(num_cpus=max(workers, 1), include_dashboard=False, log_to_driver=False,
                 runtime_env=env, ignore_reinit_error=True)
    else:
        env = {"working_dir": str(ROOT), "excludes": [".venv", ".git", "docs/img"],
               "env_vars": {"PYTHONPATH": os.pathsep.join([".", "experiments"])}}
        ray.init(address=address, runtime_env=env, log_to_driver=False,
                 ignore_reinit_error=True)
    return ray.remote(num_cpus=1)(_on_one_thread)


def _mean(rs, key="test_accuracy"):
    return statistics.fmean(r[key] for r in rs)


def _std(rs, key="test_accuracy"):
    return statistics.stdev(r[key] for r in rs) if len(rs) > 1 else 0.0


def select_lr(runner: Runner, dataset: str, seeds: int, smoke: bool,
              methods: tuple[str, ...] | None = None, epochs: int | None = None,
              grids: dict | None = None, **config) -> dict:
    """Best mean validation accuracy (ties: lower training loss) per method (default:
    Table 3's, and on digits the other DDPNOpt curvatures) on the grids ``grids``
    (default ``GRIDS``); ``config``: more ``RunConfig`` fields (model, batch_size)."""
    configs = []
    grids = GRIDS if grids is None else grids
    if methods is None:
        methods = METHODS + (SELECT_ONLY if dataset == "digits" else ())
    epochs = EPOCHS[dataset] if epochs is None else epochs
    for m in methods:
        grid = grids[m][:1] if smoke else grids[m]
        n = 1 if m == "vanilla-ddp" else seeds
        configs += [dict(dataset=dataset, optimizer=m, lr=lr, seed=100 + s, split="train",
                         epochs=epochs, **config) for lr in grid for s in range(n)]
    results = runner.map(configs)
    chosen, table = {}, []
    for m in methods:
        scores = []
        for lr in (grids[m][:1] if smoke else grids[m]):
            rs = [r for r in results if r["optimizer"] == m and r["lr"] == lr]
            scores.append((_mean(rs), -_mean(rs, "final_train_loss"), lr))
            table.append((m, lr, _mean(rs)))
        chosen[m] = max(scores)[2]
    return {"chosen": chosen, "grid": table}


def table3(runner: Runner, dataset: str, lrs: dict, seeds: int) -> list[dict]:
    configs = [dict(dataset=dataset, optimizer=m, lr=lrs[m], seed=s, epochs=EPOCHS[dataset])
               for m in METHODS for s in range(min(seeds, 3) if m == "vanilla-ddp" else seeds)]
    return runner.map(configs)


def ablation(runner: Runner, dataset: str, seeds: int, smoke: bool) -> list[dict]:
    configs = []
    for curv, grid in ABLATION.items():
        for lr in (grid[:2] if smoke else grid):
            for m in (curv, f"ddpnopt-{curv}"):
                configs += [dict(dataset=dataset, optimizer=m, lr=lr, seed=s,
                                 epochs=EPOCHS[dataset]) for s in range(seeds)]
    return runner.map(configs)


# ------------------------------------------------------------------ reporting
def _fmt_table3(dataset, results, lrs, paper, methods=METHODS):
    head = ("| method | lr (validation) | seeds | test accuracy % | std | final train loss "
            "| ms / step |")
    lines = [head + (" paper (DIGITS) |" if paper else ""),
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if paper else "")]
    for m in methods:
        rs = [r for r in results if r["optimizer"] == m]
        p = f" {paper[m]:.2f} |" if paper else ""
        lines.append(f"| {m} | {lrs[m]:g} | {len(rs)} | {100 * _mean(rs):.2f} | "
                     f"{100 * _std(rs):.2f} | {_mean(rs, 'final_train_loss'):.4f} | "
                     f"{1e3 * _mean(rs, 'time_per_step'):.2f} |{p}")
    return "\n".join(lines)


def _plot_curves(results, path, title):
    from nnbridge.train import plot_curves
    from nnbridge.training import RunResult

    rs = [RunResult(optimizer=r["optimizer"], seed=r["seed"], lr=r["lr"],
                    test_accuracy=r["test_accuracy"], final_train_loss=r["final_train_loss"],
                    time_per_step=r["time_per_step"], skipped_steps=r["skipped_steps"],
                    history=r["history"]) for r in results]
    return plot_curves(rs, path, title)


def _ablation_report(results, img: Path, smoke: bool):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    curvs = list(ABLATION)
    ncol = max(len(g) for g in ABLATION.values())
    diff = np.full((len(curvs), ncol), np.nan)
    rows = ["| curvature | lr | baseline acc % (std) | DDPNOpt acc % (std) | difference | "
            "std ratio DDPNOpt / baseline |", "|---|---:|---:|---:|---:|---:|"]
    for i, c in enumerate(curvs):
        for j, lr in enumerate(ABLATION[c][:2] if smoke else ABLATION[c]):
            b = [r for r in results if r["optimizer"] == c and r["lr"] == lr]
            d = [r for r in results if r["optimizer"] == f"ddpnopt-{c}" and r["lr"] == lr]
            diff[i, j] = 100 * (_mean(d) - _mean(b))
            ratio = f"{_std(d) / _std(b):.2f}" if _std(b) > 0 else "-"
            rows.append(f"| {c} | {lr:g} | {100 * _mean(b):.2f} ({100 * _std(b):.2f}) | "
                        f"{100 * _mean(d):.2f} ({100 * _std(d):.2f}) | {diff[i, j]:+.2f} | "
                        f"{ratio} |")
    fig, ax = plt.subplots(figsize=(7, 3.2))
    lim = max(1.0, float(np.nanmax(np.abs(diff))))
    im = ax.imshow(diff, cmap="RdBu", vmin=-lim, vmax=lim)
    for i, c in enumerate(curvs):
        for j, lr in enumerate(ABLATION[c]):
            if not np.isnan(diff[i, j]):
                ax.text(j, i, f"{diff[i, j]:+.1f}\nlr {lr:g}", ha="center", va="center",
                        fontsize=7)
    ax.set_yticks(range(len(curvs)), curvs)
    ax.set_xticks(range(ncol), [f"lr {k + 1}" for k in range(ncol)])
    ax.set_title("DDPNOpt - baseline, test accuracy [points] (blue: feedback helps)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(img, dpi=120)
    plt.close(fig)
    return "\n".join(rows), diff


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    add_ray_option(ap)
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    ap.add_argument("--smoke", action="store_true", help="1 epoch, 1-2 seeds, tiny grids")
    ap.add_argument("--skip-fig3", action="store_true")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace experiments.md / .json in --out (refused otherwise)")
    a = ap.parse_args(argv)
    paths = results_paths(a, "experiments")
    if paths is None:
        return 2
    seeds, sel_seeds = (2, 1) if a.smoke else (10, 3)
    img = a.out / "img"
    img.mkdir(parents=True, exist_ok=True)
    runner = Runner(a.workers, a.smoke, a.ray)
    t0 = time.perf_counter()
    raw: dict = {}
    sections = []
    for ds in ("wine",) if a.smoke else ("digits", "wine"):
        sel = select_lr(runner, ds, sel_seeds, a.smoke)
        res = table3(runner, ds, sel["chosen"], seeds)
        raw[ds] = {"selection": sel, "table3": [{k: v for k, v in r.items() if k != "history"}
                                                for r in res]}
        png = _plot_curves(res, img / f"table3_{ds}.png", f"{ds} MLP, test split")
        grid = "; ".join(f"{m} {lr:g}: {100 * acc:.1f}" for m, lr, acc in sel["grid"])
        sections.append(
            f"### {ds} ({EPOCHS[ds]} epochs, batch 32)\n\n"
            f"{_fmt_table3(ds, res, sel['chosen'], PAPER_DIGITS if ds == 'digits' else None)}"
            f"\n\nValidation accuracy of the grid (%): {grid}.\n\n"
            + ("Chosen, the default rates of DDPNOpt's other curvatures "
               "(`nnbridge.curvature`): " + ", ".join(
                   f"{m} {sel['chosen'][m]:g}" for m in SELECT_ONLY if m in sel["chosen"])
               + ".\n\n" if ds == "digits" else "")
            + f"![{ds} curves](img/{png.name})\n")
        print(f"{ds}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    abl_ds = "wine" if a.smoke else "digits"
    abl = ablation(runner, abl_ds, seeds, a.smoke)
    raw["ablation"] = [{k: v for k, v in r.items() if k != "history"} for r in abl]
    abl_table, diff = _ablation_report(abl, img / "ablation.png", a.smoke)
    print(f"ablation: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    fig3 = "(skipped)"
    if not a.skip_fig3:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_ddpnopt.py"), "--fig3"]
        if a.smoke:
            cmd.append("--quick")
        fig3 = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    minutes = (time.perf_counter() - t0) / 60
    paths[1].write_text(json.dumps(raw, indent=1))
    text = TEMPLATE.format(tables="\n".join(sections), ablation=abl_table,
                           fig3=fig3.strip(), minutes=minutes, workers=a.workers, abl_ds=abl_ds,
                           seeds=seeds, ncpu=os.cpu_count())
    paths[0].write_text(text)
    print(f"wrote {paths[0]} ({minutes:.1f} min)")
    return 0


TEMPLATE = """# Experiments: the DDPNOpt paper on the datasets we have

(The thesis' steepest-descent and DEQ experiments:
[experiments_steepest.md](experiments_steepest.md); the OCNOpt summary's three
experiments and the layer alignment: [experiments_ocnopt.md](experiments_ocnopt.md), read
in [ocnopt.md](ocnopt.md); Neural ODEs and a CNF: [experiments_ode.md](experiments_ode.md);
GT-DDP's Table 2: [experiments_gtddp.md](experiments_gtddp.md).)

Regenerated by `python experiments/ddpnopt_paper.py` ({minutes:.0f} min with {workers}
workers on a {ncpu}-CPU machine, float32, CPU).  Raw numbers: `experiments.json` beside
this file.
Data: scikit-learn's digits and wine with the fixed split of `nnbridge.data` (70 / 30,
the 70 split 80 / 20 for validation); networks: `nnbridge.models.default_model` (digits:
5 Linear layers, hidden 32, Tanh; wine: hidden 16, Tanh, sigmoid head, as App. A.3.1);
batch 32; cross-entropy.  DDPNOpt uses the adaptive-diagonal (Adam) curvature, the
paper's choice for feedforward networks, with its defaults (value_hessian="outer",
value_recursion="mean", value_psd=True, terminal_hessian="fisher": a sampled rank-one
Fisher at the loss, chosen in `docs/experiments_terminal.md`).

## Table 3 (mean over {seeds} seeds; vanilla DDP 3 seeds)

Each method's learning rate is chosen on the validation split from a grid inside the
paper's Table 4 range, then the method is trained with {seeds} seeds and evaluated on
the test split.

{tables}

## Feedback ablation (App. A.3.2, Fig. 4a), {abl_ds}

Baseline = torch.optim SGD / RMSprop / Adam and nnbridge.EKFAC, which are DDPNOpt with
the same curvature and `feedback=False` (equal to ~1e-12 over 20 steps, tested); every
other hyper-parameter is equal, so the difference is the feedback policy alone.  {seeds}
seeds per cell; "std ratio" < 1 means the feedback reduced the spread over seeds.

![ablation](img/ablation.png)

{ablation}

What these numbers say about the paper (where we disagree, and why we think so):
`docs/ddpnopt.md`, "Measured on digits".

## Fig. 3: time and memory per step against batch size

{fig3}
"""


if __name__ == "__main__":
    sys.exit(main())
