r"""GT-DDP (Liu, Chen & Theodorou, "Game Theoretic DDP Neural Optimizer") as a
torch.optim optimizer for residual and branching networks.

The network is decomposed by :func:`nnbridge.graph.graph_stages`: stages on the state
augmented with the open residuals, :math:`y_t = [x_t, x_{r_1}, \dots]` (Eq. 8, 26), and
the affine layers off the main chain (projection shortcuts, parallel branches) as
players of the stage where they merge (Sec. 3.2).  One step is DDPNOpt's (Alg. 3 with the
conventions of :class:`nnbridge.DDPNOpt`: recorded forward/backward passes, terminal
Hessian, ``p.grad`` as the open-loop term, batch statistics over ranks) on these stages:

1. backward: :func:`trajopt.riccati.operator_riccati_step` on the augmented state
   (:class:`nnbridge.graph_ops.GraphLinearization`); the per-sample value is carried on
   :math:`y_t`, so :math:`V_{x x_r}`, :math:`V_{x_r x_r}` (Eq. 10) are its blocks, the
   policy's columns on the residual blocks are the residual feedback :math:`G` (Eq. 9)
   and where a residual starts the blocks merge into :math:`V_x, V_{xx}` (Prop. 2); with
   the rank-one value the factor is :math:`[z_x; z_{x_r}]` (Prop. 6, Eq. 22);
2. the players' curvature: each player's own (Table 1: :math:`Q_{uv} = 0` for the
   first-order methods; EKFAC per layer), or with ``curvature="exact"`` the dense joint
   :math:`Q_{ww}` with its exact cross blocks (the cooperative game solved exactly: Eq.
   14-15 / 40 with nothing approximated);
3. forward: :math:`\delta w_t = -P^{-1}(d_t + \mathbb{E}_i[Q_{wy}^i\,\delta y_t^i])`,
   :math:`\delta y_t = \hat y_t - y_t` (residual deviations included), stage by stage.

On a network without residuals and players this is DDPNOpt, step for step (tested).
"""

from __future__ import annotations

from contextlib import ExitStack, nullcontext
from typing import Any

import torch
from torch import nn

from trajopt.errors import UnsupportedModelError

from . import ddpnopt as _ddpnopt
from .cooperative import CooperativeEKFAC, can_cooperate
from .curvature import EKFAC, Exact
from .ddpnopt import DDPNOpt
from .feedback import feedback_terms, open_loop_gain, watched
from .graph import Alignment, graph_stages
from .graph_ops import BlockDiagonal, GraphLinearization, GraphResponse, joint_exact
from .stages import normalizes_by_batch_in
from .traced_values import accumulated_batch_statistics, mismatches

__all__ = ["GTDDP", "GTEKFAC"]

class GTDDP(DDPNOpt):
    r"""Game-Theoretic DDP Neural Optimizer (module docstring).

    Takes the arguments of :class:`nnbridge.DDPNOpt` (``lr``, ``curvature``,
    ``feedback``, ``value_hessian``, ``tikhonov``, ``value_psd``, ``value_recursion``,
    ``terminal_hessian``, ``loss`` and the curvature's hyper-parameters) and any network
    :func:`nnbridge.graph.graph_stages` decomposes: residual blocks (identity and
    projection shortcuts), BatchNorm (its batch-coupled dynamics in the DDP pass,
    :mod:`nnbridge.batchnorm`), parallel branches merged by a sum or a concatenation.
    ``feedback=False`` is exactly the base optimizer.  ``alignment`` places the players
    off the main chain (:func:`nnbridge.graph.graph_stages`: ``"merge"``, the default, or
    ``"split"``, or per layer; ``docs/alignment.md``).

    The default terminal Hessian is the exact Gauss-Newton matrix ("ggn") in every value
    form: on the BatchNorm ResNet of ``docs/experiments_gtddp.md`` the sampled Fisher
    (DDPNOpt's "outer" default) made GT-DDP runs collapse (digits, 6 seeds: GT-DDP-Adam
    83.7 % with it, 95.9 % with "ggn"; the other curvatures alike).
    """

    default_terminal_hessian = "ggn"

    #: the stage graph's pull-backs take the value gradient with the directions (the
    #: carried form of DDPNOpt's chain is not wired through the graph's players)
    _carries_gradient = False

    def __init__(self, model: nn.Module, lr: float | None = None, *,
                 alignment: Alignment = "merge", **kwargs: Any):
        self.alignment = alignment
        super().__init__(model, lr, **kwargs)

    def _decompose(self, net: nn.Module):
        self._coop = CooperativeEKFAC()
        self._graph = graph_stages(net, self.alignment)
        players = self._graph.players
        order = {id(p): k for k, p in enumerate(players)}
        #: per stage, the index of each of its players in ``self._stages``
        self._ids = [[order[id(p)] for p in gs.players] for gs in self._graph.stages]
        self._nominal: list[list[torch.Tensor]] | None = None
        self._seen: dict = {}
        return self._graph.pre, players

    def _maps(self):
        return [(gs.index, m) for gs in self._graph.stages for top in gs.modules()
                for m in top.modules()]

    def _random_functions(self):
        return [(gs.index, what) for gs in self._graph.stages for what in gs.random_nodes()]

    def _ddp_context(self, rec):
        """The DDP pass's context (:class:`DDPNOpt`'s: BatchNorm batch-coupled, running
        statistics left alone); inside it, runs the stage graph once on the recorded
        :math:`x_0`: the nominal :math:`y_t` and the input each layer sees."""
        self._nominal = None
        if rec is None:
            return nullcontext()
        stack = ExitStack()
        stack.enter_context(super()._ddp_context(rec))
        seen: dict = {}
        graph = self._graph
        ys = [[rec.model_input if graph.raw_input else rec.calls[0][graph.first_call]]]
        try:
            with torch.no_grad():
                for gs, ids in zip(self._graph.stages, self._ids):
                    record: dict = {}
                    ys.append(gs.run(ys[-1], record=record))
                    for j, k in enumerate(ids):
                        seen[k] = record["x", j]
        except BaseException:
            stack.close()   # the modules as they were
            raise
        self._nominal, self._seen = ys, seen
        return stack

    def _verify_decomposition(self, rec) -> None:
        """Each step (the nominal pass on the stage graph runs anyway): every layer's
        input on the stage graph's forward pass is what the training loop's forward pass
        fed it, and so is the output."""
        want = [x for xs in rec.calls for x in xs] + [rec.output]
        got = [x for k in range(len(self._stages)) for x in self._seen[k]] + [
            self._nominal[-1][0]]
        owner = [k for k in range(len(self._stages)) for _ in self._seen[k]] + [None]
        if len(got) != len(want):
            raise UnsupportedModelError(
                f"model: the training loop's forward pass called the layers {len(want) - 1} "
                f"times, the stage graph {len(got) - 1}: the forward pass does something its "
                "torch.fx graph does not show (a loop or branch on a Python value)")
        # this runs every step: one host sync for all the pairs
        for k, a, b, wrong in zip(owner, got, want, mismatches(list(zip(got, want)))):
            if wrong:
                what = ("the output" if k is None else
                        f"the input of {type(self._stages[k].module).__name__} (stage "
                        f"{self._stages[k].index})")
                if rec.passes > 1 and normalizes_by_batch_in(self._bn_candidates()):
                    raise accumulated_batch_statistics(
                        f"model: {what} on the stage graph differs from the training "
                        "loop's forward pass", rec.passes)
                raise UnsupportedModelError(
                    f"model: {what} on the stage graph differs from the training loop's "
                    f"forward pass (shapes {tuple(a.shape)} and {tuple(b.shape)}): the "
                    f"forward pass does something its torch.fx graph does not show (a "
                    f"branch on self.training or a Python value), or a value it reads "
                    f"changed after the optimizer traced the model (torch.fx keeps a "
                    f"number read through another object -- self.cfg.T, a dict entry, a "
                    f"global -- as a constant; keep it in a registered buffer updated in "
                    f"place, or build the optimizer again after the change)")

    # ------------------------------------------------------------------ the step
    def _players(self, g, hps, ws, Xs, mean, active, exact, calls):
        """The curvature of one stage's players: ``(preconditioner, new states, open-loop
        updates)``, lists over the players (None: frozen).

        * ``"exact"``: the dense joint :math:`Q_{ww}` (``exact()`` forms it);
        * ``"ekfac"`` with two or more players that share their positions P, each called
          once (``calls``: per player, its calls in the stage): GT-DDP-EKFAC,
          Theorem 3's cooperative Kronecker factors (:class:`~nnbridge.cooperative.
          CooperativeEKFAC`; the joint state is kept under the first active player);
        * otherwise each player's own curvature (:math:`Q_{uv} = 0`, Table 1).
        """
        curv = self.curvature
        if isinstance(curv, Exact):
            pre = exact()
            return pre, [{} if a else None for a in active], [
                None if d is None else -d for d in pre.inverse(g)]
        if (isinstance(curv, EKFAC) and sum(active) > 1 and max(calls) == 1
                and can_cooperate(Xs, active)):
            j0 = active.index(True)
            hp, state, step = hps[j0]
            jst = self._coop.update(state, g, hp, step, ws, Xs, mean)
            pre = self._coop.preconditioner(jst, hp, step)
            states = [None if not a else jst if j == j0 else {}
                      for j, a in enumerate(active)]
            return pre, states, self._coop.open_loop(jst, g, hp, step, pre)
        states, pres, du = [], [], []
        for j, (hp, state, step) in enumerate(hps):
            if not active[j]:
                states.append(None)
                pres.append(None)
                du.append(None)
                continue
            w = None if ws is None else ws[j]
            cst = curv.update(state, g[j], hp, step, w, Xs[j], mean)
            pc = curv.preconditioner(cst, hp, step)
            states.append(cst)
            pres.append(pc)
            du.append(curv.open_loop(cst, g[j], hp, step, pc))
        return BlockDiagonal(pres), states, du

    def _open_loop_update(self, rec, group, frozen_, mean):
        """Without feedback: the base optimizer; for EKFAC, stages with several players
        use the cooperative Kronecker factors (GT-EKFAC, Corollary 7 without feedback)."""
        if not isinstance(self.curvature, EKFAC):
            return super()._open_loop_update(rec, group, frozen_, mean)
        controls: list = [None] * len(self._stages)
        states: list = [None] * len(self._stages)
        for gs, ids in zip(self._graph.stages, self._ids):
            active = [not frozen_[k] for k in ids]
            if not any(active):
                continue
            sts = [self._stages[k] for k in ids]
            hps = [self._hp(st, group) for st in sts]
            Us = [st.control() for st in sts]
            g = []
            for st, U, a, (hp, _, _) in zip(sts, Us, active, hps):
                gj = self._grad(st) if a else None
                if a and hp["weight_decay"]:
                    gj = gj + hp["weight_decay"] * U
                g.append(gj)
            Xs = [gs.unfold(j, rec.calls[k]) for j, k in enumerate(ids)]
            hgs = [rec.factor_gradient(k, st) if a else None
                   for st, k, a in zip(sts, ids, active)]
            ws = [st.factor_view(h * h.shape[0]) if a else None
                  for st, h, a in zip(sts, hgs, active)]
            _, new, du = self._players(g, hps, ws, Xs, mean, active, None, gs.calls)
            for j, k in enumerate(ids):
                if du[j] is not None:
                    controls[k], states[k] = Us[j] + du[j], new[j]
        return controls, states

    def _ddp_update(self, rec, group, frozen_, mean):
        graph, ys = self._graph, self._nominal
        T = len(graph.stages)
        curv = self.curvature
        value = self._terminal(rec, mean)
        steps: list[Any] = [None] * T
        lins: list[GraphLinearization] = [None] * T
        made: list[dict] = [None] * T
        for t in range(T - 1, -1, -1):
            gs, ids = graph.stages[t], self._ids[t]
            active = [not frozen_[k] for k in ids]
            # as DDPNOpt's: under the "mean" recursion the gradient the backward pass sent
            # is left out of Q_u and of l_u alike (GraphLinearization.value_gradient)
            fused = group["value_recursion"] == "mean"
            sent = [rec.h_grads[k] if fused and a else None for k, a in zip(ids, active)]
            lin = GraphLinearization(gs, ys[t], active, mean, sent if fused else None, [
                curv.adaptive_diagonal and gs.bias_before_batchnorm(j)
                for j in range(len(ids))])
            lins[t] = lin
            tik = group["tikhonov"] if t < T - 1 else 0.0
            hps = [self._hp(self._stages[k], group) for k in ids]
            lus = [self._running_cost_gradient(
                self._stages[k], lin.U[j],
                None if rec.h_grads[k] is None or sent[j] is not None
                else lin.control_gradient(j, rec.h_grads[k]),
                hps[j][0], mean) if active[j] else None for j, k in enumerate(ids)]
            info: dict = {}
            made[t] = info

            def make(Qu, val, lin=lin, hps=hps, lus=lus, tik=tik, info=info, active=active):
                if not any(active):
                    info.update(pre=BlockDiagonal([None] * len(active)), g=None)
                    return GraphResponse(info["pre"], lin, None)
                g = [None if q is None else q + lu for q, lu in zip(Qu, lus)]
                ws = None
                if curv.needs_factors:
                    ws = [None if w is None else w.squeeze(1)
                          for w in lin.factors(val.Vx.unsqueeze(1))]
                def players(hps):
                    return self._players(g, hps, ws, lin.X, mean, active,
                                         lambda: joint_exact(lin, val, tik, hps[0][0]),
                                         lin.stage.calls)
                pre, states, open_loop = players(hps)
                resp = GraphResponse(pre, lin, lus, qu=Qu)
                if curv.watches_feedback and self.param_groups[0]["value_psd"]:
                    # the step against the value's model, before the value uses P^-1
                    # (one gain for the stage's players, as the feedback's)
                    gain = open_loop_gain(-sum((gj * dj).sum() for gj, dj in zip(
                        g, open_loop) if dj is not None), resp.apply_total(Qu), val, mean,
                        tik)
                    again = [None if s is None else curv.overshot(h[1], s, gain)
                             for h, s in zip(hps, states)]
                    if any(a is not None for a in again):   # this step's update again
                        pre, states, open_loop = players([
                            h if a is None else (h[0], a, h[2]) for h, a in zip(hps, again)])
                        resp = GraphResponse(pre, lin, lus, qu=Qu)
                info.update(g=g, states=states, pre=pre, open_loop=open_loop)
                return resp

            steps[t] = self._riccati_step(value, lin, make, tikhonov=tik,
                                          project_psd=group["value_psd"],
                                          recursion=group["value_recursion"],
                                          propagate=t > 0, mean=mean)
            value = steps[t].value
        # additional forward pass: delta w_t = -P^{-1}(d_t + E_i[Q_wy^i dy^i])
        return self._graph_feedback_pass(ys, lins, made, steps, mean)

    def _graph_feedback_pass(self, ys, lins, made, steps, mean):
        T = len(self._graph.stages)
        controls: list = [None] * len(self._stages)
        states: list = [None] * len(self._stages)
        yhat = ys[0]
        for t in range(T):
            lin, info, ids = lins[t], made[t], self._ids[t]
            if info["g"] is None:          # every player frozen
                if t < T - 1:
                    yhat = lin.forward(yhat, [None] * len(ids))
                continue
            pre, du, kept = info["pre"], info["open_loop"], info["states"]
            if t > 0:
                dY = lin.flat(yhat) - lin.flat(ys[t])
                watch = self.curvature.watches_feedback and self.param_groups[0]["value_psd"]
                F, q = feedback_terms(steps[t], dY, watch)
                fb = pre.inverse(F)
                if watch:   # one gain for the stage's players (nnbridge.feedback)
                    fb, kept = watched(self.curvature, F, fb, q, mean, kept)
                du = [None if d is None else d - f for d, f in zip(du, fb)]
            new = [None if d is None else lin.U[j] + d for j, d in enumerate(du)]
            for j, k in enumerate(ids):
                controls[k] = new[j]
                if new[j] is not None:
                    states[k] = kept[j]
            if t < T - 1:
                yhat = lin.forward(yhat, new)
        return controls, states


class GTEKFAC(GTDDP, _ddpnopt.EKFAC):
    """GT-EKFAC (GT-DDP paper, Sec. 6, Corollary 7) as a standalone optimizer: EKFAC whose
    stages with several players (a projection shortcut, parallel branches) use the
    cooperative Kronecker factors of Theorem 3 (:mod:`nnbridge.cooperative`), without
    the DDP feedback; ``GTDDP(curvature="ekfac")`` adds it.  The arguments are
    :class:`nnbridge.EKFAC`'s (``lr``, ``eps``, ``alpha``, ``update_freq``,
    ``weight_decay``).
    """
