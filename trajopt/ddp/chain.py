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
from .stagewise import StageDerivatives, check_visible

__all__ = ["Chain", "Control"]

# control(t, xs) -> u_t, with xs = [x_0, ..., x_t] of the rollout so far
Control = Callable[[int, list[torch.Tensor]], torch.Tensor]


class Chain:
    """The plain chain: ``dynamics`` (a :class:`~trajopt.ddp.models.Dynamics`) and
    ``cost`` (a :class:`~trajopt.ddp.models.Cost`)."""

    def __init__(self, dynamics: Dynamics, cost: Cost):
        self.dynamics = dynamics
        self.cost = cost
        self._dynamics_derivatives = StageDerivatives(
            dynamics.derivatives, dynamics, time_invariant=dynamics.time_invariant,
            name="the dynamics")
        self._cost_derivatives = StageDerivatives(
            cost.derivatives, cost.running, time_invariant=cost.time_invariant,
            name="the running cost")
        self._terminal_checked = False

    def setup(self, us: Sequence[torch.Tensor]) -> None:
        """Check the controls ``us`` (T tensors (B, m_t)) against the structure; called
        once per solve before anything is simulated."""

    def players(self) -> list[list[int]] | None:
        """Control sizes of the players at each stage (None: one player everywhere)."""
        return None

    def simulate(self, x0: torch.Tensor, T: int, control: Control,
                 rows: torch.Tensor | None = None) -> Traj:
        """Roll out ``T`` stages from ``x0`` (B, n) with ``u_t = control(t, xs)``; ``rows``
        (B,) are the flat-batch elements of the rows (see :class:`~trajopt.ddp.batch.Traj`;
        None: all elements in order), bound to the cost before it is evaluated."""
        self.cost.bind_rows(rows)
        xs, us = [x0], []
        x = x0
        for t in range(T):
            u = control(t, xs)
            x = self.transition(t, x, u, xs)
            xs.append(x)
            us.append(u)
        # the running cost of all stages at once, after the states are known
        # (StageDerivatives.total: one call where the cost allows)
        running = self._cost_derivatives.total(list(zip(xs[:-1], us))) if T else 0.0
        return Traj(xs, us, running + self.cost.terminal(x), rows)

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
        gradient / Hessian, evaluated over all stages at once where the model allows
        (:class:`~trajopt.ddp.stagewise.StageDerivatives`)."""
        self.cost.bind_rows(traj.rows)
        B = traj.cost.shape[0]
        args = list(zip(traj.xs[:-1], traj.us))
        fd, fds = self._dynamics_derivatives(args, second_order=second_order)
        cd, cds = self._cost_derivatives(args)
        if fd is not None and cd is not None:  # pack all stages with one joint_blocks
            F, L = joint_blocks(fd.fx, fd.fu, cd.lx, cd.lu, cd.lxx, cd.luu, cd.lux)
            n, T = traj.xs[0].shape[-1], len(args)

            def per_stage(v):  # T views in one op
                return [None] * T if v is None else v.reshape(T, B, *v.shape[1:]).unbind(0)

            stages = [DenseStage(*blocks[:2], n, None, *blocks[2:]) for blocks in zip(
                *(per_stage(v) for v in (F, L, fd.fxx, fd.fux, fd.fuu)))]
        else:
            stages = []
            for (x, _), f, c in zip(args, fds, cds):
                F, L = joint_blocks(f.fx, f.fu, c.lx, c.lu, c.lxx, c.luu, c.lux)
                stages.append(DenseStage(F, L, x.shape[-1], None, f.fxx, f.fux, f.fuu))
        return (stages, *self.terminal_derivatives(traj.xs[-1]))

    def terminal_derivatives(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient and Hessian of the terminal cost at ``x`` (B, n); checked once for
        derivatives hidden from torch.func (:func:`~trajopt.ddp.stagewise.check_visible`)."""
        Vx, Vxx = self.cost.terminal_derivatives(x)
        if not self._terminal_checked:
            self._terminal_checked = True
            check_visible(self.cost.terminal, (x,), (Vx, Vxx), "the terminal cost")
        return Vx, Vxx
