"""Helper run inside mpc.pytorch's own virtual environment (it pins numpy < 2).

    python _mpc_pytorch_pendulum.py BATCH T EPS MAX_ITER SEED

Solves mpc.pytorch's pendulum (mpc.env_dx.pendulum.PendulumDx, its own cost) from the
initial states trajopt uses (theta = pi - 0.2 + 0.1 * noise(seed), at rest) and prints one
JSON line: time, iterations cap, controls.  Not imported by trajopt.
"""

import json
import math
import sys
import time

import torch
from mpc import mpc
from mpc.env_dx import pendulum
from mpc.mpc import GradMethods, QuadCost


def problem(dx, th, T: int, eps: float, max_iter: int):
    """mpc.pytorch's pendulum problem from angles ``th`` (batch,), at rest: the initial
    states, its own quadratic cost over T stages and its MPC controller (torque limits,
    its line-search settings, autodiff derivatives).  Also used by
    ``_mpc_pytorch_grad.py``."""
    batch = th.shape[0]
    x_init = torch.stack([torch.cos(th), torch.sin(th), torch.zeros(batch)], 1)
    q = torch.cat((dx.goal_weights.double(), dx.ctrl_penalty * torch.ones(dx.n_ctrl)))
    px = -torch.sqrt(dx.goal_weights.double()) * dx.goal_state.double()
    p = torch.cat((px, torch.zeros(dx.n_ctrl)))
    Q = torch.diag(q).unsqueeze(0).unsqueeze(0).repeat(T, batch, 1, 1)
    p = p.unsqueeze(0).repeat(T, batch, 1)
    ctrl = mpc.MPC(dx.n_state, dx.n_ctrl, T, u_lower=dx.lower, u_upper=dx.upper,
                   lqr_iter=max_iter, verbose=-1, exit_unconverged=False,
                   detach_unconverged=False, linesearch_decay=dx.linesearch_decay,
                   max_linesearch_iter=dx.max_linesearch_iter,
                   grad_method=GradMethods.AUTO_DIFF, eps=eps, n_batch=batch)
    return x_init, QuadCost(Q, p), ctrl


def main():
    batch, T, eps, max_iter, seed = (int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]),
                                     int(sys.argv[4]), int(sys.argv[5]))
    torch.set_default_dtype(torch.float64)
    dx = pendulum.PendulumDx()
    dx.params = dx.params.double()
    th = math.pi - 0.2 + 0.1 * torch.randn(batch, generator=torch.Generator().manual_seed(seed))
    if batch == 1:
        th = torch.tensor([math.pi - 0.2])
    x_init, cost, ctrl = problem(dx, th, T, eps, max_iter)
    t0 = time.perf_counter()
    x, u, objs = ctrl(x_init, cost, dx)
    elapsed = time.perf_counter() - t0
    print(json.dumps({"time": elapsed, "us": u.detach().transpose(0, 1).tolist(),
                      "x0": x_init.tolist(), "objs": objs.detach().tolist()}))


if __name__ == "__main__":
    main()
