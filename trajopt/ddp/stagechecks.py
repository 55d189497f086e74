"""Checks of the stage derivatives a DDP solve computes (:mod:`trajopt.ddp.stagewise`,
:class:`~trajopt.ddp.chain.Chain`): their shapes -- one value per point for a cost, a
vector per point for the dynamics, with the way out for data held per batch element
(:data:`STACKED_ROWS`) -- and that they are finite (:func:`check_finite_derivatives`: a
NaN Jacobian is not a "not positive definite" Q_uu)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch

from .._linalg import finite_rows
from ..errors import NonFiniteError, ShapeError
from .reverse import all_finite

__all__ = ["STACKED_ROWS", "check_finite_derivatives", "check_terminal_derivatives",
           "check_jacobian_shapes"]

#: how the solver calls a model, and the route for data per batch element
STACKED_ROWS = (
    "the solver calls a model on the rows of all stages stacked ((T*B, n) states, stage t "
    "in rows t*B..(t+1)*B), on subsets and replicas of the batch (the elements still "
    "active, one copy per line-search step) and, for derivatives, on single points "
    "(n,) under vmap -- not only on the (B, n) batch of x0, so data with one row per "
    "batch element (a (B, n) reference or goal) cannot be closed over: subclass "
    "trajopt.Cost and override bind_rows(rows), which the solver calls with the flat "
    "batch element of each row before every evaluation (docs/constraints.md), or make "
    "the data part of the state")

#: what a non-finite derivative of a finite function usually is, and the way out
_NAN_HINT = ("its values are finite there, but torch cannot take its derivative at this "
             "point: a function whose derivative is infinite there, e.g. sqrt or a norm at "
             "0 (torch.sqrt((v ** 2).sum(-1)), torch.linalg.norm, F.normalize at v = 0: 0 * "
             "inf = NaN), x ** p with p < 1, log or 1 / x at 0; write it so that the "
             "derivative is finite (torch.sqrt(s + eps), torch.where around the point) or "
             "override derivatives() with analytic ones")

#: the derivatives' names in the messages of :func:`check_finite_derivatives`
_FIELD = {"fx": "df/dx", "fu": "df/du", "fxx": "d2f/dx2", "fux": "d2f/dudx",
          "fuu": "d2f/du2", "lx": "dl/dx", "lu": "dl/du", "lxx": "d2l/dx2",
          "lux": "d2l/dudx", "luu": "d2l/du2"}


def check_finite_derivatives(d, name: str, B: int, T: int, rows: torch.Tensor | None = None,
                             first: int = 0, model: Any = None) -> None:
    """Raise :class:`~trajopt.errors.NonFiniteError` where a derivative in ``d`` (a
    dataclass of (k*B, ...) tensors, stage-major from stage ``first``, or a dict of named
    ones) is NaN or infinite, naming ``name``, the derivative, the first such stage (of
    ``T``) and flat-batch element (``rows``: the element of each of the B rows).  One
    synchronization where all are finite (:func:`~trajopt.ddp.reverse.all_finite`);
    the stage is located only on failure."""
    named = list(d.items()) if isinstance(d, dict) else [
        (f.name, getattr(d, f.name)) for f in fields(d) if torch.is_tensor(getattr(d, f.name))]
    if all_finite([v for _, v in named]):
        return
    for field, v in named:
        bad = ~(finite_rows(v, v.dim() - 1) if v.dim() > 1 else torch.isfinite(v))
        if not bool(bad.any()):
            continue
        r = int(torch.nonzero(bad)[0, 0])
        stages = sorted({first + int(i) // B for i in torch.nonzero(bad)[:, 0]})
        elem = r % B if rows is None else int(rows.reshape(-1)[r % B])
        where = f"stage {first + r // B}" + (
            f", flat batch element {elem}" if B > 1 or rows is not None else "") + (
            f" (and {len(stages) - 1} other stage(s) of {T})" if len(stages) > 1 else "")
        cons = [c.label for c in getattr(model, "constraints", ()) or ()]
        also = f" (or the terms of {', '.join(cons)} added to it)" if cons else ""
        raise NonFiniteError(
            f"the derivative {field} ({_FIELD.get(field, field)}) of {name}{also} is not "
            f"finite (NaN or inf) at {where}: {_NAN_HINT}")


def check_terminal_derivatives(Vx: torch.Tensor, Vxx: torch.Tensor, x: torch.Tensor,
                               rows: torch.Tensor | None, T: int) -> None:
    """The terminal cost's gradient ``Vx`` (B, n) and Hessian ``Vxx`` (B, n, n) at ``x``
    (B, n), the state of stage ``T``: their shapes (one value per point) and
    :func:`check_finite_derivatives`."""
    B, n = x.shape
    if Vx.shape != (B, n) or Vxx.shape != (B, n, n):
        raise ShapeError(f"the terminal cost must map one point x (n,) to one value; its "
                         f"gradient has shape {tuple(Vx.shape)} for {(B, n)} points: "
                         f"{STACKED_ROWS}")
    check_finite_derivatives({"lx": Vx, "lxx": Vxx}, "the terminal cost", B, 1, rows, T)


def check_jacobian_shapes(d: Any, args: tuple, name: str) -> None:
    """Jacobians ``fx`` (B, n1, n) and ``fu`` (B, n1, m) of one stage (the dynamics'):
    a function that maps one point x (n,) to (1, n1) -- a broadcast against a (1, k)
    tensor -- gives (B, 1, n1, n) under ``vmap`` and failed deep in the solver."""
    lx = getattr(d, "lx", None)    # a cost: one value per point, lx (B, n)
    if torch.is_tensor(lx) and lx.shape != args[0].shape:
        raise ShapeError(f"{name} must map one point x (n,) to one value (batched: (..., n) "
                         f"to (...)); its gradient lx has shape {tuple(lx.shape)} for "
                         f"{tuple(args[0].shape)} points: {STACKED_ROWS}")
    for field, a in (("fx", args[0]), ("fu", args[1] if len(args) > 1 else None)):
        J = getattr(d, field, None)
        if not torch.is_tensor(J) or a is None:
            continue
        if J.ndim != 3 or J.shape[0] != a.shape[0] or J.shape[-1] != a.shape[-1]:
            raise ShapeError(
                f"{name} must map one point x (n,) to a vector (n_next,) (batched: (..., n) "
                f"to (..., n_next)); its Jacobian {field} has shape {tuple(J.shape)} for "
                f"{a.shape[0]} points of {a.shape[-1]} entries: does it broadcast one point "
                f"against a (1, k) tensor (x @ A.T + u * b with b of shape (1, n))?")
