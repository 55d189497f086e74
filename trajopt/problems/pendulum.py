"""Pendulum swing-up, and mpc.pytorch's pendulum for side-by-side comparison."""

from __future__ import annotations

import math

import torch

from ..ddp.constraints import Constraint
from ..ddp.models import Cost, CostDerivatives, Dynamics, QuadraticCost, discretize
from ._problem import Problem, limits


def pendulum(*, T: int = 100, dt: float = 0.05, m: float = 1.0, l: float = 1.0,
             g: float = 9.81, b: float = 0.1, u_max: float | None = 5.0,
             reach_goal: bool = False) -> Problem:
    r"""Damped pendulum swing-up from hanging (theta = 0) to upright (theta = pi).

    :math:`m l^2 \ddot\theta = u - b\dot\theta - m g l \sin\theta` (R. Tedrake,
    *Underactuated Robotics*, Ch. 2, with m = 1 kg, l = 1 m, b = 0.1 N m s), RK4 at
    dt = 0.05 s.  Cost ``1/2 (0.01 |x - x_goal|^2 + 0.1 u^2)`` per stage and
    ``1/2 (x - x_goal)' diag(100, 10) (x - x_goal)`` at T.  |u| <= 5 N m by default (less
    than m g l, so the pendulum must be pumped).

    ``reach_goal``: the terminal equality :math:`x_T = (\pi, 0)` (the problem's
    ``constraints``; the terminal cost alone stops 0.05 rad short).
    """
    def f(x, u):
        th, dth = x[..., 0], x[..., 1]
        ddth = (u[..., 0] - b * dth - m * g * l * torch.sin(th)) / (m * l * l)
        return torch.stack([dth, ddth], -1)

    goal = torch.tensor([math.pi, 0.0], dtype=torch.float64)
    cost = QuadraticCost(0.01 * torch.eye(2, dtype=torch.float64),
                         0.1 * torch.eye(1, dtype=torch.float64),
                         torch.diag(torch.tensor([100.0, 10.0], dtype=torch.float64)),
                         x_ref=goal)
    return Problem("pendulum", discretize(f, dt, "rk4"), cost,
                   torch.zeros(2, dtype=torch.float64), T, dt,
                   None if u_max is None else limits(u_max, 1), ("theta", "dtheta"), ("u",),
                   dict(m=m, l=l, g=g, b=b, u_max=u_max),
                   "R. Tedrake, Underactuated Robotics (MIT 6.832), Ch. 2 'The simple "
                   "pendulum'",
                   (Constraint(lambda x: x - goal.to(x), kind="equality", where="terminal",
                               name="goal"),) if reach_goal else ())


class MPCPendulumDynamics(Dynamics):
    """mpc.pytorch's ``mpc.env_dx.pendulum.PendulumDx`` (simple=True): state
    (cos th, sin th, dth), g = 10, m = 1, l = 1, dt = 0.05, torque clamped to [-2, 2],
    semi-implicit Euler: ``dth' = dth + dt (3 g / (2 l) sin th + 3 u / (m l^2))``,
    ``th' = th + dt dth'``."""

    def __init__(self, g=10.0, m=1.0, l=1.0, dt=0.05, max_torque=2.0):
        super().__init__(time_invariant=True)
        self.g, self.m, self.l, self.dt, self.max_torque = g, m, l, dt, max_torque

    def forward(self, x, u, t):
        u = torch.clamp(u[..., 0], -self.max_torque, self.max_torque)
        c, s, dth = x[..., 0], x[..., 1], x[..., 2]
        th = torch.atan2(s, c)
        new_dth = dth + self.dt * (3.0 * self.g / (2.0 * self.l) * s
                                   + 3.0 * u / (self.m * self.l ** 2))
        new_th = th + new_dth * self.dt
        return torch.stack([torch.cos(new_th), torch.sin(new_th), new_dth], -1)


class MPCPendulumCost(Cost):
    """mpc.pytorch's pendulum cost ``1/2 sum w_i x_i^2 + p'x + 1/2 0.001 u^2`` with
    ``w = (1, 1, 0.1)``, ``p = (-1, 0, 0)``, analytic derivatives, no terminal cost."""

    def __init__(self):
        super().__init__(time_invariant=True)
        self.w = torch.tensor([1.0, 1.0, 0.1], dtype=torch.float64)
        self.p = torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64)
        self.r = 0.001

    def running(self, x, u, t):
        w, p = self.w.to(x), self.p.to(x)
        # products with w and p, not (w * x * x).sum(-1): torch's CPU reduction over a
        # last dimension of 3 costs 0.45 ms for 25,600 points (T = 100, batch 256), the
        # matrix-vector product 0.03 ms
        return 0.5 * ((x * x) @ w) + x @ p + 0.5 * self.r * (u * u).sum(-1)

    def derivatives(self, x, u, t):
        w, p = self.w.to(x), self.p.to(x)
        N = x.shape[0]
        return CostDerivatives(lx=w * x + p, lu=self.r * u, lxx=torch.diag(w).expand(N, 3, 3),
                               luu=torch.full((N, 1, 1), self.r, dtype=x.dtype,
                                              device=x.device),
                               lux=x.new_zeros(N, 1, 3))


def mpc_pendulum(*, T: int = 100) -> Problem:
    """mpc.pytorch's pendulum problem with its own cost: per stage
    ``1/2 sum_i w_i tau_i^2 + p'tau`` over ``tau = (x, u)`` with
    ``w = (1, 1, 0.1, 0.001)``, ``p = (-1, 0, 0, 0)`` (``-sqrt(goal_weights) * goal``,
    goal (1, 0, 0) = upright), costed at x_0..x_{T-1}; x_T is not costed.  x0: at rest
    0.2 rad from hanging down, th0 = pi - 0.2 (exactly hanging down is a saddle point where
    every gradient vanishes by symmetry)."""
    dyn = MPCPendulumDynamics()
    th0 = math.pi - 0.2
    x0 = torch.tensor([math.cos(th0), math.sin(th0), 0.0], dtype=torch.float64)
    return Problem("mpc_pendulum", dyn, MPCPendulumCost(), x0, T, dyn.dt, limits(2.0, 1),
                   ("cos th", "sin th", "dth"), ("u",),
                   dict(g=10.0, m=1.0, l=1.0, dt=0.05, max_torque=2.0),
                   "mpc.pytorch 0.0.6, mpc/env_dx/pendulum.py (PendulumDx, simple=True)")
