r"""State, path and terminal constraints of a DDP problem.

A :class:`Constraint` is a batched function :math:`c` whose value must satisfy
:math:`c \le 0` (``kind="inequality"``) or :math:`c = 0` (``kind="equality"``),
componentwise:

* ``where="running"``: :math:`c_t(x_t, u_t)` at the stages :math:`t = 0, \dots, T-1`
  (``fn(x, u, t)``, ``fn(x, u)`` or ``fn(x)``; a state-only constraint that must also
  hold at :math:`x_T` needs a terminal constraint too: the running ones never see it);
* ``where="terminal"``: :math:`c_T(x_T)` (``fn(x)``).

``solve_ddp(..., constraints=[...])`` meets them by the augmented-Lagrangian loop of
:mod:`trajopt.ddp.augmented`; this module evaluates them and their Jacobians (from
:mod:`torch.func`, all stages in one call like the dynamics and costs).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch.func import jacfwd, vmap

from .._checks import shape_str
from ..errors import InvalidArgumentError, ShapeError

__all__ = ["Constraint", "ConstraintJacobians"]


@dataclass(frozen=True)
class ConstraintJacobians:
    """Value and Jacobians of a constraint on N points: c (N, p), cx (N, p, n),
    cu (N, p, m) (None for a terminal constraint)."""

    c: torch.Tensor
    cx: torch.Tensor
    cu: torch.Tensor | None


class Constraint:
    r"""A constraint :math:`c \le 0` or :math:`c = 0` on the trajectory of a DDP problem.

    Parameters
    ----------
    fn : callable
        Batched constraint function returning (..., p) (or (...) for p = 1).
        ``where="running"``: ``fn(x, u, t)``, ``fn(x, u)`` or ``fn(x)`` with ``x``
        (..., n) and ``u`` (..., m) the state and control of stage ``t``;
        ``where="terminal"``: ``fn(x)`` of the final state (..., n).  Written like the
        dynamics: torch ops, branches by ``torch.where`` (derivatives from torch.func).
    kind : {"inequality", "equality"}
        ``fn <= 0`` or ``fn == 0``, componentwise.
    where : {"running", "terminal"}
        At every stage ``t < T`` or at ``x_T`` only.
    name : str, optional
        How results and errors name it (default ``"constraints[i]"`` by position).

    Examples
    --------
    A track limit :math:`|x_0| \le 1` at every stage and a terminal equality:

    >>> track = Constraint(lambda x: torch.stack([x[..., 0] - 1, -x[..., 0] - 1], -1))
    >>> x_goal = torch.tensor([0.0, 3.14159])
    >>> goal = Constraint(lambda x: x - x_goal, kind="equality", where="terminal")
    """

    def __init__(self, fn: Callable, kind: Literal["inequality", "equality"] = "inequality",
                 where: Literal["running", "terminal"] = "running", *, name: str | None = None):
        if not callable(fn):
            raise InvalidArgumentError(f"fn must be a callable; got {type(fn).__name__}")
        if kind not in ("inequality", "equality"):
            raise InvalidArgumentError(f"kind must be 'inequality' or 'equality'; got "
                                       f"{kind!r}")
        if where not in ("running", "terminal"):
            raise InvalidArgumentError(f"where must be 'running' or 'terminal'; got "
                                       f"{where!r}")
        arity = _positional_arity(fn)
        if where == "terminal" and arity is not None and arity != 1:
            raise InvalidArgumentError(f"a terminal constraint is fn(x) of the final state; "
                                       f"got a function of {arity} arguments")
        self.fn, self.kind, self.where, self.name = fn, kind, where, name
        # how many of (x, u, t) fn takes: 1 (state only), 2 (time invariant) or 3
        self.arity = 1 if where == "terminal" else min(arity or 3, 3)
        self.time_invariant = self.arity < 3

    @property
    def equality(self) -> bool:
        return self.kind == "equality"

    def __repr__(self) -> str:
        return (f"Constraint({getattr(self.fn, '__name__', 'fn')}, kind={self.kind!r}, "
                f"where={self.where!r}" + (f", name={self.name!r}" if self.name else "")
                + ")")

    def __call__(self, x: torch.Tensor, u: torch.Tensor | None = None, t=0) -> torch.Tensor:
        """The value (N, p) at ``x`` (N, n) (and ``u`` (N, m), stage ``t``)."""
        if self.arity == 1:
            c = self.fn(x)
        elif self.arity == 2:
            c = self.fn(x, u)
        else:
            c = self.fn(x, u, t)
        if not torch.is_tensor(c):
            raise ShapeError(f"{self.label} must return a tensor; got {type(c).__name__}")
        c = c.unsqueeze(-1) if c.ndim == x.ndim - 1 else c
        if c.dtype != x.dtype:  # a float32 constant in a float64 problem
            c = c.to(x.dtype)
        if c.shape[:-1] != x.shape[:-1]:
            raise ShapeError(f"{self.label} must return shape (..., p) or (...,) for states "
                             f"of shape {shape_str(x)}; got {shape_str(c)}")
        return c

    @property
    def label(self) -> str:
        return f"the constraint {self.name}" if self.name else "a constraint"

    def jacobians(self, x: torch.Tensor, u: torch.Tensor | None = None,
                  t: int | torch.Tensor = 0) -> ConstraintJacobians:
        """Value and Jacobians at ``x`` (N, n), ``u`` (N, m) of stage ``t`` (an int, or a
        (N,) tensor of stages: one vectorized call over all stages)."""
        if self.where == "terminal":
            J, c = vmap(jacfwd(_with_value(lambda xi: self(xi)), has_aux=True))(x)
            return ConstraintJacobians(c.to(x.dtype), J.to(x.dtype), None)
        if torch.is_tensor(t) and not self.time_invariant:
            fn, args = (lambda xi, ui, ti: self(xi, ui, ti)), (x, u, t)
        else:
            fn, args = (lambda xi, ui: self(xi, ui, t)), (x, u)
        (Jx, Ju), c = vmap(jacfwd(_with_value(fn), argnums=(0, 1), has_aux=True))(*args)
        return ConstraintJacobians(c.to(x.dtype), Jx.to(x.dtype), Ju.to(x.dtype))


def _with_value(fn: Callable) -> Callable:
    def both(*args):
        c = fn(*args)
        return c, c
    return both


def _positional_arity(fn: Callable) -> int | None:
    """The number of positional parameters of ``fn`` (None: unknown or *args)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params):
        return None
    return sum(p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                          inspect.Parameter.POSITIONAL_OR_KEYWORD) and
               p.default is inspect.Parameter.empty for p in params) or None
