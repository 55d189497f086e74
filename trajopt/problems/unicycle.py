"""Unicycle (differential-drive robot) to a goal pose."""

from __future__ import annotations

import torch

from ..ddp.constraints import Constraint
from ..ddp.models import QuadraticCost, discretize
from ..errors import ShapeError
from ._problem import Problem, limits


def unicycle(*, T: int = 80, dt: float = 0.1, v_max: float | None = 2.0,
             obstacles=()) -> Problem:
    r"""Kinematic unicycle :math:`\dot p_x = v\cos\theta`, :math:`\dot p_y = v\sin\theta`,
    :math:`\dot\theta = \omega` (S. LaValle, *Planning Algorithms*, Sec. 13.1.2.3), from
    the origin facing +x to (2, 1) facing +y.  RK4 at 0.1 s; controls (v, omega) bounded
    by 2.

    ``obstacles``: round obstacles ``(cx, cy, radius)`` the position must stay out of,
    :math:`r^2 - |p - c|^2 \le 0` at every stage and at the end (the problem's
    ``constraints``); e.g. ``((1.0, 0.1, 0.25), (1.7, 0.6, 0.2))`` sit on the
    unconstrained path."""
    def f(x, u):
        th = x[..., 2]
        return torch.stack([u[..., 0] * torch.cos(th), u[..., 0] * torch.sin(th), u[..., 1]],
                           -1)

    goal = torch.tensor([2.0, 1.0, 1.5707963267948966], dtype=torch.float64)
    cost = QuadraticCost(0.001 * torch.eye(3, dtype=torch.float64),
                         0.1 * torch.eye(2, dtype=torch.float64),
                         100.0 * torch.eye(3, dtype=torch.float64), x_ref=goal)
    return Problem("unicycle", discretize(f, dt, "rk4"), cost,
                   torch.zeros(3, dtype=torch.float64), T, dt,
                   None if v_max is None else limits(v_max, 2), ("px", "py", "theta"),
                   ("v", "omega"), dict(dt=dt, obstacles=tuple(obstacles)),
                   "LaValle, Planning Algorithms (2006), 13.1.2",
                   _obstacle_constraints(obstacles))


def _obstacle_constraints(obstacles) -> tuple[Constraint, ...]:
    obs = torch.as_tensor(obstacles, dtype=torch.float64)
    if obs.numel() == 0:
        return ()
    if obs.ndim != 2 or obs.shape[-1] != 3 or not bool((obs[:, 2] > 0).all()):
        raise ShapeError(f"obstacles must be rows (cx, cy, radius > 0); got {obstacles!r}")
    centers, radii = obs[:, :2], obs[:, 2]

    def outside(x):
        d = x[..., None, :2] - centers.to(x)
        return radii.to(x) ** 2 - (d * d).sum(-1)
    return (Constraint(outside, name="obstacles"),
            Constraint(outside, where="terminal", name="obstacles (final)"))
