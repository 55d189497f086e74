"""Helper run inside mpc.pytorch's own virtual environment (it pins numpy < 2).

    python _mpc_pytorch_grad.py BATCH T MAX_ITER SEED THETA0

mpc.pytorch's pendulum (PendulumDx, simple=True, its own cost, torque limits) solved from
the initial states trajopt uses (theta = THETA0 + 0.1 noise, at rest), then the gradient
of ``sum(W * u)`` (W from SEED) with respect to the pendulum's parameters (g, m, l) by
mpc.pytorch's backward pass.  Prints one
JSON line: forward and backward times, the gradient, the controls.
"""

import json
import sys
import time

import torch
from mpc import mpc
from mpc.env_dx import pendulum
from mpc.mpc import GradMethods, QuadCost


def main():
    batch, T, max_iter, seed = (int(v) for v in sys.argv[1:5])
    theta0 = float(sys.argv[5])
    torch.set_default_dtype(torch.float64)
    dx = pendulum.PendulumDx()
    dx.params = dx.params.double().clone().requires_grad_()
    th = theta0 + 0.1 * torch.randn(batch, generator=torch.Generator().manual_seed(seed))
    x_init = torch.stack([torch.cos(th), torch.sin(th), torch.zeros(batch)], 1)
    q = torch.cat((dx.goal_weights.double(), dx.ctrl_penalty * torch.ones(dx.n_ctrl)))
    px = -torch.sqrt(dx.goal_weights.double()) * dx.goal_state.double()
    p = torch.cat((px, torch.zeros(dx.n_ctrl)))
    Q = torch.diag(q).unsqueeze(0).unsqueeze(0).repeat(T, batch, 1, 1)
    p = p.unsqueeze(0).repeat(T, batch, 1)
    W = torch.randn(T, batch, 1, generator=torch.Generator().manual_seed(seed + 1))
    ctrl = mpc.MPC(dx.n_state, dx.n_ctrl, T, u_lower=dx.lower, u_upper=dx.upper,
                   lqr_iter=max_iter, verbose=-1, exit_unconverged=False,
                   detach_unconverged=False, linesearch_decay=dx.linesearch_decay,
                   max_linesearch_iter=dx.max_linesearch_iter,
                   grad_method=GradMethods.AUTO_DIFF, eps=1e-6, n_batch=batch)
    t0 = time.perf_counter()
    _, u, _ = ctrl(x_init, QuadCost(Q, p), dx)
    t1 = time.perf_counter()
    (W * u).sum().backward()
    t2 = time.perf_counter()
    print(json.dumps({"forward": t1 - t0, "backward": t2 - t1,
                      "grad": dx.params.grad.tolist(),
                      "us": u.detach().transpose(0, 1).tolist()}))


if __name__ == "__main__":
    main()
