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

import torch

from ..riccati.expansion import DenseStage, joint_blocks
from .batch import Traj
from .models import Cost, Dynamics

__all__ = ["Chain", "Control"]

# control(t, xs) -> u_t, with xs = [x_0, ..., x_t] of the rollout so far
Control = Callable[[int, list[torch.Tensor]], torch.Tensor]


class Chain:
    """The plain chain: ``dynamics`` (a :class:`~trajopt.ddp.models.Dynamics`) and
    ``cost`` (a :class:`~trajopt.ddp.models.Cost`)."""

    def __init__(self, dynamics: Dynamics, cost: Cost):
        self.dynamics = dynamics
        self.cost = cost

    def setup(self, us: Sequence[torch.Tensor]) -> None:
        """Check the controls ``us`` (T tensors (B, m_t)) against the structure; called
        once per solve before anything is simulated."""

    def players(self) -> list[list[int]] | None:
        """Control sizes of the players at each stage (None: one player everywhere)."""
        return None

    def simulate(self, x0: torch.Tensor, T: int, control: Control) -> Traj:
        """Roll out ``T`` stages from ``x0`` (B, n) with ``u_t = control(t, xs)``."""
        xs, us = [x0], []
        x = x0
        cost = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for t in range(T):
            u = control(t, xs)
            cost = cost + self.cost.running(x, u, t)
            x = self.transition(t, x, u, xs)
            xs.append(x)
            us.append(u)
        return Traj(xs, us, cost + self.cost.terminal(x))

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
        """Packed stage derivatives on the flat batch of ``traj`` and the terminal
        gradient / Hessian.  One vectorized call for all stages when the dynamics and the
        cost are time invariant and the shapes uniform; one per stage otherwise."""
        T = len(traj.us)
        B = traj.cost.shape[0]
        xs, us = traj.xs[:-1], traj.us
        uniform = all(x.shape == xs[0].shape for x in xs) and all(
            u.shape == us[0].shape for u in us)
        stages: list[DenseStage] = []
        if uniform and self.dynamics.time_invariant and self.cost.time_invariant:
            X = torch.stack(xs, 1).reshape(B * T, -1)
            U = torch.stack(us, 1).reshape(B * T, -1)
            fd = self.dynamics.derivatives(X, U, 0, second_order=second_order)
            cd = self.cost.derivatives(X, U, 0)
            F, L = joint_blocks(fd.fx, fd.fu, cd.lx, cd.lu, cd.lxx, cd.luu, cd.lux)
            F = F.reshape(B, T, *F.shape[1:]).transpose(0, 1)
            L = L.reshape(B, T, *L.shape[1:]).transpose(0, 1)
            sec = [None] * 3
            if second_order:
                sec = [v.reshape(B, T, *v.shape[1:]).transpose(0, 1) for v in
                       (fd.fxx, fd.fux, fd.fuu)]
            n = xs[0].shape[-1]
            for t in range(T):
                stages.append(DenseStage(F[t], L[t], n, None,
                                         *(None if s is None else s[t] for s in sec)))
        else:
            for t in range(T):
                fd = self.dynamics.derivatives(xs[t], us[t], t, second_order=second_order)
                cd = self.cost.derivatives(xs[t], us[t], t)
                F, L = joint_blocks(fd.fx, fd.fu, cd.lx, cd.lu, cd.lxx, cd.luu, cd.lux)
                stages.append(DenseStage(F, L, xs[t].shape[-1], None, fd.fxx, fd.fux,
                                         fd.fuu))
        Vx, Vxx = self.cost.terminal_derivatives(traj.xs[-1])
        return stages, Vx, Vxx
