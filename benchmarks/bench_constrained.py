"""Constrained DDP against casadi + IPOPT, ratios in one run.

    python benchmarks/bench_constrained.py [--quick]

The three problems of ``tests/trajopt/test_constraints_ipopt.py`` (pendulum with the
terminal equality x_T = (pi, 0), T = 100; cart-pole on a track |x| <= 0.4, T = 100;
unicycle around two obstacles, T = 80), each solved

* by ``trajopt.solve_ddp(..., constraints=p.constraints)`` with its defaults, from zero
  controls;
* by IPOPT (casadi's multiple-shooting NLP of ``tests/reference/casadi_ocp.py``, exact
  derivatives by casadi's algorithmic differentiation, tol 1e-10) from the rollout of
  zero controls; the time is that of the solver call (building the NLP not counted);

and a batch: 16 unicycles from different start positions, trajopt batched against an
IPOPT loop.  Best of 2 (1 with ``--quick``, which also shortens the horizons) wall-clock
seconds, float64, CPU.  Printed: time, iterations, cost, largest violation, and trajopt's
time as a multiple of IPOPT's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import trajopt  # noqa: E402
from tests.reference import casadi_ocp  # noqa: E402
from trajopt import problems  # noqa: E402

OBSTACLES = ((1.0, 0.1, 0.25), (1.7, 0.6, 0.2))


def _cases(quick: bool):
    T = 60 if quick else 100
    Tu = 50 if quick else 80
    dtu = 0.16 if quick else 0.1
    return [
        ("pendulum, x_T = goal", problems.pendulum(T=T, reach_goal=True),
         casadi_ocp.pendulum_goal(T=T)),
        ("cart-pole, track 0.4 m", problems.cartpole(T=T, track=0.4),
         casadi_ocp.cartpole_track(T=T, track=0.4)),
        ("unicycle, 2 obstacles", problems.unicycle(T=Tu, dt=dtu, obstacles=OBSTACLES),
         casadi_ocp.unicycle_obstacles(T=Tu, dt=dtu, obstacles=OBSTACLES)),
    ]


def _rollout(p, x0):
    xs = [x0]
    for t in range(p.T):
        xs.append(p.dynamics(xs[-1], p.us0[t].expand(*x0.shape[:-1], -1), t))
    return torch.stack(xs, -2)


def _ours(p, x0, us0):
    t0 = time.perf_counter()
    r = trajopt.solve_ddp(p.dynamics, p.cost, x0, us0, control_limits=p.control_limits,
                          constraints=p.constraints, max_iter=1000)
    return time.perf_counter() - t0, r


def rows(quick: bool) -> list[dict]:
    rep = 1 if quick else 2
    out = []
    for name, p, ocp in _cases(quick):
        t_us, r = min((_ours(p, p.x0, p.us0) for _ in range(rep)), key=lambda v: v[0])
        ref = min((casadi_ocp.solve(ocp, p.x0.numpy(), _rollout(p, p.x0).numpy(),
                                    p.us0.numpy()) for _ in range(rep)),
                  key=lambda d: d["time"])
        out.append(dict(case=name, trajopt_s=t_us, trajopt_iter=int(r.iterations),
                        trajopt_cost=float(r.cost), trajopt_viol=float(r.max_violation),
                        reason=str(r.reason), ipopt_s=ref["time"],
                        ipopt_iter=ref["iterations"], ipopt_cost=ref["cost"],
                        ipopt_viol=ref["max_violation"]))
    # the batch: unicycles from 16 (quick: 4) start positions
    name, p, ocp = _cases(quick)[2]
    count = 4 if quick else 16
    gen = torch.Generator().manual_seed(0)
    x0 = torch.zeros(count, 3, dtype=torch.float64)
    x0[:, :2] = 0.3 * (torch.rand(count, 2, generator=gen, dtype=torch.float64) - 0.5)
    us0 = p.us0.expand(count, -1, -1).clone()
    t_us, r = min((_ours(p, x0, us0) for _ in range(rep)), key=lambda v: v[0])
    xs0 = _rollout(p, x0)
    t_ip, costs, viol, iters = float("inf"), [], 0.0, 0
    for _ in range(rep):
        sols = [casadi_ocp.solve(ocp, x0[i].numpy(), xs0[i].numpy(), us0[i].numpy())
                for i in range(count)]
        t = sum(s["time"] for s in sols)
        if t < t_ip:
            t_ip, costs = t, [s["cost"] for s in sols]
            viol, iters = max(s["max_violation"] for s in sols), sum(
                s["iterations"] for s in sols)
    out.append(dict(case=f"{count} x {name} (batch)", trajopt_s=t_us,
                    trajopt_iter=int(r.iterations.max()),
                    trajopt_cost=float(r.cost.mean()), trajopt_viol=float(r.max_violation.max()),
                    reason=f"{int((r.reason == 'converged').sum())}/{count} converged",
                    ipopt_s=t_ip, ipopt_iter=iters, ipopt_cost=float(np.mean(costs)),
                    ipopt_viol=viol))
    return out


def gpu_rows(batches=(16, 1024, 4096)) -> list[dict]:
    """The batched unicycle row on the GPU (no IPOPT: it has no batched GPU solve)."""
    name, p, _ = _cases(False)[2]
    dev = torch.device("cuda")
    out = []
    for count in batches:
        gen = torch.Generator().manual_seed(0)
        x0 = torch.zeros(count, 3, dtype=torch.float64)
        x0[:, :2] = 0.3 * (torch.rand(count, 2, generator=gen, dtype=torch.float64) - 0.5)
        x0 = x0.to(dev)
        us0 = torch.zeros(count, p.T, p.m, dtype=torch.float64, device=dev)
        lim = tuple(v.to(dev) for v in p.control_limits)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = trajopt.solve_ddp(p.dynamics, p.cost, x0, us0, control_limits=lim,
                              constraints=p.constraints, max_iter=1000)
        torch.cuda.synchronize()
        out.append(dict(case=f"{count} x {name} on {torch.cuda.get_device_name()}",
                        seconds=time.perf_counter() - t0,
                        converged=int((r.reason == "converged").sum()),
                        viol=float(r.max_violation.max()), iterations=int(r.iterations.max())))
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gpu", action="store_true",
                    help="only the batched unicycle on the CUDA device (16, 1024, 4096)")
    args = ap.parse_args(argv)
    if args.gpu:
        res = gpu_rows()
        print("| batch | seconds | converged | max violation | inner iterations (max) |")
        print("|---|---|---|---|---|")
        for d in res:
            print(f"| {d['case']} | {d['seconds']:.2f} | {d['converged']} | "
                  f"{d['viol']:.1e} | {d['iterations']} |")
        return res
    res = rows(args.quick)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; casadi "
          f"{casadi_ocp._casadi().__version__} (IPOPT, MUMPS)")
    print("| problem | trajopt s (iter) | IPOPT s (iter) | trajopt / IPOPT time | "
          "cost trajopt / IPOPT | violation trajopt / IPOPT | trajopt reason |")
    print("|---|---|---|---|---|---|---|")
    for d in res:
        print(f"| {d['case']} | {d['trajopt_s']:.2f} ({d['trajopt_iter']}) | "
              f"{d['ipopt_s']:.3f} ({d['ipopt_iter']}) | "
              f"{d['trajopt_s'] / d['ipopt_s']:.0f}x | "
              f"{d['trajopt_cost']:.6f} / {d['ipopt_cost']:.6f} | "
              f"{d['trajopt_viol']:.1e} / {d['ipopt_viol']:.1e} | {d['reason']} |")
    return res


if __name__ == "__main__":
    main()
