"""State, path and terminal constraints in DDP: the three problems of docs/constraints.md,
each solved with and without its constraints, in one picture.

* a unicycle to (2, 1) around two round obstacles on its unconstrained path;
* a cart-pole swing-up on a track |x| <= 0.4 m (unconstrained, the cart travels 0.69 m);
* a pendulum swing-up that must end exactly upright (x_T = (pi, 0)).

    python examples/constrained.py [--out DIR] [--smoke]
"""

import argparse
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import trajopt  # noqa: E402
from trajopt import problems  # noqa: E402

OBSTACLES = ((1.0, 0.1, 0.25), (1.7, 0.6, 0.2))


def _solve(p, constrained: bool, max_iter: int):
    t0 = time.perf_counter()
    res = trajopt.solve_ddp(p.dynamics, p.cost, p.x0, p.us0, control_limits=p.control_limits,
                            constraints=p.constraints if constrained else None,
                            max_iter=max_iter)
    seconds = time.perf_counter() - t0
    viol = "" if res.max_violation is None else f", max violation {float(res.max_violation):.1e}"
    print(f"{p.name:9s} {'constrained' if constrained else 'free':11s}: {res.reason}, cost "
          f"{float(res.cost):.5f}, {int(res.iterations)} iterations, {seconds:.1f} s{viol}")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--smoke", action="store_true", help="short horizons for the test suite")
    args = ap.parse_args(argv)
    T = 30 if args.smoke else None
    uni = problems.unicycle(obstacles=OBSTACLES, **({} if T is None else dict(T=T, dt=0.27)))
    cart = problems.cartpole(track=0.4, **({} if T is None else dict(T=T, dt=0.15)))
    pend = problems.pendulum(reach_goal=True, **({} if T is None else dict(T=T, dt=0.15)))
    it = 40 if args.smoke else 1000
    results = {p.name: (p, _solve(p, False, it), _solve(p, True, it))
               for p in (uni, cart, pend)}

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    p, free, con = results["unicycle"]
    ax = axes[0]
    for cx, cy, r in OBSTACLES:
        ax.add_patch(plt.Circle((cx, cy), r, color="0.8"))
    ax.plot(free.xs[:, 0], free.xs[:, 1], ".-", ms=3, label="free")
    ax.plot(con.xs[:, 0], con.xs[:, 1], ".-", ms=3, label="around the obstacles")
    ax.plot([2.0], [1.0], "r*", ms=12)
    ax.set_aspect("equal")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title("unicycle")
    ax.legend(loc="upper left", fontsize=8)
    p, free, con = results["cartpole"]
    ax = axes[1]
    t = torch.arange(p.T + 1) * p.dt
    ax.plot(t, free.xs[:, 0], label="cart position, free")
    ax.plot(t, con.xs[:, 0], label="on the track")
    for s in (-0.4, 0.4):
        ax.axhline(s, color="k", lw=0.8, ls="--")
    ax.plot(t, con.xs[:, 1] / math.pi, ":", label="pole angle / pi (on the track)")
    ax.set_xlabel("t [s]")
    ax.set_title("cart-pole, track |x| <= 0.4 m")
    ax.legend(fontsize=8)
    p, free, con = results["pendulum"]
    ax = axes[2]
    t = torch.arange(p.T + 1) * p.dt
    ax.plot(t, free.xs[:, 0], label=f"free: theta_T = {float(free.xs[-1, 0]):.4f}")
    ax.plot(t, con.xs[:, 0], label=f"x_T = goal: theta_T = {float(con.xs[-1, 0]):.6f}")
    ax.axhline(math.pi, color="k", lw=0.8, ls="--")
    ax.set_xlabel("t [s]")
    ax.set_ylabel("theta")
    ax.set_title("pendulum, terminal equality")
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "constraints.png"
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
