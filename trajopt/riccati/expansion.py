r"""Plug 1 of the Riccati step, the dense form: how derivatives are given.

A stage's derivatives produce a :class:`QExpansion` of the state-action value,

.. math::

    Q_x &= l_x + f_x^\top (V_x' + V_{xx}' c), \quad
    Q_u  = l_u + f_u^\top (V_x' + V_{xx}' c), \\
    Q_{xx} &= l_{xx} + f_x^\top V_{xx}' f_x, \quad
    Q_{ux} = l_{ux} + f_u^\top V_{xx}' f_x, \quad
    Q_{uu} = l_{uu} + f_u^\top V_{xx}' f_u .

Dense derivatives are packed once (:func:`joint_blocks`) so the whole expansion is one
matmul (:func:`expand_q_joint`); :class:`DenseStage` is that packed stage as the object
the DDP loop asks for an expansion, with the second-order dynamics terms of full DDP.
The span-structured form of GT-DDP is :class:`trajopt.riccati.spans.SpanStage`; the
operator form of network layers is :mod:`trajopt.riccati.operator`.

Shapes: every tensor may carry broadcastable leading batch dimensions; ``n`` is the state
size of this stage, ``n1`` of the next, ``m`` the control size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .._checks import broadcast_shapes
from .._linalg import mv as _mv

__all__ = ["QExpansion", "addmm", "joint_blocks", "expand_q_joint", "expand_q", "DenseStage",
           "DenseStages"]


class QExpansion:
    """Second-order expansion of the state-action value Q around the nominal point.

    Built either from its blocks (``QExpansion(Qx=..., Qu=..., Qxx=..., Qux=..., Quu=...)``)
    or from the packed joint tensor (``QExpansion(joint=J, n=n)``); in the second form the
    blocks are views of ``joint``, taken when first read (a backward pass that never reads
    ``Qxx`` never slices it: each view is a few microseconds of dispatch, per stage).

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
    n : int
        The state size (the row where the control block of ``joint`` starts).
    """

    __slots__ = ("joint", "n", "_Qx", "_Qu", "_Qxx", "_Qux", "_Quu")

    def __init__(self, Qx: torch.Tensor | None = None, Qu: torch.Tensor | None = None,
                 Qxx: torch.Tensor | None = None, Qux: torch.Tensor | None = None,
                 Quu: torch.Tensor | None = None, joint: torch.Tensor | None = None,
                 n: int | None = None):
        if joint is None:
            if any(v is None for v in (Qx, Qu, Qxx, Qux, Quu)):
                raise TypeError("QExpansion needs Qx, Qu, Qxx, Qux, Quu or joint and n")
            n = Qxx.shape[-1]
        elif n is None:
            raise TypeError("QExpansion(joint=...) needs the state size n")
        self.joint, self.n = joint, n
        self._Qx, self._Qu, self._Qxx, self._Qux, self._Quu = Qx, Qu, Qxx, Qux, Quu

    @property
    def Qx(self) -> torch.Tensor:
        if self._Qx is None:
            self._Qx = self.joint[..., :self.n, 0]
        return self._Qx

    @property
    def Qu(self) -> torch.Tensor:
        if self._Qu is None:
            self._Qu = self.joint[..., self.n:, 0]
        return self._Qu

    @property
    def Qxx(self) -> torch.Tensor:
        if self._Qxx is None:
            self._Qxx = self.joint[..., :self.n, 1:self.n + 1]
        return self._Qxx

    @property
    def Qux(self) -> torch.Tensor:
        if self._Qux is None:
            self._Qux = self.joint[..., self.n:, 1:self.n + 1]
        return self._Qux

    @property
    def Quu(self) -> torch.Tensor:
        if self._Quu is None:
            self._Quu = self.joint[..., self.n:, self.n + 1:]
        return self._Quu

    def packed(self) -> torch.Tensor:
        """``joint``, or the blocks packed into one (..., n+m, 1+n+m) tensor."""
        if self.joint is not None:
            return self.joint
        Qx, Qu, Qxx, Qux, Quu = self.Qx, self.Qu, self.Qxx, self.Qux, self.Quu
        batch = torch.broadcast_shapes(Qx.shape[:-1], Qu.shape[:-1], Qxx.shape[:-2],
                                       Qux.shape[:-2], Quu.shape[:-2])
        n, m = Qxx.shape[-1], Quu.shape[-1]
        top = torch.cat([Qx.expand(*batch, n).unsqueeze(-1), Qxx.expand(*batch, n, n),
                         Qux.transpose(-1, -2).expand(*batch, n, m)], -1)
        bottom = torch.cat([Qu.expand(*batch, m).unsqueeze(-1), Qux.expand(*batch, m, n),
                            Quu.expand(*batch, m, m)], -1)
        return torch.cat([top, bottom], -2)


def addmm(C: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
          alpha: float = 1.0) -> torch.Tensor:
    """``C + alpha A @ B`` as one op (``baddbmm`` / ``addmm``) when the three share their
    batch shape, else broadcasting ``matmul``: the Riccati loop is dominated by the
    number of ops, not their size."""
    if C.ndim == A.ndim == B.ndim and C.shape[:-2] == A.shape[:-2] == B.shape[:-2]:
        if C.ndim == 3:
            return torch.baddbmm(C, A, B, alpha=alpha)
        if C.ndim == 2:
            return torch.addmm(C, A, B, alpha=alpha)
    return C + alpha * (A @ B) if alpha != 1.0 else C + A @ B


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
    # the linear terms may carry more batch than the matrices (one LQR from many
    # initial states: its adjoint's linear terms are per element)
    batch = broadcast_shapes(fx.shape[:-2], fu.shape[:-2], lxx.shape[:-2],
                             luu.shape[:-2], *(v.shape[:-k] for v, k in (
                                       (lx, 1), (lu, 1), (lux, 2)) if v is not None))
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
    # bmm where the batch shapes agree: matmul's own dispatch costs ~5 us more per call
    VF = torch.bmm(Vxx, F) if Vxx.ndim == F.ndim == 3 and Vxx.shape[0] == F.shape[0] \
        else Vxx @ F
    if Vx.shape[:-1] != VF.shape[:-2]:  # a batch carried by V_x alone (c, q, qT) too
        batch = torch.broadcast_shapes(Vx.shape[:-1], VF.shape[:-2])
        Vx, VF = Vx.expand(*batch, Vx.shape[-1]), VF.expand(*batch, *VF.shape[-2:])
    return QExpansion(joint=addmm(L, F.transpose(-1, -2),
                                  torch.cat([Vx.unsqueeze(-1), VF], -1)), n=n)


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


@dataclass(frozen=True)
class DenseStage:
    r"""One stage's packed dense derivatives: the expansion plug of LQR and plain DDP.

    Attributes
    ----------
    F : (..., n1, n+m)
        ``[f_x  f_u]`` (:func:`joint_blocks`).
    L : (..., n+m, 1+n+m)
        The cost block of :func:`joint_blocks`.
    n : int
        State size of this stage.
    c : (..., n1) or None
        Affine offset of the dynamics.
    fxx, fux, fuu : (B, n1, n, n), (B, n1, m, n), (B, n1, m, m) or None
        Second-order dynamics (full DDP): :meth:`expand` adds
        :math:`V_x' \cdot f_{xx}`, :math:`V_x' \cdot f_{ux}`, :math:`V_x' \cdot f_{uu}`
        to the cost block.
    """

    F: torch.Tensor
    L: torch.Tensor
    n: int
    c: torch.Tensor | None = None
    fxx: torch.Tensor | None = None
    fux: torch.Tensor | None = None
    fuu: torch.Tensor | None = None

    def expand(self, Vx: torch.Tensor, Vxx: torch.Tensor) -> QExpansion:
        """The Q expansion under the next value (Vx (..., n1), Vxx (..., n1, n1))."""
        L = self.L
        if self.fxx is not None:  # full DDP: dynamics-Hessian terms
            n = self.n
            extra = torch.zeros_like(L)
            extra[..., :n, 1:n + 1] = torch.einsum("bi,bijk->bjk", Vx, self.fxx)
            fux = torch.einsum("bi,bijk->bjk", Vx, self.fux)
            extra[..., n:, 1:n + 1] = fux
            extra[..., :n, n + 1:] = fux.transpose(-1, -2)
            extra[..., n:, n + 1:] = torch.einsum("bi,bijk->bjk", Vx, self.fuu)
            L = L + extra
        return expand_q_joint(Vx, Vxx, self.F, L, self.n, self.c)

    def state_block(self, Vx: torch.Tensor, Vxx: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The value derivatives on the stage's state (here: all of them)."""
        return Vx, Vxx

    def select(self, idx) -> DenseStage:
        """The rows ``idx`` of the flat batch."""
        def pick(v):
            return None if v is None else v[idx]
        return DenseStage(self.F[idx], self.L[idx], self.n, pick(self.c), pick(self.fxx),
                          pick(self.fux), pick(self.fuu))


@dataclass(frozen=True, eq=False)
class DenseStages(Sequence):
    """T stages of one size as stacked tensors: the sequence of :class:`DenseStage` that
    the DDP loop's derivatives give (stage t's views made when it is read), whose stacked
    form the compiled pass and the scan take as it is (:func:`~trajopt.riccati.scan.
    stacked_stages`) instead of stacking T stages back.

    Attributes
    ----------
    stacked : DenseStage
        The stages' derivatives with the stages as their first dimension: F (T, ..., n1,
        n+m), L (T, ..., n+m, 1+n+m), the optional terms (T, ...) or None.
    """

    stacked: DenseStage

    def __len__(self) -> int:
        return self.stacked.F.shape[0]

    def __getitem__(self, t):
        if isinstance(t, slice):
            return [self[i] for i in range(*t.indices(len(self)))]
        s = self.stacked
        return DenseStage(s.F[t], s.L[t], s.n, *(None if v is None else v[t]
                                                  for v in (s.c, s.fxx, s.fux, s.fuu)))
