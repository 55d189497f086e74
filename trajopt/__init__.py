"""trajopt: trajectory optimization (LQR, DARE, DDP) over abstract, batched dynamics.

numpy in -> numpy out, torch in -> torch out; see ``docs/notation.md`` for conventions.
"""

from . import compat, errors
from .care import CARESolution, solve_care
from .dare import DARESolution, solve_dare
from .ddp import (
    MPC,
    AugmentedLagrangian,
    Constraint,
    Cost,
    DDPResult,
    DDPSolver,
    Dynamics,
    GTDDPSolver,
    LinearDynamics,
    LineSearch,
    MPCRun,
    QuadraticCost,
    Regularization,
    Span,
    discretize,
    solve_ddp,
)
from .lqr import (
    LQR,
    CyclicLQRSolution,
    InfiniteLQRSolution,
    LQRSolution,
    Trajectory,
    rollout,
    solve_cyclic_lqr,
    solve_infinite_lqr,
    solve_lqr,
)
from .lqr.zoh import c2d

__version__ = "0.1.0"

__all__ = [
    "errors", "compat", "c2d",
    "LQR", "LQRSolution", "Trajectory", "solve_lqr", "rollout",
    "DARESolution", "solve_dare",
    "CARESolution", "solve_care",
    "InfiniteLQRSolution", "solve_infinite_lqr",
    "CyclicLQRSolution", "solve_cyclic_lqr",
    "Dynamics", "LinearDynamics", "Cost", "QuadraticCost", "discretize",
    "solve_ddp", "DDPSolver", "DDPResult", "Regularization", "LineSearch",
    "Span", "GTDDPSolver", "MPC", "MPCRun", "Constraint", "AugmentedLagrangian",
]
