r"""Constraints by an augmented-Lagrangian loop around the DDP solver.

:class:`AugmentedCost` is the user's cost plus, per constraint component, the
Powell-Hestenes-Rockafellar term (multiplier :math:`\lambda`, penalty :math:`\rho`):

.. math::

    \text{equality: } \lambda c + \tfrac{\rho}{2} c^2, \qquad
    \text{inequality: } \tfrac{1}{2\rho}\left(\max(0, \lambda + \rho c)^2 - \lambda^2\right),

whose gradients are :math:`s\, c_x`, :math:`s\, c_u` with :math:`s = \lambda + \rho c`
(inequalities: :math:`\max(0, \cdot)`) and whose Hessians are taken Gauss-Newton,
:math:`\rho\, c_x^\top c_x` over the components with :math:`s > 0` (ALTRO's choice:
positive semidefinite, exact at the fixed point, which the constraint curvature does not
move).  :class:`~trajopt.ddp.constrained.ConstrainedSolver` runs the outer loop of
:class:`~trajopt.ddp.options.AugmentedLagrangian`: the inner solver (plain, box-limited,
residual spans, players) is unchanged; it only sees this cost.

The multipliers belong to batch elements; the DDP loop tells the cost which element each
row of a batch is (:meth:`trajopt.Cost.bind_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import InvalidArgumentError
from .constraints import Constraint
from .models import Cost, CostDerivatives

__all__ = ["AugmentedCost", "check_constraints"]


def check_constraints(constraints: Sequence[Any]) -> list[Constraint]:
    """The constraints as a list, each a :class:`Constraint` (named by position)."""
    if isinstance(constraints, Constraint):
        constraints = [constraints]
    if not isinstance(constraints, (list, tuple)):
        raise InvalidArgumentError(f"constraints must be a sequence of trajopt.Constraint; "
                                   f"got {type(constraints).__name__}")
    out = []
    for i, c in enumerate(constraints):
        if not isinstance(c, Constraint):
            raise InvalidArgumentError(f"constraints[{i}] must be a trajopt.Constraint; got "
                                       f"{type(c).__name__}")
        if c.name is None:
            c = Constraint(c.fn, c.kind, c.where, name=f"constraints[{i}]")
        out.append(c)
    return out


def _penalty_terms(c: torch.Tensor, lam: torch.Tensor, rho: torch.Tensor, equality: bool):
    """Value (N,), gradient weight s (N, p) and Gauss-Newton weight w (N, p) of the
    augmented terms of components ``c`` (N, p), multipliers ``lam`` (N, p), penalties
    ``rho`` (N, 1)."""
    if equality:
        s = lam + rho * c
        return (lam * c).sum(-1) + 0.5 * rho[:, 0] * (c * c).sum(-1), s, rho.expand_as(c)
    s = torch.clamp(lam + rho * c, min=0)
    value = (s * s - lam * lam).sum(-1) / (2 * rho[:, 0])
    return value, s, rho * (s > 0).to(c.dtype)


class AugmentedCost(Cost):
    """``base`` plus the augmented-Lagrangian terms of ``constraints`` with the
    multipliers and penalties set by :meth:`reset` / :meth:`select`.

    Parameters
    ----------
    base : Cost
    constraints : sequence of Constraint
    """

    def __init__(self, base: Cost, constraints: Sequence[Constraint]):
        self.base = base
        self.running_constraints = [c for c in constraints if c.where == "running"]
        self.terminal_constraints = [c for c in constraints if c.where == "terminal"]
        self.constraints = list(constraints)
        super().__init__(time_invariant=base.time_invariant and not self.running_constraints)
        self.time_invariance_inferred = self.time_invariant and base.time_invariance_inferred
        self.lam: list[torch.Tensor] = []  # running: (T, B, p); terminal: (B, p)
        self._running_pairs: list = []
        self._terminal_pairs: list = []
        self.rho: torch.Tensor | None = None  # (B,)
        self.outer: torch.Tensor | None = None  # the elements of the inner solve's batch
        self.elements: torch.Tensor | None = None  # the element of each bound row

    # ------------------------------------------------------------------ state

    def found_time_varying(self) -> None:
        """The base cost's inferred time invariance failed its check: this cost's too."""
        super().found_time_varying()
        self.base.found_time_varying()

    def reset(self, lam: list[torch.Tensor], rho: torch.Tensor) -> None:
        """Multipliers (one per constraint, in order) and penalties (B,) of the flat
        batch."""
        self.lam, self.rho = lam, rho
        # (constraint, multipliers) by kind, formed once per solve, not per stage
        pairs = list(zip(self.constraints, lam))
        self._running_pairs = [(c, m) for c, m in pairs if c.where == "running"]
        self._terminal_pairs = [(c, m) for c, m in pairs if c.where == "terminal"]
        self.select(None)

    def select(self, outer: torch.Tensor | None) -> None:
        """The elements ``outer`` (B',) of the flat batch that the next solve works on."""
        self.outer = outer
        self.bind_rows(None)

    def bind_rows(self, rows: torch.Tensor | None) -> None:
        if rows is None:
            self.elements = self.outer
        else:
            self.elements = rows if self.outer is None else self.outer[rows]
        self.base.bind_rows(self.elements)

    def _rows(self, N: int, device) -> torch.Tensor:
        """The element of each of N rows (stage-major stacks repeat the batch)."""
        if self.elements is None:
            B = self.rho.shape[0]
            return torch.arange(N, device=device) % B
        e = self.elements
        return e if e.shape[0] == N else e.repeat(N // e.shape[0])

    def _stage_lam(self, lam: torch.Tensor, t, rows: torch.Tensor) -> torch.Tensor:
        if torch.is_tensor(t):
            return lam[t.to(lam.device), rows]
        return lam[t, rows]

    # ------------------------------------------------------------------ values
    def running(self, x, u, t):
        J = self.base.running(x, u, t)
        if not self.running_constraints:
            return J
        rows = self._rows(x.shape[0], x.device)
        rho = self.rho[rows].unsqueeze(-1)
        for con, lam in self._running_pairs:
            value, _, _ = _penalty_terms(con(x, u, t), self._stage_lam(lam, t, rows), rho,
                                         con.equality)
            J = J + value
        return J

    def terminal(self, x):
        J = self.base.terminal(x)
        if not self.terminal_constraints:
            return J
        rows = self._rows(x.shape[0], x.device)
        rho = self.rho[rows].unsqueeze(-1)
        for con, lam in self._terminal_pairs:
            J = J + _penalty_terms(con(x), lam[rows], rho, con.equality)[0]
        return J

    # ------------------------------------------------------------------ derivatives
    def derivatives(self, x, u, t):
        d = self.base.derivatives(x, u, t)
        if not self.running_constraints:
            return d
        rows = self._rows(x.shape[0], x.device)
        rho = self.rho[rows].unsqueeze(-1)
        lx, lu, lxx, luu, lux = d.lx, d.lu, d.lxx, d.luu, d.lux
        for con, lam in self._running_pairs:
            J = con.jacobians(x, u, t)
            _, s, w = _penalty_terms(J.c, self._stage_lam(lam, t, rows), rho, con.equality)
            wx, wu = w.unsqueeze(-1) * J.cx, w.unsqueeze(-1) * J.cu
            lx = lx + (s.unsqueeze(-2) @ J.cx).squeeze(-2)
            lu = lu + (s.unsqueeze(-2) @ J.cu).squeeze(-2)
            lxx = lxx + J.cx.mT @ wx
            luu = luu + J.cu.mT @ wu
            lux = lux + J.cu.mT @ wx
        return CostDerivatives(lx=lx, lu=lu, lxx=lxx, luu=luu, lux=lux)

    def terminal_derivatives(self, x):
        g, H = self.base.terminal_derivatives(x)
        if not self.terminal_constraints:
            return g, H
        rows = self._rows(x.shape[0], x.device)
        rho = self.rho[rows].unsqueeze(-1)
        for con, lam in self._terminal_pairs:
            J = con.jacobians(x)
            _, s, w = _penalty_terms(J.c, lam[rows], rho, con.equality)
            g = g + (s.unsqueeze(-2) @ J.cx).squeeze(-2)
            H = H + J.cx.mT @ (w.unsqueeze(-1) * J.cx)
        return g, H
