"""Receding-horizon control (MPC) of a unicycle with a warm-started DDP solver.

At every step the solver is restarted from the previous plan shifted by one step, a few
iterations are run, and the first control is applied to the (here: nominal) plant.

    python examples/mpc_unicycle.py [--out DIR] [--smoke]
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import trajopt  # noqa: E402
from trajopt import problems  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--smoke", action="store_true", help="tiny run for the test suite")
    args = ap.parse_args(argv)
    p = problems.unicycle(T=30)
    steps = 5 if args.smoke else 60
    solver = trajopt.DDPSolver(p.dynamics, p.cost, control_limits=p.control_limits,
                               max_iter=10)
    x, plan = p.x0, p.us0
    path = [x]
    for k in range(steps):
        res = solver.solve(x, plan)
        u = res.us[0]
        x = p.dynamics(x, u, 0)
        path.append(x)
        plan = torch.cat([res.us[1:], res.us[-1:]], 0)  # warm start: shift the plan
        if k % 10 == 0:
            print(f"step {k:3d}: x = {x.numpy().round(3)}, plan cost {float(res.cost):.4f}, "
                  f"{int(res.iterations)} iterations")
    path = torch.stack(path).numpy()
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
