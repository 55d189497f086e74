"""Bad input: the exact error type and message for each case."""

import re

import numpy as np
import pytest

import trajopt
from trajopt.errors import (
    InvalidArgumentError,
    NonFiniteError,
    NotPositiveDefiniteError,
    NotSymmetricError,
    ShapeError,
    TrajoptError,
)

I2, I1 = np.eye(2), np.eye(1)
B21 = np.ones((2, 1))
NANQ = np.array([[1.0, np.nan], [np.nan, 1.0]])
ASYM = np.array([[1.0, 2.0], [0.0, 1.0]])

DARE_CASES = [
    (dict(A=np.ones((2, 3)), B=B21, Q=I2, R=I1), ShapeError, "A must be square; got shape (2, 3)"),
    (dict(A=I2, B=np.ones((3, 1)), Q=I2, R=I1), ShapeError,
     "B must have shape (..., 2, 1); got (3, 1)"),
    (dict(A=I2, B=B21, Q=np.eye(3), R=I1), ShapeError,
     "Q must have shape (..., 2, 2); got (3, 3)"),
    (dict(A=I2, B=B21, Q=I2, R=np.eye(2)), ShapeError,
     "R must have shape (..., 1, 1); got (2, 2)"),
    (dict(A=I2, B=B21, Q=I2, R=I1, S=np.ones((2, 2))), ShapeError,
     "S must have shape (..., 2, 1); got (2, 2)"),
    (dict(A=np.ones(2), B=B21, Q=I2, R=I1), ShapeError,
     "A must be a matrix (..., r, c); got shape (2)"),
    (dict(A=np.zeros((3, 2, 2)), B=np.zeros((4, 2, 1)), Q=I2, R=I1), ShapeError,
     "batch dimensions do not broadcast: A batch (3,), B batch (4,)"),
    (dict(A=I2, B=B21, Q=NANQ, R=I1), NonFiniteError,
     "Q contains NaN or infinity (shape (2, 2))"),
    (dict(A=np.full((2, 2), np.inf), B=B21, Q=I2, R=I1), NonFiniteError,
     "A contains NaN or infinity"),
    (dict(A=I2, B=B21, Q=ASYM, R=I1), NotSymmetricError, "Q must be symmetric"),
    (dict(A=I2 * 1j, B=B21, Q=I2, R=I1), InvalidArgumentError, "A is complex"),
]


@pytest.mark.parametrize("kwargs, err, msg", DARE_CASES)
def test_solve_dare_bad_input(kwargs, err, msg):
    with pytest.raises(err, match=re.escape(msg)):
        trajopt.solve_dare(**kwargs)


def test_bad_method():
    with pytest.raises(ValueError, match="method must be one of"):
        trajopt.solve_dare(I2, B21, I2, I1, method="qz")
    with pytest.raises(ValueError, match="method must be one of"):
        trajopt.solve_cyclic_lqr([I2], [B21], [I2], [I1], method="schur")


def _lqr(**over):
    base = dict(A=[I2, I2], B=[B21, B21], Q=[I2, I2], R=[I1, I1], QT=I2)
    base.update(over)
    return base


LQR_CASES = [
    (_lqr(B=[B21]), ShapeError, "B has 1 stages but A has 2"),
    (_lqr(A=[np.ones((3, 2)), I2]), ShapeError,
     "A[0] maps to a state of size 3 but A[1] expects 2"),
    (_lqr(Q=[I2, np.eye(3)]), ShapeError, "Q[1] must have shape (..., 2, 2); got (3, 3)"),
    (_lqr(q=[np.ones(2), np.ones(3)]), ShapeError, "q[1] must have shape (..., 2); got (3)"),
    (_lqr(R=[I1, np.array([[np.nan]])]), NonFiniteError, "R[1] contains NaN or infinity"),
    (_lqr(QT=ASYM), NotSymmetricError, "QT must be symmetric"),
    (_lqr(QT=None), ShapeError, "QT (terminal Hessian) is required"),
    (_lqr(A=np.zeros((2, 2))), ShapeError,
     "A must be a sequence of T matrices or a stacked array (..., T, n, n); got shape (2, 2)"),
    (dict(A=np.zeros((3, 2, 2)), B=np.zeros((2, 2, 1)), Q=np.zeros((3, 2, 2)),
          R=np.zeros((3, 1, 1)), QT=I2), ShapeError,
     "B must be stacked as (..., T, r, c) with T = 3"),
]


@pytest.mark.parametrize("kwargs, err, msg", LQR_CASES)
def test_lqr_bad_problem(kwargs, err, msg):
    with pytest.raises(err, match=re.escape(msg)):
        trajopt.LQR(**kwargs)


def test_lqr_bad_x0_and_indefinite():
    prob = trajopt.LQR(**_lqr())
    with pytest.raises(ShapeError, match=re.escape("x0 must have shape (..., 2); got (3)")):
        trajopt.solve_lqr(prob, np.ones(3))
    with pytest.raises(NonFiniteError, match="x0 contains NaN"):
        trajopt.solve_lqr(prob, np.array([np.nan, 0.0]))
    bad = trajopt.LQR(**_lqr(R=[I1, -10 * I1]))
    with pytest.raises(NotPositiveDefiniteError, match="at stage 1 is not positive definite"):
        trajopt.solve_lqr(bad)


def test_errors_subclass_builtins():
    assert issubclass(ShapeError, ValueError) and issubclass(ShapeError, TrajoptError)
    assert issubclass(trajopt.errors.NotStabilizableError, ArithmeticError)
    with pytest.raises(ValueError):
        trajopt.solve_dare(np.ones((2, 3)), B21, I2, I1)
