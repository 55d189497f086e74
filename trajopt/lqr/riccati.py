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

from dataclasses import dataclass, field
from typing import Protocol

import torch

from .._linalg import mv as _mv
from .._linalg import sym
from ..errors import NotPositiveDefiniteError

__all__ = [
    "QExpansion",
    "joint_blocks",
    "expand_q_joint",
    "riccati_step_joint",
    "RiccatiStep",
    "QuuSolver",
    "CholeskySolver",
    "PerElementCholesky",
    "expand_q",
    "solve_policy",
    "riccati_step",
    "value_update",
]


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
        Not necessarily symmetrized: the Cholesky solver reads its lower triangle.
    joint : (..., n+m, 1+n+m) or None
        The packed ``[[Qx, Qxx, Qxu], [Qu, Qux, Quu]]`` the fields are views of, when the
        expansion was formed jointly.
    """

    Qx: torch.Tensor
    Qu: torch.Tensor
    Qxx: torch.Tensor
    Qux: torch.Tensor
    Quu: torch.Tensor
    joint: torch.Tensor | None = None


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
    dV : (..., 2) or None
        ``[k'Q_u, 1/2 k'Q_uu k]`` when the update computed it on the way (general form);
        :meth:`expected_change` returns it in every case.
    """

    K: torch.Tensor
    k: torch.Tensor
    Vx: torch.Tensor
    Vxx: torch.Tensor
    Q: QExpansion
    dV: torch.Tensor | None = None

    def expected_change(self) -> torch.Tensor:
        """Expected value change of the full step, (..., 2): ``[k'Q_u, 1/2 k'Q_uu k]``, so
        a line search with step alpha expects ``alpha dV[0] + alpha^2 dV[1]``."""
        if self.dV is not None:
            return self.dV
        Quu_k = _mv(sym(self.Q.Quu), self.k)
        return torch.stack([(self.k * self.Q.Qu).sum(-1), 0.5 * (self.k * Quu_k).sum(-1)],
                           dim=-1)


def joint_blocks(
    fx: torch.Tensor, fu: torch.Tensor, lx: torch.Tensor | None, lu: torch.Tensor | None,
    lxx: torch.Tensor, luu: torch.Tensor, lux: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a stage's derivatives for :func:`expand_q_joint`.

    Returns ``F = [f_x  f_u]`` (..., n1, n+m) and the cost block with the gradient as
    its first column, ``L = [[l_x, l_xx, l_ux'], [l_u, l_ux, l_uu]]`` (..., n+m, 1+n+m).
    Works on stacked (time-major inside the batch) arrays too, so a whole LQR is packed
    with two ``cat`` calls.
    """
    n, m = fx.shape[-1], fu.shape[-1]
    batch = torch.broadcast_shapes(fx.shape[:-2], fu.shape[:-2], lxx.shape[:-2],
                                   luu.shape[:-2])
    F = torch.cat([fx.expand(*batch, *fx.shape[-2:]), fu.expand(*batch, *fu.shape[-2:])], -1)
    zeros = fx.new_zeros(())
    lx = zeros.expand(*batch, n) if lx is None else lx.expand(*batch, n)
    lu = zeros.expand(*batch, m) if lu is None else lu.expand(*batch, m)
    lux = zeros.expand(*batch, m, n) if lux is None else lux.expand(*batch, m, n)
    top = torch.cat([lx.unsqueeze(-1), lxx.expand(*batch, n, n), lux.transpose(-1, -2)], -1)
    bottom = torch.cat([lu.unsqueeze(-1), lux, luu.expand(*batch, m, m)], -1)
    return F, torch.cat([top, bottom], -2)


def expand_q_joint(
    Vx: torch.Tensor, Vxx: torch.Tensor, F: torch.Tensor, L: torch.Tensor, n: int,
    c: torch.Tensor | None = None,
) -> QExpansion:
    r"""Q expansion from packed derivatives (see :func:`joint_blocks`):
    :math:`[Q_\cdot \mid Q_{\cdot\cdot}] = L + F^\top [V_x' \mid V_{xx}' F]`, one
    matmul for the whole second-order expansion.  The fields of the result are views
    into one (..., n+m, 1+n+m) tensor; ``n`` is the state size of this stage.
    """
    if c is not None:
        Vx = Vx + _mv(Vxx, c)
    VF = Vxx @ F
    Vx = Vx.expand(*VF.shape[:-2], Vx.shape[-1])
    J = L + F.transpose(-1, -2) @ torch.cat([Vx.unsqueeze(-1), VF], -1)
    return _split_joint(J, n)


def _split_joint(J: torch.Tensor, n: int) -> QExpansion:
    return QExpansion(Qx=J[..., :n, 0], Qu=J[..., n:, 0], Qxx=J[..., :n, 1:n + 1],
                      Qux=J[..., n:, 1:n + 1], Quu=J[..., n:, n + 1:], joint=J)


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
    F, L = joint_blocks(fx, fu, lx, lu, lxx, luu, lux)
    return expand_q_joint(Vx, Vxx, F, L, fx.shape[-1], c)


def cholesky_solve(rhs: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """``torch.cholesky_solve`` with a fast path for 1 x 1 factors (one division instead
    of a LAPACK call per batch element, which dominates for large batches of scalar
    controls)."""
    if L.shape[-1] == 1:
        return rhs / (L * L)
    return torch.cholesky_solve(rhs, L)


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
        return cholesky_solve(rhs, L)


@dataclass
class PerElementCholesky:
    """Cholesky of ``Quu + reg_b I`` with one regularization per batch element.

    For solvers that handle failures per element (DDP): it never raises; the elements
    whose regularized Q_uu is not positive definite accumulate in ``failed`` (B,) and
    their rows of the result are meaningless.

    Attributes
    ----------
    reg : (B,) tensor
    failed : (B,) bool tensor or None (before the first solve)
    """

    reg: torch.Tensor
    failed: torch.Tensor | None = None
    _regI: torch.Tensor | None = field(default=None, repr=False)

    def solve(self, Quu: torch.Tensor, rhs: torch.Tensor, stage: int | None) -> torch.Tensor:
        m = Quu.shape[-1]
        if self._regI is None or self._regI.shape[-1] != m:
            eye = torch.eye(m, dtype=Quu.dtype, device=Quu.device)
            self._regI = self.reg[..., None, None] * eye
        L, info = torch.linalg.cholesky_ex(Quu + self._regI)
        bad = info != 0
        self.failed = bad if self.failed is None else self.failed | bad
        return cholesky_solve(rhs, L)


def solve_policy(
    Q: QExpansion, solver: QuuSolver, stage: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(K, k)``, ``K = -Quu^{-1} Qux`` (..., m, n), ``k = -Quu^{-1} Qu`` (..., m).

    Both come from one solve with the right-hand side ``[Qu | Qux]`` (a view of the joint
    expansion when there is one).
    """
    n = Q.Qux.shape[-1]
    if Q.joint is not None:
        rhs = Q.joint[..., n:, :n + 1]
    else:
        batch = torch.broadcast_shapes(Q.Qux.shape[:-2], Q.Qu.shape[:-1])
        m = Q.Quu.shape[-1]
        rhs = torch.cat([Q.Qu.expand(*batch, m).unsqueeze(-1), Q.Qux.expand(*batch, m, n)], -1)
    Quu = Q.Quu.expand(*rhs.shape[:-2], *Q.Quu.shape[-2:])
    sol = -solver.solve(Quu, rhs, stage)
    return sol[..., 1:], sol[..., 0]


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
    F, L = joint_blocks(fx, fu, lx, lu, lxx, luu, lux)
    return riccati_step_joint(Vx, Vxx, F, L, fx.shape[-1], c, solver=solver, stage=stage)


def riccati_step_joint(
    Vx: torch.Tensor, Vxx: torch.Tensor, F: torch.Tensor, L: torch.Tensor, n: int,
    c: torch.Tensor | None = None, *, solver: QuuSolver | None = None,
    stage: int | None = None,
) -> RiccatiStep:
    """:func:`riccati_step` on packed derivatives (``F``, ``L`` of :func:`joint_blocks`),
    the form the LQR solvers precompute for every stage at once."""
    solver = CholeskySolver() if solver is None else solver
    Q = expand_q_joint(Vx, Vxx, F, L, n, c)
    K, k = solve_policy(Q, solver, stage)
    return value_update(Q, K, k, exact_policy=getattr(solver, "reg", None) == 0.0)


def value_update(
    Q: QExpansion, K: torch.Tensor, k: torch.Tensor, *, exact_policy: bool = False
) -> RiccatiStep:
    """Value derivatives of the policy ``(K, k)`` under the expansion ``Q``.

    With ``exact_policy`` (K, k solve the unregularized Q_uu exactly) the shorter forms
    ``Vx = Qx + Qux'k``, ``Vxx = Qxx + Qux'K`` are used (one matmul on the joint
    expansion); otherwise the general forms that stay correct for a regularized or
    approximate Q_uu.
    """
    QuxT = Q.Qux.transpose(-1, -2)
    if exact_policy and Q.joint is not None:
        n = K.shape[-1]
        kK = torch.cat([k.unsqueeze(-1), K], -1)
        V = Q.joint[..., :n, :n + 1] + QuxT @ kK
        Vx, Vxx = V[..., 0], sym(V[..., 1:])
    elif exact_policy:
        Vx = Q.Qx + _mv(QuxT, k)
        Vxx = sym(Q.Qxx + QuxT @ K)
    else:
        # [Vx | Vxx] = [Qx | Qxx] + K'([Quu k + Qu | Quu K + 2 Qux]) + [Qux'k | 0], using
        # sym(K'Qux + Qux'K) = sym(2 K'Qux): two matmuls for the whole general update
        kK = torch.cat([k.unsqueeze(-1), K], -1)
        QuukK = Q.Quu @ kK
        W = QuukK + torch.cat([Q.Qu.unsqueeze(-1), 2.0 * Q.Qux], -1)
        V = K.transpose(-1, -2) @ W
        Vx = Q.Qx + V[..., 0] + _mv(QuxT, k)
        Vxx = sym(Q.Qxx + V[..., 1:])
        dV = torch.stack([(k * Q.Qu).sum(-1), 0.5 * (k * QuukK[..., 0]).sum(-1)], dim=-1)
        return RiccatiStep(K=K, k=k, Vx=Vx, Vxx=Vxx, Q=Q, dV=dV)
    return RiccatiStep(K=K, k=k, Vx=Vx, Vxx=Vxx, Q=Q)
