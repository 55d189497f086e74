"""The gradient of a loss of an optimal control solution, by the implicit function theorem
in the reduced (single-shooting) space, densely: one problem at a time, the controls
flattened, the Hessian of the reduced objective and its mixed derivatives from
torch.autograd.functional.  Shares no code with trajopt.ddp.sensitivity (which works in
the simultaneous space with a Riccati solve).

For ``Phi(u, theta)`` = the total cost of the rollout of u, at an optimum u* (polished
here by Newton steps on Phi), ``du*/dtheta = -Phi_uu^{-1} Phi_u,theta``, so a loss
``L(u, theta)`` (through the rollout) has

    dL/dtheta = d/dtheta [ L(u, theta) - v' grad_u Phi(u, theta) ],  v = Phi_uu^{-1} L_u,

at fixed u and v.
"""

from __future__ import annotations

import torch


def polish(phi, u, steps: int = 6):
    """Newton steps on ``phi(u)`` (u flat); returns u and the final gradient norm."""
    for _ in range(steps):
        g = torch.autograd.functional.jacobian(phi, u)
        H = torch.autograd.functional.hessian(phi, u)
        u = u - torch.linalg.solve(H, g)
    return u.detach(), float(torch.autograd.functional.jacobian(phi, u).norm())


def implicit_gradient(phi, loss, u, thetas):
    """``dL/dtheta`` for each tensor of ``thetas`` (leaves that ``phi(u)`` and
    ``loss(u)`` read): ``phi(u)`` the reduced objective, ``loss(u)`` the loss, u flat at
    an optimum."""
    u = u.detach()
    H = torch.autograd.functional.hessian(phi, u)
    uu = u.clone().requires_grad_()
    Lu = torch.autograd.grad(loss(uu), uu)[0]
    v = torch.linalg.solve(H.detach(), Lu.detach())
    uu = u.clone().requires_grad_()
    gphi = torch.autograd.grad(phi(uu), uu, create_graph=True)[0]
    S = loss(u) - (v * gphi).sum()
    return torch.autograd.grad(S, thetas, allow_unused=True)
