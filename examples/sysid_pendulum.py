"""Learn a pendulum's mass and damping from an expert's trajectories by differentiating
through the optimal controller (mpc.pytorch's imitation-learning example, with trajopt's
implicit gradients of ``solve_ddp``).

    python examples/sysid_pendulum.py [--out DIR] [--smoke]

An expert swings up pendulums of mass 1.3 and damping 0.25 by iLQR from 8 initial
states (box-limited torque).  The learner has the same controller and cost but unknown
mass and damping (starting at 1.0 and 0.05; Adam with a cosine schedule); each step
solves the 8 problems with its current estimate
(``solve_ddp(..., params=(mass, damping))``), compares the controls with the expert's,
and follows the gradient of that imitation loss with respect to the two parameters.
The plot shows the parameters and the loss over the steps.
"""

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import trajopt  # noqa: E402

DT = torch.float64
LIMITS = (torch.tensor([-3.0], dtype=DT), torch.tensor([3.0], dtype=DT))


def pendulum(mass, damping):
    def f(x, u, t):
        th, dth = x[..., 0], x[..., 1]
        return torch.stack([th + 0.05 * dth, dth + 0.05 * (
            u[..., 0] / mass - damping * dth - 9.81 * torch.sin(th))], -1)
    return f


def cost():
    goal = torch.tensor([math.pi, 0.0], dtype=DT)

    def running(x, u, t):
        d = x - goal
        return 0.01 * (d * d).sum(-1) + 0.05 * (u * u).sum(-1)

    def terminal(x):
        d = x - goal
        return 30 * (d * d).sum(-1)
    return trajopt.Cost(running, terminal)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--smoke", action="store_true", help="tiny run for the test suite")
    args = ap.parse_args(argv)
    T, steps = (15, 3) if args.smoke else (40, 80)
    x0 = torch.stack([torch.linspace(-0.4, 0.4, 8, dtype=DT), torch.zeros(8, dtype=DT)], 1)
    us0 = torch.zeros(8, T, 1, dtype=DT)
    c = cost()
    with torch.no_grad():
        expert = trajopt.solve_ddp(pendulum(1.3, 0.25), c, x0, us0, control_limits=LIMITS,
                                   tol=1e-12, max_iter=300).us
    log_mass = torch.zeros((), dtype=DT, requires_grad=True)           # mass = exp(.)
    damping = torch.tensor(0.05, dtype=DT, requires_grad=True)
    opt = torch.optim.Adam([log_mass, damping], lr=0.05, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    hist = []
    warm = us0
    for k in range(steps):
        mass = log_mass.exp()
        res = trajopt.solve_ddp(pendulum(mass, damping), c, x0, warm, control_limits=LIMITS,
                                tol=1e-12, max_iter=300, params=(mass, damping))
        loss = ((res.us - expert) ** 2).mean()
        hist.append((loss.item(), mass.item(), damping.item()))
        if k % 10 == 0 or k == steps - 1:
            print(f"step {k:3d}: imitation loss {hist[-1][0]:.3e}, mass {hist[-1][1]:.4f}, "
                  f"damping {hist[-1][2]:.4f}")
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        warm = res.us.detach()
    print("true: mass 1.3000, damping 0.2500")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.semilogy([h[0] for h in hist])
    ax1.set_xlabel("Adam step")
    ax1.set_ylabel("imitation loss (controls MSE)")
    ax2.plot([h[1] for h in hist], label="mass")
    ax2.plot([h[2] for h in hist], label="damping")
    ax2.axhline(1.3, color="C0", ls=":", lw=1)
    ax2.axhline(0.25, color="C1", ls=":", lw=1)
    ax2.set_xlabel("Adam step")
    ax2.legend()
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "sysid_pendulum.png", dpi=110)
    print(f"plot written to {args.out / 'sysid_pendulum.png'}")


if __name__ == "__main__":
    main()
