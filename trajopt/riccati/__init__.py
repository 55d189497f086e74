r"""The Riccati kernel: one backward step (Q-expansion -> policy -> value update) and its
three plugs, called by every solver and optimizer (``docs/architecture.md``).

* plug 1, derivatives (expansion): dense :class:`DenseStage` /
  :func:`expand_q_joint`; span-structured :class:`SpanStage`; operators
  :class:`OperatorStage` (network layers);
* plug 2, the value Hessian: dense (:func:`value_update`, :class:`DenseValue`);
  per-sample rank one :class:`RankOneValue`; rank r :class:`RankRValue`;
* plug 3, the Q_uu solve / policy: :class:`CholeskySolver`, :class:`PerElementCholesky`,
  ``trajopt.steepest.NeumannSolver`` (any :class:`QuuSolver`); DDP gains
  :class:`CholeskyGains`, :class:`BoxGains`, :class:`PlayerGains`; a preconditioner's
  :class:`ControlResponse` (network curvatures).
"""

from .boxqp import BoxQPResult, box_qp
from .expansion import DenseStage, QExpansion, expand_q, expand_q_joint, joint_blocks
from .joint import (
    JointResponse,
    JointStage,
    JointStep,
    joint_riccati_step,
    joint_value,
    sample_blocks,
)
from .operator import (
    ControlResponse,
    DenseOperatorStage,
    DenseResponse,
    OperatorStage,
    OperatorStep,
    StateFeedback,
    operator_riccati_step,
)
from .players import CooperativePolicy, cooperative_policy, joint_curvature
from .policy import BoxGains, CholeskyGains, Gains, GainsPlug, PlayerGains
from .pushthrough import push_through_control, surrogate_control
from .solvers import (
    CholeskySolver,
    PerElementCholesky,
    QuuSolver,
    cholesky_factor,
    cholesky_solve,
    solve_policy,
)
from .spans import SpanStage
from .step import (
    RiccatiStep,
    riccati_step,
    riccati_step_joint,
    total_expected_change,
    value_update,
)
from .value import Carried, DenseValue, RankOneValue, RankRValue, Value

__all__ = [
    "QExpansion", "joint_blocks", "expand_q_joint", "expand_q", "DenseStage", "SpanStage",
    "OperatorStage", "ControlResponse", "OperatorStep", "StateFeedback", "operator_riccati_step",
    "DenseOperatorStage", "DenseResponse",
    "JointStage", "JointResponse", "JointStep", "joint_riccati_step", "joint_value",
    "sample_blocks",
    "Carried", "DenseValue", "RankOneValue", "RankRValue", "Value",
    "QuuSolver", "CholeskySolver", "PerElementCholesky", "cholesky_solve",
    "cholesky_factor", "solve_policy",
    "Gains", "GainsPlug", "CholeskyGains", "PlayerGains", "BoxGains",
    "CooperativePolicy", "cooperative_policy", "joint_curvature", "box_qp", "BoxQPResult",
    "RiccatiStep", "value_update", "total_expected_change", "riccati_step", "riccati_step_joint",
    "surrogate_control", "push_through_control",
]
