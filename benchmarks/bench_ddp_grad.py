"""Gradients through a box-limited iLQR: trajopt's ``solve_ddp(..., params=...)`` against
mpc.pytorch's differentiable MPC, on mpc.pytorch's pendulum, in one run.

    python benchmarks/bench_ddp_grad.py [--quick] [--batch B] [--T T]

Both solve mpc.pytorch's pendulum (its dynamics, cost and torque limits; trajopt's copy
in ``problems.mpc_pendulum``) from the same initial states, 0.5 rad from upright (from
hanging every control of the swing-up sits at a limit and both gradients are exactly 0),
and differentiate ``sum(W * u)`` with respect to the pendulum's (g, m, l). Times: the
solve (forward) and the gradient (backward), wall clock, float64, CPU. The gradients are
printed side by side: trajopt's is the exact implicit gradient at its optimum (second-
order dynamics terms included), mpc.pytorch's uses the Gauss-Newton LQR at its fixed
point, and the two solvers stop at different points, so they agree only roughly;
trajopt's is checked against central finite differences of re-solved problems in the
same run. mpc.pytorch runs in its own virtual environment (``bench_ddp.mpc_python``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import bench_ddp  # noqa: E402

import trajopt  # noqa: E402
from trajopt.problems.pendulum import MPCPendulumCost, MPCPendulumDynamics  # noqa: E402

F64 = torch.float64


def ours(batch, T, max_iter, seed, params, theta0=0.5):
    g, m, l = params
    dyn = MPCPendulumDynamics(g=g, m=m, l=l)
    th = theta0 + 0.1 * torch.randn(batch, generator=torch.Generator().manual_seed(seed),
                                    dtype=F64)
    x0 = torch.stack([torch.cos(th), torch.sin(th), torch.zeros_like(th)], 1)
    W = torch.randn(T, batch, 1, generator=torch.Generator().manual_seed(seed + 1),
                    dtype=F64).transpose(0, 1)
    lims = (torch.tensor([-2.0], dtype=F64), torch.tensor([2.0], dtype=F64))
    t0 = time.perf_counter()
    res = trajopt.solve_ddp(dyn, MPCPendulumCost(), x0, torch.zeros(batch, T, 1, dtype=F64),
                            control_limits=lims, max_iter=max_iter, tol=1e-12,
                            params=params)
    t1 = time.perf_counter()
    loss = (W * res.us).sum()
    grads = torch.autograd.grad(loss, params) if loss.requires_grad else (None,) * 3
    t2 = time.perf_counter()
    return dict(forward=t1 - t0, backward=t2 - t1, loss=float(loss.detach()),
                grad=[float("nan") if v is None else float(v) for v in grads],
                converged=int(res.converged.sum()))


def finite_differences(batch, T, max_iter, seed, eps=1e-5):
    out = []
    for i in range(3):
        vals = []
        for s in (1, -1):
            p = [torch.tensor(v, dtype=F64) for v in (10.0, 1.0, 1.0)]
            p[i] = p[i] + s * eps
            with torch.no_grad():
                vals.append(ours(batch, T, max_iter, seed, tuple(p))["loss"])
        out.append((vals[0] - vals[1]) / (2 * eps))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 4, T 10, no mpc.pytorch")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--T", type=int, default=20)
    a = ap.parse_args(argv)
    batch, T = (4, 10) if a.quick else (a.batch, a.T)
    max_iter, seed = 100, 0
    params = tuple(torch.tensor(v, dtype=F64, requires_grad=True) for v in (10.0, 1.0, 1.0))
    r = ours(batch, T, max_iter, seed, params)
    fd = finite_differences(batch, T, max_iter, seed)
    peer = None
    py = None if a.quick else bench_ddp.mpc_python()
    if py is not None:
        out = subprocess.run([py, str(HERE / "_mpc_pytorch_grad.py"), str(batch), str(T),
                              str(max_iter), str(seed), "0.5"], capture_output=True, text=True,
                             check=True)
        peer = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"mpc.pytorch's pendulum, batch {batch}, T = {T}, d sum(W u) / d (g, m, l); "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)\n")
    print("| solver | solve | gradient | total | ratio (peer / trajopt) | gradient (g, m, l) |")
    print("|---|---:|---:|---:|---:|---|")
    tot = r["forward"] + r["backward"]
    print(f"| trajopt solve_ddp(params=) | {1e3 * r['forward']:.0f} ms | "
          f"{1e3 * r['backward']:.0f} ms | {1e3 * tot:.0f} ms | 1.00 | "
          f"{', '.join(f'{v:.6g}' for v in r['grad'])} |")
    print(f"| finite differences of trajopt | | | | | "
          f"{', '.join(f'{v:.6g}' for v in fd)} |")
    if peer is not None:
        ptot = peer["forward"] + peer["backward"]
        print(f"| mpc.pytorch | {1e3 * peer['forward']:.0f} ms | "
              f"{1e3 * peer['backward']:.0f} ms | {1e3 * ptot:.0f} ms | {ptot / tot:.2f} | "
              f"{', '.join(f'{v:.6g}' for v in peer['grad'])} |")
    else:
        print("| mpc.pytorch | not run (--quick or not installed) | | | | |")
    rel = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(r["grad"], fd))
    print(f"\ntrajopt vs finite differences: max relative difference {rel:.1e}; "
          f"{r['converged']}/{batch} converged")
    return dict(ours=r, fd=fd, peer=peer)


if __name__ == "__main__":
    main()
