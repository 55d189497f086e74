r"""Plug 3 of the Riccati step, the plain part: how :math:`\tilde Q_{uu}^{-1}` is applied.

A :class:`QuuSolver` returns :math:`\tilde Q_{uu}^{-1}\,\text{rhs}` for right-hand sides of
shape (..., m, j).  :class:`CholeskySolver` regularizes by one number and raises on
failure (the LQR solvers); :class:`PerElementCholesky` regularizes every batch element by
its own :math:`\mu_b` and records failures instead (DDP, where each element adapts its
own Levenberg-Marquardt schedule); :class:`trajopt.steepest.NeumannSolver` applies a
truncated Neumann series with an adaptive damping that it reports through
:meth:`QuuSolver.value_damping`.  :func:`solve_policy` turns any of them into the gains.

Shapes: every tensor may carry leading batch dimensions; ``m`` is the control size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from ..errors import InvalidArgumentError, NotPositiveDefiniteError
from .expansion import QExpansion

__all__ = ["QuuSolver", "CholeskySolver", "PerElementCholesky", "cholesky_solve",
           "cholesky_factor", "solve_policy", "solve_policy_joint"]


def cholesky_solve(rhs: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """``torch.cholesky_solve`` with a fast path for 1 x 1 factors (one division instead
    of a LAPACK call per batch element, which dominates for large batches of scalar
    controls)."""
    if L.shape[-1] == 1:
        return rhs / (L * L)
    return torch.cholesky_solve(rhs, L)


def cholesky_factor(H: torch.Tensor, what: str, stage: int | None = None,
                    hint: str = "increase the regularization") -> torch.Tensor:
    """Lower Cholesky factor of the symmetric positive definite ``H`` (..., m, m).

    Raises :class:`~trajopt.errors.NotPositiveDefiniteError` naming ``what``, the stage
    and the first failing batch element when ``H`` is not positive definite.
    """
    L, info = torch.linalg.cholesky_ex(H)
    if bool((info != 0).any()):
        bad = torch.nonzero(info.reshape(-1) != 0)[0].item()
        where = f" at stage {stage}" if stage is not None else ""
        batch = f" (batch element {bad})" if info.numel() > 1 else ""
        raise NotPositiveDefiniteError(f"{what}{where}{batch} is not positive definite; "
                                       f"{hint}", stage=stage)
    return L


@runtime_checkable
class QuuSolver(Protocol):
    """How the policy is obtained from Q_uu: ``solve(Quu, rhs, stage)`` returns
    ``Quu_tilde^{-1} rhs`` for rhs of shape (..., m, j).

    ``value_damping(stage)`` is what the solve added to Q_uu at that stage, as a number or a
    tensor broadcasting against the batch (..., ); it is part of the cost the returned
    value derivatives describe (Tikhonov / trust-region term).  Solvers whose
    regularization is only a numerical device of the solve report 0.
    """

    def solve(self, Quu: torch.Tensor, rhs: torch.Tensor, stage: int | None) -> torch.Tensor:
        ...

    def value_damping(self, stage: int | None) -> float | torch.Tensor:
        ...


@dataclass(frozen=True)
class CholeskySolver:
    """Exact solve by Cholesky of ``Quu + reg * I`` (Tikhonov / Levenberg-Marquardt).

    Raises :class:`~trajopt.errors.NotPositiveDefiniteError` naming the stage (and the
    first failing batch index) when the regularized Q_uu is not positive definite.  The
    value derivatives of a step with ``reg > 0`` are those of the regularized policy
    under the *unregularized* cost (``damping`` is 0).
    """

    reg: float = 0.0

    def __post_init__(self):
        if type(self.reg) in (float, int) and 0 <= self.reg < math.inf:
            return  # the common case, without torch (this runs once per stage in loops)
        try:
            r = torch.as_tensor(self.reg, dtype=None if torch.is_tensor(self.reg)
                                else torch.float64)
        except (TypeError, ValueError, RuntimeError):
            r = None
        if r is None or r.is_complex() or r.dtype == torch.bool or not bool(
                torch.isfinite(r).all() & (r >= 0).all()):
            raise InvalidArgumentError(
                "reg must be a finite number >= 0 (0: the exact Q_uu; a negative one would "
                f"solve another problem); got {self.reg!r}")

    def solve(self, Quu: torch.Tensor, rhs: torch.Tensor, stage: int | None) -> torch.Tensor:
        m = Quu.shape[-1]
        if self.reg:
            Quu = Quu + self.reg * torch.eye(m, dtype=Quu.dtype, device=Quu.device)
        L = cholesky_factor(Quu, "Q_uu = R + B'PB (+ reg I)", stage,
                            "increase the regularization or check R")
        return cholesky_solve(rhs, L)

    def value_damping(self, stage: int | None) -> float:
        return 0.0


@dataclass
class PerElementCholesky:
    """Cholesky of ``Quu + reg_b I`` with one regularization per batch element.

    For solvers that handle failures per element (DDP): it never raises; ``info`` (B,) is
    the LAPACK status of the last solve (nonzero: that element's regularized Q_uu is not
    positive definite and its rows of the result are meaningless), ``failed`` (B,) bool
    every element that failed in any solve so far.

    Attributes
    ----------
    reg : (B,) tensor
    info : (B,) int tensor or None (before the first solve)
    """

    reg: torch.Tensor
    info: torch.Tensor | None = None
    _infos: list = field(default_factory=list, repr=False)
    _regI: torch.Tensor | None = field(default=None, repr=False)

    @property
    def failed(self) -> torch.Tensor | None:
        """(B,) bool: failed in any solve so far (None before the first)."""
        if not self._infos:
            return None
        return (torch.stack(self._infos) != 0).any(0)

    def solve(self, Quu: torch.Tensor, rhs: torch.Tensor, stage: int | None) -> torch.Tensor:
        m = Quu.shape[-1]
        if self._regI is None or self._regI.shape[-1] != m:
            eye = torch.eye(m, dtype=Quu.dtype, device=Quu.device)
            self._regI = self.reg[..., None, None] * eye
        L, info = torch.linalg.cholesky_ex(Quu + self._regI)
        self.info = info
        self._infos.append(info)
        return cholesky_solve(rhs, L)

    def value_damping(self, stage: int | None) -> float:
        return 0.0


def solve_policy_joint(
    Q: QExpansion, solver: QuuSolver, stage: int | None = None
) -> torch.Tensor:
    """The gains as one tensor ``[k | K]`` (..., m, 1+n): ``-Quu^{-1} [Qu | Qux]``, one
    solve with the right-hand side ``[Qu | Qux]`` (a view of the joint expansion when
    there is one)."""
    n = Q.n
    if Q.joint is not None:  # [Qu | Qux] and Quu: two views in two ops
        rhs, Quu = Q.joint[..., n:, :].split([n + 1, Q.joint.shape[-1] - n - 1], -1)
        return -solver.solve(Quu, rhs, stage)
    # torch.broadcast_shapes costs ~70 us (a Python reference implementation): only when
    # the batch shapes differ
    bx, bu = Q.Qux.shape[:-2], Q.Qu.shape[:-1]
    batch = bx if bx == bu else torch.broadcast_shapes(bx, bu)
    m = Q.Quu.shape[-1]
    Qu = Q.Qu if bu == batch else Q.Qu.expand(*batch, m)
    Qux = Q.Qux if bx == batch else Q.Qux.expand(*batch, m, n)
    rhs = torch.cat([Qu.unsqueeze(-1), Qux], -1)
    Quu = Q.Quu
    if Quu.shape[:-2] != rhs.shape[:-2]:
        Quu = Quu.expand(*rhs.shape[:-2], *Quu.shape[-2:])
    return -solver.solve(Quu, rhs, stage)


def solve_policy(
    Q: QExpansion, solver: QuuSolver, stage: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(K, k)``, ``K = -Quu^{-1} Qux`` (..., m, n), ``k = -Quu^{-1} Qu`` (..., m):
    views of :func:`solve_policy_joint`."""
    sol = solve_policy_joint(Q, solver, stage)
    return sol[..., 1:], sol[..., 0]
