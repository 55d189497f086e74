"""GT-DDP's Table 2, DIGITS row, with a residual network: SGD, RMSprop, Adam, EKFAC against
GT-DDP with the same curvatures; optionally MNIST-1D with the same network.

    python experiments/gtddp_table2.py [--workers 2] [--out docs] [--mnist1d] [--smoke]

* network: ``nnbridge.models.resnet`` (stem, an identity BasicBlock, a stride-2 BasicBlock
  with a projection shortcut, BatchNorm, average pooling, Linear-ReLU-Linear;
  ``docs/training.md``), float32, CPU, cross-entropy;
* baselines: torch.optim SGD / RMSprop / Adam and EKFAC on the stage graph
  (``GTDDP(curvature="ekfac", feedback=False)``); GT-DDP: ``nnbridge.GTDDP`` with the same
  curvature (``value_hessian="outer"``, its defaults);
* learning rates: every method its own, chosen on the validation split by
  ``ddpnopt_paper.select_lr`` (best mean validation accuracy) from the same grid for a
  baseline and its GT-DDP variant (``GRIDS``): baselines 2 seeds, GT-DDP 1 seed (it costs
  ~20x a step), ``SETUP[dataset]["select_epochs"]`` epochs;
* test: ``SETUP[dataset]["seeds"]`` seeds (digits 6, MNIST-1D 5) on the test split;
* the size of the feedback: one step with and without it from the same state (after
  30 steps of the base optimizer at the chosen rate), per layer, on the ResNet and on
  the same ResNet without its BatchNorm layers;
* ``--mnist1d``: also MNIST-1D (sgd, adam, ekfac and their GT-DDP variants); without it
  the doc says so and gives the measured time per step there.

Writes ``experiments_gtddp.md`` / ``.json`` and ``img/gtddp_<dataset>.png``.  ``--smoke``:
1 epoch on 64 samples, 1 seed, the first grid value (the test suite, a few seconds).
``--report-only``: the doc again from the ``.json`` (the feedback sizes measured again,
with and without BatchNorm; seconds).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import ddpnopt_paper as paper  # noqa: E402

#: GT-DDP paper, Table 2, DIGITS: validation accuracy % and training loss, 6 seeds
PAPER_ACC = {"sgd": 96.09, "rmsprop": 95.61, "adam": 95.81, "ekfac": 95.31,
             "gtddp-sgd": 96.10, "gtddp-rmsprop": 95.92, "gtddp-adam": 95.84,
             "gtddp-ekfac": 95.55}
PAPER_LOSS = {"sgd": 0.0053, "rmsprop": 0.0247, "adam": 0.0182, "ekfac": 0.0514,
              "gtddp-sgd": 0.0050, "gtddp-rmsprop": 0.0124, "gtddp-adam": 0.0081,
              "gtddp-ekfac": 0.0514}
_BASE_GRIDS = {"sgd": (0.03, 0.1, 0.3), "rmsprop": (7e-4, 2e-3, 5e-3),
               "adam": (7e-4, 2e-3, 5e-3), "ekfac": (0.01, 0.03, 0.1)}
GRIDS = {**_BASE_GRIDS, **{f"gtddp-{k}": v for k, v in _BASE_GRIDS.items()}}
CURV = {"sgd": "identity", "rmsprop": "rmsprop", "adam": "adam", "ekfac": "ekfac"}
#: batch 32 on digits, not the paper's 8: a GT-DDP step costs ~0.2 s at either size
#: (measured: 170 ms at 8, 200 ms at 32), so an epoch is 4x cheaper at 32 (docs)
SETUP = {"digits": dict(bases=("sgd", "rmsprop", "adam", "ekfac"), batch_size=32,
                        epochs=10, select_epochs=5, seeds=6),
         "mnist1d": dict(bases=("sgd", "adam", "ekfac"), batch_size=128, epochs=10,
                         select_epochs=5, seeds=5)}
SMOKE_SAMPLES = 64


def _task(kw: dict) -> dict:
    """``ddpnopt_paper._task`` on the first ``subset`` samples when given (smoke)."""
    import dataclasses

    from nnbridge.training import RunConfig, run
    kw = dict(kw)
    n = kw.pop("subset", None)
    cfg = RunConfig(**kw)
    ds = paper._dataset(cfg.dataset, cfg.split)
    if n is not None:
        ds = dataclasses.replace(ds, X_train=ds.X_train[:n], y_train=ds.y_train[:n],
                                 X_eval=ds.X_eval[:n], y_eval=ds.y_eval[:n])
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "GTDDP: the parameters", UserWarning)
        r = run(cfg, ds)
    return {**r.summary(), "dataset": cfg.dataset, "split": cfg.split,
            "wall": time.perf_counter() - t0,
            "history": {k: r.history[k] for k in ("step", "train_loss", "epoch_step",
                                                   "test_accuracy")}}


class Runner(paper.Runner):
    """The experiment's process pool; ``smoke``: 1 epoch on ``SMOKE_SAMPLES`` samples."""

    def map(self, configs: list[dict]) -> list[dict]:
        if self.smoke:
            configs = [{**c, "epochs": 1, "subset": SMOKE_SAMPLES} for c in configs]
        return self._map(_task, configs)


def _without_batchnorm(module) -> None:
    """Every BatchNorm of ``module`` replaced by the identity, in place."""
    from torch import nn
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            _without_batchnorm(child)


def feedback_size(dataset: str, method: str, lr: float, batch: int, steps: int = 30,
                  seed: int = 0, batchnorm: bool = True,
                  terminal_hessian: str | None = None) -> dict:
    """Norm of the feedback part of one GT-DDP step over the norm of its open-loop part,
    per layer (from the same state, reached by ``steps`` steps without feedback);
    ``batchnorm=False``: the same ResNet with its BatchNorm layers removed."""
    import torch

    import nnbridge
    from nnbridge import data
    from nnbridge.models import default_model
    torch.manual_seed(seed)
    ds = data.load(dataset, "train")
    X, y = ds.X_train.reshape(-1, *ds.image_shape), ds.y_train
    model = default_model("resnet", ds)
    if not batchnorm:
        _without_batchnorm(model)
    curv = CURV[method]
    g = torch.Generator().manual_seed(seed)

    def closure(m, o, idx):
        def c():
            o.zero_grad()
            loss = torch.nn.functional.cross_entropy(m(X[idx]), y[idx])
            loss.backward()
            return loss
        return c

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "GTDDP: the parameters", UserWarning)
        ref = nnbridge.GTDDP(model, lr=lr, curvature=curv, feedback=False,
                             terminal_hessian=terminal_hessian)
        for _ in range(steps):
            ref.step(closure(model, ref, torch.randint(0, len(X), (batch,), generator=g)))
        idx = torch.randint(0, len(X), (batch,), generator=g)
        delta = {}
        for fb in (False, True):
            m = copy.deepcopy(model)
            o = nnbridge.GTDDP(m, lr=lr, curvature=curv, feedback=fb,
                               terminal_hessian=terminal_hessian)
            o.load_state_dict(ref.state_dict())
            o.param_groups[0]["feedback"] = fb    # the state dict holds feedback=False
            before = [p.detach().clone() for p in m.parameters()]
            o.step(closure(m, o, idx))
            delta[fb] = [p.detach() - b for p, b in zip(m.parameters(), before)]
    layers = []
    for (name, p), a, b in zip(model.named_parameters(), delta[False], delta[True]):
        if p.dim() > 1:   # the stages' weights (BN has no DDP model: equal in both)
            layers.append((name, float((b - a).norm() / a.norm())))
    return {"method": f"gtddp-{method}", "lr": lr, "batchnorm": batchnorm, "layers": layers}


def step_time(dataset: str, method: str, batch: int, steps: int = 5,
              terminal_hessian: str | None = None) -> float:
    """Median seconds of one step on the ResNet (random batch of the training data)."""
    import torch

    from nnbridge import data
    from nnbridge.models import default_model
    from nnbridge.training import default_lr, make_optimizer, parse_optimizer
    torch.manual_seed(0)
    ds = data.load(dataset, "train")
    X, y = ds.X_train.reshape(-1, *ds.image_shape)[:batch], ds.y_train[:batch]
    model = default_model("resnet", ds)
    label = parse_optimizer(method)[0]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "GTDDP: the parameters", UserWarning)
        opt = make_optimizer(label, model, default_lr(label),
                             terminal_hessian=terminal_hessian)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X), y)
        loss.backward()
        return loss

    times = []
    for k in range(steps + 2):
        t0 = time.perf_counter()
        opt.step(closure)
        if k >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_dataset(runner: Runner, dataset: str, smoke: bool, paper_rates: bool = False,
                terminal_hessian: str | None = None) -> dict:
    s = SETUP[dataset]
    bases = s["bases"]
    methods = bases + tuple(f"gtddp-{b}" for b in bases)
    extra = dict(model="resnet", batch_size=s["batch_size"],
                 terminal_hessian=terminal_hessian)
    t0 = time.perf_counter()
    sel_b = paper.select_lr(runner, dataset, 1 if smoke else 2, smoke, methods=bases,
                            epochs=s["select_epochs"], grids=GRIDS, **extra)
    if paper_rates:   # the paper's protocol: GT-DDP at its baseline's rate
        sel_g = {"chosen": {f"gtddp-{b}": sel_b["chosen"][b] for b in bases}, "grid": []}
    else:
        sel_g = paper.select_lr(runner, dataset, 1, smoke, methods=methods[len(bases):],
                                epochs=s["select_epochs"], grids=GRIDS, **extra)
    chosen = {**sel_b["chosen"], **sel_g["chosen"]}
    t1 = time.perf_counter()
    test = runner.map([dict(dataset=dataset, optimizer=m, lr=chosen[m], seed=k,
                            epochs=s["epochs"], **extra)
                       for m in methods for k in range(1 if smoke else s["seeds"])])
    t2 = time.perf_counter()
    fb = [feedback_size(dataset, b, chosen[f"gtddp-{b}"], s["batch_size"],
                        steps=2 if smoke else 30, batchnorm=bn,
                        terminal_hessian=terminal_hessian)
          for bn in (True, False) for b in bases]
    return {"dataset": dataset, "setup": {**s, "bases": list(bases)}, "chosen": chosen,
            "grid": sel_b["grid"] + sel_g["grid"], "test": test, "feedback": fb,
            "terminal_hessian": terminal_hessian,
            "minutes": {"selection": (t1 - t0) / 60, "test": (t2 - t1) / 60}}


# ------------------------------------------------------------------ reporting
def _acc(rs):
    return [100 * r["test_accuracy"] for r in rs]


def _ms(v):
    return (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0)


def _table(res: dict, paper_cols: bool) -> str:
    head = ("| method | lr | seeds | test accuracy % (mean ± std) | final train loss | "
            "ms / step |")
    sep = "|---|---:|---:|---:|---:|---:|"
    if paper_cols:
        head += " paper accuracy % | paper train loss |"
        sep += "---:|---:|"
    lines = [head, sep]
    bases = res["setup"]["bases"]
    for m in list(bases) + [f"gtddp-{b}" for b in bases]:
        rs = [r for r in res["test"] if r["optimizer"] == m]
        a, sa = _ms(_acc(rs))
        loss = [r["final_train_loss"] for r in rs]  # null in the json: a diverged run
        lm = statistics.fmean(loss) if all(v is not None and math.isfinite(v)
                                           for v in loss) else float("nan")
        t = 1e3 * statistics.fmean(r["time_per_step"] for r in rs)
        row = (f"| {m} | {res['chosen'][m]:g} | {len(rs)} | {a:.2f} ± {sa:.2f} | "
               f"{lm:.4f} | {t:.1f} |")
        if paper_cols:
            row += f" {PAPER_ACC[m]:.2f} | {PAPER_LOSS[m]:.4f} |"
        lines.append(row)
    return "\n".join(lines)


def _pairs(res: dict, paper_cols: bool) -> tuple[str, list[str]]:
    lines = ["| curvature | GT-DDP - baseline, ours (points) | one std of the difference "
             "| std ratio GT-DDP / baseline |" + (" paper (points) |" if paper_cols else ""),
             "|---|---:|---:|---:|" + ("---:|" if paper_cols else "")]
    verdicts = []
    for b in res["setup"]["bases"]:
        ab = _acc([r for r in res["test"] if r["optimizer"] == b])
        ag = _acc([r for r in res["test"] if r["optimizer"] == f"gtddp-{b}"])
        (mb, sb), (mg, sg) = _ms(ab), _ms(ag)
        d = mg - mb
        se = math.sqrt((sb ** 2) / len(ab) + (sg ** 2) / len(ag))
        ratio = f"{sg / sb:.2f}" if sb > 0 else "-"
        row = f"| {b} | {d:+.2f} | {se:.2f} | {ratio} |"
        if paper_cols:
            pd = PAPER_ACC[f"gtddp-{b}"] - PAPER_ACC[b]
            row += f" {pd:+.2f} |"
        lines.append(row)
        if abs(d) <= 2 * se:
            what = "no significant difference (within 2 standard errors)"
        elif d > 0:
            what = "GT-DDP better"
        else:
            what = "GT-DDP worse"
        verdicts.append(f"{b}: {d:+.2f} points, {what}")
    return "\n".join(lines), verdicts


def _feedback_table(res: dict) -> str:
    fbs = res["feedback"]
    names = [n for n, _ in fbs[0]["layers"]]
    lines = ["| layer | " + " | ".join(
                f"{f['method']} (lr {f['lr']:g}){'' if f['batchnorm'] else ', no BN'}"
                for f in fbs) + " |",
             "|---|" + "---:|" * len(fbs)]
    for k, n in enumerate(names):
        lines.append(f"| {n} | " + " | ".join(f"{f['layers'][k][1]:.2g}" for f in fbs)
                     + " |")
    return "\n".join(lines)


def _grid(res: dict) -> str:
    return "; ".join(f"{m} {lr:g}: {100 * acc:.1f}" for m, lr, acc in res["grid"])


def _section(res: dict, smoke: bool) -> tuple[str, list[str]]:
    ds, s = res["dataset"], res["setup"]
    digits = ds == "digits"
    pairs, verdicts = _pairs(res, digits)
    epochs = 1 if smoke else s["epochs"]
    text = "\n".join([
        f"## {ds} ({epochs} epochs, batch {s['batch_size']}, "
        f"{1 if smoke else s['seeds']} seeds)", "",
        _table(res, digits), "",
        "GT-DDP minus its baseline, mean test accuracy (the std of the difference of the "
        "means is sqrt(s_b^2 / n + s_g^2 / n)):", "", pairs, "",
        f"![{ds} curves](img/gtddp_{ds}.png)", "",
        "Size of the feedback: norm of the feedback part of a step over the norm of its "
        "open-loop part, per layer (one step from the same state after 30 steps without "
        "feedback, each method at its chosen rate; \"no BN\": the same ResNet with its "
        "BatchNorm layers removed, `feedback_size(..., batchnorm=False)`):", "",
        _feedback_table(res), "",
        f"Learning-rate selection on the validation split, mean validation accuracy % "
        f"({s['select_epochs'] if not smoke else 1} epochs; baselines 2 seeds, GT-DDP 1): "
        f"{_grid(res)}.", "",
        f"Wall clock: selection {res['minutes']['selection']:.1f} min, test "
        f"{res['minutes']['test']:.1f} min.", ""])
    return text, verdicts


def _mnist1d_not_run(raw: dict) -> str:
    nr = raw["mnist1d_not_run"]
    times = nr["time_per_step"]
    per_epoch = math.ceil(4000 / nr["batch_size"])
    hours = per_epoch * nr["epochs"] * times["gtddp-adam"] * len(nr["bases"]) * nr["seeds"]
    return "\n".join([
        "## MNIST-1D: not run", "",
        f"Run `python experiments/gtddp_table2.py --mnist1d` for it.  Measured here (one "
        f"process, batch {nr['batch_size']}, the MNIST-1D ResNet): a GT-DDP-Adam step takes "
        f"{1e3 * times['gtddp-adam']:.0f} ms, an Adam step {1e3 * times['adam']:.1f} ms; "
        f"the test runs alone ({len(nr['bases'])} GT-DDP methods x {nr['seeds']} seeds x "
        f"{nr['epochs']} epochs x {per_epoch} steps) would take ~{hours / 3600:.1f} CPU "
        f"hours for GT-DDP (~{hours / 60 / 2:.0f} min on 2 cores, the selection runs "
        f"not counted) after the digits runs had taken {raw['minutes']:.0f} min: more "
        f"than this run's budget.", ""])


#: the same protocol with the sampled Fisher terminal Hessian (GTDDP's default before
#: 2026-11-26), kept beside the report for the comparison
FISHER_RUN = "experiments_gtddp_fisher.json"


def _terminal_history(raw: dict, out: Path, terminal: str) -> str:
    """The table of this run against the sampled-Fisher run (``FISHER_RUN``), if any."""
    path = out / FISHER_RUN
    if terminal == "fisher" or not path.exists() or "digits" not in raw:
        return ""
    old = json.loads(path.read_text())["digits"]
    new = raw["digits"]
    if old.get("chosen") != new.get("chosen"):  # another protocol: nothing to compare
        return ("## The terminal Hessian\n\nThe sampled-Fisher run kept beside this report "
                f"(`{FISHER_RUN}`) chose other rates (and, before 2026-11-28, evaluated with "
                "BatchNorm's batch statistics), so it is not compared here.\n")

    def acc(res, m):
        v = _acc([r for r in res["test"] if r["optimizer"] == m])
        return "-" if not v else "{:.2f} ± {:.2f}".format(*_ms(v))
    rows = [f"| {m} | {acc(new, m)} | {acc(old, m)} |"
            for m in ("gtddp-sgd", "gtddp-rmsprop", "gtddp-adam", "gtddp-ekfac")]
    return "\n".join([
        "## The terminal Hessian: why GTDDP's default is the exact GGN", "",
        f"The same protocol on digits (6 seeds, the same rates and seeds) with GTDDP's "
        f"earlier default, the sampled rank-one Fisher (`{FISHER_RUN}`), and with "
        f'"{terminal}" (this run), test accuracy %:', "",
        f'| method | "{terminal}" | "fisher" |', "|---|---:|---:|", *rows, "",
        "The sampled Fisher is an unbiased rank-one estimate of the GGN; on this "
        "BatchNorm ResNet its noise made whole runs collapse, so GTDDP now defaults to "
        "the exact factor (rank 9 here, classes - 1: ~1.7x the step time of the rank-one form).  "
        "DDPNOpt keeps the Fisher in its factored form, where it was measured as stable "
        "on MLPs (`docs/ddpnopt.md`).", ""])


def write_report(raw: dict, out: Path, workers: int, smoke: bool) -> str:
    """``experiments_gtddp.md`` from the raw numbers (``experiments_gtddp.json``)."""
    sections, verdicts = [], {}
    for ds in ("digits", "mnist1d"):
        if ds in raw:
            text, verdicts[ds] = _section(raw[ds], smoke)
            sections.append(text)
    if "mnist1d_not_run" in raw:
        sections.append(_mnist1d_not_run(raw))
    summary = "\n".join(f"- {ds}: " + "; ".join(v) for ds, v in verdicts.items())
    summary += "\n\nSize of the feedback against the open-loop part of the step (median "
    summary += "and largest over the layers; the paper, Sec. 5: the feedback updates are "
    summary += "\"typically order of magnitude smaller than the open gain\"):\n\n"
    summary += "\n".join(
        f"- {ds} {f['method']}{'' if f['batchnorm'] else ' (no BN)'}: median "
        f"{statistics.median(v for _, v in f['layers']):.2g}"
        f", largest {max(v for _, v in f['layers']):.2g} "
        f"({max(f['layers'], key=lambda nv: nv[1])[0]})"
        for ds, r in raw.items() if isinstance(r, dict) and "feedback" in r
        for f in r["feedback"])
    paper_rates = any(isinstance(r, dict) and r.get("paper_rates") for r in raw.values())
    rates = ("GT-DDP at its baseline's rate, chosen on the validation split (the paper's "
             "protocol, `--paper-rates`);" if paper_rates else
             "the paper keeps each baseline's rate for its GT-DDP variant, we select each "
             "method's rate on the validation split from the same grid;")
    terminal = next((r.get("terminal_hessian") for r in raw.values()
                     if isinstance(r, dict) and "test" in r), None) or "ggn"
    text = TEMPLATE.format(sections="\n".join(sections), minutes=raw["minutes"],
                           workers=workers, summary=summary, rates=rates,
                           terminal=f'the terminal Hessian "{terminal}" (GTDDP\'s default '
                                    'is "ggn", the exact Gauss-Newton matrix)',
                           terminal_history=_terminal_history(raw, out, terminal),
                           smoke="**Smoke run: 1 epoch on 64 samples, 1 seed; the numbers "
                                 "mean nothing.**\n\n" if smoke else "")
    (out / "experiments_gtddp.md").write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    paper.add_ray_option(ap)
    ap.add_argument("--out", type=Path, default=HERE.parent / "docs")
    ap.add_argument("--mnist1d", action="store_true", help="also MNIST-1D (sgd, adam, "
                    "ekfac and their GT-DDP variants, 5 seeds)")
    ap.add_argument("--smoke", action="store_true", help="1 epoch, 64 samples, 1 seed")
    ap.add_argument("--paper-rates", action="store_true",
                    help="GT-DDP at its baseline's chosen rate (the paper's protocol) "
                         "instead of its own selection")
    ap.add_argument("--terminal-hessian", choices=("ggn", "fisher", "empirical"),
                    default=None, help="GT-DDP's terminal Hessian (default: GTDDP's own)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite experiments_gtddp.md from experiments_gtddp.json, "
                         "measuring the feedback sizes again (seconds; no training runs)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace experiments_gtddp.md / .json in --out")
    a = ap.parse_args(argv)
    # --report-only rewrites the page from its own raw numbers, which must exist
    if not a.report_only and paper.results_paths(a, "experiments_gtddp") is None:
        return 2  # a training run never replaces results silently
    paper._init()      # one torch thread here too (the pool's workers have one each)
    from nnbridge.train import _finite_or_none  # a diverged run's loss: null
    if a.report_only:
        raw = json.loads((a.out / "experiments_gtddp.json").read_text())
        for ds in ("digits", "mnist1d"):
            if ds in raw:
                s, res = SETUP[ds], raw[ds]
                res["feedback"] = [feedback_size(ds, b, res["chosen"][f"gtddp-{b}"],
                                                 s["batch_size"], batchnorm=bn,
                                                 terminal_hessian=res.get("terminal_hessian"))
                                   for bn in (True, False) for b in s["bases"]]
    else:
        (a.out / "img").mkdir(parents=True, exist_ok=True)
        runner = Runner(a.workers, a.smoke, a.ray)
        t0 = time.perf_counter()
        raw = {}
        for ds in ("digits", "mnist1d") if a.mnist1d else ("digits",):
            res = run_dataset(runner, ds, a.smoke, a.paper_rates, a.terminal_hessian)
            res["paper_rates"] = a.paper_rates
            s = res["setup"]
            paper._plot_curves(res["test"], a.out / "img" / f"gtddp_{ds}.png",
                               f"{ds}, ResNet, batch {s['batch_size']}, test split")
            raw[ds] = {**res, "test": [{k: v for k, v in r.items() if k != "history"}
                                       for r in res["test"]]}
            print(f"{ds}: done ({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
        raw["minutes"] = (time.perf_counter() - t0) / 60
        if not a.mnist1d:
            s = SETUP["mnist1d"]
            times = {m: step_time("mnist1d", m, s["batch_size"], 2 if a.smoke else 5,
                                  a.terminal_hessian)
                     for m in ("adam", "gtddp-adam")}
            raw["mnist1d_not_run"] = {"time_per_step": times, **s,
                                      "bases": list(s["bases"])}
    (a.out / "experiments_gtddp.json").write_text(json.dumps(_finite_or_none(raw), indent=1,
                                                             allow_nan=False))
    print(write_report(raw, a.out, a.workers, a.smoke))
    return 0


TEMPLATE = """# GT-DDP's Table 2 on DIGITS (and MNIST-1D) with a residual network

{smoke}Regenerated by `python experiments/gtddp_table2.py` ({minutes:.0f} min with {workers}
workers, float32, CPU; the module docstring has the protocol).  Raw numbers:
`experiments_gtddp.json` beside this file.

Setup.  Network: `nnbridge.models.resnet` (`docs/training.md`: stem conv + BN, an
identity BasicBlock, a stride-2 BasicBlock with a 1x1-conv + BN projection shortcut,
average pooling, Linear-ReLU-Linear; the paper uses 1 residual block on DIGITS, we use 2
so that both kinds of shortcut are there).  Baselines: torch.optim SGD / RMSprop / Adam,
`nnbridge.EKFAC` (one Kronecker pair per layer); GT-DDP: `nnbridge.GTDDP` with the same
curvature and its defaults (block-diagonal per-sample value in the factored "outer"
form, Prop. 6) and {terminal}; BatchNorm affine parameters are stages and
BatchNorm's batch-coupled dynamics are used in the DDP pass (`docs/ddpnopt.md`);
GT-DDP-EKFAC couples the projection shortcut with the block's last layer (Theorem 3,
`docs/gtekfac.md`).

Differences from the paper's protocol: batch 32 on digits, not 8 (a GT-DDP step costs
about the same at both sizes, ~0.2 s on this CPU, so an epoch is 4x cheaper at 32); 10
epochs (the paper does not state its epochs); {rates} test accuracy on our fixed 30 %
test split (the paper reports "validation accuracy"); the paper's numbers are from a GPU
implementation with 6 seeds.

Times per step are medians within runs that shared the machine with a second worker.

{sections}

## Agreement with the paper

The paper reports GT-DDP equal to or better than every baseline on DIGITS, by +0.01 to
+0.31 points of accuracy and lower or equal training loss.  Ours (difference of the mean
test accuracy over the seeds):

{summary}

Reading the feedback table: compare the columns with and without BatchNorm.  The paper
(Sec. 5) says the feedback is typically an order of magnitude smaller than the open-loop
update; ours is that small for SGD and EKFAC without BatchNorm, not with it, and not for
the adaptive curvatures (RMSprop, Adam: Adam's P^-1 = lr / sqrt(v) amplifies the
feedback wherever a coordinate's second moment is small).  `docs/ddpnopt.md` has the
measured history: with BatchNorm's statistics held fixed in the DDP pass (our first
model) GT-DDP trailed every baseline by 18-64 points; with the batch-coupled dynamics
the gap shrank, and the exact Gauss-Newton terminal Hessian shrank it further (below).
With BatchNorm in training mode the per-sample (block-diagonal) value itself loses a
fifth to three quarters of the exact batch-augmented feedback (`docs/experiments_fig4.md`,
GT-DDP's Fig. 4 re-measured), a candidate cause of the remaining gap that this table
does not isolate.  Not varied yet: tikhonov beyond one value (1.0 broke GT-DDP-Adam in a
3-epoch check), the batch size (the paper's 8), smaller rates for GT-DDP.

{terminal_history}"""


if __name__ == "__main__":
    raise SystemExit(main())
