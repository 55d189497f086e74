"""Residual spans: the span-aware GT-DDP solver against plain DDP on the explicitly
augmented state (GT-DDP Eq. 26, tests/reference/span_augmented.py), one run.

    python benchmarks/bench_gtddp.py [--quick]

* problems (float64, CPU, batch 8, x_{t+1} = tanh(A x + B u), quadratic cost, m = 4):
  "long span": T = 200, one identity span (10, 190), n = 16 / 64 / 128;
  "delay line": T = 100, a delay of d = 5 (one span (t-5, t) per stage, 5 open at once),
  n = 16 / 32;
* backward pass: median time of ``backward_pass`` alone (derivatives computed once, the
  same trajectory), each solver on its own formulation;
* solve: 5 iterations (tol 0), time of the whole solve (derivatives, backward pass, line
  search);
* memory: peak RSS growth of a fresh process during the 5-iteration solve.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _child import run_child  # noqa: E402

from tests.reference.span_augmented import augmented_problem  # noqa: E402
from trajopt import Cost, DDPSolver, Dynamics, GTDDPSolver, Span  # noqa: E402


def build(case: str, n: int, B: int = 8, m: int = 4):
    g = torch.Generator().manual_seed(0)
    T = 200 if case == "long" else 100
    A = torch.randn(n, n, generator=g, dtype=torch.float64) / n ** 0.5
    Bm = torch.randn(n, m, generator=g, dtype=torch.float64) / m ** 0.5
    dyn = Dynamics(lambda x, u, t: torch.tanh(x @ A.T + u @ Bm.T), time_invariant=True)
    goal = torch.randn(n, generator=g, dtype=torch.float64)
    cost = Cost(lambda x, u, t: 0.1 * (x * x).sum(-1) + 0.01 * (u * u).sum(-1),
                lambda x: 10 * ((x - goal) ** 2).sum(-1), time_invariant=True)
    if case == "long":
        spans = [Span(10, 190)]
    else:
        spans = [Span(t - 5, t, shortcut=lambda r: 0.3 * torch.tanh(r)) for t in range(5, T)]
    x0 = torch.randn(B, n, generator=g, dtype=torch.float64)
    us0 = 0.1 * torch.randn(B, T, m, generator=g, dtype=torch.float64)
    return dyn, cost, spans, x0, us0, T


def solvers(case, n):
    dyn, cost, spans, x0, us0, T = build(case, n)
    span = GTDDPSolver(dyn, cost, spans=spans, max_iter=5, tol=1e-300)
    F, C = augmented_problem(dyn, cost, spans, [n] * (T + 1), [us0.shape[-1]] * T)
    aug = DDPSolver(F, C, max_iter=5, tol=1e-300)
    return {"span-aware": span, "augmented": aug}, x0, us0


def time_backward(solver, x0, us0, reps):
    inp = solver.prepare(x0, us0)
    x0f = inp.x0
    traj = solver.rollout(x0f, inp.us)
    stages, Vx, Vxx = solver.derivatives(traj)
    mu = torch.zeros(x0f.shape[0], dtype=x0f.dtype)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        with torch.no_grad():
            solver.backward_pass(stages, Vx, Vxx, mu, traj)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_one(cfg):
    torch.set_num_threads(cfg["threads"])
    s, x0, us0 = solvers(cfg["case"], cfg["n"])
    solver = s[cfg["solver"]]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    res = solver.solve(x0, us0)
    t_solve = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t_back = time_backward(solver, x0, us0, cfg["reps"])
    return {"solve": t_solve, "backward": t_back, "mem_mb": (rss1 - rss0) / 1024,
            "cost": float(res.cost.sum())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(run_one(json.loads(a.child))))
        return
    cases = [("long", 16), ("long", 64), ("delay", 16)] if a.quick else [
        ("long", 16), ("long", 64), ("long", 128), ("delay", 16), ("delay", 32)]
    print(f"torch {torch.__version__}, {a.threads} threads, float64, batch 8, CPU\n")
    print("| problem | n | solver | backward ms | ratio | 5-iteration solve s | ratio "
          "| peak MB | ratio | final cost |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case, n in cases:
        rows = {}
        for name in ("augmented", "span-aware"):
            cfg = {"case": case, "n": n, "solver": name, "threads": a.threads,
                   "reps": 3 if a.quick else 5}
            rows[name] = run_child(__file__, cfg)
        base = rows["augmented"]
        label = "long span (10, 190), T 200" if case == "long" else "delay 5, T 100"
        for name, r in rows.items():
            print(f"| {label} | {n} | {name} | {1e3 * r['backward']:.1f} | "
                  f"{r['backward'] / base['backward']:.2f}x | {r['solve']:.2f} | "
                  f"{r['solve'] / base['solve']:.2f}x | {r['mem_mb']:.1f} | "
                  f"{r['mem_mb'] / max(base['mem_mb'], 1e-9):.2f}x | {r['cost']:.6g} |",
                  flush=True)


if __name__ == "__main__":
    main()
