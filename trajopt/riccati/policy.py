r"""Plug 3 of the Riccati step for DDP: how the gains are formed from the expansion.

Each plug turns a :class:`~trajopt.riccati.expansion.QExpansion` of stage ``t`` into
:class:`Gains` ``(K, k, ok)`` for a flat batch of ``B`` elements, each with its own
Levenberg-Marquardt :math:`\mu_b`:

* :class:`CholeskyGains` -- :math:`k = -(Q_{uu} + \mu I)^{-1} Q_u`,
  :math:`K = -(Q_{uu} + \mu I)^{-1} Q_{ux}` (plain DDP / iLQR);
* :class:`PlayerGains` -- the cooperative policy of several players sharing the control,
  each with its own (possibly approximated) curvature block
  (:func:`~trajopt.riccati.players.cooperative_policy`, GT-DDP Eq. 40);
* :class:`BoxGains` -- control limits (Tassa, Mansard & Todorov 2014): the feedforward
  solves the box QP of the (player-structured) curvature, the feedback rows of clamped
  controls are zero.  With players the QP is on
  :func:`~trajopt.riccati.players.joint_curvature`, so box limits and players compose:
  with exact blocks it is the box-limited DDP step on the joint control.

``ok`` is False for the elements whose regularized curvature is not positive definite
(their rows of K, k are meaningless); the loop raises their :math:`\mu` and retries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .boxqp import box_qp
from .expansion import QExpansion
from .players import cooperative_policy, joint_curvature, player_blocks
from .solvers import PerElementCholesky, cholesky_solve, solve_policy_joint

__all__ = ["Gains", "GainsPlug", "CholeskyGains", "PlayerGains", "BoxGains",
           "PlayerCurvature"]

# (t, i, exact block (B, m_i, m_i)) -> approximation or None (keep the exact block)
PlayerCurvature = Callable[[int, int, torch.Tensor], torch.Tensor | None]


@dataclass(frozen=True)
class Gains:
    """``K`` (B, m, ny), ``k`` (B, m), ``ok`` (B,) bool; ``kK`` (B, m, 1+ny) the joint
    ``[k | K]`` that K and k are views of, when the plug formed them in one solve."""

    K: torch.Tensor
    k: torch.Tensor
    ok: torch.Tensor
    kK: torch.Tensor | None = None


class GainsPlug(Protocol):
    """``gains(Q, t)`` -> :class:`Gains` of stage ``t``."""

    def gains(self, Q: QExpansion, t: int) -> Gains:
        ...


@dataclass
class CholeskyGains:
    """Per-element Levenberg-Marquardt Cholesky; ``reg`` (B,)."""

    reg: torch.Tensor
    _chol: PerElementCholesky | None = field(default=None, repr=False)

    def gains(self, Q: QExpansion, t: int) -> Gains:
        if self._chol is None:
            self._chol = PerElementCholesky(self.reg)
        kK = solve_policy_joint(Q, self._chol, t)
        return Gains(K=kK[..., 1:], k=kK[..., 0], ok=self._chol.info == 0, kK=kK)


def _approx(curvature: PlayerCurvature | None, Quu: torch.Tensor, sizes: Sequence[int],
            t: int) -> list[torch.Tensor | None] | None:
    if curvature is None:
        return None
    return [curvature(t, i, blk) for i, blk in enumerate(player_blocks(Quu, sizes))]


@dataclass(frozen=True)
class PlayerGains:
    """The cooperative policy; ``sizes[t]`` the players' control sizes at stage ``t``,
    ``curvature`` an optional per-player approximation (None: exact blocks)."""

    reg: torch.Tensor
    sizes: Sequence[Sequence[int]]
    curvature: PlayerCurvature | None = None

    def gains(self, Q: QExpansion, t: int) -> Gains:
        sizes = self.sizes[t]
        pol = cooperative_policy(Q.Qu, Q.Qux, Q.Quu, sizes,
                                 approx=_approx(self.curvature, Q.Quu, sizes, t),
                                 reg=self.reg, check_finite=False)
        return Gains(K=pol.K, k=pol.k, ok=pol.ok)


@dataclass(frozen=True)
class BoxGains:
    """Box-QP gains for limits ``lo <= u_bar_t + delta u <= hi``.

    Attributes
    ----------
    reg : (B,)
    lo, hi : (m,) or (T, B, m)
        The same limits at every stage, or per stage and element (stage ``t``: ``lo[t]``).
    us : sequence of (B, m)
        The nominal controls per stage.
    warm : sequence of (B, m) or None
        Warm starts of the QP (the last feedforward terms).
    sizes, curvature
        Players, as for :class:`PlayerGains` (None: one player per stage).
    """

    reg: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    us: Sequence[torch.Tensor]
    warm: Sequence[torch.Tensor] | None = None
    sizes: Sequence[Sequence[int]] | None = None
    curvature: PlayerCurvature | None = None

    def _reg_eye(self, Quu: torch.Tensor) -> torch.Tensor:
        """``reg I`` like ``Quu`` (B, m, m), formed once per backward pass (what
        :func:`~trajopt.riccati.players.joint_curvature` adds for one exact player)."""
        regI = self.__dict__.get("_regI")  # a cache on the frozen instance
        if regI is None or regI.dtype != Quu.dtype or regI.shape[-1] != Quu.shape[-1]:
            mu = torch.as_tensor(self.reg, dtype=Quu.dtype, device=Quu.device)
            regI = mu.reshape(-1, 1, 1) * torch.eye(Quu.shape[-1], dtype=Quu.dtype,
                                                     device=Quu.device)
            self.__dict__["_regI"] = regI
        return regI

    def gains(self, Q: QExpansion, t: int) -> Gains:
        m = Q.Quu.shape[-1]
        if self.sizes is None and self.curvature is None:
            H = Q.Quu + self._reg_eye(Q.Quu)  # joint_curvature of one exact player
        else:
            sizes = [m] if self.sizes is None else self.sizes[t]
            H = joint_curvature(Q.Quu, sizes,
                                approx=_approx(self.curvature, Q.Quu, sizes, t), reg=self.reg)
        u, lo, hi = self.us[t], self.lo, self.hi
        if lo.ndim == 3:   # per stage (and element)
            lo, hi = lo[t], hi[t]
        res = box_qp(H, Q.Qu, lo - u, hi - u,
                     None if self.warm is None else self.warm[t])
        rhs = torch.where(res.clamped.unsqueeze(-1), 0.0, Q.Qux)
        return Gains(K=-cholesky_solve(rhs, res.factor), k=res.x, ok=~res.failed)
