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

from ..errors import ConvergenceWarning
from ..lqr.finite import LQR, solve_lqr
from .models import Cost, Dynamics

__all__ = ["differentiable_outputs"]


def _grad(fn, *args):
    """Gradient of ``fn(*args).sum()`` with respect to each arg (rows independent)."""
    leaves = [a.detach().requires_grad_() for a in args]
    with torch.enable_grad():
        y = fn(*leaves).sum()
        if not y.requires_grad:     # a function of neither (e.g. no terminal cost)
            return [torch.zeros_like(a) for a in args]
        out = torch.autograd.grad(y, leaves, allow_unused=True)
    return [torch.zeros_like(a) if o is None else o.detach() for o, a in zip(out, args)]


def _costates(dyn, cost, xs, us):
    T = us.shape[1]
    lam = [None] * (T + 1)
    lam[T] = _grad(cost.terminal, xs[:, T])[0]
    for t in reversed(range(T)):
        lam[t] = _grad(lambda x, u, t=t, lt=lam[t + 1]: cost.running(x, u, t)
                       + (lt * dyn(x, u, t)).sum(-1), xs[:, t], us[:, t])[0]
    return torch.stack(lam, 1)


def _adjoint_lqr(dyn, cost, xs, us, lam, gx, gu, active):
    """The adjoint LQR's matrices at the solution and its solution (w, P, p)."""
    from torch.func import hessian, jacrev, vmap
    B, T = us.shape[:2]
    A_, B_, Q_, R_, M_ = [], [], [], [], []
    for t in range(T):
        def h(x, u, lt, t=t):
            return cost.running(x[None], u[None], t)[0] + (lt * dyn(x[None], u[None], t)[0]
                                                           ).sum()

        def f1(x, u, t=t):
            return dyn(x[None], u[None], t)[0]
        (hxx, hxu), (hux, huu) = vmap(hessian(h, argnums=(0, 1)))(xs[:, t], us[:, t],
                                                                 lam[:, t + 1])
        fx, fu = vmap(jacrev(f1, argnums=(0, 1)))(xs[:, t], us[:, t])
        A_.append(fx)
        B_.append(fu)
        Q_.append(0.5 * (hxx + hxx.mT))
        R_.append(0.5 * (huu + huu.mT))
        M_.append(0.5 * (hux + hxu.mT))
    QT = vmap(hessian(lambda x: cost.terminal(x[None])[0]))(xs[:, T])
    A, Bm, Q, R, M = (torch.stack(v, 1) for v in (A_, B_, Q_, R_, M_))
    r = gu
    if active is not None and bool(active.any()):   # hold the controls at a limit fixed
        a = active.to(R.dtype)
        keep = 1 - a
        R = R * keep[..., :, None] * keep[..., None, :] + torch.diag_embed(a)
        M = M * keep[..., :, None]
        Bm = Bm * keep[..., None, :]
        r = r * keep
    prob = LQR(A=A, B=Bm, Q=Q, R=R, M=M, q=gx[:, :T], r=r, QT=0.5 * (QT + QT.mT),
               qT=gx[:, T])
    return solve_lqr(prob, torch.zeros_like(xs[:, 0]))


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
            lam = _costates(dyn, cost, xs, us)
            lx = torch.stack([_grad(lambda x, u, t=t: cost.running(x, u, t), xs[:, t],
                                    us[:, t])[0] for t in range(T)]
                             + [_grad(cost.terminal, xs[:, T])[0]], 1)
            lu = torch.stack([_grad(lambda x, u, t=t: cost.running(x, u, t), xs[:, t],
                                    us[:, t])[1] for t in range(T)], 1)
            gx = g_xs + g_J[:, None, None] * lx
            gu = g_us + g_J[:, None, None] * lu
            active = st["active"]
            active = None if active is None else active.reshape(-1, T, m)
            sol = _adjoint_lqr(dyn, cost, xs, us, lam, gx, gu, active)
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
                hx, hu = torch.autograd.grad(h.sum(), (x, u), create_graph=True)
                S = S + (hx * dx[:, t]).sum() + (hu * du[:, t]).sum() \
                    + (mu[:, t] * fval).sum() + (g_J * cost.running(x, u, t)).sum()
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
