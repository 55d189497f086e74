"""Acrobot swing-up."""

from __future__ import annotations

import math

import torch

from ..ddp.models import QuadraticCost, discretize
from ._problem import Problem, limits


def acrobot(*, T: int = 150, dt: float = 0.05, m1: float = 1.0, m2: float = 1.0,
            l1: float = 1.0, lc1: float = 0.5, lc2: float = 0.5, I1: float = 1.0 / 12,
            I2: float = 1.0 / 12, g: float = 9.8, u_max: float | None = 10.0) -> Problem:
    r"""Acrobot (torque at the elbow only) from hanging to upright.

    Manipulator equations :math:`M(q)\ddot q + C(q,\dot q)\dot q = \tau_g(q) + (0, u)`
    as in R. Tedrake, *Underactuated Robotics*, Ch. 3 (Spong's acrobot), with uniform
    1 m, 1 kg links (I about the center of mass = m l^2 / 12).  q = (theta1, theta2),
    theta1 = 0 hanging down; goal (pi, 0, 0, 0).  RK4 at 0.05 s, |u| <= 10 N m.
    """
    def f(x, u):
        q1, q2, dq1, dq2 = x[..., 0], x[..., 1], x[..., 2], x[..., 3]
        c2, s1, s2, s12 = torch.cos(q2), torch.sin(q1), torch.sin(q2), torch.sin(q1 + q2)
        M11 = I1 + I2 + m2 * l1 * l1 + 2 * m2 * l1 * lc2 * c2 + m1 * lc1 ** 2 + m2 * lc2 ** 2
        M12 = I2 + m2 * l1 * lc2 * c2 + m2 * lc2 ** 2
        M22 = I2 + m2 * lc2 ** 2 + 0 * c2
        h = m2 * l1 * lc2 * s2
        C1 = -2 * h * dq2 * dq1 - h * dq2 * dq2
        C2 = h * dq1 * dq1
        G1 = -m1 * g * lc1 * s1 - m2 * g * (l1 * s1 + lc2 * s12)
        G2 = -m2 * g * lc2 * s12
        r1 = G1 - C1
        r2 = G2 - C2 + u[..., 0]
        det = M11 * M22 - M12 * M12
        dd1 = (M22 * r1 - M12 * r2) / det
        dd2 = (-M12 * r1 + M11 * r2) / det
        return torch.stack([dq1, dq2, dd1, dd2], -1)

    goal = torch.tensor([math.pi, 0.0, 0.0, 0.0], dtype=torch.float64)
    cost = QuadraticCost(torch.diag(torch.tensor([0.1, 0.1, 0.01, 0.01], dtype=torch.float64)),
                         0.01 * torch.eye(1, dtype=torch.float64),
                         100.0 * torch.eye(4, dtype=torch.float64), x_ref=goal)
    return Problem("acrobot", discretize(f, dt, "rk4"), cost,
                   torch.tensor([0.05, 0.0, 0.0, 0.0], dtype=torch.float64), T, dt,
                   None if u_max is None else limits(u_max, 1),
                   ("theta1", "theta2", "dtheta1", "dtheta2"), ("elbow torque",),
                   dict(m1=m1, m2=m2, l1=l1, lc1=lc1, lc2=lc2, I1=I1, I2=I2, g=g),
                   "Tedrake, Underactuated Robotics Ch. 3; M. Spong, IEEE Control Systems "
                   "15(1), 1995")
