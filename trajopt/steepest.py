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
from .riccati.pushthrough import push_through_control, surrogate_control

__all__ = ["steepest_descent_lqr", "NeumannSolver", "surrogate_control"]


class NeumannSolver:
    r"""Solve :math:`(\delta_i I + Q_{uu})^{-1} \text{rhs}` without a factorization
    (thesis Ch. 5, Eq. 5.1.4-5.1.5): a truncated Neumann series

    .. math::  (\delta I + \bar K)^{-1} \approx \frac1\delta \sum_{j=0}^{J}
               \Bigl(-\frac{\bar K}{\delta}\Bigr)^j

    with the layer-adaptive damping :math:`\delta_i = \max(\delta_{min},
    \text{margin}\cdot\rho(\bar K_i))`, :math:`\rho` the spectral radius estimated by
    power iteration (:math:`\bar K` is symmetric, Thm 5.1.1), so the series converges.
    (The thesis' Eq. 5.1.4 writes :math:`\frac1\delta + (I + \bar K/\delta)^{-1}` for
    :math:`(\delta(I + \bar K/\delta))^{-1}`; it is a product, as used here.)

    Parameters
    ----------
    terms : int
        J, the number of terms after the identity.
    margin : float
        > 1; the ratio :math:`\delta / \rho` (1.1 keeps the estimate's error in check).
    damping : float
        :math:`\delta_{min} \ge 0`.
    power_iters : int

    Attributes
    ----------
    deltas, ratios : dict stage -> float
        The damping used and :math:`\rho(\bar K)/\delta` of each stage (max over the
        batch), filled by :meth:`solve`.
    """

    def __init__(self, terms: int, *, margin: float = 1.1, damping: float = 0.0,
                 power_iters: int = 30):
        if int(terms) < 0 or not margin > 1 or not damping >= 0 or int(power_iters) < 1:
            raise InvalidArgumentError(f"NeumannSolver needs terms >= 0, margin > 1, "
                                       f"damping >= 0, power_iters >= 1; got {terms}, "
                                       f"{margin}, {damping}, {power_iters}")
        self.terms, self.margin, self.damping = int(terms), float(margin), float(damping)
        self.power_iters = int(power_iters)
        self.deltas: dict = {}
        self.ratios: dict = {}
        self._delta_t: dict = {}

    def last_delta_of(self, stage: int) -> torch.Tensor:
        """The damping (tensor) the last solve of ``stage`` used."""
        return self._delta_t[stage]

    def value_damping(self, stage: int | None) -> torch.Tensor:
        """The kernel's :class:`~trajopt.riccati.solvers.QuuSolver` hook: the adaptive
        damping of the last solve of ``stage`` is part of the cost (a trust-region term,
        thesis Sec. 5.1.2), so the value derivatives include it."""
        return self._delta_t[stage]

    def spectral_radius(self, K: torch.Tensor) -> torch.Tensor:
        """Power-iteration estimate of :math:`\rho(K)` for symmetric K (..., m, m)."""
        g = torch.Generator(device="cpu").manual_seed(0)
        v = torch.randn(K.shape[-1], generator=g, dtype=K.dtype).to(K.device)
        v = v.expand(*K.shape[:-1]).unsqueeze(-1)
        for _ in range(self.power_iters):
            w = K @ v
            v = w / w.norm(dim=-2, keepdim=True).clamp_min(1e-300)
        return (v.transpose(-1, -2) @ K @ v).abs()[..., 0, 0]

    def solve(self, Quu: torch.Tensor, rhs: torch.Tensor, stage: int | None) -> torch.Tensor:
        rho = self.spectral_radius(Quu)
        delta = torch.clamp(self.margin * rho, min=max(self.damping, 1e-300))
        d = delta[..., None, None]
        y = rhs
        acc = rhs
        for _ in range(self.terms):
            y = -(Quu @ y) / d
            acc = acc + y
        self.last_delta = delta
        self._delta_t[stage] = delta
        self.deltas[stage] = float(delta.max())
        self.ratios[stage] = float((rho / delta).max())
        return acc / d


def steepest_descent_lqr(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor],
                         aN: torch.Tensor, QN: torch.Tensor | None = None, *,
                         Q: Sequence[torch.Tensor] | None = None,
                         R: Sequence[torch.Tensor] | None = None,
                         M: Sequence[torch.Tensor] | None = None,
                         damping: float = 0.0,
                         solver: NeumannSolver | None = None,
                         surrogate: bool | None = None) -> list[torch.Tensor]:
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
    solver : NeumannSolver, optional
        Replace the exact solve of :math:`R_i + \delta I + B_i^\top P_{i+1} B_i` by the
        truncated Neumann series with adaptive damping (which then replaces ``damping``,
        0 required).
    surrogate : bool, optional
        Solve through square surrogate controls (:func:`surrogate_control`), so every
        solve has the state size n_{i+1} instead of m_i.  Needs every
        :math:`R_i + \delta I = r_i I` with :math:`r_i > 0` and M = 0 (the Euclidean
        and KL divergences).  Default: when that holds and some ``B_i`` is wider than
        tall.

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
    if not 0 <= damping < float("inf"):
        raise InvalidArgumentError(f"damping must be finite and >= 0; got {damping}")
    like = aN
    eye = [torch.eye(b.shape[-1], dtype=like.dtype, device=like.device) for b in B]
    Rs = list(R) if R is not None else eye
    Rs = [r + damping * e for r, e in zip(Rs, eye)]
    Qs = list(Q) if Q is not None else [like.new_zeros(a.shape[-1], a.shape[-1]) for a in A]
    nN = A[-1].shape[-2]
    if aN.shape != (nN,):
        raise ShapeError(f"aN must have shape ({nN},); got {tuple(aN.shape)}")
    if QN is not None and tuple(QN.shape) != (nN, nN):
        raise ShapeError(f"QN must have shape ({nN}, {nN}); got {tuple(QN.shape)}")
    QT = like.new_zeros(nN, nN) if QN is None else QN
    prob = LQR(A=list(A), B=list(B), Q=Qs, R=Rs, M=None if M is None else list(M),
               QT=QT, qT=aN)
    if solver is not None:
        if damping:
            raise InvalidArgumentError("with a NeumannSolver give the damping to the solver")
        sol = solve_lqr(prob, x0=like.new_zeros(A[0].shape[-1]), solver=solver)
        return list(sol.us)
    scales = _identity_scales(Rs) if M is None else None
    if surrogate is None:
        surrogate = scales is not None and any(
            b.shape[-1] > b.shape[-2] for b in B)   # wide B: solves at the state size pay
    if surrogate:
        if scales is None:
            raise InvalidArgumentError("surrogate=True needs R_i = r_i I (r_i > 0) and M = 0")
        return _surrogate_lqr(list(A), list(B), Qs, scales, QT, aN)
    sol = solve_lqr(prob, x0=like.new_zeros(A[0].shape[-1]))
    return list(sol.us)


def _identity_scales(Rs: Sequence[torch.Tensor]) -> list[float] | None:
    """``[r_i]`` when every ``R_i = r_i I`` with ``r_i > 0``, else None."""
    out = []
    for R in Rs:
        r = float(R[0, 0])
        if not r > 0 or not torch.equal(R, r * torch.eye(R.shape[0], dtype=R.dtype,
                                                         device=R.device)):
            return None
        out.append(r)
    return out


def _surrogate_lqr(A, B, Qs, scales, QT, aN) -> list[torch.Tensor]:
    """The steepest-descent LQR with every ``R_i = r_i I`` solved through the
    surrogate controls of :func:`surrogate_control` (solves of the state size)."""
    LG = [surrogate_control(b, r) for b, r in zip(B, scales)]
    eyes = [torch.eye(L.shape[-1], dtype=L.dtype, device=L.device) for L, _ in LG]
    prob = LQR(A=A, B=[L for L, _ in LG], Q=Qs, R=eyes, QT=QT, qT=aN)
    sol = solve_lqr(prob, x0=aN.new_zeros(A[0].shape[-1]))
    return [push_through_control(B[i], r, sol.P[i + 1], G,
                                 sol.P[i + 1] @ (A[i] @ sol.xs[i]) + sol.p[i + 1])
            for i, ((_, G), r) in enumerate(zip(LG, scales))]
