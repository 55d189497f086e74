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
    :math:`\\lambda_T = \nabla l_T`, :math:`\\lambda_t = l_x + f_x^\top \\lambda_{t+1}`."""
    B, T = us.shape[:2]
    args = [(xs[:, t], us[:, t]) for t in range(T)]
    dd, _ = StageDerivatives(dyn.derivatives, dyn, time_invariant=dyn.time_invariant,
                             name="the dynamics")(args, second_order=True)
    cd, _ = StageDerivatives(cost.derivatives, cost.running,
                             time_invariant=cost.time_invariant,
                             name="the running cost")(args)
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
    Hxx = cd.lxx + torch.einsum("Ni,Nijk->Njk", nxt, dd.fxx)
    Hux = cd.lux + torch.einsum("Ni,Nijk->Njk", nxt, dd.fux)
    Huu = cd.luu + torch.einsum("Ni,Nijk->Njk", nxt, dd.fuu)
    return dict(fx=fx, fu=fu, lx=torch.cat([lx, gT.unsqueeze(1)], 1), lu=lu, lam=lam,
                Q=_stage_major(0.5 * (Hxx + Hxx.mT), B, T),
                R=_stage_major(0.5 * (Huu + Huu.mT), B, T), M=_stage_major(Hux, B, T),
                QT=0.5 * (HT + HT.mT))


def _adjoint_lqr(ex: dict, gx: torch.Tensor, gu: torch.Tensor, active) -> object:
    """The adjoint LQR at the solution (controls at a limit held fixed) and its solution
    (w = its xs / us, the costates from its P, p)."""
    Bm, R, M, r = ex["fu"], ex["R"], ex["M"], gu
    if active is not None and bool(active.any()):   # hold the controls at a limit fixed
        a = active.to(R.dtype)
        keep = 1 - a
        R = R * keep[..., :, None] * keep[..., None, :] + torch.diag_embed(a)
        M = M * keep[..., :, None]
        Bm = Bm * keep[..., None, :]
        r = r * keep
    T = R.shape[1]
    prob = LQR(A=ex["fx"], B=Bm, Q=ex["Q"], R=R, M=M, q=gx[:, :T], r=r, QT=ex["QT"],
               qT=gx[:, T])
    return solve_lqr(prob, torch.zeros_like(gx[:, 0]))


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
            sol = _adjoint_lqr(ex, gx, gu, active)
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
            xT = xs[:, T].detach().requires_grad_()
            lT = cost.terminal(xT)
            if lT.requires_grad:
                (gT,) = torch.autograd.grad(lT.sum(), xT, create_graph=True,
                                            allow_unused=True)
                if gT is not None:
                    S = S + (gT * dx[:, T]).sum()
                S = S + (g_J * lT).sum()
            inputs = [v for v, w in zip([x0l, *params], wanted) if w]
            grads = iter(torch.autograd.grad(S, inputs, allow_unused=True)) if inputs else \
                iter(())
        out = [next(grads) if w else None for w in wanted]
        if out[0] is not None:
            out[0] = out[0].reshape(x0.shape) if x0.shape.numel() == out[0].numel() else \
                out[0].reshape(*shape, n).sum_to_size(x0.shape)
        return (None, *out)


def differentiable_outputs(result, dynamics: Dynamics, cost: Cost, x0: torch.Tensor,
                           params: Sequence[torch.Tensor], control_limits):
    """``(xs, us, cost)`` of ``result`` attached to ``x0`` and ``params`` (see the module
    docstring).  Warns when an element did not converge: the gradient is that of the
    optimum the solver was approaching, exact only at one."""
    if not bool(torch.as_tensor(result.converged).all()):
        warnings.warn("solve_ddp: some elements did not converge; their gradients assume "
                      "the returned trajectory is an optimum", ConvergenceWarning,
                      stacklevel=3)
    active = None
    if control_limits is not None:
        lo, hi = (torch.as_tensor(v, dtype=result.us.dtype, device=result.us.device)
                  for v in control_limits)
        # the box QP clamps to the limits themselves: active = at a limit to rounding
        band = 1e3 * torch.finfo(result.us.dtype).eps * torch.maximum(
            torch.maximum(lo.abs(), hi.abs()), torch.ones_like(lo))
        active = (result.us <= lo + band) | (result.us >= hi - band)
    state = dict(dynamics=dynamics, cost=cost, xs=result.xs, us=result.us, J=result.cost,
                 x0=x0, params=tuple(params), active=active)
    return _DDPSolution.apply(state, x0, *params)
