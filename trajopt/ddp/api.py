"""The entry point :func:`solve_ddp`: plain DDP / iLQR, or GT-DDP when residual spans or
players are given."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from ..errors import InvalidArgumentError
from .augmented import AugmentedCost, check_constraints
from .constrained import ConstrainedSolver
from .constraints import Constraint
from .gtddp import GTDDPSolver
from .models import Cost, Dynamics
from .options import (
    AugmentedLagrangian,
    DDPResult,
    IterationLog,
    LineSearch,
    Mode,
    Regularization,
)
from .sensitivity import differentiable_outputs
from .shooting import Shooting
from .solver import DDPSolver

__all__ = ["solve_ddp"]


def solve_ddp(dynamics: Dynamics | Callable, cost: Cost, x0: Any, us0: Any, *,
              mode: Mode = "ilqr", max_iter: int = 100, tol: float = 1e-8,
              regularization: Regularization | None = None,
              line_search: LineSearch | None = None, control_limits=None,
              callback: Callable[[IterationLog], Any] | None = None,
              spans=None, players=None, params: Sequence[Any] = (),
              constraints: Sequence[Constraint] | Constraint | None = None,
              augmented_lagrangian: AugmentedLagrangian | None = None,
              xs0: Any = None, shooting: Shooting = "single") -> DDPResult:
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
    control_limits : (lo, hi), optional
        Box limits ``lo <= u_t <= hi``, each of ``lo``, ``hi`` (with ``batch`` the batch
        shape of ``x0`` and ``us0`` broadcast, B its size) a number (every control), (m,)
        (the same at every stage), (T, m) (per stage), ``(*batch, m)``, e.g. (B, m) (per
        element) or ``(T, *batch, m)``, e.g. (T, B, m) (per stage and element, mpc.pytorch's
        ``u_lower`` / ``u_upper``; leading dimensions of size 1 broadcast).  A 2-d
        (T, m) / (B, m) with T == B > 1 is refused as ambiguous (``ShapeError``): write
        (T, 1, m) or (1, B, m).  ``lo <= hi`` per entry, no NaN, +-inf allowed; stage
        sizes that differ take no limits (``trajopt.ddp.limits``).
    callback : callable(IterationLog), optional
    spans : sequence of trajopt.Span, optional
        Residual connections (GT-DDP); see :class:`~trajopt.ddp.gtddp.GTDDPSolver`.  The
        gains ``K[t]`` then act on ``[x_t, x_start of each span open at t]`` (span order).
    players : sequence of int or callable ``t -> sequence``, optional
        Split of each stage's control among cooperative players (GT-DDP Sec. 3.2).
    params : sequence of torch tensors, optional
        Tensors the dynamics and cost use (a mass, a damping, a reference, a network's
        parameters).  When ``params`` or a torch ``x0`` require a gradient, the result's
        ``xs``, ``us`` and ``cost`` are differentiable with respect to them: implicit
        differentiation of the optimality conditions at the returned optimum (one
        adjoint LQR solve with the exact Hessian of the Lagrangian; controls at a box
        limit held fixed; with ``constraints``, the active ones held as equalities),
        not an unrolled solve (``trajopt.ddp.sensitivity``, ``docs/ddp.md``).  The
        other fields stay detached.
    constraints : sequence of trajopt.Constraint, optional
        State, path and terminal constraints (``fn <= 0`` or ``fn == 0``), met by an
        augmented-Lagrangian loop around this solver (with the box limits, spans and
        players above, batched); the result then carries ``max_violation`` and
        ``multipliers``, and the reason ``"constraint_violation"`` for an element whose
        constraints could not be met (``docs/constraints.md``).
    augmented_lagrangian : AugmentedLagrangian, optional
        Tolerance on the violation (default 1e-6), penalty schedule and outer iteration
        limit of that loop; ``max_iter`` and ``tol`` apply to each inner solve.
    xs0 : (..., T+1, n) or sequence of T+1 arrays (..., n_t), optional
        The states of ``us0`` from ``x0`` where they are known (a warm start: the
        previous solution shifted by one stage), to save the initial rollout.  Checked
        against the dynamics in one vectorized call, never trusted: the rollout runs from
        the first stage that does not match to rounding (``DDPSolver.solve``,
        ``docs/ddp.md``), so the result is that of the solve without ``xs0`` up to
        rounding.  Not supported with ``spans`` or ``players``.
    shooting : {"single", "multiple"}
        ``"multiple"``: the states ``xs0`` are a guess, taken as they are (crocoddyl's
        ``init_xs``, e.g. ``[x0] * (T + 1)``), their defects closed over the iterations
        (feasibility-driven DDP, :mod:`trajopt.ddp.shooting`; ``mode="ilqr"``); the
        result's ``max_gap`` says how far the returned states are from a rollout.
        Without ``xs0`` the start is the rollout of ``us0``, as for ``"single"``.

    Returns
    -------
    DDPResult
    """
    cons = check_constraints(constraints) if constraints is not None else []
    if xs0 is not None and (spans or players is not None):
        raise InvalidArgumentError("xs0 (given states) is not supported with spans or "
                                   "players; leave xs0 out")
    if augmented_lagrangian is not None:
        if not isinstance(augmented_lagrangian, AugmentedLagrangian):
            raise InvalidArgumentError(f"augmented_lagrangian must be a trajopt."
                                       f"AugmentedLagrangian; got "
                                       f"{type(augmented_lagrangian).__name__}")
        if not cons:
            raise InvalidArgumentError("augmented_lagrangian is given but there are no "
                                       "constraints for it to meet")
    params = tuple(params)
    for i, prm in enumerate(params):
        if not isinstance(prm, torch.Tensor):
            raise InvalidArgumentError(f"params[{i}] must be a torch tensor; got "
                                       f"{type(prm).__name__}")
    grad = torch.is_grad_enabled() and (any(p.requires_grad for p in params) or (
        isinstance(x0, torch.Tensor) and x0.requires_grad))
    if grad:
        if spans or players is not None:
            raise InvalidArgumentError("gradients through solve_ddp (params, or an x0 that "
                                       "requires grad) are not supported with spans or "
                                       "players yet")
        res, solver = _solve(dynamics, cost, cons, augmented_lagrangian, callback,
                             x0.detach() if isinstance(x0, torch.Tensor) else x0, us0,
                             xs0=xs0, mode=mode, max_iter=max_iter, tol=tol, shooting=shooting,
                             regularization=regularization, line_search=line_search,
                             control_limits=control_limits)
        x0t = x0 if isinstance(x0, torch.Tensor) else torch.as_tensor(
            x0, dtype=res.xs.dtype, device=res.xs.device)
        xs, us, J = differentiable_outputs(res, solver.dynamics, cost, x0t, params,
                                           control_limits, cons)
        return replace(res, xs=xs, us=us, cost=J)
    return _solve(dynamics, cost, cons, augmented_lagrangian, callback, x0, us0,
                  spans=spans, players=players, xs0=xs0, mode=mode, max_iter=max_iter,
                  shooting=shooting,
                  tol=tol, regularization=regularization, line_search=line_search,
                  control_limits=control_limits)[0]


def _solve(dynamics, cost, cons, augmented_lagrangian, callback, x0, us0, *, spans=None,
           players=None, xs0=None, **options):
    """The solver the arguments call for (plain, GT-DDP; inside the augmented-Lagrangian
    loop with constraints), its result and the solver."""
    if cons:
        if not isinstance(cost, Cost):
            raise TypeError(f"cost must be a trajopt.Cost; got {type(cost).__name__}")
        inner_cost, inner_callback = AugmentedCost(cost, cons), None
    else:
        inner_cost, inner_callback = cost, callback
    if spans or players is not None:
        solver = GTDDPSolver(dynamics, inner_cost, spans=spans or (), players=players,
                             callback=inner_callback, **options)
    else:
        solver = DDPSolver(dynamics, inner_cost, callback=inner_callback, **options)
    if cons:
        outer = ConstrainedSolver(solver, augmented_lagrangian, callback)
        return outer.solve(x0, us0, xs0=xs0), outer
    return solver.solve(x0, us0, xs0=xs0), solver
