"""DDPNOpt step time and peak memory against the matching torch.optim baselines, one run.

    python benchmarks/bench_ddpnopt.py [--quick] [--threads N] [--fig3 | --no-fig3]

* models (float32, CPU, batch 128, cross-entropy on random data): a 6-layer MLP
  (64 -> 64 x 5 -> 10, tanh), the issue's 6 x 256 ReLU MLP (64 -> 256 x 5 -> 10) and a
  CNN with 4 3x3 convolutions (1 -> 16 -> 16 -> 32 -> 32 channels on 16 x 16 inputs,
  ReLU, two stride-2) and 2 linear layers (-> 64 -> 10);
* pairs: SGD vs DDPNOpt(identity), RMSprop vs DDPNOpt(rmsprop), Adam vs DDPNOpt(adam),
  nnbridge.EKFAC vs DDPNOpt(ekfac); DDPNOpt with value_hessian="outer";
* step time: median of ``--steps`` steps after 3 warm-up steps, each step = the closure
  (forward + backward) + the update, the same closure for both; each pair runs
  ``--rounds`` times (default 3), baseline and DDPNOpt alternating, and the minimum of
  each is reported (single runs on a shared 2-core machine move by up to 4x);
* peak memory: each configuration runs in its own process; we report the peak resident
  set size minus the resident size after model, data and optimizer are built, and the
  peak of live bytes of one step above what was live before the first step
  (``benchmarks/_live.py``: glibc's allocator counter read after every aten operation,
  the CPU counterpart of ``torch.cuda.max_memory_allocated``; RSS follows the allocator's
  arenas and the math libraries' buffers more than the tensors alive);
* the paper's Fig. 3 point: vanilla DDP (curvature="exact", value_hessian="full") against
  DDPNOpt(adam, outer) on a small MLP (64 -> 32 x 3 -> 10) as the batch grows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _child import measure_steps, run_alternating, run_child  # noqa: E402

import nnbridge  # noqa: E402

#: below this a baseline's live bytes (MB) are the size of the Python-side allocations
#: beside the tensors (they even come out negative on the small MLP): no ratio is printed
LIVE_FLOOR = 0.5
PAIRS = [("sgd", "identity", 0.05), ("rmsprop", "rmsprop", 1e-3), ("adam", "adam", 1e-3),
         ("ekfac", "ekfac", 0.05)]


def build(model_name: str, width: int = 64, depth: int = 6):
    torch.manual_seed(0)
    if model_name in ("mlp", "mlp256"):
        act = nn.Tanh if model_name == "mlp" else nn.ReLU
        width = 256 if model_name == "mlp256" else width
        layers = [nn.Linear(64, width), act()]
        for _ in range(depth - 2):
            layers += [nn.Linear(width, width), act()]
        return nn.Sequential(*layers, nn.Linear(width, 10)), (64,)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10)), (1, 16, 16)


def make_optimizer(kind: str, curvature: str, model, lr, **kw):
    if kind == "emsa":
        return nnbridge.EMSA(model, lr=lr, **kw)
    if kind == "ddpnopt":
        return nnbridge.DDPNOpt(model, lr=lr, curvature=curvature, **kw)
    if curvature == "ekfac":
        return nnbridge.EKFAC(model, lr=lr)
    cls = {"identity": torch.optim.SGD, "rmsprop": torch.optim.RMSprop,
           "adam": torch.optim.Adam}[curvature]
    return cls(model.parameters(), lr=lr)


def run_one(cfg: dict) -> dict:
    """Time and memory of one configuration (runs in a child process)."""
    torch.set_num_threads(cfg["threads"])
    model, shape = build(cfg["model"], **cfg.get("arch", {}))
    X = torch.randn(cfg["batch"], *shape)
    y = torch.randint(0, 10, (cfg["batch"],))
    opt = make_optimizer(cfg["kind"], cfg["curvature"], model, cfg["lr"], **cfg.get("kw", {}))

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        return loss

    r = measure_steps(lambda: opt.step(closure), cfg["steps"], warmup=3)
    return {**r, "mem_kb": 1024 * r["mem_mb"], "loss": float(closure().detach())}


def child(cfg: dict) -> dict:
    return run_child(__file__, cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and batch sizes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fig3", action="store_true", help="only the batch-size sweep")
    ap.add_argument("--no-fig3", action="store_true", help="only the table")
    ap.add_argument("--rounds", type=int, default=None,
                    help="alternating runs of each pair, the minimum reported (default 3, "
                         "1 with --quick)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(run_one(json.loads(a.child))))
        return
    steps = 5 if a.quick else 20
    rounds = a.rounds if a.rounds is not None else (1 if a.quick else 3)
    if a.fig3:
        fig3(a.threads, steps, a.quick)
        return
    print(f"torch {torch.__version__}, {a.threads} threads, batch 128, float32, CPU; "
          f"the minimum of {rounds} alternating runs per pair\n")
    print("| model | baseline | baseline ms | DDPNOpt ms | time ratio | baseline peak MB "
          "| DDPNOpt peak MB | memory overhead | baseline live MB | DDPNOpt live MB | "
          "live ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model_name in ("mlp", "mlp256", "cnn"):
        for base, curv, lr in PAIRS:
            common = dict(model=model_name, batch=128, steps=steps, threads=a.threads,
                          curvature=curv, lr=lr)
            b, d = run_alternating(__file__, [{**common, "kind": "baseline"},
                                              {**common, "kind": "ddpnopt"}], rounds)
            mb_b, mb_d = b["mem_kb"] / 1024, d["mem_kb"] / 1024
            over = (mb_d - mb_b) / max(mb_b, 1e-9)
            live = "- | - | -" if b.get("live_mb") is None else (  # no glibc
                f"{b['live_mb']:.2f} | {d['live_mb']:.2f} | " + (
                    f"{d['live_mb'] / b['live_mb']:.1f}x" if b["live_mb"] >= LIVE_FLOOR
                    else "-"))
            print(f"| {model_name} | {base} | {1e3 * b['time']:.2f} | {1e3 * d['time']:.2f} "
                  f"| {d['time'] / b['time']:.2f}x | {mb_b:.1f} | {mb_d:.1f} | "
                  f"{100 * over:+.0f}% | {live} |", flush=True)
    if not a.no_fig3:
        fig3(a.threads, steps, a.quick)


def fig3(threads: int, steps: int, quick: bool) -> None:
    """The paper's Fig. 3 point: time and peak memory against the batch size."""
    print("\nFig. 3 point: step time and peak memory vs batch size, MLP 64 -> 32 x 3 -> 10")
    print("| batch | Adam ms | DDPNOpt(adam, outer) ms | vanilla DDP (exact, full) ms "
          "| E-MSA (5 ascent steps) ms | Adam MB | DDPNOpt MB | vanilla DDP MB | E-MSA MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    arch = {"width": 32, "depth": 4}
    for B in ((8, 32) if quick else (8, 32, 128, 256)):
        common = dict(model="mlp", batch=B, steps=max(3, steps // 4), threads=threads,
                      arch=arch)
        adam = child({**common, "kind": "baseline", "curvature": "adam", "lr": 1e-3})
        ddpn = child({**common, "kind": "ddpnopt", "curvature": "adam", "lr": 1e-3})
        van = child({**common, "kind": "ddpnopt", "curvature": "exact", "lr": 1.0,
                     "kw": {"value_hessian": "full", "regularization": 1.0}})
        emsa = child({**common, "kind": "emsa", "curvature": "-", "lr": 0.2})
        print(f"| {B} | {1e3 * adam['time']:.2f} | {1e3 * ddpn['time']:.2f} | "
              f"{1e3 * van['time']:.1f} | {1e3 * emsa['time']:.2f} | "
              f"{adam['mem_kb'] / 1024:.1f} | {ddpn['mem_kb'] / 1024:.1f} | "
              f"{van['mem_kb'] / 1024:.1f} | {emsa['mem_kb'] / 1024:.1f} |", flush=True)


if __name__ == "__main__":
    main()
