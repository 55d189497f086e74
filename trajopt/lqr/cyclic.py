r"""Cyclic (N-periodic) infinite-horizon LQR (thesis Sec. 2.3.3, 4.3, Eq. 4.3.2-4.3.4).

Phase :math:`n` acts as :math:`x_{n+1} = A_n x_n + B_n u_n` with stage cost
:math:`\tfrac12 x_n^\top Q_n x_n + \tfrac12 u_n^\top R_n u_n + u_n^\top M_n x_n + q_n^\top
x_n + r_n^\top u_n`, and :math:`x_N \equiv x_0` of the next period.  The periodic Riccati
equation :math:`P_n = \mathrm{Ric}_n(P_{n+1 \bmod N})` is solved

* ``method="lift"`` (exact): the period map from :math:`x_0` under the stacked controls
  :math:`U = (u_0, \dots, u_{N-1})` is a time-invariant system
  :math:`x_0^+ = \Phi_N x_0 + \Gamma_N U` whose per-period cost is quadratic in
  :math:`(x_0, U)` with a cross term; its DARE gives :math:`P_0, p_0`, and one backward
  sweep of the shared Riccati step around the cycle gives the other phases.
* ``method="sweep"``: fixed-point iteration of the Riccati step around the cycle, from
  :math:`P = 0`, until :math:`P_0` and :math:`p_0` stop changing (relative ``tol``).

Phase dimensions may differ (``A_n`` is ``(n_{n+1}, n_n)``).  The thesis' Eq. 4.3.2-4.3.3
index the recursion one phase off (``K_{N-1}`` from ``A_N``); here ``P[n]`` is always the
value Hessian before stage ``n`` acts.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch

from .._arrays import infer_kind
from ..errors import (
    ConvergenceWarning,
    InvalidArgumentError,
    NotPositiveDefiniteError,
    NotStabilizableError,
    ShapeError,
)
from ..riccati.expansion import DenseStage
from ..riccati.step import riccati_step_joint
from .finite import LQR, Stage, dense_stages
from .infinite import solve_infinite_lqr

__all__ = ["CyclicLQRSolution", "solve_cyclic_lqr"]

CyclicMethod = Literal["lift", "sweep"]


@dataclass(frozen=True)
class CyclicLQRSolution:
    """Per-phase stationary solution of a cyclic LQR (lists of length N).

    Attributes
    ----------
    P : list of (..., n_n, n_n)
        Value Hessian at phase n, before stage n acts.
    K : list of (..., m_n, n_n)
        Gains, ``u_n = K[n] x_n + k[n]``.
    p : list of (..., n_n)
        Value gradients (zeros without linear terms).
    k : list of (..., m_n)
    method : str
    sweeps : int
        Number of sweeps around the cycle ("sweep") or 1 ("lift").
    """

    P: list
    K: list
    p: list
    k: list
    method: str
    sweeps: int


def _phase_stages(As, Bs, Qs, Rs, Ms, qs, rs):
    """Validate the phases through :class:`LQR` (its terminal cost is unused here)."""
    kind = infer_kind(As, Bs, Qs, Rs, Ms, qs, rs)
    listed = isinstance(As, (list, tuple))
    if not listed and len(np.shape(As)) < 3:
        raise ShapeError("As must be a sequence of N matrices or stacked (..., N, n, n); "
                         f"got shape {tuple(np.shape(As))}")
    if listed and not As:
        raise ShapeError("As must hold at least one phase")
    n_end = np.shape(As[-1] if listed else As[..., -1, :, :])[-2]
    QT = (np.zeros((n_end, n_end)) if kind.numpy else
          torch.zeros(n_end, n_end, dtype=kind.dtype, device=kind.device))
    problem = LQR(A=As, B=Bs, Q=Qs, R=Rs, M=Ms, q=qs, r=rs, QT=QT)
    stages = problem.stages
    if stages[-1].A.shape[-2] != stages[0].n:
        raise ShapeError(f"the cycle does not close: A[{len(stages) - 1}] maps to size "
                         f"{stages[-1].A.shape[-2]} but phase 0 has size {stages[0].n}")
    return problem, kind


def _mtm(X, Y, Z):
    return X.transpose(-1, -2) @ Y @ Z


def _lift(stages: list[Stage]):
    """Period map and per-period cost of the cycle as one time-invariant LQR."""
    s0 = stages[0]
    dt, dev = s0.A.dtype, s0.A.device
    n0 = s0.n
    ms = [s.m for s in stages]
    mL = sum(ms)
    offs = [sum(ms[:i]) for i in range(len(ms))]
    batch = torch.broadcast_shapes(*(t.shape[:-2] for s in stages
                                     for t in (s.A, s.B, s.Q, s.R)))
    Phi = torch.eye(n0, dtype=dt, device=dev).expand(*batch, n0, n0)
    Gam = torch.zeros(*batch, n0, mL, dtype=dt, device=dev)
    QL = torch.zeros(*batch, n0, n0, dtype=dt, device=dev)
    RL = torch.zeros(*batch, mL, mL, dtype=dt, device=dev)
    ML = torch.zeros(*batch, mL, n0, dtype=dt, device=dev)
    qL = torch.zeros(*batch, n0, dtype=dt, device=dev)
    rL = torch.zeros(*batch, mL, dtype=dt, device=dev)
    for i, s in enumerate(stages):
        sl = slice(offs[i], offs[i] + ms[i])
        QL = QL + _mtm(Phi, s.Q, Phi)
        RL = RL + _mtm(Gam, s.Q, Gam)
        ML = ML + _mtm(Gam, s.Q, Phi)
        RL[..., sl, sl] += s.R
        if s.M is not None:
            MG = s.M @ Gam  # (m_i, mL)
            RL[..., sl, :] += MG
            RL[..., :, sl] += MG.transpose(-1, -2)
            ML[..., sl, :] += s.M @ Phi
        if s.q is not None:
            qL = qL + (Phi.transpose(-1, -2) @ s.q.unsqueeze(-1)).squeeze(-1)
            rL = rL + (Gam.transpose(-1, -2) @ s.q.unsqueeze(-1)).squeeze(-1)
        if s.r is not None:
            rL[..., sl] += s.r
        Gam = s.A @ Gam
        Gam[..., sl] += s.B
        Phi = s.A @ Phi
    has_lin = any(s.q is not None or s.r is not None for s in stages)
    return Phi, Gam, QL, 0.5 * (RL + RL.transpose(-1, -2)), ML, \
        (qL if has_lin else None), (rL if has_lin else None)


class _OverflowError(ArithmeticError):
    """A sweep's P grew until ``R + B'PB`` overflowed (the sweeps diverge)."""


def _sweep(stages: list[DenseStage], P: torch.Tensor, p: torch.Tensor):
    """One backward sweep around the cycle from phase-0 values (P, p): returns lists.
    Raises :class:`_OverflowError` where a stage's ``B'PB`` is not finite (P overflowing),
    else the stage's error."""
    N = len(stages)
    Ps, ps, Ks, ks = [None] * N, [None] * N, [None] * N, [None] * N
    for i in range(N - 1, -1, -1):
        s = stages[i]
        try:
            step = riccati_step_joint(p, P, s.F, s.L, s.n, s.c, stage=i)
        except NotPositiveDefiniteError:
            Fu = s.F[..., s.n:]
            if not bool(torch.isfinite(Fu.mT @ P @ Fu).all()):
                raise _OverflowError from None
            raise
        P, p = step.Vxx, step.Vx
        Ps[i], ps[i], Ks[i], ks[i] = P, p, step.K, step.k
    return Ps, ps, Ks, ks


def _check_sweep_solution(stages: list[Stage], Ps, Ks, sweeps: int, diverged: bool,
                          converged: bool) -> None:
    """The sweeps' fixed point must be finite and stabilize the cycle: from P = 0 they
    diverge on a non-stabilizable cycle (``diverged``: P or a stage's ``B'PB`` overflowed),
    and on one with an unstable mode the cost does not see (not detectable) they
    converge to a non-stabilizing solution."""
    if diverged or not all(bool(torch.isfinite(P).all()) for P in Ps):
        raise NotStabilizableError(
            f"cyclic Riccati sweeps diverged (P unbounded after {sweeps} sweeps): the "
            "cycle is not stabilizable; method='lift' names the uncontrollable mode")
    mono = None
    for s, K in zip(stages, Ks):
        Acl = s.A + s.B @ K
        mono = Acl if mono is None else Acl @ mono
    rho = torch.linalg.eigvals(mono).abs().amax(-1)
    if bool((rho >= 1.0).any()) and not converged:  # still growing, or never settled
        raise NotStabilizableError(
            f"cyclic Riccati sweeps did not converge in {sweeps} sweeps and the last one "
            f"does not stabilize the cycle (closed-loop spectral radius over one cycle "
            f"{float(rho.max()):.3g} >= 1): the cycle is not stabilizable or has an "
            "unstable mode the cost does not weigh; method='lift' tells which")
    if bool((rho >= 1.0).any()):
        raise NotStabilizableError(
            f"cyclic Riccati sweeps converged to a non-stabilizing solution (closed-loop "
            f"spectral radius over one cycle {float(rho.max()):.3g} >= 1): the cycle has "
            "an unstable mode the cost does not weigh (not detectable); method='lift' "
            "returns the stabilizing solution when there is one")


def solve_cyclic_lqr(
    As: Any, Bs: Any, Qs: Any, Rs: Any, Ms: Any = None, qs: Any = None, rs: Any = None,
    *, method: CyclicMethod = "lift", tol: float | None = None, max_sweeps: int = 10_000,
) -> CyclicLQRSolution:
    """Solve an N-periodic infinite-horizon LQR.

    Parameters
    ----------
    As, Bs, Qs, Rs : sequences of N arrays, or stacked (..., N, ., .)
        Per-phase ``A_n (n_{n+1}, n_n)``, ``B_n (n_{n+1}, m_n)``, ``Q_n``, ``R_n``.
    Ms, qs, rs : optional, same layout
        Cross terms ``M_n (m_n, n_n)`` and linear terms ``q_n (n_n)``, ``r_n (m_n)``.
    method : {"lift", "sweep"}
        Exact lifting to one DARE, or fixed-point Riccati sweeps.
    tol : float, optional
        Relative change of ``P_0`` and ``p_0`` that stops "sweep" (default 100 eps).
    max_sweeps : int
        Cap of "sweep"; a :class:`~trajopt.errors.ConvergenceWarning` is issued when hit.

    Raises
    ------
    NotStabilizableError
        "lift": the lifted DARE has no stabilizing solution.  "sweep": the sweeps
        diverge (not stabilizable) or converge to a solution whose closed loop is not
        stable over one cycle (an unstable mode the cost does not see; "lift" solves
        such cycles).

    Returns
    -------
    CyclicLQRSolution
        Lists indexed by phase; numpy in -> numpy out.
    """
    if method not in get_args(CyclicMethod):
        raise InvalidArgumentError(f"method must be one of {get_args(CyclicMethod)}; got "
                                   f"{method!r}")
    if isinstance(max_sweeps, bool) or int(max_sweeps) != max_sweeps or max_sweeps < 1:
        raise InvalidArgumentError(f"max_sweeps must be an integer >= 1; got {max_sweeps!r}")
    if tol is not None and not 0 < tol < 1:
        raise InvalidArgumentError(f"tol must lie in (0, 1); got {tol!r}")
    problem, kind = _phase_stages(As, Bs, Qs, Rs, Ms, qs, rs)
    stages, dense = problem.stages, dense_stages(problem)
    if method == "lift":
        A, B, Q, R, M, q, r = _lift(stages)
        sol = solve_infinite_lqr(A, B, Q, R, M, q, r)
        Ps, ps, Ks, ks = _sweep(dense, sol.P, sol.p)
        sweeps = 1
    else:
        eps = torch.finfo(kind.dtype).eps
        tol = 100 * eps if tol is None else tol
        n0 = stages[0].n
        P = torch.zeros(n0, n0, dtype=kind.dtype, device=kind.device)
        p = torch.zeros(n0, dtype=kind.dtype, device=kind.device)
        diverged = converged = False
        Ps = ps = Ks = ks = None
        for sweeps in range(1, max_sweeps + 1):  # noqa: B007 (read after the loop)
            try:
                Ps, ps, Ks, ks = _sweep(dense, P, p)
            except _OverflowError:  # within a sweep (the lists are the last sweep's, unread)
                diverged = True
                break
            # largest entries, not Frobenius norms: their squares overflowed while P grew
            # past 1e154 and read as converged (a finite change over an infinite norm)
            dP = (Ps[0] - P).abs().amax((-2, -1)) / Ps[0].abs().amax((-2, -1)).clamp_min(eps)
            dp = torch.linalg.vector_norm(ps[0] - p, dim=-1) / torch.linalg.vector_norm(
                ps[0], dim=-1).clamp_min(1.0)
            P, p = Ps[0], ps[0]
            diverged = not bool(torch.isfinite(P).all())
            if diverged:
                break
            converged = bool(((dP <= tol) & (dp <= tol)).all())
            if converged:
                break
        _check_sweep_solution(stages, Ps, Ks, sweeps, diverged, converged)
        if not converged:
            warnings.warn(f"cyclic Riccati sweeps did not converge in {max_sweeps} sweeps",
                          ConvergenceWarning, stacklevel=2)
    return CyclicLQRSolution(P=kind.out(Ps), K=kind.out(Ks), p=kind.out(ps),
                             k=kind.out(ks), method=method, sweeps=sweeps)
