"""The per-stage data of a finite-horizon LQR problem and its checks (shapes, batch
broadcasting, finiteness, symmetry), used by :class:`trajopt.LQR`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._checks import (
    batch_shape,
    check_finite,
    check_matrix,
    check_square,
    check_symmetric,
    check_vector,
    shape_str,
)
from .._linalg import mv
from ..errors import ShapeError

STAGE_ARGS = ("A", "B", "Q", "R", "M", "q", "r", "c")
RANK = {"A": 2, "B": 2, "Q": 2, "R": 2, "M": 2, "q": 1, "r": 1, "c": 1}


@dataclass(frozen=True)
class Stage:
    """One LQR stage as tensors (internal).  Optional terms are None when absent."""

    A: torch.Tensor
    B: torch.Tensor
    Q: torch.Tensor
    R: torch.Tensor
    M: torch.Tensor | None
    q: torch.Tensor | None
    r: torch.Tensor | None
    c: torch.Tensor | None

    @property
    def n(self) -> int:
        return self.A.shape[-1]

    @property
    def m(self) -> int:
        return self.B.shape[-1]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)


def stage_cost(s: Stage, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``1/2 x'Qx + 1/2 u'Ru + u'Mx + q'x + r'u`` for batched x (..., n), u (..., m)."""
    cost = 0.5 * _dot(x, mv(s.Q, x)) + 0.5 * _dot(u, mv(s.R, u))
    if s.M is not None:
        cost = cost + _dot(u, mv(s.M, x))
    if s.q is not None:
        cost = cost + _dot(s.q, x)
    if s.r is not None:
        cost = cost + _dot(s.r, u)
    return cost


def terminal_cost(QT: torch.Tensor, qT: torch.Tensor | None, x: torch.Tensor
                  ) -> torch.Tensor:
    """``1/2 x'Q_T x + q_T'x`` for batched x (..., n)."""
    cost = 0.5 * _dot(x, mv(QT, x))
    return cost if qT is None else cost + _dot(qT, x)


def split_stages(value: Any, name: str, T: int, label: str | None = None
           ) -> list[torch.Tensor | None]:
    """Per-stage list of ``value`` (a list, or stacked with its time axis before the core
    axes of argument ``name``); ``label`` names the argument in messages."""
    rank = RANK[name]
    name = label or name
    if value is None:
        return [None] * T
    if isinstance(value, list):
        if len(value) != T:
            raise ShapeError(f"{name} has {len(value)} stages but A has {T}")
        return value
    if value.ndim < rank + 1 or value.shape[-rank - 1] != T:
        want = "(..., T, r, c)" if rank == 2 else "(..., T, r)"
        raise ShapeError(f"{name} must be stacked as {want} with T = {T}, or a sequence "
                         f"of {T} stage arrays; got shape {shape_str(value)}")
    return list(value.unbind(dim=-rank - 1))


def validate_shapes(stages: list[Stage], QT: torch.Tensor, qT: torch.Tensor | None
                     ) -> None:
    """Shapes of every stage (Python-level, cheap) and batch broadcasting."""
    for t, s in enumerate(stages):
        check_matrix(s.A, f"A[{t}]", None, None)
        n, n1 = s.A.shape[-1], s.A.shape[-2]
        if t + 1 < len(stages) and stages[t + 1].A.shape[-1] != n1:
            raise ShapeError(
                f"A[{t}] maps to a state of size {n1} but A[{t + 1}] expects "
                f"{stages[t + 1].A.shape[-1]} (A[{t}] is {shape_str(s.A)}, "
                f"A[{t + 1}] is {shape_str(stages[t + 1].A)})")
        check_matrix(s.B, f"B[{t}]", n1, None)
        m = s.B.shape[-1]
        check_square(s.Q, f"Q[{t}]", n)
        check_square(s.R, f"R[{t}]", m)
        if s.M is not None:
            check_matrix(s.M, f"M[{t}]", m, n)
        if s.q is not None:
            check_vector(s.q, f"q[{t}]", n)
        if s.r is not None:
            check_vector(s.r, f"r[{t}]", m)
        if s.c is not None:
            check_vector(s.c, f"c[{t}]", n1)
    nT = stages[-1].A.shape[-2]
    check_square(QT, "QT", nT)
    if qT is not None:
        check_vector(qT, "qT", nT)
    batch_shape(*batch_args(stages, QT, qT))
    if len(stages) > 2 and any(s.A.ndim != stages[0].A.ndim for s in stages):
        batch_shape(*((s.A, 2, f"A[{t}]") for t, s in enumerate(stages)))


def batch_args(stages: list[Stage], QT: torch.Tensor, qT: torch.Tensor | None
               ) -> list[tuple[torch.Tensor | None, int, str]]:
    """``(tensor, core rank, name)`` of the data that sets the problem's batch shape (the
    first and last stages: all stages share it when stacked), for ``batch_shape``."""
    first, last = stages[0], stages[-1]
    return [(getattr(s, name), RANK[name], f"{name}[{t}]")
            for t, s in ((0, first), (len(stages) - 1, last)) for name in STAGE_ARGS] + [
        (QT, 2, "QT"), (qT, 1, "qT")]


def validate_values(named: dict[str, torch.Tensor | None], QT: torch.Tensor | None,
                     qT: torch.Tensor | None, suffix: str) -> None:
    """Finiteness and symmetry, on stacked arrays or on one stage (``suffix`` = "[t]")."""
    for name, v in named.items():
        if v is not None:
            check_finite(v, name + suffix)
    for name in ("Q", "R"):
        if named.get(name) is not None:
            check_symmetric(named[name], name + suffix)
    if QT is not None:
        check_finite(QT, "QT")
        check_symmetric(QT, "QT")
    if qT is not None:
        check_finite(qT, "qT")
