r"""GT-DDP: DDP with residual spans and cooperative-game stages (GT-DDP paper, papers/001,
Sec. 3, App. A) over abstract dynamics.

:class:`GTDDPSolver` is :class:`~trajopt.ddp.solver.DDPSolver` on the span structure
(:class:`~trajopt.ddp.spans.SpanChain`, whose stages are the kernel's span-structured
expansion, :class:`~trajopt.riccati.spans.SpanStage`) with one narrow override: the gains
plug, :meth:`GTDDPSolver.policy`, which splits each stage's control among players
(:class:`~trajopt.riccati.policy.PlayerGains`, GT-DDP Eq. 40) and, under control limits,
solves the box QP of the players' joint curvature
(:class:`~trajopt.riccati.policy.BoxGains`).  :meth:`GTDDPSolver.player_curvature` may
replace a player's curvature block by an approximation (exact by default, in which case
the policy equals DDP on the concatenated control).

Everything else -- regularization, line search, convergence tests, per-element batches --
is the DDP loop's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import InvalidArgumentError
from ..riccati.policy import BoxGains, CholeskyGains, GainsPlug, PlayerGains
from .batch import Traj
from .limits import for_rows
from .solver import DDPSolver
from .spans import Span, SpanChain

__all__ = ["GTDDPSolver"]


class GTDDPSolver(DDPSolver):
    """iLQR with residual spans and cooperative players; see the module docstring.

    Parameters
    ----------
    dynamics, cost
        As for :class:`DDPSolver`; at a stage where spans with parameters merge, the
        cost sees the whole control (u and the shortcut parameters), the dynamics only u.
    spans : sequence of Span
    players : sequence of int or callable ``t -> sequence of int``, optional
        How the dynamics' control u of each stage is split among players (default: one
        player).  Shortcut parameters are always players of their own.
    **kwargs
        ``mode`` ("ilqr" only), ``max_iter``, ``tol``, ``regularization``,
        ``line_search``, ``control_limits``, ``callback`` as for :class:`DDPSolver`.
        With control limits and several players, the limits act on the whole control of
        each stage (every player's entries; ``lo``, ``hi`` of the stage's control size).
    """

    def __init__(self, dynamics, cost, *, spans: Sequence[Span] = (),
                 players: Sequence[int] | Callable[[int], Sequence[int]] | None = None,
                 **kwargs):
        if kwargs.get("mode", "ilqr") != "ilqr":
            raise InvalidArgumentError("spans and players support mode='ilqr' only (the "
                                       "second-order dynamics terms are not implemented)")
        if "structure" in kwargs:
            raise InvalidArgumentError("GTDDPSolver builds its own structure from spans")
        super().__init__(dynamics, cost, **kwargs)
        self.structure = SpanChain(self.dynamics, cost, spans, players)
        self.spans = self.structure.spans
        self.players = players

    def player_curvature(self, t: int, i: int, block: torch.Tensor) -> torch.Tensor | None:
        """Approximation of player ``i``'s curvature block ``block`` (B, m_i, m_i) at stage
        ``t``; None (default): the exact block.  Override for approximate players."""
        return None

    def policy(self, mu: torch.Tensor, traj: Traj, lo=None, hi=None,
               k_warm: list[torch.Tensor] | None = None) -> GainsPlug:
        """The players' gains: cooperative (Eq. 40), box-limited when ``lo`` is given."""
        sizes = self.structure.players()
        approx = None
        if type(self).player_curvature is not GTDDPSolver.player_curvature:
            approx = self.player_curvature
        if lo is not None:   # (T, B, m) limits: those of traj's rows
            return BoxGains(mu, *for_rows(lo, hi, traj.rows), traj.us, k_warm, sizes, approx)
        if approx is None and all(len(s) <= 1 for s in sizes):
            return CholeskyGains(mu)       # one player everywhere: plain DDP
        return PlayerGains(mu, sizes, approx)
