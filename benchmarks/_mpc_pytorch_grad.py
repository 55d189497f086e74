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
from _mpc_pytorch_pendulum import problem
from mpc.env_dx import pendulum


def main():
    batch, T, max_iter, seed = (int(v) for v in sys.argv[1:5])
    theta0 = float(sys.argv[5])
    torch.set_default_dtype(torch.float64)
    dx = pendulum.PendulumDx()
    dx.params = dx.params.double().clone().requires_grad_()
    th = theta0 + 0.1 * torch.randn(batch, generator=torch.Generator().manual_seed(seed))
    x_init, cost, ctrl = problem(dx, th, T, 1e-6, max_iter)
    W = torch.randn(T, batch, 1, generator=torch.Generator().manual_seed(seed + 1))
    t0 = time.perf_counter()
    _, u, _ = ctrl(x_init, cost, dx)
    t1 = time.perf_counter()
    (W * u).sum().backward()
    t2 = time.perf_counter()
    print(json.dumps({"forward": t1 - t0, "backward": t2 - t1,
                      "grad": dx.params.grad.tolist(),
                      "us": u.detach().transpose(0, 1).tolist()}))


if __name__ == "__main__":
    main()
