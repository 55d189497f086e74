r"""Shared pieces of the CARE solvers: residual, gain, closed-loop eigenvalues.

The equation is scipy's ``solve_continuous_are`` form

.. math::

    A^\top X E + E^\top X A - (E^\top X B + S) R^{-1} (B^\top X E + S^\top) + Q = 0 ,

and the gain is returned in the DDP sign convention ``u = K x`` with
:math:`K = -R^{-1}(B^\top X E + S^\top)` (python-control's ``lqr`` returns :math:`-K`).
The data container, its checks and the cost scaling are the DARE's
(:class:`trajopt.dare._common.DAREData`): the same six matrices with the same meaning.
"""

from __future__ import annotations

import torch

from .._linalg import sym
from ..dare._common import DAREData


def _XE(d: DAREData, X: torch.Tensor) -> torch.Tensor:
    return X if d.E is None else X @ d.E


def _H(d: DAREData, X: torch.Tensor) -> torch.Tensor:
    """``B' X E + S'`` (..., m, n)."""
    H = d.B.transpose(-1, -2) @ _XE(d, X)
    return H if d.S is None else H + d.S.transpose(-1, -2)


def care_gain(d: DAREData, X: torch.Tensor) -> torch.Tensor:
    """``K = -R^{-1} (B'XE + S')`` (..., m, n)."""
    return -torch.linalg.solve(d.R, _H(d, X))


def care_residual_matrix(d: DAREData, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Riccati residual (symmetrized) and the sum of the norms of its terms."""
    AXE = d.A.transpose(-1, -2) @ _XE(d, X)
    H = _H(d, X)
    corr = H.transpose(-1, -2) @ torch.linalg.solve(d.R, H)
    res = sym(AXE + AXE.transpose(-1, -2) - corr + d.Q)
    nrm = torch.linalg.matrix_norm
    return res, 2 * nrm(AXE) + nrm(corr) + nrm(d.Q)


def care_relative_residual(d: DAREData, X: torch.Tensor) -> torch.Tensor:
    r"""``||Ric(X)||_F / (2 ||A'XE||_F + ||(E'XB + S) R^{-1} (..)'||_F + ||Q||_F)``
    (batch); ``inf`` where X is not finite."""
    res, scale = care_residual_matrix(d, X)
    tiny = torch.finfo(X.dtype).tiny
    rel = torch.linalg.matrix_norm(res) / scale.clamp(min=tiny)
    return torch.where(torch.isfinite(rel), rel, torch.full_like(rel, float("inf")))


def care_closed_loop_eigvals(d: DAREData, K: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the pencil ``(A + BK, E)`` (..., n), complex."""
    Acl = d.A + d.B @ K
    if d.E is not None:
        Acl = torch.linalg.solve(d.E, Acl)
    return torch.linalg.eigvals(Acl)


def standard_form(d: DAREData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The equivalent CARE without E and S, :math:`A_s^\top Y + Y A_s - Y G Y + Q_s = 0`
    with :math:`A_s = E^{-1}(A - B R^{-1} S^\top)`, :math:`G = E^{-1} B R^{-1} B^\top
    E^{-\top}`, :math:`Q_s = Q - S R^{-1} S^\top` and :math:`Y = E^\top X E`.  Returns
    ``(A_s, G, Q_s)``."""
    RinvBt = torch.linalg.solve(d.R, d.B.transpose(-1, -2))      # (.., m, n)
    A, Q = d.A, d.Q
    if d.S is not None:
        RinvSt = torch.linalg.solve(d.R, d.S.transpose(-1, -2))
        A = A - d.B @ RinvSt
        Q = sym(Q - d.S @ RinvSt)
    G = sym(d.B @ RinvBt)
    if d.E is not None:
        A = torch.linalg.solve(d.E, A)
        G = torch.linalg.solve(d.E, torch.linalg.solve(d.E, G).transpose(-1, -2))
        G = sym(G)
    return A, G, Q


def from_standard(d: DAREData, Y: torch.Tensor) -> torch.Tensor:
    """``X = E^{-T} Y E^{-1}`` (Y itself without E)."""
    if d.E is None:
        return Y
    Et = d.E.transpose(-1, -2)
    return sym(torch.linalg.solve(Et, torch.linalg.solve(Et, Y).transpose(-1, -2)))
