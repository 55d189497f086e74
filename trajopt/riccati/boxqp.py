r"""Batched box-constrained QP by projected Newton (Tassa, Mansard & Todorov 2014,
"Control-limited differential dynamic programming", Alg. 1 / their ``boxQP``).

.. math::  \min_x \tfrac12 x^\top H x + g^\top x \quad \text{s.t.} \quad l \le x \le u

Each iteration fixes the *clamped* set (at a bound with the gradient pushing outward),
takes a Newton step on the free coordinates, and backtracks along the projected path with
an Armijo test.  Batched: every element has its own free set; the free block of ``H`` is
factorized by Cholesky of ``H`` with clamped rows/columns replaced by the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BoxQPResult:
    """x (..., m) the minimizer; clamped (..., m) bool; factor (..., m, m) Cholesky factor
    of the free block (identity on clamped coordinates); failed (...) bool where the free
    block of H was not positive definite."""

    x: torch.Tensor
    clamped: torch.Tensor
    factor: torch.Tensor
    failed: torch.Tensor


def _masked(H: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    both = free.unsqueeze(-1) & free.unsqueeze(-2)
    eye = torch.diag_embed((~free).to(H.dtype))
    return torch.where(both, H, torch.zeros_like(H)) + eye


def _value(H: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (x * (H @ x.unsqueeze(-1)).squeeze(-1)).sum(-1) + (g * x).sum(-1)


#: projected Newton's settings: iterations, tolerance on the free gradient (max-norm),
#: Armijo fraction, backtracking factor, smallest step (the defaults of :func:`box_qp`,
#: and the settings of the compiled loop's box QP, :mod:`trajopt.riccati.compiled`)
MAX_ITER, TOL, ARMIJO, SHRINK, MIN_STEP = 100, 1e-12, 0.1, 0.6, 1e-20


def box_qp(H: torch.Tensor, g: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
           x0: torch.Tensor | None = None, *, max_iter: int = MAX_ITER, tol: float = TOL,
           armijo: float = ARMIJO, shrink: float = SHRINK, min_step: float = MIN_STEP
           ) -> BoxQPResult:
    """Solve a batch of box QPs.

    Elements whose unconstrained minimizer ``-H^{-1} g`` is inside the box are done after
    one Cholesky solve; projected Newton runs only on the others.

    Parameters
    ----------
    H : (N, m, m), symmetric (its lower triangle is used)
    g : (N, m)
    lower, upper : (N, m), ``lower <= upper`` (may be -inf / inf)
    x0 : (N, m), optional warm start (projected onto the box)
    """
    if g.shape[-1] == 1:
        return _scalar(H, g, lower, upper)
    L, info = torch.linalg.cholesky_ex(H)
    xu = -torch.cholesky_solve(g.unsqueeze(-1), L).squeeze(-1)
    inside = (info == 0) & ((xu >= lower) & (xu <= upper)).all(-1)
    if bool(inside.all()):
        return BoxQPResult(x=xu, clamped=torch.zeros_like(xu, dtype=torch.bool), factor=L,
                           failed=torch.zeros_like(inside))
    out = _projected_newton(H[~inside], g[~inside], lower[~inside], upper[~inside],
                            None if x0 is None else x0[~inside], max_iter, tol, armijo,
                            shrink, min_step)
    x = torch.where(inside.unsqueeze(-1), xu, torch.zeros_like(xu))
    x[~inside] = out.x
    clamped = torch.zeros_like(xu, dtype=torch.bool)
    clamped[~inside] = out.clamped
    L = L.clone()
    L[~inside] = out.factor
    failed = torch.zeros_like(inside)
    failed[~inside] = out.failed
    return BoxQPResult(x=x, clamped=clamped, factor=L, failed=failed)


def _scalar(H, g, lower, upper) -> BoxQPResult:
    """m = 1: the minimizer of a convex parabola on an interval is the clamped vertex."""
    h = H[..., 0]
    failed = ~(h[..., 0] > 0)
    x = torch.minimum(torch.maximum(-g / h, lower), upper)
    grad = g + h * x
    clamped = ((x <= lower) & (grad > 0)) | ((x >= upper) & (grad < 0))
    factor = torch.where(clamped, torch.ones_like(h), h.clamp_min(0).sqrt()).unsqueeze(-1)
    return BoxQPResult(x=x, clamped=clamped, factor=factor, failed=failed)


def _projected_newton(H, g, lower, upper, x0, max_iter, tol, armijo, shrink, min_step
                      ) -> BoxQPResult:
    x = torch.zeros_like(g) if x0 is None else x0.expand_as(g).clone()
    x = torch.minimum(torch.maximum(x, lower), upper)
    done = torch.zeros(g.shape[:-1], dtype=torch.bool, device=g.device)
    failed = torch.zeros_like(done)
    value = _value(H, g, x)
    for _ in range(max_iter):
        grad = g + (H @ x.unsqueeze(-1)).squeeze(-1)
        clamped = ((x <= lower) & (grad > 0)) | ((x >= upper) & (grad < 0))
        free = ~clamped
        gfree = torch.where(free, grad, torch.zeros_like(grad))
        done = done | (gfree.abs().amax(-1) <= tol) | ~free.any(-1)
        L, info = torch.linalg.cholesky_ex(_masked(H, free))
        failed = failed | ((info != 0) & ~done)
        done = done | failed
        if bool(done.all()):
            break
        d = -torch.cholesky_solve(gfree.unsqueeze(-1), L).squeeze(-1)  # m >= 2 here
        d = torch.where(free & ~done.unsqueeze(-1), d, torch.zeros_like(d))
        slope = (grad * d).sum(-1)
        step = torch.ones_like(value)
        pending = ~done & (slope < 0)
        done = done | ~(slope < 0)
        while bool(pending.any()):
            cand = torch.minimum(torch.maximum(x + step.unsqueeze(-1) * d, lower), upper)
            v = _value(H, g, cand)
            ok = pending & ((v - value) <= armijo * step * slope)
            x = torch.where(ok.unsqueeze(-1), cand, x)
            value = torch.where(ok, v, value)
            pending = pending & ~ok
            step = torch.where(pending, step * shrink, step)
            too_small = pending & (step < min_step)
            done = done | too_small
            pending = pending & ~too_small
    grad = g + (H @ x.unsqueeze(-1)).squeeze(-1)
    clamped = ((x <= lower) & (grad > 0)) | ((x >= upper) & (grad < 0))
    L, info = torch.linalg.cholesky_ex(_masked(H, ~clamped))
    return BoxQPResult(x=x, clamped=clamped, factor=L, failed=failed | (info != 0))
