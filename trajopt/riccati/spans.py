r"""Plug 1 of the Riccati step, the span-structured form (GT-DDP paper, papers/001, Sec. 3,
App. A, Eq. 26-33).

With residual spans open, the value depends on :math:`y_t = [x_t, x_{r_1}, \dots]` (the
state and the residuals carried past this stage).  DDP on the augmented state would form
the augmented Jacobian :math:`J = \partial y_{t+1} / \partial y_t`; its residual blocks
are identities (a residual is carried) or the shortcut's Jacobian :math:`h_r` (it merges
into :math:`x_{t+1}`), so :class:`SpanStage` forms
:math:`Q_y = l_y + J^\top V_y'`, :math:`Q_{yy} = l_{yy} + J^\top V_{yy}' J`,
:math:`Q_{wy} = l_{wy} + F_w^\top V'_{x y} J`, :math:`Q_{ww} = l_{ww} + F_w^\top V'_{xx}
F_w` block by block, with identities as copies.  The control :math:`w` holds the stage's
own control and the parameters of the shortcuts that merge there (players of their own,
:mod:`trajopt.riccati.players`).  The value update and the policy are the kernel's; the
merge at a span's start (Eq. 31-33) is the ``x`` block of :math:`J` collecting every
input that comes from :math:`x_t`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .expansion import QExpansion

__all__ = ["SpanStage"]

# one input block of y_t: the outputs it feeds, as (slice of y_{t+1}, matrix or None =
# identity)
Block = list[tuple[slice, torch.Tensor | None]]


def _sum(terms):
    it = iter(terms)
    out = next(it)
    for v in it:
        out = out + v
    return out


@dataclass(frozen=True)
class SpanStage:
    """One stage's derivatives over ``y_t = [x_t, open residuals]`` (flat batch B).

    Attributes
    ----------
    blocks : list of Block
        For each input block of :math:`y_t` (the state first, then each open residual in
        span order), the blocks of :math:`y_{t+1}` it feeds and the Jacobian: ``f_x``
        (B, n1, n) or a shortcut's :math:`h_r` into :math:`x_{t+1}`, None (identity) for a
        residual carried on.
    Fw : (B, n1, m)
        :math:`[f_u \\mid h_v]`: the control Jacobian of :math:`x_{t+1}`.
    x_next : slice
        Where :math:`x_{t+1}` sits in :math:`y_{t+1}`.
    n : int
        State size of this stage (the first n entries of :math:`y_t`).
    lx, lw, lxx, lww, lwx : (B, n), (B, m), (B, n, n), (B, m, m), (B, m, n)
        Running-cost derivatives (the cost sees x_t and the whole control w).
    """

    blocks: list[Block]
    Fw: torch.Tensor
    x_next: slice
    n: int
    lx: torch.Tensor
    lw: torch.Tensor
    lxx: torch.Tensor
    lww: torch.Tensor
    lwx: torch.Tensor

    def expand(self, V: torch.Tensor, VV: torch.Tensor) -> QExpansion:
        """The Q expansion over ``(y_t, w)`` from the next value over ``y_{t+1}``."""
        blocks = self.blocks
        # A = V' J, g = J' V_x', Qyy = J' V' J, block by block (identities are copies)
        A = torch.cat([_sum(VV[:, :, o] if M is None else VV[:, :, o] @ M
                            for o, M in blk) for blk in blocks], -1)
        g = torch.cat([_sum(V[:, o] if M is None else (V[:, o].unsqueeze(-2) @ M)[:, 0]
                            for o, M in blk) for blk in blocks], -1)
        Qyy = torch.cat([_sum(A[:, o, :] if M is None else M.transpose(-1, -2) @ A[:, o, :]
                              for o, M in blk) for blk in blocks], -2)
        xo, xs = self.x_next, slice(0, self.n)
        FwT = self.Fw.transpose(-1, -2)
        Qw = self.lw + (FwT @ V[:, xo].unsqueeze(-1))[..., 0]
        Qwy = FwT @ A[:, xo, :]
        Qww = self.lww + FwT @ VV[:, xo, xo] @ self.Fw
        g[:, xs] += self.lx
        Qyy[:, xs, xs] += self.lxx
        Qwy[:, :, xs] += self.lwx
        return QExpansion(Qx=g, Qu=Qw, Qxx=Qyy, Qux=Qwy, Quu=Qww)

    def state_block(self, V: torch.Tensor, VV: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The value derivatives on :math:`x_t` (the first ``n`` entries of y_t)."""
        return V[:, :self.n], VV[:, :self.n, :self.n]

    def select(self, idx) -> SpanStage:
        """The rows ``idx`` of the flat batch."""
        blocks = [[(o, None if M is None else M[idx]) for o, M in blk]
                  for blk in self.blocks]
        return SpanStage(blocks, self.Fw[idx], self.x_next, self.n,
                         *(v[idx] for v in (self.lx, self.lw, self.lxx, self.lww,
                                            self.lwx)))
