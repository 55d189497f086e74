r"""The one Riccati backward step shared by finite LQR, the cyclic solver and DDP.

Given the value derivatives of the next stage (:math:`V_x', V_{xx}'`), the stage's
dynamics derivatives (:math:`f_x, f_u`, optional affine offset :math:`c`) and cost
derivatives (:math:`l_x, l_u, l_{xx}, l_{uu}, l_{ux}`), one step forms

.. math::

    Q_x &= l_x + f_x^\top (V_x' + V_{xx}' c), \quad
    Q_u  = l_u + f_u^\top (V_x' + V_{xx}' c), \\
    Q_{xx} &= l_{xx} + f_x^\top V_{xx}' f_x, \quad
    Q_{ux} = l_{ux} + f_u^\top V_{xx}' f_x, \quad
    Q_{uu} = l_{uu} + f_u^\top V_{xx}' f_u,

the policy :math:`\delta u = k + K \delta x` with
:math:`k = -\tilde Q_{uu}^{-1} Q_u`, :math:`K = -\tilde Q_{uu}^{-1} Q_{ux}`
(:math:`\tilde Q_{uu} = Q_{uu} + \rho I`, Tikhonov/Levenberg-Marquardt), and the value

.. math::

    V_x &= Q_x + K^\top Q_{uu} k + K^\top Q_u + Q_{ux}^\top k, \\
    V_{xx} &= Q_{xx} + K^\top Q_{uu} K + K^\top Q_{ux} + Q_{ux}^\top K
    \quad\text{(symmetrized)},

which is the exact value of the policy even when :math:`\rho > 0` (Tassa, Erez & Todorov
2012, Eq. 11) and reduces to :math:`V_x = Q_x + Q_{ux}^\top k`,
:math:`V_{xx} = Q_{xx} + Q_{ux}^\top K` when :math:`\rho = 0`.  For an LQR stage
(:math:`f_x = A, f_u = B, l_{xx} = Q, l_{uu} = R, l_{ux} = M, l_x = q, l_u = r`) this is
thesis Eq. 2.3.4-2.3.5 with :math:`P = V_{xx}`, :math:`p = V_x` (the thesis' K and
lambda), written for the 1/2-convention cost of ``docs/notation.md``.

Plug points (DESIGN.md): :func:`expand_q` takes dense derivatives; a later operator form
only has to produce a :class:`QExpansion`.  The Q_uu solve is a :class:`QuuSolver`, by
default :class:`CholeskySolver`; a preconditioner (I/lr, diagonal, Kronecker) only needs
``solve``.  Shapes: every tensor may carry any broadcastable leading batch dimensions;
``n`` is the state size of this stage, ``n1`` of the next, ``m`` the control size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .._checks import sym
from ..errors import NotPositiveDefiniteError

__all__ = [
    "QExpansion",
    "RiccatiStep",
    "QuuSolver",
    "CholeskySolver",
    "expand_q",
    "solve_policy",
    "riccati_step",
]


def _mv(A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (A @ v.unsqueeze(-1)).squeeze(-1)


def _mtv(A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (A.transpose(-1, -2) @ v.unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class QExpansion:
    """Second-order expansion of the state-action value Q around the nominal point.

    Attributes
    ----------
    Qx : (..., n)
    Qu : (..., m)
    Qxx : (..., n, n)
    Qux : (..., m, n)
    Quu : (..., m, m)
    """

    Qx: torch.Tensor
    Qu: torch.Tensor
    Qxx: torch.Tensor
    Qux: torch.Tensor
    Quu: torch.Tensor


@dataclass(frozen=True)
class RiccatiStep:
    """Result of one backward step.

    Attributes
    ----------
    K : (..., m, n)
        Feedback gain, ``delta_u = k + K delta_x``.
    k : (..., m)
        Feedforward term.
    Vx : (..., n)
        Value gradient at this stage (the thesis' lambda, our ``p``).
    Vxx : (..., n, n)
        Value Hessian at this stage (the thesis' K, our ``P``), symmetric.
    Q : QExpansion
        The expansion the policy came from (unregularized Q_uu).
    dV : (..., 2)
        Expected value change of the full step split as ``[k'Q_u, 1/2 k'Q_uu k]`` so that a
        line search with step alpha expects ``alpha dV[0] + alpha^2 dV[1]``.
    """

    K: torch.Tensor
    k: torch.Tensor
    Vx: torch.Tensor
    Vxx: torch.Tensor
    Q: QExpansion
    dV: torch.Tensor


def expand_q(
    Vx: torch.Tensor,
    Vxx: torch.Tensor,
    fx: torch.Tensor,
    fu: torch.Tensor,
    lx: torch.Tensor | None,
    lu: torch.Tensor | None,
    lxx: torch.Tensor,
    luu: torch.Tensor,
    lux: torch.Tensor | None,
    c: torch.Tensor | None = None,
) -> QExpansion:
    """Form the Q expansion from dense derivatives.

    Parameters
    ----------
    Vx : (..., n1)
    Vxx : (..., n1, n1)
    fx : (..., n1, n)
    fu : (..., n1, m)
    lx : (..., n) or None (zero)
    lu : (..., m) or None (zero)
    lxx : (..., n, n)
    luu : (..., m, m)
    lux : (..., m, n) or None (zero)
    c : (..., n1) or None
        Affine offset of the dynamics about the nominal point (LQR's ``c_t``).
    """
    if c is not None:
        Vx = Vx + _mv(Vxx, c)
    Qx = _mtv(fx, Vx)
    Qu = _mtv(fu, Vx)
    if lx is not None:
        Qx = Qx + lx
    if lu is not None:
        Qu = Qu + lu
    Vxx_fx = Vxx @ fx
    Qxx = sym(lxx + fx.transpose(-1, -2) @ Vxx_fx)
    Qux = fu.transpose(-1, -2) @ Vxx_fx
    if lux is not None:
        Qux = Qux + lux
    Quu = sym(luu + fu.transpose(-1, -2) @ (Vxx @ fu))
    return QExpansion(Qx=Qx, Qu=Qu, Qxx=Qxx, Qux=Qux, Quu=Quu)


class QuuSolver(Protocol):
    """How the policy is obtained from Q_uu: ``solve(Quu, rhs, stage)`` returns
    ``Quu_tilde^{-1} rhs`` for rhs of shape (..., m, j)."""

    def solve(self, Quu: torch.Tensor, rhs: torch.Tensor, stage: int | None) -> torch.Tensor:
        ...


@dataclass(frozen=True)
class CholeskySolver:
    """Exact solve by Cholesky of ``Quu + reg * I`` (Tikhonov / Levenberg-Marquardt).

    Raises :class:`~trajopt.errors.NotPositiveDefiniteError` naming the stage (and the
    first failing batch index) when the regularized Q_uu is not positive definite.
    """

    reg: float = 0.0

    def solve(self, Quu: torch.Tensor, rhs: torch.Tensor, stage: int | None) -> torch.Tensor:
        m = Quu.shape[-1]
        if self.reg:
            Quu = Quu + self.reg * torch.eye(m, dtype=Quu.dtype, device=Quu.device)
        L, info = torch.linalg.cholesky_ex(Quu)
        if bool((info != 0).any()):
            bad = torch.nonzero(info.reshape(-1) != 0)[0].item()
            where = f" at stage {stage}" if stage is not None else ""
            batch = f" (batch element {bad})" if info.numel() > 1 else ""
            raise NotPositiveDefiniteError(
                f"Q_uu = R + B'PB (+ reg I){where}{batch} is not positive definite; "
                f"increase the regularization or check R", stage=stage)
        return torch.cholesky_solve(rhs, L)


def solve_policy(
    Q: QExpansion, solver: QuuSolver, stage: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(K, k)``, ``K = -Quu^{-1} Qux`` (..., m, n), ``k = -Quu^{-1} Qu`` (..., m)."""
    n = Q.Qux.shape[-1]
    batch = torch.broadcast_shapes(Q.Qux.shape[:-2], Q.Qu.shape[:-1], Q.Quu.shape[:-2])
    m = Q.Quu.shape[-1]
    rhs = torch.cat(
        [Q.Qux.expand(*batch, m, n), Q.Qu.expand(*batch, m).unsqueeze(-1)], dim=-1)
    sol = -solver.solve(Q.Quu.expand(*batch, m, m), rhs, stage)
    return sol[..., :n], sol[..., n]


def riccati_step(
    Vx: torch.Tensor,
    Vxx: torch.Tensor,
    fx: torch.Tensor,
    fu: torch.Tensor,
    lx: torch.Tensor | None,
    lu: torch.Tensor | None,
    lxx: torch.Tensor,
    luu: torch.Tensor,
    lux: torch.Tensor | None,
    c: torch.Tensor | None = None,
    *,
    solver: QuuSolver | None = None,
    stage: int | None = None,
) -> RiccatiStep:
    """One backward Riccati / DDP step; see the module docstring for the equations.

    Parameters are those of :func:`expand_q`; ``solver`` defaults to an unregularized
    :class:`CholeskySolver`; ``stage`` only labels error messages.
    """
    solver = CholeskySolver() if solver is None else solver
    Q = expand_q(Vx, Vxx, fx, fu, lx, lu, lxx, luu, lux, c)
    K, k = solve_policy(Q, solver, stage)
    return value_update(Q, K, k, exact_policy=getattr(solver, "reg", 0.0) == 0.0)


def value_update(
    Q: QExpansion, K: torch.Tensor, k: torch.Tensor, *, exact_policy: bool = False
) -> RiccatiStep:
    """Value derivatives of the policy ``(K, k)`` under the expansion ``Q``.

    With ``exact_policy`` (K, k solve the unregularized Q_uu exactly) the shorter forms
    ``Vx = Qx + Qux'k``, ``Vxx = Qxx + Qux'K`` are used; otherwise the general forms that
    stay correct for a regularized or approximate Q_uu.
    """
    KT = K.transpose(-1, -2)
    QuxT = Q.Qux.transpose(-1, -2)
    Quu_k = _mv(Q.Quu, k)
    if exact_policy:
        Vx = Q.Qx + _mv(QuxT, k)
        Vxx = sym(Q.Qxx + QuxT @ K)
    else:
        Vx = Q.Qx + _mv(KT, Quu_k) + _mv(KT, Q.Qu) + _mv(QuxT, k)
        Vxx = sym(Q.Qxx + KT @ Q.Quu @ K + KT @ Q.Qux + QuxT @ K)
    dV = torch.stack([(k * Q.Qu).sum(-1), 0.5 * (k * Quu_k).sum(-1)], dim=-1)
    return RiccatiStep(K=K, k=k, Vx=Vx, Vxx=Vxx, Q=Q, dV=dV)
