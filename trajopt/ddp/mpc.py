"""Receding-horizon control around one warm-started DDP solver: :class:`MPC`."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._checks import as_real, is_number, shape_str
from ..errors import InvalidArgumentError, ShapeError
from .augmented import AugmentedCost, check_constraints
from .constrained import ConstrainedSolver
from .constraints import Constraint
from .limits import like_controls
from .linear import LinearDynamics
from .models import Cost, Dynamics, QuadraticCost
from .options import AugmentedLagrangian, DDPResult, LineSearch, Mode, Regularization
from .solver import DDPSolver

__all__ = ["MPC", "MPCRun"]


@dataclass(frozen=True)
class MPCRun:
    """A closed-loop run of :meth:`MPC.simulate` (batch dimensions lead).

    Attributes
    ----------
    xs : (..., steps+1, n)   the plant's states
    us : (..., steps, m)     the applied controls
    plan_costs : (..., steps)  the cost of each step's plan (the model's prediction)
    reasons : numpy array of str, shape (..., steps): each step's solver reason
        ("converged", "max_iter", ...; "max_iter" is normal with a fixed budget)
    solve_times : (steps,) seconds of each step's solve (wall clock)
    """

    xs: torch.Tensor
    us: torch.Tensor
    plan_costs: torch.Tensor
    reasons: np.ndarray
    solve_times: np.ndarray


class MPC:
    r"""Model-predictive control: at every step, optimize the next ``horizon`` controls
    from the current state with a fixed iteration budget, apply the first, shift the
    plan by one stage (the last control repeated) as the next warm start.

    Parameters
    ----------
    dynamics : Dynamics or callable ``f(x, u, t)``
        The model the controller plans with (the plant may differ: :meth:`simulate`).
    cost : Cost
        Its stage index t counts from the current step (the window moves with time).
    horizon : int
        Number of stages planned at every step.
    n_controls : int, optional
        Control dimension m, for the first plan (zeros); taken from ``control_limits``
        when those are given, else from a ``LinearDynamics``' B or a ``QuadraticCost``'s R.
    iterations : int
        DDP iterations per step (the real-time budget); default 3.
    control_limits : (lo, hi), optional
        As for :func:`trajopt.solve_ddp`, with T = ``horizon`` and the state's batch:
        numbers, (m,), (horizon, m) per stage, ``(*batch, m)`` per element or
        ``(horizon, *batch, m)``.  Per-stage limits belong to the *window*, as the cost's
        stage index does: stage t of every plan gets limit t (a zero-thrust last node
        stays the plan's last), and the shifted warm start is clamped stage by stage to
        them; they do not move with absolute time (for that, build the controller per step
        or pass time-indexed limits to a :class:`~trajopt.DDPSolver` yourself).
    mode, regularization, line_search, tol
        As for :func:`trajopt.solve_ddp`.
    constraints : sequence of trajopt.Constraint, optional
        Met by the augmented-Lagrangian loop; the multipliers are warm-started from the
        previous step (shifted by one stage, like the plan), so that a few outer
        iterations per step suffice.
    augmented_lagrangian : AugmentedLagrangian, optional
        Default ``AugmentedLagrangian(max_outer=2)``: the budget per step is then
        ``iterations`` inner iterations in each of at most 2 outer iterations.

    Batched: a state of shape (B, n) runs B controllers at once (one solve).
    """

    def __init__(self, dynamics: Dynamics | Callable, cost: Cost, *, horizon: int,
                 n_controls: int | None = None, iterations: int = 3, control_limits=None,
                 mode: Mode = "ilqr", regularization: Regularization | None = None,
                 line_search: LineSearch | None = None, tol: float = 1e-8,
                 constraints: Sequence[Constraint] | None = None,
                 augmented_lagrangian: AugmentedLagrangian | None = None):
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise InvalidArgumentError(f"horizon must be a positive integer; got {horizon!r}")
        sized = [v for v in (control_limits if isinstance(control_limits, (tuple, list))
                             else ()) if not is_number(v)]
        if sized:   # (m,), (horizon, m), (..., m): the last dimension
            m = int(torch.as_tensor(sized[0]).shape[-1])
            if n_controls is not None and n_controls != m:
                raise ShapeError(f"n_controls = {n_controls} but control_limits have {m} "
                                 "entries")
            n_controls = m
        if n_controls is None:   # the models that know it: B's columns, R's size
            n_controls = _known_controls(dynamics, cost)
        if n_controls is None or isinstance(n_controls, bool) or not isinstance(
                n_controls, int) or n_controls < 1:
            raise InvalidArgumentError("n_controls must be a positive integer (or give "
                                       f"control_limits); got {n_controls!r}")
        self.horizon, self.n_controls = horizon, n_controls
        cons = check_constraints(constraints) if constraints else []
        if augmented_lagrangian is not None and not cons:
            raise InvalidArgumentError("augmented_lagrangian is given but there are no "
                                       "constraints for it to meet")
        inner = DDPSolver(dynamics, AugmentedCost(cost, cons) if cons else cost, mode=mode,
                          max_iter=iterations, tol=tol, regularization=regularization,
                          line_search=line_search, control_limits=control_limits)
        self.solver = ConstrainedSolver(
            inner, augmented_lagrangian or AugmentedLagrangian(max_outer=2)) if cons \
            else inner
        self.plan: torch.Tensor | None = None
        self.last: DDPResult | None = None

    def reset(self, plan: Any = None) -> None:
        """Forget the warm start, or set it: controls (..., T, m) with T >= ``horizon``
        (an offline solution over a longer horizon: its first ``horizon`` stages), batch
        dimensions broadcast against the state's at the next :meth:`step`."""
        self.last = None
        if plan is None:
            self.plan = None
            return
        p = as_real(plan, "plan")
        if p.ndim < 2 or p.shape[-1] != self.n_controls or p.shape[-2] < self.horizon:
            raise ShapeError(f"plan must be controls (..., T, {self.n_controls}) with T >= "
                             f"horizon = {self.horizon}; got {shape_str(p)}")
        self.plan = p[..., :self.horizon, :]

    def step(self, x: Any) -> torch.Tensor:
        """The control to apply at state ``x`` (..., n): one warm-started solve; the plan
        and its result are kept (``self.plan``, ``self.last``).

        The warm start is the previous solution shifted by one stage and rolled out from
        ``x`` *with its feedback gains*, ``u_t = u_bar_{t+1} + K_{t+1}(x_t - x_bar_{t+1})``
        (clamped to the limits): on an unstable system an open-loop rollout of the old
        controls from a state the model did not predict (a disturbance, a model error)
        drifts away within the horizon and leaves the few iterations a useless
        linearization (measured: a cart-pole held upright under a 20 % model error failed
        with the open-loop warm start and holds with this one).  The states of that
        rollout go to the solver as ``xs0`` (checked there in one vectorized call), so
        it does not roll the plan out a second time."""
        x = torch.as_tensor(x)
        shape = (*x.shape[:-1], self.horizon, self.n_controls)
        states = None
        if self.plan is not None and tuple(self.plan.shape) != shape:
            if self.last is None:  # given by reset(plan): broadcast to the state's batch
                self.plan = _broadcast_plan(self.plan, shape, x)
            else:  # the state's batch changed: start again from zeros
                self.plan = None
        if self.plan is None:
            self.plan = torch.zeros(shape, dtype=x.dtype, device=x.device)
        elif self.last is not None and tuple(self.last.us.shape) == shape:
            self.plan, states = self._closed_loop_warm_start(x)
            if not x.is_floating_point() or states.dtype != x.dtype or \
                    states.shape != (*x.shape[:-1], self.horizon + 1, x.shape[-1]):
                states = None  # not what the solver takes as xs0: it rolls out itself
        if isinstance(self.solver, ConstrainedSolver):
            same = self.last is not None and tuple(self.last.us.shape) == shape
            res = self.solver.solve(x, self.plan, self._shifted_multipliers() if same
                                    else None, xs0=states)
        else:
            res = self.solver.solve(x, self.plan, xs0=states)
        self.last = res
        self.plan = torch.cat([res.us[..., 1:, :], res.us[..., -1:, :]], -2)
        return res.us[..., 0, :]

    def _shifted_multipliers(self):
        """The previous step's multipliers shifted by one stage (None the first time)."""
        last = self.last
        if last is None or last.multipliers is None:
            return None
        out = []
        for con, lam in zip(self.solver.cost.constraints, last.multipliers):
            lam = torch.as_tensor(lam)
            out.append(torch.cat([lam[..., 1:, :], lam[..., -1:, :]], -2)
                       if con.where == "running" else lam)
        return out

    def _closed_loop_warm_start(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The shifted plan under the previous gains from ``x`` and its states
        (..., horizon+1, n)."""
        last = self.last
        xs = torch.cat([last.xs[..., 1:, :], last.xs[..., -1:, :]], -2)
        K = torch.cat([last.K[..., 1:, :, :], last.K[..., -1:, :, :]], -3)
        # (m,) limits, or (..., horizon, m): stage t of every window gets limit t
        lo, hi = like_controls(self.solver.control_limits, self.plan.to(x.dtype))
        us, states = [], [x]
        with torch.no_grad():
            for t in range(self.horizon):
                u = self.plan[..., t, :] + (K[..., t, :, :] @ (x - xs[..., t, :]).unsqueeze(-1)
                                            ).squeeze(-1)
                if lo is not None:
                    u = torch.maximum(torch.minimum(u, _at_step(hi, t)), _at_step(lo, t))
                us.append(u)
                x = self.solver.dynamics(x, u, t)
                states.append(x)
        plan = torch.stack(us, -2)
        return torch.where(torch.isfinite(plan), plan, self.plan), torch.stack(states, -2)

    def simulate(self, plant: Callable, x0: Any, steps: int,
                 callback: Callable[[int, torch.Tensor, DDPResult], Any] | None = None
                 ) -> MPCRun:
        """Run the closed loop for ``steps`` steps: ``u = self.step(x)``, then
        ``x = plant(x, u, k)`` (the true system, which may differ from the model; e.g.
        ``dynamics`` itself for a nominal run; it gets tensors and may return a tensor or
        a numpy array, e.g. from ``scipy.integrate.solve_ivp``).  ``callback(k, x,
        result)`` after each solve (a progress bar, logging).  The run's arrays are
        tensors (the controller's type), also for a numpy ``x0``."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InvalidArgumentError(f"steps must be a positive integer; got {steps!r}")
        x = torch.as_tensor(x0)
        xs, us, costs, reasons, times = [x], [], [], [], []
        for k in range(steps):
            t0 = time.perf_counter()
            u = self.step(x)
            times.append(time.perf_counter() - t0)
            if callback is not None:
                callback(k, x, self.last)
            x = plant(x, u, k)
            if isinstance(x, (np.ndarray, list, tuple)):   # a numpy / scipy plant
                x = torch.as_tensor(np.asarray(x), dtype=xs[0].dtype, device=xs[0].device)
            if not torch.is_tensor(x) or x.shape != xs[0].shape:
                raise ShapeError(f"plant must return the next state with shape "
                                 f"{tuple(xs[0].shape)}; got "
                                 f"{getattr(x, 'shape', type(x).__name__)} at step {k}")
            xs.append(x)
            us.append(u)
            costs.append(torch.as_tensor(self.last.cost))
            reasons.append(np.asarray(self.last.reason))
        return MPCRun(xs=torch.stack(xs, -2), us=torch.stack(us, -2),
                      plan_costs=torch.stack(costs, -1), reasons=np.stack(reasons, -1),
                      solve_times=np.asarray(times))


def _known_controls(dynamics: Any, cost: Any) -> int | None:
    """The control size a model states: ``LinearDynamics``' B (n, m) or (T, n, m), a
    ``QuadraticCost``'s R (m, m) or (T, m, m); None where neither does."""
    B = getattr(dynamics, "B", None) if isinstance(dynamics, LinearDynamics) else None
    R = getattr(cost, "R", None) if isinstance(cost, QuadraticCost) else None
    for M in (B, R):
        if torch.is_tensor(M) and M.ndim >= 2:
            return int(M.shape[-1])
    return None


def _broadcast_plan(plan: torch.Tensor, shape: tuple[int, ...], x: torch.Tensor
                    ) -> torch.Tensor:
    """A plan given by ``reset`` for the controllers of states ``x``: batch dimensions
    broadcast (one plan for every controller), never dropped silently."""
    try:
        ok = torch.broadcast_shapes(plan.shape, shape) == shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ShapeError(f"plan {shape_str(plan)} does not broadcast to the controls "
                         f"{shape} of the state's batch {tuple(x.shape[:-1])}")
    return plan.to(dtype=x.dtype, device=x.device).expand(shape).clone()


def _at_step(v: torch.Tensor, t: int) -> torch.Tensor:
    """Stage ``t``'s limit of :func:`~trajopt.ddp.limits.like_controls`' (m,) or
    (..., T, m) limits."""
    return v if v.ndim == 1 else v[..., t, :]
