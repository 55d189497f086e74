"""GT-DDP's step time and peak memory on the digits ResNet against its base optimizer, and
its two value-Hessian forms, in one run.

    python benchmarks/bench_gtddp_nn.py [--quick] [--threads N] [--batch B] [--small-batch b]

* model: ``nnbridge.models.resnet((1, 8, 8), 10)`` (stem, an identity BasicBlock, a
  stride-2 BasicBlock with a projection shortcut, BatchNorm, Linear-ReLU-Linear head),
  float32, CPU, batch 128 of the digits training images, cross-entropy;
* table 1, per curvature (sgd = "identity", adam, ekfac), batch 128: torch.optim (SGD,
  Adam; EKFAC has none that takes a residual network), ``GTDDP(feedback=False)`` (the base
  optimizer on the stage graph: equal to torch.optim step for step, tested) and ``GTDDP``
  with its defaults: ``value_hessian="outer"`` (block-diagonal per-sample value,
  factored, Prop. 6) and the exact GGN terminal Hessian (a rank-9 factor here: classes - 1);
* table 2, SGD curvature, batch ``--small-batch`` (4): ``value_hessian="outer"`` against
  ``"full"`` (block-diagonal, each sample's value Hessian dense on the augmented state,
  2 x 1024 on the first block).  "full" runs with ``value_psd=False``: with the default
  ``value_psd=True`` its first float32 step fails (``torch.linalg.eigh`` does not converge
  on the 1024 x 1024 value Hessians; float64 runs, at ~25 s a step for 4 samples), and a
  step costs seconds per sample, so batch 128 is out of reach on this CPU;
* step time: median of ``--steps`` steps (default 10; table 2: 3) after 2 warm-up steps
  (closure = forward + backward, + the update);
* peak memory: each configuration runs in a fresh process; the number is the growth of
  the peak resident set size (``getrusage`` ``ru_maxrss``) from after model, data and
  optimizer are built to after the last step (warm-up included).  Neither tracemalloc nor a
  torch allocator counter works here: torch's CPU tensors are not allocated through
  Python's allocator (tracemalloc does not see them) and torch has no CPU counterpart of
  ``torch.cuda.max_memory_allocated``; the RSS peak includes the allocator's caching and
  fragmentation, so small differences (a few MB) are noise.

What the paper's Fig. 1 / Sec. 4.2 compares -- the block-diagonal + outer-product value
against the batch-augmented value Hessian of DDPNOpt's earlier formulation (the state of
all B samples stacked, a (B n) x (B n) Hessian, ``value_hessian="joint"``) -- is measured
by ``bench_gtddp_fig1.py`` over the batch size (on this ResNet a joint step costs ~30 s
at B = 2 and ~3.5 min at B = 4); here "full" vs "outer" isolates the outer-product
factorization (both block-diagonal).

``--quick`` (the smoke run, ~10 s): all in one process, no memory column, batch 16 and
2, one timed step after one warm-up step, SGD only.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from _child import measure_steps, run_child  # noqa: E402

CURVATURES = (("sgd", "identity", 0.1), ("adam", "adam", 2e-3), ("ekfac", "ekfac", 0.03))
KINDS = ("torch.optim", "GTDDP feedback=False", "GTDDP outer")


def run_one(cfg: dict) -> dict:
    """Time and memory of one configuration (in a child process, or in this one)."""
    import nnbridge
    from nnbridge import data
    from nnbridge.models import resnet
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    ds = data.load("digits")
    B = cfg["batch"]
    X, y = ds.X_train[:B].reshape(-1, 1, 8, 8), ds.y_train[:B]
    model = resnet((1, 8, 8), 10)
    kind, curv, lr = cfg["kind"], cfg["curvature"], cfg["lr"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "GTDDP: the parameters", UserWarning)
        if kind == "torch.optim":
            cls = {"identity": torch.optim.SGD, "adam": torch.optim.Adam}[curv]
            opt = cls(model.parameters(), lr=lr)
        elif kind == "GTDDP feedback=False":
            opt = nnbridge.GTDDP(model, lr=lr, curvature=curv, feedback=False)
        elif kind == "GTDDP outer":
            opt = nnbridge.GTDDP(model, lr=lr, curvature=curv)
        else:
            opt = nnbridge.GTDDP(model, lr=lr, curvature=curv, value_hessian="full",
                                 value_psd=False)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X), y)
        loss.backward()
        return loss

    return measure_steps(lambda: opt.step(closure), cfg["steps"], cfg.get("warmup", 2))


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b <= 0 else f"{a / b:.2f}x"


def _num(v: float | None, scale: float = 1.0, fmt: str = ".1f") -> str:
    return "-" if v is None else format(scale * v, fmt)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="one process, SGD only, batch 16 / 2, 1 step (~10 s)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=None, help="table 1 (default 128)")
    ap.add_argument("--small-batch", type=int, default=None, help="table 2 (default 4)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(run_one(json.loads(a.child))))
        return {}
    batch = a.batch or (16 if a.quick else 128)
    small = a.small_batch or (2 if a.quick else 4)
    steps = a.steps or (1 if a.quick else 10)
    common = dict(threads=a.threads, warmup=1 if a.quick else 2)

    def measure(cfg):
        cfg = {**common, **cfg}
        if a.quick:
            r = run_one(cfg)
            return {**r, "mem_mb": None}
        return run_child(__file__, cfg)

    mem = "no memory (--quick)" if a.quick else "memory: peak RSS growth of a fresh process"
    print(f"torch {torch.__version__}, {a.threads} thread(s), digits ResNet, float32, CPU, "
          f"{mem}\n")
    rows = []
    for name, curv, lr in CURVATURES[:1] if a.quick else CURVATURES:
        res = {k: None if (k == "torch.optim" and curv == "ekfac") else
               measure(dict(kind=k, curvature=curv, lr=lr, batch=batch, steps=steps))
               for k in KINDS}
        rows.append({"curvature": name, "lr": lr, **res})
    print(f"Table 1: GT-DDP against its base optimizer, batch {batch}, median of {steps} "
          f"step(s)\n")
    print("| curvature | torch.optim ms | GTDDP feedback=False ms | GTDDP ms | GTDDP / "
          "torch.optim | GTDDP / feedback=False | torch.optim MB | feedback=False MB | "
          "GTDDP MB | GTDDP / feedback=False memory |")
    print("|---|" + "---:|" * 9)
    for r in rows:
        t = {k: r[k] and r[k]["time"] for k in KINDS}
        m = {k: r[k] and r[k]["mem_mb"] for k in KINDS}
        print(f"| {r['curvature']} | " + " | ".join(_num(t[k], 1e3) for k in KINDS)
              + f" | {_ratio(t['GTDDP outer'], t['torch.optim'])} | "
              f"{_ratio(t['GTDDP outer'], t['GTDDP feedback=False'])} | "
              + " | ".join(_num(m[k]) for k in KINDS)
              + f" | {_ratio(m['GTDDP outer'], m['GTDDP feedback=False'])} |")
    s_steps = 1 if a.quick else min(steps, 3)
    vh = {k: measure(dict(kind=k, curvature="identity", lr=0.1, batch=small, steps=s_steps))
          for k in ("GTDDP outer", "GTDDP full")}
    o, f = vh["GTDDP outer"], vh["GTDDP full"]
    print(f"\nTable 2: value_hessian, SGD curvature, batch {small}, median of {s_steps} "
          f"step(s) (\"full\" with value_psd=False: with value_psd=True its float32 step "
          f"fails in eigh)\n")
    print("| value_hessian | ms / step | peak MB |\n|---|---:|---:|")
    print(f"| outer (block-diagonal, factored) | {1e3 * o['time']:.1f} | "
          f"{_num(o['mem_mb'])} |")
    print(f"| full (block-diagonal, dense per sample) | {1e3 * f['time']:.1f} | "
          f"{_num(f['mem_mb'])} |")
    print(f"| full / outer | {_ratio(f['time'], o['time'])} | "
          f"{_ratio(f['mem_mb'], o['mem_mb'])} |")
    print("\nThe paper (Fig. 1, Sec. 4.2): block-diagonal + outer-product value uses 2/3 less "
          "memory and 1/5 less time than the batch-augmented value Hessian of earlier work; "
          "that comparison: benchmarks/bench_gtddp_fig1.py.")
    return {"base": rows, "value_hessian": vh}


if __name__ == "__main__":
    main()
