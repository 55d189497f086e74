"""DDP / iLQR over abstract, batched dynamics: a loop around the Riccati kernel of
:mod:`trajopt.riccati` (plain chains, residual spans, cooperative players, box limits)."""

from ..riccati.boxqp import BoxQPResult, box_qp
from .api import solve_ddp
from .augmented import AugmentedCost
from .chain import Chain
from .constrained import ConstrainedSolver
from .constraints import Constraint, ConstraintJacobians
from .gtddp import GTDDPSolver
from .linear import LinearDynamics
from .models import (
    Cost,
    CostDerivatives,
    Dynamics,
    DynamicsDerivatives,
    QuadraticCost,
    as_dynamics,
    discretize,
)
from .mpc import MPC, MPCRun
from .options import AugmentedLagrangian, DDPResult, IterationLog, LineSearch, Regularization
from .solver import DDPSolver
from .spans import Span, SpanChain

__all__ = [
    "Dynamics", "LinearDynamics", "Cost", "QuadraticCost", "DynamicsDerivatives", "CostDerivatives",
    "as_dynamics", "discretize", "box_qp", "BoxQPResult",
    "solve_ddp", "DDPSolver", "DDPResult", "IterationLog", "LineSearch", "Regularization",
    "GTDDPSolver", "Span", "Chain", "SpanChain", "MPC", "MPCRun",
    "Constraint", "ConstraintJacobians", "AugmentedLagrangian", "AugmentedCost",
    "ConstrainedSolver",
]
