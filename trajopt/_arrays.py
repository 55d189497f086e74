"""Array plumbing: numpy in -> numpy out, torch in -> torch out.

Internally all numerics are torch.  :func:`as_tensors` converts the arguments of a public
function once, at the boundary, and returns an :class:`ArrayKind` whose :meth:`out`
converts results back to what the caller gave.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import InvalidArgumentError, ShapeError

_HALF = (torch.float16, torch.bfloat16)

__all__ = ["ArrayKind", "as_tensors"]


@dataclass(frozen=True)
class ArrayKind:
    """How results are returned: as numpy arrays or as torch tensors of a dtype/device."""

    numpy: bool
    dtype: torch.dtype
    device: torch.device

    def tensor(self, x: Any, name: str) -> torch.Tensor:
        """Convert one argument to a tensor of this kind's dtype and device."""
        if isinstance(x, torch.Tensor):
            if x.is_complex():
                raise InvalidArgumentError(f"{name} is complex; trajopt solves real problems only")
            if x.dtype in _HALF or self.dtype in _HALF:
                raise InvalidArgumentError(
                    f"{name} has dtype {x.dtype if x.dtype in _HALF else self.dtype}: "
                    "trajopt solves in float32 or float64 (torch's factorizations have no "
                    "half-precision kernels); convert with .float() or .double()")
            if x.device.type == "meta":
                raise InvalidArgumentError(f"{name} is a meta tensor (shape only, no data): "
                                           "nothing to solve")
            return x.to(dtype=self.dtype, device=self.device)
        arr = numeric_array(x, name)
        if np.iscomplexobj(arr):
            raise InvalidArgumentError(f"{name} is complex; trajopt solves real problems only")
        return torch.as_tensor(np.ascontiguousarray(arr, dtype=np.float64)).to(
            dtype=self.dtype, device=self.device
        )

    def out(self, x: Any) -> Any:
        """Convert a result (tensor, list of tensors, or None) back to the caller's type."""
        if x is None:
            return None
        if isinstance(x, (list, tuple)):
            return type(x)(self.out(v) for v in x)
        if self.numpy and isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy()
        return x


def infer_kind(*arrays: Any) -> ArrayKind:
    """The kind of the first torch tensor among ``arrays`` (searching inside lists).

    Integer tensors promote to the default float dtype; all-numpy input gives float64 on
    the CPU.
    """
    for a in arrays:
        t = _first_tensor(a)
        if t is not None:
            dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
            return ArrayKind(numpy=False, dtype=dtype, device=t.device)
    return ArrayKind(numpy=True, dtype=torch.float64, device=torch.device("cpu"))


def _first_tensor(a: Any) -> torch.Tensor | None:
    if isinstance(a, torch.Tensor):
        return a
    if isinstance(a, (list, tuple)):
        for v in a:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def numeric_array(x: Any, name: str) -> np.ndarray:
    """``np.asarray(x)`` of a number, array or nested list of numbers; a ragged list,
    strings or other objects raise :class:`~trajopt.errors.ShapeError` naming ``name``
    (numpy's own ``ValueError`` did not)."""
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise ShapeError(f"{name} could not be read as a numeric array ({exc})") from None
    if arr.dtype.kind not in "biufc":
        raise ShapeError(f"{name} could not be read as a numeric array (it holds "
                         f"{arr.dtype} data)")
    return arr


def as_tensors(named: dict[str, Any], *, sequences: bool = True,
               whole: tuple[str, ...] = ()) -> tuple[dict[str, Any], ArrayKind]:
    """Convert every non-None value of ``named`` to a tensor.

    ``sequences=True``: a list is a sequence of per-stage arrays, converted element-wise
    (the LQR's per-stage input), except for the names in ``whole`` (the terminal cost).
    ``sequences=False``: a list is one array written as nested lists (as scipy accepts
    for the DARE), converted as a whole.
    """
    kind = infer_kind(*named.values())
    out: dict[str, Any] = {}
    for name, value in named.items():
        if value is None:
            out[name] = None
        elif isinstance(value, (list, tuple)) and (not sequences or name in whole):
            out[name] = kind.tensor(numeric_array(value, name), name)
        elif isinstance(value, (list, tuple)):
            out[name] = [kind.tensor(v, f"{name}[{i}]") for i, v in enumerate(value)]
        else:
            out[name] = kind.tensor(value, name)
    return out, kind
