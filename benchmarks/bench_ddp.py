"""DDP / iLQR benchmark against mpc.pytorch and crocoddyl, ratios in one run.

    python benchmarks/bench_ddp.py [--quick] [--skip-mpc]

* mpc.pytorch (``pip install mpc``, v0.0.6) pins numpy < 2, so it runs in its own virtual
  environment: ``$MPC_PYTHON`` if set, else ``~/.cache/trajopt-bench/mpc-venv`` (created
  on first use with ``pip install torch==2.13.0 'numpy<2' mpc matplotlib``).  Its pendulum
  (PendulumDx, its own cost, |u| <= 2, T = 100) is solved by both from the same initial
  states with the same iteration cap.  mpc.pytorch stops when the Euclidean norm of the
  whole control change of an iteration, ``||u_new - u||_2`` over all stages, is below
  ``eps`` for every element.  trajopt's test is relative to the controls:
  ``max_t,i |k_t,i| <= sqrt(tol) * max_t,i |u_t,i|`` (or an accepted step lowering the
  cost by less than ``tol * |J|``).  A pendulum swing-up saturates its limit
  (``max |u| = u_max = 2``), so ``tol = (eps / u_max)^2`` makes ours ``max |k| <= eps``,
  the same size of step as theirs measured in the max-norm instead of the 2-norm (with
  the old absolute test it was ``tol = eps^2``).  Both final control sequences are scored
  with the same rollout.
* crocoddyl (``pip install crocoddyl``): an LQ problem (ActionModelLQR) and an Euler
  pendulum written as a Python ActionModelAbstract with analytic derivatives, solved by
  SolverDDP with ``reg_min = 0``; crocoddyl solves one problem per call, so 256 problems
  are a loop.
Times are wall clock, best of 1-3 runs after a warm-up run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import trajopt  # noqa: E402
from trajopt import problems  # noqa: E402

F64 = dict(dtype=torch.float64)


#: with more than one repetition asked for, a fast case is repeated until its runs add up
#: to this many seconds (as ``timeit``'s autorange): the best of 3 runs of a 2 ms solve
#: moves by 10-20 % on a shared machine, the best of ~100 by a few percent; every peer
#: is timed the same way
MIN_TOTAL_S = 0.25


def timed(fn, repeat=1):
    """``(best time, last result)`` of ``fn`` after one warm-up call: the best of
    ``repeat`` runs, and for ``repeat > 1`` of as many more as fit in
    :data:`MIN_TOTAL_S`."""
    fn()
    best, out, total, runs = math.inf, None, 0.0, 0
    while runs < repeat or (repeat > 1 and total < MIN_TOTAL_S):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        best, total, runs = min(best, dt), total + dt, runs + 1
    return best, out


# --------------------------------------------------------------------------- mpc.pytorch
def mpc_python() -> str | None:
    if os.environ.get("MPC_PYTHON"):
        return os.environ["MPC_PYTHON"]
    venv = Path.home() / ".cache" / "trajopt-bench" / "mpc-venv"
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"creating {venv} for mpc.pytorch (numpy < 2) ...", file=sys.stderr)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0",
                            "numpy<2", "mpc", "matplotlib"], check=True)
        except (subprocess.CalledProcessError, OSError) as exc:
            print(f"could not set up mpc.pytorch: {exc}", file=sys.stderr)
            return None
    return str(py)


def run_mpc(py, batch, T, eps, max_iter, seed):
    out = subprocess.run([py, str(ROOT / "benchmarks" / "_mpc_pytorch_pendulum.py"),
                          str(batch), str(T), str(eps), str(max_iter), str(seed)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def rows_mpc(batch, T, max_iter, eps, rep):
    py = mpc_python()
    p = problems.mpc_pendulum(T=T)
    rows = []
    seed = 0
    th = math.pi - 0.2 + 0.1 * torch.randn(batch, generator=torch.Generator().manual_seed(seed),
                                            **F64)
    if batch == 1:
        th = torch.tensor([math.pi - 0.2], **F64)
    x0 = torch.stack([torch.cos(th), torch.sin(th), torch.zeros_like(th)], 1)
    u_max = float(p.control_limits[1].abs().max())  # the swing-up saturates: max|u| = u_max
    solver = trajopt.DDPSolver(p.dynamics, p.cost, control_limits=p.control_limits,
                               max_iter=max_iter, tol=(eps / u_max) ** 2)
    t_ours, res = timed(lambda: solver.solve(x0, torch.zeros(batch, T, 1, **F64)), rep)
    cost_ours = res.cost
    label = f"mpc.pytorch pendulum T={T}, batch {batch}"
    rows.append((label, "trajopt iLQR", t_ours, float(cost_ours.mean()),
                 f"{int(res.converged.sum())}/{batch} converged, "
                 f"{res.iterations.float().mean():.0f} it"))
    if py is None:
        rows.append((label, "mpc.pytorch", math.nan, math.nan, "not available"))
        return rows
    d = run_mpc(py, batch, T, eps, max_iter, seed)
    us = torch.tensor(d["us"], **F64)
    x0m = torch.tensor(d["x0"], **F64)
    cost_mpc = solver.rollout(x0m, list(us.unbind(1))).cost
    rows.append((label, "mpc.pytorch", d["time"], float(cost_mpc.mean()),
                 f"lqr_iter={max_iter}, eps={eps}"))
    return rows


# --------------------------------------------------------------------------- crocoddyl
def crocoddyl_models():
    import crocoddyl

    DT, G, B = 0.1, 9.81, 0.3
    Q, R, QT = np.diag([1.0, 0.1]), 0.05, np.diag([50.0, 5.0])
    goal = np.array([np.pi, 0.0])

    class Pendulum(crocoddyl.ActionModelAbstract):
        def __init__(self, terminal=False):
            crocoddyl.ActionModelAbstract.__init__(self, crocoddyl.StateVector(2), 1, 1)
            self.terminal = terminal

        def calc(self, data, x, u=None):
            d = x - goal
            if u is None or self.terminal:
                data.cost = 0.5 * d @ QT @ d
                data.xnext[:] = x
                return
            data.xnext[:] = [x[0] + DT * x[1],
                             x[1] + DT * (u[0] - B * x[1] - G * np.sin(x[0]))]
            data.cost = 0.5 * d @ Q @ d + 0.5 * R * u[0] ** 2

        def calcDiff(self, data, x, u=None):
            d = x - goal
            if u is None or self.terminal:
                data.Lx[:] = QT @ d
                data.Lxx[:] = QT
                return
            data.Fx[:] = [[1.0, DT], [-DT * G * np.cos(x[0]), 1 - DT * B]]
            data.Fu[:] = [0.0, DT]
            data.Lx[:] = Q @ d
            data.Lu[:] = [R * u[0]]
            data.Lxx[:] = Q
            data.Luu[:] = [[R]]
            data.Lxu[:] = 0

    def f(x, u, t):
        th, w = x[..., 0], x[..., 1]
        return torch.stack([th + DT * w, w + DT * (u[..., 0] - B * w - G * torch.sin(th))], -1)

    cost = trajopt.QuadraticCost(Q, R * np.eye(1), QT, x_ref=goal)
    return Pendulum, trajopt.Dynamics(f, time_invariant=True), cost


def croc_solve(crocoddyl, running, terminal, x0, T, m, maxiter=200, solver="SolverDDP",
               rollout=False):
    """crocoddyl's solve from the zero controls and the states ``[x0] * (T + 1)`` (its
    usual start, infeasible: FDDP closes the gaps in its first step) or, with
    ``rollout``, the states of the zero controls (the feasible start trajopt's DDP takes
    from ``us0``)."""
    prob = crocoddyl.ShootingProblem(x0, [running] * T, terminal)
    s = getattr(crocoddyl, solver)(prob)
    s.reg_min = 0.0
    us = [np.zeros(m)] * T
    s.solve(list(prob.rollout(us)) if rollout else [x0] * (T + 1), us, maxiter)
    return s.cost, s.iter


# ------------------------------------------------------------- the single problems
def user_pendulum():
    """The Euler pendulum of :func:`crocoddyl_models` as a user writes it for trajopt: a
    plain ``f(x, u, t)`` and ``trajopt.Cost(running, terminal)``, no flags (the
    derivatives come from autograd / torch.func; neither function reads ``t``, which
    trajopt finds out itself: ``trajopt.ddp.stage_argument``)."""
    DT, G, B = 0.1, 9.81, 0.3
    Q = torch.diag(torch.tensor([1.0, 0.1], **F64))
    QT = torch.diag(torch.tensor([50.0, 5.0], **F64))
    R = 0.05
    goal = torch.tensor([math.pi, 0.0], **F64)

    def f(x, u, t):
        th, w = x[..., 0], x[..., 1]
        return torch.stack([th + DT * w, w + DT * (u[..., 0] - B * w - G * torch.sin(th))],
                           -1)

    def running(x, u, t):
        d = x - goal
        return 0.5 * ((d @ Q) * d).sum(-1) + 0.5 * R * (u ** 2).sum(-1)

    def terminal(x):
        d = x - goal
        return 0.5 * ((d @ QT) * d).sum(-1)

    return f, trajopt.Cost(running, terminal)


def row_pendulum(T=100, rep=3):
    """One pendulum swing-up, trajopt with the user-written model (:func:`user_pendulum`)
    against crocoddyl FDDP with the Python action model, same x0 (theta = 0.3 * N(0,1)
    with seed 0), same costs."""
    rng = np.random.default_rng(0)
    x0 = np.array([0.3 * rng.normal(), 0.0])
    f, cost = user_pendulum()
    solver = trajopt.DDPSolver(f, cost)
    t_o, r = timed(lambda: solver.solve(torch.tensor(x0), torch.zeros(T, 1, **F64)), rep)
    # the same from crocoddyl's start: multiple shooting from the states [x0] * (T + 1)
    shooter = trajopt.DDPSolver(f, cost, shooting="multiple")
    guess = torch.tensor(x0).expand(T + 1, 2)
    t_m, r_m = timed(lambda: shooter.solve(torch.tensor(x0), torch.zeros(T, 1, **F64),
                                           xs0=guess), rep)
    row = dict(figure=f"pendulum swing-up T={T}, user-written f(x, u, t) and Cost, vs "
                      f"crocoddyl FDDP (Python action model)", goal=3.0,
               trajopt_ms=1e3 * t_o, trajopt_note=f"{int(r.iterations)} it, cost "
                                                  f"{float(r.cost):.6g}")
    try:
        import crocoddyl
    except ImportError:
        return dict(row, peer="crocoddyl not installed")
    Pendulum, _, _ = crocoddyl_models()
    t_c, (c, it) = timed(lambda: croc_solve(crocoddyl, Pendulum(), Pendulum(True), x0, T, 1,
                                            solver="SolverFDDP"), rep)
    # the same from trajopt's start (the rollout of the zero controls): how much of the
    # ratio is crocoddyl's infeasible start, which takes fewer iterations on this problem
    t_r, (_, it_r) = timed(lambda: croc_solve(crocoddyl, Pendulum(), Pendulum(True), x0, T,
                                              1, solver="SolverFDDP", rollout=True), rep)
    return dict(row, peer="crocoddyl FDDP", peer_ms=1e3 * t_c,
                peer_note=f"{it} it, cost {c:.6g}; from trajopt's start, the rollout of "
                          f"the zero controls: {it_r} it, {1e3 * t_r:.1f} ms, ratio "
                          f"{t_o / t_r:.2f}x; trajopt from crocoddyl's start "
                          f"(shooting='multiple', xs0 = [x0] * (T + 1)): "
                          f"{int(r_m.iterations)} it, {1e3 * t_m:.1f} ms, ratio "
                          f"{t_m / t_c:.2f}x")


def row_lq(T=100, rep=3, linear=False):
    """One LQ problem n=8 m=3 (QuadraticCost, linear dynamics) against crocoddyl's C++
    ActionModelLQR with SolverDDP, reg_min = 0 (as in :func:`rows_crocoddyl`).  The
    dynamics are a user-written callable, or with ``linear`` a
    ``trajopt.LinearDynamics`` (analytic derivatives, scanned rollouts: the model that
    corresponds to crocoddyl's LQR action model)."""
    rng = np.random.default_rng(0)
    n, m = 8, 3
    A = np.eye(n) + 0.1 * rng.normal(size=(n, n))
    Bm = 0.1 * rng.normal(size=(n, m))
    Q, R = np.eye(n), 0.1 * np.eye(m)
    x0 = rng.normal(size=(1, n))[0]
    At, Bt = torch.tensor(A), torch.tensor(Bm)
    dyn = trajopt.LinearDynamics(At, Bt) if linear else \
        trajopt.Dynamics(lambda x, u, t: x @ At.T + u @ Bt.T, time_invariant=True)
    cost = trajopt.QuadraticCost(Q, R, Q)
    t_o, r = timed(lambda: trajopt.solve_ddp(dyn, cost, torch.tensor(x0),
                                             torch.zeros(T, m, **F64)), rep)
    dyn_name = "LinearDynamics" if linear else "a callable"
    row = dict(figure=f"LQ n={n} m={m} T={T} (QuadraticCost, {dyn_name}), solve_ddp vs "
                      f"crocoddyl C++ ActionModelLQR (reg_min 0)", goal=5.0,
               trajopt_ms=1e3 * t_o,
               trajopt_note=f"{int(r.iterations)} it, cost {float(r.cost):.6g}")
    try:
        import crocoddyl
    except ImportError:
        return dict(row, peer="crocoddyl not installed")
    zn, zm = np.zeros(n), np.zeros(m)
    model = crocoddyl.ActionModelLQR(A, Bm, Q, R, np.zeros((n, m)), zn, zn, zm)
    t_c, (c, it) = timed(lambda: croc_solve(crocoddyl, model, model, x0, T, m), rep)
    return dict(row, peer="crocoddyl DDP", peer_ms=1e3 * t_c,
                peer_note=f"{it} it, cost {c:.6g}")


def mpc_steps(T=50, iterations=3, steps=20, states=True):
    """Closed-loop MPC on ``problems.cartpole``: a persistent DDPSolver (max_iter =
    ``iterations``), each step warm-started from the previous solution shifted by one
    stage -- the controls and, with ``states`` (default), their states as ``xs0`` (the
    solver checks them in one batched call instead of rolling the controls out) --, the
    plant advanced by the first control.  Returns the step times [s] (after two warm-up
    steps) and the last result."""
    p = problems.cartpole(T=T)
    solver = trajopt.DDPSolver(p.dynamics, p.cost, control_limits=p.control_limits,
                               max_iter=iterations)
    x, us, xs = p.x0.clone(), torch.zeros(T, 1, **F64), None
    times, r = [], None
    for i in range(steps + 2):
        t0 = time.perf_counter()
        r = solver.solve(x, us, xs0=xs)
        if i >= 2:
            times.append(time.perf_counter() - t0)
        x = r.xs[1].clone()
        us = torch.cat([r.us[1:], r.us[-1:]], 0)
        xs = torch.cat([r.xs[1:], r.xs[-1:]], 0) if states else None
    return times, r


def row_mpc_step(T=50, steps=20):
    times, r = mpc_steps(T, 3, steps)
    times = sorted(times)
    return dict(figure=f"MPC step, cart-pole T={T}, 3 iterations, warm start (median of "
                       f"{steps} closed-loop steps)", goal=50.0, goal_kind="ms",
                trajopt_ms=1e3 * times[len(times) // 2],
                trajopt_note=f"min {1e3 * times[0]:.1f} / max {1e3 * times[-1]:.1f} ms")


def rows_crocoddyl(batch, T, rep):
    try:
        import crocoddyl
    except ImportError:
        return [("crocoddyl", "not installed", math.nan, math.nan, "pip install crocoddyl")]
    rows = []
    rng = np.random.default_rng(0)
    # LQ problem
    n, m = 8, 3
    A = np.eye(n) + 0.1 * rng.normal(size=(n, n))
    Bm = 0.1 * rng.normal(size=(n, m))
    Q, R, N = np.eye(n), 0.1 * np.eye(m), np.zeros((n, m))
    zn, zm = np.zeros(n), np.zeros(m)
    running = crocoddyl.ActionModelLQR(A, Bm, Q, R, N, zn, zn, zm)
    terminal = crocoddyl.ActionModelLQR(A, Bm, Q, R, N, zn, zn, zm)
    X0 = rng.normal(size=(batch, n))
    t_c1, (c1, _) = timed(lambda: croc_solve(crocoddyl, running, terminal, X0[0], T, m), rep)
    t_cb, _ = timed(lambda: [croc_solve(crocoddyl, running, terminal, X0[i], T, m)
                             for i in range(batch)], 1)
    At, Bt = torch.tensor(A), torch.tensor(Bm)
    dyn = trajopt.Dynamics(lambda x, u, t: x @ At.T + u @ Bt.T, time_invariant=True)
    cost = trajopt.QuadraticCost(Q, R, Q)
    x0 = torch.tensor(X0)
    t_o1, r1 = timed(lambda: trajopt.solve_ddp(dyn, cost, x0[0], torch.zeros(T, m, **F64)),
                     rep)
    t_ob, rb = timed(lambda: trajopt.solve_ddp(dyn, cost, x0, torch.zeros(batch, T, m, **F64)),
                     rep)
    lab = f"LQ n={n} m={m} T={T}"
    rows += [(lab + ", one problem", "crocoddyl SolverDDP (C++ model)", t_c1, c1, ""),
             ("", "trajopt iLQR", t_o1, float(r1.cost), f"{int(r1.iterations)} it"),
             (lab + f", {batch} problems", "crocoddyl, looped", t_cb, math.nan, ""),
             ("", "trajopt iLQR, batched", t_ob, float(rb.cost.mean()),
              f"{int(rb.converged.sum())}/{batch} converged")]
    # pendulum
    Pendulum, pdyn, pcost = crocoddyl_models()
    run_m, term_m = Pendulum(), Pendulum(True)
    th0 = 0.3 * rng.normal(size=batch)
    X0 = np.stack([th0, np.zeros(batch)], 1)
    t_c1, (c1, it1) = timed(lambda: croc_solve(crocoddyl, run_m, term_m, X0[0], T, 1), rep)
    t_cb, _ = timed(lambda: [croc_solve(crocoddyl, run_m, term_m, X0[i], T, 1)
                             for i in range(batch)], 1)
    x0 = torch.tensor(X0)
    t_o1, r1 = timed(lambda: trajopt.solve_ddp(pdyn, pcost, x0[0], torch.zeros(T, 1, **F64)),
                     rep)
    t_ob, rb = timed(lambda: trajopt.solve_ddp(pdyn, pcost, x0, torch.zeros(batch, T, 1, **F64)),
                     rep)
    lab = f"Euler pendulum T={T}"
    rows += [(lab + ", one problem", "crocoddyl SolverDDP (Python model)", t_c1, c1,
              f"{it1} it"),
             ("", "trajopt iLQR", t_o1, float(r1.cost), f"{int(r1.iterations)} it"),
             (lab + f", {batch} problems", "crocoddyl, looped", t_cb, math.nan, ""),
             ("", "trajopt iLQR, batched", t_ob, float(rb.cost.mean()),
              f"{int(rb.converged.sum())}/{batch} converged")]
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-mpc", action="store_true")
    args = ap.parse_args()
    rep = 1 if args.quick else 2
    batch = 16 if args.quick else 256
    T = 30 if args.quick else 100
    print(f"# trajopt DDP benchmark — torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), CPU\n")
    groups = []
    if not args.skip_mpc:
        groups.append(rows_mpc(1, T, 5 if args.quick else 100, 1e-4, 1))
        groups.append(rows_mpc(batch, T, 5 if args.quick else 100, 1e-4, 1))
    groups.append(rows_crocoddyl(batch, T, rep))
    print("| case | solver | time [ms] | ratio | mean final cost | notes |")
    print("|---|---|---:|---:|---:|---|")
    for rows in groups:
        for i in range(0, len(rows), 2):
            pair = rows[i:i + 2]
            ours = [r for r in pair if r[1].startswith("trajopt")]
            base = ours[0][2] if ours else math.nan
            for case, solver, t, cost, note in pair:
                ratio = t / base if base == base and base > 0 else math.nan
                print(f"| {case} | {solver} | {1e3 * t:.1f} | {ratio:.2f}x | {cost:.6g} | {note} |")
    print("\nratio = time / trajopt's time in the same case (above 1: trajopt is faster).")


if __name__ == "__main__":
    main()
