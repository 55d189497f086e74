"""DDP / iLQR over abstract, batched dynamics."""

from .boxqp import BoxQPResult, box_qp
from .gtddp import GTDDPSolver, Span
from .models import (
    Cost,
    CostDerivatives,
    Dynamics,
    DynamicsDerivatives,
    QuadraticCost,
    as_dynamics,
    discretize,
)
from .solver import DDPResult, DDPSolver, IterationLog, LineSearch, Regularization, solve_ddp

__all__ = [
    "Dynamics", "Cost", "QuadraticCost", "DynamicsDerivatives", "CostDerivatives",
    "as_dynamics", "discretize", "box_qp", "BoxQPResult",
    "solve_ddp", "DDPSolver", "DDPResult", "IterationLog", "LineSearch", "Regularization",
    "GTDDPSolver", "Span",
]
