r"""The gradient of an LQR trajectory by one adjoint LQR solve (trajax's custom VJP of
``tvlqr``), not by differentiating the recursion and the rollout.

The optimal :math:`z = (x_{0:T}, u_{0:T-1})` and costates :math:`\lambda_t = P_t x_t +
p_t` satisfy the KKT system of the quadratic program (Hessian H = the stage blocks Q, R,
M and Q_T; constraints :math:`x_0 = \bar x_0`, :math:`x_{t+1} = A_t x_t + B_t u_t +
c_t`).  For cotangents :math:`g` on z and :math:`g_J` on the cost (folded in as
:math:`g + g_J \nabla_z J`), the adjoint is the same LQR with linear terms g, no offset
and :math:`\delta x_0 = 0`; its solution w and costates :math:`\mu` give

.. math::

    \frac{d\,\mathrm{loss}}{d\theta} = \frac{\partial}{\partial\theta}\Big[
    w^\top \nabla_z \mathcal L(z, \lambda; \theta) + \mu^\top c(z; \theta)
    + g_J\, J(z; \theta)\Big]

at fixed z, λ, w, μ, for every problem tensor θ (A, B, Q, R, M, q, r, c, Q_T, q_T) and
:math:`\bar x_0`: one autograd pass through the stage formulas
(:mod:`trajopt.ddp.sensitivity` does the same for DDP, with the dynamics' curvature).
The rollout's graph is never stored.
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgumentError
from .stages import stage_cost, terminal_cost

__all__ = ["lqr_trajectory"]


def _mv(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (A @ x.unsqueeze(-1)).squeeze(-1)


class _LQRTrajectory(torch.autograd.Function):
    """(xs..., us..., cost) of a solved LQR as a function of x0 and the problem's
    tensors."""

    @staticmethod
    def forward(ctx, state, x0, *tensors):
        ctx.state = state
        return (*[x.clone() for x in state["xs"]], *[u.clone() for u in state["us"]],
                state["cost"].clone())

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled():  # create_graph=True: a second derivative is wanted
            raise InvalidArgumentError(
                "solve_lqr: the trajectory's gradient by the adjoint LQR is first order; "
                "for second derivatives (create_graph=True, hessian) pass "
                "solver=trajopt.riccati.CholeskySolver() to differentiate the recursion "
                "and the rollout instead")
        st = ctx.state
        problem, xs, us, lam = st["problem"], st["xs"], st["us"], st["lam"]
        T = len(us)
        g_xs, g_us, g_J = grads[:T + 1], grads[T + 1:2 * T + 1], grads[-1]
        stages = problem.stages
        QT, qT = problem.terminal
        with torch.no_grad():
            gJ = None if g_J is None else g_J.unsqueeze(-1)
            gx, gu = [], []
            for t, s in enumerate(stages):
                x, u = xs[t], us[t]
                gxt = torch.zeros_like(x) if g_xs[t] is None else g_xs[t]
                gut = torch.zeros_like(u) if g_us[t] is None else g_us[t]
                if gJ is not None:
                    lx = _mv(s.Q, x) + (0 if s.M is None else _mv(s.M.mT, u)) + (
                        0 if s.q is None else s.q)
                    lu = _mv(s.R, u) + (0 if s.M is None else _mv(s.M, x)) + (
                        0 if s.r is None else s.r)
                    gxt, gut = gxt + gJ * lx, gut + gJ * lu
                gx.append(gxt.detach())
                gu.append(gut.detach())
            gxT = torch.zeros_like(xs[T]) if g_xs[T] is None else g_xs[T]
            if gJ is not None:
                gxT = gxT + gJ * (_mv(QT, xs[T]) + (0 if qT is None else qT))
            sol = st["adjoint"](gx, gu, gxT.detach())
            dx, du = list(sol.xs), list(sol.us)
            mu = [_mv(sol.P[t], dx[t]) + sol.p[t] for t in range(1, T + 1)]
            mu0 = -sol.p[0]
        x0, tensors = st["x0"], st["tensors"]
        with torch.enable_grad():
            S = (mu0 * -x0).sum()
            for t, s in enumerate(stages):
                x = xs[t].detach().requires_grad_()
                u = us[t].detach().requires_grad_()
                f = _mv(s.A, x) + _mv(s.B, u) + (0 if s.c is None else s.c)
                h = stage_cost(s, x, u) + (lam[t + 1] * f).sum(-1)
                hx, hu = torch.autograd.grad(h.sum(), (x, u), create_graph=True)
                S = S + (hx * dx[t]).sum() + (hu * du[t]).sum() + (mu[t] * f).sum()
                if g_J is not None:
                    S = S + (g_J * stage_cost(s, x, u)).sum()
            xT = xs[T].detach().requires_grad_()
            lT = terminal_cost(QT, qT, xT)
            (hT,) = torch.autograd.grad(lT.sum(), xT, create_graph=True)
            S = S + (hT * dx[T]).sum()
            if g_J is not None:
                S = S + (g_J * lT).sum()
            wanted = [v for v in (x0, *tensors) if v.requires_grad]
            got = iter(torch.autograd.grad(S, wanted, allow_unused=True)) if wanted else \
                iter(())
        out = [next(got) if v.requires_grad else None for v in (x0, *tensors)]
        return (None, *out)


def lqr_trajectory(problem, x0: torch.Tensor, Ks, ks, Ps, ps, rollout, adjoint):
    """The optimal ``(xs, us, cost)`` of ``problem`` from ``x0`` (lists over stages and a
    (...) tensor), attached to ``x0`` and the problem's tensors by the adjoint above.

    ``Ks, ks, Ps, ps`` are the recursion's results (used detached); ``rollout(K, k, x0)``
    simulates the closed loop and returns ``(xs, us, cost)``; ``adjoint(q, r, qT)``
    solves the problem's LQR with those linear terms from zero (an ``LQRSolution`` with
    lists per stage)."""
    Kd = [K.detach() for K in Ks]
    kd = [k.detach() for k in ks]
    with torch.no_grad():
        xs, us, cost = rollout(Kd, kd, x0.detach())
        # x_0 in the batch of the trajectory: the adjoint takes each element's gradient
        # at stage 0 (an unbatched x0 of a batched problem got their sum, for every
        # element: a wrong x0 gradient)
        batch = torch.broadcast_shapes(*(x.shape[:-1] for x in xs))
        xs = [xs[0].expand(*batch, xs[0].shape[-1])] + list(xs[1:])
        lam = [_mv(P.detach(), x) + p.detach() for P, p, x in zip(Ps, ps, xs)]
    # each tensor once: a stage list may repeat one matrix (LQR(A=[A] * T)), and a
    # gradient returned per repeat would be summed once per repeat by autograd
    tensors, seen = [], set()
    QT, qT = problem.terminal
    for v in [v for s in problem.stages for v in vars(s).values()] + [QT, qT]:
        if v is not None and id(v) not in seen:
            seen.add(id(v))
            tensors.append(v)
    cost = torch.as_tensor(cost, dtype=x0.dtype, device=x0.device)
    state = dict(problem=problem, xs=xs, us=us, cost=cost, lam=lam, x0=x0,
                 tensors=tensors, adjoint=adjoint)
    out = _LQRTrajectory.apply(state, x0, *tensors)
    T = len(us)
    return list(out[:T + 1]), list(out[T + 1:2 * T + 1]), out[-1]
