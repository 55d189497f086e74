"""Two carts joined by a spring, one force each, both moved to their targets: solved as a
two-player cooperative game (GT-DDP, one player per force) and as DDP on the joint
control, and plotted.  With exact curvature the two coincide; a player whose curvature is
approximated (here: the second cart's force curvature replaced by a cruder, 4x larger
one, as a preconditioned network layer would be) still cooperates through Q_uv.

    python examples/two_carts_game.py [--out DIR] [--smoke]
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import trajopt  # noqa: E402

DT, STIFF, DAMP = 0.1, 2.0, 0.2
GOAL = torch.tensor([1.0, 0.0, 2.5, 0.0], dtype=torch.float64)  # p1, v1, p2, v2


def dynamics(x, u, t):
    p1, v1, p2, v2 = x.unbind(-1)
    spring = STIFF * (p2 - p1 - 1.0)          # rest length 1
    a1 = u[..., 0] + spring - DAMP * v1
    a2 = u[..., 1] - spring - DAMP * v2
    return torch.stack([p1 + DT * v1, v1 + DT * a1, p2 + DT * v2, v2 + DT * a2], -1)


def cost():
    return trajopt.Cost(lambda x, u, t: 0.05 * (u * u).sum(-1) + ((x - GOAL) ** 2).sum(-1),
                        lambda x: 50.0 * ((x - GOAL) ** 2).sum(-1), time_invariant=True)


class CrudePlayerTwo(trajopt.GTDDPSolver):
    """Player 2's curvature approximated by 4x its exact block (a cautious player)."""

    def player_curvature(self, t, i, block):
        return 4.0 * block if i == 1 else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--smoke", action="store_true", help="tiny run for the test suite")
    a = ap.parse_args(argv)
    T, max_iter = (10, 3) if a.smoke else (60, 100)
    dyn = trajopt.Dynamics(dynamics, time_invariant=True)
    x0 = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    us0 = torch.zeros(T, 2, dtype=torch.float64)
    game = trajopt.solve_ddp(dyn, cost(), x0, us0, players=(1, 1), max_iter=max_iter)
    joint = trajopt.solve_ddp(dyn, cost(), x0, us0, max_iter=max_iter)
    crude = CrudePlayerTwo(dyn, cost(), players=(1, 1), max_iter=max_iter).solve(x0, us0)
    for name, r in (("game (exact)", game), ("joint control", joint),
                    ("game, crude player 2", crude)):
        print(f"{name:22s} cost {float(r.cost):.6f}  {int(r.iterations)} iterations  "
              f"{r.reason.item()}")
    print(f"max |u_game - u_joint| = {float((game.us - joint.us).abs().max()):.2e}")
    t = np.arange(T + 1) * DT
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for r, style, name in ((game, "-", "game"), (joint, ":", "joint"),
                           (crude, "--", "crude player 2")):
        ax1.plot(t, r.xs[:, 0].numpy(), style, color="C0", label=f"cart 1 ({name})")
        ax1.plot(t, r.xs[:, 2].numpy(), style, color="C1", label=f"cart 2 ({name})")
        ax2.step(t[:-1], r.us[:, 0].numpy(), style, color="C0", where="post",
                 label=f"force 1 ({name})")
        ax2.step(t[:-1], r.us[:, 1].numpy(), style, color="C1", where="post",
                 label=f"force 2 ({name})")
    ax1.axhline(float(GOAL[0]), color="C0", lw=0.5)
    ax1.axhline(float(GOAL[2]), color="C1", lw=0.5)
    ax1.set(ylabel="position", title="two carts, a spring, two cooperative players")
    ax1.legend(fontsize=7, ncol=2)
    ax2.set(xlabel="time [s]", ylabel="force")
    ax2.legend(fontsize=7, ncol=2)
    a.out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(a.out / "two_carts_game.png", dpi=110)
    print(f"plot written to {a.out / 'two_carts_game.png'}")


if __name__ == "__main__":
    main()
