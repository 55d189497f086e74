"""Swing a damped pendulum up with box-limited torque, by iLQR and by full DDP, and plot
both trajectories.

    python examples/pendulum_swingup.py [--out DIR] [--smoke]
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import trajopt  # noqa: E402
from trajopt import problems  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--smoke", action="store_true", help="tiny run for the test suite")
    args = ap.parse_args(argv)
    p = problems.pendulum(T=20 if args.smoke else 100)
    max_iter = 3 if args.smoke else 300
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for mode, style in (("ilqr", "-"), ("ddp", "--")):
        res = trajopt.solve_ddp(p.dynamics, p.cost, p.x0, p.us0, mode=mode,
                                control_limits=p.control_limits, max_iter=max_iter)
        print(f"{mode}: {res.reason.item()} after {int(res.iterations)} iterations, "
              f"cost {float(res.cost):.4f}")
        t = np.arange(p.T + 1) * p.dt
        ax1.plot(t, res.xs[:, 0].numpy(), style, label=f"theta ({mode})")
        ax2.step(t[:-1], res.us[:, 0].numpy(), style, where="post", label=mode)
    ax1.axhline(np.pi, color="k", lw=0.8)
    ax1.set_ylabel("angle [rad]")
    ax1.legend()
    ax2.set_ylabel("torque [N m]")
    ax2.set_xlabel("time [s]")
    ax2.legend()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "pendulum_swingup.png", dpi=110)
    print(f"plot written to {args.out / 'pendulum_swingup.png'}")


if __name__ == "__main__":
    main()
