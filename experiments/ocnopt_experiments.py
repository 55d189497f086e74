"""The three experiments the OCNOpt summary proposes (papers/003, "First 3 experiments"),
on what runs here (digits; MNIST / CIFAR cannot be downloaded).

    python experiments/ocnopt_experiments.py [--workers 2] [--ray [ADDRESS]] [--out docs]
                                             [--only ablation,lr,wallclock] [--smoke]
                                             [--overwrite]

1. **Feedback ablation on a CNN** (``nnbridge.models.cnn`` on digits): each curvature's
   base optimizer (SGD, Adam, EKFAC: DDPNOpt with ``Q_ux = 0``, exactly, Prop. 2 / tested)
   against DDPNOpt with the same curvature and hyper-parameters, over ``ABLATION`` learning
   rates, ``SEEDS`` seeds, ``EPOCHS`` epochs: test accuracy, final training loss, and the
   training-loss curves.
2. **Learning-rate robustness on the ResNet** (``nnbridge.models.resnet``, BatchNorm,
   projection shortcut): SGD and Adam against GT-DDP with the same curvature over
   ``ROBUST`` rates reaching rates where the base optimizer fails; accuracy heat map.
3. **Wall-clock profile**: EKFAC against DDPNOpt(EKFAC) on the CNN: median time per step,
   peak-memory growth (RSS, a fresh process per optimizer, ``benchmarks/_child.py``), and
   the time to reach ``TARGET`` test accuracy (steps to the first epoch at the target
   times the median step time; evaluation excluded).
4. **Layer alignment** (OCNOpt Sec. VI-B) on the ResNet: GT-DDP(adam) with the
   projection shortcut a player at the merge, at the split, and chosen at every step by
   the EXP3++ bandit (``nnbridge.AlignmentBandit``): test accuracy, final training loss,
   how often the bandit chose each placement.

Writes ``experiments_ocnopt.md`` / ``.json`` and ``img/ocnopt_*.png`` (refuses to
overwrite them unless ``--overwrite``).  ``--smoke``: 1 epoch on 64 samples, 1 seed,
the first rates, SGD only in part 2 (the test suite).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import ddpnopt_paper as paper  # noqa: E402
import gtddp_table2  # noqa: E402

BASES = {"sgd": "ddpnopt-sgd", "adam": "ddpnopt-adam", "ekfac": "ddpnopt-ekfac"}
ABLATION = {"sgd": (0.1, 0.3, 1.0), "adam": (1e-3, 3e-3, 1e-2), "ekfac": (0.03, 0.1, 0.3)}
ROBUST = {"sgd": (0.03, 0.1, 0.3, 1.0, 3.0), "adam": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)}
EPOCHS = {"ablation": 8, "lr": 5, "wallclock": 10, "alignment": 5}
SEEDS = {"ablation": 4, "lr": 2, "wallclock": 4, "alignment": 3}
ALIGN_LR = 3e-3
ALIGNMENTS = ("merge", "split", "bandit")
WALL_LR = 0.1
#: batches of the memory measurement (at 32 the CNN's growth is below the RSS resolution)
MEMORY_BATCHES = (128, 512)
TARGET = 0.95
BATCH = 32


def _cfg(part, model, opt, lr, seed, smoke):
    return dict(dataset="digits", model=model, optimizer=opt, lr=lr, seed=seed,
                epochs=1 if smoke else EPOCHS[part], batch_size=BATCH)


def _cell(rs):
    acc = [r["test_accuracy"] for r in rs]
    bad = sum(1 for r in rs if r["skipped_steps"] or not r["final_train_loss"] < 1e3)
    return statistics.fmean(acc), statistics.stdev(acc) if len(acc) > 1 else 0.0, bad


# ------------------------------------------------------------------ 1. ablation
def ablation(runner, smoke):
    configs = []
    for base, ddp in BASES.items():
        for lr in ABLATION[base][:1] if smoke else ABLATION[base]:
            for s in range(1 if smoke else SEEDS["ablation"]):
                configs += [_cfg("ablation", "cnn", m, lr, s, smoke) for m in (base, ddp)]
    return runner.map(configs)


def _ablation_report(results, img):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = ["| curvature | lr | base: test acc % (std) | DDPNOpt: test acc % (std) | "
            "difference | base: final train loss | DDPNOpt: final train loss |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    fig, axes = plt.subplots(1, len(BASES), figsize=(4.2 * len(BASES), 3.3))
    for ax, (base, ddp) in zip(axes, BASES.items()):
        lrs = sorted({r["lr"] for r in results if r["optimizer"] == base})
        for lr in lrs:
            b = [r for r in results if r["optimizer"] == base and r["lr"] == lr]
            d = [r for r in results if r["optimizer"] == ddp and r["lr"] == lr]
            (mb, sb, _), (md_, sd, _) = _cell(b), _cell(d)
            lb, ld = paper._mean(b, "final_train_loss"), paper._mean(d, "final_train_loss")
            rows.append(f"| {base} | {lr:g} | {100 * mb:.2f} ({100 * sb:.2f}) | "
                        f"{100 * md_:.2f} ({100 * sd:.2f}) | {100 * (md_ - mb):+.2f} | "
                        f"{lb:.4f} | {ld:.4f} |")
        lr = lrs[len(lrs) // 2]
        for m, ls in ((base, "-"), (ddp, "--")):
            curves = np.array([r["history"]["train_loss"] for r in results
                               if r["optimizer"] == m and r["lr"] == lr])
            k = max(1, curves.shape[1] // 60)
            smooth = np.convolve(curves.mean(0), np.ones(k) / k, mode="valid")
            ax.plot(smooth, ls, label=f"{m} (lr {lr:g})")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (minibatch, smoothed)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img / "ocnopt_ablation.png", dpi=110)
    plt.close(fig)
    return "\n".join(rows)


# ------------------------------------------------------------------ 2. robustness
def robustness(runner, smoke):
    configs = []
    for base, grid in list(ROBUST.items())[:1] if smoke else ROBUST.items():
        for lr in grid[:1] if smoke else grid:
            for s in range(1 if smoke else SEEDS["lr"]):
                configs += [_cfg("lr", "resnet", m, lr, s, smoke)
                            for m in (base, f"gtddp-{base}")]
    return runner.map(configs)


def _robust_report(results, img):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = [m for b in ROBUST for m in (b, f"gtddp-{b}")
               if any(r["optimizer"] == m for r in results)]
    ncol = max(len(g) for g in ROBUST.values())
    acc = np.full((len(methods), ncol), np.nan)
    rows = ["| method | " + " | ".join(f"lr {k + 1}" for k in range(ncol)) + " |",
            "|---|" + "---:|" * ncol]
    for i, m in enumerate(methods):
        grid = ROBUST[m.removeprefix("gtddp-")]
        cells = []
        for j, lr in enumerate(grid):
            rs = [r for r in results if r["optimizer"] == m and r["lr"] == lr]
            if not rs:
                cells.append("-")
                continue
            mean, std, bad = _cell(rs)
            acc[i, j] = 100 * mean
            cells.append(f"lr {lr:g}: {100 * mean:.1f} ({100 * std:.1f})"
                         + (f", {bad} run(s) skipped steps" if bad else ""))
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    fig, ax = plt.subplots(figsize=(8, 3.2))
    im = ax.imshow(acc, cmap="viridis", vmin=0, vmax=100)
    for i, m in enumerate(methods):
        for j, lr in enumerate(ROBUST[m.removeprefix("gtddp-")]):
            if not np.isnan(acc[i, j]):
                ax.text(j, i, f"{acc[i, j]:.1f}\nlr {lr:g}", ha="center", va="center",
                        fontsize=7, color="w" if acc[i, j] < 60 else "k")
    ax.set_yticks(range(len(methods)), methods)
    ax.set_xticks(range(ncol), [f"lr {k + 1}" for k in range(ncol)])
    ax.set_title("ResNet on digits: test accuracy % (mean over seeds)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(img / "ocnopt_lr_robustness.png", dpi=110)
    plt.close(fig)
    return "\n".join(rows)


# ------------------------------------------------------------------ 4. alignment
def _align_task(kw: dict) -> dict:
    import torch

    import nnbridge
    from nnbridge import data
    from nnbridge.models import default_model
    from trajopt.errors import SkippedStepWarning
    paper._init()
    ds = data.load("digits")
    n = kw.get("subset")
    X, y = ds.X_train[:n].reshape(-1, *ds.image_shape), ds.y_train[:n]
    Xe, ye = ds.X_eval[:n].reshape(-1, *ds.image_shape), ds.y_eval[:n]
    torch.manual_seed(kw["seed"])
    model = default_model("resnet", ds)
    how = kw["alignment"]
    opt = (nnbridge.AlignmentBandit(model, ALIGN_LR, seed=kw["seed"]) if how == "bandit"
           else nnbridge.GTDDP(model, ALIGN_LR, alignment=how))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", SkippedStepWarning)
        acc, loss, times = paper.train_epochs(opt, model, (X, y, Xe, ye), kw["seed"],
                                              kw["epochs"], BATCH)
    skipped = sum(issubclass(w.category, SkippedStepWarning) for w in seen)
    out = {**kw, "test_accuracy": acc[-1], "curve": acc, "final_train_loss": loss,
           "time_per_step": statistics.median(times), "skipped_steps": skipped}
    if how == "bandit":
        out["pulls"] = opt.bandit.pulls.tolist()
    return out


def alignment(runner, smoke):
    extra = {"subset": 64} if smoke else {}
    return runner._map(_align_task, [
        dict(alignment=how, seed=s, epochs=1 if smoke else EPOCHS["alignment"], **extra)
        for how in ALIGNMENTS for s in range(1 if smoke else SEEDS["alignment"])])


def _align_report(results):
    rows = ["| shortcut placement | test acc % (std) | final train loss | ms / step | "
            "bandit's choices (merge / split) |", "|---|---:|---:|---:|---|"]
    for how in ALIGNMENTS:
        rs = [r for r in results if r["alignment"] == how]
        m, sd, _ = _cell(rs)
        pulls = ""
        if how == "bandit":
            tot = [sum(r["pulls"][k] for r in rs) for k in range(2)]
            pulls = f"{tot[0]:.0f} / {tot[1]:.0f}"
        rows.append(f"| {how} | {100 * m:.2f} ({100 * sd:.2f}) | "
                    f"{paper._mean(rs, 'final_train_loss'):.4f} | "
                    f"{1e3 * paper._mean(rs, 'time_per_step'):.0f} | {pulls} |")
    return "\n".join(rows)


# ------------------------------------------------------------------ 3. wall clock
def _child(cfg: dict) -> dict:
    """In a fresh process: ``steps`` steps of one optimizer on the CNN, digits batch; the
    median time and the peak-RSS growth (``benchmarks/_child.measure_steps``)."""
    import torch
    import torch.nn.functional as F  # noqa: N812
    from _child import measure_steps

    from nnbridge import data
    from nnbridge.models import default_model
    from nnbridge.training import make_optimizer
    torch.set_num_threads(1)
    ds = data.load("digits")
    B = cfg["batch"]
    X = torch.as_tensor(ds.X_train[:B]).float().reshape(-1, *ds.image_shape)
    y = torch.as_tensor(ds.y_train[:B]).long()
    torch.manual_seed(0)
    model = default_model("cnn", ds)
    opt = make_optimizer(cfg["optimizer"], model, WALL_LR)

    def step():
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(X), y)
            loss.backward()
            return loss
        return opt.step(closure)
    return measure_steps(step, cfg["steps"], 3)


def wallclock(runner, smoke):
    from _child import run_child
    runs = runner.map([_cfg("wallclock", "cnn", m, WALL_LR, s, smoke)
                       for m in ("ekfac", "ddpnopt-ekfac")
                       for s in range(1 if smoke else SEEDS["wallclock"])])
    mem = [{"optimizer": m, "batch": b, **run_child(__file__, {"optimizer": m, "batch": b,
                                                                "steps": 3 if smoke else 10})}
           for b in ((32,) if smoke else MEMORY_BATCHES) for m in ("ekfac", "ddpnopt-ekfac")]
    return {"runs": runs, "memory": mem}


def _wall_report(out):
    runs, mem = out["runs"], out["memory"]
    rows = ["| optimizer | ms / step (median over seeds) | test acc % | epochs to "
            f"{100 * TARGET:.0f} % | time to {100 * TARGET:.0f} % (s, steps x ms/step) |",
            "|---|---:|---:|---:|---:|"]
    for m in ("ekfac", "ddpnopt-ekfac"):
        rs = [r for r in runs if r["optimizer"] == m]
        ms = statistics.median(r["time_per_step"] for r in rs)
        hits = []
        for r in rs:
            h = r["history"]
            k = next((i for i, a in enumerate(h["test_accuracy"]) if a >= TARGET), None)
            hits.append(None if k is None else (k, h["epoch_step"][k] * r["time_per_step"]))
        reached = [x for x in hits if x is not None]
        ep = (f"{statistics.fmean(k for k, _ in reached):.1f} ({len(reached)}/{len(rs)})"
              if reached else f"not reached (0/{len(rs)})")
        tt = f"{statistics.fmean(t for _, t in reached):.1f}" if reached else "-"
        rows.append(f"| {m} | {1e3 * ms:.1f} | {100 * paper._mean(rs):.2f} | {ep} | {tt} |")
    mrows = ["| batch | EKFAC ms / step | DDPNOpt(EKFAC) ms / step | time ratio | EKFAC peak "
             "MB | DDPNOpt(EKFAC) peak MB | memory overhead |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for b in sorted({x["batch"] for x in mem}):
        e = next(x for x in mem if x["batch"] == b and x["optimizer"] == "ekfac")
        d = next(x for x in mem if x["batch"] == b and x["optimizer"] == "ddpnopt-ekfac")
        over = (f"{100 * (d['mem_mb'] / e['mem_mb'] - 1):+.0f} %" if e["mem_mb"] > 0
                else "-")
        mrows.append(f"| {b} | {1e3 * e['time']:.1f} | {1e3 * d['time']:.1f} | "
                     f"{d['time'] / e['time']:.2f}x | {e['mem_mb']:.1f} | {d['mem_mb']:.1f} "
                     f"| {over} |")
    return "\n".join(rows), "\n".join(mrows)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(_child(json.loads(sys.argv[2]))))
        return 0
    ap = paper.experiment_parser(__doc__)
    ap.add_argument("--only", default="ablation,lr,wallclock,alignment")
    a = ap.parse_args(argv)
    parts = [p.strip() for p in a.only.split(",") if p.strip()]
    unknown = set(parts) - {"ablation", "lr", "wallclock", "alignment"}
    if unknown:
        ap.error(f"--only: unknown part(s) {sorted(unknown)}")
    paths = paper.results_paths(a, "experiments_ocnopt")
    if paths is None:
        return 2
    md, js = paths
    img = a.out / "img"
    img.mkdir(parents=True, exist_ok=True)
    runner = gtddp_table2.Runner(a.workers, a.smoke, a.ray)   # smoke: 64 samples
    t0 = time.perf_counter()
    raw, text = {}, {}
    if "ablation" in parts:
        raw["ablation"] = ablation(runner, a.smoke)
        text["ablation"] = _ablation_report(raw["ablation"], img)
        print(f"ablation: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    if "lr" in parts:
        raw["lr"] = robustness(runner, a.smoke)
        text["lr"] = _robust_report(raw["lr"], img)
        print(f"lr: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    if "wallclock" in parts:
        raw["wallclock"] = wallclock(runner, a.smoke)
        text["wallclock"], text["memory"] = _wall_report(raw["wallclock"])
        print(f"wallclock: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    if "alignment" in parts:
        raw["alignment"] = alignment(runner, a.smoke)
        text["alignment"] = _align_report(raw["alignment"])
        print(f"alignment: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    for key, part in raw.items():
        if key == "alignment":
            continue
        for r in part if isinstance(part, list) else part["runs"]:
            r["history"] = {k: r["history"][k] for k in ("epoch_step", "test_accuracy")}
    minutes = (time.perf_counter() - t0) / 60
    js.write_text(json.dumps(raw, indent=1))
    md.write_text(_document(text, minutes, a))
    print(f"wrote {md} ({minutes:.1f} min)")
    return 0


def _document(text, minutes, a):
    out = [f"# The OCNOpt experiments{' (**smoke run**)' if a.smoke else ''}\n",
           f"Regenerated by `python experiments/ocnopt_experiments.py` ({minutes:.0f} min "
           f"with {a.workers} workers; float32, CPU, one torch thread per run, digits, "
           f"batch {BATCH}). The three experiments of the OCNOpt summary (papers/003); "
           "what we conclude from them is in `ocnopt.md`.\n"]
    if "ablation" in text:
        out.append(f"## 1. Feedback ablation on a CNN ({EPOCHS['ablation']} epochs, "
                   f"{SEEDS['ablation']} seeds)\n\nThe base optimizer is DDPNOpt with "
                   "`Q_ux = 0` (the same step, tested); DDPNOpt adds the feedback.\n\n"
                   + text["ablation"] + "\n\n![training loss](img/ocnopt_ablation.png)\n")
    if "lr" in text:
        out.append(f"## 2. Learning-rate robustness on the ResNet ({EPOCHS['lr']} epochs, "
                   f"{SEEDS['lr']} seeds)\n\nTest accuracy % (std over seeds).\n\n"
                   + text["lr"] + "\n\n![heat map](img/ocnopt_lr_robustness.png)\n")
    if "wallclock" in text:
        out.append(f"## 3. Wall clock: EKFAC against DDPNOpt(EKFAC) on the CNN (lr "
                   f"{WALL_LR:g}, {EPOCHS['wallclock']} epochs, {SEEDS['wallclock']} "
                   f"seeds)\n\n" + text["wallclock"] + "\n\nStep time and peak-memory "
                   "growth in a fresh process per optimizer (10 steps):\n\n"
                   + text["memory"] + "\n")
    if "alignment" in text:
        out.append(f"## 4. Layer alignment on the ResNet (GT-DDP(adam), lr {ALIGN_LR:g}, "
                   f"{EPOCHS['alignment']} epochs, {SEEDS['alignment']} seeds)\n\n"
                   "The projection shortcut (conv + BatchNorm) a player at the merge, at the "
                   "split, or chosen at every step by EXP3++ (`nnbridge.AlignmentBandit`, "
                   "which evaluates the loss again after each step).\n\n"
                   + text["alignment"] + "\n")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
