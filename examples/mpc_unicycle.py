"""Receding-horizon control (MPC) of a unicycle with a warm-started DDP solver.

``trajopt.MPC``: at every step the solver restarts from the previous plan shifted by one
step (rolled out with its feedback gains), runs a few iterations, and the first control
is applied to the (here: nominal) plant.

    python examples/mpc_unicycle.py [--out DIR] [--smoke]
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import trajopt  # noqa: E402
from trajopt import problems  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--smoke", action="store_true", help="tiny run for the test suite")
    args = ap.parse_args(argv)
    p = problems.unicycle(T=30)
    steps = 5 if args.smoke else 80
    # the problem's cost weighs the state only at the end of its 80-stage horizon; a
    # receding horizon needs the goal in every stage (else it stops short of it)
    goal = torch.tensor([2.0, 1.0, 1.5707963267948966], dtype=torch.float64)
    cost = trajopt.QuadraticCost(torch.diag(torch.tensor([1.0, 1.0, 0.1],
                                                         dtype=torch.float64)),
                                 0.01 * torch.eye(2, dtype=torch.float64),
                                 100 * torch.eye(3, dtype=torch.float64), x_ref=goal)
    mpc = trajopt.MPC(p.dynamics, cost, horizon=30, iterations=10,
                      control_limits=p.control_limits)
    run = mpc.simulate(p.dynamics, p.x0, steps,
                       callback=lambda k, x, r: k % 10 == 0 and print(
                           f"step {k:3d}: x = {x.numpy().round(3)}, plan cost "
                           f"{float(r.cost):.4f}, {int(r.iterations)} iterations"))
    print(f"final state {run.xs[-1].numpy().round(4)} (goal {goal.numpy().round(4)}); "
          f"median solve {1e3 * float(np.median(run.solve_times)):.0f} ms")
    path = run.xs.numpy()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(path[:, 0], path[:, 1], "o-", ms=3)
    ax.plot([2.0], [1.0], "r*", ms=12, label="goal")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title("unicycle under MPC (warm-started iLQR)")
    ax.legend()
    ax.axis("equal")
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "mpc_unicycle.png", dpi=110)
    print(f"plot written to {args.out / 'mpc_unicycle.png'}")


if __name__ == "__main__":
    main()
