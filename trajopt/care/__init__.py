"""The continuous algebraic Riccati equation: :func:`solve_care` (scipy's arguments,
batched; the matrix-sign-function iteration in torch, scipy's Schur method per element,
Newton refinement) and its :class:`CARESolution`."""

from .solve import CAREMethod, CARESolution, solve_care

__all__ = ["CARESolution", "solve_care", "CAREMethod"]
