"""Options and results of the DDP solvers: the regularization schedule, the line search,
the per-iteration log and :class:`DDPResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from ..errors import InvalidArgumentError

__all__ = ["Mode", "Regularization", "LineSearch", "AugmentedLagrangian", "IterationLog",
           "DDPResult"]

Mode = Literal["ilqr", "ddp"]


@dataclass(frozen=True)
class Regularization:
    """Adaptive Levenberg-Marquardt schedule on Q_uu (Tassa, Erez & Todorov 2012, Sec. F).

    ``mu`` starts at ``initial``; on failure ``delta = max(factor, delta * factor)``,
    ``mu = max(minimum, mu * delta)``; on success ``delta = min(1/factor, delta/factor)``,
    ``mu = mu * delta`` (set to 0 below ``minimum``).  An element whose ``mu`` would exceed
    ``maximum`` stops with reason ``"regularization_limit"``.
    """

    initial: float = 0.0
    minimum: float = 1e-6
    maximum: float = 1e10
    factor: float = 1.6

    def __post_init__(self):
        if not (self.initial >= 0 and self.minimum > 0 and self.maximum > self.minimum
                and self.factor > 1):
            raise InvalidArgumentError(f"invalid regularization schedule {self}")


@dataclass(frozen=True)
class LineSearch:
    """Backtracking over ``alphas`` (Tassa et al. 2012: 10^linspace(0, -3, 11)); a step is
    accepted when actual / expected reduction > ``c1``; the largest accepted alpha wins.

    ``strategy`` decides how the alphas are tried (the accepted step is the same):
    ``"sequential"`` rolls out one alpha after the other for the elements still pending;
    ``"parallel"`` rolls out all alphas at once as one batch (as mpc.pytorch does);
    ``"hybrid"`` (default) tries alpha = 1 first and the remaining alphas in parallel for
    the elements that rejected it: at most two forward passes per iteration, and one when
    the full step is accepted (> 99% of iterations on the classical problems; on a batch
    of 256 mpc.pytorch pendulums late iterations backtrack for ~40% of the elements, where
    sequential search cost 2.5x the hybrid).
    """

    alphas: tuple[float, ...] = tuple(float(a) for a in 10.0 ** np.linspace(0, -3, 11))
    c1: float = 0.1
    strategy: Literal["hybrid", "sequential", "parallel"] = "hybrid"

    def __post_init__(self):
        if not self.alphas or any(not 0 < a <= 1 for a in self.alphas):
            raise InvalidArgumentError(
                f"line-search alphas must lie in (0, 1]; got {self.alphas}")
        if list(self.alphas) != sorted(self.alphas, reverse=True):
            raise InvalidArgumentError("line-search alphas must be in decreasing order")
        if not 0 < self.c1 < 1:
            raise InvalidArgumentError(f"line-search c1 must lie in (0, 1); got {self.c1!r}")
        if self.strategy not in ("hybrid", "sequential", "parallel"):
            raise InvalidArgumentError(f"line-search strategy must be 'hybrid', "
                                       f"'sequential' or 'parallel'; got {self.strategy!r}")

    def groups(self) -> list[tuple[float, ...]]:
        """The alphas in the groups that are rolled out together, in order."""
        if self.strategy == "parallel":
            return [self.alphas]
        if self.strategy == "sequential":
            return [(a,) for a in self.alphas]
        return [self.alphas[:1], self.alphas[1:]]


@dataclass(frozen=True)
class AugmentedLagrangian:
    r"""The outer loop that meets constraints (``solve_ddp(..., constraints=...)``).

    Each outer iteration solves the DDP problem with the augmented cost (the
    Powell-Hestenes-Rockafellar form, per component, multiplier :math:`\lambda`,
    penalty :math:`\rho`)

    .. math::

        \text{equality: } \lambda c + \tfrac{\rho}{2} c^2, \qquad
        \text{inequality: } \tfrac{1}{2\rho}\left(\max(0, \lambda + \rho c)^2
        - \lambda^2\right),

    warm-started from the previous controls, then updates :math:`\lambda \leftarrow
    \lambda + \rho c` (inequalities: :math:`\max(0, \cdot)`) and, for an element
    whose violation did not fall below ``decrease`` times the previous one,
    :math:`\rho \leftarrow` ``factor`` :math:`\rho` (Bertsekas 1982, Sec. 2.2;
    ALTRO's multiplier and penalty updates, Howell et al. 2019).  An element is done
    when its largest violation (:math:`|c|` of equalities, :math:`\max(0, c)` of
    inequalities) is at most ``tol``; it stops with reason ``"constraint_violation"``
    when its penalty would exceed ``max_penalty`` (the constraints could not be met),
    with ``"max_iter"`` after ``max_outer`` iterations (the budget, e.g. of an MPC step,
    ran out).

    The inner solves are inexact while the multipliers are still far off (Bertsekas'
    inexact minimization): their tolerance is ``min(inner_tol, v^2)`` (``v`` the smallest
    violation of the elements being solved, at least the solver's ``tol``) until ``v <=
    100 tol``, then the solver's ``tol``; an element is done only after a solve at the
    solver's ``tol``.  Measured on the three problems of ``docs/constraints.md``: 2.2-2.5x
    fewer inner iterations than solving every subproblem to ``tol``, the same optimum.

    The penalty is per batch element, the multipliers per element, stage and component.
    The initial ``penalty`` is 100, not ALTRO's 1: from 1, the first, nearly
    unconstrained solve of the cart-pole swing-up with a track limit picks a swing the
    track forbids, and the loop ends locally infeasible (violation 0.054); from 100 it
    meets the limit, and the pendulum's terminal equality and the unicycle's obstacles
    take 30 % fewer iterations (``docs/constraints.md``).  It compares the squared
    violation with the cost, so scale it with a cost far from order 1-1000.
    """

    tol: float = 1e-6
    penalty: float = 100.0
    factor: float = 10.0
    max_penalty: float = 1e8
    max_outer: int = 30
    decrease: float = 0.25
    inner_tol: float = 1e-4

    def __post_init__(self):
        if not (self.tol > 0 and self.penalty > 0 and self.factor > 1 and self.inner_tol > 0
                and self.max_penalty >= self.penalty and 0 < self.decrease <= 1):
            raise InvalidArgumentError(f"invalid augmented-Lagrangian options {self}")
        if isinstance(self.max_outer, bool) or not isinstance(self.max_outer, int) or \
                self.max_outer < 1:
            raise InvalidArgumentError(f"max_outer must be a positive integer; got "
                                       f"{self.max_outer!r}")


@dataclass(frozen=True)
class IterationLog:
    """One iteration, per batch element (flattened batch, shape (B,)): the cost after the
    iteration, the regularization used, the accepted step (0 = rejected / not active), the
    expected and actual reductions of the accepted step."""

    iteration: int
    cost: torch.Tensor
    regularization: torch.Tensor
    step: torch.Tensor
    expected: torch.Tensor
    actual: torch.Tensor


@dataclass(frozen=True)
class DDPResult:
    """Result of :func:`solve_ddp` (batch dimensions lead).

    Attributes
    ----------
    xs : (..., T+1, n)
    us : (..., T, m)
    K : (..., T, m, n)   feedback gains at the returned trajectory
    k : (..., T, m)      feedforward terms at the returned trajectory (zero at an optimum)
    Vx : (..., T+1, n)   value gradients; Vxx : (..., T+1, n, n) value Hessians
    cost : (...)         total cost
    converged : (...) bool
    iterations : (...) int   accepted steps per element
    reason : numpy array of str, shape (...): "converged", "max_iter",
        "regularization_limit", "line_search_failed", "constraint_violation" (the
        constraints could not be met: see :class:`AugmentedLagrangian`) or "diverged".
        An element stopped at the regularization limit returns its last accepted
        trajectory with the gains and value derivatives of its last successful backward
        pass (zeros if none succeeded): finite, never the failed pass's NaN.  A
        "diverged" element's rollout of ``us0`` was already non-finite (a
        ConvergenceWarning names it): it is not optimized, its ``xs`` are that rollout
        and its ``cost`` is inf.
    history : list of IterationLog
    max_violation : (...), or None without constraints
        The largest constraint violation of the returned trajectory (``|c|`` of the
        equalities, ``max(0, c)`` of the inequalities).
    multipliers : tuple, or None without constraints
        One array per constraint, in the order given: (..., T, p) for a running
        constraint, (..., p) for a terminal one; the Lagrange multiplier estimates
        (>= 0 for inequalities).  With constraints, ``cost`` is the cost without the
        augmented-Lagrangian terms, while ``K``, ``k``, ``Vx``, ``Vxx`` are those of the
        last augmented problem (the feedback of the constrained optimum).
    max_gap : (...), or None unless ``shooting="multiple"``
        The largest defect ``max_t,i |f_t(x_t, u_t)_i - x_{t+1,i}|`` of the returned
        trajectory: 0 once a full step closed the given states' defects; an element that
        stopped before (``max_iter``, ``regularization_limit``, ``line_search_failed``)
        returns states its controls do not reach (``docs/ddp.md``, "Multiple shooting").
    """

    xs: Any
    us: Any
    #: the gains and value derivatives stay out of the repr (a T = 30 result printed
    #: 6,300 characters); read them as fields
    K: Any = field(repr=False)
    k: Any = field(repr=False)
    Vx: Any = field(repr=False)
    Vxx: Any = field(repr=False)
    cost: Any
    converged: Any
    iterations: Any
    reason: np.ndarray
    history: list = field(repr=False)
    max_violation: Any = None
    multipliers: tuple | None = field(default=None, repr=False)
    max_gap: Any = None
