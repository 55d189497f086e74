r"""Cooperative-game policies: one stage, several players sharing the cost (GT-DDP paper,
papers/001, Sec. 3.2, Eq. 13-15 and App. A.2, Eq. 35-40).

At a stage with players :math:`w = [u; v]` (control blocks of sizes ``sizes``) and a
state-like variable :math:`y` (the state, and the residual states of open spans), the
quadratic model of Q has the blocks :math:`Q_u, Q_v, Q_{uy}, Q_{vy}, Q_{uu}, Q_{uv},
Q_{vv}`.  Each player's own curvature may be replaced by an approximation
:math:`\tilde Q_{uu}, \tilde Q_{vv}` (a preconditioner of a network layer, or the exact
block, plus the Levenberg-Marquardt :math:`\mu I`); the cross block :math:`Q_{uv}` is
kept.  With :math:`\hat Q_{uu} = \tilde Q_{uu} - Q_{uv}\tilde Q_{vv}^{-1}Q_{vu}` and
:math:`\hat Q_{vv} = \tilde Q_{vv} - Q_{vu}\tilde Q_{uu}^{-1}Q_{uv}` (Schur complements),
Eq. 40 gives

.. math::

    \hat k &= -\hat Q_{uu}^{-1}(Q_u - Q_{uv}\tilde Q_{vv}^{-1} Q_v), &
    \hat K &= -\hat Q_{uu}^{-1}(Q_{uy} - Q_{uv}\tilde Q_{vv}^{-1} Q_{vy}), \\
    \hat l &= -\hat Q_{vv}^{-1}(Q_v - Q_{vu}\tilde Q_{uu}^{-1} Q_u), &
    \hat L &= -\hat Q_{vv}^{-1}(Q_{vy} - Q_{vu}\tilde Q_{uu}^{-1} Q_{uy}),

i.e. the block inverse of :math:`\begin{bmatrix}\tilde Q_{uu} & Q_{uv}\\ Q_{vu} &
\tilde Q_{vv}\end{bmatrix}`: with exact blocks the cooperative policy is DDP on the
concatenated control, and with :math:`Q_{uv} = 0` each player solves alone
(:math:`k = -\tilde Q_{uu}^{-1}Q_u`).  The paper's residual gains (:math:`G, H`) are the
columns of :math:`\hat K, \hat L` that belong to residual states, so one formula serves
them.  Two players use Eq. 40 as written; more players solve the same block system by one
Cholesky factorization.

Shapes: ``B`` leading batch, ``m = sum(sizes)``, ``ny`` the size of y.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .._linalg import finite_rows
from ..errors import InvalidArgumentError, ShapeError
from .solvers import cholesky_solve

__all__ = ["CooperativePolicy", "cooperative_policy", "joint_curvature", "player_blocks"]


@dataclass(frozen=True)
class CooperativePolicy:
    """Per-player gains of :func:`cooperative_policy`.

    Attributes
    ----------
    k : (B, m)
        Open gains of all players, concatenated in player order.
    K : (B, m, ny)
        Feedback gains on y (state and residual columns).
    ok : (B,) bool
        False where an approximated block or a Schur complement is not positive definite
        (that row of k, K is meaningless).
    """

    k: torch.Tensor
    K: torch.Tensor
    ok: torch.Tensor

    def player(self, i: int, sizes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_i, K_i)`` of player ``i``."""
        a = sum(sizes[:i])
        return self.k[..., a:a + sizes[i]], self.K[..., a:a + sizes[i], :]


def _chol(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    L, info = torch.linalg.cholesky_ex(A)
    return L, info == 0


def cooperative_policy(Qw: torch.Tensor, Qwy: torch.Tensor, Qww: torch.Tensor,
                       sizes: Sequence[int], *,
                       approx: Sequence[torch.Tensor | None] | None = None,
                       reg: torch.Tensor | float = 0.0,
                       check_finite: bool = True) -> CooperativePolicy:
    r"""The cooperative policy :math:`\delta w = k + K \delta y` (module docstring).

    Parameters
    ----------
    Qw : (B, m)
    Qwy : (B, m, ny)
    Qww : (B, m, m)
        Exact joint curvature; its off-diagonal player blocks are the cross terms.
    sizes : sequence of int
        Control size of each player, summing to m.
    approx : sequence of (B, m_i, m_i) or None, optional
        Each player's curvature approximation (None: the exact diagonal block).
    reg : float or (B,)
        :math:`\mu` added to every player's diagonal block.
    check_finite : bool
        Also mark rows with non-finite gains as not ok (a caller that checks the value
        change afterwards, as DDP does, may skip this).
    """
    sizes = [int(s) for s in sizes]
    m = Qw.shape[-1]
    if any(s < 1 for s in sizes) or sum(sizes) != m:
        raise ShapeError(f"sizes must be positive and sum to the control size {m}; got "
                         f"{sizes}")
    if approx is not None and len(approx) != len(sizes):
        raise InvalidArgumentError(f"approx needs one entry per player ({len(sizes)}); got "
                                   f"{len(approx)}")
    B = Qw.shape[0]
    rhs = torch.cat([Qw.unsqueeze(-1), Qwy], -1)  # (B, m, 1 + ny)
    if len(sizes) == 2:
        diag = _regularized_blocks(Qww, sizes, approx, reg)
        su, sv = _slices(sizes)
        Quv = Qww[:, su, sv]
        Qvu = Quv.transpose(-1, -2)
        Lu, ok_u = _chol(diag[0])
        Lv, ok_v = _chol(diag[1])
        ru, rv = rhs[:, su], rhs[:, sv]
        Su = diag[0] - Quv @ cholesky_solve(Qvu, Lv)          # Eq. 40: hat Q_uu
        Sv = diag[1] - Qvu @ cholesky_solve(Quv, Lu)          # hat Q_vv
        LSu, ok_su = _chol(Su)
        LSv, ok_sv = _chol(Sv)
        gu = -cholesky_solve(ru - Quv @ cholesky_solve(rv, Lv), LSu)   # (40a-c)
        gv = -cholesky_solve(rv - Qvu @ cholesky_solve(ru, Lu), LSv)   # (40d-f)
        gains = torch.cat([gu, gv], 1)
        ok = ok_u & ok_v & ok_su & ok_sv
    else:  # one player (plain DDP when exact) or more: one Cholesky of the block system
        L, ok = _chol(joint_curvature(Qww, sizes, approx=approx, reg=reg))
        gains = -cholesky_solve(rhs, L)
    return _policy(gains, ok, B, check_finite)


def _slices(sizes: Sequence[int]) -> list[slice]:
    offs = [sum(sizes[:i]) for i in range(len(sizes))]
    return [slice(a, a + s) for a, s in zip(offs, sizes)]


def _regularized_blocks(Qww, sizes, approx, reg) -> list[torch.Tensor]:
    """Each player's curvature block: its approximation or the exact one, plus mu I."""
    mu = torch.as_tensor(reg, dtype=Qww.dtype, device=Qww.device).reshape(-1, 1, 1)
    out = []
    for i, s in enumerate(_slices(sizes)):
        D = Qww[:, s, s] if approx is None or approx[i] is None else approx[i]
        out.append(D + mu * torch.eye(sizes[i], dtype=Qww.dtype, device=Qww.device))
    return out


def player_blocks(Qww: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """The players' exact diagonal blocks of ``Qww`` (B, m, m): views (B, m_i, m_i)."""
    return [Qww[:, s, s] for s in _slices(sizes)]


def joint_curvature(Qww: torch.Tensor, sizes: Sequence[int], *,
                    approx: Sequence[torch.Tensor | None] | None = None,
                    reg: torch.Tensor | float = 0.0) -> torch.Tensor:
    r"""The matrix whose inverse the cooperative policy applies, (B, m, m): ``Qww`` with
    each player's diagonal block replaced by its approximation (or kept) plus
    :math:`\mu I`, the cross blocks exact.  With one player and no approximation it is
    :math:`Q_{ww} + \mu I`; a box QP on it is the box-limited cooperative policy."""
    if len(sizes) == 1 and (approx is None or approx[0] is None):
        mu = torch.as_tensor(reg, dtype=Qww.dtype, device=Qww.device).reshape(-1, 1, 1)
        return Qww + mu * torch.eye(Qww.shape[-1], dtype=Qww.dtype, device=Qww.device)
    M = Qww.clone()
    for s, D in zip(_slices(sizes), _regularized_blocks(Qww, sizes, approx, reg)):
        M[:, s, s] = D
    return M


def _policy(gains, ok, B, check_finite) -> CooperativePolicy:
    ok = ok.reshape(B)
    if check_finite:
        ok = ok & finite_rows(gains, gains.dim() - 1)
    return CooperativePolicy(k=gains[..., 0], K=gains[..., 1:], ok=ok)
