r"""Riccati steps at the state size for wide controls: surrogate controls and push-through.

When a stage has :math:`R = rI` and more controls than states (a network layer's weights,
a DEQ cell's parameters), only :math:`G = B R^{-1} B^\top` enters the Riccati recursion,
its closed loop and its costates.  :func:`surrogate_control` gives a square control
matrix :math:`L` with :math:`L L^\top = G` (solve the LQR with it and :math:`R = I`:
every solve is of the state size), and :func:`push_through_control` recovers the
original control from the push-through identity

.. math::

    (rI + B^\top P B)^{-1} B^\top = \tfrac1r B^\top (I + P G)^{-1}, \qquad
    u = -\tfrac1r B^\top (I + P G)^{-1} (P A x + p) .

Used by :func:`trajopt.steepest.steepest_descent_lqr` and the DEQ gradients of
:mod:`nnbridge.deq`.
"""

from __future__ import annotations

import torch

__all__ = ["surrogate_control", "push_through_control"]


def surrogate_control(B: torch.Tensor, r: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(L, G)`` with :math:`G = B B^\top / r` (..., n1, n1) and :math:`L L^\top = G`.

    An LQR stage with control matrix ``B`` (..., n1, m) and :math:`R = rI` has the same
    Riccati recursion, closed loop and costates as the stage with control matrix ``L``
    and :math:`R = I`, since only :math:`B R^{-1} B^\top` enters them; the original
    control follows from :func:`push_through_control`.  Every solve is then of size n1
    instead of m."""
    G = (B @ B.transpose(-1, -2)) / r
    G = 0.5 * (G + G.transpose(-1, -2))
    w, V = torch.linalg.eigh(G)
    return V * w.clamp_min(0.0).sqrt().unsqueeze(-2), G


def push_through_control(B: torch.Tensor, r: float, P: torch.Tensor, G: torch.Tensor,
                         rhs: torch.Tensor) -> torch.Tensor:
    r"""The original control :math:`u = -\tfrac1r B^\top (I + P G)^{-1}\,\text{rhs}`.

    Parameters
    ----------
    B : (..., n1, m)
        The wide control matrix.
    r : float
        :math:`R = rI`, r > 0.
    P : (..., n1, n1)
        Next value Hessian.
    G : (..., n1, n1)
        :math:`B B^\top / r` (from :func:`surrogate_control`).
    rhs : (..., n1)
        :math:`P A x + p` (the next costate of the nominal state, plus the affine part).

    Returns
    -------
    (..., m)
    """
    eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
    w = torch.linalg.solve(eye + P @ G, rhs.unsqueeze(-1))
    return -(B.transpose(-1, -2) @ w)[..., 0] / r
