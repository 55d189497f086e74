r"""The constraints' part of the Lagrangian at a constrained optimum, for implicit
differentiation (:mod:`trajopt.ddp.sensitivity`).

At the optimum of ``solve_ddp(..., constraints=...)`` with multipliers :math:`\nu`, the
constraints that are active (equalities; inequalities with :math:`\nu > 0`) hold as
equalities under small changes of the parameters (strict complementarity).  The
gradient of the solution then follows from the KKT system of the problem with those
equalities: :class:`LagrangianCost` is the cost :math:`l_t + \nu_t^\top g_t` (exact
first and second derivatives, the constraint curvature included), whose costates and
Hessians replace the cost's in the adjoint, and :class:`ActiveConstraints` holds the
active rows :math:`G = \partial g_A / \partial (x, u)` the adjoint must satisfy,
:math:`G w = 0`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.func import jacfwd, vmap

from .constraints import Constraint
from .models import Cost, CostDerivatives, _with_gradient

__all__ = ["LagrangianCost", "ActiveConstraints", "active_constraints"]


def _point_rows(nu: torch.Tensor, t, N: int) -> torch.Tensor:
    """Multipliers of N rows: ``nu`` (B, T, p) at stage ``t`` (an int, or (N,) stages of
    stage-major rows, element = row mod B)."""
    B = nu.shape[0]
    elements = torch.arange(N, device=nu.device) % B
    if torch.is_tensor(t):
        return nu[elements, t.to(nu.device)]
    return nu[elements, t]


def _terminal_rows(nu: torch.Tensor, N: int) -> torch.Tensor:
    """Terminal multipliers (B, p) of N rows (element = row mod B)."""
    return nu[torch.arange(N, device=nu.device) % nu.shape[0]]


class LagrangianCost(Cost):
    r""":math:`l_t(x, u) + \nu_t^\top g_t(x, u)` per stage and :math:`l_T(x) +
    \nu_T^\top g_T(x)` at the end, on the flat batch the multipliers were given for.

    Parameters
    ----------
    base : Cost
    constraints : sequence of Constraint
    nus : sequence of tensors
        One per constraint: (B, T, p) running, (B, p) terminal.
    """

    def __init__(self, base: Cost, constraints: Sequence[Constraint],
                 nus: Sequence[torch.Tensor]):
        self.base = base
        self.pairs = list(zip(constraints, nus))
        running = any(c.where == "running" for c in constraints)
        super().__init__(time_invariant=base.time_invariant and not running)
        self.time_invariance_inferred = self.time_invariant and base.time_invariance_inferred

    def found_time_varying(self) -> None:
        """The base cost's inferred time invariance failed its check: this cost's too."""
        super().found_time_varying()
        self.base.found_time_varying()

    def running(self, x, u, t):
        J = self.base.running(x, u, t)
        for con, nu in self.pairs:
            if con.where == "running":
                J = J + (_point_rows(nu, t, x.shape[0]) * con(x, u, t)).sum(-1)
        return J

    def terminal(self, x):
        J = self.base.terminal(x)
        for con, nu in self.pairs:
            if con.where == "terminal":
                J = J + (_terminal_rows(nu, x.shape[0]) * con(x)).sum(-1)
        return J

    def derivatives(self, x, u, t):
        d = self.base.derivatives(x, u, t)
        lx, lu, lxx, luu, lux = d.lx, d.lu, d.lxx, d.luu, d.lux
        for con, nu in self.pairs:
            if con.where != "running":
                continue
            w = _point_rows(nu, t, x.shape[0])
            if torch.is_tensor(t) and not con.time_invariant:
                def h(xi, ui, wi, ti, con=con):
                    return (wi * con(xi, ui, ti)).sum()
                args = (x, u, w, t)
            else:
                def h(xi, ui, wi, con=con):
                    return (wi * con(xi, ui, t)).sum()
                args = (x, u, w)
            # gradient and Hessian in one call, as Cost.derivatives takes them
            ((hxx, _), (hux, huu)), (gx, gu) = vmap(jacfwd(
                _with_gradient(h, (0, 1)), argnums=(0, 1), has_aux=True))(*args)
            lx, lu = lx + gx.to(x.dtype), lu + gu.to(x.dtype)
            lxx, luu, lux = lxx + hxx.to(x.dtype), luu + huu.to(x.dtype), \
                lux + hux.to(x.dtype)
        return CostDerivatives(lx=lx, lu=lu, lxx=lxx, luu=luu, lux=lux)

    def terminal_derivatives(self, x):
        g, H = self.base.terminal_derivatives(x)
        for con, nu in self.pairs:
            if con.where != "terminal":
                continue
            w = _terminal_rows(nu, x.shape[0])

            def h(xi, wi, con=con):
                return (wi * con(xi)).sum()
            Hc, gc = vmap(jacfwd(_with_gradient(h, 0), has_aux=True))(x, w)
            g, H = g + gc.to(x.dtype), H + Hc.to(x.dtype)
        return g, H


@dataclass(frozen=True)
class ActiveConstraints:
    """The active constraint rows at the optimum, zero rows where inactive:
    Gx (B, T, P, n), Gu (B, T, P, m) of the running constraints (all concatenated), GT
    (B, P_T, n) of the terminal ones (None when there are none of a kind)."""

    Gx: torch.Tensor | None
    Gu: torch.Tensor | None
    GT: torch.Tensor | None


def active_constraints(constraints: Sequence[Constraint], nus: Sequence[torch.Tensor],
                       xs: torch.Tensor, us: torch.Tensor) -> ActiveConstraints:
    """Jacobians of the active components at ``xs`` (B, T+1, n), ``us`` (B, T, m):
    equalities always, inequalities where the multiplier is positive (above 1e-10 of the
    largest one, rounding)."""
    B, T = us.shape[:2]
    run_x, run_u, term = [], [], []
    for con, nu in zip(constraints, nus):
        active = torch.ones_like(nu, dtype=torch.bool) if con.equality else \
            nu > 1e-10 * float(nu.abs().amax().clamp(min=1e-300))
        if con.where == "terminal":
            J = con.jacobians(xs[:, T])
            term.append(J.cx * active[..., None])
            continue
        if con.time_invariant:  # all stages in one call
            J = con.jacobians(xs[:, :T].reshape(B * T, -1), us.reshape(B * T, -1))
            cx, cu = (v.reshape(B, T, *v.shape[1:]) for v in (J.cx, J.cu))
        else:
            per = [con.jacobians(xs[:, t], us[:, t], t) for t in range(T)]
            cx = torch.stack([J.cx for J in per], 1)
            cu = torch.stack([J.cu for J in per], 1)
        run_x.append(cx * active[..., None])
        run_u.append(cu * active[..., None])
    return ActiveConstraints(
        Gx=torch.cat(run_x, -2) if run_x else None,
        Gu=torch.cat(run_u, -2) if run_u else None,
        GT=torch.cat(term, -2) if term else None)
