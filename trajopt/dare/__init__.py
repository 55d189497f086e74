"""Discrete algebraic Riccati equation solvers (scipy, slycot, batched doubling)."""

from .solve import DAREMethod, DARESolution, solve_dare

__all__ = ["DARESolution", "DAREMethod", "solve_dare"]
