"""The constrained test problems written out for casadi + IPOPT (multiple shooting).

The reference for ``solve_ddp(..., constraints=...)``: the same discretized optimal-control
problems (RK4 steps of the same continuous dynamics, the same quadratic costs and
constraints), written here with casadi's symbols and solved by IPOPT's interior-point
method.  Nothing is shared with trajopt: the dynamics, costs and constraints are typed
again from the problem descriptions in ``trajopt/problems``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

ca = None  # imported on first use (casadi is a test extra)


def _casadi():
    global ca
    if ca is None:
        import casadi
        ca = casadi
    return ca


@dataclass
class OCP:
    """One discretized problem: ``f(x, u)`` continuous dynamics (casadi), RK4 step ``dt``,
    quadratic costs around ``goal``, control bound ``u_max``, constraints as functions
    of casadi vectors: ``path_ineq(x) <= 0`` (every stage 0..T and the final state),
    ``final_eq(x) == 0``."""

    n: int
    m: int
    T: int
    dt: float
    f: object
    Q: np.ndarray
    R: np.ndarray
    QT: np.ndarray
    goal: np.ndarray
    u_max: float | None
    path_ineq: object = None
    final_eq: object = None


def pendulum_goal(T=100, dt=0.05, reach_goal=True) -> OCP:
    m, l, g, b = 1.0, 1.0, 9.81, 0.1

    def f(x, u):
        return ca.vertcat(x[1], (u[0] - b * x[1] - m * g * l * ca.sin(x[0])) / (m * l * l))
    goal = np.array([math.pi, 0.0])
    return OCP(2, 1, T, dt, f, 0.01 * np.eye(2), 0.1 * np.eye(1), np.diag([100.0, 10.0]),
               goal, 5.0, final_eq=(lambda x: x - goal) if reach_goal else None)


def cartpole_track(T=100, dt=0.05, track=0.4) -> OCP:
    mc, mp, l, g = 1.0, 0.1, 0.5, 9.8

    def f(x, u):
        s, c = ca.sin(x[1]), ca.cos(x[1])
        den = mc + mp * s * s
        ddx = (u[0] + mp * s * (l * x[3] ** 2 + g * c)) / den
        ddth = (-u[0] * c - mp * l * x[3] ** 2 * c * s - (mc + mp) * g * s) / (l * den)
        return ca.vertcat(x[2], x[3], ddx, ddth)
    return OCP(4, 1, T, dt, f, np.diag([0.1, 0.1, 0.01, 0.01]), 0.01 * np.eye(1),
               np.diag([100.0, 100.0, 10.0, 10.0]), np.array([0.0, math.pi, 0.0, 0.0]),
               10.0, path_ineq=lambda x: ca.vertcat(x[0] - track, -x[0] - track))


def unicycle_obstacles(T=80, dt=0.1, obstacles=((1.0, 0.1, 0.25), (1.7, 0.6, 0.2))) -> OCP:
    def f(x, u):
        return ca.vertcat(u[0] * ca.cos(x[2]), u[0] * ca.sin(x[2]), u[1])

    def outside(x):
        return ca.vertcat(*[r * r - (x[0] - cx) ** 2 - (x[1] - cy) ** 2
                            for cx, cy, r in obstacles])
    return OCP(3, 2, T, dt, f, 0.001 * np.eye(3), 0.1 * np.eye(2), 100.0 * np.eye(3),
               np.array([2.0, 1.0, math.pi / 2]), 2.0, path_ineq=outside)


def _rk4(ocp: OCP, x, u):
    h = ocp.dt
    k1 = ocp.f(x, u)
    k2 = ocp.f(x + h / 2 * k1, u)
    k3 = ocp.f(x + h / 2 * k2, u)
    k4 = ocp.f(x + h * k3, u)
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def solve(ocp: OCP, x0, xs_init, us_init, tol: float = 1e-10, max_iter: int = 3000,
          near: bool = False, u_bounds=None) -> dict:
    """IPOPT on the multiple-shooting NLP from the initial guess ``xs_init`` (T+1, n),
    ``us_init`` (T, m).  Returns xs, us, cost, max_violation, the solver status and the
    wall time of ``solver(...)`` (the NLP is built before the clock starts).

    ``near``: the guess is taken to be near a solution (a small initial barrier parameter
    and bound push, so that IPOPT polishes the guess instead of first moving into the
    interior, where it may find another local optimum).

    ``u_bounds``: ``(lo, hi)`` arrays (T, m), a bound per stage and control, instead of
    ``ocp.u_max``."""
    _casadi()
    n, m, T = ocp.n, ocp.m, ocp.T
    X = ca.SX.sym("X", n, T + 1)
    U = ca.SX.sym("U", m, T)
    J = 0
    g, lbg, ubg = [X[:, 0] - np.asarray(x0)], [0.0] * n, [0.0] * n
    for t in range(T):
        dx, du = X[:, t] - ocp.goal, U[:, t]
        J += 0.5 * ca.dot(dx, ca.mtimes(ocp.Q, dx)) + 0.5 * ca.dot(du, ca.mtimes(ocp.R, du))
        g.append(X[:, t + 1] - _rk4(ocp, X[:, t], U[:, t]))
        lbg += [0.0] * n
        ubg += [0.0] * n
    dT = X[:, T] - ocp.goal
    J += 0.5 * ca.dot(dT, ca.mtimes(ocp.QT, dT))
    for t in range(T + 1):
        if ocp.path_ineq is not None:
            c = ocp.path_ineq(X[:, t])
            g.append(c)
            lbg += [-ca.inf] * c.shape[0]
            ubg += [0.0] * c.shape[0]
    if ocp.final_eq is not None:
        c = ocp.final_eq(X[:, T])
        g.append(c)
        lbg += [0.0] * c.shape[0]
        ubg += [0.0] * c.shape[0]
    w = ca.vertcat(ca.reshape(X, -1, 1), ca.reshape(U, -1, 1))
    lbw = [-ca.inf] * (n * (T + 1)) + ([-ocp.u_max] * (m * T) if ocp.u_max else
                                       [-ca.inf] * (m * T))
    ubw = [ca.inf] * (n * (T + 1)) + ([ocp.u_max] * (m * T) if ocp.u_max else
                                      [ca.inf] * (m * T))
    if u_bounds is not None:   # U is stacked stage by stage (column-major (m, T))
        lbw[n * (T + 1):] = np.broadcast_to(np.asarray(u_bounds[0], float), (T, m)).ravel()
        ubw[n * (T + 1):] = np.broadcast_to(np.asarray(u_bounds[1], float), (T, m)).ravel()
    nlp = {"x": w, "f": J, "g": ca.vertcat(*g)}
    opts = {"ipopt.tol": tol, "ipopt.constr_viol_tol": 1e-10, "ipopt.print_level": 0,
            "print_time": False, "ipopt.max_iter": max_iter}
    if near:
        opts.update({"ipopt.mu_init": 1e-9, "ipopt.bound_push": 1e-9,
                     "ipopt.bound_frac": 1e-9, "ipopt.slack_bound_push": 1e-9,
                     "ipopt.slack_bound_frac": 1e-9})
    solver = ca.nlpsol("ipopt", "ipopt", nlp, opts)
    w0 = np.concatenate([np.asarray(xs_init, float).T.reshape(-1, order="F"),
                         np.asarray(us_init, float).T.reshape(-1, order="F")])
    t0 = time.perf_counter()
    sol = solver(x0=w0, lbx=lbw, ubx=ubw, lbg=lbg, ubg=ubg)
    wall = time.perf_counter() - t0
    wv = np.asarray(sol["x"]).reshape(-1)
    xs = wv[:n * (T + 1)].reshape(T + 1, n)
    us = wv[n * (T + 1):].reshape(T, m)
    gv = np.asarray(sol["g"]).reshape(-1)
    viol = max(float(np.max(np.maximum(np.asarray(lbg) - gv, 0))),
               float(np.max(np.maximum(gv - np.asarray(ubg), 0))))
    return dict(xs=xs, us=us, cost=float(sol["f"]), max_violation=viol,
                status=solver.stats()["return_status"], time=wall,
                iterations=solver.stats()["iter_count"])
