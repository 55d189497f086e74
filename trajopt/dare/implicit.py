r"""Gradients of the algebraic Riccati solutions by implicit differentiation.

The stabilizing solution :math:`P(\theta)` of :math:`F(P, \theta) = 0` (the DARE's or the
CARE's residual, :math:`\theta = (A, B, Q, R, E, S)`) has, for a loss :math:`L(P)` with
:math:`G = \partial L / \partial P`,

.. math::

    \frac{\partial L}{\partial \theta} = \Big\langle \Lambda,
        \frac{\partial F}{\partial \theta}(P, \theta) \Big\rangle, \qquad
    \mathcal{F}_P^{*}(\Lambda) = -G ,

one adjoint solve whatever method produced P (trajax's custom VJP of its DARE does the
same), never an unrolled iteration.  The Fréchet derivative of the residual at the
solution is :math:`\mathcal F_P(\Delta) = A_c^\top \Delta A_c - E^\top \Delta E` (DARE)
or :math:`A_c^\top \Delta E + E^\top \Delta A_c` (CARE), :math:`A_c = A + BK`, so the
adjoint equation is the Stein equation :math:`F \Lambda' F^\top - \Lambda' + G = 0`
(DARE) or the Lyapunov equation :math:`F \Lambda' + \Lambda' F^\top + G = 0` (CARE) with
:math:`F = A_c E^{-1}`, :math:`\Lambda = E^{-1} \Lambda' E^{-\top}`; both are solved as
in the Newton refinements (squared Smith doubling, the CARE's through the Cayley
transform).  The vector-Jacobian product of F with respect to θ at fixed P is taken by
autograd on the residual function itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._linalg import sym
from ._common import DAREData

__all__ = ["attach_riccati_grad", "requires_grad", "detached"]

_NAMES = ("A", "B", "Q", "R", "E", "S")


class _Implicit(torch.autograd.Function):
    """P as a function of the problem's matrices: forward returns the solution found
    (computed without autograd), backward the adjoint solve above."""

    @staticmethod
    def forward(ctx, P, adjoint, residual, *mats):
        ctx.adjoint, ctx.residual = adjoint, residual
        ctx.present = [m is not None for m in mats]
        ctx.save_for_backward(P, *(m for m in mats if m is not None))
        return P.clone()

    @staticmethod
    def backward(ctx, G):
        P, *saved = ctx.saved_tensors
        it = iter(saved)
        mats = [next(it) if present else None for present in ctx.present]
        d = DAREData(*mats)
        with torch.no_grad():
            Lam = ctx.adjoint(d, P, sym(G))
        wanted = [m is not None and need for m, need in zip(mats, ctx.needs_input_grad[3:])]
        if not any(wanted):
            return (None, None, None) + (None,) * len(mats)
        with torch.enable_grad():
            leaves = [m.detach().requires_grad_(w) if m is not None else None
                      for m, w in zip(mats, wanted)]
            res = ctx.residual(DAREData(*leaves), P.detach())
            inputs = [v for v, w in zip(leaves, wanted) if w]
            grads = iter(torch.autograd.grad(res, inputs, grad_outputs=Lam,
                                             allow_unused=True))
        out = [next(grads) if w else None for w in wanted]
        return (None, None, None) + tuple(out)


def attach_riccati_grad(P: torch.Tensor, d: DAREData, *,
                        residual: Callable[[DAREData, torch.Tensor], torch.Tensor],
                        adjoint: Callable[[DAREData, torch.Tensor, torch.Tensor],
                                          torch.Tensor]) -> torch.Tensor:
    r"""``P`` (a solution computed without autograd) made a differentiable function of the
    tensors of ``d`` (the caller's, unscaled, broadcast data) by implicit
    differentiation: ``residual(d, P)`` is the Riccati residual matrix F(P, θ) and
    ``adjoint(d, P, G)`` solves :math:`\mathcal F_P^*(\Lambda) = -G` (G symmetric)."""
    return _Implicit.apply(P.detach(), adjoint, residual, *(getattr(d, n) for n in _NAMES))


def requires_grad(d: DAREData) -> bool:
    """Whether any tensor of ``d`` requires a gradient (autograd enabled)."""
    return torch.is_grad_enabled() and any(
        getattr(d, n) is not None and getattr(d, n).requires_grad for n in _NAMES)


def detached(d: DAREData) -> DAREData:
    """``d`` with every tensor detached (the solvers run outside autograd)."""
    return DAREData(*(None if getattr(d, n) is None else getattr(d, n).detach()
                      for n in _NAMES))
