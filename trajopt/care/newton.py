r"""Newton (Kleinman) refinement of a CARE solution, batched in torch.

At an approximate solution :math:`X` with gain :math:`K` and closed loop
:math:`A_c = A + BK`, the Fréchet derivative of the Riccati operator is
:math:`\Delta \mapsto A_c^\top \Delta E + E^\top \Delta A_c`, so a Newton step solves the
Lyapunov equation :math:`F^\top \tilde\Delta + \tilde\Delta F + \mathrm{Ric}(X) = 0` with
:math:`F = E^{-1} A_c`, :math:`\tilde\Delta = E^\top \Delta E`.  It is solved as the
equivalent Stein equation of the Cayley transform (shift :math:`\gamma > 0`):
:math:`F_d = (F + \gamma I)(F - \gamma I)^{-1}`,
:math:`F_d^\top \tilde\Delta F_d - \tilde\Delta + 2\gamma (F - \gamma I)^{-\top}
\mathrm{Ric}(X) (F - \gamma I)^{-1} = 0`, summed by the DARE's squared Smith doubling;
:math:`F_d` is stable exactly when :math:`A_c` is, i.e. near the stabilizing solution.
"""

from __future__ import annotations

import torch

from .._linalg import sym
from ..dare._common import DAREData
from ..dare.newton import stein_smith
from ._common import care_gain, care_relative_residual, care_residual_matrix


def solve_lyapunov(F: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``F' Y + Y F + C = 0`` for stable F (batched), through the Cayley transform with
    the shift ``gamma = ||F||_F / sqrt(n)`` (the RMS of F's eigenvalue magnitudes for a
    normal F)."""
    n = F.shape[-1]
    eye = torch.eye(n, dtype=F.dtype, device=F.device)
    gamma = (torch.linalg.matrix_norm(F) / n ** 0.5).clamp(min=torch.finfo(F.dtype).tiny)
    g = gamma[..., None, None]
    M = torch.linalg.inv(F - g * eye)                     # (F - gamma I)^{-1}
    Fd = (F + g * eye) @ M
    Cd = 2 * g * (M.transpose(-1, -2) @ C @ M)
    return stein_smith(Fd, Cd)


def care_newton_refine(d: DAREData, X: torch.Tensor, steps: int = 1,
                       res: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``steps`` Newton steps, each kept per element only where it lowers the
    relative residual.  Returns X (the input itself when no step helped) and its
    residual."""
    best = X
    best_res = care_relative_residual(d, X) if res is None else res
    for _ in range(steps):
        K = care_gain(d, best)
        F = d.A + d.B @ K
        if d.E is not None:
            F = torch.linalg.solve(d.E, F)
        R, _ = care_residual_matrix(d, best)
        Dt = solve_lyapunov(F, R)
        if d.E is not None:
            Et = d.E.transpose(-1, -2)
            Dt = torch.linalg.solve(Et, torch.linalg.solve(Et, Dt).transpose(-1, -2))
        cand = sym(best + Dt)
        cand_res = care_relative_residual(d, cand)
        better = cand_res < best_res
        if not bool(better.any()):
            break
        best = torch.where(better[..., None, None], cand, best)
        best_res = torch.where(better, cand_res, best_res)
    return best, best_res


def care_adjoint(d: DAREData, P: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    r"""The adjoint of the CARE residual's derivative at P: Λ with
    :math:`A_c \Lambda E^\top + E \Lambda A_c^\top + G = 0` (``trajopt.dare.implicit``)."""
    F = d.A + d.B @ care_gain(d, P)
    if d.E is not None:                      # F = A_c E^{-1}
        F = torch.linalg.solve(d.E.transpose(-1, -2), F.transpose(-1, -2)).transpose(-1, -2)
    L = solve_lyapunov(F.transpose(-1, -2), G)
    if d.E is not None:                      # Λ = E^{-1} Λ' E^{-T}
        L = torch.linalg.solve(d.E, torch.linalg.solve(d.E, L).transpose(-1, -2))
    return sym(L)
