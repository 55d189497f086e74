"""The :class:`Problem` record shared by the classical problems."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ddp.models import Cost, Dynamics


@dataclass(frozen=True)
class Problem:
    """A trajectory-optimization problem: solve with
    ``trajopt.solve_ddp(p.dynamics, p.cost, p.x0, p.us0, control_limits=p.control_limits,
    constraints=p.constraints)``.

    Attributes
    ----------
    name : str
    dynamics : Dynamics
    cost : Cost
    x0 : (n,) default initial state
    T : int horizon
    dt : float sampling time [s]
    control_limits : (lo, hi) of shape (m,) or None (the built-in problems' form; a
        replaced one may take any form of ``solve_ddp``, e.g. (T, m) per stage)
    state_names, control_names : labels for plots
    parameters : dict of the physical parameters
    reference : str  where the parameters come from
    constraints : tuple of trajopt.Constraint (pass ``constraints=p.constraints``)
    """

    name: str
    dynamics: Dynamics
    cost: Cost
    x0: torch.Tensor
    T: int
    dt: float
    control_limits: tuple[torch.Tensor, torch.Tensor] | None
    state_names: tuple[str, ...]
    control_names: tuple[str, ...]
    parameters: dict = field(default_factory=dict)
    reference: str = ""
    constraints: tuple = ()

    @property
    def n(self) -> int:
        return self.x0.shape[-1]

    @property
    def m(self) -> int:
        return len(self.control_names)

    @property
    def us0(self) -> torch.Tensor:
        """Zero initial controls (T, m)."""
        return torch.zeros(self.T, self.m, dtype=self.x0.dtype)


def limits(bound: float, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    b = torch.full((m,), float(bound), dtype=torch.float64)
    return -b, b
