"""The entry point :func:`solve_ddp`: plain DDP / iLQR, or GT-DDP when residual spans or
players are given."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .gtddp import GTDDPSolver
from .models import Cost, Dynamics
from .options import DDPResult, IterationLog, LineSearch, Mode, Regularization
from .solver import DDPSolver

__all__ = ["solve_ddp"]


def solve_ddp(dynamics: Dynamics | Callable, cost: Cost, x0: Any, us0: Any, *,
              mode: Mode = "ilqr", max_iter: int = 100, tol: float = 1e-8,
              regularization: Regularization | None = None,
              line_search: LineSearch | None = None, control_limits=None,
              callback: Callable[[IterationLog], Any] | None = None,
              spans=None, players=None) -> DDPResult:
    r"""Optimize a control sequence by iLQR or DDP.

    .. math::

        \min_{u_{0:T-1}} \sum_{t<T} l_t(x_t, u_t) + l_T(x_T), \quad
        x_{t+1} = f_t(x_t, u_t), \quad x_0 \text{ given}

    Parameters
    ----------
    dynamics : Dynamics or callable ``f(x, u, t)``
    cost : Cost
    x0 : (..., n)
    us0 : (..., T, m) or sequence of T arrays (..., m_t)
        Initial controls (clamped to the limits).
    mode : {"ilqr", "ddp"}
    max_iter : int
        Maximum number of iterations (backward + forward pass).
    tol : float
        An element converges when the feedforward step is negligible relative to the
        controls, ``max_t,i |k_t,i| <= sqrt(tol) max_t,i |u_t,i|`` (that last step is
        still taken, so the result is ~tol from the optimum), or when an accepted step
        lowered the cost by less than ``tol * |J|``: Tassa et al.'s two tests (2012),
        made relative so that they do not depend on the scale of the problem.
    regularization : Regularization
    line_search : LineSearch
    control_limits : (lo, hi), each of shape (m,), optional
    callback : callable(IterationLog), optional
    spans : sequence of trajopt.Span, optional
        Residual connections (GT-DDP); see :class:`~trajopt.ddp.gtddp.GTDDPSolver`.  The
        gains ``K[t]`` then act on ``[x_t, x_start of each span open at t]`` (span order).
    players : sequence of int or callable ``t -> sequence``, optional
        Split of each stage's control among cooperative players (GT-DDP Sec. 3.2).

    Returns
    -------
    DDPResult
    """
    if spans or players is not None:
        return GTDDPSolver(dynamics, cost, spans=spans or (), players=players, mode=mode,
                           max_iter=max_iter, tol=tol, regularization=regularization,
                           line_search=line_search, control_limits=control_limits,
                           callback=callback).solve(x0, us0)
    return DDPSolver(dynamics, cost, mode=mode, max_iter=max_iter, tol=tol,
                     regularization=regularization, line_search=line_search,
                     control_limits=control_limits, callback=callback).solve(x0, us0)
