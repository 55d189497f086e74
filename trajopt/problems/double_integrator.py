"""Double integrator (linear; iLQR solves it in one iteration)."""

from __future__ import annotations

import torch

from ..ddp.models import Dynamics, QuadraticCost
from ._problem import Problem, limits


def double_integrator(*, T: int = 50, dt: float = 0.1, u_max: float | None = None
                      ) -> Problem:
    r"""Exact zero-order-hold discretization of :math:`\ddot p = u`:
    ``A = [[1, dt], [0, 1]]``, ``B = [[dt^2/2], [dt]]``; from (1, 0) to rest at 0."""
    A = torch.tensor([[1.0, dt], [0.0, 1.0]], dtype=torch.float64)
    B = torch.tensor([[0.5 * dt * dt], [dt]], dtype=torch.float64)

    def f(x, u, t):
        return x @ A.to(x).T + u @ B.to(x).T

    cost = QuadraticCost(torch.eye(2, dtype=torch.float64), 0.1 * torch.eye(1, dtype=torch.float64),
                         10.0 * torch.eye(2, dtype=torch.float64))
    return Problem("double_integrator", Dynamics(f, time_invariant=True), cost,
                   torch.tensor([1.0, 0.0], dtype=torch.float64), T, dt,
                   None if u_max is None else limits(u_max, 1), ("p", "v"), ("u",),
                   dict(dt=dt), "textbook: zero-order hold of p'' = u")
