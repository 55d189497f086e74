r"""Newton (Kleinman-Hewer) refinement of a DARE solution, batched in torch.

At an approximate solution :math:`X` with gain :math:`K` and closed loop
:math:`A_c = A + BK`, the Fréchet derivative of the Riccati operator is
:math:`\Delta \mapsto A_c^\top \Delta A_c - E^\top \Delta E`, so a Newton step solves the
Stein equation

.. math::  A_c^\top \Delta A_c - E^\top \Delta E + \mathrm{Ric}(X) = 0 .

With :math:`F = E^{-1} A_c` and :math:`\tilde\Delta = E^\top \Delta E` this is
:math:`\tilde\Delta = \sum_j F^{\top j}\, \mathrm{Ric}(X)\, F^j`, summed by squared Smith
doubling (:math:`Y \leftarrow Y + F^\top Y F`, :math:`F \leftarrow F^2`), which converges
when :math:`A_c` is stable, i.e. when :math:`X` is near the stabilizing solution.
"""

from __future__ import annotations

import torch

from .._linalg import sym
from ._common import DAREData, gain, relative_residual, residual_matrix


def _stein_smith(F: torch.Tensor, C: torch.Tensor, max_iter: int = 60) -> torch.Tensor:
    """Solve ``F' Y F - Y + C = 0`` for stable F by squared Smith doubling."""
    Y = C
    eps = torch.finfo(C.dtype).eps
    for _ in range(max_iter):
        inc = F.transpose(-1, -2) @ Y @ F
        Y = Y + inc
        F = F @ F
        small = torch.linalg.matrix_norm(inc) <= eps * torch.linalg.matrix_norm(Y)
        if bool((small | ~torch.isfinite(Y).all(dim=(-2, -1))).all()):
            break
    return sym(Y)


def newton_refine(d: DAREData, X: torch.Tensor, steps: int = 1
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply up to ``steps`` Newton steps, keeping per element only those that lower the
    relative residual.  Returns the refined X (..., n, n) and its relative residual (...).
    """
    best = X
    best_res = relative_residual(d, X)
    for _ in range(steps):
        K = gain(d, best)
        Acl = d.A + d.B @ K
        F = Acl if d.E is None else torch.linalg.solve(d.E, Acl)
        res, _ = residual_matrix(d, best)
        Dt = _stein_smith(F, res)
        if d.E is not None:
            Einv_t = torch.linalg.inv(d.E).transpose(-1, -2)
            Dt = Einv_t @ Dt @ Einv_t.transpose(-1, -2)
        cand = sym(best + Dt)
        cand_res = relative_residual(d, cand)
        better = cand_res < best_res
        if not bool(better.any()):
            break
        best = torch.where(better[..., None, None], cand, best)
        best_res = torch.where(better, cand_res, best_res)
    return best, best_res
