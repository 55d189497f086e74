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

from dataclasses import dataclass

import torch

from .._linalg import mv as _mv

__all__ = ["QExpansion", "joint_blocks", "expand_q_joint", "expand_q", "DenseStage"]


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
