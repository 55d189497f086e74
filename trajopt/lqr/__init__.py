"""Linear-quadratic regulators: finite horizon, infinite horizon, cyclic."""

from .cyclic import CyclicLQRSolution, solve_cyclic_lqr
from .finite import LQR, LQRSolution, Trajectory, rollout, solve_lqr
from .infinite import InfiniteLQRSolution, solve_infinite_lqr
from .riccati import CholeskySolver, QExpansion, RiccatiStep, expand_q, riccati_step

__all__ = [
    "LQR", "LQRSolution", "Trajectory", "solve_lqr", "rollout",
    "InfiniteLQRSolution", "solve_infinite_lqr",
    "CyclicLQRSolution", "solve_cyclic_lqr",
    "CholeskySolver", "QExpansion", "RiccatiStep", "expand_q", "riccati_step",
]
