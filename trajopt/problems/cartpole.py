"""Cart-pole swing-up."""

from __future__ import annotations

import math

import torch

from ..ddp.constraints import Constraint
from ..ddp.models import QuadraticCost, discretize
from ..errors import InvalidArgumentError
from ._problem import Problem, limits


def cartpole(*, T: int = 100, dt: float = 0.05, mc: float = 1.0, mp: float = 0.1,
             l: float = 0.5, g: float = 9.8, u_max: float | None = 10.0,
             track: float | None = None) -> Problem:
    r"""Cart-pole swing-up: state (x, theta, dx, dtheta), theta = 0 hanging down,
    force on the cart.

    Point-mass pole dynamics of R. Tedrake, *Underactuated Robotics*, Ch. 3 (Eq. 3.16-3.17):

    .. math::

        \ddot x = \frac{u + m_p \sin\theta (l \dot\theta^2 + g\cos\theta)}
                       {m_c + m_p \sin^2\theta}, \quad
        \ddot\theta = \frac{-u\cos\theta - m_p l \dot\theta^2 \cos\theta\sin\theta
                      - (m_c + m_p) g \sin\theta}{l (m_c + m_p \sin^2\theta)}

    with the masses and pole length of Barto, Sutton & Anderson (1983): m_c = 1 kg,
    m_p = 0.1 kg, l = 0.5 m, g = 9.8.  RK4 at 0.05 s, |u| <= 10 N.

    ``track``: a track of half-length ``track`` (m), :math:`|x| \le` ``track`` at every
    stage and at the end (the problem's ``constraints``; the unconstrained swing-up
    travels from -0.24 m to 0.69 m).
    """
    def f(x, u):
        th, dx, dth = x[..., 1], x[..., 2], x[..., 3]
        s, c = torch.sin(th), torch.cos(th)
        F = u[..., 0]
        den = mc + mp * s * s
        ddx = (F + mp * s * (l * dth * dth + g * c)) / den
        ddth = (-F * c - mp * l * dth * dth * c * s - (mc + mp) * g * s) / (l * den)
        return torch.stack([dx, dth, ddx, ddth], -1)

    goal = torch.tensor([0.0, math.pi, 0.0, 0.0], dtype=torch.float64)
    cost = QuadraticCost(torch.diag(torch.tensor([0.1, 0.1, 0.01, 0.01], dtype=torch.float64)),
                         0.01 * torch.eye(1, dtype=torch.float64),
                         torch.diag(torch.tensor([100.0, 100.0, 10.0, 10.0],
                                                 dtype=torch.float64)), x_ref=goal)
    return Problem("cartpole", discretize(f, dt, "rk4"), cost,
                   torch.zeros(4, dtype=torch.float64), T, dt,
                   None if u_max is None else limits(u_max, 1),
                   ("x", "theta", "dx", "dtheta"), ("force",),
                   dict(mc=mc, mp=mp, l=l, g=g, u_max=u_max, track=track),
                   "Tedrake, Underactuated Robotics Ch. 3; masses/length from Barto, Sutton "
                   "& Anderson, IEEE SMC 13(5), 1983",
                   () if track is None else _track_constraints(float(track)))


def _track_constraints(track: float) -> tuple[Constraint, Constraint]:
    if not track > 0:
        raise InvalidArgumentError(f"track must be positive; got {track}")

    def on_track(x):
        return torch.stack([x[..., 0] - track, -x[..., 0] - track], -1)
    return (Constraint(on_track, name="track"),
            Constraint(on_track, where="terminal", name="track (final)"))
