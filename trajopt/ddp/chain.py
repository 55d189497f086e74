r"""The problem structure the DDP loop works on: how a control sequence is simulated, what
the feedback acts on, and the stage derivatives handed to the Riccati kernel.

:class:`Chain` is the plain OCP :math:`x_{t+1} = f_t(x_t, u_t)` with running costs
:math:`l_t(x_t, u_t)` and terminal cost :math:`l_T(x_T)`; its stages are
:class:`~trajopt.riccati.expansion.DenseStage`.  The residual-span structure of GT-DDP is
:class:`trajopt.ddp.spans.SpanChain`, the same interface with
:class:`~trajopt.riccati.spans.SpanStage`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .._checks import same_shapes
from ..errors import InvalidArgumentError
from ..lqr.affine_scan import checked_states, rollout_pays
from ..lqr.compiled_rollout import compiled_rollout, compiled_rollout_pays
from ..riccati.compiled import compilable
from ..riccati.expansion import DenseStage, DenseStages, addmm, joint_blocks
from .batch import Rows, Traj
from .inputs import transitions_agree
from .limits import at_stage
from .linear import LinearDynamics
from .models import Cost, Dynamics
from .stagechecks import check_terminal_derivatives
from .stagewise import StageDerivatives, check_visible, stage_points

__all__ = ["Chain", "Control", "AffineLaw", "feedback_control", "STATES_RTOL_EPS"]

#: given states pass :meth:`Chain.consistent_prefix` to this many times the dtype's
#: machine epsilon, relative to the stage's states (the choice: its docstring)
STATES_RTOL_EPS = 16.0

# control(t, xs) -> u_t, with xs = [x_0, ..., x_t] of the rollout so far
Control = Callable[[int, list[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class AffineLaw:
    """The controls of a rollout as an affine law of the state, ``u_t = ff_t + K_t (x_t -
    xbar_t)`` (``K`` and ``xbar`` None: open loop, ``u_t = ff_t``): what lets
    :meth:`Chain.simulate` roll linear dynamics out by a parallel scan.  ff : T tensors
    (B, m); K : T tensors (B, m, n) or None; xbar : T (or T+1) tensors (B, n) or None.
    """

    ff: Sequence[torch.Tensor]
    K: Sequence[torch.Tensor] | None = None
    xbar: Sequence[torch.Tensor] | None = None


def feedback_control(law: AffineLaw, deviation: Callable, lo=None, hi=None) -> Control:
    """The stage loop's control ``u_t = ff_t + K_t dev_t`` of ``law`` (``law.K`` and
    ``law.xbar`` given), clamped to ``[lo, hi]`` where given; ``dev_t =
    deviation(t, xs, law.xbar)`` (:meth:`Chain.deviation`); ``lo``, ``hi`` (m,), or
    (T, B, m) per stage (:mod:`trajopt.ddp.limits`).

    The columns ``ff_t`` (as (B, m, 1)) and ``K_t`` are unbound from their stacked
    tensors once, at the first call (a scanned rollout makes none), so a stage costs four
    operations (the deviation, a view, ``baddbmm``, a view): the loop calls the user's
    dynamics in between, one stage at a time, and every operation pays torch's dispatch.
    """
    cols: list[list[torch.Tensor]] = []

    def control(t: int, xs: list[torch.Tensor]) -> torch.Tensor:
        if not cols:
            cols.append(_columns(law.ff))
            cols.append(list(law.K))
        u = addmm(cols[0][t], cols[1][t], deviation(t, xs, law.xbar).unsqueeze(-1)).squeeze(-1)
        return u if lo is None else torch.clamp(u, at_stage(lo, t), at_stage(hi, t))
    return control


def _columns(ff: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The feedforward controls ``ff_t`` as columns (B, m, 1), unbound once."""
    return list(Rows.stack(ff).unsqueeze(-1).unbind(0)) if isinstance(ff, Rows) \
        else [f.unsqueeze(-1) for f in ff]


class Chain:
    """The plain chain: ``dynamics`` (a :class:`~trajopt.ddp.models.Dynamics`) and
    ``cost`` (a :class:`~trajopt.ddp.models.Cost`)."""

    def __init__(self, dynamics: Dynamics, cost: Cost):
        self.dynamics = dynamics
        self.cost = cost
        self._dynamics_derivatives = StageDerivatives(
            dynamics.derivatives, dynamics, time_invariant=dynamics.time_invariant,
            name="the dynamics", model=dynamics)
        self._cost_derivatives = StageDerivatives(
            cost.derivatives, cost.running, time_invariant=cost.time_invariant,
            name="the running cost", model=cost)
        self._terminal_checked = False

    def setup(self, us: Sequence[torch.Tensor]) -> None:
        """Check the controls ``us`` (T tensors (B, m_t)) against the structure; called
        once per solve before anything is simulated."""

    def players(self) -> list[list[int]] | None:
        """Control sizes of the players at each stage (None: one player everywhere)."""
        return None

    def linear_model(self) -> LinearDynamics | None:
        """The dynamics when they are a :class:`~trajopt.ddp.linear.LinearDynamics` whose
        transitions are this structure's (None otherwise): what :meth:`simulate` may
        scan."""
        return self.dynamics if isinstance(self.dynamics, LinearDynamics) else None

    def simulate(self, x0: torch.Tensor, T: int, control: Control,
                 rows: torch.Tensor | None = None, law: AffineLaw | None = None,
                 known: Sequence[torch.Tensor] = ()) -> Traj:
        """Roll out ``T`` stages from ``x0`` (B, n) with ``u_t = control(t, xs)``; ``rows``
        (B,) are the flat-batch elements of the rows (see :class:`~trajopt.ddp.batch.Traj`;
        None: all elements in order), bound to the cost before it is evaluated.

        ``law``: the same controls as an :class:`AffineLaw`, given when ``control`` is
        one.  Linear dynamics (:meth:`linear_model`) are then rolled out by the parallel
        scan of :mod:`trajopt.lqr.affine_scan` where its rule allows and its self-check
        holds, the others (and those) by the stage loop with the law's operations
        inlined (:meth:`_inlined_loop`).

        ``known``: the states ``x_1 .. x_k`` of these controls, already known (k tensors
        (B, n_t); :meth:`consistent_prefix` checked them): taken as they are, and the
        dynamics are called from stage ``k`` on (the stage loop).  The cost is computed
        as for a full rollout."""
        self.cost.bind_rows(rows)
        scanned = None if law is None or known else (self._compiled(x0, T, law)
                                                     or self._scanned(x0, T, law))
        points = None
        if scanned is not None:   # stacked (T+1, B, n), (T, B, m): the cost's points too
            X, U = scanned
            xs, us, x = list(X.unbind(0)), list(U.unbind(0)), X[-1]
            points = (X[:-1].reshape(-1, X.shape[-1]), U.reshape(-1, U.shape[-1]))
        elif law is not None and not known and self._plain_stages():
            xs, us, U = self._inlined_loop(x0, T, law)
            x = xs[-1]
            if U is not None and T > 1:   # the controls are stacked already
                points = (torch.cat(xs[:-1]), U.view(-1, U.shape[-2]))
        else:
            xs, us = [x0], []
            x = x0
            k = len(known)
            for t in range(T):
                u = control(t, xs)
                x = known[t] if t < k else self.transition(t, x, u, xs)
                xs.append(x)
                us.append(u)
        # the running cost of all stages at once (StageDerivatives.total: one call where the
        # cost allows) on copies of the points, which are kept for the derivatives and the
        # next forward pass at this trajectory: a write the checks miss stays in the copies
        args = list(zip(xs[:-1], us))
        points = stage_points(args) if points is None else points
        running = self._cost_derivatives.total(
            args, None if points is None else tuple(p.clone() for p in points)) if T else 0.0
        return Traj(xs, us, running + self.cost.terminal(x), rows, points if T > 1 else None)

    def _plain_stages(self) -> bool:
        """This structure's stages are the plain chain's: :meth:`transition` calls the
        dynamics and :meth:`deviation` is ``x_t - xbar_t`` (not a subclass's)."""
        cls = type(self)
        return cls.transition is Chain.transition and cls.deviation is Chain.deviation

    def _inlined_loop(self, x0: torch.Tensor, T: int, law: AffineLaw
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
        """States and controls of ``law`` by the stage loop, with the control's
        operations (:func:`feedback_control`; open loop: ``u_t = ff_t``) and
        :meth:`transition` inlined and the user's function called directly
        (:meth:`Dynamics.stage_function`): the same arithmetic on the same tensors as
        the generic loop; closed loop in two operations a stage instead of four where
        grad mode is off (as in every solve), the deviation and the control written into
        buffers whose column and row views are made once: ``docs/performance.md``,
        "Twelfth round".  Returns the states, the controls and, where they were written
        into one buffer, that buffer (T, B, m, 1) (else None)."""
        f = self.dynamics.stage_function()
        xs, x = [x0], x0
        if law.K is None:
            us = list(law.ff)[:T]
            for t in range(T):
                x = f(x, us[t], t)
                xs.append(x)
            return xs, us, None
        # lists: a Rows read row by row pays a Python call and a select a stage
        cols, K, xbar = _columns(law.ff), list(law.K), list(law.xbar)
        B = x0.shape[0]
        # addmm's rule, decided once: baddbmm where every stage has the batch's shapes;
        # buffers where they have one shape (stacked gains and controls have: not scanned)
        if Rows.holds(law.ff, T) and Rows.holds(law.K, T):
            batched = law.ff.stacked.ndim == 3 and law.ff.stacked.shape[1] == B and \
                law.K.stacked.ndim == 4 and law.K.stacked.shape[1] == B
            uniform = batched
        else:
            batched = all(c.ndim == 3 and c.shape[0] == B for c in cols[:T]) and all(
                k.ndim == 3 and k.shape[0] == B for k in K[:T])
            uniform = batched and same_shapes(cols[:T]) and same_shapes(K[:T])
        us = []
        # buffers of one shape: every stage's control, state and gain alike
        if uniform and not torch.is_grad_enabled() and K[0].shape[-1] == x0.shape[-1]:
            U = torch.empty((T, *cols[0].shape), dtype=cols[0].dtype, device=x0.device)
            rows, ucols = U.squeeze(-1).unbind(0), U.unbind(0)
            dev = torch.empty_like(x0)
            dcol = dev.unsqueeze(-1)
            for t in range(T):
                torch.sub(x, xbar[t], out=dev)
                torch.baddbmm(cols[t], K[t], dcol, out=ucols[t])
                x = f(x, rows[t], t)
                xs.append(x)
                us.append(rows[t])
            return xs, us, U
        mm = torch.baddbmm if batched else addmm
        for t in range(T):
            u = mm(cols[t], K[t], (x - xbar[t]).unsqueeze(-1)).squeeze(-1)
            x = f(x, u, t)
            xs.append(x)
            us.append(u)
        return xs, us, None

    def _compiled(self, x0: torch.Tensor, T: int, law: AffineLaw
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """States (T+1, B, n) and controls (T, B, m) of ``law`` on the linear dynamics by
        the compiled loop (:mod:`trajopt.lqr.compiled_rollout`), or None where its rule
        says no."""
        dyn = self.linear_model()
        if dyn is None or T == 0 or not same_shapes(law.ff):
            return None
        B, n = x0.shape
        gains = () if law.K is None else (law.K[0], law.xbar[0])
        if not compiled_rollout_pays(T, B, n, law.ff[0].shape[-1], x0, law.ff[0], *gains):
            return None  # before the maps: the scan, tried next, forms them itself
        A, Bm, c = dyn.maps(T, x0)
        if not compilable(A, Bm):
            return None
        closed = law.K is not None
        xs, us = compiled_rollout(A, Bm, c, Rows.stack(law.ff),
                                  Rows.stack(law.K) if closed else None,
                                  torch.stack(list(law.xbar[:T])) if closed else None, x0)
        return xs, us

    def _scanned(self, x0: torch.Tensor, T: int, law: AffineLaw
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """States (T+1, B, n) and controls (T, B, m) of ``law`` on the linear dynamics by
        the parallel scan, or None where the rule
        (:func:`~trajopt.lqr.affine_scan.rollout_pays`) or the self-check
        (:func:`~trajopt.lqr.affine_scan.checked_states`) says no."""
        dyn = self.linear_model()
        B, n = x0.shape
        if dyn is None or not rollout_pays(T, B, n, law.K is None, x0.device) or \
                not same_shapes(law.ff):
            return None
        A, Bm, c = dyn.maps(T, x0)
        ff = Rows.stack(law.ff)  # (T, B, m)
        At, Bt = A.transpose(-1, -2), Bm.transpose(-1, -2)
        if law.K is None:  # open loop: one map for the whole batch
            M = A.expand(T, n, n).unsqueeze(1)
            v = ff @ Bt
        else:
            K = Rows.stack(law.K)  # (T, B, m, n)
            xbar = torch.stack(list(law.xbar[:T]))
            v = (Bm.unsqueeze(1) @ torch.baddbmm(
                ff.reshape(-1, ff.shape[-1], 1), K.reshape(-1, *K.shape[-2:]),
                xbar.reshape(-1, n, 1), alpha=-1).reshape(T, B, -1, 1)).squeeze(-1)
            M = A.unsqueeze(1) + Bm.unsqueeze(1) @ K
        if c is not None:
            v = v + c.unsqueeze(1)

        def controls(X):
            """The law's controls at states X (T, B, n), as the loop computes them."""
            return ff if law.K is None else ff + (K @ (X - xbar).unsqueeze(-1)).squeeze(-1)

        def transitions(xs):
            """The model's own transitions from the states, and the magnitudes of their
            terms (the law's terms too: their rounding reaches x_{t+1} through B)."""
            X = xs[:-1]
            u_scale = ff.abs() if law.K is None else ff.abs() + (
                K.abs() @ (X.abs() + xbar.abs()).unsqueeze(-1)).squeeze(-1)
            pred = X @ At + controls(X) @ Bt
            scale = X.abs() @ At.abs() + u_scale @ Bt.abs()
            if c is not None:
                pred, scale = pred + c.unsqueeze(1), scale + c.abs().unsqueeze(1)
            return pred, scale
        xs = checked_states(M, v, x0, transitions)
        if xs is None:
            return None
        return xs, controls(xs[:-1])

    def open_loop(self, x0: torch.Tensor, us: Sequence[torch.Tensor],
                  xs0: Sequence[torch.Tensor] | None = None) -> Traj:
        """The open-loop rollout of ``us`` (T tensors (B, m_t)) from ``x0`` (B, n), with
        its cost.

        ``xs0``: T+1 tensors (B, n_t), states given for these controls (a warm start),
        never trusted: checked by :meth:`consistent_prefix` in one call of the dynamics;
        the leading stages every element passes are taken as given and the dynamics are
        called from the earliest stage an element fails (the plain rollout when that is
        stage 0).  The cost is computed as the rollout computes it (the running cost of
        all stages in one call, then the terminal cost).
        """
        def control(t, xs):
            return us[t]
        known = self.known_states(x0, xs0, us)
        if known:
            return self.simulate(x0, len(us), control, known=known)
        return self.simulate(x0, len(us), control, law=AffineLaw(us))

    def known_states(self, x0: torch.Tensor, xs0: Sequence[torch.Tensor] | None,
                     us: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The given states ``x_1 .. x_k`` (views of ``xs0``) of the leading stages every
        element passes (:meth:`consistent_prefix`); empty without ``xs0`` or where some
        element fails at stage 0."""
        if xs0 is None:
            return []
        return list(xs0[1:int(self.consistent_prefix(x0, xs0, us).min()) + 1])

    def consistent_prefix(self, x0: torch.Tensor, xs: Sequence[torch.Tensor],
                          us: Sequence[torch.Tensor], rtol: float | None = None
                          ) -> torch.Tensor:
        r"""How many leading stages of the given states ``xs`` (T+1 tensors (B, n_t)) the
        dynamics reproduce from ``x0`` (B, n) under the controls ``us`` (T tensors
        (B, m_t), as the rollout applies them: clamped): (B,) int64, ``k`` for an
        element whose ``xs[0]`` equals ``x0`` exactly and whose transitions ``t < k``
        all pass

        .. math::  |f_t(x_t, u_t) - x_{t+1}| \le \mathrm{rtol}\,
                   \max(\|x_t\|_\infty, \|x_{t+1}\|_\infty)

        componentwise, with ``x_{t+1}`` and the prediction finite (NaN and inf fail);
        ``rtol`` defaults to ``STATES_RTOL_EPS`` (16) times the dtype's epsilon.

        The predictions of all stages come from one call of the dynamics over all
        ``T * B`` points where the model allows it
        (:meth:`~trajopt.ddp.stagewise.StageDerivatives.values`: time-invariant, or
        time-varying under ``vmap`` with one stage per row once a derivative pass has
        verified that call), else stage by stage (still from the given states, not a
        rollout).  A call that fails or returns another shape counts as inconsistent
        (the rollout then reports it).

        The bound is relative to the stage's states, not to each component: the rounding of
        ``f`` (an RK4 sum, a matrix product) is of the size of the terms it combines, i.e.
        of the state, so a component crossing zero keeps an error of the state's size; and
        a bound with an absolute part (``16 eps (1 + |x|)``) would accept any guess for a
        problem scaled down far enough (an all-zero guess for ``x0 ~ 1e-100``).  The
        batched call may round differently from the rollout's per-stage calls: the
        built-in problems (elementwise ops) give bitwise the same values;
        ``LinearDynamics`` states from the compiled rollout differ from the batched
        product by up to 1.5 eps; 16 leaves room for other kernels and devices.  A wrong
        or stale guess only costs the check; an accepted one differs by rounding.

        Raises
        ------
        InvalidArgumentError
            For a structure whose transitions are not the dynamics' own (a subclass that
            overrides :meth:`transition`, e.g. residual spans): its states are not
            checked here.
        """
        if type(self).transition is not Chain.transition:
            raise InvalidArgumentError(
                f"xs0 (given states) is not supported by {type(self).__name__} (its "
                f"transitions are not the dynamics' own: residual spans or players); "
                f"leave xs0 out")
        B = x0.shape[0]
        if rtol is None:
            rtol = STATES_RTOL_EPS * torch.finfo(x0.dtype).eps
        start = (xs[0] == x0).all(-1) if xs[0].shape == x0.shape else \
            torch.zeros(B, dtype=torch.bool, device=x0.device)
        try:
            ok = self._consistent_stages(xs, us, rtol)
        except (RuntimeError, IndexError, TypeError, AttributeError, ValueError):
            ok = None
        if ok is None:
            return torch.zeros(B, dtype=torch.int64, device=x0.device)
        return ok.to(torch.int64).cumprod(0).sum(0) * start

    def _consistent_stages(self, xs, us, rtol) -> torch.Tensor | None:
        """(T, B) bool: transition t of each element passes the test of
        :meth:`consistent_prefix`; None where the dynamics returned another shape."""
        pred = self.predictions(xs, us)
        if pred is None or not same_shapes(xs):   # stage sizes that differ: stage by stage
            return None if pred is None else torch.stack([transitions_agree(
                p, x, n, rtol) for p, x, n in zip(pred, xs[:-1], xs[1:])])
        return transitions_agree(torch.stack(pred), torch.stack(list(xs[:-1])),
                                  torch.stack(list(xs[1:])), rtol)

    def predictions(self, xs: Sequence[torch.Tensor], us: Sequence[torch.Tensor]
                    ) -> list[torch.Tensor] | None:
        """``f_t(x_t, u_t)`` at the given states ``xs`` (T+1 tensors (B, n_t)) and
        controls ``us`` (T tensors): one call over all ``T * B`` points where the model
        allows (:meth:`~trajopt.ddp.stagewise.StageDerivatives.values`), else a call a
        stage; None where a result has another shape than the state it predicts."""
        T, nxt = len(us), xs[1:]
        pred = self._dynamics_derivatives.values(list(zip(xs[:-1], us)), probe=False)
        if pred is not None and same_shapes(nxt):
            if not torch.is_tensor(pred) or pred.shape != (T * nxt[0].shape[0],
                                                           *nxt[0].shape[1:]):
                return None
            return list(pred.reshape(T, *nxt[0].shape).unbind(0))
        out = [self.dynamics(x, u, t) for t, (x, u) in enumerate(zip(xs[:-1], us))]
        ok = all(torch.is_tensor(p) and p.shape == n.shape for p, n in zip(out, nxt))
        return out if ok else None

    def transition(self, t: int, x: torch.Tensor, u: torch.Tensor,
                   xs: list[torch.Tensor]) -> torch.Tensor:
        """``x_{t+1}`` from ``x_t``, the stage's control and the states so far ``xs``."""
        return self.dynamics(x, u, t)

    def deviation(self, t: int, xs: list[torch.Tensor], xbar: list[torch.Tensor]
                  ) -> torch.Tensor:
        """What the feedback gain of stage ``t`` multiplies: ``x_t - xbar_t``."""
        return xs[t] - xbar[t]

    def derivatives(self, traj: Traj, second_order: bool
                    ) -> tuple[list[DenseStage], torch.Tensor, torch.Tensor]:
        """Packed stage derivatives on the flat batch of ``traj`` and the terminal gradient
        / Hessian, over all stages at once where the model allows (``StageDerivatives``)."""
        self.cost.bind_rows(traj.rows)
        B = traj.cost.shape[0]
        args = list(zip(traj.xs[:-1], traj.us))
        # shared by the two: the cats made once (by the rollout, where it made them)
        points = stage_points(args) if traj.points is None else traj.points
        rows = traj.rows
        fd, fds = self._dynamics_derivatives(args, points, rows=rows, second_order=second_order)
        cd, cds = self._cost_derivatives(args, points, rows=rows)
        if fd is not None and cd is not None:  # pack all stages with one joint_blocks
            F, L = joint_blocks(fd.fx, fd.fu, cd.lx, cd.lu, cd.lxx, cd.luu, cd.lux)
            n, T = traj.xs[0].shape[-1], len(args)

            def per_stage(v):  # (T, B, ...): stage t is row t (views, made when read)
                return None if v is None else v.reshape(T, B, *v.shape[1:])

            stages = DenseStages(DenseStage(per_stage(F), per_stage(L), n, None, *(
                per_stage(v) for v in (fd.fxx, fd.fux, fd.fuu))))
        else:
            stages = []
            for (x, _), f, c in zip(args, fds, cds):
                F, L = joint_blocks(f.fx, f.fu, c.lx, c.lu, c.lxx, c.luu, c.lux)
                stages.append(DenseStage(F, L, x.shape[-1], None, f.fxx, f.fux, f.fuu))
        return (stages, *self.terminal_derivatives(traj.xs[-1], rows, len(args)))

    def terminal_derivatives(self, x: torch.Tensor, rows: torch.Tensor | None = None,
                             T: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Terminal gradient, Hessian at ``x`` (B, n) of stage ``T``, checked (stagechecks)."""
        Vx, Vxx = self.cost.terminal_derivatives(x)
        if not self._terminal_checked:
            self._terminal_checked = True
            check_visible(self.cost.terminal, (x,), (Vx, Vxx), "the terminal cost")
        check_terminal_derivatives(Vx, Vxx, x, rows, T)
        return Vx, Vxx

