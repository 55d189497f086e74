"""Kept import path: the operator-form step lives in :mod:`trajopt.riccati.operator`, the
value representations in :mod:`trajopt.riccati.value`; this module re-exports them."""

from ..riccati import (  # noqa: F401
    ControlResponse,
    DenseOperatorStage,
    DenseResponse,
    DenseValue,
    OperatorStage,
    OperatorStep,
    RankOneValue,
    RankRValue,
    operator_riccati_step,
)
