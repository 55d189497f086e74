r"""The augmented-Lagrangian outer loop around a DDP solver (``solve_ddp(...,
constraints=...)``): multipliers and penalties per batch element, inexact intermediate
solves, the reasons and results of :class:`~trajopt.ddp.options.AugmentedLagrangian`.
The cost it hands the inner solver is :class:`~trajopt.ddp.augmented.AugmentedCost`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._checks import shape_str
from ..errors import InvalidArgumentError, NonFiniteError, ShapeError
from .augmented import AugmentedCost
from .batch import Policy, Traj, pack_result
from .inputs import SolveInputs, widened
from .options import AugmentedLagrangian, DDPResult, IterationLog
from .shooting import defects, largest

__all__ = ["ConstrainedSolver"]


@dataclass
class _Batch:
    """The whole-batch state of the outer loop: initial states, trajectory (lists over
    stages), multipliers and penalties, flags, counters, the violation, reasons, the
    history and the last gains."""

    x0f: torch.Tensor
    xs: list
    us: list
    lam: list
    rho: torch.Tensor
    active: torch.Tensor
    converged: torch.Tensor
    iterations: torch.Tensor
    violation: torch.Tensor
    reason: np.ndarray
    history: list
    pol: Policy | None = None
    #: per-stage / per-element limits, (T, B, m) each (trajopt/ddp/limits.py); None: (m,)
    limits: tuple | None = None


class ConstrainedSolver:
    """The augmented-Lagrangian outer loop around ``inner``, a
    :class:`~trajopt.ddp.solver.DDPSolver` (or :class:`~trajopt.ddp.gtddp.GTDDPSolver`)
    built on an :class:`AugmentedCost`.  :func:`~trajopt.solve_ddp` with ``constraints``
    is ``ConstrainedSolver(inner, options).solve(x0, us0)``.

    Parameters
    ----------
    inner : DDPSolver
        Its cost must be an :class:`AugmentedCost`.
    options : AugmentedLagrangian, optional
    callback : callable(IterationLog), optional
        Called after every inner iteration with a log over the whole flat batch
        (elements not being solved show zero steps).
    """

    def __init__(self, inner, options: AugmentedLagrangian | None = None,
                 callback: Callable[[IterationLog], Any] | None = None):
        if not isinstance(inner.cost, AugmentedCost):
            raise InvalidArgumentError("the inner solver's cost must be an AugmentedCost")
        self.inner = inner
        self.cost: AugmentedCost = inner.cost
        self.options = options or AugmentedLagrangian()
        self.callback = callback

    @property
    def dynamics(self):
        return self.inner.dynamics

    @property
    def control_limits(self):
        return self.inner.control_limits

    # ------------------------------------------------------------------ constraints
    def violations(self, xs: list[torch.Tensor], us: list[torch.Tensor]
                   ) -> list[torch.Tensor]:
        """The constraint values on a trajectory (flat batch): (T, B, p) per running
        constraint, (B, p) per terminal one, in order."""
        out = []
        T, B = len(us), xs[0].shape[0]
        for con in self.cost.constraints:
            if con.where == "terminal":
                out.append(con(xs[-1]))
            elif con.time_invariant and all(v.shape == us[0].shape for v in us) and \
                    all(v.shape == xs[0].shape for v in xs[:-1]):
                c = con(torch.cat(xs[:-1], 0), torch.cat(us, 0))
                out.append(c.reshape(T, B, c.shape[-1]))
            else:
                per_stage = [con(x, u, t) for t, (x, u) in enumerate(zip(xs[:-1], us))]
                if any(c.shape != per_stage[0].shape for c in per_stage):
                    raise ShapeError(f"{con.label} returned "
                                     f"{sorted({c.shape[-1] for c in per_stage})} components "
                                     f"at different stages; it must return the same p at "
                                     f"every stage")
                out.append(torch.stack(per_stage))
        return out

    def max_violation(self, values: list[torch.Tensor]) -> torch.Tensor:
        """(B,) largest violation over stages and components (nan counts as inf)."""
        worst = None
        for con, c in zip(self.cost.constraints, values):
            v = c.abs() if con.equality else torch.clamp(c, min=0)
            v = v.flatten(0, -3).amax(0) if con.where == "running" else v
            v = torch.nan_to_num(v.amax(-1), nan=math.inf)
            worst = v if worst is None else torch.maximum(worst, v)
        return worst

    # ------------------------------------------------------------------ driver
    @torch.no_grad()
    def solve(self, x0: Any, us0: Any, multipliers: Sequence[Any] | None = None, *,
              xs0: Any = None) -> DDPResult:
        """Optimize the controls from ``x0`` (..., n) starting at ``us0`` (..., T, m)
        under the constraints (the outer loop of
        :class:`~trajopt.ddp.options.AugmentedLagrangian`).

        ``multipliers``: initial multipliers, shaped as a result's (one per constraint,
        (..., T, p) running, (..., p) terminal; a warm start, e.g. the previous MPC step's
        shifted by one stage); default zeros.

        ``xs0``: the states of ``us0`` from ``x0`` (as for
        :meth:`~trajopt.ddp.solver.DDPSolver.solve`): checked against the dynamics, they
        save this loop's rollout of ``us0``, and every inner solve then gets the current
        trajectory's states as its ``xs0`` (checked again there: one vectorized call
        instead of a rollout per outer iteration)."""
        return self._solve(self.inner.prepare(x0, us0, xs0), multipliers)

    def _solve(self, inp: SolveInputs, multipliers: Sequence[Any] | None) -> DDPResult:
        opt, inner, cost = self.options, self.inner, self.cost
        x0f, us = inp.x0, [u.clone() for u in inp.us]
        B, T = x0f.shape[0], len(us)
        dt, dev = x0f.dtype, x0f.device
        given = inp.xs is not None
        # the leading stages every element's given states pass, then the rollout of us0
        # (sizes from every element)
        shoot = given and getattr(inner, "shooting", "single") == "multiple"
        # multiple shooting: the given states as they are (a guess), the rollout otherwise
        xs = [x0f, *(x.clone() for x in inp.xs[1:])] if shoot else \
            [x0f, *inner.structure.known_states(x0f, inp.xs, us)]
        try:
            for t in range(len(xs) - 1, T):
                xs.append(inner.structure.transition(t, xs[-1], us[t], xs))
        except (RuntimeError, IndexError, TypeError, AttributeError) as exc:
            raise ShapeError(
                f"the dynamics failed on x0 of shape {shape_str(x0f)} and controls of "
                f"shape {shape_str(us[0])} (flattened batch): {exc}") from exc
        values = self.violations(xs, us)
        base = cost.base
        wide = widened(inp, [*(x.dtype for x in xs), *(c.dtype for c in values),
                             base.running(xs[0], us[0], 0).dtype, base.terminal(xs[-1]).dtype])
        if wide is not None:   # the model computes in a wider dtype: so does the solve
            return self._solve(wide, multipliers)
        finite = torch.stack([torch.isfinite(x).all(-1) for x in xs]).all(0)  # (B,)
        for con, c in zip(cost.constraints, values):
            bad = ~torch.isfinite(c).all(-1) & finite
            if bool(bad.any()):
                which = torch.nonzero(bad.reshape(-1, B).any(0)).flatten()[:10].tolist()
                raise NonFiniteError(f"{con.label} is not finite on the rollout of us0 from "
                                     f"x0 (flat batch elements {which})")
        cost.reset(self._initial_multipliers(values, multipliers, B),
                   torch.full((B,), opt.penalty, dtype=dt, device=dev))
        lam, rho = cost.lam, cost.rho
        active = torch.ones(B, dtype=torch.bool, device=dev)
        converged = torch.zeros(B, dtype=torch.bool, device=dev)
        iterations = torch.zeros(B, dtype=torch.long, device=dev)
        violation = torch.full((B,), math.inf, dtype=dt, device=dev)
        # still active after max_outer iterations: out of budget, not infeasible
        reason = np.array(["max_iter"] * B, dtype=object)
        history: list[IterationLog] = []
        b = _Batch(x0f, xs, us, lam, rho, active, converged, iterations, violation, reason,
                   history, limits=None if inp.lo is None or inp.lo.ndim == 1 else
                   (inp.lo, inp.hi))
        own_callback, own_limits = inner.callback, inner.control_limits
        try:
            self._outer_loop(b, inner.tol, own_callback, given)
        finally:  # the inner solver is the user's too (MPC keeps it): leave it as it was
            inner.callback, inner.control_limits = own_callback, own_limits
        pol = b.pol
        cost.select(None)
        total = self._base_cost(xs, us)
        ok = torch.isfinite(total) & torch.as_tensor(reason != "diverged", device=dev)
        traj = Traj(xs, us, torch.where(ok, total, torch.full_like(total, math.inf)))
        batch, kind = inp.batch, inp.kind
        multipliers = tuple(
            kind.out(lm.movedim(0, 1).reshape(*batch, *lm.shape[:1], *lm.shape[2:])
                     if con.where == "running" else lm.reshape(*batch, *lm.shape[1:]))
            for con, lm in zip(cost.constraints, lam))
        return pack_result(kind, batch, inp.listed, traj, pol, converged, iterations,
                           reason, history, max_violation=kind.out(violation.reshape(batch)),
                           multipliers=multipliers, max_gap=self._largest_gap(xs, us))

    def _largest_gap(self, xs, us) -> torch.Tensor | None:
        """(B,) the largest defect of the returned states under multiple shooting."""
        if getattr(self.inner, "shooting", "single") != "multiple":
            return None
        return largest(defects(self.inner.structure, us, xs, checked=False))

    def _outer_loop(self, b: _Batch, user_tol: float, own_callback,
                    with_states: bool = False) -> None:
        """The outer iterations (see :meth:`solve`), writing into the whole-batch state
        ``b``; ``with_states``: each inner solve gets the states ``b.xs`` as ``xs0``."""
        opt, inner, cost = self.options, self.inner, self.cost
        B, dev = b.x0f.shape[0], b.x0f.device
        for _ in range(opt.max_outer):
            idx = torch.nonzero(b.active).flatten()
            if idx.numel() == 0:
                break
            everyone = idx.numel() == B
            cost.select(None if everyone else idx)
            inner.callback = self._logger(idx, B, b.history, own_callback)
            if b.limits is not None:   # the limits of the rows solved, in the flat batch
                inner.control_limits = tuple(v if everyone else v[:, idx] for v in b.limits)
            # intermediate solves to a looser tolerance (the multipliers are still
            # wrong), the user's once the violation is near the target; per element, so
            # that an element's result does not depend on the others
            prev = b.violation[idx]
            tight = (prev <= 100 * opt.tol) | (opt.inner_tol <= user_tol)
            loose = torch.clamp(prev * prev, min=user_tol, max=opt.inner_tol)
            res = inner.solve(b.x0f if everyone else b.x0f[idx], [u[idx] for u in b.us],
                              xs0=[x[idx] for x in b.xs] if with_states else None,
                              tol=torch.where(tight, torch.full_like(prev, user_tol), loose))
            sub_xs, sub_us = list(res.xs), list(res.us)
            for full, part in zip(b.xs, sub_xs):
                full[idx] = part
            for full, part in zip(b.us, sub_us):
                full[idx] = part
            b.pol = _scatter_policy(b.pol, res, idx, B)
            b.iterations[idx] += res.iterations
            values = self.violations(sub_xs, sub_us)
            viol = self.max_violation(values)
            # the multiplier estimates at this solution (also of the elements now done)
            for con, c, lm in zip(cost.constraints, values, b.lam):
                r = b.rho[idx].reshape(-1, 1) if con.where == "terminal" else \
                    b.rho[idx].reshape(1, -1, 1)
                new = lm[..., idx, :] + r * c if con.where == "running" else lm[idx] + r * c
                if not con.equality:
                    new = torch.clamp(new, min=0)
                if con.where == "running":
                    lm[:, idx] = new
                else:
                    lm[idx] = new
            inner_reason = np.asarray(res.reason, dtype=object).reshape(-1)
            met = ((viol <= opt.tol) & tight).cpu().numpy()
            diverged = inner_reason == "diverged"
            done = met | diverged
            b.reason[idx.cpu().numpy()[done]] = inner_reason[done]
            b.converged[idx] = res.converged & torch.as_tensor(met, device=dev)
            slow = viol > opt.decrease * b.violation[idx]
            b.violation[idx] = viol
            grow = idx[slow & ~torch.as_tensor(done, device=dev)]
            b.rho[grow] = b.rho[grow] * opt.factor
            over = grow[b.rho[grow] > opt.max_penalty]
            b.rho[over] = opt.max_penalty
            b.reason[over.cpu().numpy()] = "constraint_violation"
            b.active[idx[torch.as_tensor(done, device=dev)]] = False
            b.active[over] = False

    def _initial_multipliers(self, values, given, B: int) -> list[torch.Tensor]:
        """Zeros shaped like the constraint ``values`` ((T, B, p) / (B, p)), or ``given``
        (the result's layout) checked and moved into that layout."""
        if given is None:
            return [torch.zeros_like(c) for c in values]
        cons = self.cost.constraints
        if len(given) != len(cons):
            raise ShapeError(f"multipliers must hold one array per constraint "
                             f"({len(cons)}); got {len(given)}")
        out = []
        for i, (con, c, lam) in enumerate(zip(cons, values, given)):
            lam = torch.as_tensor(lam, dtype=c.dtype, device=c.device)
            if con.where == "running":
                T, p = c.shape[0], c.shape[-1]
                if lam.numel() != B * T * p or lam.shape[-2:] != (T, p):
                    raise ShapeError(f"multipliers[{i}] must have shape (..., {T}, {p}) "
                                     f"for a batch of {B}; got {tuple(lam.shape)}")
                lam = lam.reshape(B, T, p).transpose(0, 1)
            else:
                if lam.numel() != c.numel() or lam.shape[-1] != c.shape[-1]:
                    raise ShapeError(f"multipliers[{i}] must have shape (..., "
                                     f"{c.shape[-1]}) for a batch of {B}; got "
                                     f"{tuple(lam.shape)}")
                lam = lam.reshape(c.shape)
            if not bool(torch.isfinite(lam).all()):
                raise NonFiniteError(f"multipliers[{i}] is not finite")
            out.append(lam.clone() if con.equality else torch.clamp(lam, min=0))
        return out

    def _base_cost(self, xs, us) -> torch.Tensor:
        base = self.cost.base
        base.bind_rows(None)
        J = base.terminal(xs[-1])
        for t, (x, u) in enumerate(zip(xs[:-1], us)):
            J = J + base.running(x, u, t)
        return J

    def _logger(self, idx: torch.Tensor, B: int, history: list, own=None) -> Callable:
        """The inner callback: logs of the rows ``idx`` written into whole-batch logs,
        numbered on from the previous solves (and the inner solver's own callback, if it
        has one, called with the inner log)."""
        offset = len(history)

        def log(part: IterationLog) -> None:
            def full(v):
                out = torch.zeros(B, dtype=v.dtype, device=v.device)
                out[idx] = v
                return out
            entry = IterationLog(iteration=offset + part.iteration, cost=full(part.cost),
                                 regularization=full(part.regularization),
                                 step=full(part.step), expected=full(part.expected),
                                 actual=full(part.actual))
            history.append(entry)
            if own is not None:
                own(part)
            if self.callback is not None:
                self.callback(entry)
        return log


def _scatter_policy(pol: Policy | None, res: DDPResult, idx: torch.Tensor, B: int
                    ) -> Policy:
    """Write the gains and value derivatives of ``res`` (rows ``idx``, stage lists) into the
    whole-batch policy ``pol`` (allocated on the first call)."""
    parts = [list(getattr(res, name)) for name in ("K", "k", "Vx", "Vxx")]
    if pol is None:
        def alloc(v):
            return torch.zeros(B, *v.shape[1:], dtype=v.dtype, device=v.device)
        pol = Policy(*([alloc(v) for v in p] for p in parts),
                     dV=res.cost.new_zeros(B, 2),
                     ok=torch.ones(B, dtype=torch.bool, device=idx.device))
    for full, part in zip((pol.K, pol.k, pol.Vx, pol.Vxx), parts):
        for a, b in zip(full, part):
            a[idx] = b
    return pol
