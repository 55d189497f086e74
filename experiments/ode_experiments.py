"""Neural ODEs trained as optimal control (OCNOpt's proposal): GT-DDP against its base
optimizer on an ODE-block classifier and on a continuous normalizing flow.

    python experiments/ode_experiments.py [--workers 2] [--ray [ADDRESS]] [--out docs]
                                          [--smoke] [--overwrite]

1. **ODE-block classifier** (``nnbridge.models.odenet``: Linear -> Tanh -> one RK4 block
   of 4 steps of ``f(t, x) = W_2 tanh(W_1 [x; t] + b_1) + b_2`` -> Linear) on digits and
   MNIST-1D: SGD and Adam against GT-DDP with the same curvature (``gtddp-sgd``,
   ``gtddp-adam``; the block is one stage whose two players share their parameters over
   the 16 calls, ``docs/ode.md``).  Learning rates chosen on the validation split (2
   seeds, ``SELECT_EPOCHS``) from ``GRIDS``, then ``SEEDS`` seeds on the test split.
2. **Continuous normalizing flow on two moons** (scikit-learn's ``make_moons``, 0.05
   noise, standardized): three ODE blocks on ``[0, 1/3], [1/3, 2/3], [2/3, 1]`` (RK4, 4
   steps each) of an exact-trace field ``dz_i/dt = a_i(z_j, t) z_i + b_i(z_j, t)``
   (``j != i``; two conditioner MLPs per block, the log-density change
   ``d l/dt = a_1 + a_2`` exact), loss the negative log-likelihood under a standard
   normal base.  GT-DDP gets the exact terminal Hessian of the NLL (``diag(1, 1, 0)``).
   Learning rates chosen on a validation sample (1 seed), then ``CNF_SEEDS`` seeds; test
   NLL in nats.

Writes ``experiments_ode.md`` / ``.json``, ``img/ode_curves.png`` and
``img/cnf_moons.png`` (refuses to overwrite them unless ``--overwrite``).  ``--smoke``:
1 epoch, 1 seed, the first grid value, 256 samples (the test suite).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
import ddpnopt_paper as paper  # noqa: E402

METHODS = ("sgd", "gtddp-sgd", "adam", "gtddp-adam")
GRIDS = {"sgd": (0.1, 0.3, 1.0), "adam": (2e-3, 5e-3, 1e-2)}
GRIDS.update({f"gtddp-{k}": v for k, v in list(GRIDS.items())})
SETUP = {"digits": dict(batch_size=32, epochs=15), "mnist1d": dict(batch_size=128, epochs=15)}
SELECT_EPOCHS = 6
SEEDS = 4
CNF_GRID = (3e-3, 1e-2)
CNF_EPOCHS = 20
CNF_SEEDS = 3
CNF_BATCH = 256


# ------------------------------------------------------------------ the flow
def _cnf(blocks: int = 3, hidden: int = 32, steps: int = 4):
    import torch
    from torch import nn

    import nnbridge

    class Conditioner(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(2, hidden), nn.Linear(hidden, 2)
            nn.init.zeros_(self.l2.weight)     # start at the identity flow
            nn.init.zeros_(self.l2.bias)

        def forward(self, u):
            return self.l2(torch.tanh(self.l1(u)))

    class HollowField(nn.Module):
        """[a_1 z_1 + b_1, a_2 z_2 + b_2, a_1 + a_2], (a_i, b_i) from (z_j, t)."""

        def __init__(self):
            super().__init__()
            self.c1, self.c2 = Conditioner(), Conditioner()

        def forward(self, t, s):
            z1, z2 = s[:, :1], s[:, 1:2]
            tt = t.expand(s.shape[0], 1)
            p1 = self.c1(torch.cat([z2, tt], 1))
            p2 = self.c2(torch.cat([z1, tt], 1))
            a1, b1, a2, b2 = p1[:, :1], p1[:, 1:], p2[:, :1], p2[:, 1:]
            return torch.cat([a1 * z1 + b1, a2 * z2 + b2, a1 + a2], 1)

    class CNF(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([
                nnbridge.ODEBlock(HollowField(), k / blocks, (k + 1) / blocks, steps=steps)
                for k in range(blocks)])

        def forward(self, x):
            s = torch.cat([x, x.new_zeros(x.shape[0], 1)], 1)
            for b in self.blocks:
                s = b(s)
            return s           # [z(1), log-density change]

    return CNF()


def nll(out):
    """Per-sample negative log-likelihood (nats) of the data mapped to ``out``."""
    return 0.5 * (out[:, :2] ** 2).sum(1) + math.log(2 * math.pi) - out[:, 2]


def nll_hessian(out):
    """The exact Hessian of :func:`nll` in the output, as a factor ``Z Z'``: diag(1, 1, 0)."""
    Z = out.new_zeros(out.shape[0], 3, 2)
    Z[:, 0, 0] = Z[:, 1, 1] = 1.0
    return Z


def _moons(n: int, seed: int):
    import numpy as np
    import torch
    from sklearn.datasets import make_moons
    X, _ = make_moons(n, noise=0.05, random_state=seed)
    ref, _ = make_moons(4096, noise=0.05, random_state=0)     # the training statistics
    X = (X - ref.mean(0)) / ref.std(0)
    return torch.tensor(X.astype(np.float32))


def _cnf_task(kw: dict) -> dict:
    import torch

    import nnbridge
    paper._init()
    n = kw.get("samples", 4096)
    X, X_eval = _moons(n, 0), _moons(min(n, 2048), kw["eval_seed"])
    torch.manual_seed(kw["seed"])
    model = _cnf()
    if kw["optimizer"] == "adam":
        opt = torch.optim.Adam(model.parameters(), kw["lr"])
    else:
        opt = nnbridge.GTDDP(model, curvature="adam", lr=kw["lr"],
                             terminal_hessian=nll_hessian)
    g = torch.Generator().manual_seed(kw["seed"])
    curve, times, t0 = [], [], time.perf_counter()
    with torch.no_grad():
        curve.append(float(nll(model(X_eval)).mean()))
    for _ in range(kw["epochs"]):
        perm = torch.randperm(len(X), generator=g)
        for i in range(0, len(X), CNF_BATCH):
            xb = X[perm[i:i + CNF_BATCH]]

            def closure(xb=xb):
                opt.zero_grad()
                loss = nll(model(xb)).mean()
                loss.backward()
                return loss
            ts = time.perf_counter()
            opt.step(closure)
            times.append(time.perf_counter() - ts)
        with torch.no_grad():
            curve.append(float(nll(model(X_eval)).mean()))
    out = {**kw, "eval_nll": curve[-1], "curve": curve, "wall": time.perf_counter() - t0,
           "time_per_step": statistics.median(times)}
    if kw.get("density"):
        with torch.no_grad():
            u = torch.linspace(-2.5, 2.5, 120)
            grid = torch.stack(torch.meshgrid(u, u, indexing="xy"), -1).reshape(-1, 2)
            out["density"] = torch.exp(-nll(model(grid))).reshape(120, 120).tolist()
    return out


# ------------------------------------------------------------------ the report
def _classifier_section(ds, sel, results):
    rows = ["| method | lr (validation) | seeds | test accuracy % | std | final train loss "
            "| ms / step |", "|---|---:|---:|---:|---:|---:|---:|"]
    for m in METHODS:
        rs = [r for r in results if r["optimizer"] == m]
        rows.append(f"| {m} | {sel['chosen'][m]:g} | {len(rs)} | {100 * paper._mean(rs):.2f} "
                    f"| {100 * paper._std(rs):.2f} | {paper._mean(rs, 'final_train_loss'):.4f}"
                    f" | {1e3 * paper._mean(rs, 'time_per_step'):.1f} |")
    grid = "; ".join(f"{m} {lr:g}: {100 * acc:.1f}" for m, lr, acc in sel["grid"])
    st = SETUP[ds]
    return (f"### {ds} (batch {st['batch_size']}, {st['epochs']} epochs)\n\n"
            + "\n".join(rows) + f"\n\nValidation accuracy over the grid (%): {grid}.\n")


def _cnf_section(sel, results):
    rows = ["| method | lr (validation) | seeds | test NLL (nats) | std | ms / step |",
            "|---|---:|---:|---:|---:|---:|"]
    for m in ("adam", "gtddp-adam"):
        rs = [r for r in results if r["optimizer"] == m]
        v = [r["eval_nll"] for r in rs]
        rows.append(f"| {m} | {sel[m]:g} | {len(rs)} | {statistics.fmean(v):.4f} | "
                    f"{statistics.stdev(v) if len(v) > 1 else 0.0:.4f} | "
                    f"{1e3 * statistics.fmean(r['time_per_step'] for r in rs):.0f} |")
    return "\n".join(rows)


def _plot(results, cnf, img: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, (ds, rs) in zip(axes[0], results.items()):
        for m in METHODS:
            curves = np.array([r["history"]["test_accuracy"] for r in rs
                               if r["optimizer"] == m])
            mean = 100 * curves.mean(0)
            ax.plot(range(len(mean)), mean, label=m, ls="--" if m.startswith("gtddp") else "-")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy %")
        ax.set_title(f"ODE-block classifier, {ds} (mean over seeds)")
        ax.set_ylim(bottom=max(0.0, ax.get_ylim()[0]))
        ax.legend()
    fig.tight_layout()
    fig.savefig(img / "ode_curves.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    data = _moons(2048, 1).numpy()
    axes[0].scatter(data[:, 0], data[:, 1], s=2)
    axes[0].set_title("test sample")
    for ax, m in zip(axes[1:], ("adam", "gtddp-adam")):
        r = next(r for r in cnf if r["optimizer"] == m and r.get("density"))
        ax.imshow(np.array(r["density"]), origin="lower", extent=(-2.5, 2.5, -2.5, 2.5),
                  cmap="viridis")
        ax.set_title(f"{m}: density, test NLL {r['eval_nll']:.3f}")
    for ax in axes:
        ax.set_xlim(-2.5, 2.5)
        ax.set_ylim(-2.5, 2.5)
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(img / "cnf_moons.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    a = paper.experiment_parser(__doc__).parse_args(argv)
    paths = paper.results_paths(a, "experiments_ode")
    if paths is None:
        return 2
    md, js = paths
    (a.out / "img").mkdir(parents=True, exist_ok=True)
    runner = paper.Runner(a.workers, a.smoke, a.ray)
    t0 = time.perf_counter()
    raw: dict = {}
    sections, curves = [], {}
    for ds in ("digits",) if a.smoke else ("digits", "mnist1d"):
        st = SETUP[ds]
        sel = paper.select_lr(runner, ds, 1 if a.smoke else 2, a.smoke, methods=METHODS,
                              epochs=SELECT_EPOCHS, grids=GRIDS, model="odenet",
                              batch_size=st["batch_size"])
        res = runner.map([dict(dataset=ds, model="odenet", optimizer=m,
                               lr=sel["chosen"][m], seed=s, epochs=st["epochs"],
                               batch_size=st["batch_size"])
                          for m in METHODS for s in range(1 if a.smoke else SEEDS)])
        raw[ds] = {"selection": sel, "runs": [
            {**r, "history": {k: r["history"][k] for k in ("epoch_step", "test_accuracy")}}
            for r in res]}
        curves[ds] = res
        sections.append(_classifier_section(ds, sel, res))
        print(f"{ds}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    small = {"samples": 256} if a.smoke else {}
    epochs = 1 if a.smoke else CNF_EPOCHS
    grid = CNF_GRID[:1] if a.smoke else CNF_GRID
    sel_runs = runner._map(_cnf_task, [dict(optimizer=m, lr=lr, seed=100, eval_seed=2,
                                            epochs=epochs, **small)
                                       for m in ("adam", "gtddp-adam") for lr in grid])
    chosen = {m: min((r for r in sel_runs if r["optimizer"] == m),
                     key=lambda r: r["eval_nll"])["lr"] for m in ("adam", "gtddp-adam")}
    cnf = runner._map(_cnf_task, [dict(optimizer=m, lr=chosen[m], seed=s, eval_seed=1,
                                       epochs=epochs, density=s == 0, **small)
                                  for m in ("adam", "gtddp-adam")
                                  for s in range(1 if a.smoke else CNF_SEEDS)])
    raw["cnf"] = {"selection": [{k: v for k, v in r.items() if k != "curve"}
                                for r in sel_runs], "chosen": chosen,
                  "runs": [{k: v for k, v in r.items() if k != "density"} for r in cnf]}
    print(f"cnf: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    _plot(curves, cnf, a.out / "img")
    minutes = (time.perf_counter() - t0) / 60
    sel_txt = "; ".join(f"{r['optimizer']} {r['lr']:g}: {r['eval_nll']:.3f}" for r in sel_runs)
    js.write_text(json.dumps(raw, indent=1))
    md.write_text(TEMPLATE.format(
        classifier="\n".join(sections), cnf=_cnf_section(chosen, cnf), cnf_sel=sel_txt,
        minutes=minutes, workers=a.workers, epochs=epochs,
        smoke=" (**smoke run**: 1 epoch, 1 seed)" if a.smoke else ""))
    print(f"wrote {md} ({minutes:.1f} min)")
    return 0


TEMPLATE = """# Neural ODEs as optimal control: measured{smoke}

Regenerated by `python experiments/ode_experiments.py` ({minutes:.0f} min with {workers}
workers; float32, CPU, one torch thread per run). How an ODE block becomes one stage
with shared controls, and what is verified, is in `ode.md`.

## ODE-block classifier

`nnbridge.models.odenet`: Linear -> Tanh -> one Neural-ODE block (RK4, 4 steps on
[0, 1], `f(t, x) = W_2 tanh(W_1 [x; t] + b_1) + b_2`, width 32) -> Linear. Learning
rates chosen on the validation split (2 seeds, {sel_epochs} epochs), then the test split.

{classifier}
![test accuracy per epoch](img/ode_curves.png)

## Continuous normalizing flow on two moons

Three ODE blocks (RK4, 4 steps each) of the exact-trace field
`dz_i/dt = a_i(z_j, t) z_i + b_i(z_j, t)`, `d l/dt = a_1 + a_2`, standard normal base;
4096 training samples, batch {batch}, {epochs} epochs; Adam against GT-DDP(adam) with the
NLL's exact terminal Hessian. Learning rates chosen on a validation sample (1 seed):
{cnf_sel}. Test NLL on 2048 fresh samples:

{cnf}

![densities](img/cnf_moons.png)
""".replace("{sel_epochs}", str(SELECT_EPOCHS)).replace("{batch}", str(CNF_BATCH))


if __name__ == "__main__":
    sys.exit(main())
