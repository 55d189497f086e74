"""Model-predictive control of a cart-pole whose model is wrong by 20 %.

    python examples/mpc_cartpole.py [--out DIR] [--smoke]

The controller plans with the nominal cart-pole (``problems.cartpole``: cart 1 kg, pole
0.1 kg, 0.5 m); the plant's cart, pole and pole length are all 20 % larger.

1. Swing-up: ``trajopt.MPC`` with a 50-stage horizon and 3 iLQR iterations per step,
   warm-started once by an offline solve, then run in closed loop on the wrong plant.
2. Balancing, batched: 16 pendulums started up to 0.3 rad and 0.5 rad/s from upright,
   one MPC over the batch (horizon 30, 3 iterations a step), its first plan from the
   rollout of the upright LQR gain (``solve_dare`` on the linearization).
The plot shows the pole angles of both runs.
"""

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.func import jacrev  # noqa: E402

import trajopt  # noqa: E402
from trajopt import problems  # noqa: E402

DT = torch.float64


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--smoke", action="store_true", help="tiny run for the test suite")
    args = ap.parse_args(argv)
    steps, batch = (4, 2) if args.smoke else (120, 16)
    model = problems.cartpole(T=50)
    plant = problems.cartpole(T=50, mc=1.2, mp=0.12, l=0.6)

    def wrong_plant(x, u, k):
        return plant.dynamics(x, u, 0)

    # 1. swing-up
    offline = trajopt.solve_ddp(model.dynamics, model.cost, model.x0,
                                torch.zeros(50, 1, dtype=DT), max_iter=300,
                                control_limits=model.control_limits)
    mpc = trajopt.MPC(model.dynamics, model.cost, horizon=50, iterations=3,
                      control_limits=model.control_limits)
    mpc.reset(offline.us)
    swing = mpc.simulate(wrong_plant, model.x0, steps)
    err = float((swing.xs[-20:, 1] - math.pi).abs().max())
    print(f"swing-up on the wrong plant: |theta - pi| <= {err:.4f} over the last 20 steps "
          f"(1 s); median solve {1e3 * np.median(swing.solve_times):.0f} ms")

    # 2. balancing, batched
    goal = torch.tensor([0.0, math.pi, 0.0, 0.0], dtype=DT)
    cost = trajopt.QuadraticCost(torch.diag(torch.tensor([1.0, 10.0, 0.1, 0.1], dtype=DT)),
                                 0.01 * torch.eye(1, dtype=DT),
                                 torch.diag(torch.tensor([10.0, 100.0, 1.0, 1.0], dtype=DT)),
                                 x_ref=goal)
    g = torch.Generator().manual_seed(0)
    x0 = goal.repeat(batch, 1)
    x0[:, 1] += 0.6 * (torch.rand(batch, generator=g, dtype=DT) - 0.5)
    x0[:, 3] += 1.0 * (torch.rand(batch, generator=g, dtype=DT) - 0.5)
    # the first plan: DDP from the rollout of the upright LQR (DARE) gain, clamped.  From
    # zero controls, 4 of these 16 states converge to a local optimum where the pole
    # falls over (plan cost ~1100 instead of < 7), and MPC then follows that plan down
    A = jacrev(lambda x: model.dynamics(x, torch.zeros(1, dtype=DT), 0))(goal)
    B = jacrev(lambda u: model.dynamics(goal, u, 0))(torch.zeros(1, dtype=DT))
    K = trajopt.solve_dare(A, B, cost.Q, cost.R).K
    lo, hi = model.control_limits
    x, us0 = x0, []
    for t in range(30):
        us0.append(torch.maximum(torch.minimum((x - goal) @ K.T, hi), lo))
        x = model.dynamics(x, us0[-1], t)
    balance = trajopt.MPC(model.dynamics, cost, horizon=30, iterations=3,
                          control_limits=model.control_limits)
    balance.reset(trajopt.solve_ddp(model.dynamics, cost, x0, torch.stack(us0, 1),
                                    max_iter=200, control_limits=model.control_limits).us)
    run = balance.simulate(wrong_plant, x0, steps)
    final = (run.xs[:, -1, 1] - math.pi).abs()
    held = int((final < 0.05).sum())
    print(f"balancing {batch} pendulums on the wrong plant: {held}/{batch} within 0.05 rad "
          f"of upright after {steps * 0.05:.1f} s; median solve "
          f"{1e3 * np.median(run.solve_times):.0f} ms for the batch")

    t = np.arange(steps + 1) * 0.05
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    ax1.plot(t, swing.xs[:, 1].numpy())
    ax1.set_title("swing-up, plant 20 % off")
    ax2.plot(t, run.xs[..., 1].numpy().T, lw=0.8)
    ax2.set_title(f"balancing {batch} pendulums, plant 20 % off")
    for ax in (ax1, ax2):
        ax.axhline(math.pi, color="k", lw=0.6, ls=":")
        ax.set_xlabel("time [s]")
    ax1.set_ylabel("pole angle [rad]")
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "mpc_cartpole.png", dpi=110)
    print(f"plot written to {args.out / 'mpc_cartpole.png'}")


if __name__ == "__main__":
    main()
