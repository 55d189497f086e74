r"""One steepest-descent step on a chain as an LQR (thesis papers/002, Ch. 3, Thm 3.1.1,
3.2.1; Eq. 3.2.5-3.2.10).

For a chain :math:`x_{i+1} = f_i(x_i, u_i)`, :math:`i < N`, with objective
:math:`J(x_N)` and a divergence whose second-order model is
:math:`\tfrac12 \tilde x_N^\top Q_N \tilde x_N + \sum_i (\tfrac12 \tilde x_i^\top Q_i
\tilde x_i + \tfrac12 \tilde u_i^\top R_i \tilde u_i + \tilde u_i^\top M_i \tilde x_i)`,
the steepest-descent step :math:`\tilde u` minimizes

.. math::

    a_N^\top \tilde x_N + \tfrac12 \tilde x_N^\top Q_N \tilde x_N
    + \sum_i \bigl(\tfrac12 \tilde x_i^\top Q_i \tilde x_i
    + \tfrac12 \tilde u_i^\top (R_i + \delta I) \tilde u_i
    + \tilde u_i^\top M_i \tilde x_i\bigr), \quad
    \tilde x_{i+1} = A_i \tilde x_i + B_i \tilde u_i, \ \tilde x_0 = 0,

with :math:`A_i = \partial f_i/\partial x_i`, :math:`B_i = \partial f_i/\partial u_i`,
:math:`a_N = \nabla_{x_N} J` and the damping :math:`\delta`.  With :math:`Q = M = 0`,
:math:`R = I` it is gradient descent; with :math:`Q_N` the Fisher of the output
distribution, natural gradient; with :math:`Q_N = \nabla^2 J` and the Hamiltonian
second derivatives :math:`Q_i, R_i, M_i`, Newton.  It is solved by
:func:`trajopt.solve_lqr` (the Riccati recursion of the thesis, Eq. 3.2.6-3.2.10).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import InvalidArgumentError, ShapeError
from .lqr import LQR, solve_lqr

__all__ = ["steepest_descent_lqr"]


def steepest_descent_lqr(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor],
                         aN: torch.Tensor, QN: torch.Tensor | None = None, *,
                         Q: Sequence[torch.Tensor] | None = None,
                         R: Sequence[torch.Tensor] | None = None,
                         M: Sequence[torch.Tensor] | None = None,
                         damping: float = 0.0) -> list[torch.Tensor]:
    r"""The steepest-descent step :math:`\tilde u_0, \dots, \tilde u_{N-1}`.

    Parameters
    ----------
    A : sequence of (n_{i+1}, n_i)
    B : sequence of (n_{i+1}, m_i)
    aN : (n_N,)
        Gradient of the objective at the output.
    QN : (n_N, n_N), optional
        Terminal curvature of the divergence (None: 0).
    Q, R, M : sequences of (n_i, n_i), (m_i, m_i), (m_i, n_i), optional
        Stage curvatures (None: Q = M = 0, R = I, i.e. the Euclidean norm).
    damping : float
        :math:`\delta \ge 0` added to every :math:`R_i`.

    Returns
    -------
    list of (m_i,)
        The step per stage.

    Raises
    ------
    NotPositiveDefiniteError
        When a stage's :math:`R_i + \delta I + B_i^\top P_{i+1} B_i` is not positive
        definite (e.g. natural gradient without damping); names the stage.
    """
    N = len(A)
    if len(B) != N or N < 1:
        raise ShapeError(f"A and B need the same number (>= 1) of stages; got {len(A)}, "
                         f"{len(B)}")
    if not damping >= 0:
        raise InvalidArgumentError(f"damping must be >= 0; got {damping}")
    like = aN
    eye = [torch.eye(b.shape[-1], dtype=like.dtype, device=like.device) for b in B]
    Rs = list(R) if R is not None else eye
    Rs = [r + damping * e for r, e in zip(Rs, eye)]
    Qs = list(Q) if Q is not None else [like.new_zeros(a.shape[-1], a.shape[-1]) for a in A]
    nN = A[-1].shape[-2]
    if aN.shape != (nN,):
        raise ShapeError(f"aN must have shape ({nN},); got {tuple(aN.shape)}")
    QT = like.new_zeros(nN, nN) if QN is None else QN
    prob = LQR(A=list(A), B=list(B), Q=Qs, R=Rs, M=None if M is None else list(M),
               QT=QT, qT=aN)
    sol = solve_lqr(prob, x0=like.new_zeros(A[0].shape[-1]))
    return list(sol.us)
