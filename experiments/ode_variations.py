"""Before concluding that the feedback does worse than its base optimizer
(docs/experiments_ode.md, docs/experiments_ocnopt.md): the comparison again with our
choices varied, one at a time, at the base optimizer's own learning rates.

    python experiments/ode_variations.py [--setup ode | cnn-sgd | cnn-adam] [--workers 2]
                                         [--ray [ADDRESS]] [--out docs] [--smoke]
                                         [--overwrite]

Setups (``SETUPS``): ``ode`` (default), ``nnbridge.models.odenet`` on MNIST-1D, Adam
against GT-DDP(adam); ``cnn-sgd`` / ``cnn-adam``, ``nnbridge.models.cnn`` on digits, SGD /
Adam against DDPNOpt with that curvature (the OCNOpt feedback ablation).  Every row but
the base is the DDP optimizer with its defaults and one choice changed (``VARIANTS``):
the terminal Hessian (sampled Fisher, exact GGN, the paper's empirical factor), Tikhonov
on the value Hessian, the value's PSD projection off, and ``feedback=False`` (which must
be the base optimizer: the sanity row).  Writes ``experiments_variations_<setup>.md`` /
``.json`` (refuses to overwrite them unless ``--overwrite``).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
import ddpnopt_paper as paper  # noqa: E402

SETUPS = {
    "ode": dict(dataset="mnist1d", model="odenet", batch=128, epochs=6, lrs=(0.01, 0.005),
                family="gtddp", base="adam"),
    "cnn-sgd": dict(dataset="digits", model="cnn", batch=32, epochs=8, lrs=(0.1, 0.3),
                    family="ddpnopt", base="sgd"),
    "cnn-adam": dict(dataset="digits", model="cnn", batch=32, epochs=8, lrs=(3e-3, 1e-2),
                     family="ddpnopt", base="adam"),
}
SEEDS = 2
#: the DDP optimizer with one choice changed at a time (None: the base optimizer)
VARIANTS = {
    "base": None,
    "defaults": {},
    "feedback=False": {"feedback": False},
    "terminal: sampled Fisher": {"terminal_hessian": "fisher"},
    "terminal: exact GGN": {"terminal_hessian": "ggn"},
    "terminal: empirical (paper)": {"terminal_hessian": "empirical"},
    "tikhonov 1e-2": {"tikhonov": 1e-2},
    "tikhonov 1.0": {"tikhonov": 1.0},
    "value_psd=False": {"value_psd": False},
}


def _task(kw: dict) -> dict:
    import torch

    import nnbridge
    from nnbridge import data
    from nnbridge.models import default_model
    paper._init()
    st = SETUPS[kw["setup"]]
    ds = data.load(st["dataset"])
    n = kw.get("subset")
    shape = (-1, *ds.image_shape) if st["model"] == "cnn" else (-1, ds.n_features)
    tensors = (ds.X_train[:n].reshape(shape), ds.y_train[:n], ds.X_eval[:n].reshape(shape),
               ds.y_eval[:n])
    torch.manual_seed(kw["seed"])
    model = default_model(st["model"], ds)
    how = VARIANTS[kw["variant"]]
    base = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[st["base"]]
    cls = nnbridge.GTDDP if st["family"] == "gtddp" else nnbridge.DDPNOpt
    curvature = "identity" if st["base"] == "sgd" else st["base"]
    opt = (base(model.parameters(), kw["lr"]) if how is None
           else cls(model, kw["lr"], curvature=curvature, **how))
    acc, loss, times = paper.train_epochs(opt, model, tensors, kw["seed"], kw["epochs"],
                                          st["batch"])
    return {**kw, "test_accuracy": acc[-1], "curve": acc, "final_train_loss": loss,
            "time_per_step": statistics.median(times)}


def main(argv=None) -> int:
    ap = paper.experiment_parser(__doc__)
    ap.add_argument("--setup", choices=sorted(SETUPS), default="ode")
    a = ap.parse_args(argv)
    paths = paper.results_paths(a, f"experiments_variations_{a.setup}")
    if paths is None:
        return 2
    md, js = paths
    st = SETUPS[a.setup]
    LRS = st["lrs"]
    a.out.mkdir(parents=True, exist_ok=True)
    runner = paper.Runner(a.workers, a.smoke, a.ray)
    t0 = time.perf_counter()
    extra = {"subset": 128, "epochs": 1} if a.smoke else {"epochs": st["epochs"]}
    # the row that restates the optimizer's default terminal Hessian is the defaults row
    same = "terminal: exact GGN" if st["family"] == "gtddp" else "terminal: sampled Fisher"
    variants = [v for v in VARIANTS if v != same]
    configs = [dict(setup=a.setup, variant=v, lr=lr, seed=s, **extra)
               for v in variants for lr in (LRS[:1] if a.smoke else LRS)
               for s in range(1 if a.smoke else SEEDS)]
    results = runner._map(_task, configs)
    rows = ["| variant | " + " | ".join(f"lr {lr:g}: test acc % (final train loss)"
                                        for lr in LRS) + " |",
            "|---|" + "---:|" * len(LRS)]
    for v in variants:
        cells = []
        for lr in LRS:
            rs = [r for r in results if r["variant"] == v and r["lr"] == lr]
            if not rs:
                cells.append("-")
                continue
            acc = [100 * r["test_accuracy"] for r in rs]
            loss = statistics.fmean(r["final_train_loss"] for r in rs)
            cells.append(f"{statistics.fmean(acc):.1f} ({', '.join(f'{x:.1f}' for x in acc)}"
                         f"; {loss:.3g})")
        rows.append(f"| {v} | " + " | ".join(cells) + " |")
    minutes = (time.perf_counter() - t0) / 60
    js.write_text(json.dumps(results, indent=1))
    ddp = f"{st['family']}-{st['base']}"
    md.write_text(
        f"# {st['model']} on {st['dataset']}: {ddp} with its choices varied"
        f"{' (**smoke run**)' if a.smoke else ''}\n\n"
        f"Regenerated by `python experiments/ode_variations.py --setup {a.setup}` "
        f"({minutes:.0f} min with {a.workers} workers; float32, CPU). "
        f"`nnbridge.models.{st['model']}`, batch {st['batch']}, {st['epochs']} epochs, "
        f"{SEEDS} seeds (each seed's accuracy in parentheses, then the mean final "
        f"training loss). `base` is {st['base']}; every other row is {ddp} with its "
        "defaults and the one choice named changed.\n\n" + "\n".join(rows) + "\n")
    print(f"wrote {md} ({minutes:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
