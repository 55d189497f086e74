"""GT-DDP's Fig. 1 / Sec. 4.2 claim: the block-diagonal + outer-product value against the
batch-augmented value Hessian of earlier work, step time and peak memory over the batch
size, in one run.

    python benchmarks/bench_gtddp_fig1.py [--quick] [--threads N] [--batches 4,8,16,32]

* model: a residual MLP on the digits images (64 -> 32, two blocks
  ``x + L2(relu(L1 x))`` of width 32, ReLU, head 10), float32, CPU, cross-entropy;
  ``nnbridge.GTDDP`` with SGD's curvature (lr 0.1) and its defaults otherwise;
* the three value forms (``value_hessian``): ``"outer"`` (GT-DDP's: block-diagonal over
  the samples, rank-one factor per sample, Prop. 6; the default), ``"full"``
  (block-diagonal, each sample's value Hessian dense on the augmented state) and
  ``"joint"`` (the batch-augmented state of DDPNOpt's batch formulation: one dense
  (B n) x (B n) value with the cross-sample blocks, :mod:`trajopt.riccati.joint`); all
  with the default terminal Hessian of the form ("outer": sampled Fisher, rank one;
  "full" / "joint": the exact Gauss-Newton matrix) and ``value_psd=True``;
* step time: median of ``--steps`` steps (default 3) after one warm-up step;
* peak memory: each configuration in a fresh process, the growth of the peak resident
  set size from after model, data and optimizer are built to after the last step (see
  ``bench_gtddp_nn.py`` for why RSS).

The paper reports (MNIST, its Fig. 1): 2/3 less memory and 1/5 less time than the
batch-augmented form.  ``--quick`` (the smoke run): batches 2 and 4, one process, no
memory column, one step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _child import measure_steps, run_child  # noqa: E402

FORMS = ("outer", "full", "joint")


class ResidualMLP(nn.Module):
    """64 -> width, ``blocks`` residual blocks x + L2(relu(L1 x)), ReLU, head."""

    def __init__(self, n_in: int = 64, width: int = 32, blocks: int = 2, n_out: int = 10):
        super().__init__()
        self.stem = nn.Linear(n_in, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU(),
                                                  nn.Linear(width, width))
                                    for _ in range(blocks))
        self.head = nn.Linear(width, n_out)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for b in self.blocks:
            x = torch.relu(x + b(x))
        return self.head(x)


def run_one(cfg: dict) -> dict:
    """Time and memory of one configuration."""
    import nnbridge
    from nnbridge import data
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    ds = data.load("digits")
    B = cfg["batch"]
    X, y = ds.X_train[:B], ds.y_train[:B]
    model = ResidualMLP()
    opt = nnbridge.GTDDP(model, lr=0.1, curvature="identity", value_hessian=cfg["form"])

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        return loss

    return measure_steps(lambda: opt.step(closure), cfg["steps"], warmup=1)


def _r(a, b) -> str:
    return "-" if a is None or b is None or b <= 0 else f"{a / b:.3g}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batches 2, 4; one process")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", default=None, help="comma-separated (default 4,8,16,32)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 3)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(run_one(json.loads(a.child))))
        return {}
    batches = ([int(b) for b in a.batches.split(",")] if a.batches else
               [2, 4] if a.quick else [4, 8, 16, 32])
    steps = a.steps or (1 if a.quick else 3)
    res: dict[int, dict[str, dict]] = {}
    for B in batches:
        res[B] = {}
        for form in FORMS:
            cfg = dict(form=form, batch=B, steps=steps, threads=a.threads)
            res[B][form] = ({**run_one(cfg), "mem_mb": None} if a.quick
                            else run_child(__file__, cfg))
    mem = "no memory (--quick)" if a.quick else "peak RSS growth of a fresh process"
    print(f"torch {torch.__version__}, {a.threads} thread(s), residual MLP on digits, "
          f"GTDDP(curvature='identity'), float32, CPU, median of {steps} step(s); memory: "
          f"{mem}\n")
    print("| batch | outer ms | full ms | joint ms | outer / joint time | outer MB | "
          "full MB | joint MB | outer / joint memory |")
    print("|---:|" + "---:|" * 8)
    for B, r in res.items():
        t = {f: r[f]["time"] for f in FORMS}
        m = {f: r[f]["mem_mb"] for f in FORMS}
        print(f"| {B} | " + " | ".join(f"{1e3 * t[f]:.1f}" for f in FORMS)
              + f" | {_r(t['outer'], t['joint'])} | "
              + " | ".join("-" if m[f] is None else f"{m[f]:.1f}" for f in FORMS)
              + f" | {_r(m['outer'], m['joint'])} |")
    print("\nThe paper (Fig. 1): outer / batch-augmented = 1/3 of the memory and 4/5 of "
          "the time.")
    return res


if __name__ == "__main__":
    main()
