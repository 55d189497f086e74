"""Input checks run once at the public boundary (inner loops trust their inputs), and the
cheap shape tests the inner loops make before one operation over all stages."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from .errors import InvalidArgumentError, NonFiniteError, NotSymmetricError, ShapeError

_shape = operator.attrgetter("shape")


def same_shapes(values: Iterable[torch.Tensor]) -> bool:
    """Whether the tensors all have one shape (True for none): the per-stage lists' test
    before one operation over all stages; a set of the shapes costs half of comparing each
    with the first in Python (~9 against 16 us for 100 stages); a sequence that knows
    (``uniform_shapes``, :class:`trajopt.ddp.batch.Rows`) is not read."""
    uniform = getattr(values, "uniform_shapes", None)
    if uniform is not None:
        return uniform
    return len(set(map(_shape, values))) <= 1


def same_shapes_by_position(rows: Sequence[Sequence[torch.Tensor]]) -> bool:
    """Whether rows of tensors (one tuple a stage, e.g. ``(x_t, u_t)``) agree in shape
    position by position (True for none): per column, ~3x faster than comparing each row
    with the first in Python."""
    return all(same_shapes(col) for col in zip(*rows))


def broadcast_shapes(*shapes: tuple[int, ...]) -> torch.Size:
    """``torch.broadcast_shapes`` without its cost where there is nothing to broadcast:
    the shapes that are not empty all equal (the common case of the solvers' per-stage
    calls); torch's own, a Python reference implementation, costs ~70-90 us a call."""
    distinct = {tuple(s) for s in shapes if len(s)}
    if len(distinct) <= 1:
        return torch.Size(distinct.pop() if distinct else ())
    return torch.broadcast_shapes(*shapes)


def shape_str(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{name} contains NaN or infinity (shape {shape_str(t)})")


def check_matrix(t: torch.Tensor, name: str, rows: int | None, cols: int | None) -> None:
    """``t`` must be at least 2-D with the given trailing dimensions (None: any)."""
    if t.ndim < 2:
        raise ShapeError(f"{name} must be a matrix (..., {rows or 'r'}, {cols or 'c'}); "
                         f"got shape {shape_str(t)}")
    r, c = t.shape[-2:]
    if (rows is not None and r != rows) or (cols is not None and c != cols):
        want = f"(..., {rows if rows is not None else r}, {cols if cols is not None else c})"
        raise ShapeError(f"{name} must have shape {want}; got {shape_str(t)}")


def check_vector(t: torch.Tensor, name: str, size: int) -> None:
    if t.ndim < 1 or t.shape[-1] != size:
        raise ShapeError(f"{name} must have shape (..., {size}); got {shape_str(t)}")


def check_square(t: torch.Tensor, name: str, size: int | None = None) -> int:
    check_matrix(t, name, size, size)
    if t.shape[-1] != t.shape[-2]:
        raise ShapeError(f"{name} must be square; got shape {shape_str(t)}")
    return t.shape[-1]


def symmetry_tol(dtype: torch.dtype) -> float:
    """Relative asymmetry tolerated in inputs: ~sqrt(eps) of the dtype."""
    return float(torch.finfo(dtype).eps) ** 0.5


def check_symmetric(t: torch.Tensor, name: str) -> None:
    asym = (t - t.transpose(-1, -2)).abs().amax(dim=(-2, -1))
    # relative to the matrix itself (a tiny non-symmetric matrix is still non-symmetric)
    scale = t.abs().amax(dim=(-2, -1)).clamp_min(torch.finfo(t.dtype).tiny)
    if bool((asym > symmetry_tol(t.dtype) * scale).any()):
        worst = float((asym / scale).max())
        raise NotSymmetricError(
            f"{name} must be symmetric; relative asymmetry {worst:.2e} "
            f"(shape {shape_str(t)})")


def batch_shape(*tensors_and_ranks: tuple[torch.Tensor | None, int, str]) -> torch.Size:
    """Broadcast the leading (batch) dimensions; ``rank`` is each tensor's core rank."""
    shapes = []
    for t, rank, name in tensors_and_ranks:
        if t is None:
            continue
        shapes.append((t.shape[: t.ndim - rank], name))
    try:
        return torch.broadcast_shapes(*(s for s, _ in shapes))
    except RuntimeError:
        desc = ", ".join(f"{n} batch {tuple(s)}" for s, n in shapes)
        raise ShapeError(f"batch dimensions do not broadcast: {desc}") from None


def as_real(x: Any, name: str) -> torch.Tensor:
    """``torch.as_tensor(x)`` kept in its floating dtype; integers and booleans become
    floats (numpy: float64; a list or a torch tensor: the default dtype, as for floats);
    complex input is refused naming ``name``; a read-only numpy view is copied."""
    if isinstance(x, np.ndarray) and not x.flags.writeable:  # a broadcast view: torch
        x = x.copy()                                          # warns about those
    t = torch.as_tensor(x)
    if t.is_complex():
        raise InvalidArgumentError(f"{name} is complex; trajopt solves real problems only")
    if t.is_floating_point():
        return t
    # numpy integers: float64, as numpy arrays of floats; a Python list or a torch tensor
    # of integers: torch's default float dtype, as a list of floats
    return t.to(torch.float64 if isinstance(x, (np.ndarray, np.generic)) else
                torch.get_default_dtype())


def is_number(v: Any) -> bool:
    """A Python number or a 0-d array / tensor (not a Python or numpy bool): what an
    argument taken as a matrix or vector may also be given as (scipy's ``R = 1``,
    mpc.pytorch's scalar control bounds)."""
    if isinstance(v, (bool, np.bool_)):
        return False
    return isinstance(v, (int, float, np.number)) or (
        isinstance(v, (np.ndarray, torch.Tensor)) and v.ndim == 0)
