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


def polish_constrained(phi, g, u, steps: int = 8):
    """Newton steps on the KKT system of ``min phi(u) s.t. g(u) = 0`` (u flat, g the
    active constraints as a vector); returns u, the multipliers (least squares from
    stationarity) and the norms of the final stationarity and constraint residuals."""
    nu = None
    for _ in range(steps + 1):
        gp = torch.autograd.functional.jacobian(phi, u)
        G = torch.autograd.functional.jacobian(g, u)
        nu = -torch.linalg.lstsq(G.T, gp.unsqueeze(-1)).solution.squeeze(-1)
        if _ == steps:
            break
        H = torch.autograd.functional.hessian(
            lambda v, nu=nu: phi(v) + (nu * g(v)).sum(), u)
        n, p = u.numel(), nu.numel()
        K = torch.zeros(n + p, n + p, dtype=u.dtype)
        K[:n, :n], K[:n, n:], K[n:, :n] = H, G.T, G
        step = torch.linalg.solve(K, -torch.cat([gp + G.T @ nu, g(u)]))
        u = u + step[:n]
    stat = float((gp + G.T @ nu).norm())
    return u.detach(), nu.detach(), stat, float(g(u).detach().norm())


def implicit_gradient_constrained(phi, g, loss, u, nu, thetas):
    """``dL/dtheta`` at a KKT point ``(u, nu)`` of ``min phi(u) s.t. g(u) = 0``:
    ``K [v; eta] = [L_u; 0]`` with ``K = [[H, G'], [G, 0]]`` (H the Hessian of the
    Lagrangian), then ``d/dtheta [L - v' grad_u (phi + nu'g) - eta' g]`` at fixed u, v,
    eta, nu."""
    u = u.detach()
    H = torch.autograd.functional.hessian(lambda v: phi(v) + (nu * g(v)).sum(), u)
    G = torch.autograd.functional.jacobian(g, u)
    n, p = u.numel(), nu.numel()
    K = torch.zeros(n + p, n + p, dtype=u.dtype)
    K[:n, :n], K[:n, n:], K[n:, :n] = H.detach(), G.detach().T, G.detach()
    uu = u.clone().requires_grad_()
    Lu = torch.autograd.grad(loss(uu), uu)[0]
    sol = torch.linalg.solve(K, torch.cat([Lu.detach(), torch.zeros(p, dtype=u.dtype)]))
    v, eta = sol[:n], sol[n:]
    uu = u.clone().requires_grad_()
    glag = torch.autograd.grad(phi(uu) + (nu * g(uu)).sum(), uu, create_graph=True)[0]
    S = loss(u) - (v * glag).sum() - (eta * g(u)).sum()
    return torch.autograd.grad(S, thetas, allow_unused=True)
