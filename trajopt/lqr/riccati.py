"""Kept import path: the Riccati step lives in :mod:`trajopt.riccati` (the kernel package);
this module re-exports its dense-step names."""

from ..riccati import (  # noqa: F401
    CholeskySolver,
    PerElementCholesky,
    QExpansion,
    QuuSolver,
    RiccatiStep,
    cholesky_solve,
    expand_q,
    expand_q_joint,
    joint_blocks,
    riccati_step,
    riccati_step_joint,
    solve_policy,
    value_update,
)
