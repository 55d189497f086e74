r"""Gradients of a DDP solution with respect to ``x0`` and the tensors the model uses, by
implicit differentiation of the optimality conditions at the returned optimum.

The problem in simultaneous form: variables :math:`z = (x_{0:T}, u_{0:T-1})`,
constraints :math:`c_0 = x_0 - \bar x_0(\theta)`, :math:`c_{t+1} = f_t(x_t, u_t; \theta)
- x_{t+1}`, Lagrangian :math:`\mathcal L = J + \lambda^\top c` with the costates
:math:`\lambda_T = \nabla l_T`, :math:`\lambda_t = \nabla_x l_t + f_x^\top \lambda_{t+1}`.
For a loss with cotangent :math:`g` on z (and :math:`g_J` on the cost, folded in as
:math:`g + g_J \nabla_z J`), the adjoint of the KKT system
:math:`[[H, C^\top], [C, 0]] [w; \mu] = -[g; 0]` (H the Hessian of the Lagrangian, C the
constraint Jacobian) is one LQR problem: stage Hessians
:math:`\nabla^2_{(x_t, u_t)}(l_t + \lambda_{t+1}^\top f_t)`, terminal
:math:`\nabla^2 l_T`, gradients g, dynamics :math:`f_x, f_u`, :math:`\delta x_0 = 0`; its
solution is w and its costates are :math:`\mu_{t+1} = P_{t+1} \delta x_{t+1} +
p_{t+1}`, :math:`\mu_0 = -p_0`.  Then

.. math::

    \frac{d\,\mathrm{loss}}{d\theta} = \frac{\partial}{\partial\theta}\Big[
    w^\top \nabla_z \mathcal L(z, \lambda; \theta) + \mu^\top c(z; \theta)
    + g_J\, J(z; \theta)\Big]

at fixed z, λ, w, μ: one backward pass of autograd through the model's functions.
Controls at a box limit are held fixed (their rows of the adjoint LQR are removed: the
active set), as the limits do not depend on θ.  This is what trajax's and
mpc.pytorch's differentiable solvers do (mpc.pytorch with the Gauss-Newton Hessian; here
the exact one, so the gradient is exact at an optimum).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from ..errors import ConvergenceWarning, InvalidArgumentError
from ..lqr.finite import LQR, solve_lqr
from .constraints import Constraint
from .lagrangian import ActiveConstraints, LagrangianCost, active_constraints
from .limits import like_controls
from .models import Cost, Dynamics
from .stagewise import StageDerivatives

__all__ = ["differentiable_outputs"]


def _stage_major(v: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """(T*B, ...) stage-major rows -> (B, T, ...)."""
    return v.reshape(T, B, *v.shape[1:]).transpose(0, 1)


def _expansion(dyn: Dynamics, cost: Cost, xs: torch.Tensor, us: torch.Tensor):
    """The derivatives at the solution, all stages in one call per model where the model
    allows (the solver's rule, ``trajopt.ddp.stagewise``): dynamics to second order,
    running cost, terminal cost; and the costates
    :math:`\\lambda_T = \\nabla l_T`, :math:`\\lambda_t = l_x + f_x^\\top \\lambda_{t+1}`."""
    B, T = us.shape[:2]
    args = [(xs[:, t], us[:, t]) for t in range(T)]
    dd, _ = StageDerivatives(dyn.derivatives, dyn, time_invariant=dyn.time_invariant,
                             name="the dynamics", model=dyn)(args, second_order=True)
    cd, _ = StageDerivatives(cost.derivatives, cost.running,
                             time_invariant=cost.time_invariant, name="the running cost",
                             model=cost)(args)
    if dd is None or cd is None:
        raise InvalidArgumentError("gradients through solve_ddp need stages of equal state "
                                   "and control sizes")
    gT, HT = cost.terminal_derivatives(xs[:, T])
    fx, fu = _stage_major(dd.fx, B, T), _stage_major(dd.fu, B, T)
    lx, lu = _stage_major(cd.lx, B, T), _stage_major(cd.lu, B, T)
    lam = [None] * (T + 1)
    lam[T] = gT
    for t in reversed(range(T)):
        lam[t] = lx[:, t] + (fx[:, t].transpose(-1, -2) @ lam[t + 1].unsqueeze(-1)
                             ).squeeze(-1)
    lam = torch.stack(lam, 1)
    nxt = lam[:, 1:].transpose(0, 1).reshape(T * B, -1)      # lambda_{t+1}, stage-major
    def curvature(l2, f2):  # l2 + lambda' f2; f2 None: no second-order terms (linear)
        return l2 if f2 is None else l2 + torch.einsum("Ni,Nijk->Njk", nxt, f2)
    Hxx, Hux, Huu = curvature(cd.lxx, dd.fxx), curvature(cd.lux, dd.fux), \
        curvature(cd.luu, dd.fuu)
    return dict(fx=fx, fu=fu, lx=torch.cat([lx, gT.unsqueeze(1)], 1), lu=lu, lam=lam,
                Q=_stage_major(0.5 * (Hxx + Hxx.mT), B, T),
                R=_stage_major(0.5 * (Huu + Huu.mT), B, T), M=_stage_major(Hux, B, T),
                QT=0.5 * (HT + HT.mT))


def _adjoint_lqr(ex: dict, gx: torch.Tensor, gu: torch.Tensor, active,
                 G: ActiveConstraints | None = None):
    """The adjoint LQR at the solution (controls at a limit held fixed) and its solution
    (w = its xs / us, the costates from its P, p); with active constraints ``G``, the
    adjoint also satisfies ``G w = 0``: returns the solution and the multipliers of those
    rows, (B, T, P) running and (B, P_T) terminal (None without)."""
    Bm, R, M, r = ex["fu"], ex["R"], ex["M"], gu
    keep = None
    if active is not None and bool(active.any()):   # hold the controls at a limit fixed
        a = active.to(R.dtype)
        keep = 1 - a
        R = R * keep[..., :, None] * keep[..., None, :] + torch.diag_embed(a)
        M = M * keep[..., :, None]
        Bm = Bm * keep[..., None, :]
        r = r * keep
    T = R.shape[1]
    Q, QT, q, qT = ex["Q"], ex["QT"], gx[:, :T], gx[:, T]
    x0 = torch.zeros_like(gx[:, 0])
    if G is None:
        return solve_lqr(LQR(A=ex["fx"], B=Bm, Q=Q, R=R, M=M, q=q, r=r, QT=QT, qT=qT),
                         x0), None, None
    return _constrained_adjoint(ex["fx"], Bm, Q, R, M, q, r, QT, qT, x0, G, keep)


def _constrained_adjoint(A, Bm, Q, R, M, q, r, QT, qT, x0, G: ActiveConstraints, keep):
    """The adjoint LQR with the equalities ``G w = 0`` by the method of multipliers on
    this quadratic problem: LQR solves with the penalty ``rho |G w|^2 / 2`` and the
    linear term ``eta' G w``, ``eta <- eta + rho G w``, until ``|G w|`` is at rounding
    level (exact in the limit, for any rho; rho = 1e4 times the ratio of the Hessian's
    scale to G's converges in a few solves)."""
    Gx, Gu, GT = G.Gx, G.Gu, G.GT
    if Gu is not None and keep is not None:
        Gu = Gu * keep[..., None, :]
    scale_H = max(float(v.abs().amax()) for v in (Q, R, QT))
    scale_G = max(float(v.abs().amax()) for v in (Gx, Gu, GT) if v is not None)
    rho = 1e4 * scale_H / max(scale_G ** 2, 1e-300)
    if Gx is not None:
        Q = Q + rho * Gx.mT @ Gx
        R = R + rho * Gu.mT @ Gu
        M = M + rho * Gu.mT @ Gx
        eta = Gx.new_zeros(Gx.shape[:-1])
    if GT is not None:
        QT = QT + rho * GT.mT @ GT
        etaT = GT.new_zeros(GT.shape[:-1])
    for _ in range(100):
        qk, rk, qTk = q, r, qT
        if Gx is not None:
            qk = q + (Gx.mT @ eta.unsqueeze(-1)).squeeze(-1)
            rk = r + (Gu.mT @ eta.unsqueeze(-1)).squeeze(-1)
        if GT is not None:
            qTk = qT + (GT.mT @ etaT.unsqueeze(-1)).squeeze(-1)
        sol = solve_lqr(LQR(A=A, B=Bm, Q=Q, R=R, M=M, q=qk, r=rk, QT=QT, qT=qTk), x0)
        size = 1.0 + max(float(sol.xs.abs().amax()), float(sol.us.abs().amax()))
        worst = 0.0
        if Gx is not None:
            res = (Gx @ sol.xs[:, :-1, :, None] + Gu @ sol.us[..., None]).squeeze(-1)
            eta = eta + rho * res
            worst = float(res.abs().amax())
        if GT is not None:
            resT = (GT @ sol.xs[:, -1, :, None]).squeeze(-1)
            etaT = etaT + rho * resT
            worst = max(worst, float(resT.abs().amax()))
        if worst <= 100 * torch.finfo(sol.xs.dtype).eps * size:
            break
    else:
        warnings.warn(f"solve_ddp gradient: the adjoint's active constraints are met to "
                      f"{worst:.1e} only (relative to {size:.1e}) after 100 solves",
                      ConvergenceWarning, stacklevel=4)
    return sol, (eta if Gx is not None else None), (etaT if GT is not None else None)


class _DDPSolution(torch.autograd.Function):
    """(xs, us, cost) of a solved problem as a function of ``x0`` and ``params``."""

    @staticmethod
    def forward(ctx, state, x0, *params):
        ctx.state = state
        xs, us, J = state["xs"], state["us"], state["J"]
        return xs.clone(), us.clone(), J.clone()

    @staticmethod
    def backward(ctx, g_xs, g_us, g_cost):
        st = ctx.state
        dyn, cost, xs, us = st["dynamics"], st["cost"], st["xs"], st["us"]
        shape = xs.shape[:-2]
        T1, n = xs.shape[-2:]
        m = us.shape[-1]
        xs, us = xs.reshape(-1, T1, n), us.reshape(-1, T1 - 1, m)
        zeros = torch.zeros_like
        g_xs = zeros(xs) if g_xs is None else g_xs.reshape(xs.shape)
        g_us = zeros(us) if g_us is None else g_us.reshape(us.shape)
        g_J = torch.zeros(xs.shape[0], dtype=xs.dtype, device=xs.device) if g_cost is None \
            else g_cost.reshape(-1)
        T = T1 - 1
        with torch.no_grad():
            ex = _expansion(dyn, cost, xs, us)
            lam = ex["lam"]
            gx = g_xs + g_J[:, None, None] * ex["lx"]
            gu = g_us + g_J[:, None, None] * ex["lu"]
            active = st["active"]
            active = None if active is None else active.reshape(-1, T, m)
            cons, nus = st["constraints"], st["nus"]
            G = active_constraints(cons, nus, xs, us) if cons else None
            sol, eta, etaT = _adjoint_lqr(ex, gx, gu, active, G)
            dx, du = sol.xs, sol.us
            mu = (sol.P[:, 1:] @ dx[:, 1:, :, None]).squeeze(-1) + sol.p[:, 1:]
            mu0 = -sol.p[:, 0]
        x0 = st["x0"]
        params = st["params"]
        wanted = [x0.requires_grad] + [p.requires_grad for p in params]
        with torch.enable_grad():
            x0l = x0.detach().reshape(-1, n).requires_grad_(wanted[0])
            S = (mu0 * -x0l).sum()
            for t in range(T):
                x = xs[:, t].detach().requires_grad_()
                u = us[:, t].detach().requires_grad_()
                fval = dyn(x, u, t)
                h = cost.running(x, u, t) + (lam[:, t + 1] * fval).sum(-1)
                hx, hu = torch.autograd.grad(h.sum(), (x, u), create_graph=True,
                                             allow_unused=True)
                for d_, w_ in ((hx, dx[:, t]), (hu, du[:, t])):
                    if d_ is not None:
                        S = S + (d_ * w_).sum()
                S = S + (mu[:, t] * fval).sum() + (g_J * cost.running(x, u, t)).sum()
                if eta is not None:  # eta' g_A: constraints that depend on theta
                    S = S + (eta[:, t] * _running_values(cons, x, u, t)).sum()
            xT = xs[:, T].detach().requires_grad_()
            lT = cost.terminal(xT)
            if lT.requires_grad:
                (gT,) = torch.autograd.grad(lT.sum(), xT, create_graph=True,
                                            allow_unused=True)
                if gT is not None:
                    S = S + (gT * dx[:, T]).sum()
                S = S + (g_J * lT).sum()
            if etaT is not None:
                S = S + (etaT * torch.cat([c(xT) for c in cons if c.where == "terminal"],
                                          -1)).sum()
            inputs = [v for v, w in zip([x0l, *params], wanted) if w]
            grads = iter(torch.autograd.grad(S, inputs, allow_unused=True)) if inputs else \
                iter(())
        out = [next(grads) if w else None for w in wanted]
        if out[0] is not None:
            out[0] = out[0].reshape(x0.shape) if x0.shape.numel() == out[0].numel() else \
                out[0].reshape(*shape, n).sum_to_size(x0.shape)
        return (None, *out)


def _running_values(cons, x, u, t) -> torch.Tensor:
    return torch.cat([c(x, u, t) for c in cons if c.where == "running"], -1)


def differentiable_outputs(result, dynamics: Dynamics, cost: Cost, x0: torch.Tensor,
                           params: Sequence[torch.Tensor], control_limits,
                           constraints: Sequence[Constraint] = ()):
    """``(xs, us, cost)`` of ``result`` attached to ``x0`` and ``params`` (see the module
    docstring).  Warns when an element did not converge: the gradient is that of the
    optimum the solver was approaching, exact only at one.  With ``constraints``, the
    multipliers of ``result`` define the Lagrangian and the active set
    (:mod:`trajopt.ddp.lagrangian`)."""
    nus: list[torch.Tensor] = []
    if constraints:
        B = result.xs.reshape(-1, *result.xs.shape[-2:]).shape[0]
        for con, nu in zip(constraints, result.multipliers):
            nu = torch.as_tensor(nu, dtype=result.xs.dtype, device=result.xs.device)
            nus.append(nu.reshape(B, *nu.shape[-2:]) if con.where == "running"
                       else nu.reshape(B, nu.shape[-1]))
        cost = LagrangianCost(cost, constraints, nus)
    if not bool(torch.as_tensor(result.converged).all()):
        warnings.warn("solve_ddp: some elements did not converge; their gradients assume "
                      "the returned trajectory is an optimum", ConvergenceWarning,
                      stacklevel=3)
    active = None
    if control_limits is not None:
        lo, hi = like_controls(control_limits, result.us)   # (m,) or (..., T, m)
        # the box QP clamps to the limits themselves: active = at a limit to rounding
        band = 1e3 * torch.finfo(result.us.dtype).eps * torch.maximum(
            torch.maximum(lo.abs(), hi.abs()), torch.ones_like(lo))
        active = (result.us <= lo + band) | (result.us >= hi - band)
    state = dict(dynamics=dynamics, cost=cost, xs=result.xs, us=result.us, J=result.cost,
                 x0=x0, params=tuple(params), active=active, constraints=list(constraints),
                 nus=nus)
    return _DDPSolution.apply(state, x0, *params)
