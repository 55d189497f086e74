"""Exceptions and warnings raised by :mod:`trajopt`.

Every exception subclasses :class:`TrajoptError` *and* the builtin a caller would
naturally catch (python-control's habit), so ``except ValueError`` keeps working for
code written against scipy.  Messages name the offending argument and its shape.
"""

from __future__ import annotations

__all__ = [
    "TrajoptError",
    "ShapeError",
    "NotSymmetricError",
    "NotPositiveDefiniteError",
    "NonFiniteError",
    "NotStabilizableError",
    "NumericalError",
    "SolverUnavailableError",
    "InvalidArgumentError",
    "UnsupportedModelError",
    "ConvergenceWarning",
    "SkippedStepWarning",
]


class TrajoptError(Exception):
    """Base class of every error raised by trajopt."""


class ShapeError(TrajoptError, ValueError):
    """An argument has a shape inconsistent with the others."""


class NotSymmetricError(TrajoptError, ValueError):
    """A matrix that must be symmetric (Q, R, Q_T, E'XE...) is not."""


class NotPositiveDefiniteError(TrajoptError, ValueError):
    """A matrix that must be positive definite (R + B'PB, Q_uu) is not.

    Attributes
    ----------
    stage : int or None
        The stage (time index) at which the failure happened, when there is one.
    """

    def __init__(self, message: str, stage: int | None = None):
        super().__init__(message)
        self.stage = stage


class NonFiniteError(TrajoptError, ValueError):
    """An input contains NaN or infinity."""


class NotStabilizableError(TrajoptError, ArithmeticError):
    """No stabilizing solution exists (for example an unstable, uncontrollable mode)."""


class NumericalError(TrajoptError, ArithmeticError):
    """A computation broke down numerically (a singular matrix, a non-finite result)."""


class SolverUnavailableError(TrajoptError, ImportError):
    """An optional back end (slycot) was requested but is not installed."""


class InvalidArgumentError(TrajoptError, ValueError):
    """An option or argument has an invalid value (not a shape problem)."""


class UnsupportedModelError(TrajoptError, TypeError):
    """A network cannot be decomposed into stages (nnbridge); the message names the
    module or graph node."""


class ConvergenceWarning(UserWarning):
    """An iterative method stopped before meeting its tolerance."""


class SkippedStepWarning(UserWarning):
    """An optimizer met a non-finite loss or update and skipped the step, leaving the
    parameters and its state untouched."""
