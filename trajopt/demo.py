"""Command-line demos of trajopt.

    python -m trajopt.demo [lqr] [--out DIR]
    python -m trajopt.demo solve PROBLEM [--mode ilqr|ddp] [--max-iter N] [--batch B]
                                 [--horizon T] [--x0 a,b,...] [--limit L|none]
    python -m trajopt.demo list

``solve`` runs iLQR / DDP on a classical problem (``list`` shows them), prints the
iteration log (cost, regularization, step size, expected vs actual reduction) and writes a
plot of states and controls.  ``lqr`` (the default) regulates two masses coupled by
springs (a classical benchmark, e.g. Wie & Bernstein 1992's two-mass problem with
m1 = m2 = 1, k = 1, sampled at
dt = 0.1 s with a zero-order hold): it solves the DARE with every available method, the
finite-horizon LQR from an initial displacement, prints both, and writes a PNG of the
trajectories.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg

from . import solve_dare, solve_lqr
from .dare.backends import slycot_available
from .errors import InvalidArgumentError
from .lqr import LQR


def two_mass_spring(dt: float = 0.1, k: float = 1.0, m1: float = 1.0, m2: float = 1.0):
    """Zero-order-hold discretization of x = (p1, p2, v1, v2), force on mass 1."""
    Ac = np.array([[0, 0, 1, 0], [0, 0, 0, 1], [-k / m1, k / m1, 0, 0], [k / m2, -k / m2, 0, 0]])
    Bc = np.array([[0.0], [0], [1 / m1], [0]])
    big = np.zeros((5, 5))
    big[:4, :4], big[:4, 4:] = Ac, Bc
    Md = scipy.linalg.expm(big * dt)
    return Md[:4, :4], Md[:4, 4:]


def demo_lqr(out: Path, horizon: int) -> int:
    A, B = two_mass_spring()
    Q, R = np.diag([10.0, 10.0, 1.0, 1.0]), np.array([[0.1]])
    print("Two-mass spring system, dt = 0.1 s, cost 1/2 x'Qx + 1/2 u'Ru, Q = diag(10, 10, 1, 1),"
          " R = 0.1\n")
    print(f"{'DARE method':<12} {'time [ms]':>10} {'residual':>10} {'rho(A+BK)':>10}")
    methods = ["scipy", "doubling", "auto"] + (["slycot"] if slycot_available() else [])
    dare = None
    for method in methods:
        solve_dare(A, B, Q, R, method=method)  # warm-up: first calls pay for imports
        t0 = time.perf_counter()
        sol = solve_dare(A, B, Q, R, method=method)
        ms = 1e3 * (time.perf_counter() - t0)
        rho = np.abs(sol.closed_loop_eigvals).max()
        print(f"{method:<12} {ms:>10.2f} {float(sol.residual):>10.1e} {rho:>10.4f}")
        dare = sol if method == "auto" else dare
    print(f"\nstationary gain (u = K x): K = {np.array2string(dare.K[0], precision=4)}")
    T = horizon
    prob = LQR(A=np.broadcast_to(A, (T, 4, 4)), B=np.broadcast_to(B, (T, 4, 1)),
               Q=np.broadcast_to(Q, (T, 4, 4)), R=np.broadcast_to(R, (T, 1, 1)), QT=dare.P)
    x0 = np.array([1.0, -0.5, 0.0, 0.0])
    fin = solve_lqr(prob, x0)
    print(f"finite horizon T = {T} from x0 = {x0}: optimal cost {float(fin.cost):.6f}, "
          f"value 1/2 x0'P0 x0 = {0.5 * x0 @ fin.P[0] @ x0:.6f}")
    print(f"max |P_0 - P_dare| = {np.abs(fin.P[0] - dare.P).max():.2e} (terminal cost = DARE)")
    return _plot(out, fin, dt=0.1)


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a hint) when not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: pip install 'trajopt-nnbridge[plot]' for the plot")
        return None
    return plt


def _plot(out: Path, fin, dt: float) -> int:
    plt = _pyplot()
    if plt is None:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    t = np.arange(fin.xs.shape[0]) * dt
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for i, lab in enumerate(["p1", "p2", "v1", "v2"]):
        ax1.plot(t, fin.xs[:, i], label=lab)
    ax1.set_ylabel("state")
    ax1.legend(ncol=4)
    ax1.set_title("Finite-horizon LQR, two-mass spring")
    ax2.step(t[:-1], fin.us[:, 0], where="post")
    ax2.set_ylabel("force u")
    ax2.set_xlabel("time [s]")
    fig.tight_layout()
    path = out / "lqr_two_mass.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot written to {path}")
    return 0


def demo_solve(name: str, mode: str, max_iter: int, batch: int, out: Path, seed: int, *,
               horizon: int | None = None, x0: list[float] | None = None,
               limit: float | str | None = None) -> int:
    """``horizon``: the problem's T (None: its default); ``x0``: its initial state;
    ``limit``: a symmetric control bound, "none" for none (None: the problem's)."""
    import dataclasses

    import torch

    from . import problems, solve_ddp
    from .errors import InvalidArgumentError

    p = problems.get(name) if horizon is None else problems.get(name, T=horizon)
    if x0 is not None:
        if len(x0) != p.n:
            raise InvalidArgumentError(f"--x0 has {len(x0)} numbers; {p.name} has n = {p.n} "
                                       f"states {p.state_names}")
        p = dataclasses.replace(p, x0=torch.tensor(x0, dtype=p.x0.dtype))
    if limit is not None:
        lims = None if limit == "none" else (
            torch.full((p.m,), -limit, dtype=p.x0.dtype),
            torch.full((p.m,), limit, dtype=p.x0.dtype))
        p = dataclasses.replace(p, control_limits=lims)
    x0 = p.x0
    if batch > 1:  # perturbed initial states around the default one
        gen = torch.Generator().manual_seed(seed)
        x0 = p.x0 + 0.1 * torch.randn(batch, p.n, generator=gen, dtype=p.x0.dtype)
    print(f"{p.name}: n={p.n}, m={p.m}, T={p.T}, dt={p.dt}, limits="
          f"{None if p.control_limits is None else float(p.control_limits[1][0])}, "
          f"mode={mode}, batch={batch}\n  parameters {p.parameters}\n  ({p.reference})")
    print(f"{'iter':>4} {'cost':>14} {'reg':>9} {'step':>7} {'expected':>10} {'actual':>10}"
          + ("   (batch element 0)" if batch > 1 else ""))

    def log(info):
        print(f"{info.iteration:>4} {float(info.cost[0]):>14.6f} "
              f"{float(info.regularization[0]):>9.2e} {float(info.step[0]):>7.4f} "
              f"{float(info.expected[0]):>10.3e} {float(info.actual[0]):>10.3e}")

    t0 = time.perf_counter()
    res = solve_ddp(p.dynamics, p.cost, x0, p.us0, mode=mode, max_iter=max_iter,
                    control_limits=p.control_limits, callback=log)
    elapsed = time.perf_counter() - t0
    reasons = {str(r): int(c) for r, c in zip(*np.unique(np.asarray(res.reason).ravel(),
                                                          return_counts=True))}
    print(f"done in {elapsed:.2f} s: {reasons}; cost "
          f"{np.asarray(res.cost).ravel()[0]:.6f}; final state "
          f"{np.array2string(np.asarray(res.xs).reshape(-1, p.T + 1, p.n)[0, -1], precision=3)}")
    return _plot_trajectory(out, p, res)


def _plot_trajectory(out: Path, p, res) -> int:
    plt = _pyplot()
    if plt is None:
        return 0
    xs = np.asarray(res.xs).reshape(-1, p.T + 1, p.n)
    us = np.asarray(res.us).reshape(-1, p.T, p.m)
    t = np.arange(p.T + 1) * p.dt
    planar = {"px", "py"} <= set(p.state_names)
    if planar:  # a vehicle: its path in the plane beside the time plots
        fig = plt.figure(figsize=(11, 5.5))
        axes = [fig.add_subplot(2, 2, 1), fig.add_subplot(2, 2, 3)]
        axes[1].sharex(axes[0])
        ax_xy = fig.add_subplot(1, 2, 2)
        ix, iy = p.state_names.index("px"), p.state_names.index("py")
        for b in range(min(len(xs), 16)):
            ax_xy.plot(xs[b, :, ix], xs[b, :, iy], "-", color="C0",
                       alpha=1.0 if b == 0 else 0.3)
        ax_xy.plot(xs[0, 0, ix], xs[0, 0, iy], "ko", label="start")
        ax_xy.plot(xs[0, -1, ix], xs[0, -1, iy], "r*", ms=12, label="end")
        ax_xy.set_xlabel("px")
        ax_xy.set_ylabel("py")
        ax_xy.axis("equal")
        ax_xy.legend(fontsize=8)
        ax_xy.set_title("path")
    else:
        fig, axes = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    for b in range(min(len(xs), 16)):
        for i, lab in enumerate(p.state_names):
            axes[0].plot(t, xs[b, :, i], color=f"C{i}", alpha=1.0 if b == 0 else 0.3,
                         label=lab if b == 0 else None)
        for j, lab in enumerate(p.control_names):
            axes[1].step(t[:-1], us[b, :, j], where="post", color=f"C{j}",
                         alpha=1.0 if b == 0 else 0.3, label=lab if b == 0 else None)
    if p.control_limits is not None:
        for v in (float(p.control_limits[0][0]), float(p.control_limits[1][0])):
            axes[1].axhline(v, color="k", lw=0.8, ls="--")
    axes[0].set_ylabel("state")
    axes[0].legend(ncol=4, fontsize=8)
    axes[0].set_title(f"{p.name}: optimal trajectory")
    axes[1].set_ylabel("control")
    axes[1].set_xlabel("time [s]")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ddp_{p.name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot written to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trajopt.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    p_lqr = sub.add_parser("lqr", help="LQR/DARE on a two-mass spring system (default)")
    p_solve = sub.add_parser("solve", help="iLQR/DDP on a classical problem")
    sub.add_parser("list", help="list the classical problems")
    # --out and --horizon before or after the command; the subcommands' copies must not
    # overwrite a value given before them with their default (argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("demo_out"),
                        help="folder for the plot (default: demo_out)")
    for p in (p_lqr, p_solve):
        p.add_argument("--out", type=Path, default=argparse.SUPPRESS,
                       help="folder for the plot (default: demo_out)")
    parser.add_argument("--horizon", type=int, default=None,
                        help="horizon T (lqr: default 100; solve: the problem's)")
    for p in (p_lqr, p_solve):
        p.add_argument("--horizon", type=int, default=argparse.SUPPRESS,
                       help="horizon T (lqr: default 100; solve: the problem's)")
    from .problems import names

    p_solve.add_argument("problem", choices=names())
    p_solve.add_argument("--mode", choices=["ilqr", "ddp"], default="ilqr")
    p_solve.add_argument("--max-iter", type=int, default=1000,
                         help="iteration cap (default 1000; the solver stops at convergence)")
    p_solve.add_argument("--x0", type=str, default=None,
                         help="initial state, comma-separated (default: the problem's)")
    p_solve.add_argument("--limit", type=str, default=None,
                         help="symmetric control bound |u_i| <= LIMIT, or 'none' "
                              "(default: the problem's)")
    p_solve.add_argument("--batch", type=int, default=1,
                         help="solve this many perturbed initial states at once")
    p_solve.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "list":
        from .problems import get

        for name in names():
            p = get(name)
            print(f"{name:<18} n={p.n} m={p.m} T={p.T}  {p.reference}")
        return 0
    if args.horizon is not None and args.horizon < 1:
        parser.error("--horizon must be a positive integer")
    if args.command == "solve":
        if args.max_iter < 0 or args.batch < 1:
            parser.error("--max-iter must be >= 0 and --batch >= 1")
        try:
            x0 = None if args.x0 is None else [float(v) for v in args.x0.split(",")]
            limit = None if args.limit is None else (
                "none" if args.limit.lower() == "none" else float(args.limit))
        except ValueError:
            parser.error("--x0 takes comma-separated numbers, --limit a number or 'none'")
        if isinstance(limit, float) and not limit > 0:
            parser.error("--limit must be positive (or 'none')")
        if x0 is not None and not all(math.isfinite(v) for v in x0):
            parser.error(f"--x0 must be finite numbers; got {args.x0}")
        try:
            return demo_solve(args.problem, args.mode, args.max_iter, args.batch, args.out,
                              args.seed, horizon=args.horizon, x0=x0, limit=limit)
        except InvalidArgumentError as exc:   # a wrong --x0 size: one line, as argparse's
            parser.error(str(exc))
    return demo_lqr(args.out, 100 if args.horizon is None else args.horizon)


if __name__ == "__main__":
    sys.exit(main())
