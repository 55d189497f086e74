r"""Differential dynamic programming and iLQR over abstract, batched dynamics: the loop.

Alg. 1 of the DDPNOpt paper (papers/000, Eq. 1-4) with the safeguards users of crocoddyl,
trajax and mpc.pytorch expect:

* ``mode="ilqr"``: Gauss-Newton (first-order dynamics, second-order cost);
  ``mode="ddp"``: the full expansion with the dynamics-Hessian terms
  :math:`Q_{xx} \mathrel{+}= V_x' \cdot f_{xx}`, :math:`Q_{ux} \mathrel{+}= V_x' \cdot f_{ux}`,
  :math:`Q_{uu} \mathrel{+}= V_x' \cdot f_{uu}`;
* Levenberg-Marquardt regularization :math:`Q_{uu} + \mu I` with the adaptive schedule of
  Tassa, Erez & Todorov (2012): increased on a failed backward pass (Q_uu not positive
  definite) or a failed line search, decreased after an accepted step;
* backtracking line search on the feedforward term,
  :math:`u = \bar u + \alpha k + K (x - \bar x)`, accepting when the actual reduction is at
  least ``c1`` times the expected one :math:`-(\alpha\, k^\top Q_u + \tfrac{\alpha^2}{2}
  k^\top Q_{uu} k)` summed over stages;
* box control limits (Tassa, Mansard & Todorov 2014), the same at every stage or per stage
  and element (:mod:`trajopt.ddp.limits`): the feedforward solves a box QP per stage,
  feedback rows of clamped controls are zero, and the forward pass clamps, so the limits
  hold exactly;
* every batch element converges, fails or diverges on its own, with a recorded reason.

The solver is a loop around the Riccati kernel of :mod:`trajopt.riccati`: the problem structure
(:class:`~trajopt.ddp.chain.Chain`, or :class:`~trajopt.ddp.spans.SpanChain` for residual
spans) gives the stage expansions and simulates; :meth:`DDPSolver.policy` picks the gains plug
(:class:`~trajopt.riccati.policy.CholeskyGains`, :class:`~trajopt.riccati.policy.BoxGains`);
the value update is :func:`~trajopt.riccati.step.value_update`.  Options and results are in
:mod:`trajopt.ddp.options`, the per-element bookkeeping in :mod:`trajopt.ddp.batch`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from .._checks import same_shapes, shape_str
from .._threads import threads_for
from ..errors import ConvergenceWarning, InvalidArgumentError, NonFiniteError, ShapeError
from ..riccati.policy import BoxGains, CholeskyGains, GainsPlug
from ..riccati.step import total_expected_change, value_update
from . import inference, inputs
from . import shooting as mshoot
from .batch import Policy, Rows, Traj, merge_policy, pack_result, select_gains, step_size
from .chain import AffineLaw, Chain, feedback_control
from .compiledpass import compiled_backward_pass
from .inputs import SolveInputs, check_cost_shapes, check_states, prepare_inputs, widened
from .limits import for_rows
from .models import Cost, Dynamics, as_dynamics
from .modules import check_eval_mode
from .options import DDPResult, IterationLog, LineSearch, Mode, Regularization
from .scanpass import scan_applies, scan_backward_pass
from .writes import guarded

__all__ = ["DDPSolver", "SolveInputs"]


class DDPSolver:
    """DDP / iLQR solver; :func:`~trajopt.solve_ddp` is ``DDPSolver(...).solve(x0, us0)``.

    Keep the object for warm starts (MPC): call :meth:`solve` again with a shifted control
    sequence.  The steps (:meth:`derivatives`, :meth:`policy`, :meth:`backward_pass`,
    :meth:`forward_pass`, :meth:`accept_step`) are public for subclasses and benchmarks; a
    variant overrides one of them (GT-DDP's players: :meth:`policy`).  ``structure``
    (default: :class:`~trajopt.ddp.chain.Chain` of ``dynamics`` and ``cost``) is the
    problem structure the loop simulates and differentiates (``docs/architecture.md``).

    Parameters
    ----------
    control_limits : (lo, hi) or None
        Each a number, (m,), (T, m) per stage, ``(*batch, m)`` per element or ``(T, *batch, m)``
        (mpc.pytorch's); a 2-d one with T == B is refused: write (T, 1, m) or (1, B, m).
        Checked by each :meth:`solve` against its horizon T and batch
        (:mod:`trajopt.ddp.limits`).  The other arguments: :func:`~trajopt.solve_ddp`.
    """

    #: the values scan's self-check refused it in the current solve (:meth:`backward_pass`
    #: then keeps to the recursion); reset by each solve
    _scan_refused = False

    def __init__(self, dynamics: Dynamics | Callable, cost: Cost, *, mode: Mode = "ilqr",
                 max_iter: int = 100, tol: float = 1e-8,
                 regularization: Regularization | None = None,
                 line_search: LineSearch | None = None, control_limits=None,
                 callback: Callable[[IterationLog], Any] | None = None,
                 structure: Chain | None = None, shooting: mshoot.Shooting = "single"):
        if mode not in ("ilqr", "ddp"):
            raise InvalidArgumentError(f"mode must be 'ilqr' or 'ddp'; got {mode!r}")
        mshoot.check_shooting(shooting, mode)
        if not isinstance(cost, Cost):
            raise TypeError(f"cost must be a trajopt.Cost; got {type(cost).__name__}")
        if int(max_iter) < 0:
            raise InvalidArgumentError(f"max_iter must be >= 0; got {max_iter}")
        if not tol > 0:
            raise InvalidArgumentError(f"tol must be positive; got {tol}")
        self.dynamics, self.cost = as_dynamics(dynamics), cost
        self.structure = Chain(self.dynamics, cost) if structure is None else structure
        self.mode, self.max_iter, self.tol = mode, int(max_iter), float(tol)
        self.reg = regularization or Regularization()
        self.ls = line_search or LineSearch()
        self.control_limits, self.callback, self.shooting = control_limits, callback, shooting

    # ------------------------------------------------------------------ inputs
    def prepare(self, x0, us0, xs0=None) -> SolveInputs:
        """Check the models' modes (``check_eval_mode``), validate ``x0`` (..., n), ``us0``
        (..., T, m) or a list and ``xs0``, flatten the batch, clamp ``us0`` to the limits."""
        check_eval_mode(("the dynamics", self.dynamics), ("the cost", self.cost))
        inp = prepare_inputs(x0, us0, self.control_limits, xs0)
        self.structure.setup(inp.us)
        return inp

    # ------------------------------------------------------------------ steps
    def rollout(self, x0: torch.Tensor, us: list[torch.Tensor], xs0=None) -> Traj:
        """Open-loop rollout with cost (flat batch); ``xs0``: given states of ``us``, T+1
        tensors (B, n_t), checked, not trusted (:meth:`~trajopt.ddp.chain.Chain.open_loop`;
        a model that writes into its arguments raises: :func:`~trajopt.ddp.writes.guarded`)."""
        with guarded(self.structure, x0, us[0] if us else None):
            if self.shooting == "multiple" and xs0 is not None:
                return mshoot.gapped_start(self.structure, x0, us, xs0)
            return self.structure.open_loop(x0, us, xs0)

    def derivatives(self, traj: Traj) -> tuple[list, torch.Tensor, torch.Tensor]:
        """The stage expansions (kernel plug 1) and the terminal gradient / Hessian on the
        flat batch of ``traj``."""
        return self.structure.derivatives(traj, self.mode == "ddp")

    def policy(self, mu: torch.Tensor, traj: Traj, lo=None, hi=None,
               k_warm: list[torch.Tensor] | None = None) -> GainsPlug:
        """The gains plug (kernel plug 3) of one backward pass with regularization ``mu``
        (B,) around ``traj``: box QP under control limits, Cholesky otherwise."""
        if lo is not None:   # (T, B, m) limits: those of traj's rows
            return BoxGains(mu, *for_rows(lo, hi, traj.rows), traj.us, k_warm)
        return CholeskyGains(mu)

    def backward_pass(self, stages: list, Vx: torch.Tensor, Vxx: torch.Tensor,
                      mu: torch.Tensor, traj: Traj, lo=None, hi=None,
                      k_warm: list[torch.Tensor] | None = None) -> Policy:
        """The Riccati recursion with per-element regularization ``mu`` (B,): per stage,
        expansion -> gains -> value update.  Elements whose regularized Q_uu is not
        positive definite get ``ok = False``.  Small problems on the CPU take the same
        pass as one compiled loop (:mod:`trajopt.ddp.compiledpass`, limits included).
        Elsewhere, where :func:`~trajopt.ddp.scanpass.scan_applies` (iLQR, mu = 0, no
        limits, few small problems over many stages) the values come from the parallel
        scan and the step runs once over all stages; after the scan's self-check has
        refused it once, a solve keeps to the recursion."""
        T = len(stages)
        Ks, ks, Vxs, Vxxs = [None] * T, [None] * T, [None] * (T + 1), [None] * (T + 1)
        Vxs[T], Vxxs[T] = Vx, Vxx
        oks, terms = [], []
        gains = self.policy(mu, traj, lo, hi, k_warm)
        # the same pass as one compiled loop (small problems on the CPU)
        pol = compiled_backward_pass(stages, Vx, Vxx, gains)
        if pol is not None:
            return pol
        # the same pass in O(log T) rounds; once its check refuses it in a solve, the recursion
        # for the rest of the solve (the problem's conditioning, not the pass's)
        if scan_applies(stages, gains, mu, lo) and not self._scan_refused:
            pol = scan_backward_pass(stages, Vx, Vxx, gains)
            if pol is not None:
                return pol
            self._scan_refused = True
        for t in range(T - 1, -1, -1):
            Q = stages[t].expand(Vx, Vxx)
            g = gains.gains(Q, t)
            oks.append(g.ok)
            # a failed element's NaNs stay in its own row; it is flagged by ``ok``
            step = value_update(Q, g.K, g.k, exact_policy=False, kK=g.kK)
            Vx, Vxx = step.Vx, step.Vxx
            terms.append(step.change_terms())
            Ks[t], ks[t] = g.K, g.k
            Vxs[t], Vxxs[t] = stages[t].state_block(Vx, Vxx)
        # the flags and the expected change of all stages at once, not per stage
        dV = total_expected_change(terms)
        ok = torch.stack(oks).all(0)
        return Policy(Ks, ks, Vxs, Vxxs, dV, ok & torch.isfinite(dV).all(-1))

    def forward_pass(self, traj: Traj, policy: Policy, alpha: float | torch.Tensor,
                     lo=None, hi=None) -> Traj:
        """Closed-loop rollout ``u = u_bar + alpha k + K (x - x_bar)`` (clamped to the
        limits) on the flat batch of ``traj`` / ``policy``; ``alpha`` is a number or one
        step per row (N,).  Non-finite rollouts get cost inf."""
        if isinstance(alpha, torch.Tensor):
            alpha = alpha.unsqueeze(-1)
        (lo, hi), us, k = for_rows(lo, hi, traj.rows), traj.controls(), policy.k
        if us and same_shapes(us) and same_shapes(k) and us[0].shape == k[0].shape:
            # u_bar + alpha k of every stage in a few ops, not two per stage
            ff = Rows(Rows.stack(us) + alpha * Rows.stack(k))
        else:
            ff = [u + alpha * kt for u, kt in zip(us, k)]
        if traj.gaps is not None:   # multiple shooting: the step closes part of the defects
            out = mshoot.gapped_forward(self.structure, traj, policy.K, ff, alpha, lo, hi)
        else:
            law = AffineLaw(ff, policy.K, traj.xs)
            control = feedback_control(law, self.structure.deviation, lo, hi)
            out = self.structure.simulate(traj.xs[0], len(traj.us), control, traj.rows,
                                          None if lo is not None else law)
        cost = torch.where(out.finite(), out.cost, torch.full_like(out.cost, math.inf))
        return Traj(out.xs, out.us, cost, traj.rows, out.points, out.gaps)

    def accept_step(self, actual: torch.Tensor, expected: torch.Tensor,
                    cost: torch.Tensor | None = None) -> torch.Tensor:
        """Armijo-type test: actual reduction at least ``c1`` times the expected one (an
        expected reduction at the rounding level of ``cost`` needs no actual one)."""
        tiny = torch.finfo(actual.dtype).eps * 10 * (1 if cost is None else cost.abs())
        return torch.isfinite(actual) & ((actual >= self.ls.c1 * expected)
                                         | ((expected <= tiny) & (actual >= 0)))

    # ------------------------------------------------------------------ driver
    @torch.no_grad()
    def solve(self, x0: Any, us0: Any, *, xs0: Any = None,
              tol: float | torch.Tensor | None = None) -> DDPResult:
        """Optimize the controls from ``x0`` (..., n) starting at ``us0`` (..., T, m).

        ``xs0`` (..., T+1, n) or T+1 arrays (..., n_t): the states of ``us0`` from ``x0``
        (crocoddyl's ``init_xs``; MPC: the previous solution shifted by one stage), never
        trusted: checked in one call of the dynamics over all stages, they save the rollout
        up to the first stage that fails (:meth:`~trajopt.ddp.chain.Chain.open_loop`); the
        result is that of ``xs0=None`` up to rounding (``docs/ddp.md``).

        Runs under ``torch.inference_mode()`` (a model needing autograd inside itself:
        ``no_grad``; :mod:`trajopt.ddp.inference`); the result holds normal tensors, not
        differentiable.  A small problem (batch x (n+m) x (1+n+m) below torch's parallel
        grain) runs with one intra-op thread (:func:`trajopt._threads.threads_for`).

        ``tol``: this solve's tolerance instead of the solver's, a number or one per
        batch element (a tensor of the batch's shape: the augmented-Lagrangian loop
        solves each element to its own accuracy).
        """
        inp = self.prepare(x0, us0, xs0)
        B = inp.x0.shape[0]
        tol = self.tol if tol is None else inputs.check_tol(tol, inp.x0)
        n, m = inp.x0.shape[-1], max(u.shape[-1] for u in inp.us)
        with threads_for(B * (n + m) * (1 + n + m)):
            return inference.run(lambda: self._solve(inp, tol),
                                 inference.user_objects(self.dynamics, self.cost))

    def _solve(self, inp: SolveInputs, tol: float | torch.Tensor) -> DDPResult:
        kind, batch, listed, x0f, usf, lo, hi = (inp.kind, inp.batch, inp.listed, inp.x0,
                                                 inp.us, inp.lo, inp.hi)
        self._scan_refused = False  # the scan is tried again in each solve
        B, dev, dt = x0f.shape[0], x0f.device, x0f.dtype
        try:
            traj = self.rollout(x0f, usf, inp.xs)
        except (RuntimeError, IndexError, TypeError, AttributeError) as exc:
            inference.refuse_if_runs_outside(lambda: self.rollout(x0f, usf, inp.xs), exc)
            raise ShapeError(
                f"the dynamics or cost failed on x0 of shape {shape_str(x0f)} and controls "
                f"of shape {shape_str(usf[0])} (flattened batch): {exc}") from exc
        check_states(traj, listed)
        check_cost_shapes(self.cost, traj)
        wide = widened(inp, [traj.cost.dtype, *(x.dtype for x in traj.xs)])
        if wide is not None:   # the model computes in a wider dtype: so does the solve
            return self._solve(wide, tol)
        reason = np.array(["max_iter"] * B, dtype=object)
        finite0 = traj.finite()
        if not bool(finite0.any()):
            raise NonFiniteError("the rollout of us0 from x0 is not finite for any batch "
                                 "element (the dynamics or cost returned NaN/inf)")
        active = finite0.clone()
        if not bool(finite0.all()):
            bad = torch.nonzero(~finite0).flatten()
            reason[bad.cpu().numpy()] = "diverged"
            traj.cost[bad] = math.inf
            shown = ", ".join(str(int(i)) for i in bad[:10]) + (
                ", ..." if bad.numel() > 10 else "")
            warnings.warn(
                f"the rollout of us0 from x0 is not finite for {bad.numel()} of {B} batch "
                f"elements (flat index {shown}): they are not optimized, their reason is "
                f"'diverged', their cost inf and their xs that rollout",
                ConvergenceWarning, stacklevel=3)
        converged = torch.zeros(B, dtype=torch.bool, device=dev)
        iterations = torch.zeros(B, dtype=torch.long, device=dev)
        mu = torch.full((B,), self.reg.initial, dtype=dt, device=dev)
        delta = torch.ones(B, dtype=dt, device=dev)
        fresh = torch.zeros(B, dtype=torch.bool, device=dev)  # policy is at current traj
        policy_full = None
        history: list[IterationLog] = []
        k_warm: list[torch.Tensor] | None = None
        for it in range(self.max_iter + 1):
            idx = torch.nonzero(active).flatten()
            if idx.numel() == 0:
                break
            # every element active: work on traj itself (accepted steps are written into
            # rows that this iteration no longer reads)
            sub = traj if idx.numel() == B else traj.select(idx)
            pol, stopped = self._backward_with_regularization(sub, idx, mu, delta, lo, hi,
                                                             k_warm, reason)
            policy_full = merge_policy(policy_full, pol, idx, B)
            fresh[idx] = True
            k_warm = policy_full.k
            active[idx[stopped]] = False
            # converged: the feedforward step is below sqrt(tol) relative to the controls;
            # the step is still taken (quadratic convergence: the result is then ~tol
            # from the optimum) unless it is below tol
            size = step_size(pol.k, sub.controls())
            tol_sub = tol[idx] if torch.is_tensor(tol) else tol
            done = pol.ok & (size <= (tol_sub ** 0.5))
            had_gaps = None if sub.gaps is None else mshoot.gapped_rows(sub)  # before the step
            if had_gaps is not None:   # multiple shooting: not before the defects are closed
                done = done & ~had_gaps
            if bool(done.any()):
                converged[idx[done]] = True
                active[idx[done]] = False
                reason[idx[done].cpu().numpy()] = "converged"
            if it == self.max_iter:
                break
            polish = done & (size > tol_sub)
            todo = pol.ok & ((~done & active[idx]) | polish)
            step = torch.zeros(B, dtype=dt, device=dev)
            exp_log = torch.zeros(B, dtype=dt, device=dev)
            act_log = torch.zeros(B, dtype=dt, device=dev)
            pending = todo.clone()
            if bool(todo.any()):
                self._line_search(sub, pol, idx, pending, traj, step, exp_log, act_log, lo, hi)
            accepted = todo & ~pending
            gacc, grej = idx[accepted], idx[pending & ~polish]
            iterations[gacc] += 1
            fresh[gacc] = False
            # Tassa's second test: an accepted step that barely changed the cost
            small = accepted & (act_log[idx] <= tol_sub * traj.cost[idx].abs())
            if had_gaps is not None:   # a step that closed defects is no optimality test
                small = small & ~had_gaps
                mshoot.settle(traj)
            if bool(small.any()):
                converged[idx[small]] = True
                active[idx[small]] = False
                reason[idx[small].cpu().numpy()] = "converged"
            # regularization: decrease after success, increase after a failed search
            d = torch.minimum(1.0 / torch.full_like(delta[gacc], self.reg.factor),
                              delta[gacc] / self.reg.factor)
            delta[gacc] = d
            new_mu = mu[gacc] * d
            mu[gacc] = torch.where(new_mu > self.reg.minimum, new_mu, torch.zeros_like(new_mu))
            if grej.numel():
                over = self._increase(mu, delta, grej)
                stop = grej[over]
                active[stop] = False
                reason[stop.cpu().numpy()] = "line_search_failed"
            with inference.outside():   # normal tensors, for the caller to keep
                history.append(IterationLog(it + 1, *(v.clone() for v in (
                    traj.cost, mu, step, exp_log, act_log))))
                if self.callback is not None:
                    self.callback(history[-1])
        # gains and value derivatives at the returned trajectory where the last backward pass ran
        # at an earlier one (the current regularization, raised on a copy if needed; reasons kept)
        stale = torch.nonzero(~fresh & finite0).flatten()
        if stale.numel():
            pol, _ = self._backward_with_regularization(
                traj.select(stale), stale, mu.clone(), delta.clone(), lo, hi, k_warm,
                reason.copy())
            policy_full = merge_policy(policy_full, pol, stale, B)
        return pack_result(kind, batch, listed, traj, policy_full, converged, iterations,
                           reason, history, max_gap=mshoot.largest_gap(traj)
                           if self.shooting == "multiple" else None)

    def _line_search(self, sub, pol, idx, pending, traj, step, exp_log, act_log, lo, hi):
        """Try the alphas for the ``pending`` rows of ``sub`` (see LineSearch.strategy);
        write accepted candidates into ``traj`` and clear their ``pending`` flag."""
        for group in self.ls.groups():
            if not group or not bool(pending.any()):
                break
            self._try_alphas(group, sub, pol, idx, pending, traj, step, exp_log, act_log,
                             lo, hi)

    def _try_alphas(self, alphas, sub, pol, idx, pending, traj, step, exp_log, act_log, lo, hi):
        """Roll out every alpha of ``alphas`` for the pending rows in one batch and accept,
        per element, the largest alpha that passes :meth:`accept_step`."""
        sel = torch.nonzero(pending).flatten()
        na, ns = len(alphas), sel.numel()
        a = torch.tensor(alphas, dtype=sub.cost.dtype, device=sub.cost.device)
        alpha = a[0].item() if na == 1 else a.repeat_interleave(ns)
        if na == 1 and ns == sub.cost.shape[0]:  # every row, one alpha: no copies
            cand = self.forward_pass(sub, pol, alpha, lo, hi)
        else:
            rows = sel.repeat(na)  # alpha-major: row j * ns + i is alpha j, element i
            cand = self.forward_pass(sub.select(rows), select_gains(pol, rows), alpha, lo, hi)
        dV = pol.dV[sel]
        expected = -(a[:, None] * dV[:, 0] + a[:, None] ** 2 * dV[:, 1])
        actual = sub.cost[sel] - cand.cost.reshape(na, ns)
        acc = self.accept_step(actual, expected, sub.cost[sel])  # (na, ns)
        if sub.gaps is not None:  # closing defects may raise the cost (shooting.py)
            acc = acc | (mshoot.gapped_rows(sub)[sel] & mshoot.closing_accepted(actual,
                                                                                expected))
        ok = acc.any(0)
        if not bool(ok.any()):
            return
        first = torch.argmax(acc.to(torch.int8), 0)  # the largest accepted alpha
        cols = torch.nonzero(ok).flatten()
        gidx = idx[sel[cols]]
        if na == 1 and gidx.numel() == traj.cost.shape[0]:
            traj.assign(gidx, cand)  # every row accepted the one alpha
        else:
            traj.assign(gidx, cand.select(first[cols] * ns + cols))
        step[gidx] = a[first[cols]]
        exp_log[gidx] = expected[first[cols], cols]
        act_log[gidx] = actual[first[cols], cols]
        pending[sel[cols]] = False

    def _increase(self, mu, delta, idx) -> torch.Tensor:
        """Tassa's increase for elements ``idx``; returns the mask exceeding the maximum."""
        d = torch.maximum(torch.full_like(delta[idx], self.reg.factor),
                          delta[idx] * self.reg.factor)
        delta[idx] = d
        mu[idx] = torch.clamp(mu[idx] * d, min=self.reg.minimum)
        return mu[idx] > self.reg.maximum

    def _backward_with_regularization(self, sub: Traj, idx, mu, delta, lo, hi, k_warm,
                                      reason):
        """Backward passes, raising mu for the elements that fail, until all succeed or
        exceed the maximum regularization (those are returned as stopped)."""
        stages, Vx, Vxx = self.derivatives(sub)
        stages = mshoot.with_offsets(stages, sub.gaps)   # multiple shooting's defects
        n_sub = idx.numel()
        stopped = torch.zeros(n_sub, dtype=torch.bool, device=idx.device)
        local = torch.arange(n_sub, device=idx.device)
        # idx lists rows in order: all of them needs no copy
        warm = None if k_warm is None else (
            k_warm if n_sub == k_warm[0].shape[0] else [k[idx] for k in k_warm])
        pol = None
        while True:
            gidx = idx[local]
            # the first pass is over everything: no copies
            st, s_sub, s_vx, s_vxx, s_warm = (stages, sub, Vx, Vxx, warm) if \
                local.numel() == n_sub else ([s.select(local) for s in stages],
                                             sub.select(local), Vx[local], Vxx[local],
                                             None if warm is None else [k[local] for k in warm])
            part = self.backward_pass(st, s_vx, s_vxx, mu[gidx], s_sub, lo, hi, s_warm)
            if s_sub.gaps is not None:  # multiple shooting: the model's change along the step
                part = replace(part, dV=torch.where(
                    mshoot.gapped_rows(s_sub)[:, None], mshoot.model_change(
                        st, s_vx, s_vxx, part.K, part.k, s_sub.gaps), part.dV))
            # part's tensors may be views (terminal derivatives): merged into a copy
            pol = replace(part, shared=True) if pol is None else \
                merge_policy(pol, part, local, n_sub)
            bad = ~part.ok
            if not bool(bad.any()):
                break
            over = self._increase(mu, delta, gidx[bad])
            stop_local = local[bad][over]
            stopped[stop_local] = True
            reason[idx[stop_local].cpu().numpy()] = "regularization_limit"
            local = local[bad][~over]
            if local.numel() == 0:
                break
        return pol, stopped
